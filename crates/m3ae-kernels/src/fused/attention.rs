//! Fused masked attention (CPU): forward and FlashAttention-2 style backward.
//!
//! Work is split over `(batch, head)` pairs (`for_each_index`: candle's worker pool or rayon);
//! each task owns whole heads. A task first
//! transposes `K` (and, for the backward, `V`) of its head into `Dh x L` panels in per-thread
//! scratch (reused across calls). Queries are then processed in tiles of at most [`QUERY_TILE`]
//! rows (the tiles of a head are made as even as possible). The score tile lives in scratch, the
//! softmax is exact per row, and only the row maximum and the log of the row sum are kept for the
//! backward pass (no `[B, H, L, L]` tensor is ever stored); the forward leaves `P` unnormalised and
//! scales the rows of `O = P V` instead. The products run on the register-blocked AVX2+FMA
//! micro-kernel of [`super::tile`] and the row passes (masking, `exp`, sums) on the AVX2 code of
//! [`super::rows`], with scalar loops on other CPUs. The micro-kernel reads its left operand
//! through arbitrary strides, so `P^T` and `dS^T` come from the row-major tiles without copies,
//! and its right operand by rows, so `Q`, `K`, `V` and `dO` are read in place when the head width
//! is a multiple of 8 (otherwise they are packed at a padded row stride). Two input layouts are
//! served: separate `[B, H, L, Dh]` tensors, or the packed output of the qkv projection
//! `[B, L, 3 D]` read in place (writing `[B, L, D]`, heads concatenated). Each task first asks
//! the CPU to prefetch the rows of the next head into L2, so a head does not start with misses.
//!
//! The backward recomputes each probability tile from the saved statistics and reuses it for
//! `dV` and `dS`; `delta = rowsum(dO * O)` is computed per tile. The output gradient is read
//! through its own strides whatever its layout (strided or broadcast: no `contiguous()` copy).
//! `dQ` of a tile is written straight to its place; `dK` and `dV` of a head are
//! written by its first query tile and accumulated by the later ones in place, so no buffer is
//! zero-filled and the outputs are allocated uninitialised. The summation order depends only on
//! the shapes, so results are bit-identical for any number of threads. Padding keys get the score
//! `-1e7` (replacement, as the official code), so a fully padded row attends uniformly; their
//! score gradient is zero.
//!
//! Padding keys are left out of the products altogether when a sample has some (most of M3AE's
//! text positions are padding), so the work of a head scales with its real keys. When only the
//! last keys are padding (the decoder's text) the kept rows are read and written in place;
//! otherwise (an encoder's randomly ordered kept tokens) they are gathered: `K`, `V` rows into
//! scratch, `dK`, `dV` accumulated there and scattered back. Padding rows of `dK`, `dV` are
//! zero. This is exact wherever a padding key's probability is zero in f32, which holds when a
//! row's best real score is more than [`SKIP_MARGIN`] above the padding score; a head with any
//! row below that runs over all keys instead (the backward repeats the decision from the saved
//! row maxima, and reuses the forward's list of kept keys).

use super::storage::{f32_slice, output, storage_slice, uninit_buffer};
use super::{math, rows, tile, SharedMut};
use crate::reference::PADDING_SCORE;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use std::cell::RefCell;
use std::sync::{Arc, Mutex};

/// Most query rows per tile (tiles of a head are made as even as possible below this).
pub const QUERY_TILE: usize = 72;

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    l: usize,
    dh: usize,
}

/// Where the rows of one head live: element offsets of q, k, v and the output for `(b, h)`, and
/// the row strides of the inputs and of the output.
#[derive(Debug, Clone, Copy)]
enum Packing {
    /// q, k, v, o are separate `[B, H, L, Dh]` buffers.
    Separate,
    /// q, k, v are column blocks of one `[B, L, 3 D]` buffer; o is `[B, L, D]`.
    Qkv,
}

#[derive(Debug, Clone, Copy)]
struct View {
    q: usize,
    k: usize,
    v: usize,
    o: usize,
    rs_in: usize,
    rs_out: usize,
}

impl View {
    /// Pointers to the head's first q, k and v rows in the input buffers.
    ///
    /// # Safety
    /// The view must come from [`Packing::view`] of the buffers' own dims.
    unsafe fn inputs(&self, (q, k, v): (&[f32], &[f32], &[f32])) -> Ptrs3 {
        (
            q.as_ptr().add(self.q),
            k.as_ptr().add(self.k),
            v.as_ptr().add(self.v),
        )
    }
}

