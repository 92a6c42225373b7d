//! Fused activation dropout (CPU): `y = x * mask` in one parallel pass, the mask regenerated
//! from its key row by row (see [`mod@crate::dropout`]); the backward applies the same op to the
//! output gradient, so no mask tensor is ever stored.

use super::storage::{f32_slice, output, storage_slice, zeroed_buffer};
use crate::dropout::{Dropout, MaskRow};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

pub(crate) struct FusedDropout(pub(crate) Dropout);

#[inline(always)]
fn mul_row(m: &MaskRow, x: &[f32], y: &mut [f32]) {
    for (j, (o, &v)) in y.iter_mut().zip(x).enumerate() {
        *o = v * m.value(j as u32);
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn mul_row_avx2(m: &MaskRow, x: &[f32], y: &mut [f32]) {
    mul_row(m, x, y)
}

/// `x * mask` where `x` is `[rows, cols]` row-major.
fn apply(d: &Dropout, x: &[f32], cols: usize) -> Vec<f32> {
    let cols = cols.max(1);
    let mut y = zeroed_buffer(x.len());
    d.for_rows(&mut y, cols, |r, m, yr| {
        let xr = &x[r * cols..][..yr.len()];
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        if super::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA.
            return unsafe { mul_row_avx2(m, xr, yr) };
        }
        mul_row(m, xr, yr)
    });
    y
}

impl CustomOp1 for FusedDropout {
    fn name(&self) -> &'static str {
        "m3ae-fused-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = l.dims().last().copied().unwrap_or(1);
        Ok((
            CpuStorage::F32(apply(&self.0, f32_slice(s, l)?, cols)),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dy = grad_res.contiguous()?;
        let (ds, dl) = dy.storage_and_layout();
        let cols = x.dims().last().copied().unwrap_or(1);
        let dx = apply(&self.0, storage_slice(&ds, dl)?, cols);
        drop(ds);
        Ok(Some(output(dx, x.shape(), x.device())?))
    }
}
