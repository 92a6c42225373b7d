//! `m3ae pretrain`: the pre-training job, from a TOML config to a run directory.
//!
//! A run directory `runs/<name>/` receives `config.toml` (the full resolved configuration),
//! `tokenizer.json`, `metrics.jsonl`, TensorBoard event files under `tb/`, reconstruction images
//! `recon/step-NNNNNNNN.png` (+ `.txt` with the captions, masked words and predicted words) and
//! checkpoints under `checkpoints/step-NNNNNNNN/`. The default configuration trains the `tiny`
//! preset on the built-in captioned scenes, then probes the learned image representation on the
//! scenes' shape labels next to a randomly initialised model.
//!
//! The modules: [`config`] (the TOML configuration and resume rules), [`data`] (tokenizer,
//! loader settings, held-out batch), [`eval`] (end-of-run evaluations), [`summary`] (the
//! report); the run itself (this file) builds the model and the data streams and trains them with
//! [`m3ae_train::Learner`].

pub mod config;
pub mod data;
pub mod eval;
pub mod summary;

pub use config::{
    adopt_checkpoint, check_resume_changes, resolve_resume_dir, saved_config, DataConfig,
    DistributedConfig, PretrainConfig, RESUMABLE_SETTINGS,
};
pub use eval::{probe_scenes, scene_probe_config};
pub use summary::RunSummary;

use crate::progress::JobProgress;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use data::*;
use eval::*;
use m3ae_data::{
    Batch, CaptionedScenes, Loader, LoaderConfig, SceneSplit, ScenesConfig, Source, Streams,
};
use m3ae_model::{AnyModel, M3ae, Mae, Pooling, Variant};
use m3ae_train::tensorboard::TensorBoardSink;
use m3ae_train::{Fitted, Hook, JsonlSink, Learner, Objective, Trainer};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Options of a run that are not part of the configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the newest checkpoint of the run directory.
    pub resume: bool,
    /// Start from this checkpoint instead (a `step-*` folder, or a run or converted folder's
    /// newest `checkpoints/step-*`), e.g. an official run converted by
    /// `m3ae convert official --resumable`; the configuration should have been through
    /// [`adopt_checkpoint`]. The run directory must hold no checkpoint yet (or this one).
    pub resume_from: Option<PathBuf>,
    /// Set to stop at the next step boundary (Ctrl-C); a checkpoint is written first.
    pub stop: Arc<AtomicBool>,
    /// Plain log lines instead of a progress bar.
    pub plain: bool,
}

/// Runs (or resumes) a pre-training job in this process: one rank, or
/// [`PretrainConfig::resolved_local_ranks`] data-parallel ranks as threads
/// ([`run_local_ranks`]).
pub fn run(mut cfg: PretrainConfig, opts: RunOptions) -> Result<RunSummary> {
    cfg.distributed.local_ranks = cfg.resolved_local_ranks(false);
    if cfg.distributed.local_ranks > 1 {
        return run_local_ranks(cfg, opts);
    }
    run_with_sync(cfg, opts, Box::new(m3ae_train::SingleProcess))
}

