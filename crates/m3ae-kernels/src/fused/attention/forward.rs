//! The forward pass: one head ([`head_fwd`]: score tiles, exact softmax, `O = P V`) and the
//! driver over all `(batch, head)` pairs ([`forward`]), which saves the softmax statistics.
//! With attention dropout each probability row is multiplied by its mask after its statistics
//! are taken.

use super::padding::{
    gather_rows, gather_transposed, head_padding, is_prefix, may_skip_padding, KeptKeys,
};
use super::tiling::{pack_rows, pad8, prefetch_head, tile_rows, with_scratch};
use super::{Dims, Packing, Ptrs3, Stats};
use crate::fused::storage::uninit_buffer;
use crate::fused::{rows, tile, SharedMut};
use crate::reference::PADDING_SCORE;
use crate::Dropout;

/// Attention dropout of one head: the mask and the row index of the head's first query.
pub(super) type HeadDrop<'a> = Option<(&'a Dropout, u64)>;

/// Forward of one head. `q, k, v` point at the head's first row (row stride `rs_in`), `o` likewise
/// (`rs_out`); `max, log_sum`: `[l]`; `scratch`: [`fwd_scratch`] floats. With `keys` (the kept
/// keys of a partly padded sample) the padding keys are left out of every product, unless a row's
/// scores are so low that padding would matter (see [`SKIP_MARGIN`]); then the head runs again
/// over all keys. With `drop`, the probabilities are dropped out (module docs).
///
/// [`SKIP_MARGIN`]: super::padding::SKIP_MARGIN
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn head_fwd(
    simd: bool,
    qkv: Ptrs3,
    rs_in: usize,
    out: (*mut f32, usize),
    (pad, keys): (Option<&[f32]>, Option<&[u32]>),
    d: Dims,
    (scale, drop): (f32, HeadDrop<'_>),
    (max, log_sum): (&mut [f32], &mut [f32]),
    scratch: &mut [f32],
) {
    let st = (&mut *max, &mut *log_sum);
    let sd = (scale, drop);
    if keys.is_some() && fwd_pass(simd, qkv, rs_in, out, (pad, keys), d, sd, st, scratch) {
        return;
    }
    fwd_pass(
        simd,
        qkv,
        rs_in,
        out,
        (pad, None),
        d,
        sd,
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
    (scale, drop): (f32, HeadDrop<'_>),
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
            // dropout after the statistics: O = (P * M) V (the mask by original key index)
            if let Some((dr, row0)) = drop {
                let m = dr.row(row0 + (r0 + i) as u64);
                match keys {
                    Some(idx) => m.apply_at(&mut row[..lk], idx),
                    None => m.apply(&mut row[..lk]),
                }
            }
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

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn head_fwd_avx2(
    qkv: Ptrs3,
    rs_in: usize,
    out: (*mut f32, usize),
    pad: (Option<&[f32]>, Option<&[u32]>),
    d: Dims,
    sd: (f32, HeadDrop<'_>),
    st: (&mut [f32], &mut [f32]),
    scratch: &mut [f32],
) {
    head_fwd(true, qkv, rs_in, out, pad, d, sd, st, scratch)
}

/// Forward over all heads; inputs share one buffer (`Qkv`) or are three (`Separate`).
pub(super) fn forward(
    inputs: (&[f32], &[f32], &[f32]),
    packing: Packing,
    pad: Option<&[f32]>,
    d: Dims,
    scale: f32,
    dropout: Option<&Dropout>,
) -> (Vec<f32>, Stats) {
    let n = d.b * d.h * d.l * d.dh;
    let mut o = uninit_buffer(n);
    let mut max = vec![0f32; d.b * d.h * d.l];
    let mut log_sum = vec![0f32; d.b * d.h * d.l];
    let out = SharedMut(o.as_mut_ptr());
    let len = fwd_scratch(d);
    let kept = KeptKeys::new(pad, d.b, d.l);
    let (mxp, lsp) = (SharedMut(max.as_mut_ptr()), SharedMut(log_sum.as_mut_ptr()));
    crate::fused::for_each_index(d.b * d.h, |bh| {
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
        let sd = (scale, dropout.map(|dr| (dr, (bh * d.l) as u64)));
        with_scratch(len, |s| {
            // SAFETY: the view of (b, h) stays inside the buffers (`o` has capacity `n`) and
            // no two tasks write the same output element.
            unsafe {
                let ptrs = vw.inputs(inputs);
                let o_ptr = (out.ptr().add(vw.o), vw.rs_out);
                #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
                if crate::fused::has_avx2_fma() {
                    return head_fwd_avx2(ptrs, vw.rs_in, o_ptr, pad, d, sd, (mx, ls), s);
                }
                head_fwd(false, ptrs, vw.rs_in, o_ptr, pad, d, sd, (mx, ls), s)
            }
        })
    });
    // SAFETY: the heads of all (b, h) together write every one of the `n` output elements.
    unsafe { o.set_len(n) };
    (o, Stats { max, log_sum, kept })
}
