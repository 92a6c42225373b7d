//! `m3ae pretrain`: flags over a TOML configuration, the signal handler, the gradient
//! synchronisation (MPI when launched by `mpirun`), then the run of [`crate::pretrain`].

use anyhow::{Context, Result};
use std::path::PathBuf;

/// Arguments of `m3ae pretrain`.
#[derive(clap::Args)]
pub struct PretrainArgs {
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
    /// Where to train: `cpu`, `cuda` (the first GPU) or `cuda:N` (the config's `device`;
    /// default cpu). CUDA needs a binary built with `--features cuda` (docs/gpu.md).
    #[arg(long, value_name = "cpu|cuda|cuda:N", value_parser = super::parse_device_spec)]
    device: Option<m3ae_model::DeviceSpec>,
    /// Compute precision (`train.precision`): `f32`, or `bf16` matmuls with f32 master
    /// weights (on the CPU: AMX or AVX512-BF16 where the CPU has them, else emulated at
    /// about f32 speed).
    #[arg(long, value_parser = super::parse_precision)]
    precision: Option<m3ae_model::Precision>,
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

/// Runs (or resumes) the pre-training job and prints its summary.
pub fn run(a: PretrainArgs) -> Result<()> {
    use crate::pretrain::{PretrainConfig, RunOptions};
    use m3ae_model::Variant;
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
        if let Some(saved) = crate::pretrain::saved_config(&at.run_dir())? {
            cfg = saved;
        }
    }
    let resume_from = a.resume.clone().flatten();
    if let Some(dir) = &resume_from {
        let from = crate::pretrain::adopt_checkpoint(&mut cfg, dir)?;
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
            "m3ae" => Variant::M3ae,
            "mae" => Variant::Mae,
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
    if let Some(v) = a.device {
        cfg.device = v;
    }
    if let Some(v) = a.precision {
        cfg.train.precision = v;
    }
    if a.no_probe {
        cfg.probe = false;
    }
    if a.print_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    // Before any thread pool exists: ranks as threads, and the compute threads of each
    // (candle and our kernels).
    cfg.distributed.local_ranks = cfg.resolved_local_ranks(launched_with_several_ranks());
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
    let sync = grad_sync(&mut cfg)?;
    let lead = sync.rank() == 0;
    // before the banner, so that a bad value is the only line printed
    cfg.validate()?;
    if lead {
        let on = if cfg.device.is_cpu() {
            String::new()
        } else {
            format!(" on {} ({})", cfg.device, cfg.train.precision)
        };
        let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_default();
        let threads = match cfg.distributed.local_ranks {
            1 => format!("{threads} compute threads"),
            n => format!(
                "{n} ranks as threads, {threads} compute thread{} each",
                if threads == "1" { "" } else { "s" }
            ),
        };
        eprintln!(
            "pretraining {:?} ({} steps, batch {}, {threads}){on} into {}",
            cfg.objective,
            cfg.train.steps,
            cfg.train.batch_size,
            cfg.run_dir().display()
        );
    }
    let summary = if cfg.distributed.local_ranks > 1 {
        if sync.world_size() > 1 {
            anyhow::bail!(
                "distributed.local_ranks = {} under an MPI launcher: use one or the other \
                 (set local_ranks = 1 and launch more processes)",
                cfg.distributed.local_ranks
            );
        }
        crate::pretrain::run_local_ranks(cfg, opts)?
    } else {
        crate::pretrain::run_with_sync(cfg, opts, sync)?
    };
    if lead {
        println!("{summary}");
    }
    Ok(())
}

/// Whether an MPI launcher started this process as one of several ranks (its environment says
/// so whether or not this binary was built with MPI).
fn launched_with_several_ranks() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .any(|k| std::env::var_os(k).is_some_and(|v| v != "1"))
}

/// How the ranks of a job meet: MPI when the binary has the `mpi` feature and was started by an
/// MPI launcher (over NCCL when the job trains on CUDA, feature `nccl`), otherwise one process.
///
/// On CUDA under a launcher, the rank with local rank `l` (`OMPI_COMM_WORLD_LOCAL_RANK`,
/// `SLURM_LOCALID`) trains on GPU `N + l` of `--device cuda:N` (`cuda` = `cuda:0`): one process
/// per GPU. `cfg.device` is set to that GPU.
fn grad_sync(
    cfg: &mut crate::pretrain::PretrainConfig,
) -> Result<Box<dyn m3ae_train::GradSync + Send>> {
    #[cfg(feature = "mpi")]
    if m3ae_train::sync::mpi::launched_by_mpi() {
        use m3ae_train::GradSync;
        let s = m3ae_train::sync::mpi::MpiSync::init()?.with_timeout(
            std::time::Duration::from_secs_f64(cfg.distributed.timeout_s),
        );
        if let m3ae_model::DeviceSpec::Cuda(first) = cfg.device {
            #[cfg(feature = "nccl")]
            {
                let local = m3ae_train::sync::nccl::local_rank().unwrap_or(0);
                cfg.device = m3ae_model::DeviceSpec::Cuda(first + local);
                // the job opens the same device again: one CUDA device (and stream) per ordinal
                // and process, so NCCL runs on the stream of the training step
                let dev = cfg.open_device()?;
                let n = m3ae_train::sync::nccl::NcclSync::init(s, &dev)?;
                if n.rank() == 0 {
                    eprintln!(
                        "data-parallel over NCCL: {} ranks, local rank l on cuda:{first}+l",
                        n.world_size()
                    );
                }
                return Ok(Box::new(n));
            }
            #[cfg(not(feature = "nccl"))]
            anyhow::bail!(
                "device cuda:{first} under an MPI launcher: data-parallel training on GPUs needs                  NCCL; rebuild with `--features nccl`"
            );
        }
        if s.rank() == 0 {
            eprintln!("data-parallel over MPI: {} ranks", s.world_size());
        }
        return Ok(Box::new(s));
    }
    #[cfg(not(feature = "mpi"))]
    if launched_with_several_ranks() {
        anyhow::bail!(
            "started by an MPI launcher, but this m3ae was built without MPI: rebuild with `--features mpi`"
        );
    }
    let _ = cfg;
    Ok(Box::new(m3ae_train::SingleProcess))
}
