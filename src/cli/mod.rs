//! The subcommands of the `m3ae` tool: their arguments (clap) and the code that runs them on the
//! library and prints what it did. `src/bin/m3ae.rs` only parses, sets up logging and prints
//! errors.

pub mod bench;
pub mod convert;
pub mod doctor;
pub mod eval;
pub mod finetune;
pub mod info;
pub mod pretrain;

use anyhow::Result;
use clap::{Parser, Subcommand};
use m3ae_model::{DeviceSpec, Precision};

/// `--device`: where a command computes (every command that runs a model has it).
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArg {
    /// Where the model computes: `cpu`, `cuda` (the first GPU) or `cuda:N`. CUDA needs a binary
    /// built with `--features cuda` (see docs/gpu.md).
    #[arg(long, value_name = "cpu|cuda|cuda:N", default_value = "cpu", value_parser = parse_device_spec)]
    pub device: DeviceSpec,
}

impl DeviceArg {
    /// Opens the device (an error names the value; see [`m3ae_model::parse_device`]).
    pub fn open(&self) -> Result<candle_core::Device> {
        Ok(self.device.open()?)
    }
}

/// The value parser of `--device` (the one parser of the library, [`DeviceSpec`]).
pub fn parse_device_spec(s: &str) -> std::result::Result<DeviceSpec, String> {
    s.parse::<DeviceSpec>().map_err(|e| e.to_string())
}

/// The value parser of `--precision` ([`Precision`]: `f32` or `bf16`).
pub fn parse_precision(s: &str) -> std::result::Result<Precision, String> {
    s.parse::<Precision>().map_err(|e| e.to_string())
}

/// The command line of `m3ae`.
#[derive(Parser)]
#[command(
    name = "m3ae",
    version,
    about = "Multimodal masked autoencoders (M3AE) in Rust"
)]
pub struct Cli {
    /// Never use the network for Hugging Face repository ids (feature `hub`): only the local
    /// cache; the same as `HF_HUB_OFFLINE=1`.
    #[arg(long, global = true)]
    pub offline: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// A subcommand.
#[derive(Subcommand)]
pub enum Command {
    /// Print a model configuration, its parameter count and its training FLOPs per sample.
    Info(info::InfoArgs),
    /// Pre-train M3AE (or MAE) — by default the `tiny` preset on the built-in captioned scenes.
    Pretrain(pretrain::PretrainArgs),
    /// Time training steps (forward, backward, AdamW) on generated input, without data loading.
    Bench(bench::BenchArgs),
    /// Convert official checkpoints (`official <model.pkl> <out-dir>`) or export ours with the
    /// official Flax names (`export <model.safetensors> <out.safetensors>`).
    #[command(subcommand)]
    Convert(convert::ConvertCommand),
    /// Fine-tune a pre-trained (or randomly initialised) encoder as an image classifier: the
    /// official recipe (layer decay, mixup / CutMix, label smoothing, drop path).
    Finetune(Box<finetune::FinetuneArgs>),
    /// Class predictions of a fine-tuned classifier on a data set (accuracy when labelled).
    Predict(finetune::PredictArgs),
    /// Check a device (a GPU above all): the kernels against the CPU, the official fixture,
    /// a short training run against the CPU's and the throughput of `small` and `base`; prints
    /// one markdown table (docs/gpu.md).
    Doctor(doctor::DoctorArgs),
    /// Evaluation: `embed`, `probe`, `ood`, `reconstruct` (see [`eval`]).
    #[command(flatten)]
    Eval(eval::EvalCommand),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Pretrain(a) => pretrain::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Doctor(a) => doctor::run(a),
        Command::Finetune(a) => finetune::run(*a),
        Command::Predict(a) => finetune::run_predict(a),
        Command::Convert(cmd) => convert::run_cli(cmd),
        Command::Eval(cmd) => eval::run_cli(cmd),
    }
}

/// An error and its causes on one line, joined with ": ", leaving out a cause whose text the
/// line already ends with (an I/O error shown by its wrapper and chained as its source too),
/// with control characters escaped (a message may quote bytes from a corrupt file).
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    m3ae_eval::escape_control(&line)
}
