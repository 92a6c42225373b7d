//! `m3ae pretrain`: the pre-training job, from a TOML config to a run directory.
//!
//! A run directory `runs/<name>/` receives `config.toml` (the full resolved configuration),
//! `tokenizer.json`, `metrics.jsonl`, TensorBoard event files under `tb/`, reconstruction images
//! `recon/step-NNNNNNNN.png` (+ `.txt` with the captions, masked words and predicted words) and
//! checkpoints under `checkpoints/step-NNNNNNNN/`. The default configuration trains the `tiny`
//! preset on the built-in captioned scenes, then probes the learned image representation on the
//! scenes' shape labels next to a randomly initialised model.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use m3ae_data::{
    Batch, CaptionedScenes, DataOptions, DataSpec, LabelKind, Loader, LoaderConfig, MaskConfig,
    Position, SceneSplit, ScenesConfig, Source, Streams, Tokenizer, Transform,
};
use m3ae_model::{AnyModel, M3ae, M3aeConfig, Mae, Represent, Variant};
use m3ae_train::tensorboard::TensorBoardSink;
use m3ae_train::{Fitted, Hook, JsonlSink, Learner, Objective, TrainConfig, Trainer, Window};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Where the training data comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `scenes` (built in), `webdataset` (tar shards given by `shards`) or `hdf5` (feature
    /// `hdf5`: the official HDF5 file given by `shards`, datasets `jpg` and `caption`).
    pub source: String,
    /// Shards for `webdataset`: a list, a glob or a brace range; the file for `hdf5`.
    pub shards: Option<String>,
    /// Held-out shards for `webdataset` (reconstruction images and masked-word accuracy);
    /// defaults to the training shards.
    pub eval_shards: Option<String>,
    /// Unpaired text (`.txt` lines or `.jsonl` with a `text` field), used when
    /// `model.unpaired_text_loss_weight > 0`.
    pub unpaired_text: Option<PathBuf>,
    /// The built-in captioned scenes (train split; the probe uses the test split).
    pub scenes: ScenesConfig,
    /// A `tokenizer.json`, a folder holding one, or (feature `hub`) a Hugging Face repository id
    /// such as `bert-base-uncased`; without it a WordPiece vocabulary is trained on the scene
    /// captions.
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of a trained WordPiece tokenizer.
    pub vocab_size: usize,
    /// Decode threads (0: one per core). Default 1: on small machines the model gets the
    /// other cores.
    pub num_threads: usize,
    /// Batch-shared (`shared`, official) or per-sample (`per_sample`) mask noise.
    pub noise: m3ae_data::NoiseKind,
    /// Largest tolerated fraction of bad samples (undecodable images, missing or empty
    /// captions, truncated shards) in the training and held-out data; see docs/data.md for how
    /// it is judged.
    pub max_bad_fraction: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: "scenes".into(),
            shards: None,
            eval_shards: None,
            unpaired_text: None,
            scenes: ScenesConfig::default(),
            tokenizer: None,
            vocab_size: 1000,
            num_threads: 1,
            noise: m3ae_data::NoiseKind::Shared,
            max_bad_fraction: 0.1,
        }
    }
}

impl DataConfig {
    /// Whether the data are the built-in scenes.
    fn is_scenes(&self) -> bool {
        self.source == "scenes"
    }

    /// The training data: `source` with its `shards` (or the training split of the scenes).
    pub fn spec(&self) -> Result<DataSpec> {
        self.spec_of(self.shards.as_deref(), SceneSplit::Train, self.scenes.len)
    }

    /// The held-out data: `eval_shards` (else `shards`), or `n` test scenes.
    pub fn eval_spec(&self, n: usize) -> Result<DataSpec> {
        let shards = self.eval_shards.as_deref().or(self.shards.as_deref());
        self.spec_of(shards, SceneSplit::Test, n)
    }

