//! Peak heap memory of masked attention forward + backward, fused vs reference.
//!
//! `cargo run --release --example attention_memory` (decoder shape B=32, H=16, L=261, Dh=32).
//! A counting global allocator records the peak bytes allocated during one forward + backward,
//! beyond what was live before it (the inputs).

use candle_core::{Device, Tensor, Var};
use m3ae::kernels::KernelPath;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() -> anyhow::Result<()> {
    let (b, h, l, dh) = (32usize, 16usize, 261usize, 32usize);
    let n = b * h * l * dh;
    let mk = |salt: usize| -> anyhow::Result<Var> {
        let v: Vec<f32> = (0..n)
            .map(|i| (((i * 2654435761 + salt) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Ok(Var::from_tensor(&Tensor::from_vec(
            v,
            (b, h, l, dh),
            &Device::Cpu,
        )?)?)
    };
    let (q, k, v) = (mk(1)?, mk(2)?, mk(3)?);
    let pad = Tensor::zeros((b, l), candle_core::DType::F32, &Device::Cpu)?;
    let mut peaks = Vec::new();
    for (name, path) in [
        ("fused", KernelPath::Fused),
        ("reference", KernelPath::Reference),
    ] {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        {
            let y = path.masked_attention(&q, &k, &v, Some(&pad), 1.0 / (dh as f64).sqrt())?;
            let grads = y.sum_all()?.backward()?;
            assert!(grads.get(q.as_tensor()).is_some());
        }
        let peak = PEAK.load(Ordering::Relaxed) - base;
        println!(
            "{name:>9}: peak extra heap during fwd+bwd {:.1} MiB",
            peak as f64 / (1 << 20) as f64
        );
        peaks.push(peak);
    }
    println!(
        "fused / reference = {:.3}",
        peaks[0] as f64 / peaks[1] as f64
    );
    Ok(())
}