/// Runs a job as `distributed.local_ranks` data-parallel ranks on threads of this process
/// (`m3ae_train::sync::threads::ThreadSync`), each with its own pool of
/// [`PretrainConfig::threads_per_rank`] compute threads (`RAYON_NUM_THREADS` when set; candle
/// reads it too, so set it, or call [`PretrainConfig::apply_compute_threads`], before any pool
/// exists). Everything else is [`run_with_sync`]'s: rank 0 writes the run directory and
/// evaluates, and its summary is returned. If a rank fails, the others stop at their next
/// collective and the first rank's own error is returned.
pub fn run_local_ranks(mut cfg: PretrainConfig, opts: RunOptions) -> Result<RunSummary> {
    use m3ae_train::sync::threads::ThreadSync;
    let world = cfg.resolved_local_ranks(false);
    cfg.distributed.local_ranks = world;
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| cfg.threads_per_rank());
    let timeout = cfg.distributed.timeout_s;
    if !(timeout > 0.0 && timeout.is_finite()) {
        bail!("distributed.timeout_s = {timeout} must be > 0");
    }
    let ranks = ThreadSync::group(world);
    let results: Vec<Result<RunSummary>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .enumerate()
            .map(|(r, sync)| {
                let (cfg, opts) = (cfg.clone(), opts.clone());
                let sync = sync.with_timeout(std::time::Duration::from_secs_f64(timeout));
                std::thread::Builder::new()
                    .name(format!("m3ae-rank-{r}"))
                    .spawn_scoped(s, move || -> Result<RunSummary> {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .thread_name(move |i| format!("m3ae-rank-{r}-{i}"))
                            .build()
                            .with_context(|| format!("starting rank {r}'s {threads} threads"))?;
                        pool.install(|| run_with_sync(cfg, opts, Box::new(sync)))
                    })
                    .map_err(anyhow::Error::from)
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| match h {
                Err(e) => Err(e.context(format!("starting rank {r}"))),
                Ok(h) => h.join().unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(anyhow::anyhow!("rank {r} of {world} panicked: {msg}"))
                }),
            })
            .collect()
    });
    // the error of a rank that stopped by itself, not the echo in the ranks it left waiting
    let echo = |e: &anyhow::Error| {
        e.chain().any(|c| {
            matches!(
                c.downcast_ref::<m3ae_train::Error>(),
                Some(m3ae_train::Error::PeerStopped { .. })
            )
        })
    };
    let mut first_err = None;
    let mut summary = None;
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(s) if r == 0 => summary = Some(s),
            Ok(_) => {}
            Err(e) => {
                let replace = match &first_err {
                    None => true,
                    Some(f) => echo(f) && !echo(&e),
                };
                if replace {
                    first_err = Some(e);
                }
            }
        }
    }
    match (first_err, summary) {
        (Some(e), _) => Err(e),
        (None, Some(s)) => Ok(s),
        (None, None) => bail!("rank 0 of {world} returned no summary"),
    }
}