    fn spec_of(&self, shards: Option<&str>, split: SceneSplit, n: usize) -> Result<DataSpec> {
        let kind = self.source.as_str();
        let shards = || {
            shards.with_context(|| format!("data.shards is required for data.source = {kind:?}"))
        };
        Ok(match kind {
            "scenes" => DataSpec::scenes(split, Some(n)),
            "webdataset" => DataSpec::webdataset(shards()?),
            #[cfg(feature = "hdf5")]
            "hdf5" => DataSpec::hdf5(shards()?),
            #[cfg(not(feature = "hdf5"))]
            "hdf5" => bail!(
                "data.source = \"hdf5\" ({}): this m3ae was built without HDF5; rebuild with `--features hdf5`",
                shards()?
            ),
            other => {
                bail!("data.source = {other:?}: expected \"scenes\", \"webdataset\" or \"hdf5\"")
            }
        })
    }

    /// How [`DataConfig::spec`] is opened: the scenes with `label` and these settings.
    pub fn options(&self, label: LabelKind) -> DataOptions {
        DataOptions {
            label,
            scenes: self.scenes.clone(),
            ..Default::default()
        }
    }
}

/// Data-parallel settings (see `docs/distributed.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// Data streams the global batch is split over (0: one per rank). A fixed value makes the
    /// run independent of the number of ranks (any number dividing it gives the same batches)
    /// and lets a checkpoint resume under a different number of ranks. `train.batch_size` must
    /// be a multiple of it.
    pub streams: usize,
    /// Longest wait in one collective operation before the job is aborted, in seconds.
    pub timeout_s: f64,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self {
            streams: 0,
            timeout_s: 600.0,
        }
    }
}

/// The whole pre-training configuration (saved as `config.toml` in the run directory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    /// Run name: the run directory is `<output_dir>/<name>`.
    pub name: String,
    /// Parent of run directories.
    pub output_dir: PathBuf,
    /// M3AE or MAE.
    pub objective: Variant,
    /// Seed of initialisation, data order, augmentation and masks.
    pub seed: u64,
    /// The model.
    pub model: M3aeConfig,
    /// Optimisation.
    pub train: TrainConfig,
    /// Data.
    pub data: DataConfig,
    /// Log metrics every N optimiser steps.
    pub log_every: u64,
    /// Write a checkpoint every N steps (and at the end).
    pub save_every: u64,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Write a reconstruction image every N steps (0: only at the end).
    pub image_every: u64,
    /// Probe the final model (and a random-init one) on the scenes' labels.
    pub probe: bool,
    /// Training / test scenes for that probe.
    pub probe_samples: (usize, usize),
    /// Threads of the model's compute (0: cores minus the data threads, at least 1). Applied
    /// through `RAYON_NUM_THREADS` unless that is already set.
    pub compute_threads: usize,
    /// Data-parallel training.
    pub distributed: DistributedConfig,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        let mut model = M3aeConfig::preset("tiny").expect("tiny preset");
        // The tiny architecture spelled out (a preset would override a config file's
        // `emb_dim`, `depth`, ... whenever it does not name another preset).
        model.model_type = None;
        model.image_size = 64;
        model.patch_size = 8;
        model.text_length = 32;
        model.text_loss_weight = 0.5;
        Self {
            name: "tiny-scenes".into(),
            output_dir: PathBuf::from("runs"),
            objective: Variant::M3ae,
            seed: 42,
            model,
            train: TrainConfig {
                steps: 1200,
                batch_size: 64,
                lr_peak: 4e-3,
                warmup_steps: 100,
                ..TrainConfig::default()
            },
            data: DataConfig::default(),
            log_every: 25,
            save_every: 400,
            keep_checkpoints: 2,
            image_every: 400,
            probe: true,
            probe_samples: (2000, 1000),
            compute_threads: 0,
            distributed: DistributedConfig::default(),
        }
    }
}

