//! Access to the f32 data of CPU tensors for the fused kernels, and the allocation of their
//! output buffers.
//!
//! Output buffers of at least [`HUGE_PAGE_MIN_BYTES`] are advised (Linux `MADV_HUGEPAGE`) to be
//! backed by transparent huge pages before they are first written: a fresh 4 KiB page costs a
//! page fault on first touch, so faulting in a large fresh buffer takes many times longer than
//! writing it once faulted, and huge pages cut the number of faults 512-fold (the decoder-shape
//! attention writes four such buffers per forward + backward; docs/performance.md has the
//! figures). Where the kernel or its settings give no huge pages (`enabled = never`), the advice
//! has no effect.

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

/// Buffers at least this large get the huge-page advice (two 2 MiB pages: below this, at most
/// one aligned huge page fits and the saving is small).
pub(crate) const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// Advises the kernel to back the 2 MiB-aligned interior of `buf`'s allocation with transparent
/// huge pages. Only a hint: failures (no THP support) are ignored, and pages already faulted in
/// stay as they are.
fn advise_huge_pages(buf: &mut Vec<f32>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = buf.capacity() * std::mem::size_of::<f32>();
        if bytes < HUGE_PAGE_MIN_BYTES {
            return;
        }
        let start = buf.as_mut_ptr() as usize;
        let (lo, hi) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
        if hi > lo {
            // SAFETY: `lo..hi` lies inside the allocation `buf` owns; MADV_HUGEPAGE only sets a
            // flag on the mapping and never changes the memory's contents.
            unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// An empty output buffer with capacity for `len` values (the kernel writes every element and
/// then sets the length).
pub(crate) fn uninit_buffer(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    advise_huge_pages(&mut v);
    v
}

/// A zero-filled output buffer of `len` values. Fresh memory from the system is not touched by
/// the allocator (it is already zero), so the advice still applies to it.
pub(crate) fn zeroed_buffer(len: usize) -> Vec<f32> {
    let mut v = vec![0f32; len];
    advise_huge_pages(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_have_the_requested_size_and_contents() {
        for len in [0, 1, 1000, (HUGE_PAGE_MIN_BYTES / 4) + 12_345] {
            let v = uninit_buffer(len);
            assert!(v.is_empty() && v.capacity() >= len);
            let z = zeroed_buffer(len);
            assert_eq!(z.len(), len);
            assert!(z.iter().all(|&x| x == 0.0));
        }
    }
}