impl Packing {
    fn view(self, d: Dims, bh: usize) -> View {
        let (b, h) = (bh / d.h, bh % d.h);
        match self {
            Packing::Separate => {
                let base = bh * d.l * d.dh;
                View {
                    q: base,
                    k: base,
                    v: base,
                    o: base,
                    rs_in: d.dh,
                    rs_out: d.dh,
                }
            }
            Packing::Qkv => {
                let width = d.h * d.dh;
                let base = b * d.l * 3 * width + h * d.dh;
                View {
                    q: base,
                    k: base + width,
                    v: base + 2 * width,
                    o: b * d.l * width + h * d.dh,
                    rs_in: 3 * width,
                    rs_out: width,
                }
            }
        }
    }
}

/// What the forward pass saves for the backward: per-row softmax statistics (max and log of the
/// shifted sum) and the kept keys of partly padded samples.
#[derive(Default)]
struct Stats {
    max: Vec<f32>,
    log_sum: Vec<f32>,
    kept: Option<KeptKeys>,
}

/// The output gradient as candle hands it over, read through its strides (it is often a
/// broadcast of ones, stride 0): the whole storage, and per `(b, h)` the offset of the head's
/// first element plus the row and column strides.
#[derive(Clone, Copy)]
struct GradView<'a> {
    data: &'a [f32],
    start: usize,
    /// Strides of batch, head, row and column.
    strides: [usize; 4],
}

impl GradView<'_> {
    fn head(&self, d: Dims, bh: usize) -> (usize, usize, usize) {
        let (b, h) = (bh / d.h, bh % d.h);
        let [sb, sh, sr, sc] = self.strides;
        (self.start + b * sb + h * sh, sr, sc)
    }
}

