//! The pre-training job's configuration: the TOML file (a table over the default job), its
//! validation, the settings a resumed run may change, and adopting a checkpoint's settings.

use anyhow::{bail, Context, Result};
use m3ae_data::{DataOptions, DataSpec, LabelKind, SceneSplit, ScenesConfig};
use m3ae_model::{DeviceSpec, M3aeConfig, Variant};
use m3ae_train::TrainConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
    pub(crate) fn is_scenes(&self) -> bool {
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

    pub(crate) fn spec_of(
        &self,
        shards: Option<&str>,
        split: SceneSplit,
        n: usize,
    ) -> Result<DataSpec> {
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
    /// Data-parallel ranks run as threads of this process (`docs/distributed.md`, "Ranks as
    /// threads"), each with `compute_threads / local_ranks` compute threads: faster than one
    /// rank for models too small to keep several cores busy through a step. 1 trains in one
    /// rank; 0 (the default) chooses ([`PretrainConfig::resolved_local_ranks`]): 2 for a small
    /// model on a CPU with at least 2 compute threads, else 1. Not combined with an MPI launcher.
    pub local_ranks: usize,
    /// Longest wait in one collective operation before the job is aborted, in seconds.
    pub timeout_s: f64,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self {
            streams: 0,
            local_ranks: 0,
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
    /// Seed of initialisation, data order, augmentation, masks and dropout.
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
    /// Probe the final model (and a random-init one) on the scenes' labels, once with the cls
    /// token and once with the mean of the patch tokens.
    pub probe: bool,
    /// Training / test scenes for that probe.
    pub probe_samples: (usize, usize),
    /// Threads of the model's compute (0: cores minus the data threads, at least 1; every core
    /// for the built-in scenes, whose data thread is nearly idle). Applied
    /// through `RAYON_NUM_THREADS` unless that is already set.
    pub compute_threads: usize,
    /// Data-parallel training.
    pub distributed: DistributedConfig,
    /// Where the model trains: `cpu` (default), `cuda` or `cuda:N` (docs/gpu.md). Checkpoints
    /// are the same files on any device, so a run may resume on another one.
    pub device: DeviceSpec,
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
        // docs/results.md ("Why the image branch stalled"): with the tiny preset's 64-wide
        // decoder the text loss crowds the image loss out of the shared decoder and the masked
        // objects are never drawn; a 128-wide decoder learns both. Half the caption visible
        // gives the masked words (and the image) enough context.
        model.dec_emb_dim = 128;
        model.text_mask_ratio = 0.5;
        model.text_loss_weight = 0.2;
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
            // docs/results.md ("The default job"): per-sample masks teach the image branch
            // the objects faster than one mask shared by the batch (object-patch loss 0.505
            // against 0.582 at 1,200 steps), and 1,000,000 scenes make every training sample a
            // new one, so a longer run does not repeat a small set.
            data: DataConfig {
                noise: m3ae_data::NoiseKind::PerSample,
                scenes: ScenesConfig {
                    len: 1_000_000,
                    ..ScenesConfig::default()
                },
                ..DataConfig::default()
            },
            log_every: 25,
            save_every: 400,
            keep_checkpoints: 2,
            image_every: 400,
            probe: true,
            probe_samples: (8000, 2000),
            compute_threads: 0,
            distributed: DistributedConfig::default(),
            device: DeviceSpec::Cpu,
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
        check_preset_conflicts(&user, origin)?;
        let mut merged =
            toml::Value::try_from(Self::default()).context("serialising the default config")?;
        merge_toml(&mut merged, user);
        let mut cfg: Self = merged.try_into().with_context(|| origin.to_string())?;
        // A preset owns the architecture fields (as in the official code); writing its values
        // into them keeps the default job's own architecture out of a preset run's saved config.
        cfg.model = cfg.model.resolved();
        Ok(cfg)
    }

    /// The compute threads this configuration asks for on this machine.
    pub fn resolved_compute_threads(&self) -> usize {
        if self.compute_threads > 0 {
            return self.compute_threads;
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        // The built-in scenes cost about 1% of a core to draw and tokenize: their data thread
        // would leave a core idle if it were counted, so the compute takes every core.
        if self.data.source == "scenes" {
            return cores;
        }
        let data = if self.data.num_threads == 0 {
            cores
        } else {
            self.data.num_threads
        };
        cores.saturating_sub(data).max(1)
    }

    /// The data-parallel ranks this process trains as threads: `distributed.local_ranks`, or
    /// for 0 (auto) 2 when the job trains on the CPU with at least 2 compute threads, the model
    /// is small (`emb_dim` and `dec_emb_dim` at most 256: its GEMMs are too small to keep two
    /// cores busy, docs/distributed.md), the batch (and `distributed.streams`, if set) split
    /// in two, and no MPI launcher started the process (`launched`); otherwise 1.
    ///
    /// ```
    /// let mut cfg = m3ae::pretrain::PretrainConfig::default(); // the default job
    /// cfg.compute_threads = 2;
    /// assert_eq!(cfg.resolved_local_ranks(false), 2);
    /// assert_eq!(cfg.threads_per_rank(), 1);
    /// assert_eq!(cfg.resolved_local_ranks(true), 1); // under mpirun
    /// cfg.compute_threads = 1;
    /// assert_eq!(cfg.resolved_local_ranks(false), 1);
    /// cfg.compute_threads = 2;
    /// cfg.model.emb_dim = 384; // not a small model
    /// assert_eq!(cfg.resolved_local_ranks(false), 1);
    /// cfg.distributed.local_ranks = 3; // set explicitly
    /// assert_eq!(cfg.resolved_local_ranks(true), 3);
    /// ```
    pub fn resolved_local_ranks(&self, launched: bool) -> usize {
        if self.distributed.local_ranks > 0 {
            return self.distributed.local_ranks;
        }
        let small = self.model.emb_dim <= 256 && self.model.dec_emb_dim <= 256;
        let splits =
            self.train.batch_size.is_multiple_of(2) && self.distributed.streams.is_multiple_of(2);
        let two = !launched
            && self.device.is_cpu()
            && small
            && splits
            && self.resolved_compute_threads() >= 2;
        if two {
            2
        } else {
            1
        }
    }

    /// The compute threads of each rank: [`PretrainConfig::resolved_compute_threads`] shared
    /// by the [`PretrainConfig::resolved_local_ranks`] ranks of this process (at least one
    /// each).
    pub fn threads_per_rank(&self) -> usize {
        (self.resolved_compute_threads() / self.resolved_local_ranks(false)).max(1)
    }

    /// Sets `RAYON_NUM_THREADS` to [`PretrainConfig::threads_per_rank`] unless it is already set
    /// (under MPI, and with `distributed.local_ranks`, it counts the threads of one rank). Call it
    /// before any thread pool exists (first thing in `main`).
    pub fn apply_compute_threads(&self) {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var("RAYON_NUM_THREADS", self.threads_per_rank().to_string());
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
        // a loss weighted by exactly 0 leaves its head without a gradient, and the optimiser
        // refuses weights that would silently never train: say so before the first step
        let mut weights = vec![("model.image_loss_weight", self.model.image_loss_weight)];
        if self.objective == Variant::M3ae {
            weights.push(("model.text_loss_weight", self.model.text_loss_weight));
        }
        for (field, w) in weights {
            if w == 0.0 {
                bail!(
                    "{field} = 0 would leave that output head without a gradient (the run stops \
                     at its first step): use a small positive weight to all but switch the loss \
                     off, or objective = \"mae\" to train on images alone"
                );
            }
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
        let ranks = self.distributed.local_ranks;
        if ranks > 64 {
            bail!("distributed.local_ranks = {ranks} must be at most 64 (0: auto, 1: one rank)");
        }
        if ranks > 1 && !self.device.is_cpu() {
            bail!(
                "distributed.local_ranks = {ranks} runs ranks as CPU threads; on {} use one \
                 process per GPU (mpirun, docs/distributed.md)",
                self.device
            );
        }
        use m3ae_model::resources::cap_threads;
        self.data.num_threads = cap_threads("data.num_threads", self.data.num_threads);
        self.compute_threads = cap_threads("compute_threads", self.compute_threads);
        Ok(())
    }

    /// Opens [`PretrainConfig::device`] and checks that it supports `train.precision`
    /// ([`m3ae_model::Precision::check`]); errors name the setting and its value.
    pub fn open_device(&self) -> Result<candle_core::Device> {
        let dev = self.device.open()?;
        self.train.precision.check(&dev, "train.precision")?;
        Ok(dev)
    }

    /// Refuses a configuration whose training step would not fit in this machine's available
    /// memory (an estimate from the configuration alone, see [`m3ae_model::resources`]). On a
    /// GPU the host's memory does not bound the step, and nothing is checked.
    pub fn check_memory(&self) -> Result<()> {
        if !self.device.is_cpu() {
            return Ok(());
        }
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

/// Refuses a `[model]` table that names a preset and also sets one of the preset's architecture
/// fields to another value: the preset would silently win (the official rule).
fn check_preset_conflicts(user: &toml::Value, origin: &str) -> Result<()> {
    let Some(model) = user.get("model") else {
        return Ok(());
    };
    let Some(name) = model.get("model_type").and_then(|v| v.as_str()) else {
        return Ok(());
    };
    let preset = M3aeConfig::preset(name).with_context(|| origin.to_string())?;
    let preset = toml::Value::try_from(&preset).context("serialising the preset")?;
    // `mlp_ratio = 4` and `4.0` are the same value
    let number = |v: &toml::Value| v.as_float().or(v.as_integer().map(|i| i as f64));
    for field in m3ae_model::ModelType::ARCHITECTURE_FIELDS {
        let (Some(mine), Some(theirs)) = (model.get(field), preset.get(field)) else {
            continue;
        };
        let same = match (number(mine), number(theirs)) {
            (Some(a), Some(b)) => a == b,
            _ => mine == theirs,
        };
        if !same {
            bail!(
                "{origin}: model.{field} = {mine} conflicts with model.model_type = {name:?}, \
                 whose {field} is {theirs}; remove model_type to set the architecture yourself"
            );
        }
    }
    Ok(())
}

/// Overlays `over` on `base`: tables merge key by key, any other value replaces.
pub(crate) fn merge_toml(base: &mut toml::Value, over: toml::Value) {
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
    "distributed.local_ranks",
    "distributed.timeout_s",
    "device",
    "train.precision",
];

/// Flattens a JSON value into `path = value` leaves (`a.b`, `a[0]`).
pub(crate) fn flatten_json(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
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
pub(crate) fn safetensors_has(path: &Path, name: &str) -> Result<bool> {
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