impl PretrainConfig {
    /// Reads a TOML file (unknown keys are errors naming the key). A key the file does not set
    /// keeps its value of [`PretrainConfig::default`] (the default job), whether or not the file
    /// mentions its table: `[train]` with only `steps` changes the steps and nothing else.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// [`PretrainConfig::from_file`] on TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        // Parsed alone first: unknown keys and wrong types are reported with their line.
        toml::from_str::<Self>(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let msg = e.message().replace('\n', " ");
            match line {
                Some(l) => anyhow::anyhow!("{origin}, line {l}: {msg}"),
                None => anyhow::anyhow!("{origin}: {msg}"),
            }
        })?;
        let user: toml::Value = toml::from_str(text).with_context(|| origin.to_string())?;
        let mut merged =
            toml::Value::try_from(Self::default()).context("serialising the default config")?;
        merge_toml(&mut merged, user);
        merged.try_into().with_context(|| origin.to_string())
    }

    /// The compute threads this configuration asks for on this machine.
    pub fn resolved_compute_threads(&self) -> usize {
        if self.compute_threads > 0 {
            return self.compute_threads;
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let data = if self.data.num_threads == 0 {
            cores
        } else {
            self.data.num_threads
        };
        cores.saturating_sub(data).max(1)
    }

    /// Sets `RAYON_NUM_THREADS` to [`PretrainConfig::resolved_compute_threads`] unless it is
    /// already set. Call it before any thread pool exists (first thing in `main`).
    pub fn apply_compute_threads(&self) {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var(
                "RAYON_NUM_THREADS",
                self.resolved_compute_threads().to_string(),
            );
        }
    }

    /// The run directory.
    pub fn run_dir(&self) -> PathBuf {
        self.output_dir.join(&self.name)
    }

    /// Checks every setting that can be checked before data is read; errors name the field
    /// and its value. Thread counts above [`m3ae_model::resources::max_threads`] are lowered
    /// with a warning.
    pub fn validate(&mut self) -> Result<()> {
        self.train.validate()?;
        self.model.validate(self.objective == Variant::M3ae)?;
        if self.model.image_size != self.data.scenes.image_size && self.data.is_scenes() {
            bail!(
                "model.image_size = {} but data.scenes.image_size = {}: they must agree",
                self.model.image_size,
                self.data.scenes.image_size
            );
        }
        if self.log_every == 0 || self.save_every == 0 {
            bail!("log_every and save_every must be > 0");
        }
        let fraction = self.data.max_bad_fraction;
        if !(0.0..=1.0).contains(&fraction) {
            bail!("data.max_bad_fraction = {fraction} must be in [0, 1]");
        }
        if self.data.is_scenes() && self.data.scenes.len < self.train.batch_size {
            bail!(
                "data.scenes.len = {} scenes is fewer than one batch (train.batch_size = {}): \
                 the loader drops incomplete batches, so no step could be made",
                self.data.scenes.len,
                self.train.batch_size
            );
        }
        if self.probe {
            let (tr, te) = self.probe_samples;
            if tr == 0 || te == 0 {
                bail!(
                    "probe_samples = [{tr}, {te}]: the final probe needs at least one training \
                     and one test scene (or set probe = false)"
                );
            }
        }
        use m3ae_model::resources::cap_threads;
        self.data.num_threads = cap_threads("data.num_threads", self.data.num_threads);
        self.compute_threads = cap_threads("compute_threads", self.compute_threads);
        Ok(())
    }

    /// Refuses a configuration whose training step would not fit in this machine's available
    /// memory (an estimate from the configuration alone, see [`m3ae_model::resources`]).
    pub fn check_memory(&self) -> Result<()> {
        let variant = self.objective;
        m3ae_model::resources::check_training_step(
            &self.model,
            variant,
            self.train.batch_size,
            "train.batch_size, model.image_size, model.text_length or the model's width and depth",
        )?;
        Ok(())
    }
}

/// Overlays `over` on `base`: tables merge key by key, any other value replaces.
fn merge_toml(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge_toml(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Settings a resumed run may change (with `--config` or flags); every other difference from
/// the run's saved `config.toml` is refused ([`check_resume_changes`]). A path names a field and
/// everything below it.
pub const RESUMABLE_SETTINGS: &[&str] = &[
    "name",
    "output_dir",
    "train.steps",
    "log_every",
    "save_every",
    "keep_checkpoints",
    "image_every",
    "probe",
    "probe_samples",
    "compute_threads",
    "data.num_threads",
    "distributed.timeout_s",
];

/// Flattens a JSON value into `path = value` leaves (`a.b`, `a[0]`).
fn flatten_json(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_json(&p, v, out);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten_json(&format!("{prefix}[{i}]"), v, out);
            }
        }
        leaf => out.push((prefix.to_string(), leaf.to_string())),
    }
}

