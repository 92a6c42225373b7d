//! Comparison of this implementation against golden outputs of the official JAX code.
//!
//! A fixture folder holds `config.json`, `m3ae_params` / `m3ae_io` / `m3ae_grads`,
//! `mae_params` / `mae_io` / `mae_grads` and `linear_probe` safetensors files (the layout of
//! `tests/fixtures/official_tiny`, whose README describes every tensor). [`run`] loads the
//! official params through the name mapping, replays the fixture's noise, recomputes every tensor
//! and returns one [`Check`] per fixture tensor; a tensor of the files that no check consumed is
//! reported as a failure, so nothing is left unchecked silently.
//!
//! Each checked file has its own function: `m3ae_io` (the M3AE forward pass, losses,
//! text-only path and position tables), `linear_probe` (the probe backbone and head), `mae_io`
//! (the MAE forward pass and losses) and the gradient files `m3ae_grads` / `mae_grads`.
//!
//! [`run_on`] runs the same checks on another device (e.g. a GPU, feature `cuda`) with every
//! non-exact tolerance multiplied by a factor ([`Tolerance::scaled`]); the fixture's tensors are
//! read onto that device and the comparisons read the results back.
//!
//! A fine-tuning fixture folder (`official_finetune`: `vit_params`, `vit_io`, `vit_grads`
//! safetensors and `layer_decay.json`, plus `mixup.json` and `config.json`) is recognised by
//! its files ([`is_finetune_fixture`]) and checked by [`finetune::run`]: the classifier's
//! forward pass, losses, accuracy and gradients for each pooling, the layer-decay table and
//! weight-decay mask, and the Mixup / CutMix arithmetic.

mod compare;
pub mod finetune;
mod fixture;
mod m3ae;
mod mae;
mod probe;

pub use compare::{compare, Check, Tolerance};
pub use finetune::{is_finetune_fixture, FinetuneConfig};
pub use fixture::FixtureConfig;

use crate::Result;
use candle_core::Device;
use fixture::{check_grads, Env, FixtureFile};
use m3ae_kernels::KernelPath;
use m3ae_model::{param_specs, M3ae, Mae, Unexpected, Variant};
use std::path::Path;

/// Runs every comparison of a fixture folder on the default (fused) kernels.
pub fn run(dir: &Path) -> Result<Vec<Check>> {
    run_with(dir, KernelPath::default())
}

/// Runs every comparison of a fixture folder on the given kernel path: a fine-tuning fixture
/// ([`is_finetune_fixture`]) or a pre-training one.
pub fn run_with(dir: &Path, kernels: KernelPath) -> Result<Vec<Check>> {
    run_on(dir, kernels, &Device::Cpu, 1.0)
}

/// Runs every comparison of a pre-training fixture folder on `dev` with every non-exact
/// tolerance multiplied by `tolerance_scale` (1 on the CPU; the GPU check uses 10). A
/// fine-tuning fixture runs on the CPU only (with its own tolerances).
pub fn run_on(
    dir: &Path,
    kernels: KernelPath,
    dev: &Device,
    tolerance_scale: f64,
) -> Result<Vec<Check>> {
    if is_finetune_fixture(dir) {
        if !dev.is_cpu() || tolerance_scale != 1.0 {
            return Err(crate::Error::Fixture(
                "a fine-tuning fixture is checked on the CPU only, with its own tolerances".into(),
            ));
        }
        return finetune::run(dir, kernels);
    }
    let env = Env {
        dev: dev.clone(),
        scale: tolerance_scale,
    };
    let dev = dev.clone();
    let mut fc = FixtureConfig::read(dir)?;
    fc.m3ae.kernels = kernels;
    fc.mae.kernels = kernels;
    fc.probe.kernels = kernels;
    let mut out = Vec::new();

    // M3AE: forward pass and losses, then the gradients of the total loss.
    let m3ae_params = FixtureFile::open(dir, "m3ae_params", &env)?.tensors;
    let model = M3ae::from_official(
        &fc.m3ae,
        m3ae_params.clone(),
        Unexpected::Error,
        "m3ae_params.safetensors",
        &dev,
    )?;
    let io = m3ae::m3ae_io(&mut out, &env, dir, &fc, &model)?;
    check_grads(
        &mut out,
        &env,
        dir,
        "m3ae_grads",
        &param_specs(model.config(), Variant::M3ae),
        model.params(),
        &io.total_loss.backward()?,
    )?;

    // The linear probe on an image-only backbone of the same params.
    probe::linear_probe(&mut out, &env, dir, &fc, m3ae_params, &io.image_patches)?;

    // MAE: forward pass and losses, then the gradients of the total loss.
    let mae = Mae::from_official(
        &fc.mae,
        FixtureFile::open(dir, "mae_params", &env)?.tensors,
        Unexpected::Error,
        "mae_params.safetensors",
        &dev,
    )?;
    let total_loss = mae::mae_io(&mut out, &env, dir, &mae)?;
    check_grads(
        &mut out,
        &env,
        dir,
        "mae_grads",
        &param_specs(mae.config(), Variant::Mae),
        mae.params(),
        &total_loss.backward()?,
    )?;
    Ok(out)
}
