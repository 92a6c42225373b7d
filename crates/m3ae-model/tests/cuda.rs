//! The model on a GPU (feature `cuda`): the tiny M3AE's losses and every weight's gradient on
//! CUDA match the CPU, on both kernel paths (CUDA kernels and reference ops). Without a GPU the
//! test is `#[ignore]`d (it needs a GPU) and fails when run without one. `m3ae doctor --device cuda` checks the same on the lent GPU machine.
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor};
use m3ae_kernels::KernelPath;
use m3ae_model::{M3ae, M3aeConfig, Masking};

mod common;
use common::{batch, noise};

/// Total loss and every (name, gradient) on `dev`, gradients moved to the CPU.
fn run(cfg: &M3aeConfig, dev: &Device) -> anyhow::Result<(f32, Vec<(String, Tensor)>)> {
    let model = M3ae::init(cfg, 3, dev)?;
    let input = batch(cfg, 3, dev)?;
    let (li, t) = (cfg.num_patches(), cfg.text_length);
    let im = Masking::new(&noise(li, 1), 3, cfg.image_keep(li), dev)?;
    let tm = Masking::new(&noise(t, 2), 3, cfg.text_keep(t), dev)?;
    let out = model.forward(&input, Some(&im), Some(&tm))?;
    let loss = model.losses(&input, &out)?.total;
    let grads = loss.backward()?;
    let mut named = Vec::new();
    for (name, var) in model.params().vars() {
        let g = grads.get(var.as_tensor()).expect("gradient");
        named.push((name.to_string(), g.to_device(&Device::Cpu)?));
    }
    Ok((loss.to_device(&Device::Cpu)?.to_scalar::<f32>()?, named))
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored on a GPU machine with cargo; m3ae doctor --device cuda checks the same without cargo)"]
fn tiny_model_matches_the_cpu_on_gpu() -> anyhow::Result<()> {
    let dev = m3ae_kernels::fused::cuda::first_gpu().expect("this test needs a CUDA GPU");
    for path in [KernelPath::Fused, KernelPath::Reference] {
        let mut cfg = M3aeConfig::preset("tiny")?;
        cfg.kernels = path;
        let (cpu_loss, cpu_grads) = run(&cfg, &Device::Cpu)?;
        let (gpu_loss, gpu_grads) = run(&cfg, &dev)?;
        let rel = (gpu_loss - cpu_loss).abs() / cpu_loss.abs();
        assert!(
            rel < 1e-5,
            "{path:?}: loss {gpu_loss} on GPU vs {cpu_loss} on CPU"
        );
        for ((name, c), (_, g)) in cpu_grads.iter().zip(&gpu_grads) {
            let d = (g - c)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let m = c.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-12);
            assert!(
                d / m < 1e-3,
                "{path:?} {name}: gradient differs by {}",
                d / m
            );
        }
        println!(
            "{path:?}: loss CPU {cpu_loss} GPU {gpu_loss} ({rel:.1e}), {} gradients agree",
            cpu_grads.len()
        );
    }
    Ok(())
}