/// `Ok` when `requested` differs from the run's `saved` configuration only in
/// [`RESUMABLE_SETTINGS`]; otherwise an error naming the first other setting and both values.
///
/// ```
/// use m3ae::pretrain::{check_resume_changes, PretrainConfig};
/// let saved = PretrainConfig::default();
/// let mut more_steps = saved.clone();
/// more_steps.train.steps += 100;
/// assert!(check_resume_changes(&saved, &more_steps).is_ok());
/// let mut other_batch = saved.clone();
/// other_batch.train.batch_size = 4;
/// let e = check_resume_changes(&saved, &other_batch).unwrap_err().to_string();
/// assert!(e.contains("train.batch_size") && e.contains("64") && e.contains('4'), "{e}");
/// ```
pub fn check_resume_changes(saved: &PretrainConfig, requested: &PretrainConfig) -> Result<()> {
    let flat = |c: &PretrainConfig| -> Result<std::collections::BTreeMap<String, String>> {
        let mut v = Vec::new();
        flatten_json("", &serde_json::to_value(c)?, &mut v);
        Ok(v.into_iter().collect())
    };
    let (a, b) = (flat(saved)?, flat(requested)?);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        let (x, y) = (a.get(k), b.get(k));
        if x == y {
            continue;
        }
        let allowed = RESUMABLE_SETTINGS.iter().any(|s| {
            k == s
                || k.strip_prefix(s)
                    .is_some_and(|r| r.starts_with('.') || r.starts_with('['))
        });
        if !allowed {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
            bail!(
                "--resume: the run was trained with {k} = {}, this invocation asks for {k} = {}; \
                 a resumed run keeps its configuration (only {} may change): drop that setting, \
                 or start a new run with another --name",
                show(x),
                show(y),
                RESUMABLE_SETTINGS.join(", ")
            );
        }
    }
    Ok(())
}

/// The configuration a run directory saved (`config.toml`), `None` when it has none.
pub fn saved_config(run_dir: &Path) -> Result<Option<PretrainConfig>> {
    let p = run_dir.join("config.toml");
    if !p.is_file() {
        return Ok(None);
    }
    PretrainConfig::from_file(&p).map(Some)
}

