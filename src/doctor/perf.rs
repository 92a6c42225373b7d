//! The throughput rows of `m3ae doctor`: timed M3AE training steps (forward, backward, AdamW;
//! generated input, no data loading: [`m3ae_train::bench::preset_workload`], what
//! `m3ae bench --workload preset` runs) and the model FLOP utilisation (MFU): the model's
//! training FLOPs per step ([`m3ae_model::flops::training_flops`], as `m3ae info` counts them:
//! matrix products only, backward = 2x forward) per second, against the GPU's dense peak for
//! the precision ([`peak_for`]).
//!
//! A row passes when its steps ran; `base` at batch 256 in bf16 must also
//! reach [`BF16_BASE_TARGET`] of the bf16 peak (the GPU issue's target on an H100).

use super::{pass_if, row, Plan, Row, Status};
use anyhow::Result;
use candle_core::Device;
use m3ae_model::{flops::training_flops, M3aeConfig, Precision, Variant};

/// Model FLOP utilisation `base` at batch 256 in bf16 must reach.
pub const BF16_BASE_TARGET: f64 = 0.35;

/// Dense peak throughput of a GPU in FLOP/s (no sparsity).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// The name it was matched by.
    pub name: &'static str,
    /// FP32 on the CUDA cores.
    pub fp32: f64,
    /// TF32 on the tensor cores.
    pub tf32: f64,
    /// BF16 on the tensor cores.
    pub bf16: f64,
}

/// Vendor datasheet peaks (dense), matched in this order by a substring of the GPU's name.
const PEAKS: [Peak; 6] = [
    Peak {
        name: "H100 PCIe",
        fp32: 51.2e12,
        tf32: 378e12,
        bf16: 756e12,
    },
    Peak {
        name: "H100 NVL",
        fp32: 60e12,
        tf32: 417.5e12,
        bf16: 835e12,
    },
    // SXM5 (`NVIDIA H100 80GB HBM3`)
    Peak {
        name: "H100",
        fp32: 66.9e12,
        tf32: 494.7e12,
        bf16: 989.4e12,
    },
    Peak {
        name: "H200",
        fp32: 66.9e12,
        tf32: 494.7e12,
        bf16: 989.4e12,
    },
    Peak {
        name: "A100",
        fp32: 19.5e12,
        tf32: 156e12,
        bf16: 312e12,
    },
    Peak {
        name: "L40S",
        fp32: 91.6e12,
        tf32: 183e12,
        bf16: 362e12,
    },
];

/// The peak of the GPU called `gpu` (e.g. `NVIDIA H100 80GB HBM3`), if it is in the table.
///
/// ```
/// use m3ae::doctor::perf::peak_for;
/// assert_eq!(peak_for("NVIDIA H100 80GB HBM3").unwrap().bf16, 989.4e12);
/// assert_eq!(peak_for("NVIDIA H100 PCIe").unwrap().bf16, 756e12);
/// assert_eq!(peak_for("NVIDIA A100-SXM4-80GB").unwrap().tf32, 156e12);
/// assert!(peak_for("NVIDIA GeForce GTX 1080").is_none());
/// ```
pub fn peak_for(gpu: &str) -> Option<Peak> {
    PEAKS.iter().find(|p| gpu.contains(p.name)).copied()
}

/// Model fields set over each throughput preset (`None`: the preset's own).
#[derive(Debug, Clone, Default)]
pub struct ThroughputModel {
    /// Image side in pixels.
    pub image_size: Option<usize>,
    /// Patch side in pixels.
    pub patch_size: Option<usize>,
    /// Text length in tokens.
    pub text_length: Option<usize>,
    /// Text vocabulary.
    pub vocab: Option<usize>,
}

impl ThroughputModel {
    /// 224 px, patch 16, 64 tokens, the BERT vocabulary (30,522).
    pub fn paper() -> Self {
        Self {
            image_size: Some(224),
            patch_size: Some(16),
            text_length: Some(64),
            vocab: Some(30_522),
        }
    }

    /// The presets as they are.
    pub fn preset() -> Self {
        Self::default()
    }