thread_local! {
    /// Per-thread scratch of the head kernels, grown on demand and reused across calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's scratch (contents unspecified).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// Query rows per tile for a head of `l` rows: tiles as even as possible, a multiple of the
/// register block, at most [`QUERY_TILE`].
fn tile_rows(l: usize) -> usize {
    let tiles = l.div_ceil(QUERY_TILE).max(1);
    (l.div_ceil(tiles).div_ceil(tile::MR) * tile::MR).clamp(1, QUERY_TILE)
}

/// `n` rounded up to a whole vector of 8 floats.
fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Copies `l x dh` rows at `src` (row stride `rs`, column stride `cs`) into `dst` (`l x dp`).
#[inline(always)]
unsafe fn pack_rows(
    src: *const f32,
    (rs, cs): (usize, usize),
    (l, dh, dp): (usize, usize, usize),
    dst: &mut [f32],
) {
    for (j, drow) in dst.chunks_exact_mut(dp).take(l).enumerate() {
        let s = src.add(j * rs);
        if cs == 1 {
            drow[..dh].copy_from_slice(std::slice::from_raw_parts(s, dh));
        } else {
            for (c, x) in drow[..dh].iter_mut().enumerate() {
                *x = *s.add(c * cs);
            }
        }
    }
}

/// A row may leave its padding keys out when its largest score over the other keys is at least
/// this far above [`PADDING_SCORE`]: every padding key's probability is then below `exp(-128)`
/// times the largest one, which is exactly zero in f32 (the reference's value too).
const SKIP_MARGIN: f32 = 128.0;

/// Whether rows with these maxima may skip their padding keys (see [`SKIP_MARGIN`]).
fn may_skip_padding(max: &[f32]) -> bool {
    let least = PADDING_SCORE as f32 + SKIP_MARGIN;
    max.iter().all(|&m| m >= least)
}

/// A key is padding where its flag is positive (as in the masked row passes).
fn is_padding(flag: f32) -> bool {
    flag > 0.0
}

/// The keys that are not padding, per sample, for heads that leave padding keys out of every
/// product (most of M3AE's text positions are padding).
struct KeptKeys {
    idx: Vec<u32>,
    /// `idx[start[b]..start[b + 1]]`: the kept key indices of sample `b`, ascending.
    start: Vec<usize>,
}

impl KeptKeys {
    /// `None` when no key is padding.
    fn new(pad: Option<&[f32]>, b: usize, l: usize) -> Option<Self> {
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
    fn of(&self, b: usize, l: usize) -> Option<&[u32]> {
        let kept = &self.idx[self.start[b]..self.start[b + 1]];
        (!kept.is_empty() && kept.len() < l).then_some(kept)
    }
}

/// Copies the `dh` leading floats of rows `idx` of `src` (row stride `rs`) into consecutive rows
/// of `dst` (row stride `dp`).
#[inline(always)]
unsafe fn gather_rows(
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
unsafe fn gather_transposed(
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
fn is_prefix(idx: &[u32]) -> bool {
    idx.last().is_some_and(|&j| j as usize + 1 == idx.len())
}

/// Completes `dK` or `dV` of a head that left padding keys out: writes row `jj` of `src` (row
/// stride `dp`) to row `idx[jj]` of `dst` (row stride `rs`) and zeros to the other rows of the
/// `l`. When the kept keys are the first ones ([`is_prefix`]) their rows were written in place
/// and only the padding rows are zeroed.
#[inline(always)]
unsafe fn scatter_rows(
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

/// Forward of one head. `q, k, v` point at the head's first row (row stride `rs_in`), `o` likewise
/// (`rs_out`); `max, log_sum`: `[l]`; `scratch`: [`fwd_scratch`] floats. With `keys` (the kept
/// keys of a partly padded sample) the padding keys are left out of every product, unless a row's
/// scores are so low that padding would matter (see [`SKIP_MARGIN`]); then the head runs again
/// over all keys.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn head_fwd(
    simd: bool,
    qkv: Ptrs3,
    rs_in: usize,
    out: (*mut f32, usize),
    (pad, keys): (Option<&[f32]>, Option<&[u32]>),
    d: Dims,
    scale: f32,
    (max, log_sum): (&mut [f32], &mut [f32]),
    scratch: &mut [f32],
) {
    let st = (&mut *max, &mut *log_sum);
    if keys.is_some() && fwd_pass(simd, qkv, rs_in, out, (pad, keys), d, scale, st, scratch) {
        return;
    }
    fwd_pass(
        simd,
        qkv,
        rs_in,
        out,
        (pad, None),
        d,
        scale,
        (max, log_sum),
        scratch,
    );
}

/// One try of [`head_fwd`]: over the kept `keys` (returns false as soon as a row's maximum is too
/// low for that) or over all keys with the padding mask (always true).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn fwd_pass(
    simd: bool,
    (q, k, v): Ptrs3,
    rs_in: usize,
    (o, rs_out): (*mut f32, usize),
    (pad, keys): (Option<&[f32]>, Option<&[u32]>),
    d: Dims,
    scale: f32,
    (max, log_sum): (&mut [f32], &mut [f32]),
    scratch: &mut [f32],
) -> bool {
    let (l, dh) = (d.l, d.dh);
    let (lp, dp, t) = (pad8(l), pad8(dh), tile_rows(l));
    let (kt, rest) = scratch.split_at_mut(dh * lp);
    let (vp, rest) = rest.split_at_mut(l * dp);
    let (kg, rest) = rest.split_at_mut(l * dp);
    let (s, inv) = rest.split_at_mut(t * lp);
    // keys: their number, the mask of the softmax, and V's rows (in place when their width is a
    // whole number of vectors, else packed; gathered when padding keys are left out and are not
    // just the last ones)
    let (lk, mask, vb) = match keys {
        Some(idx) if !is_prefix(idx) => {
            gather_transposed(simd, (k, rs_in), idx, (dh, dp, lp), kg, kt);
            gather_rows(v, rs_in, idx, (dh, dp), vp);
            (idx.len(), None, (vp.as_ptr(), dp))
        }
        _ => {
            let (lk, mask) = keys.map_or((l, pad), |idx| (idx.len(), None));
            tile::transpose(simd, (k, rs_in), (lk, dh), (kt.as_mut_ptr(), lp));
            let vb = if dh % 8 == 0 {
                (v, rs_in)
            } else {
                pack_rows(v, (rs_in, 1), (lk, dh, dp), vp);
                (vp.as_ptr(), dp)
            };
            (lk, mask, vb)
        }
    };
    let mut r0 = 0;
    while r0 < l {
        let bq = t.min(l - r0);
        // S = scale * Q_tile K^T
        tile::matmul(
            simd,
            (bq, lk, dh),
            (q.add(r0 * rs_in), rs_in, 1),
            (kt.as_ptr(), lp),
            (s.as_mut_ptr(), lp),
            scale,
            false,
        );
        // exact softmax per row; P is left unnormalised and O scaled by 1 / sum below
        for (i, row) in s.chunks_exact_mut(lp).take(bq).enumerate() {
            let (m, total) = rows::softmax(simd, row.as_mut_ptr(), lk, mask, PADDING_SCORE as f32);
            if keys.is_some() && !may_skip_padding(&[m]) {
                return false;
            }
            inv[i] = 1.0 / total;
            max[r0 + i] = m;
            log_sum[r0 + i] = total.ln();
        }
        // O_tile = P V
        tile::matmul(
            simd,
            (bq, dh, lk),
            (s.as_ptr(), lp, 1),
            vb,
            (o.add(r0 * rs_out), rs_out),
            1.0,
            false,
        );
        for (i, &f) in inv.iter().enumerate().take(bq) {
            let row = std::slice::from_raw_parts_mut(o.add((r0 + i) * rs_out), dh);
            for x in row {
                *x *= f;
            }
        }
        r0 += bq;
    }
    true
}

/// Scratch floats of [`head_fwd`].
fn fwd_scratch(d: Dims) -> usize {
    let (lp, dp) = (pad8(d.l), pad8(d.dh));
    let t = tile_rows(d.l);
    d.dh * lp + 2 * d.l * dp + t * lp + t
}

/// Scratch floats of [`head_bwd`].
fn bwd_scratch(d: Dims) -> usize {
    let (lp, dp, t) = (pad8(d.l), pad8(d.dh), tile_rows(d.l));
    2 * d.dh * lp + 5 * d.l * dp + 2 * t * lp + t * dp + t
}

/// Backward of one head: writes `dq`, `dk`, `dv` (same strides as the inputs), each element once;
/// `o` uses the output stride, `dout` the strides of [`GradView::head`]. With `keys`, padding keys
/// are left out exactly when the forward left them out (decided from the saved maxima); their
/// `dk` and `dv` rows are zero.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn head_bwd(
    simd: bool,
    (q, k, v): Ptrs3,
    rs_in: usize,
    (o, rs_out): (*const f32, usize),
    (dout, gr, gc): (*const f32, usize, usize),
    (max, log_sum): (&[f32], &[f32]),
    (pad, keys): (Option<&[f32]>, Option<&[u32]>),
    d: Dims,
    scale: f32,
    (dq, dk, dv): (*mut f32, *mut f32, *mut f32),
    scratch: &mut [f32],
) {
    let (l, dh) = (d.l, d.dh);
    let (lp, dp, t) = (pad8(l), pad8(dh), tile_rows(l));
    let (kt, rest) = scratch.split_at_mut(dh * lp);
    let (vt, rest) = rest.split_at_mut(dh * lp);
    let (kp, rest) = rest.split_at_mut(l * dp);
    let (qp, rest) = rest.split_at_mut(l * dp);
    let (vg, rest) = rest.split_at_mut(l * dp);
    let (dkc, rest) = rest.split_at_mut(l * dp);
    let (dvc, rest) = rest.split_at_mut(l * dp);
    let (p, rest) = rest.split_at_mut(t * lp);
    let (ds, rest) = rest.split_at_mut(t * lp);
    let (dot, delta) = rest.split_at_mut(t * dp);
    let keys = keys.filter(|_| may_skip_padding(max));
    // Rows of K and Q serve as the right operand of products: read in place unless their width
    // is not a whole number of vectors (or K's rows are gathered).
    let direct = dh % 8 == 0;
    let qb = if direct {
        (q, rs_in)
    } else {
        pack_rows(q, (rs_in, 1), (l, dh, dp), qp);
        (qp.as_ptr(), dp)
    };
    // keys: their number, the mask, K's rows, and where dK and dV go (gathered keys: to scratch,
    // scattered at the end; kept keys that are the first ones: in place)
    let (lk, mask, kb, (dkw, dvw, rsw)) = match keys {
        Some(idx) if !is_prefix(idx) => {
            gather_transposed(simd, (k, rs_in), idx, (dh, dp, lp), kp, kt);
            gather_transposed(simd, (v, rs_in), idx, (dh, dp, lp), vg, vt);
            let w = (dkc.as_mut_ptr(), dvc.as_mut_ptr(), dp);
            (idx.len(), None, (kp.as_ptr(), dp), w)
        }
        _ => {
            let (lk, mask) = keys.map_or((l, pad), |idx| (idx.len(), None));
            tile::transpose(simd, (k, rs_in), (lk, dh), (kt.as_mut_ptr(), lp));
            tile::transpose(simd, (v, rs_in), (lk, dh), (vt.as_mut_ptr(), lp));
            let kb = if direct {
                (k, rs_in)
            } else {
                pack_rows(k, (rs_in, 1), (lk, dh, dp), kp);
                (kp.as_ptr(), dp)
            };
            (lk, mask, kb, (dk, dv, rs_in))
        }
    };
    let mut r0 = 0;
    while r0 < l {
        let bq = t.min(l - r0);
        // the dO tile (in place when its rows are unit-stride, else packed);
        // delta = rowsum(dO * O)
        let (dob, dors) = if direct && gc == 1 {
            (dout.add(r0 * gr), gr)
        } else {
            pack_rows(dout.add(r0 * gr), (gr, gc), (bq, dh, dp), dot);
            (dot.as_ptr(), dp)
        };
        for (i, di) in delta.iter_mut().enumerate().take(bq) {
            let a = std::slice::from_raw_parts(dob.add(i * dors), dh);
            let b = std::slice::from_raw_parts(o.add((r0 + i) * rs_out), dh);
            *di = math::dot(a, b);
        }
        // P, recomputed from the saved statistics
        tile::matmul(
            simd,
            (bq, lk, dh),
            (qb.0.add(r0 * qb.1), qb.1, 1),
            (kt.as_ptr(), lp),
            (p.as_mut_ptr(), lp),
            scale,
            false,
        );
        for (i, row) in p.chunks_exact_mut(lp).take(bq).enumerate() {
            let st = (max[r0 + i], log_sum[r0 + i]);
            rows::probabilities(simd, row.as_mut_ptr(), lk, mask, PADDING_SCORE as f32, st);
        }
        // dV (+)= P^T dO_tile
        tile::matmul(
            simd,
            (lk, dh, bq),
            (p.as_ptr(), 1, lp),
            (dob, dors),
            (dvw, rsw),
            1.0,
            r0 > 0,
        );
        // dP = dO_tile V^T, then dS = P * (dP - delta), zero at padded keys
        tile::matmul(
            simd,
            (bq, lk, dh),
            (dob, dors, 1),
            (vt.as_ptr(), lp),
            (ds.as_mut_ptr(), lp),
            1.0,
            false,
        );
        for (i, (prow, grow)) in p
            .chunks_exact(lp)
            .zip(ds.chunks_exact_mut(lp))
            .take(bq)
            .enumerate()
        {
            rows::score_grad(simd, grow.as_mut_ptr(), prow.as_ptr(), lk, mask, delta[i]);
        }
        // dQ_tile = scale * dS K ; dK (+)= scale * dS^T Q_tile
        tile::matmul(
            simd,
            (bq, dh, lk),
            (ds.as_ptr(), lp, 1),
            kb,
            (dq.add(r0 * rs_in), rs_in),
            scale,
            false,
        );
        tile::matmul(
            simd,
            (lk, dh, bq),
            (ds.as_ptr(), 1, lp),
            (qb.0.add(r0 * qb.1), qb.1),
            (dkw, rsw),
            scale,
            r0 > 0,
        );
        r0 += bq;
    }
    // dK, dV rows of the padding keys are zero (the other rows are scattered from scratch unless
    // they were written in place)
    if let Some(idx) = keys {
        scatter_rows(dkc, idx, (l, dh, dp), (dk, rs_in));
        scatter_rows(dvc, idx, (l, dh, dp), (dv, rs_in));
    }
}

type Ptrs3 = (*const f32, *const f32, *const f32);

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn head_fwd_avx2(
    qkv: Ptrs3,
    rs_in: usize,
    out: (*mut f32, usize),
    pad: (Option<&[f32]>, Option<&[u32]>),
    d: Dims,
    scale: f32,
    st: (&mut [f32], &mut [f32]),
    scratch: &mut [f32],
) {
    head_fwd(true, qkv, rs_in, out, pad, d, scale, st, scratch)
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn head_bwd_avx2(
    qkv: Ptrs3,
    rs_in: usize,
    o: (*const f32, usize),
    dout: (*const f32, usize, usize),
    st: (&[f32], &[f32]),
    pad: (Option<&[f32]>, Option<&[u32]>),
    d: Dims,
    scale: f32,
    grads: (*mut f32, *mut f32, *mut f32),
    scratch: &mut [f32],
) {
    head_bwd(true, qkv, rs_in, o, dout, st, pad, d, scale, grads, scratch)
}

/// Hints the CPU to bring `rows` rows of `width` floats at `ptr` (row stride `rs`) into its L2
/// cache. Used on the head after the current one, so that a task does not start it with misses.
#[inline(always)]
fn prefetch_rows(ptr: *const f32, rows: usize, rs: usize, width: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        if width == 0 {
            return;
        }
        for j in 0..rows {
            let row = ptr.wrapping_add(j * rs);
            let mut c = 0;
            while c < width {
                // SAFETY: a prefetch never faults or changes memory; SSE is part of x86_64.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(c) as *const i8) };
                c += 16;
            }
            // SAFETY: as above (the last line of a row that is not line-aligned).
            unsafe { _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(width - 1) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ptr, rows, rs, width);
}

/// [`prefetch_rows`] of the q, k, v rows of head `bh`, if it exists.
#[inline(always)]
fn prefetch_head(inputs: (&[f32], &[f32], &[f32]), packing: Packing, d: Dims, bh: usize) {
    if bh < d.b * d.h {
        let vw = packing.view(d, bh);
        for (buf, off) in [(inputs.0, vw.q), (inputs.1, vw.k), (inputs.2, vw.v)] {
            prefetch_rows(buf.as_ptr().wrapping_add(off), d.l, vw.rs_in, d.dh);
        }
    }
}

/// The padding mask of head `bh`'s sample and, when some but not all of its keys are padding,
/// its kept keys.
fn head_padding<'a>(
    pad: Option<&'a [f32]>,
    kept: Option<&'a KeptKeys>,
    d: Dims,
    bh: usize,
) -> (Option<&'a [f32]>, Option<&'a [u32]>) {
    let b = bh / d.h;
    let pad = pad.map(|p| &p[b * d.l..(b + 1) * d.l]);
    (pad, kept.and_then(|k| k.of(b, d.l)))
}

/// Forward over all heads; inputs share one buffer (`Qkv`) or are three (`Separate`).
fn forward(
    inputs: (&[f32], &[f32], &[f32]),
    packing: Packing,
    pad: Option<&[f32]>,
    d: Dims,
    scale: f32,
) -> (Vec<f32>, Stats) {
    let n = d.b * d.h * d.l * d.dh;
    let mut o = uninit_buffer(n);
    let mut max = vec![0f32; d.b * d.h * d.l];
    let mut log_sum = vec![0f32; d.b * d.h * d.l];
    let out = SharedMut(o.as_mut_ptr());
    let len = fwd_scratch(d);
    let kept = KeptKeys::new(pad, d.b, d.l);
    let (mxp, lsp) = (SharedMut(max.as_mut_ptr()), SharedMut(log_sum.as_mut_ptr()));
    super::for_each_index(d.b * d.h, |bh| {
        // SAFETY: each head writes only its own `l` statistics.
        let (mx, ls) = unsafe {
            (
                std::slice::from_raw_parts_mut(mxp.ptr().add(bh * d.l), d.l),
                std::slice::from_raw_parts_mut(lsp.ptr().add(bh * d.l), d.l),
            )
        };
        prefetch_head(inputs, packing, d, bh + 1);
        let vw = packing.view(d, bh);
        let pad = head_padding(pad, kept.as_ref(), d, bh);
        with_scratch(len, |s| {
            // SAFETY: the view of (b, h) stays inside the buffers (`o` has capacity `n`) and
            // no two tasks write the same output element.
            unsafe {
                let ptrs = vw.inputs(inputs);
                let o_ptr = (out.ptr().add(vw.o), vw.rs_out);
                #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
                if super::has_avx2_fma() {
                    return head_fwd_avx2(ptrs, vw.rs_in, o_ptr, pad, d, scale, (mx, ls), s);
                }
                head_fwd(false, ptrs, vw.rs_in, o_ptr, pad, d, scale, (mx, ls), s)
            }
        })
    });
    // SAFETY: the heads of all (b, h) together write every one of the `n` output elements.
    unsafe { o.set_len(n) };
    (o, Stats { max, log_sum, kept })
}

/// Backward over all heads. Returns one gradient buffer (`Qkv`: `[B, L, 3 D]`) or three.
#[allow(clippy::too_many_arguments)]
fn backward(
    inputs: (&[f32], &[f32], &[f32]),
    o: &[f32],
    grad: GradView<'_>,
    packing: Packing,
    stats: &Stats,
    pad: Option<&[f32]>,
    d: Dims,
    scale: f32,
) -> Vec<Vec<f32>> {
    let n = d.b * d.h * d.l * d.dh;
    let (count, len) = match packing {
        Packing::Separate => (3, n),
        Packing::Qkv => (1, 3 * n),
    };
    let mut grads: Vec<Vec<f32>> = (0..count).map(|_| uninit_buffer(len)).collect();
    let ptrs: Vec<SharedMut> = grads
        .iter_mut()
        .map(|g| SharedMut(g.as_mut_ptr()))
        .collect();
    let (gq, gk, gv) = match packing {
        Packing::Separate => (ptrs[0], ptrs[1], ptrs[2]),
        Packing::Qkv => (ptrs[0], ptrs[0], ptrs[0]),
    };
    let scratch = bwd_scratch(d);
    super::for_each_index(d.b * d.h, |bh| {
        prefetch_head(inputs, packing, d, bh + 1);
        if bh + 1 < d.b * d.h {
            let next = packing.view(d, bh + 1);
            prefetch_rows(o.as_ptr().wrapping_add(next.o), d.l, next.rs_out, d.dh);
            let (g0, gr, gc) = grad.head(d, bh + 1);
            if gc == 1 && gr != 0 {
                prefetch_rows(grad.data.as_ptr().wrapping_add(g0), d.l, gr, d.dh);
            }
        }
        let vw = packing.view(d, bh);
        let rl = bh * d.l..(bh + 1) * d.l;
        let pad = head_padding(pad, stats.kept.as_ref(), d, bh);
        let (g0, gr, gc) = grad.head(d, bh);
        with_scratch(scratch, |s| {
            // SAFETY: as in `forward`: each task reads its own (b, h) view and writes only the
            // gradient elements of that view; the output gradient is read inside its storage
            // through its own layout.
            unsafe {
                let ins = vw.inputs(inputs);
                let o = (o.as_ptr().add(vw.o), vw.rs_out);
                let dout = (grad.data.as_ptr().add(g0), gr, gc);
                let st = (&stats.max[rl.clone()], &stats.log_sum[rl]);
                let outs = (gq.ptr().add(vw.q), gk.ptr().add(vw.k), gv.ptr().add(vw.v));
                #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
                if super::has_avx2_fma() {
                    return head_bwd_avx2(ins, vw.rs_in, o, dout, st, pad, d, scale, outs, s);
                }
                head_bwd(false, ins, vw.rs_in, o, dout, st, pad, d, scale, outs, s)
            }
        })
    });
    for g in grads.iter_mut() {
        // SAFETY: the heads of all (b, h) together write every element of each gradient buffer
        // (dq, dk and dv of every head cover `[B, H, L, Dh]`, or all of `[B, L, 3 D]`).
        unsafe { g.set_len(len) };
    }
    grads
}

/// The full f32 data of a CPU tensor's storage with its layout's start offset and strides.
fn grad_view<'a>(s: &'a Storage, l: &Layout, strides: [usize; 4]) -> Result<GradView<'a>> {
    let data = match s {
        Storage::Cpu(c) => c.as_slice::<f32>()?,
        _ => candle_core::bail!("fused attention: only CPU tensors are supported"),
    };
    Ok(GradView {
        data,
        start: l.start_offset(),
        strides,
    })
}

fn take_stats(m: &Mutex<Option<Arc<Stats>>>) -> Result<Arc<Stats>> {
    m.lock()
        .expect("stats lock")
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("fused attention: backward before forward".into()))
}

