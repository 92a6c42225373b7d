//! The `m3ae` command-line tool.
//!
//! Subcommands: `info` (a configuration, its parameter count and FLOPs), `pretrain`, `bench`,
//! `convert`, and the evaluation commands `embed`, `probe`, `ood`, `reconstruct`. The work is
//! done by the library (`m3ae::pretrain`, `m3ae::eval`, `m3ae::official`); this file parses
//! arguments, installs the logger and the signal handler, and prints errors as one line.
//!
//! Log output (per-sample data warnings, ...) goes to stderr at level `warn` unless `RUST_LOG`
//! says otherwise (e.g. `RUST_LOG=info`, `RUST_LOG=m3ae_data=debug`).

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
    /// Never use the network for Hugging Face repository ids (feature `hub`): only the local
    /// cache; the same as `HF_HUB_OFFLINE=1`.
    #[arg(long, global = true)]
    offline: bool,
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
    /// Pre-train M3AE (or MAE) — by default the `tiny` preset on the built-in captioned scenes.
    Pretrain(PretrainArgs),
    /// Time training steps (forward, backward, AdamW) on generated input, without data loading.
    Bench {
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
    },
    /// Convert official checkpoints (`official <model.pkl> <out-dir>`) or export ours with the
    /// official Flax names (`export <model.safetensors> <out.safetensors>`).
    #[command(subcommand)]
    Convert(m3ae::cli::convert::ConvertCommand),
    /// Evaluation: `embed`, `probe`, `ood`, `reconstruct` (see `m3ae::cli::eval`).
    #[command(flatten)]
    Eval(m3ae::cli::eval::EvalCommand),
}

/// Arguments of `m3ae pretrain`.
#[derive(clap::Args)]
struct PretrainArgs {
    /// A TOML configuration (see docs/training.md); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run name (the run directory is `<output-dir>/<name>`).
    #[arg(long)]
    name: Option<String>,
    /// Parent directory of runs.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// `m3ae` or `mae`.
    #[arg(long)]
    objective: Option<String>,
    /// Optimiser steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Batch size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate (before the batch/256 scaling).
    #[arg(long)]
    lr: Option<f64>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Text mask ratio.
    #[arg(long)]
    text_mask_ratio: Option<f64>,
    /// Continue the newest checkpoint of the run directory; with a DIR, start this run from that
    /// checkpoint instead (a `step-*` folder, or a run or converted folder such as the output of
    /// `m3ae convert official --resumable`): its model, optimiser state, step and settings.
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    resume: Option<Option<PathBuf>>,
    /// Skip the final linear probe.
    #[arg(long)]
    no_probe: bool,
    /// Plain log lines instead of a progress bar (automatic when stderr is not a terminal).
    #[arg(long)]
    plain: bool,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn pretrain(a: PretrainArgs) -> Result<()> {
    use m3ae::pretrain::{ObjectiveKind, PretrainConfig, RunOptions};
    use std::io::IsTerminal;
    let mut cfg = match &a.config {
        Some(p) => PretrainConfig::from_file(p)?,
        None => PretrainConfig::default(),
    };
    // `--resume` continues a run with the configuration it saved; flags (and a `--config`)
    // may only change what a resumed run can change (checked by the run).
    if matches!(a.resume, Some(None)) && a.config.is_none() {
        let mut at = cfg.clone();
        if let Some(v) = &a.name {
            at.name = v.clone();
        }
        if let Some(v) = &a.output_dir {
            at.output_dir = v.clone();
        }
        if let Some(saved) = m3ae::pretrain::saved_config(&at.run_dir())? {
            cfg = saved;
        }
    }
    let resume_from = a.resume.clone().flatten();
    if let Some(dir) = &resume_from {
        let from = m3ae::pretrain::adopt_checkpoint(&mut cfg, dir)?;
        eprintln!(
            "starting from {} (its model, optimiser state and settings)",
            from.display()
        );
    }
    if let Some(v) = a.name {
        cfg.name = v;
    }
    if let Some(v) = a.output_dir {
        cfg.output_dir = v;
    }
    if let Some(v) = a.objective {
        cfg.objective = match v.as_str() {
            "m3ae" => ObjectiveKind::M3ae,
            "mae" => ObjectiveKind::Mae,
            other => anyhow::bail!("--objective {other:?}: expected m3ae or mae"),
        };
    }
    if let Some(v) = a.steps {
        cfg.train.steps = v;
    }
    if let Some(v) = a.batch_size {
        cfg.train.batch_size = v;
    }
    if let Some(v) = a.lr {
        cfg.train.lr_peak = v;
    }
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.text_mask_ratio {
        cfg.model.text_mask_ratio = v;
    }
    if a.no_probe {
        cfg.probe = false;
    }
    if a.print_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    // Before any thread pool exists: the model's compute threads (candle and our kernels).
    cfg.apply_compute_threads();
    // Ctrl-C, and SIGTERM / SIGHUP as sent by cluster schedulers (Slurm, Kubernetes) before
    // they kill a job: stop at the next step boundary with a checkpoint and exit 0.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\nstopping (interrupt or termination signal): writing a checkpoint \
             (a second signal quits at once)"
        );
    })
    .context("installing the signal handler")?;
    let opts = RunOptions {
        resume: a.resume.is_some() && resume_from.is_none(),
        resume_from,
        stop,
        plain: a.plain || !std::io::stderr().is_terminal(),
    };
    let sync = grad_sync(&cfg)?;
    let lead = sync.rank() == 0;
    if lead {
        eprintln!(
            "pretraining {:?} ({} steps, batch {}, {} compute threads) into {}",
            cfg.objective,
            cfg.train.steps,
            cfg.train.batch_size,
            std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
            cfg.run_dir().display()
        );
    }
    let summary = m3ae::pretrain::run_with_sync(cfg, opts, sync)?;
    if lead {
        println!("{summary}");
    }
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
        let c = m3ae::pretrain::PretrainConfig::from_toml(&text, &path.display().to_string())?;
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