/// How the run ended, with the figures the summary prints.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Optimiser steps done.
    pub steps: u64,
    /// True when stopped early by Ctrl-C.
    pub interrupted: bool,
    /// Image loss of the first logged window and of the last one.
    pub image_loss: Option<(f64, f64)>,
    /// Text loss of the first logged window and of the last one.
    pub text_loss: Option<(f64, f64)>,
    /// Masked-word accuracy on held-out scenes.
    pub masked_word_accuracy: Option<f64>,
    /// Accuracy of always predicting the most frequent training word at the same positions.
    pub frequency_baseline: Option<f64>,
    /// Training samples per second (whole loop, data included).
    pub samples_per_s: f64,
    /// Wall time of the training loop in seconds.
    pub train_seconds: f64,
    /// Probe top-1 of the trained model and of a random-init model (scene labels).
    pub probe: Option<(f64, f64)>,
    /// Micro-batches skipped for non-finite values.
    pub skipped_steps: u64,
    /// The newest checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// What the held-out figures were measured on (`held-out scenes`, `held-out data`).
    pub held_out: String,
    /// Why the final held-out evaluation could not be made, if it failed (training and its
    /// checkpoint are unaffected).
    pub held_out_error: Option<String>,
    /// Bad samples met in the training data (all ranks' streams of this process).
    pub bad_samples: m3ae_data::BadStats,
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "== summary ({})", self.run_dir.display())?;
        writeln!(
            f,
            "steps: {}{}",
            self.steps,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        )?;
        if let Some((a, b)) = self.image_loss {
            writeln!(
                f,
                "image loss: {a:.4} -> {b:.4} ({:.0}% of the first)",
                100.0 * b / a
            )?;
        }
        if let Some((a, b)) = self.text_loss {
            writeln!(f, "text loss: {a:.4} -> {b:.4}")?;
        }
        if let (Some(a), Some(b)) = (self.masked_word_accuracy, self.frequency_baseline) {
            writeln!(
                f,
                "masked-word accuracy ({}): {:.1}% (most-frequent-word baseline {:.1}%)",
                self.held_out,
                100.0 * a,
                100.0 * b
            )?;
        }
        if let Some(e) = &self.held_out_error {
            writeln!(f, "held-out evaluation failed ({}): {e}", self.held_out)?;
        }
        if self.bad_samples.total_bad() > 0 {
            writeln!(f, "training data: {}", self.bad_samples)?;
        } else {
            writeln!(
                f,
                "training data: {} samples read, none bad",
                self.bad_samples.good
            )?;
        }
        writeln!(
            f,
            "throughput: {:.1} samples/s over {:.0} s of training",
            self.samples_per_s, self.train_seconds
        )?;
        if let Some((t, r)) = self.probe {
            writeln!(
                f,
                "linear probe on scene shapes: {:.1}% (random-init model: {:.1}%)",
                100.0 * t,
                100.0 * r
            )?;
        }
        if self.skipped_steps > 0 {
            writeln!(f, "skipped non-finite steps: {}", self.skipped_steps)?;
        }
        if let Some(c) = &self.checkpoint {
            writeln!(f, "checkpoint: {}", c.display())?;
        }
        write!(
            f,
            "metrics: {0}/metrics.jsonl, TensorBoard: {0}/tb, images: {0}/recon",
            self.run_dir.display()
        )
    }
}

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

/// Saves a tokenizer (atomically, so that another process of the job never reads it
/// half-written).
fn save_tokenizer(tok: &Tokenizer, path: &Path) -> Result<()> {
    Ok(tok.save(path)?)
}

/// A `data.tokenizer` value: a `tokenizer.json`, a folder holding one, or (feature `hub`) a
/// Hugging Face repository id such as `bert-base-uncased` (local cache first; `HF_HUB_OFFLINE=1`
/// keeps it off the network).
fn load_tokenizer(p: &Path) -> Result<Tokenizer> {
    let name = p
        .to_str()
        .with_context(|| format!("data.tokenizer {}: not UTF-8", p.display()))?;
    Ok(Tokenizer::from_pretrained(
        name,
        &m3ae_data::HubOptions::default(),
    )?)
}

/// Builds (or loads) the tokenizer of a run and saves it in the run directory (`save`: rank 0).
fn tokenizer(
    cfg: &PretrainConfig,
    run_dir: &Path,
    scenes: &CaptionedScenes,
    save: bool,
) -> Result<Tokenizer> {
    let saved = run_dir.join("tokenizer.json");
    let tok = if let Some(p) = &cfg.data.tokenizer {
        load_tokenizer(p)?
    } else if saved.is_file() {
        Tokenizer::from_file(&saved)?
    } else {
        let corpus = scenes.corpus(5000);
        Tokenizer::train_wordpiece(corpus.iter().map(String::as_str), cfg.data.vocab_size)?
    };
    if save && !saved.is_file() {
        save_tokenizer(&tok, &saved)?;
    }
    Ok(tok)
}

fn scenes(cfg: &PretrainConfig, split: SceneSplit, len: usize) -> Result<CaptionedScenes> {
    Ok(CaptionedScenes::new(ScenesConfig {
        split,
        len,
        label: LabelKind::Shape,
        ..cfg.data.scenes.clone()
    })?)
}