fn check_padding(p: &Option<Arc<Vec<f32>>>, d: Dims) -> Result<()> {
    if let Some(p) = p {
        if p.len() != d.b * d.l {
            candle_core::bail!(
                "fused attention: key padding has {} values, expected {}",
                p.len(),
                d.b * d.l
            );
        }
    }
    Ok(())
}

/// The op on separate `[B, H, L, Dh]` q, k, v. One instance per call: it keeps the statistics of
/// its own forward pass.
pub(crate) struct FusedAttention {
    scale: f32,
    padding: Option<Arc<Vec<f32>>>,
    stats: Mutex<Option<Arc<Stats>>>,
}

impl FusedAttention {
    pub(crate) fn new(scale: f64, padding: Option<Vec<f32>>) -> Self {
        Self {
            scale: scale as f32,
            padding: padding.map(Arc::new),
            stats: Mutex::new(None),
        }
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "m3ae-fused-masked-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, l, dh) = l1.shape().dims4()?;
        if l2.shape() != l1.shape() || l3.shape() != l1.shape() {
            candle_core::bail!(
                "fused attention: q {:?}, k {:?}, v {:?} must have one shape",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let d = Dims { b, h, l, dh };
        check_padding(&self.padding, d)?;
        let ins = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let (o, stats) = forward(
            ins,
            Packing::Separate,
            self.padding.as_deref().map(|p| p.as_slice()),
            d,
            self.scale,
        );
        *self.stats.lock().expect("stats lock") = Some(Arc::new(stats));
        Ok((CpuStorage::F32(o), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = take_stats(&self.stats)?;
        let (b, h, l, dh) = q.dims4()?;
        let d = Dims { b, h, l, dh };
        let tensors = [q, k, v, res];
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut s = Vec::with_capacity(4);
        for (g, l) in &guards {
            s.push(storage_slice(g, l)?);
        }
        let (gs, gl) = grad_res.storage_and_layout();
        let st = gl.stride();
        let grad = grad_view(&gs, gl, [st[0], st[1], st[2], st[3]])?;
        let mut g = backward(
            (s[0], s[1], s[2]),
            s[3],
            grad,
            Packing::Separate,
            &stats,
            self.padding.as_deref().map(|p| p.as_slice()),
            d,
            self.scale,
        );
        drop((guards, gs));
        let shape = q.shape().clone();
        let (dv, dk, dq) = (g.pop(), g.pop(), g.pop());
        let mk = |x: Option<Vec<f32>>| -> Result<Option<Tensor>> {
            x.map(|x| output(x, &shape, q.device())).transpose()
        };
        Ok((mk(dq)?, mk(dk)?, mk(dv)?))
    }
}

/// The op on the packed qkv projection `[B, L, 3 D]` -> `[B, L, D]`.
pub(crate) struct FusedQkvAttention {
    heads: usize,
    scale: f32,
    padding: Option<Arc<Vec<f32>>>,
    stats: Mutex<Option<Arc<Stats>>>,
}

impl FusedQkvAttention {
    pub(crate) fn new(heads: usize, scale: f64, padding: Option<Vec<f32>>) -> Self {
        Self {
            heads,
            scale: scale as f32,
            padding: padding.map(Arc::new),
            stats: Mutex::new(None),
        }
    }

    fn dims(&self, shape: &Shape) -> Result<Dims> {
        let (b, l, c3) = shape.dims3()?;
        if self.heads == 0 || c3 % (3 * self.heads) != 0 {
            candle_core::bail!(
                "fused attention: qkv width {c3} is not 3 x heads ({}) x head dim",
                self.heads
            );
        }
        Ok(Dims {
            b,
            h: self.heads,
            l,
            dh: c3 / (3 * self.heads),
        })
    }
}

impl CustomOp1 for FusedQkvAttention {
    fn name(&self) -> &'static str {
        "m3ae-fused-qkv-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l.shape())?;
        check_padding(&self.padding, d)?;
        let x = f32_slice(s, l)?;
        let (o, stats) = forward(
            (x, x, x),
            Packing::Qkv,
            self.padding.as_deref().map(|p| p.as_slice()),
            d,
            self.scale,
        );
        *self.stats.lock().expect("stats lock") = Some(Arc::new(stats));
        Ok((CpuStorage::F32(o), Shape::from((d.b, d.l, d.h * d.dh))))
    }

    fn bwd(&self, qkv: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let stats = take_stats(&self.stats)?;
        let d = self.dims(qkv.shape())?;
        let (xs, xl) = qkv.storage_and_layout();
        let (os, ol) = res.storage_and_layout();
        let (gs, gl) = grad_res.storage_and_layout();
        let st = gl.stride();
        let grad = grad_view(&gs, gl, [st[0], d.dh * st[2], st[1], st[2]])?;
        let x = storage_slice(&xs, xl)?;
        let mut g = backward(
            (x, x, x),
            storage_slice(&os, ol)?,
            grad,
            Packing::Qkv,
            &stats,
            self.padding.as_deref().map(|p| p.as_slice()),
            d,
            self.scale,
        );
        drop((xs, os, gs));
        let dqkv = g.pop().expect("one gradient buffer");
        Ok(Some(output(dqkv, qkv.shape(), qkv.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn values(shape: &[usize], seed: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Runs the op's forward on CPU storage and returns its output as a tensor.
    fn forward3(op: &FusedAttention, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (sq, lq) = q.storage_and_layout();
        let (sk, lk) = k.storage_and_layout();
        let (sv, lv) = v.storage_and_layout();
        let cpu = |s: &Storage| match s {
            Storage::Cpu(c) => c.clone(),
            _ => unreachable!(),
        };
        let (o, shape) = op
            .cpu_fwd(&cpu(&sq), lq, &cpu(&sk), lk, &cpu(&sv), lv)
            .unwrap();
        match o {
            CpuStorage::F32(o) => Tensor::from_vec(o, shape, &Device::Cpu).unwrap(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn strided_and_broadcast_output_gradients_match_contiguous_ones() {
        let (b, h, l, dh) = (2, 3, 21, 16);
        let (q, k, v) = (
            values(&[b, h, l, dh], 1),
            values(&[b, h, l, dh], 2),
            values(&[b, h, l, dh], 3),
        );
        let pad: Vec<f32> = (0..b * l).map(|i| (i % 5 == 3) as u8 as f32).collect();
        let op = FusedAttention::new(0.3, Some(pad.clone()));
        let res = forward3(&op, &q, &k, &v);
        // a gradient stored as [B, H, Dh, L] and transposed: column stride L
        let strided = values(&[b, h, dh, l], 4).transpose(2, 3).unwrap();
        let broadcast = Tensor::ones((), DType::F32, &Device::Cpu)
            .unwrap()
            .broadcast_as((b, h, l, dh))
            .unwrap();
        for grad in [strided, broadcast] {
            assert!(!grad.is_contiguous());
            let dense = grad.contiguous().unwrap();
            let a = op.bwd(&q, &k, &v, &res, &grad).unwrap();
            let e = op.bwd(&q, &k, &v, &res, &dense).unwrap();
            for (x, y) in [(a.0, e.0), (a.1, e.1), (a.2, e.2)] {
                assert_eq!(flat(&x.unwrap()), flat(&y.unwrap()));
            }
        }
        // the packed layout: [B, L, 3 D] in, gradient [B, L, D] stored as [B, D, L]
        let heads = 2;
        let qkv = values(&[b, l, 3 * heads * dh], 5);
        let op = FusedQkvAttention::new(heads, 0.3, Some(pad));
        let (s, lay) = qkv.storage_and_layout();
        let x = match &*s {
            Storage::Cpu(c) => c.clone(),
            _ => unreachable!(),
        };
        let (o, shape) = op.cpu_fwd(&x, lay).unwrap();
        drop(s);
        let res = match o {
            CpuStorage::F32(o) => Tensor::from_vec(o, shape, &Device::Cpu).unwrap(),
            _ => unreachable!(),
        };
        let grad = values(&[b, heads * dh, l], 6).transpose(1, 2).unwrap();
        let a = op.bwd(&qkv, &res, &grad).unwrap().unwrap();
        let e = op
            .bwd(&qkv, &res, &grad.contiguous().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(flat(&a), flat(&e));
    }
}