/// MPI when the binary has the `mpi` feature and was started by an MPI launcher; otherwise one
/// process.
fn grad_sync(
    cfg: &m3ae::pretrain::PretrainConfig,
) -> Result<Box<dyn m3ae::train::GradSync + Send>> {
    #[cfg(feature = "mpi")]
    if m3ae::train::sync::mpi::launched_by_mpi() {
        let s = m3ae::train::sync::mpi::MpiSync::init()?.with_timeout(
            std::time::Duration::from_secs_f64(cfg.distributed.timeout_s),
        );
        use m3ae::train::GradSync;
        if s.rank() == 0 {
            eprintln!("data-parallel over MPI: {} ranks", s.world_size());
        }
        return Ok(Box::new(s));
    }
    #[cfg(not(feature = "mpi"))]
    if ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .any(|k| std::env::var_os(k).is_some_and(|v| v != "1"))
    {
        anyhow::bail!(
            "started by an MPI launcher, but this m3ae was built without MPI: rebuild with `--features mpi`"
        );
    }
    let _ = cfg;
    Ok(Box::new(m3ae::train::SingleProcess))
}

fn main() {
    // Freed tensor buffers stay in the heap (fewer page faults per step); see the function's docs.
    m3ae_kernels::alloc::keep_freed_memory();
    let cli = Cli::parse();
    if cli.offline {
        // Before any other thread exists; every Hub lookup reads it (m3ae_data::hub).
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    // Errors print as one line (the causes joined with ": "), without a backtrace.
    if let Err(e) = run(cli) {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// An error and its causes on one line, joined with ": ", leaving out a cause whose text the
/// line already ends with (an I/O error shown by its wrapper and chained as its source too),
/// with control characters escaped (a message may quote bytes from a corrupt file).
fn one_line(e: &anyhow::Error) -> String {
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
    m3ae::eval::escape_control(&line)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
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
        Command::Pretrain(a) => pretrain(a)?,
        Command::Bench {
            workload,
            preset,
            config,
            model_fields,
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
                    m3ae::model::resources::check_training_step(
                        &cfg,
                        Variant::M3ae,
                        batch,
                        "--batch or the model's sizes",
                    )?;
                    println!(
                        "model: {}",
                        serde_json::to_string(&cfg.resolved()).unwrap_or_default()
                    );
                    m3ae::train::bench::preset_workload(&cfg, batch, steps)?
                }
                other => anyhow::bail!("unknown --workload {other:?}: expected vit-s or preset"),
            };
            println!("{report}");
            println!("threads: RAYON_NUM_THREADS={threads}");
        }
        Command::Convert(cmd) => m3ae::cli::convert::run_cli(cmd)?,
        Command::Eval(cmd) => m3ae::cli::eval::run_cli(cmd)?,
    }
    Ok(())
}
