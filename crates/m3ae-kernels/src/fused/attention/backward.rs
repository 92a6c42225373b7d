//! The backward pass: one head ([`head_bwd`]: the probabilities recomputed from the saved
//! statistics, then `dV`, `dS`, `dQ` and `dK` per query tile) and the driver over all
//! `(batch, head)` pairs ([`backward`]). With attention dropout the masked probabilities
//! `P * M` (mask regenerated from the key) go into `dV` and the score gradient.

use super::forward::HeadDrop;
use super::padding::{gather_transposed, head_padding, is_prefix, may_skip_padding, scatter_rows};
use super::tiling::{pack_rows, pad8, prefetch_head, prefetch_rows, tile_rows, with_scratch};
use super::{Dims, GradView, Packing, Ptrs3, Stats};
use crate::fused::storage::uninit_buffer;
use crate::fused::{math, rows, tile, SharedMut};
use crate::reference::PADDING_SCORE;
use crate::Dropout;

/// Scratch floats of [`head_bwd`].
fn bwd_scratch(d: Dims) -> usize {
    let (lp, dp, t) = (pad8(d.l), pad8(d.dh), tile_rows(d.l));
    2 * d.dh * lp + 5 * d.l * dp + 3 * t * lp + t * dp + t
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
    (scale, drop): (f32, HeadDrop<'_>),
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
    let (pm, rest) = rest.split_at_mut(t * lp);
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
        // with dropout, P * M (the forward's mask, by original key index)
        if let Some((dr, row0)) = drop {
            for (i, (prow, mrow)) in p
                .chunks_exact(lp)
                .zip(pm.chunks_exact_mut(lp))
                .take(bq)
                .enumerate()
            {
                let m = dr.row(row0 + (r0 + i) as u64);
                mrow[..lk].copy_from_slice(&prow[..lk]);
                match keys {
                    Some(idx) => m.apply_at(&mut mrow[..lk], idx),
                    None => m.apply(&mut mrow[..lk]),
                }
            }
        }
        let pd = if drop.is_some() { &*pm } else { &*p };
        // dV (+)= (P * M)^T dO_tile
        tile::matmul(
            simd,
            (lk, dh, bq),
            (pd.as_ptr(), 1, lp),
            (dob, dors),
            (dvw, rsw),
            1.0,
            r0 > 0,
        );
        // dP = dO_tile V^T, then dS = P * (dP - delta) (with dropout (P * M) * dP - P * delta),
        // zero at padded keys
        tile::matmul(
            simd,
            (bq, lk, dh),
            (dob, dors, 1),
            (vt.as_ptr(), lp),
            (ds.as_mut_ptr(), lp),
            1.0,
            false,
        );
        for (i, ((prow, grow), mrow)) in p
            .chunks_exact(lp)
            .zip(ds.chunks_exact_mut(lp))
            .zip(pd.chunks_exact(lp))
            .take(bq)
            .enumerate()
        {
            if drop.is_some() {
                rows::score_grad_dropout(&mut grow[..lk], &prow[..lk], &mrow[..lk], mask, delta[i]);
            } else {
                rows::score_grad(simd, grow.as_mut_ptr(), prow.as_ptr(), lk, mask, delta[i]);
            }
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
    sd: (f32, HeadDrop<'_>),
    grads: (*mut f32, *mut f32, *mut f32),
    scratch: &mut [f32],
) {
    head_bwd(true, qkv, rs_in, o, dout, st, pad, d, sd, grads, scratch)
}

/// Backward over all heads. Returns one gradient buffer (`Qkv`: `[B, L, 3 D]`) or three.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    inputs: (&[f32], &[f32], &[f32]),
    o: &[f32],
    grad: GradView<'_>,
    packing: Packing,
    stats: &Stats,
    pad: Option<&[f32]>,
    d: Dims,
    scale: f32,
    dropout: Option<&Dropout>,
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
    crate::fused::for_each_index(d.b * d.h, |bh| {
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
        let sd = (scale, dropout.map(|dr| (dr, (bh * d.l) as u64)));
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
                if crate::fused::has_avx2_fma() {
                    return head_bwd_avx2(ins, vw.rs_in, o, dout, st, pad, d, sd, outs, s);
                }
                head_bwd(false, ins, vw.rs_in, o, dout, st, pad, d, sd, outs, s)
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
