//! Fused masked attention (CPU): forward and FlashAttention-2 style backward.
//!
//! Work is split over `(batch, head)` pairs with rayon. Inside a head, queries are processed in
//! tiles of [`QUERY_TILE`] rows against all keys: the score tile (`QUERY_TILE x L`) lives in a
//! per-task scratch buffer, the softmax is exact per row, and only the row maximum and the log of
//! the row sum are kept for the backward pass (no `[B, H, L, L]` tensor is ever stored). The
//! backward recomputes each probability tile from those statistics. The four products of a tile
//! run on the `gemm` crate (runtime-dispatched AVX2/AVX-512 micro-kernels); the elementwise parts
//! are compiled for AVX2+FMA when available. Padding keys get the score `-1e7` (replacement, as
//! the official code), so a fully padded row attends uniformly; their score gradient is zero.

use super::math;
use super::storage::{f32_slice, output};
use crate::reference::PADDING_SCORE;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Query rows per tile.
pub const QUERY_TILE: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    l: usize,
    dh: usize,
}

/// Per-row softmax statistics saved by the forward pass: max and log of the shifted sum.
#[derive(Debug, Default)]
struct Stats {
    max: Vec<f32>,
    log_sum: Vec<f32>,
}

/// The custom op. One instance per call: it keeps the statistics of its own forward pass.
pub(crate) struct FusedAttention {
    scale: f32,
    padding: Option<Arc<Vec<f32>>>,
    stats: Mutex<Option<Arc<Stats>>>,
}

/// `dst (m x n, row stride dst_rs) = [dst +] beta * lhs (m x k) * rhs (k x n)`, strides in elements.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Replaces padded scores in a `rows x l` tile.
#[inline(always)]
fn mask_tile(s: &mut [f32], l: usize, pad: Option<&[f32]>) {
    if let Some(pad) = pad {
        for row in s.chunks_exact_mut(l) {
            for (x, &p) in row.iter_mut().zip(pad) {
                *x = if p > 0.0 { PADDING_SCORE as f32 } else { *x };
            }
        }
    }
}

/// Forward of one head. `q, k, v, o`: `[l, dh]`; `max, log_sum`: `[l]`; `s`: scratch.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn head_fwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pad: Option<&[f32]>,
    d: Dims,
    scale: f32,
    o: &mut [f32],
    max: &mut [f32],
    log_sum: &mut [f32],
    s: &mut [f32],
) {
    let (l, dh) = (d.l, d.dh);
    let mut r0 = 0;
    while r0 < l {
        let bq = QUERY_TILE.min(l - r0);
        let s = &mut s[..bq * l];
        // S = scale * Q_tile K^T
        unsafe {
            mm(
                bq,
                l,
                dh,
                s.as_mut_ptr(),
                l,
                false,
                q[r0 * dh..].as_ptr(),
                dh,
                1,
                k.as_ptr(),
                1,
                dh,
                scale,
            );
        }
        mask_tile(s, l, pad);
        for (i, row) in s.chunks_exact_mut(l).enumerate() {
            let m = math::max(row);
            for x in row.iter_mut() {
                *x = math::exp(*x - m);
            }
            let total = math::sum(row);
            let inv = 1.0 / total;
            for x in row.iter_mut() {
                *x *= inv;
            }
            max[r0 + i] = m;
            log_sum[r0 + i] = total.ln();
        }
        // O_tile = P V
        unsafe {
            mm(
                bq,
                dh,
                l,
                o[r0 * dh..].as_mut_ptr(),
                dh,
                false,
                s.as_ptr(),
                l,
                1,
                v.as_ptr(),
                dh,
                1,
                1.0,
            );
        }
        r0 += bq;
    }
}

