//! Fused tanh-GELU (CPU): forward and backward each one vectorised pass, `tanh` computed through
//! the fast `exp` of [`super::math`].

use super::math;
use super::storage::{f32_slice, output, storage_slice, zeroed_buffer};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

const C: f32 = 0.797_884_6; // sqrt(2 / pi)
const A: f32 = 0.044_715;
const CHUNK: usize = 1 << 14;

pub(crate) struct FusedGelu;

#[inline(always)]
fn fwd_chunk(x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        let t = math::tanh(C * (v + A * v * v * v));
        *o = 0.5 * v * (1.0 + t);
    }
}

#[inline(always)]
fn bwd_chunk(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
        let t = math::tanh(C * (v + A * v * v * v));
        let du = C * (1.0 + 3.0 * A * v * v);
        *o = g * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du);
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn fwd_avx2(x: &[f32], y: &mut [f32]) {
    fwd_chunk(x, y)
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn bwd_avx2(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    bwd_chunk(x, dy, dx)
}

/// Forward on a slice.
pub(crate) fn forward(x: &[f32]) -> Vec<f32> {
    let mut y = zeroed_buffer(x.len());
    super::for_each_chunk_mut(&mut y, CHUNK, |c, yc| {
        let xc = &x[c * CHUNK..][..yc.len()];
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        if super::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA.
            return unsafe { fwd_avx2(xc, yc) };
        }
        fwd_chunk(xc, yc)
    });
    y
}

/// Backward on slices: `dx = dy * gelu'(x)`.
pub(crate) fn backward(x: &[f32], dy: &[f32]) -> Vec<f32> {
    let mut dx = zeroed_buffer(x.len());
    super::for_each_chunk_mut(&mut dx, CHUNK, |c, o| {
        let (xc, gc) = (&x[c * CHUNK..][..o.len()], &dy[c * CHUNK..][..o.len()]);
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        if super::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA.
            return unsafe { bwd_avx2(xc, gc, o) };
        }
        bwd_chunk(xc, gc, o)
    });
    dx
}

impl CustomOp1 for FusedGelu {
    fn name(&self) -> &'static str {
        "m3ae-fused-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((
            CpuStorage::F32(forward(f32_slice(s, l)?)),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dy = grad_res.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ds, dl) = dy.storage_and_layout();
        let dx = backward(storage_slice(&xs, xl)?, storage_slice(&ds, dl)?);
        drop((xs, ds));
        Ok(Some(output(dx, x.shape(), x.device())?))
    }
}
