//! `m3ae info`: a model configuration (preset or file), its exact parameter count and its
//! training FLOPs per sample.

use anyhow::{Context, Result};
use m3ae_model::{flops::training_flops, param_count, M3aeConfig, Variant};
use std::path::PathBuf;

/// Arguments of `m3ae info`.
#[derive(clap::Args)]
pub struct InfoArgs {
    /// Preset: small, base, large, huge, debug or tiny.
    #[arg(long, default_value = "base", conflicts_with = "config")]
    preset: String,
    /// A config file (JSON or TOML) instead of a preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Report the image-only MAE instead of M3AE.
    #[arg(long)]
    mae: bool,
}

/// Prints the configuration as JSON, then the model, parameters and FLOPs.
pub fn run(a: InfoArgs) -> Result<()> {
    let InfoArgs {
        preset,
        config,
        mae,
    } = a;
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
    Ok(())
}