/// Runs (or resumes) one rank of a data-parallel pre-training job: `sync` averages the gradients
/// across the ranks (see `docs/distributed.md`). Every rank reads its own streams of the data;
/// rank 0 alone writes the run directory (configuration, metrics, images, checkpoints) and runs
/// the final evaluations. The summary of the other ranks has no evaluations.
pub fn run_with_sync(
    mut cfg: PretrainConfig,
    opts: RunOptions,
    sync: Box<dyn m3ae_train::GradSync + Send>,
) -> Result<RunSummary> {
    let (rank, world) = (sync.rank(), sync.world_size());
    let lead = rank == 0;
    let streams = match cfg.distributed.streams {
        0 => world,
        s => s,
    };
    cfg.distributed.streams = streams;
    if streams % world != 0 || !cfg.train.batch_size.is_multiple_of(streams) {
        bail!(
            "distributed.streams = {streams} must be a multiple of the number of ranks ({world}) \
             and divide train.batch_size = {} (the global batch)",
            cfg.train.batch_size
        );
    }
    if cfg.distributed.timeout_s.is_nan() || cfg.distributed.timeout_s <= 0.0 {
        bail!(
            "distributed.timeout_s = {} must be > 0",
            cfg.distributed.timeout_s
        );
    }
    cfg.validate()?;
    if lead {
        for w in cfg.train.warnings() {
            eprintln!("note: {w}");
        }
    }
    // the device (and whether it supports `train.precision`) before anything is written
    let dev = cfg.open_device()?;
    if lead {
        if let Some(n) = cfg.train.precision.notice(&dev, "train.precision") {
            eprintln!("note: {n}");
        }
    }
    let run_dir = cfg.run_dir();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let ck_dir = run_dir.join("checkpoints");
    let mut latest = m3ae_train::checkpoint::latest(&ck_dir)?;
    // A checkpoint from elsewhere (e.g. a converted official run) starts this run.
    if let Some(dir) = &opts.resume_from {
        let from = resolve_resume_dir(dir)?;
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let inside = canon(&from).starts_with(canon(&ck_dir));
        if latest.is_some() && !inside {
            bail!(
                "{} already holds checkpoints: --resume {} starts a new run, so choose another \
                 --name (or continue this run: --resume --config {}/config.toml)",
                run_dir.display(),
                dir.display(),
                run_dir.display()
            );
        }
        latest = Some(from);
    }
    if latest.is_some() && !opts.resume && opts.resume_from.is_none() {
        bail!(
            "{} already holds checkpoints: pass --resume to continue it, or choose another --name",
            run_dir.display()
        );
    }
    if opts.resume && latest.is_none() {
        bail!("--resume: no checkpoint under {}", ck_dir.display());
    }
    let train_spec = cfg.data.spec()?;
    let tok = if cfg.data.is_scenes() {
        let train_scenes = CaptionedScenes::new(ScenesConfig {
            split: SceneSplit::Train,
            ..cfg.data.scenes.clone()
        })?;
        Arc::new(tokenizer(&cfg, &run_dir, &train_scenes, lead)?)
    } else {
        let kind = &cfg.data.source;
        let path = cfg.data.tokenizer.as_ref().with_context(|| {
            format!(
                "data.tokenizer (a tokenizer.json, e.g. bert-base-uncased) is required for {kind}"
            )
        })?;
        let tok = load_tokenizer(path)?;
        cfg.probe = false;
        Arc::new(tok)
    };
    let train_source = train_spec
        .open(&cfg.data.options(cfg.data.scenes.label))?
        .source;
    // A checkpoint being continued fixes the vocabulary (an official one may be larger than
    // the tokenizer's); the tokenizer's ids must fit in it. (An unreadable trainer.json is
    // reported by the restore below.)
    let ckpt_vocab = latest
        .as_deref()
        .and_then(|d| m3ae_train::TrainerState::read(d).ok())
        .map(|s| s.model.text_vocab_size);
    match ckpt_vocab {
        Some(v) if cfg.objective == Variant::M3ae => {
            if tok.vocab_size() > v {
                bail!(
                    "the tokenizer has {} tokens but the checkpoint's model has a vocabulary of {v}: use the run's tokenizer (data.tokenizer)",
                    tok.vocab_size()
                );
            }
            cfg.model.text_vocab_size = v;
        }
        _ => cfg.model.text_vocab_size = tok.vocab_size(),
    }
    cfg.validate()?;
    // A resumed run keeps the configuration it was started with.
    if opts.resume {
        if let Some(saved) = saved_config(&run_dir)? {
            check_resume_changes(&saved, &cfg)?;
        }
    }
    cfg.check_memory()?;
    let model_cfg = cfg.model.resolved();
    if lead && !cfg.data.is_scenes() {
        save_tokenizer(&tok, &run_dir.join("tokenizer.json"))?;
    }
    // the resolved configuration, as run
    let cfg_path = run_dir.join("config.toml");
    let text = toml::to_string_pretty(&cfg).context("serialising the configuration")?;
    if lead {
        m3ae_model::fsio::atomic_write(&cfg_path, text.as_bytes())
            .with_context(|| format!("writing {}", cfg_path.display()))?;
    }

    let with_text = cfg.objective == Variant::M3ae;
    let mut lc = loader_config(&cfg, &model_cfg);
    // every stream holds `batch / streams` samples of the global batch; `Streams` takes the
    // loaders' masks and draws them for the global batch
    lc.batch_size = cfg.train.batch_size / streams;
    lc.world_size = streams;
    let unpaired = match (
        &cfg.data.unpaired_text,
        with_text && model_cfg.unpaired_text_loss_weight > 0.0,
    ) {
        (Some(p), true) => {
            lc.unpaired_text_len = model_cfg.text_length;
            Some(Arc::new(m3ae_data::TextCorpus::from_file(p.clone())?) as Arc<dyn Source>)
        }
        (None, true) => bail!("model.unpaired_text_loss_weight > 0 needs data.unpaired_text"),
        _ => None,
    };
    let source = Streams::new(streams, rank, world, with_text, |s| {
        let lc = LoaderConfig {
            rank: s,
            ..lc.clone()
        };
        let mut loader = Loader::new(train_source.clone(), Some(tok.clone()), lc)?;
        if let Some(u) = &unpaired {
            loader = loader.with_unpaired_text(u.clone())?;
        }
        Ok(loader)
    })?;
    let eval = eval_batch(&cfg, &model_cfg, &tok, 8)?;
    let norm = m3ae_data::Normalization::Cc12m;
    let (mut summary, final_model) = match cfg.objective {
        Variant::M3ae => {
            let m = M3ae::init(&model_cfg, cfg.seed, &dev)?;
            train_loop(
                &cfg,
                &opts,
                Trainer::new(m, cfg.train.clone())?
                    .with_seed(cfg.seed)
                    .with_sync(sync),
                source,
                &dev,
                latest,
                &run_dir,
                |t, path| {
                    let m = t.objective();
                    // without the `B x T x V` logits: the panels predict the masked words only
                    let out = m.forward_train(
                        &eval.input,
                        eval.image_masking.as_ref(),
                        eval.text_masking.as_ref(),
                    )?;
                    Ok(m3ae_eval::panels::write_batch_reconstruction(
                        m.config(),
                        &out,
                        &eval,
                        Some((m, &tok)),
                        norm,
                        path,
                    )?)
                },
            )?
        }
        Variant::Mae => {
            let m = Mae::init(&model_cfg, cfg.seed, &dev)?;
            let image_only = eval_image_only(&eval);
            train_loop(
                &cfg,
                &opts,
                Trainer::new(m, cfg.train.clone())?
                    .with_seed(cfg.seed)
                    .with_sync(sync),
                source,
                &dev,
                latest,
                &run_dir,
                |t, path| {
                    let m = t.objective();
                    let patches = image_only
                        .input
                        .image_patches
                        .as_ref()
                        .context("no image")?;
                    let masking = image_only.image_masking.as_ref().context("no masking")?;
                    let out = m.forward(patches, masking)?;
                    Ok(m3ae_eval::panels::write_batch_reconstruction(
                        m.config(),
                        &out,
                        &image_only,
                        None,
                        norm,
                        path,
                    )?)
                },
            )?
        }
    };
    if !lead {
        return Ok(summary);
    }
    if let AnyModel::M3ae(m) = &final_model {
        // A failure here (e.g. too many bad held-out samples) must not hide the finished
        // training: it is reported in the summary instead.
        let held_out = || -> Result<(f64, f64)> {
            let held_out = eval_batch(&cfg, &model_cfg, &tok, 256)?;
            let most_frequent = if cfg.data.is_scenes() {
                most_frequent_token(&tok, &scenes(&cfg, SceneSplit::Train, 2000)?)?
            } else {
                most_frequent_in_batch(&held_out)?
            };
            masked_word_accuracy(m, &held_out, most_frequent)
        };
        match held_out() {
            Ok((acc, base)) => {
                summary.masked_word_accuracy = Some(acc);
                summary.frequency_baseline = Some(base);
            }
            Err(e) => summary.held_out_error = Some(format!("{e:#}")),
        }
    }
    if cfg.probe && !summary.interrupted {
        // Both official poolings: pre-training never reads the cls output, so on the scenes
        // the mean of the patch tokens is where longer training shows (docs/results.md).
        let random = Mae::init(&model_cfg, cfg.seed.wrapping_add(1000), &dev)?;
        let probe = |pooling| -> Result<(f64, f64)> {
            Ok((
                probe_scenes(final_model.as_represent(), &cfg, pooling, 1)?,
                probe_scenes(&random, &cfg, pooling, 1)?,
            ))
        };
        summary.probe = Some(probe(Pooling::Cls)?);
        summary.probe_mean = Some(probe(Pooling::Mean)?);
    }
    let summary_path = run_dir.join("summary.json");
    m3ae_model::fsio::atomic_write(
        &summary_path,
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )
    .with_context(|| format!("writing {}", summary_path.display()))?;
    Ok(summary)
}

