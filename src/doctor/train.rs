//! The training rows of `m3ae doctor`: the default pre-training job (the `tiny` architecture on
//! the built-in captioned scenes) for [`Plan::train_steps`] steps, on the CPU and on the device,
//! through the same code as `m3ae pretrain` (data streams, the device feed, the trainer,
//! checkpoints).
//!
//! The runs log the mean loss of every window of [`Plan::train_window`] steps. The device's f32
//! curve must follow the CPU's: the first window within [`F32_FIRST`] relative and every window
//! within [`F32_ANY`] (rounding differences grow over the steps, so later windows get more
//! room). The bf16 curve is compared with the CPU's f32 curve: every window within
//! [`BF16_ANY`], the last within [`BF16_LAST`].

use super::{pass_if, row, Plan, Row};
use crate::pretrain::{PretrainConfig, RunOptions};
use anyhow::{Context, Result};
use candle_core::Device;
use m3ae_model::{DeviceSpec, Precision};

/// Relative difference allowed in the first loss window, f32 on the device against the CPU.
pub const F32_FIRST: f64 = 1e-4;
/// Relative difference allowed in every loss window, f32 on the device against the CPU.
pub const F32_ANY: f64 = 1e-2;
/// Relative difference allowed in every loss window, bf16 on the device against f32 on the CPU.
pub const BF16_ANY: f64 = 5e-2;
/// Relative difference allowed in the last loss window, bf16 against f32 on the CPU.
pub const BF16_LAST: f64 = 3e-2;

/// The pre-training configuration of a training row.
pub fn job(plan: &Plan, spec: DeviceSpec, precision: Precision, name: &str) -> PretrainConfig {
    let mut cfg = PretrainConfig {
        name: name.into(),
        output_dir: plan.work_dir.clone(),
        device: spec,
        log_every: plan.train_window,
        save_every: plan.train_steps,
        image_every: 0,
        probe: false,
        ..PretrainConfig::default()
    };
    cfg.train.steps = plan.train_steps;
    cfg.train.batch_size = plan.train_batch;
    cfg.train.warmup_steps = cfg.train.warmup_steps.min(plan.train_steps / 2);
    cfg.train.precision = precision;
    // one rank on every device: the CPU and GPU curves must read the same data stream
    cfg.distributed.local_ranks = 1;
    cfg
}

/// Runs the job and returns its logged `(step, mean loss)` windows.
pub fn loss_curve(cfg: PretrainConfig) -> Result<Vec<(u64, f64)>> {
    let dir = cfg.run_dir();
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let opts = RunOptions {
        plain: true,
        ..Default::default()
    };
    crate::pretrain::run(cfg, opts)?;
    let path = dir.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut curve = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) else {
            continue;
        };
        curve.push((step, loss));
    }
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(!curve.is_empty(), "{} holds no loss", path.display());
    Ok(curve)
}

/// Per window `|a - b| / |b|` of two curves logged at the same steps.
pub fn relative_differences(a: &[(u64, f64)], b: &[(u64, f64)]) -> Result<Vec<f64>> {
    anyhow::ensure!(
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0),
        "the runs logged different steps ({} and {} windows)",
        a.len(),
        b.len()
    );
    Ok(a.iter()
        .zip(b)
        .map(|(x, y)| (x.1 - y.1).abs() / y.1.abs().max(1e-12))
        .collect())
}

fn fmt_curve(c: &[(u64, f64)]) -> String {
    match (c.first(), c.last()) {
        (Some(f), Some(l)) => format!("loss {:.4} -> {:.4}", f.1, l.1),
        _ => "no loss".into(),
    }
}

/// The training rows: the CPU run, the device's f32 run against it, the device's bf16 run
/// against it.
pub fn rows(dev: &Device, plan: &Plan) -> Vec<Row> {
    let steps = plan.train_steps;
    let mut cpu_curve: Option<Vec<(u64, f64)>> = None;
    let mut out = vec![row(
        "training",
        format!(
            "tiny job, {steps} steps, batch {}, CPU f32",
            plan.train_batch
        ),
        "finite losses",
        || {
            let c = loss_curve(job(plan, DeviceSpec::Cpu, Precision::F32, "doctor-cpu-f32"))?;
            let msg = fmt_curve(&c);
            let ok = c.iter().all(|(_, l)| l.is_finite());
            cpu_curve = Some(c);
            Ok((pass_if(ok), msg))
        },
    )];
    let spec = DeviceSpec::of(dev).map_err(|e| e.to_string());
    for precision in [Precision::F32, Precision::Bf16] {
        let (tol, name) = match precision {
            Precision::F32 => (
                format!("first window {F32_FIRST:.0e}, every window {F32_ANY:.0e} (relative)"),
                "f32",
            ),
            Precision::Bf16 => (
                format!("every window {BF16_ANY:.0e}, last window {BF16_LAST:.0e} (relative)"),
                "bf16",
            ),
        };
        out.push(row(
            "training",
            format!(
                "tiny job, {steps} steps, {} {name} vs CPU f32",
                super::device_label(dev)
            ),
            tol,
            || {
                let cpu = cpu_curve.as_ref().context("the CPU run failed")?;
                let spec = spec.clone().map_err(anyhow::Error::msg)?;
                let c = loss_curve(job(plan, spec, precision, &format!("doctor-dev-{name}")))?;
                let d = relative_differences(&c, cpu)?;
                let max = d.iter().cloned().fold(0f64, f64::max);
                let (first, last) = (d[0], d[d.len() - 1]);
                let ok = match precision {
                    Precision::F32 => first <= F32_FIRST && max <= F32_ANY,
                    Precision::Bf16 => max <= BF16_ANY && last <= BF16_LAST,
                };
                let ok = ok && d.iter().all(|x| x.is_finite());
                Ok((
                    pass_if(ok),
                    format!(
                        "{} (CPU {}); difference first {first:.1e}, max {max:.1e}, last {last:.1e}",
                        fmt_curve(&c),
                        fmt_curve(cpu)
                    ),
                ))
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_need_the_same_steps() {
        let a = [(10, 2.0), (20, 1.0)];
        let b = [(10, 2.0), (20, 0.5)];
        assert_eq!(relative_differences(&a, &b).unwrap(), vec![0.0, 1.0]);
        assert!(relative_differences(&a, &b[..1]).is_err());
        assert!(relative_differences(&a, &[(10, 2.0), (30, 1.0)]).is_err());
    }
}