fn loader_config(cfg: &PretrainConfig, model: &M3aeConfig) -> LoaderConfig {
    let mut lc = LoaderConfig::pretrain(cfg.train.batch_size, model.image_size, model.patch_size);
    lc.seed = cfg.seed;
    lc.num_threads = cfg.data.num_threads;
    lc.max_bad_fraction = cfg.data.max_bad_fraction;
    lc.text_len = Some(model.text_length);
    lc.masks = Some(MaskConfig::from_model(model, cfg.data.noise));
    lc
}

/// A fixed held-out batch with masks: for reconstruction images and masked-word accuracy.
fn eval_batch(
    cfg: &PretrainConfig,
    model: &M3aeConfig,
    tok: &Arc<Tokenizer>,
    n: usize,
) -> Result<Batch> {
    let test = cfg
        .data
        .eval_spec(n)?
        .open(&cfg.data.options(LabelKind::Shape))?
        .source;
    let mut lc = loader_config(cfg, model);
    lc.batch_size = n;
    lc.shuffle_buffer = 0;
    lc.epochs = Some(1);
    // a held-out set smaller than `n` (the 99 Tux Paint test pairs) gives one shorter batch
    lc.drop_last = false;
    lc.seed = cfg.seed ^ 0x5eed;
    if let Some(im) = lc.image.as_mut() {
        im.transform = Transform::test();
    }
    let what = test.describe();
    let loader = Loader::new(test, Some(tok.clone()), lc)?;
    let b = loader
        .iter(Position::default())
        .next()
        .with_context(|| format!("the held-out data ({what}) gave no batch"))?
        .with_context(|| format!("reading the held-out data ({what})"))?;
    Ok(b)
}

/// Masked-word accuracy of `model` on `batch` and the most-frequent-word baseline.
fn masked_word_accuracy(model: &M3ae, batch: &Batch, most_frequent: u32) -> Result<(f64, f64)> {
    let out = model.forward(
        &batch.input,
        batch.image_masking.as_ref(),
        batch.text_masking.as_ref(),
    )?;
    let logits = out.text_logits.context("no text output")?;
    let pred = logits.argmax(candle_core::D::Minus1)?.to_vec2::<u32>()?;
    let (ids, pad) = text_rows(batch)?;
    let mask = out.text_mask.context("no text mask")?.to_vec2::<f32>()?;
    let (mut n, mut hit, mut base) = (0usize, 0usize, 0usize);
    for i in 0..ids.len() {
        for t in 0..ids[i].len() {
            if mask[i][t] > 0.0 && pad[i][t] == 0.0 {
                n += 1;
                hit += (pred[i][t] == ids[i][t]) as usize;
                base += (ids[i][t] == most_frequent) as usize;
            }
        }
    }
    if n == 0 {
        bail!("the held-out batch has no masked words");
    }
    Ok((hit as f64 / n as f64, base as f64 / n as f64))
}

fn most_frequent_token(tok: &Tokenizer, scenes: &CaptionedScenes) -> Result<u32> {
    let mut counts = std::collections::HashMap::<u32, usize>::new();
    for c in scenes.corpus(2000) {
        for id in tok.ids(&c)? {
            *counts.entry(id).or_default() += 1;
        }
    }
    most_frequent(counts).context("empty corpus")
}

/// Token ids and padding flags of a batch's text, row by row.
type TextRows = (Vec<Vec<u32>>, Vec<Vec<f32>>);

/// Reads [`TextRows`] from a batch.
fn text_rows(b: &Batch) -> Result<TextRows> {
    let ids = b
        .input
        .text_ids
        .as_ref()
        .context("no text")?
        .to_vec2::<u32>()?;
    let pad = b
        .input
        .text_padding
        .as_ref()
        .context("no padding")?
        .to_vec2::<f32>()?;
    Ok((ids, pad))
}

/// The most frequent token of a count table (ties: the smaller id).
fn most_frequent(counts: std::collections::HashMap<u32, usize>) -> Option<u32> {
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(id, _)| id)
}

