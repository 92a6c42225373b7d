//! Leaving padding keys out of the products: when a head may skip them ([`SKIP_MARGIN`]), the
//! kept keys of each sample, and the gather of their rows into scratch and the scatter of their
//! gradients back.

use super::Dims;
use crate::fused::tile;
use crate::reference::PADDING_SCORE;

/// A row may leave its padding keys out when its largest score over the other keys is at least
/// this far above [`PADDING_SCORE`]: every padding key's probability is then below `exp(-128)`
/// times the largest one, which is exactly zero in f32 (the reference's value too).
pub(super) const SKIP_MARGIN: f32 = 128.0;

/// Whether rows with these maxima may skip their padding keys (see [`SKIP_MARGIN`]).
pub(super) fn may_skip_padding(max: &[f32]) -> bool {
    let least = PADDING_SCORE as f32 + SKIP_MARGIN;
    max.iter().all(|&m| m >= least)
}

/// A key is padding where its flag is positive (as in the masked row passes).
fn is_padding(flag: f32) -> bool {
    flag > 0.0
}

/// The keys that are not padding, per sample, for heads that leave padding keys out of every
/// product (most of M3AE's text positions are padding).
pub(super) struct KeptKeys {
    idx: Vec<u32>,
    /// `idx[start[b]..start[b + 1]]`: the kept key indices of sample `b`, ascending.
    start: Vec<usize>,
}

impl KeptKeys {
    /// `None` when no key is padding.
    pub(super) fn new(pad: Option<&[f32]>, b: usize, l: usize) -> Option<Self> {
        let pad = pad?;
        if !pad.iter().any(|&p| is_padding(p)) {
            return None;
        }
        let mut idx = Vec::with_capacity(b * l);
        let mut start = Vec::with_capacity(b + 1);
        start.push(0);
        for row in pad.chunks_exact(l) {
            idx.extend((0..l as u32).filter(|&j| !is_padding(row[j as usize])));
            start.push(idx.len());
        }
        Some(Self { idx, start })
    }

    /// The kept keys of sample `b`, or `None` when none or all of its keys are padding (then the
    /// head runs over every key: a fully padded row attends uniformly).
    pub(super) fn of(&self, b: usize, l: usize) -> Option<&[u32]> {
        let kept = &self.idx[self.start[b]..self.start[b + 1]];
        (!kept.is_empty() && kept.len() < l).then_some(kept)
    }
}

/// Copies the `dh` leading floats of rows `idx` of `src` (row stride `rs`) into consecutive rows
/// of `dst` (row stride `dp`).
#[inline(always)]
pub(super) unsafe fn gather_rows(
    src: *const f32,
    rs: usize,
    idx: &[u32],
    (dh, dp): (usize, usize),
    dst: &mut [f32],
) {
    for (drow, &j) in dst.chunks_exact_mut(dp).zip(idx) {
        drow[..dh].copy_from_slice(std::slice::from_raw_parts(src.add(j as usize * rs), dh));
    }
}

/// Gathers rows `idx` of `src` into `rows` ([`gather_rows`]) and lays them out transposed in
/// `dst` (`dh x lp`), the key-major panel the score products read.
#[inline(always)]
pub(super) unsafe fn gather_transposed(
    simd: bool,
    (src, rs): (*const f32, usize),
    idx: &[u32],
    (dh, dp, lp): (usize, usize, usize),
    rows: &mut [f32],
    dst: &mut [f32],
) {
    gather_rows(src, rs, idx, (dh, dp), rows);
    tile::transpose(
        simd,
        (rows.as_ptr(), dp),
        (idx.len(), dh),
        (dst.as_mut_ptr(), lp),
    );
}

/// Whether the kept keys `idx` (ascending) are the first ones, i.e. only the last keys are
/// padding: their rows are then read and written in place, without gathering.
pub(super) fn is_prefix(idx: &[u32]) -> bool {
    idx.last().is_some_and(|&j| j as usize + 1 == idx.len())
}

/// Completes `dK` or `dV` of a head that left padding keys out: writes row `jj` of `src` (row
/// stride `dp`) to row `idx[jj]` of `dst` (row stride `rs`) and zeros to the other rows of the
/// `l`. When the kept keys are the first ones ([`is_prefix`]) their rows were written in place
/// and only the padding rows are zeroed.
#[inline(always)]
pub(super) unsafe fn scatter_rows(
    src: &[f32],
    idx: &[u32],
    (l, dh, dp): (usize, usize, usize),
    (dst, rs): (*mut f32, usize),
) {
    let first = if is_prefix(idx) { idx.len() } else { 0 };
    let mut next = idx.iter().enumerate().skip(first).peekable();
    for j in first..l {
        let row = std::slice::from_raw_parts_mut(dst.add(j * rs), dh);
        match next.next_if(|&(_, &i)| i as usize == j) {
            Some((jj, _)) => row.copy_from_slice(&src[jj * dp..jj * dp + dh]),
            None => row.fill(0.0),
        }
    }
}

/// The padding mask of head `bh`'s sample and, when some but not all of its keys are padding,
/// its kept keys.
pub(super) fn head_padding<'a>(
    pad: Option<&'a [f32]>,
    kept: Option<&'a KeptKeys>,
    d: Dims,
    bh: usize,
) -> (Option<&'a [f32]>, Option<&'a [u32]>) {
    let b = bh / d.h;
    let pad = pad.map(|p| &p[b * d.l..(b + 1) * d.l]);
    (pad, kept.and_then(|k| k.of(b, d.l)))
}
