//! `m3ae bench`: timed training steps (forward, backward, AdamW) on generated input, without
//! data loading: the ViT-S-like workload or a full M3AE step of any model.

use anyhow::{Context, Result};
use m3ae_model::{M3aeConfig, Variant};
use std::path::PathBuf;

/// Arguments of `m3ae bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// `vit-s`: the ViT-S-like encoder workload of the performance notes (dim 384, depth 4,
    /// sequence 64, batch 32); `preset`: a full M3AE step of `--preset` (or `--config`) at
    /// `--batch`.
    #[arg(long, default_value = "vit-s")]
    workload: String,
    /// Preset for `--workload preset`.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// The model of `--workload preset` from a file instead of a preset: a pretrain
    /// configuration (its `[model]` table over the default job's, and `train.batch_size`
    /// as the batch) or a model configuration (JSON or TOML), e.g.
    /// configs/bench-cpu-bert.toml.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// Set one model field for `--workload preset`, e.g. `--model text_vocab_size=1024`
    /// (repeatable; any field of the `[model]` table).
    #[arg(long = "model", value_name = "FIELD=VALUE")]
    model_fields: Vec<String>,
    /// Batch size for `--workload preset` (default: the config's `train.batch_size`, else
    /// 32).
    #[arg(long)]
    batch: Option<usize>,
    /// Timed steps (after 2 warm-up steps).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Kernels: `fused` or `reference`.
    #[arg(long, default_value = "fused")]
    kernels: String,
    #[command(flatten)]
    device: super::DeviceArg,
    /// Compute precision: `f32`, or `bf16` matmuls (on the CPU: AMX or AVX512-BF16 where the
    /// CPU has them, else emulated at about f32 speed).
    #[arg(long, default_value = "f32", value_parser = super::parse_precision)]
    precision: m3ae_model::Precision,
}

/// Runs the workload and prints its report.
pub fn run(a: BenchArgs) -> Result<()> {
    let BenchArgs {
        workload,
        preset,
        config,
        model_fields,
        batch,
        steps,
        kernels,
        device,
        precision,
    } = a;
    let kernels: m3ae_kernels::KernelPath =
        serde_json::from_value(serde_json::Value::String(kernels.clone()))
            .with_context(|| format!("--kernels {kernels:?}: expected fused or reference"))?;
    anyhow::ensure!(steps > 0, "--steps must be > 0");
    let dev = device.open()?;
    precision.check(&dev, "--precision")?;
    if let Some(n) = precision.notice(&dev, "--precision") {
        eprintln!("note: {n}");
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    let report = match workload.as_str() {
        "vit-s" => m3ae_train::bench::vit_s_workload(kernels, steps, &dev, precision)?,
        "preset" => {
            let (mut cfg, config_batch) = match &config {
                Some(p) => bench_model(p)?,
                None => (M3aeConfig::preset(&preset)?, None),
            };
            for f in &model_fields {
                set_model_field(&mut cfg, f)?;
            }
            let batch = batch.or(config_batch).unwrap_or(32);
            anyhow::ensure!(batch > 0, "--batch must be > 0");
            cfg.kernels = kernels;
            cfg.validate(true).context("the benchmark's model")?;
            // the host's memory bounds a CPU run only
            if dev.is_cpu() {
                m3ae_model::resources::check_training_step(
                    &cfg,
                    Variant::M3ae,
                    batch,
                    "--batch or the model's sizes",
                )?;
            }
            println!(
                "model: {}",
                serde_json::to_string(&cfg.resolved()).unwrap_or_default()
            );
            m3ae_train::bench::preset_workload(&cfg, batch, steps, &dev, precision)?
        }
        other => anyhow::bail!("unknown --workload {other:?}: expected vit-s or preset"),
    };
    println!("{report}");
    println!("threads: RAYON_NUM_THREADS={threads}");
    Ok(())
}

/// The model (and batch, if the file has one) of `bench --config`: a pretrain configuration
/// (it has a `[model]` table) or a bare model configuration.
fn bench_model(path: &std::path::Path) -> Result<(M3aeConfig, Option<usize>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let is_pretrain = path.extension().is_some_and(|e| e == "toml")
        && toml::from_str::<toml::Value>(&text)
            .ok()
            .is_some_and(|v| v.get("model").is_some_and(|m| m.is_table()));
    if is_pretrain {
        let c = crate::pretrain::PretrainConfig::from_toml(&text, &path.display().to_string())?;
        Ok((c.model, Some(c.train.batch_size)))
    } else {
        Ok((M3aeConfig::from_file(path)?, None))
    }
}

/// Applies one `--model FIELD=VALUE` (the value read as TOML, else as a string).
fn set_model_field(cfg: &mut M3aeConfig, spec: &str) -> Result<()> {
    let (key, value) = spec
        .split_once('=')
        .with_context(|| format!("--model {spec:?}: expected FIELD=VALUE"))?;
    let key = key.trim();
    let value: serde_json::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(t) => serde_json::to_value(&t["v"])?,
        Err(_) => serde_json::Value::String(value.trim().to_string()),
    };
    let mut json = serde_json::to_value(&*cfg)?;
    let obj = json
        .as_object_mut()
        .context("a model config is an object")?;
    if !obj.contains_key(key) {
        anyhow::bail!(
            "--model {spec:?}: no model field `{key}` (fields: {})",
            obj.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    obj.insert(key.to_string(), value);
    *cfg = serde_json::from_value(json).with_context(|| format!("--model {spec:?}"))?;
    Ok(())
}