/// The most frequent non-padding token of a batch (frequency baseline for non-scene data).
fn most_frequent_in_batch(b: &Batch) -> Result<u32> {
    let (ids, pad) = text_rows(b)?;
    let mut counts = std::collections::HashMap::<u32, usize>::new();
    for (r, p) in ids.iter().zip(&pad) {
        for (&t, &q) in r.iter().zip(p) {
            if q == 0.0 {
                *counts.entry(t).or_default() += 1;
            }
        }
    }
    most_frequent(counts).context("the held-out batch has no text")
}

/// The probe recipe of the run's final scene probe ([`probe_scenes`]): LARS as in the official
/// recipe, but 40 epochs at a peak learning rate of 2.0 (batch 256, 4 warmup epochs), which
/// converges on the few thousand scene features.
pub fn scene_probe_config(seed: u64) -> m3ae_eval::ProbeConfig {
    m3ae_eval::ProbeConfig {
        epochs: 40,
        batch_size: 256,
        lr_peak: 2.0,
        warmup_epochs: 4,
        seed,
        ..Default::default()
    }
}

/// Linear-probe top-1 of a representation on the scenes' shape labels (train/test splits).
pub fn probe_scenes(model: &dyn Represent, cfg: &PretrainConfig, seed: u64) -> Result<f64> {
    let feats = |split: SceneSplit, n: usize| -> Result<(Tensor, Vec<u32>)> {
        let settings = m3ae_eval::ExtractSettings {
            num_threads: cfg.data.num_threads,
            ..Default::default()
        };
        let opts = cfg.data.options(LabelKind::Shape);
        let set =
            m3ae_eval::extract_with(model, &DataSpec::scenes(split, Some(n)), &opts, &settings)?;
        Ok((
            set.features,
            set.labels.iter().map(|&l| l.max(0) as u32).collect(),
        ))
    };
    let (ntr, nte) = cfg.probe_samples;
    let (xtr, ytr) = feats(SceneSplit::Train, ntr)?;
    let (xte, yte) = feats(SceneSplit::Test, nte)?;
    let classes = (ytr.iter().chain(&yte).copied().max().unwrap_or(0) + 1) as usize;
    let (head, _) = m3ae_eval::train_probe(&xtr, &ytr, classes, &scene_probe_config(seed))?;
    let logits = m3ae_eval::probe::probe_logits(&head, &xte)?;
    Ok(m3ae_eval::metrics::top_k_accuracy(
        &logits, classes, &yte, 1,
    )?)
}

/// The checkpoint folder a `--resume <DIR>` value stands for: `DIR` itself when it holds
/// `trainer.json`, else the newest `DIR/checkpoints/step-*`, else the newest `DIR/step-*`.
pub fn resolve_resume_dir(dir: &Path) -> Result<PathBuf> {
    if let Some(p) = m3ae_train::checkpoint::resolve(dir, "trainer.json")? {
        return Ok(p);
    }
    bail!(
        "--resume {}: no checkpoint there (a step-* folder with trainer.json, or checkpoints/step-*)",
        dir.display()
    )
}

/// True when the safetensors file holds a tensor `name` (reads only the header).
fn safetensors_has(path: &Path, name: &str) -> Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: no safetensors header", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        bail!("{}: safetensors header of {n} bytes", path.display());
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .with_context(|| format!("{}: safetensors header", path.display()))?;
    Ok(v.get(name).is_some())
}

/// Makes `cfg` continue the checkpoint `dir` (see [`resolve_resume_dir`]) and returns the
/// checkpoint folder: the model configuration and the optimisation settings are the
/// checkpoint's (its `trainer.json`), the objective follows its weights (M3AE when they hold a
/// text embedding), and the built-in scenes are drawn at the model's image size with a
/// vocabulary no larger than the model's. Flags applied afterwards (`--steps`, `--lr`, ...)
/// still override.
pub fn adopt_checkpoint(cfg: &mut PretrainConfig, dir: &Path) -> Result<PathBuf> {
    let step_dir = resolve_resume_dir(dir)?;
    let state = m3ae_train::TrainerState::read(&step_dir)?;
    cfg.model = state.model;
    cfg.train = state.train;
    cfg.objective =
        if safetensors_has(&step_dir.join("model.safetensors"), "text_embedding.weight")? {
            Variant::M3ae
        } else {
            Variant::Mae
        };
    if cfg.data.is_scenes() {
        cfg.data.scenes.image_size = cfg.model.image_size;
        if cfg.data.tokenizer.is_none() {
            cfg.data.vocab_size = cfg.data.vocab_size.min(cfg.model.text_vocab_size);
        }
    }
    Ok(step_dir)
}

