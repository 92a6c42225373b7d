//! `m3ae convert`: official checkpoints to native files (`official`) and native weights to the
//! official Flax names (`export`), through [`m3ae_official`].

use m3ae_official::{convert_official, convert_official_resumable, export_official};
use std::path::PathBuf;

/// The `m3ae convert` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ConvertCommand {
    /// Convert an official `model.pkl` (M3AE, MAE or linear probe) to native safetensors.
    Official {
        /// The official checkpoint.
        pkl: PathBuf,
        /// Output folder (`model.safetensors`, `config.json`, ...).
        out_dir: PathBuf,
        /// Also write `optimizer.safetensors` (AdamW moments and step) to resume training.
        #[arg(long)]
        optimizer: bool,
        /// Write a resumable checkpoint `<out-dir>/checkpoints/step-NNNNNNNN/` (weights, AdamW
        /// state, `trainer.json`) instead, for `m3ae pretrain --resume <out-dir>` (M3AE / MAE).
        #[arg(long, conflicts_with = "optimizer")]
        resumable: bool,
        /// With `--resumable`: the run's total optimiser steps (the schedule length), when the
        /// flags saved in the checkpoint do not give it.
        #[arg(long, requires = "resumable")]
        total_steps: Option<u64>,
    },
    /// Export our `model.safetensors` (or a converted folder) under the official Flax names.
    Export {
        /// Our model file or folder.
        input: PathBuf,
        /// The safetensors file to write.
        output: PathBuf,
    },
}

/// Runs a `m3ae convert` subcommand, printing what it wrote.
pub fn run_cli(cmd: ConvertCommand) -> anyhow::Result<()> {
    match cmd {
        ConvertCommand::Official {
            pkl,
            out_dir,
            optimizer,
            resumable,
            total_steps,
        } => {
            let c = if resumable {
                convert_official_resumable(&pkl, &out_dir, total_steps)?
            } else {
                convert_official(&pkl, &out_dir, optimizer)?
            };
            println!(
                "converted {} checkpoint: {} weights, {} parameters",
                c.kind.name(),
                c.weights.0,
                c.weights.1
            );
            for f in &c.files {
                println!("wrote {}", f.display());
            }
            if resumable {
                println!(
                    "continue it with: m3ae pretrain --resume {} (plus your data config)",
                    out_dir.display()
                );
            }
        }
        ConvertCommand::Export { input, output } => {
            let n = export_official(&input, &output)?;
            println!("wrote {} ({n} tensors, official names)", output.display());
        }
    }
    Ok(())
}
