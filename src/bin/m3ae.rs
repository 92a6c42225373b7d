//! The `m3ae` command-line tool.
//!
//! `m3ae info --preset base` prints a configuration, its exact parameter count and the training
//! FLOPs per sample. Further subcommands (pretrain, probe, convert, ...) arrive with their crates.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use m3ae::model::{flops::training_flops, param_count, M3aeConfig, Variant};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "m3ae",
    version,
    about = "Multimodal masked autoencoders (M3AE) in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model configuration, its parameter count and its training FLOPs per sample.
    Info {
        /// Preset: small, base, large, huge, debug or tiny.
        #[arg(long, default_value = "base", conflicts_with = "config")]
        preset: String,
        /// A config file (JSON or TOML) instead of a preset.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Report the image-only MAE instead of M3AE.
        #[arg(long)]
        mae: bool,
    },
    /// Time training steps (forward, backward, AdamW) on generated input, without data loading.
    Bench {
        /// `vit-s`: the ViT-S-like encoder workload of the performance notes (dim 384, depth 4,
        /// sequence 64, batch 32); `preset`: a full M3AE step of `--preset` at `--batch`.
        #[arg(long, default_value = "vit-s")]
        workload: String,
        /// Preset for `--workload preset`.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Batch size for `--workload preset`.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Timed steps (after 2 warm-up steps).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Kernels: `fused` or `reference`.
        #[arg(long, default_value = "fused")]
        kernels: String,
    },
    /// Convert official checkpoints (`official <model.pkl> <out-dir>`) or export ours with the
    /// official Flax names (`export <model.safetensors> <out.safetensors>`).
    #[command(subcommand)]
    Convert(m3ae::convert::ConvertCommand),
    /// Evaluation: `embed`, `probe`, `ood`, `reconstruct` (see `m3ae::evaluate`).
    #[command(flatten)]
    Eval(m3ae::evaluate::EvalCommand),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Info {
            preset,
            config,
            mae,
        } => {
            let cfg = match config {
                Some(path) => M3aeConfig::from_file(&path)?.resolved(),
                None => M3aeConfig::preset(&preset)?,
            };
            let variant = if mae { Variant::Mae } else { Variant::M3ae };
            cfg.validate(variant == Variant::M3ae)
                .context("the configuration is invalid")?;
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            let name = if mae { "MAE" } else { "M3AE" };
            println!("model: {name}");
            println!("parameters: {}", param_count(&cfg, variant));
            let f = training_flops(&cfg, variant);
            println!(
                "tokens per sample: encoder {}, decoder {}",
                f.encoder_tokens, f.decoder_tokens
            );
            println!(
                "forward FLOPs per sample: {:.0} ({:.2} GFLOP)",
                f.forward,
                f.forward / 1e9
            );
            println!(
                "training FLOPs per sample: {:.0} ({:.2} GFLOP, 3x forward)",
                f.training,
                f.training / 1e9
            );
        }
        Command::Bench {
            workload,
            preset,
            batch,
            steps,
            kernels,
        } => {
            let kernels: m3ae::kernels::KernelPath = serde_json::from_value(
                serde_json::Value::String(kernels.clone()),
            )
            .with_context(|| format!("--kernels {kernels:?}: expected fused or reference"))?;
            anyhow::ensure!(steps > 0, "--steps must be > 0");
            let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
            let report = match workload.as_str() {
                "vit-s" => m3ae::train::bench::vit_s_workload(kernels, steps)?,
                "preset" => {
                    anyhow::ensure!(batch > 0, "--batch must be > 0");
                    let mut cfg = M3aeConfig::preset(&preset)?;
                    cfg.kernels = kernels;
                    m3ae::train::bench::preset_workload(&cfg, batch, steps)?
                }
                other => anyhow::bail!("unknown --workload {other:?}: expected vit-s or preset"),
            };
            println!("{report}");
            println!("threads: RAYON_NUM_THREADS={threads}");
        }
        Command::Convert(cmd) => m3ae::convert::run_cli(cmd)?,
        Command::Eval(cmd) => m3ae::evaluate::run_cli(cmd)?,
    }
    Ok(())
}