/// Runs (or resumes) a pre-training job in this process alone.
pub fn run(cfg: PretrainConfig, opts: RunOptions) -> Result<RunSummary> {
    run_with_sync(cfg, opts, Box::new(m3ae_train::SingleProcess))
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
    let dev = Device::Cpu;
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
                Trainer::new(m, cfg.train.clone())?.with_sync(sync),
                source,
                latest,
                &run_dir,
                |t, path| {
                    let m = t.objective();
                    let out = m.forward(
                        &eval.input,
                        eval.image_masking.as_ref(),
                        eval.text_masking.as_ref(),
                    )?;
                    Ok(m3ae_eval::panels::write_batch_reconstruction(
                        m.config(),
                        &out,
                        &eval,
                        Some(&tok),
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
                Trainer::new(m, cfg.train.clone())?.with_sync(sync),
                source,
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
        let trained = probe_scenes(final_model.as_represent(), &cfg, 1)?;
        let random = Mae::init(&model_cfg, cfg.seed.wrapping_add(1000), &dev)?;
        let baseline = probe_scenes(&random, &cfg, 1)?;
        summary.probe = Some((trained, baseline));
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

/// The pre-training job's progress: a progress bar on rank 0 (or plain lines with `--plain`)
/// showing the window's losses, throughput and data wait.
struct JobProgress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
}

impl JobProgress {
    fn new(plain: bool) -> Self {
        Self { bar: None, plain }
    }
}

impl m3ae_train::Progress for JobProgress {
    fn start(&mut self, step: u64, total: u64) {
        if self.plain {
            return;
        }
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_position(step);
        self.bar = Some(b);
    }
    fn advance(&mut self, step: u64) {
        if let Some(b) = &self.bar {
            b.set_position(step);
        }
    }
    fn window(&mut self, w: &Window) {
        let msg = format!(
            "loss {:.4} image {:.4} text {:.3} acc {:.2} | {:.0} samples/s, data wait {:.0}%",
            w.mean("loss"),
            w.mean("image_loss"),
            w.mean("text_loss"),
            w.mean("text_accuracy"),
            w.samples_per_s,
            100.0 * w.data_wait_fraction
        );
        match &self.bar {
            Some(b) => b.set_message(msg),
            None => eprintln!("step {}/{} {msg}", w.step, w.total),
        }
    }
    fn finish(&mut self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn train_loop<O: Objective + Clone + Into<AnyModel>>(
    cfg: &PretrainConfig,
    opts: &RunOptions,
    trainer: Trainer<O>,
    source: Streams,
    latest: Option<PathBuf>,
    run_dir: &Path,
    mut draw: impl FnMut(&Trainer<O>, &Path) -> Result<()>,
) -> Result<(RunSummary, AnyModel)> {
    let lead = trainer.rank_and_world().0 == 0;
    let tokens = source.loader().config().text_len.unwrap_or(0) + cfg.model.num_patches();
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
        .progress(Box::new(JobProgress::new(opts.plain)))
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
        trainer,
        source,
        report,
    } = learner.fit()?;
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
        text_loss: pair("text_loss"),
        masked_word_accuracy: None,
        frequency_baseline: None,
        samples_per_s: report.samples_per_s,
        train_seconds: report.train_seconds,
        probe: None,
        skipped_steps: report.skipped_steps,
        checkpoint: report.checkpoint,
        held_out: if cfg.data.is_scenes() {
            "held-out scenes".into()
        } else {
            "held-out data".into()
        },
        held_out_error: None,
        bad_samples: source.stats(),
    };
    Ok((summary, trainer.objective().clone().into()))
}
