//! Fine-tuning a pre-trained encoder as an image classifier: the official `finetune_main`
//! recipe (the `ViTClassifier` of [`m3ae_model::classifier`], layer-wise learning-rate decay,
//! mixup / CutMix with label smoothing, drop path, AdamW b2 0.999, warmup + cosine) on the
//! training loop of [`m3ae_train::Learner`], with the validation top-1 every epoch and the best
//! classifier kept.
//!
//! The sketch compiles but does not run (it needs a checkpoint and the data); the tests in
//! `crates/m3ae-eval/tests/finetune.rs` run it and check the results.
//!
//! ```no_run
//! use m3ae_eval::finetune::{Finetune, FinetuneConfig};
//! use m3ae_eval::{DataOptions, ModelSource};
//! let base = ModelSource::Checkpoint("runs/m3ae".into()).load(&candle_core::Device::Cpu)?;
//! let cfg = FinetuneConfig { epochs: 10, ..Default::default() };
//! let train = "fashion_mnist:data/fashion_mnist/train.safetensors".parse()?;
//! let val = "fashion_mnist:data/fashion_mnist/test.safetensors".parse()?;
//! let report = Finetune::new(&base, cfg, train, val, "runs/finetune")?
//!     .data_options(DataOptions::default())
//!     .run()?;
//! println!("best top-1 {:.1}% at epoch {}", 100.0 * report.best_top1, report.best_epoch);
//! # Ok::<(), m3ae_eval::Error>(())
//! ```
//!
//! A run folder holds `checkpoints/step-*` (weights, optimiser, data position: `resume` picks
//! the newest up exactly), `metrics.jsonl` (training windows), `eval.jsonl` (one line per
//! evaluation), `tb/` and `tb/val/` (TensorBoard: training windows, evaluations), `best/classifier.safetensors` (the best classifier so far, with its epoch and
//! top-1 in the metadata), `classifier.safetensors` (the final one) and `report.json`.

mod config;
pub mod data;
pub mod evaluate;
pub mod objective;

pub use config::FinetuneConfig;
pub use data::LabelledBatches;
pub use evaluate::{
    load_classifier, predict, predict_source, ClassReport, Predictions, SavedClassifier,
};
pub use objective::ClassifierObjective;

use crate::{Error, Result};
use m3ae_data::{DataOptions, DataSpec, OpenedData};
use m3ae_model::{AnyModel, Classifier, ClassifierConfig};
use m3ae_train::tensorboard::TensorBoardSink;
use m3ae_train::{Hook, JsonlSink, Learner, LogLines, Progress, Trainer};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// One evaluation on the validation set (a line of `eval.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochEval {
    /// Epochs completed.
    pub epoch: u64,
    /// Optimiser step.
    pub step: u64,
    /// Top-1 accuracy.
    pub top1: f64,
    /// Top-5 accuracy (top-k with k = min(5, classes)).
    pub top5: f64,
    /// Mean cross-entropy.
    pub loss: f64,
}

/// What a fine-tuning run reports.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneReport {
    /// Training images and steps per epoch.
    pub train_samples: usize,
    /// Optimiser steps per epoch.
    pub steps_per_epoch: u64,
    /// Steps reached.
    pub steps: u64,
    /// Every evaluation of the run (including those before a resume).
    pub evaluations: Vec<EpochEval>,
    /// Best validation top-1 and its epoch.
    pub best_top1: f64,
    /// Epoch of [`FinetuneReport::best_top1`].
    pub best_epoch: u64,
    /// The best classifier on the validation set: top-1, top-5, per class.
    pub best: ClassReport,
    /// Wall time of the training loop in seconds.
    pub train_seconds: f64,
    /// Whether the interrupt flag stopped the run.
    pub interrupted: bool,
    /// The best classifier's file.
    pub best_classifier: PathBuf,
}