/// Backward of one head: fills `dq` and accumulates into zeroed `dk`, `dv`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn head_bwd(
    (q, k, v, o, dout): Ins<'_>,
    (max, log_sum): (&[f32], &[f32]),
    pad: Option<&[f32]>,
    d: Dims,
    scale: f32,
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    (p, dp, delta): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (l, dh) = (d.l, d.dh);
    for i in 0..l {
        delta[i] = math::dot(&dout[i * dh..(i + 1) * dh], &o[i * dh..(i + 1) * dh]);
    }
    let mut r0 = 0;
    while r0 < l {
        let bq = QUERY_TILE.min(l - r0);
        let p = &mut p[..bq * l];
        let dp = &mut dp[..bq * l];
        unsafe {
            mm(
                bq,
                l,
                dh,
                p.as_mut_ptr(),
                l,
                false,
                q[r0 * dh..].as_ptr(),
                dh,
                1,
                k.as_ptr(),
                1,
                dh,
                scale,
            );
        }
        mask_tile(p, l, pad);
        for (i, row) in p.chunks_exact_mut(l).enumerate() {
            let (m, ls) = (max[r0 + i], log_sum[r0 + i]);
            for x in row.iter_mut() {
                *x = math::exp((*x - m) - ls);
            }
        }
        unsafe {
            // dV += P^T dO_tile
            mm(
                l,
                dh,
                bq,
                dv.as_mut_ptr(),
                dh,
                true,
                p.as_ptr(),
                1,
                l,
                dout[r0 * dh..].as_ptr(),
                dh,
                1,
                1.0,
            );
            // dP = dO_tile V^T
            mm(
                bq,
                l,
                dh,
                dp.as_mut_ptr(),
                l,
                false,
                dout[r0 * dh..].as_ptr(),
                dh,
                1,
                v.as_ptr(),
                1,
                dh,
                1.0,
            );
        }
        // dS = P * (dP - delta); zero where the score was replaced by the padding constant.
        for (i, (prow, dprow)) in p.chunks_exact(l).zip(dp.chunks_exact_mut(l)).enumerate() {
            let di = delta[r0 + i];
            for (g, &pv) in dprow.iter_mut().zip(prow) {
                *g = pv * (*g - di);
            }
            if let Some(pad) = pad {
                for (g, &pm) in dprow.iter_mut().zip(pad) {
                    *g = if pm > 0.0 { 0.0 } else { *g };
                }
            }
        }
        unsafe {
            // dQ_tile = scale * dS K ; dK += scale * dS^T Q_tile
            mm(
                bq,
                dh,
                l,
                dq[r0 * dh..].as_mut_ptr(),
                dh,
                false,
                dp.as_ptr(),
                l,
                1,
                k.as_ptr(),
                dh,
                1,
                scale,
            );
            mm(
                l,
                dh,
                bq,
                dk.as_mut_ptr(),
                dh,
                true,
                dp.as_ptr(),
                1,
                l,
                q[r0 * dh..].as_ptr(),
                dh,
                1,
                scale,
            );
        }
        r0 += bq;
    }
}

macro_rules! dispatch {
    ($avx:ident, $base:ident, $inner:ident, ($($arg:ident : $ty:ty),*)) => {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx($($arg: $ty),*) {
            $inner($($arg),*)
        }

        #[allow(clippy::too_many_arguments)]
        fn $base($($arg: $ty),*) {
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
            {
                if super::has_avx2_fma() {
                    // SAFETY: the CPU supports the features the wrapper was compiled for.
                    return unsafe { $avx($($arg),*) };
                }
            }
            $inner($($arg),*)
        }
    };
}

dispatch!(head_fwd_avx2, head_fwd_dispatch, head_fwd, (
    q: &[f32], k: &[f32], v: &[f32], pad: Option<&[f32]>, d: Dims, scale: f32,
    o: &mut [f32], max: &mut [f32], log_sum: &mut [f32], s: &mut [f32]
));

type Ins<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32], &'a [f32]);
type Outs<'a> = (&'a mut [f32], &'a mut [f32], &'a mut [f32]);

dispatch!(head_bwd_avx2, head_bwd_dispatch, head_bwd, (
    ins: Ins<'_>, st: (&[f32], &[f32]), pad: Option<&[f32]>, d: Dims, scale: f32,
    outs: Outs<'_>, scratch: Outs<'_>
));

fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pad: Option<&[f32]>,
    d: Dims,
    scale: f32,
) -> (Vec<f32>, Stats) {
    let hsz = d.l * d.dh;
    let mut o = vec![0f32; d.b * d.h * hsz];
    let mut max = vec![0f32; d.b * d.h * d.l];
    let mut log_sum = vec![0f32; d.b * d.h * d.l];
    o.par_chunks_mut(hsz)
        .zip(max.par_chunks_mut(d.l))
        .zip(log_sum.par_chunks_mut(d.l))
        .enumerate()
        .for_each_init(
            || vec![0f32; QUERY_TILE * d.l],
            |s, (bh, ((o, mx), ls))| {
                let r = bh * hsz..(bh + 1) * hsz;
                let pad = pad.map(|p| &p[(bh / d.h) * d.l..(bh / d.h + 1) * d.l]);
                head_fwd_dispatch(
                    &q[r.clone()],
                    &k[r.clone()],
                    &v[r],
                    pad,
                    d,
                    scale,
                    o,
                    mx,
                    ls,
                    s,
                );
            },
        );
    (o, Stats { max, log_sum })
}

#[allow(clippy::too_many_arguments)]
fn backward(
    (q, k, v, o, dout): Ins<'_>,
    stats: &Stats,
    pad: Option<&[f32]>,
    d: Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let hsz = d.l * d.dh;
    let n = d.b * d.h * hsz;
    let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    dq.par_chunks_mut(hsz)
        .zip(dk.par_chunks_mut(hsz))
        .zip(dv.par_chunks_mut(hsz))
        .enumerate()
        .for_each_init(
            || {
                (
                    vec![0f32; QUERY_TILE * d.l],
                    vec![0f32; QUERY_TILE * d.l],
                    vec![0f32; d.l],
                )
            },
            |(p, dp, delta), (bh, ((dq, dk), dv))| {
                let r = bh * hsz..(bh + 1) * hsz;
                let rl = bh * d.l..(bh + 1) * d.l;
                let pad = pad.map(|p| &p[(bh / d.h) * d.l..(bh / d.h + 1) * d.l]);
                head_bwd_dispatch(
                    (
                        &q[r.clone()],
                        &k[r.clone()],
                        &v[r.clone()],
                        &o[r.clone()],
                        &dout[r],
                    ),
                    (&stats.max[rl.clone()], &stats.log_sum[rl]),
                    pad,
                    d,
                    scale,
                    (dq, dk, dv),
                    (p, dp, delta),
                );
            },
        );
    (dq, dk, dv)
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

fn dims_of(l1: &Layout, l2: &Layout, l3: &Layout) -> Result<Dims> {
    let (b, h, l, dh) = l1.shape().dims4()?;
    if l2.shape() != l1.shape() || l3.shape() != l1.shape() {
        candle_core::bail!(
            "fused attention: q {:?}, k {:?}, v {:?} must have the same shape",
            l1.shape(),
            l2.shape(),
            l3.shape()
        );
    }
    Ok(Dims { b, h, l, dh })
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
        let d = dims_of(l1, l2, l3)?;
        let (q, k, v) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        if let Some(p) = &self.padding {
            if p.len() != d.b * d.l {
                candle_core::bail!(
                    "fused attention: key padding has {} values, expected {}",
                    p.len(),
                    d.b * d.l
                );
            }
        }
        let (o, stats) = forward(
            q,
            k,
            v,
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
        let stats = self
            .stats
            .lock()
            .expect("stats lock")
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("fused attention: backward before forward".into())
            })?;
        let (b, h, l, dh) = q.dims4()?;
        let d = Dims { b, h, l, dh };
        let grad = grad_res.contiguous()?;
        let tensors = [q, k, v, res, &grad];
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut slices = Vec::with_capacity(5);
        for (g, l) in &guards {
            slices.push(super::storage::storage_slice(g, l)?);
        }
        let (dq, dk, dv) = backward(
            (slices[0], slices[1], slices[2], slices[3], slices[4]),
            &stats,
            self.padding.as_deref().map(|p| p.as_slice()),
            d,
            self.scale,
        );
        drop(guards);
        let shape = q.shape().clone();
        Ok((
            Some(output(dq, &shape, q.device())?),
            Some(output(dk, &shape, q.device())?),
            Some(output(dv, &shape, q.device())?),
        ))
    }
}