fn eval_image_only(b: &Batch) -> Batch {
    let mut b = b.clone();
    b.input.text_ids = None;
    b.input.text_padding = None;
    b.text_masking = None;
    b
}

/// Batches copied to a GPU ahead of its step (on the CPU the loader's batches are used as they
/// are).
const DEVICE_FEED_DEPTH: usize = 2;

#[allow(clippy::too_many_arguments)]
fn train_loop<O: Objective + Clone + Into<AnyModel>>(
    cfg: &PretrainConfig,
    opts: &RunOptions,
    trainer: Trainer<O>,
    source: Streams,
    dev: &Device,
    latest: Option<PathBuf>,
    run_dir: &Path,
    draw: impl FnMut(&Trainer<O>, &Path) -> Result<()>,
) -> Result<(RunSummary, AnyModel)> {
    let tokens = source.loader().config().text_len.unwrap_or(0) + cfg.model.num_patches();
    let (trainer, report, bad_samples) = if dev.is_cpu() {
        fit(cfg, opts, trainer, source, tokens, latest, run_dir, draw)?
    } else {
        let feed = m3ae_train::DeviceFeed::new(source, dev, DEVICE_FEED_DEPTH)?;
        fit(cfg, opts, trainer, feed, tokens, latest, run_dir, draw)?
    };
    let window = |w: &Option<std::collections::BTreeMap<String, f64>>, k: &str| {
        w.as_ref().map(|m| m.get(k).copied().unwrap_or(0.0))
    };
    let pair = |k: &str| match (
        window(&report.first_window, k),
        window(&report.last_window, k),
    ) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() => Some((a, b)),
        _ => None,
    };
    let summary = RunSummary {
        run_dir: run_dir.to_path_buf(),
        steps: report.steps,
        interrupted: report.interrupted,
        image_loss: pair("image_loss"),
        // MAE logs a text loss of 0 (it has no text head): nothing to report
        text_loss: if cfg.objective == Variant::Mae {
            None
        } else {
            pair("text_loss")
        },
        masked_word_accuracy: None,
        frequency_baseline: None,
        samples_per_s: report.samples_per_s,
        train_seconds: report.train_seconds,
        probe: None,
        probe_mean: None,
        skipped_steps: report.skipped_steps,
        checkpoint: report.checkpoint,
        held_out: if cfg.data.is_scenes() {
            "held-out scenes".into()
        } else {
            "held-out data".into()
        },
        held_out_error: None,
        // the counts after the last batch trained on (what `Streams::stats` reports)
        bad_samples: match bad_samples {
            Some(v) => serde_json::from_value(v).context("the data's bad-sample counts")?,
            None => Default::default(),
        },
    };
    Ok((summary, trainer.objective().clone().into()))
}

