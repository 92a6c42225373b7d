//! Access to the f32 data of CPU tensors for the fused kernels.

use candle_core::{CpuStorage, Device, Layout, Result, Shape, Storage, Tensor};

/// The contiguous f32 data a layout describes inside a CPU storage.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused kernel: input is not contiguous ({:?})", l.shape()),
    }
}

/// As [`f32_slice`] for a locked tensor storage (CPU only).
pub(crate) fn storage_slice<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => f32_slice(c, l),
        _ => candle_core::bail!("fused kernel: only CPU tensors are supported"),
    }
}

/// Wraps a result vector as a tensor of `shape` on `device`.
pub(crate) fn output(v: Vec<f32>, shape: &Shape, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), device)
}
