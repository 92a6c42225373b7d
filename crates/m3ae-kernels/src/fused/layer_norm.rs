//! Fused LayerNorm over the last axis (CPU): one pass per row forward, one pass per row backward
//! giving dx, and per-chunk partial sums for dgamma / dbeta reduced in a fixed order (so results
//! do not depend on the number of threads).

use super::storage::{f32_slice, output, storage_slice, zeroed_buffer};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// Rows per parallel task (fixed, for thread-count independent reductions).
const ROWS_PER_TASK: usize = 32;

pub(crate) struct FusedLayerNorm {
    pub(crate) eps: f32,
}

#[inline(always)]
pub(super) fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = super::math::sum(x) / n;
    let mut acc = [0f32; super::math::LANES];
    let chunks = x.chunks_exact(super::math::LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..super::math::LANES {
            let d = c[i] - mean;
            acc[i] += d * d;
        }
    }
    let mut ss: f32 = acc.iter().sum();
    for &v in rest {
        ss += (v - mean) * (v - mean);
    }
    (mean, 1.0 / (ss / n + eps).sqrt())
}

#[inline(always)]
fn fwd_rows(x: &[f32], g: &[f32], b: &[f32], y: &mut [f32], eps: f32) {
    let d = g.len();
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let (mean, rstd) = row_stats(xr, eps);
        for j in 0..d {
            yr[j] = (xr[j] - mean) * rstd * g[j] + b[j];
        }
    }
}

#[inline(always)]
fn bwd_rows(
    x: &[f32],
    g: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dg: &mut [f32],
    db: &mut [f32],
    eps: f32,
) {
    let d = g.len();
    for ((xr, dyr), dxr) in x
        .chunks_exact(d)
        .zip(dy.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let (mean, rstd) = row_stats(xr, eps);
        let (c1, c2) = grad_row_means(xr, dyr, g, mean, rstd);
        for j in 0..d {
            let xhat = (xr[j] - mean) * rstd;
            dxr[j] = rstd * (dyr[j] * g[j] - c1 - xhat * c2);
            dg[j] += dyr[j] * xhat;
            db[j] += dyr[j];
        }
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn fwd_rows_avx2(x: &[f32], g: &[f32], b: &[f32], y: &mut [f32], eps: f32) {
    fwd_rows(x, g, b, y, eps)
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn bwd_rows_avx2(
    x: &[f32],
    g: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dg: &mut [f32],
    db: &mut [f32],
    eps: f32,
) {
    bwd_rows(x, g, dy, dx, dg, db, eps)
}

fn fwd_dispatch(x: &[f32], g: &[f32], b: &[f32], y: &mut [f32], eps: f32) {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if super::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA.
        return unsafe { fwd_rows_avx2(x, g, b, y, eps) };
    }
    fwd_rows(x, g, b, y, eps)
}

fn bwd_dispatch(
    x: &[f32],
    g: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dg: &mut [f32],
    db: &mut [f32],
    eps: f32,
) {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if super::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA.
        return unsafe { bwd_rows_avx2(x, g, dy, dx, dg, db, eps) };
    }
    bwd_rows(x, g, dy, dx, dg, db, eps)
}

/// Forward on slices: `x` `[rows * d]`, `g`, `b` `[d]`.
pub(crate) fn forward(x: &[f32], g: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let d = g.len();
    let mut y = zeroed_buffer(x.len());
    let chunk = ROWS_PER_TASK * d;
    super::for_each_chunk_mut(&mut y, chunk, |c, yc| {
        fwd_dispatch(&x[c * chunk..][..yc.len()], g, b, yc, eps)
    });
    y
}

/// Backward on slices: returns `(dx, dgamma, dbeta)`.
pub(crate) fn backward(
    x: &[f32],
    g: &[f32],
    dy: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = g.len();
    let mut dx = zeroed_buffer(x.len());
    // per chunk of rows: its dgamma and dbeta partial sums, side by side
    let chunk = ROWS_PER_TASK * d;
    let mut partials = vec![0f32; x.len().div_ceil(chunk.max(1)) * 2 * d];
    let dxp = super::SharedMut(dx.as_mut_ptr());
    super::for_each_chunk_mut(&mut partials, 2 * d, |c, p| {
        let (lo, hi) = (c * chunk, ((c + 1) * chunk).min(x.len()));
        // SAFETY: chunk `c` of rows is written by this task only, inside `dx`.
        let dxc = unsafe { std::slice::from_raw_parts_mut(dxp.ptr().add(lo), hi - lo) };
        let (pg, pb) = p.split_at_mut(d);
        bwd_dispatch(&x[lo..hi], g, &dy[lo..hi], dxc, pg, pb, eps);
    });
    let (mut dg, mut db) = (vec![0f32; d], vec![0f32; d]);
    for p in partials.chunks_exact(2 * d.max(1)) {
        for j in 0..d {
            dg[j] += p[j];
            db[j] += p[d + j];
        }
    }
    (dx, dg, db)
}

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "m3ae-fused-layer-norm"
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
        let (x, g, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        Ok((
            CpuStorage::F32(forward(x, g, b, self.eps)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = grad_res.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (ds, dl) = dy.storage_and_layout();
        let (dx, dg, db) = backward(
            storage_slice(&xs, xl)?,
            storage_slice(&gs, gl)?,
            storage_slice(&ds, dl)?,
            self.eps,
        );
        drop((xs, gs, ds));
        Ok((
            Some(output(dx, x.shape(), x.device())?),
            Some(output(dg, g.shape(), g.device())?),
            Some(output(db, b.shape(), b.device())?),
        ))
    }
}

/// The two row means of the LayerNorm input gradient, `mean(dy g)` and `mean(dy g xhat)`, in
/// lanes (the sum order of the fused LayerNorm, which the one-op block shares).
#[inline(always)]
pub(super) fn grad_row_means(
    xr: &[f32],
    dyr: &[f32],
    g: &[f32],
    mean: f32,
    rstd: f32,
) -> (f32, f32) {
    const L: usize = super::math::LANES;
    let d = g.len();
    let (mut a1, mut a2) = ([0f32; L], [0f32; L]);
    let mut j = 0;
    while j + L <= d {
        for i in 0..L {
            let xhat = (xr[j + i] - mean) * rstd;
            let gy = dyr[j + i] * g[j + i];
            a1[i] += gy;
            a2[i] += gy * xhat;
        }
        j += L;
    }
    let (mut c1, mut c2): (f32, f32) = (a1.iter().sum(), a2.iter().sum());
    while j < d {
        let xhat = (xr[j] - mean) * rstd;
        let gy = dyr[j] * g[j];
        c1 += gy;
        c2 += gy * xhat;
        j += 1;
    }
    let inv_d = 1.0 / d as f32;
    (c1 * inv_d, c2 * inv_d)
}