    /// The preset `name` with these fields.
    pub fn config(&self, name: &str) -> Result<M3aeConfig> {
        let mut c = M3aeConfig::preset(name)?;
        if let Some(v) = self.image_size {
            c.image_size = v;
        }
        if let Some(v) = self.patch_size {
            c.patch_size = v;
        }
        if let Some(v) = self.text_length {
            c.text_length = v;
        }
        if let Some(v) = self.vocab {
            c.text_vocab_size = v;
        }
        c.validate(true)?;
        Ok(c)
    }
}

/// The throughput rows: every (preset, batch) of the plan in f32 and bf16.
pub fn rows(dev: &Device, plan: &Plan, gpu: Option<&str>) -> Vec<Row> {
    let peak = gpu.and_then(peak_for);
    let mut out = Vec::new();
    for (preset, batch) in &plan.throughput {
        for precision in [Precision::F32, Precision::Bf16] {
            let targeted = preset == "base" && *batch == 256 && precision == Precision::Bf16;
            let tol = if targeted && peak.is_some() {
                format!("MFU >= {:.0}% of the bf16 peak", BF16_BASE_TARGET * 100.0)
            } else {
                "runs".into()
            };
            let m = &plan.throughput_model;
            let sizes = match m.config(preset) {
                Ok(c) => format!(
                    "{} px / patch {}, text {}, vocab {}",
                    c.image_size, c.patch_size, c.text_length, c.text_vocab_size
                ),
                Err(_) => "(invalid)".into(),
            };
            let name = format!("{preset} {sizes}, batch {batch}, {precision}");
            out.push(row("throughput", name, tol, || {
                if precision == Precision::Bf16
                    && dev.is_cpu()
                    && !m3ae_kernels::fused::bf16::backend().is_native()
                {
                    // without AMX or AVX512-BF16 the CPU's bf16 is the numerics of bf16 at
                    // about f32's speed (`Precision::notice`): no bf16 speed to measure
                    return Ok((
                        Status::Skip,
                        "bf16 on this CPU is emulated in f32 arithmetic: for numerics, not speed"
                            .into(),
                    ));
                }
                let cfg = m.config(preset)?;
                if dev.is_cpu() {
                    if let Err(e) = m3ae_model::resources::check_training_step(
                        &cfg,
                        Variant::M3ae,
                        *batch,
                        "the batch",
                    ) {
                        return Ok((Status::Skip, format!("too large for this host: {e}")));
                    }
                }
                let r = m3ae_train::bench::preset_workload(
                    &cfg,
                    *batch,
                    plan.bench_steps,
                    dev,
                    precision,
                )?;
                let flops = training_flops(&cfg, Variant::M3ae).training * *batch as f64;
                let per_s = flops / (r.step_ms / 1e3);
                let mfu = match (peak, precision) {
                    (Some(p), Precision::Bf16) => {
                        format!("MFU {:.1}% of bf16 {:.0} TFLOP/s", 100.0 * per_s / p.bf16, p.bf16 / 1e12)
                    }
                    (Some(p), Precision::F32) => format!(
                        "MFU {:.1}% of FP32 {:.0} TFLOP/s ({:.1}% of TF32)",
                        100.0 * per_s / p.fp32,
                        p.fp32 / 1e12,
                        100.0 * per_s / p.tf32
                    ),
                    (None, _) => "MFU n/a (no peak for this device)".into(),
                };
                let ok = r.step_ms.is_finite()
                    && r.step_ms > 0.0
                    && match (targeted, peak) {
                        (true, Some(p)) => per_s / p.bf16 >= BF16_BASE_TARGET,
                        _ => true,
                    };
                Ok((
                    pass_if(ok),
                    format!(
                        "{:.1} samples/s, {:.1} ms/step (fwd {:.1}, bwd {:.1}, opt {:.1}), {:.1} TFLOP/s; {mfu}",
                        r.samples_per_s(),
                        r.step_ms,
                        r.forward_ms,
                        r.backward_ms,
                        r.optimizer_ms,
                        per_s / 1e12
                    ),
                ))
            }));
        }
    }
    out
}