/// The [`Learner`] of the job over `source`: returns the trainer, the fit report and the
/// source's bad-sample counts.
#[allow(clippy::too_many_arguments)]
fn fit<O: Objective, S: m3ae_train::BatchSource>(
    cfg: &PretrainConfig,
    opts: &RunOptions,
    trainer: Trainer<O>,
    source: S,
    tokens: usize,
    latest: Option<PathBuf>,
    run_dir: &Path,
    mut draw: impl FnMut(&Trainer<O>, &Path) -> Result<()>,
) -> Result<(Trainer<O>, m3ae_train::FitReport, Option<serde_json::Value>)> {
    let lead = trainer.rank_and_world().0 == 0;
    let recon = run_dir.join("recon");
    let draw = |t: &Trainer<O>, step: u64| -> std::result::Result<(), m3ae_train::HookError> {
        Ok(draw(t, &recon.join(format!("step-{step:08}.png")))?)
    };
    let mut learner = Learner::new(trainer, source)
        .checkpoints(
            run_dir.join("checkpoints"),
            cfg.save_every,
            cfg.keep_checkpoints,
        )
        .log_every(cfg.log_every)
        .progress(Box::new(JobProgress::new(
            opts.plain,
            &[
                ("loss", "loss", 4),
                ("image", "image_loss", 4),
                ("text", "text_loss", 3),
                ("acc", "text_accuracy", 2),
            ],
        )))
        .interrupt(opts.stop.clone())
        .tokens_per_sample(tokens)
        .hook(Hook::new(
            "reconstruction image",
            cfg.image_every,
            true,
            draw,
        ));
    if let Some(dir) = latest {
        learner = learner.resume_from(dir);
    }
    // rank 0 writes the metrics; the others only train
    if lead {
        learner = learner
            .sink(Box::new(JsonlSink::open(&run_dir.join("metrics.jsonl"))?))
            .sink(Box::new(TensorBoardSink::create(&run_dir.join("tb"))?));
    }
    let Fitted {
        mut trainer,
        source,
        report,
    } = learner.fit()?;
    let mut stats = source.stats();
    // the summary counts the samples of every rank, not rank 0's share
    if trainer.rank_and_world().1 > 1 {
        let local = serde_json::to_vec(&stats).context("the data's bad-sample counts")?;
        if let Some(all) = trainer.sync_mut().gather(&local)? {
            let mut total = m3ae_data::BadStats::default();
            for bytes in all {
                let s: Option<m3ae_data::BadStats> =
                    serde_json::from_slice(&bytes).context("another rank's bad-sample counts")?;
                if let Some(s) = s {
                    total.merge(&s);
                }
            }
            stats = Some(serde_json::to_value(total)?);
        }
    }
    Ok((trainer, report, stats))
}