/// A fine-tuning job: see the [module docs](self).
pub struct Finetune<'h> {
    base: AnyModel,
    cfg: FinetuneConfig,
    train: DataSpec,
    val: DataSpec,
    opts: DataOptions,
    train_limit: Option<usize>,
    out: PathBuf,
    progress: Box<dyn Progress + 'h>,
    on_eval: Box<dyn FnMut(&EpochEval) + 'h>,
    interrupt: Arc<AtomicBool>,
    resume: bool,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Path {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

impl<'h> Finetune<'h> {
    /// A job fine-tuning the image encoder of `base` (M3AE or MAE) on `train`, evaluated on `val`,
    /// writing into the run folder `out`. The number of classes is read from the data when the
    /// job runs; until then the classifier is not built.
    pub fn new(
        base: &AnyModel,
        cfg: FinetuneConfig,
        train: DataSpec,
        val: DataSpec,
        out: impl Into<PathBuf>,
    ) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            base: base.clone(),
            cfg,
            train,
            val,
            opts: DataOptions::default(),
            train_limit: None,
            out: out.into(),
            progress: Box::new(LogLines),
            on_eval: Box::new(|_| {}),
            interrupt: Arc::new(AtomicBool::new(false)),
            resume: true,
        })
    }

    /// How the data sets are opened and read (labels of scenes or WebDataset json fields,
    /// subsets, evaluation batch size, bad-sample tolerance). The normalisation comes from the
    /// [`FinetuneConfig`].
    pub fn data_options(mut self, opts: DataOptions) -> Self {
        self.opts = opts;
        self
    }

    /// Uses at most `n` training images (an evenly strided subset; the validation set keeps the
    /// [`Finetune::data_options`] limit).
    pub fn train_limit(mut self, n: Option<usize>) -> Self {
        self.train_limit = n;
        self
    }

    /// Replaces the progress reporting (default: a line per logging window on stderr).
    pub fn progress(mut self, progress: Box<dyn Progress + 'h>) -> Self {
        self.progress = progress;
        self
    }

    /// Called after every evaluation on the validation set.
    pub fn on_eval(mut self, f: impl FnMut(&EpochEval) + 'h) -> Self {
        self.on_eval = Box::new(f);
        self
    }

    /// Stops at the next step once `flag` is set (a checkpoint is written first).
    pub fn interrupt(mut self, flag: Arc<AtomicBool>) -> Self {
        self.interrupt = flag;
        self
    }

    /// Whether to continue from the newest checkpoint of the run folder (default true).
    pub fn resume(mut self, resume: bool) -> Self {
        self.resume = resume;
        self
    }

    /// Trains (or resumes) to the configured epochs, evaluating and keeping the best classifier;
    /// writes `report.json` and returns the report.
    pub fn run(self) -> Result<FinetuneReport> {
        let Finetune {
            base,
            cfg,
            train,
            val,
            opts,
            train_limit,
            out,
            mut progress,
            mut on_eval,
            interrupt,
            resume,
        } = self;
        let data_opts = DataOptions {
            normalization: cfg.normalization,
            ..opts.clone()
        };
        let train_opts = DataOptions {
            limit: train_limit.or(data_opts.limit),
            ..data_opts.clone()
        };
        let train_data = open_labelled(&train, "--train-data", &train_opts)?;
        let val_data = open_labelled(&val, "--val-data", &data_opts)?;
        let classes = train_data.classes.max(val_data.classes);
        let train_samples = match train_data.source.len_hint() {
            Some(n) => n,
            None => {
                let (n, _) = m3ae_data::sample::count_records(
                    train_data.source.as_ref(),
                    &m3ae_data::Partition::whole(cfg.seed, 0),
                )?;
                n
            }
        };
        let steps_per_epoch = (train_samples / cfg.batch_size) as u64;
        if steps_per_epoch == 0 {
            return Err(Error::arg(
                "--batch-size",
                cfg.batch_size,
                format!("is larger than the {train_samples} training images of {train}"),
            ));
        }
        let mut model = base.config().clone();
        model.drop_path = cfg.drop_path;
        model.drop = cfg.drop;
        model.att_drop = cfg.att_drop;
        let cc = ClassifierConfig {
            num_classes: classes,
            pooling: cfg.pooling,
        };
        let classifier = Classifier::from_base(&base, cc, cfg.seed)?;
        // the same weights with the fine-tuning's dropout and drop-path rates
        let classifier = Classifier::new(&model, cc, classifier.params().clone())?;
        std::fs::create_dir_all(&out).map_err(io(&out))?;
        let model_cfg = classifier.model_config().clone();
        let source = LabelledBatches::new(
            train_data.source.clone(),
            classes,
            &cfg,
            &model_cfg,
            opts.max_bad_fraction,
        )?;
        let extra = HashMap::from([(
            FINETUNE_METADATA_KEY.to_string(),
            serde_json::to_string(&cfg)?,
        )]);
        let objective = ClassifierObjective::new(
            classifier,
            cfg.layer_decay,
            cfg.layer_decay_assignment,
            extra,
        )?;
        let metadata = objective.metadata().clone();
        let trainer =
            Trainer::new(objective, cfg.train_config(steps_per_epoch)?)?.with_seed(cfg.seed);
        let eval_opts = data_opts;

        // evaluations so far (a resumed run keeps those up to its checkpoint)
        let checkpoints = out.join("checkpoints");
        let resume_dir = if resume {
            m3ae_train::checkpoint::latest(&checkpoints)?
        } else {
            None
        };
        let resumed_step = match &resume_dir {
            Some(d) => m3ae_train::TrainerState::read(d)?.step,
            None => 0,
        };
        let eval_path = out.join("eval.jsonl");
        let history = read_evaluations(&eval_path)?
            .into_iter()
            .filter(|e| e.step <= resumed_step)
            .collect::<Vec<_>>();
        write_evaluations(&eval_path, &history)?;
        let history = RefCell::new(history);
        let best_path = out.join("best").join("classifier.safetensors");
        let val_source = val_data.source.clone();
        let mut val_board = TensorBoardSink::create(&out.join("tb").join("val"))?;
        let eval_every = steps_per_epoch * cfg.eval_every_epochs;
        let hook = Hook::new(
            "validation",
            eval_every,
            false,
            |t: &Trainer<ClassifierObjective>,
             step: u64|
             -> std::result::Result<(), m3ae_train::HookError> {
                let c = t.objective().classifier();
                let r = predict_source(c, val_source.clone(), &eval_opts)?.report()?;
                let e = EpochEval {
                    epoch: step / steps_per_epoch,
                    step,
                    top1: r.top1,
                    top5: r.top5,
                    loss: r.loss,
                };
                let mut h = history.borrow_mut();
                let best = h.iter().map(|e| e.top1).fold(f64::NEG_INFINITY, f64::max);
                if e.top1 > best || !best_path.exists() {
                    let mut meta = metadata.clone();
                    meta.insert("epoch".into(), e.epoch.to_string());
                    meta.insert("top1".into(), e.top1.to_string());
                    save_classifier(c, &best_path, meta)?;
                }
                h.push(e.clone());
                append_evaluation(&eval_path, &e)?;
                for (tag, v) in [("top1", e.top1), ("top5", e.top5), ("loss", e.loss)] {
                    val_board.scalar(tag, step, v as f32)?;
                }
                on_eval(&e);
                Ok(())
            },
        );
        let mut learner = Learner::new(trainer, source)
            .checkpoints(
                &checkpoints,
                steps_per_epoch * cfg.checkpoint_every_epochs,
                cfg.keep_checkpoints,
            )
            .log_every(cfg.log_every)
            .sink(Box::new(JsonlSink::open(&out.join("metrics.jsonl"))?))
            .sink(Box::new(TensorBoardSink::create(&out.join("tb"))?))
            .progress(std::mem::replace(&mut progress, Box::new(LogLines)))
            .interrupt(interrupt)
            .hook(hook);
        if let Some(d) = &resume_dir {
            learner = learner.resume_from(d);
        }
        let start = Instant::now();
        let fitted = learner.fit()?;
        let train_seconds = start.elapsed().as_secs_f64();
        let final_classifier = fitted.trainer.objective().classifier().clone();
        save_classifier(
            &final_classifier,
            &out.join("classifier.safetensors"),
            fitted.trainer.objective().metadata().clone(),
        )?;
        let evaluations = history.into_inner();
        // the best classifier (the final one when no evaluation ran)
        let (best_classifier, best_file) = if best_path.exists() {
            (
                Classifier::load(&best_path, final_classifier.params().device())?,
                best_path,
            )
        } else {
            (final_classifier, out.join("classifier.safetensors"))
        };
        let best = predict_source(&best_classifier, val_data.source, &eval_opts)?.report()?;
        // the first evaluation with the best top-1 (the one whose classifier was kept); the
        // final classifier when nothing was evaluated
        let (best_top1, best_epoch) = evaluations
            .iter()
            .fold(None::<&EpochEval>, |acc, e| match acc {
                Some(b) if b.top1 >= e.top1 => Some(b),
                _ => Some(e),
            })
            .map_or((best.top1, fitted.report.steps / steps_per_epoch), |e| {
                (e.top1, e.epoch)
            });
        let report = FinetuneReport {
            train_samples,
            steps_per_epoch,
            steps: fitted.report.steps,
            evaluations,
            best_top1,
            best_epoch,
            best,
            train_seconds,
            interrupted: fitted.report.interrupted,
            best_classifier: best_file,
        };
        let path = out.join("report.json");
        m3ae_model::fsio::atomic_write(&path, serde_json::to_string_pretty(&report)?.as_bytes())
            .map_err(io(&path))?;
        Ok(report)
    }
}

/// The safetensors metadata key of the [`FinetuneConfig`] (JSON) in a fine-tuned classifier's
/// files: `m3ae predict` reads the pixel normalisation from it.
pub const FINETUNE_METADATA_KEY: &str = "m3ae_finetune";

/// Writes a classifier's weights with `metadata` (atomically, creating the folder).
fn save_classifier(c: &Classifier, path: &Path, metadata: HashMap<String, String>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    Ok(c.params().save(path, metadata)?)
}

fn open_labelled(spec: &DataSpec, what: &'static str, opts: &DataOptions) -> Result<OpenedData> {
    let data = spec.open(opts)?;
    if data.classes == 0 {
        return Err(Error::arg(
            what,
            spec,
            "has no labels (fine-tuning needs labelled data)",
        ));
    }
    Ok(data)
}

fn read_evaluations(path: &Path) -> Result<Vec<EpochEval>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::Path {
                path: path.to_path_buf(),
                msg: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

fn write_evaluations(path: &Path, evals: &[EpochEval]) -> Result<()> {
    let mut text = String::new();
    for e in evals {
        text.push_str(&serde_json::to_string(e)?);
        text.push('\n');
    }
    m3ae_model::fsio::atomic_write(path, text.as_bytes()).map_err(io(path))
}

fn append_evaluation(path: &Path, e: &EpochEval) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    writeln!(f, "{}", serde_json::to_string(e)?)
        .and_then(|_| f.flush())
        .map_err(io(path))
}
