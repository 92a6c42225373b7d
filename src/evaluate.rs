//! Evaluation front end: what `m3ae embed | probe | ood | reconstruct` run, as a library.
//!
//! * Models ([`ModelSource`], [`load_model`]): a checkpoint directory `step-*`, a run directory
//!   (its newest `checkpoints/step-*`), a `model.safetensors` with `m3ae_config` metadata, a
//!   converted folder, an official `model.pkl` (through [`crate::convert`]), a Hugging Face
//!   repository id (feature `hub`, through [`crate::pretrained`]), or a randomly initialised preset (the baseline every probe number should be read against).
//! * Data ([`DataSpec`]): `u8:<file>` (also `fashion_mnist:<file>`, `mnist:<file>` or a bare
//!   `*.safetensors` path; uint8 arrays as in `shared/data`), `scenes[:train|test|ood[:N]]` (the
//!   built-in captioned scenes, labelled by [`m3ae_data::LabelKind`]), `folder:<dir>` (one
//!   sub-folder per class) or `wds:<shards>` (WebDataset tar shards, labelled by their `.cls`
//!   members or, with [`DataOptions::json_label`], by a field of their `.json` members such as
//!   the Tux Paint `category`; see [`json_label`]). Images go through the evaluation transform of the data crate
//!   (bicubic resize to the model's image size, centre crop, normalisation).
//! * Features ([`FeatureSet`], [`extract`]): pooled encoder outputs (cls or mean; images only,
//!   no masking), with labels and keys; saved and cached as safetensors. Samples whose image
//!   cannot be used are skipped and counted per reason up to `--max-bad-fraction` (the commands
//!   print one summary line per data set on stderr); a model whose features are NaN or infinite
//!   is an error naming it.
//! * Probe, kNN and OOD evaluation ([`probe_report`], [`ood_report`]) over the `m3ae-eval`
//!   primitives; reconstruction panels and the cls-attention overlay ([`reconstruct`]).
//!
//! ```no_run
//! use m3ae::evaluate::{extract, load_model, DataOptions, DataSpec, ModelSource};
//! let model = load_model(&ModelSource::RandomInit { preset: "tiny".into(), seed: 0, mae: false })?;
//! let spec: DataSpec = "scenes:train:64".parse()?;
//! let feats = extract(model.represent(), &spec, &DataOptions::default(), None)?;
//! assert_eq!(feats.features.dims()[0], 64);
//! # Ok::<(), m3ae::evaluate::Error>(())
//! ```

use candle_core::{DType, Device, Tensor, D};
use m3ae_data::{
    BadStats, ImageConfig, JsonLabel, LabelKind, Loader, LoaderConfig, Normalization, RgbImage,
    Tokenizer, Transform, WebDataset,
};
use m3ae_eval::metrics::{ood_metrics, top_k_accuracy, OodMetrics};
use m3ae_eval::probe::{probe_logits, train_probe, LinearProbeHead, ProbeConfig};
use m3ae_model::params::{read_safetensors, write_safetensors};
use m3ae_model::{M3ae, M3aeConfig, Mae, Masking, ModelInput, Noise, Pooling, Represent, Variant};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Errors of the evaluation front end; each names the file, flag or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path that does not exist or does not hold what it should.
    #[error("{}: {msg}", path.display())]
    Path {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A command-line value that cannot be used.
    #[error("{flag} {value:?}: {msg}")]
    Arg {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        msg: String,
    },
    /// A flag that is missing or cannot be used (no value to show).
    #[error("{flag}: {msg}")]
    Flag {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// Feature extraction produced NaN or infinite features: the model (or its checkpoint) is
    /// broken.
    #[error(
        "{count} of {total} samples of {data} have non-finite features (NaN or infinite) \
         with the model {model}: the checkpoint's weights are broken"
    )]
    NonFinite {
        /// Samples (rows) with at least one non-finite feature.
        count: usize,
        /// Samples extracted.
        total: usize,
        /// The data set.
        data: String,
        /// The model: the checkpoint as given, or the random-init preset.
        model: String,
    },
    /// The model's outputs or settings make the command impossible.
    #[error("{model}: {msg}")]
    Unusable {
        /// The model: the checkpoint as given, or the random-init preset.
        model: String,
        /// What is wrong.
        msg: String,
    },
    /// More bad samples than `--max-bad-fraction` allows.
    #[error(
        "{data}: more bad samples than --max-bad-fraction {max} allows (that fraction of the \
         samples read, at least of 100): {stats}"
    )]
    TooManyBad {
        /// The data set.
        data: String,
        /// The `--max-bad-fraction` in force.
        max: f64,
        /// What was found.
        stats: Box<BadStats>,
    },
    /// Loading a checkpoint failed.
    #[error(transparent)]
    Convert(#[from] crate::convert::Error),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] m3ae_model::Error),
    /// Reading data failed.
    #[error(transparent)]
    Data(#[from] m3ae_data::Error),
    /// An evaluation primitive failed.
    #[error(transparent)]
    Eval(#[from] m3ae_eval::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

fn path_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Path {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn arg_err(flag: &'static str, value: impl std::fmt::Display, msg: impl Into<String>) -> Error {
    Error::Arg {
        flag,
        value: value.to_string(),
        msg: msg.into(),
    }
}

fn flag_err(flag: &'static str, msg: impl Into<String>) -> Error {
    Error::Flag {
        flag,
        msg: msg.into(),
    }
}

/// The range of [`check_float`] for numbers > 0.
const POSITIVE: (std::ops::Bound<f64>, std::ops::Bound<f64>) =
    (std::ops::Bound::Excluded(0.0), std::ops::Bound::Unbounded);

/// `value` of `flag` when it is a finite number in `range` (shown as `what` in the error).
fn check_float(
    flag: &'static str,
    value: f64,
    range: impl std::ops::RangeBounds<f64>,
    what: &str,
) -> Result<f64> {
    if value.is_finite() && range.contains(&value) {
        Ok(value)
    } else {
        Err(arg_err(
            flag,
            value,
            format!("must be a finite number {what}"),
        ))
    }
}

/// `s` with its control characters (newlines, escapes, ...) escaped, for messages that quote
/// file contents (sample keys, decoder messages): they stay on one line and cannot drive the
/// terminal.
pub fn escape_control(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Models

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A checkpoint directory, run directory, `model.safetensors`, converted folder or
    /// official `model.pkl`.
    Checkpoint(PathBuf),
    /// A freshly initialised preset.
    RandomInit {
        /// Preset name (`tiny`, `small`, ...).
        preset: String,
        /// Initialisation seed.
        seed: u64,
        /// The image-only MAE instead of M3AE.
        mae: bool,
    },
}

impl ModelSource {
    /// The model in messages: the checkpoint as given, or the random-init preset and seed.
    pub fn describe(&self) -> String {
        match self {
            ModelSource::Checkpoint(p) => p.display().to_string(),
            ModelSource::RandomInit { preset, seed, mae } => format!(
                "random-init {} preset {preset} (seed {seed})",
                if *mae { "MAE" } else { "M3AE" }
            ),
        }
    }
}

/// A loaded model: M3AE or the image-only MAE.
#[derive(Debug, Clone)]
pub enum LoadedModel {
    /// Multimodal.
    M3ae(M3ae),
    /// Image only.
    Mae(Mae),
}

impl LoadedModel {
    /// The model as a feature extractor.
    pub fn represent(&self) -> &dyn Represent {
        match self {
            LoadedModel::M3ae(m) => m,
            LoadedModel::Mae(m) => m,
        }
    }

    /// The resolved configuration.
    pub fn config(&self) -> &M3aeConfig {
        self.represent().config()
    }

    /// The weights.
    pub fn params(&self) -> &m3ae_model::ParamStore {
        match self {
            LoadedModel::M3ae(m) => m.params(),
            LoadedModel::Mae(m) => m.params(),
        }
    }
}

/// The model file or folder a `--checkpoint` value stands for: a file as is, a folder holding
/// `model.safetensors` (checkpoint `step-*` or converted folder) as is, a run directory's newest
/// `checkpoints/step-*`, the newest `step-*` directly inside the folder, a folder's official
/// `model.pkl`, or (feature `hub`) a Hugging Face repository id through the local cache (see
/// [`crate::pretrained`]; `HF_HUB_OFFLINE=1` or `m3ae --offline` keep it off the network).
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    Ok(crate::pretrained::resolve(
        path,
        &crate::pretrained::HubOptions::default(),
    )?)
}

/// Loads a model (M3AE or MAE, as the weights say) on the CPU.
pub fn load_model(source: &ModelSource) -> Result<LoadedModel> {
    let dev = Device::Cpu;
    match source {
        ModelSource::RandomInit { preset, seed, mae } => {
            let cfg = M3aeConfig::preset(preset)?;
            Ok(if *mae {
                LoadedModel::Mae(Mae::init(&cfg, *seed, &dev)?)
            } else {
                LoadedModel::M3ae(M3ae::init(&cfg, *seed, &dev)?)
            })
        }
        ModelSource::Checkpoint(p) => {
            let file = resolve_checkpoint(p)?;
            let (cfg, variant, store) = crate::convert::load_native(&file, &dev)?;
            Ok(match variant {
                Variant::M3ae => LoadedModel::M3ae(M3ae::new(&cfg, store)?),
                Variant::Mae => LoadedModel::Mae(Mae::new(&cfg, store)?),
            })
        }
    }
}

/// A stable identity of a model source for feature caches (path, size and modification time of
/// the weights, or the preset and seed).
fn model_identity(source: &ModelSource) -> Result<String> {
    Ok(match source {
        ModelSource::RandomInit { preset, seed, mae } => format!("random:{preset}:{seed}:{mae}"),
        ModelSource::Checkpoint(p) => {
            let r = resolve_checkpoint(p)?;
            let file = if r.is_dir() {
                r.join("model.safetensors")
            } else {
                r.clone()
            };
            let meta = std::fs::metadata(&file).map_err(|e| path_err(&file, e.to_string()))?;
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let canon = std::fs::canonicalize(&file).unwrap_or(file);
            format!("{}:{}:{mtime}", canon.display(), meta.len())
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Data

pub use m3ae_data::spec::{DataOptions, DataSpec, OpenedData};

/// The [`JsonLabel`] rule that labels WebDataset samples by the json field `field` (cut to its
/// first `depth` `/`-separated parts): its classes are the sorted union of the field's values over
/// every WebDataset set among `specs`, so that train and test labels agree (a class seen only in
/// the test set gets an index the probe never trains on, and counts as an error). Other data sets
/// in `specs` are ignored; a note on stderr counts samples without the field.
pub fn json_label(field: &str, depth: Option<usize>, specs: &[&DataSpec]) -> Result<JsonLabel> {
    if depth == Some(0) {
        return Err(arg_err("--label-depth", 0, "must be positive"));
    }
    let mut classes = std::collections::BTreeSet::new();
    let mut any = false;
    for spec in specs {
        if spec.kind() != "wds" {
            continue;
        }
        let shards = spec.arg();
        any = true;
        let (values, missing) = WebDataset::from_spec(shards)?.json_values(field, depth)?;
        if values.is_empty() {
            return Err(arg_err(
                "--label-field",
                field,
                format!("no sample of {spec} has this json field (a string or number)"),
            ));
        }
        if missing > 0 {
            eprintln!(
                "note: {missing} samples of {spec} have no json field `{field}` (unlabelled)"
            );
        }
        classes.extend(values);
    }
    if !any {
        return Err(arg_err(
            "--label-field",
            field,
            "labels webdataset data (wds:<shards>) only, and no data set is one",
        ));
    }
    Ok(JsonLabel::new(field, depth, classes))
}

fn image_config(cfg: &M3aeConfig, norm: Normalization) -> ImageConfig {
    ImageConfig {
        size: cfg.image_size,
        transform: Transform::test(),
        normalization: norm,
    }
}

// ---------------------------------------------------------------------------------------------
// Features

/// Pooled features of a data set with their labels (-1: none) and keys.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    /// `[N, D]` f32.
    pub features: Tensor,
    /// One label per row, -1 when the sample had none.
    pub labels: Vec<i64>,
    /// Sample keys, one per row.
    pub keys: Vec<String>,
    /// Number of classes of the data set (0 when unlabelled).
    pub classes: usize,
    /// The data set, as given on the command line (`--data` value), for messages.
    pub data: String,
    /// Good and bad samples met while reading the data set (`None`: read from a feature file).
    pub stats: Option<BadStats>,
}

impl FeatureSet {
    /// Labels as `u32`, or an error naming `flag` and the data set when a sample has none.
    pub fn labels_u32(&self, flag: &'static str) -> Result<Vec<u32>> {
        self.labels
            .iter()
            .zip(&self.keys)
            .map(|(&l, k)| {
                u32::try_from(l).map_err(|_| {
                    arg_err(
                        flag,
                        &self.data,
                        format!(
                            "sample `{}` has no label (webdataset samples are labelled by a \
                             `.cls` member or by --label-field)",
                            escape_control(k)
                        ),
                    )
                })
            })
            .collect()
    }

    /// `Err(NonFinite)` naming `model` when a feature is NaN or infinite.
    pub fn check_finite(&self, model: &str) -> Result<()> {
        let (n, d) = self.features.dims2()?;
        let v = self.features.flatten_all()?.to_vec1::<f32>()?;
        let count = if d == 0 {
            0
        } else {
            v.chunks_exact(d)
                .filter(|r| r.iter().any(|x| !x.is_finite()))
                .count()
        };
        if count > 0 {
            return Err(Error::NonFinite {
                count,
                total: n,
                data: self.data.clone(),
                model: model.to_string(),
            });
        }
        Ok(())
    }

    /// Writes `features` `[N, D]` f32 and `labels` `[N]` i64 with the keys (JSON list) and the
    /// class count in the metadata, atomically.
    pub fn save(&self, path: &Path, mut metadata: HashMap<String, String>) -> Result<()> {
        let n = self.labels.len();
        let tensors = HashMap::from([
            ("features".to_string(), self.features.clone()),
            (
                "labels".to_string(),
                Tensor::from_vec(self.labels.clone(), n, &Device::Cpu)?,
            ),
        ]);
        metadata.insert(
            "keys".into(),
            serde_json::to_string(&self.keys).unwrap_or_else(|_| "[]".into()),
        );
        metadata.insert("classes".into(), self.classes.to_string());
        Ok(write_safetensors(path, &tensors, metadata)?)
    }

    /// Reads a file written by [`FeatureSet::save`].
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(path_err(path, "no such feature file"));
        }
        let (t, meta) = read_safetensors(path, &Device::Cpu)?;
        let get = |k: &str| {
            t.get(k)
                .cloned()
                .ok_or_else(|| path_err(path, format!("no tensor `{k}`")))
        };
        let features = get("features")?.to_dtype(DType::F32)?;
        let labels = get("labels")?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        let keys: Vec<String> = meta
            .get("keys")
            .and_then(|k| serde_json::from_str(k).ok())
            .unwrap_or_else(|| (0..labels.len()).map(|i| i.to_string()).collect());
        let classes = meta
            .get("classes")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let data = meta
            .get("data")
            .cloned()
            .unwrap_or_else(|| path.display().to_string());
        if features.dims2()?.0 != labels.len() || keys.len() != labels.len() {
            return Err(path_err(
                path,
                format!(
                    "features {:?}, {} labels and {} keys do not agree",
                    features.dims(),
                    labels.len(),
                    keys.len()
                ),
            ));
        }
        Ok(Self {
            features,
            labels,
            keys,
            classes,
            data,
            stats: None,
        })
    }
}

/// Extracts pooled features of every image of `spec` (images only, no masking); `tag` names the
/// set in progress lines. Bad samples are skipped and counted (in [`FeatureSet::stats`]) up to
/// [`DataOptions::max_bad_fraction`]; a data set without any usable sample is an error, and so
/// are NaN or infinite features ([`Error::NonFinite`]; [`extract_cached`] names the model).
pub fn extract(
    model: &dyn Represent,
    spec: &DataSpec,
    opts: &DataOptions,
    tag: Option<&str>,
) -> Result<FeatureSet> {
    let cfg = model.config().clone();
    check_float(
        "--max-bad-fraction",
        opts.max_bad_fraction,
        0.0..=1.0,
        "in [0, 1]",
    )?;
    // refused before the loader allocates a batch buffer of that size
    m3ae_model::resources::check_fits(
        &format!("extracting features in batches of {}", opts.batch_size),
        m3ae_model::resources::inference_bytes(&cfg, opts.batch_size),
        "--batch-size",
    )?;
    let data = spec.open(opts)?;
    let total = data.source.len_hint();
    // images only: captions are not requested, so a caption fault does not make a sample bad
    let mut lc = LoaderConfig::eval(opts.batch_size.max(1), cfg.image_size, cfg.patch_size);
    lc.image = Some(image_config(&cfg, opts.normalization));
    lc.text_len = None;
    lc.max_bad_fraction = opts.max_bad_fraction;
    let loader = Loader::new(data.source.clone(), None, lc)?;
    let mut labels = Vec::new();
    let mut keys = Vec::new();
    let mut failure: Option<m3ae_data::Error> = None;
    let mut batches_seen = 0usize;
    let start = Instant::now();
    let mut it = loader.iter(Default::default());
    let batches = it.by_ref().map_while(|b| match b {
        Ok(b) => {
            labels.extend(b.labels.iter().map(|l| l.unwrap_or(-1)));
            keys.extend(b.keys.iter().cloned());
            b.input.image_patches.map(Ok)
        }
        Err(e) => {
            failure = Some(e);
            None
        }
    });
    let every = opts.progress_every;
    let tag = tag.unwrap_or("features");
    let result = m3ae_eval::features::extract_features(model, batches, opts.pooling, |done| {
        batches_seen += 1;
        if every > 0 && batches_seen.is_multiple_of(every) {
            let of = total.map(|t| format!("/{t}")).unwrap_or_default();
            eprintln!(
                "{tag}: {done}{of} images ({:.1}s)",
                start.elapsed().as_secs_f64()
            );
        }
    });
    if let Some(e) = failure {
        return Err(match e {
            m3ae_data::Error::TooManyBad { stats } => Error::TooManyBad {
                data: spec.to_string(),
                max: opts.max_bad_fraction,
                stats,
            },
            e => e.into(),
        });
    }
    let stats = it.stats();
    let features = match result {
        Ok(f) => f,
        Err(m3ae_eval::Error::Shape(_)) if labels.is_empty() => {
            return Err(arg_err(
                "--data",
                spec,
                format!("no usable sample: {}", escape_control(&stats.to_string())),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let set = FeatureSet {
        features,
        labels,
        keys,
        classes: data.classes,
        data: spec.to_string(),
        stats: Some(stats),
    };
    set.check_finite("the model")?;
    Ok(set)
}

/// `e` with the model named after `source` when it is an [`Error::NonFinite`].
fn name_model(e: Error, source: &ModelSource) -> Error {
    match e {
        Error::NonFinite {
            count, total, data, ..
        } => Error::NonFinite {
            count,
            total,
            data,
            model: source.describe(),
        },
        e => e,
    }
}

/// [`extract`] through a cache: with `cache_dir`, features are read from / written to
/// `cache_dir/feats-<hash>.safetensors`, the hash covering the model identity, data set and
/// options.
pub fn extract_cached(
    model: &LoadedModel,
    source: &ModelSource,
    spec: &DataSpec,
    opts: &DataOptions,
    cache_dir: Option<&Path>,
    tag: &str,
) -> Result<FeatureSet> {
    let extract_named =
        || extract(model.represent(), spec, opts, Some(tag)).map_err(|e| name_model(e, source));
    let Some(dir) = cache_dir else {
        return extract_named();
    };
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        model_identity(source)?,
        spec.to_string(),
        format!("{:?}", opts.label),
        opts.limit,
        format!("{:?}", opts.normalization),
        format!("{:?}", opts.pooling),
        format!("{:?}", opts.json_label),
        opts.max_bad_fraction.to_bits(),
        serde_json::to_string(model.config()).unwrap_or_default(),
    )
        .hash(&mut h);
    // (hashed only when changed, so that the default keeps the cache files it always had)
    if opts.scenes != m3ae_data::ScenesConfig::default() {
        format!("{:?}", opts.scenes).hash(&mut h);
    }
    std::fs::create_dir_all(dir).map_err(|e| path_err(dir, e.to_string()))?;
    let file = dir.join(format!("feats-{:016x}.safetensors", h.finish()));
    if file.is_file() {
        if let Ok(f) = FeatureSet::load(&file) {
            if f.check_finite(&source.describe()).is_ok() {
                eprintln!("{tag}: cached features {}", file.display());
                return Ok(f);
            }
        }
    }
    let f = extract_named()?;
    f.save(
        &file,
        HashMap::from([
            ("data".to_string(), spec.to_string()),
            ("model".to_string(), model_identity(source)?),
        ]),
    )?;
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// Probe, kNN, OOD

/// Accuracies of a probe run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProbeReport {
    /// Top-1 accuracy of the linear probe on the test set.
    pub top1: f64,
    /// Top-k accuracy (k = min(5, classes)).
    pub top5: f64,
    /// k of `top5`.
    pub top5_k: usize,
    /// kNN top-1 accuracy (None when no training features).
    pub knn_top1: Option<f64>,
    /// Seconds spent training the probe.
    pub train_seconds: f64,
    /// Final mean training loss.
    pub final_loss: f64,
}

/// kNN settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnnConfig {
    /// Neighbours.
    pub k: usize,
    /// Vote temperature.
    pub temperature: f64,
}

impl KnnConfig {
    /// `Err` naming `--knn-k` or `--knn-t` unless `k >= 1` and the temperature is finite and
    /// positive.
    pub fn validate(&self) -> Result<()> {
        if self.k == 0 {
            return Err(arg_err("--knn-k", 0, "must be at least 1"));
        }
        check_float("--knn-t", self.temperature, POSITIVE, "> 0").map(|_| ())
    }
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self {
            k: 20,
            temperature: 0.07,
        }
    }
}

/// Top-1 and top-k accuracy of a probe head on labelled features.
pub fn evaluate_head(
    head: &LinearProbeHead,
    test: &FeatureSet,
    classes: usize,
) -> Result<(f64, f64, usize)> {
    let labels = test.labels_u32("--test-data")?;
    let logits = probe_logits(head, &test.features)?;
    let k5 = classes.min(5);
    Ok((
        top_k_accuracy(&logits, classes, &labels, 1)?,
        top_k_accuracy(&logits, classes, &labels, k5)?,
        k5,
    ))
}

/// Number of classes over a train and a test set (metadata and labels).
pub fn class_count(sets: &[&FeatureSet]) -> usize {
    sets.iter()
        .map(|s| {
            let from_labels = s.labels.iter().copied().max().unwrap_or(-1) + 1;
            s.classes.max(from_labels.max(0) as usize)
        })
        .max()
        .unwrap_or(0)
}

/// kNN top-1 accuracy of `test` against `train`.
pub fn knn_accuracy(
    train: &FeatureSet,
    test: &FeatureSet,
    classes: usize,
    knn: KnnConfig,
) -> Result<f64> {
    knn.validate()?;
    let tl = train.labels_u32("--train-data")?;
    let yl = test.labels_u32("--test-data")?;
    // at most every training sample
    let k = knn.k.min(tl.len());
    let scores = m3ae_eval::knn::knn_classify(
        &train.features,
        &tl,
        &test.features,
        classes,
        k,
        knn.temperature,
    )?;
    Ok(top_k_accuracy(&scores, classes, &yl, 1)?)
}

/// `Err` naming the flag (`--lr`, `--weight-decay`, ...) of a probe setting that is not a
/// finite number in its range.
pub fn check_probe_config(cfg: &ProbeConfig) -> Result<()> {
    check_float("--lr", cfg.lr_peak, POSITIVE, "> 0")?;
    check_float("--weight-decay", cfg.weight_decay, 0.0.., ">= 0")?;
    check_float("momentum", cfg.momentum, 0.0..1.0, "in [0, 1)")?;
    check_float("trust_coefficient", cfg.trust_coefficient, 0.0.., ">= 0")?;
    if cfg.epochs == 0 {
        return Err(arg_err("--epochs", 0, "must be at least 1"));
    }
    if cfg.batch_size < 2 {
        return Err(arg_err(
            "--probe-batch",
            cfg.batch_size,
            "must be at least 2 (BatchNorm needs two samples)",
        ));
    }
    Ok(())
}

/// Trains the official probe on `train` and evaluates it (and kNN) on `test`.
pub fn probe_report(
    train: &FeatureSet,
    test: &FeatureSet,
    cfg: &ProbeConfig,
    knn: KnnConfig,
) -> Result<(ProbeReport, LinearProbeHead)> {
    let classes = class_count(&[train, test]);
    if classes < 2 {
        return Err(arg_err(
            "--train-data",
            &train.data,
            format!(
                "has {classes} class(es); a probe needs at least two (label webdataset data \
                 with --label-field)"
            ),
        ));
    }
    check_probe_config(cfg)?;
    knn.validate()?;
    let labels = train.labels_u32("--train-data")?;
    let t0 = Instant::now();
    let (head, hist) = train_probe(&train.features, &labels, classes, cfg)?;
    let train_seconds = t0.elapsed().as_secs_f64();
    let final_loss = hist.last().map(|e| e.loss).unwrap_or(f64::NAN);
    if !final_loss.is_finite() {
        return Err(arg_err(
            "--lr",
            cfg.lr_peak,
            format!("the probe diverged (final training loss {final_loss}): lower it"),
        ));
    }
    let (top1, top5, top5_k) = evaluate_head(&head, test, classes)?;
    let knn_top1 = Some(knn_accuracy(train, test, classes, knn)?);
    Ok((
        ProbeReport {
            top1,
            top5,
            top5_k,
            knn_top1,
            train_seconds,
            final_loss,
        },
        head,
    ))
}

/// Reads a probe head written by `m3ae convert official` (or `m3ae probe --save-probe`):
/// `weight` `[C, D]`, `bias`, `running_mean`, `running_var`.
pub fn load_probe_head(path: &Path) -> Result<LinearProbeHead> {
    if !path.is_file() {
        return Err(path_err(path, "no such probe file"));
    }
    let (t, _) = read_safetensors(path, &Device::Cpu)?;
    let get = |k: &str| -> Result<Tensor> {
        Ok(t.get(k)
            .ok_or_else(|| path_err(path, format!("no tensor `{k}`")))?
            .to_dtype(DType::F32)?)
    };
    LinearProbeHead::new(
        get("weight")?,
        get("bias")?,
        get("running_mean")?,
        get("running_var")?,
    )
    .map_err(|e| path_err(path, e.to_string()))
}

/// Writes a probe head in the `probe.safetensors` layout.
pub fn save_probe_head(head: &LinearProbeHead, path: &Path) -> Result<()> {
    let t = HashMap::from([
        ("weight".to_string(), head.weight.clone()),
        ("bias".to_string(), head.bias.clone()),
        ("running_mean".to_string(), head.running_mean.clone()),
        ("running_var".to_string(), head.running_var.clone()),
    ]);
    Ok(write_safetensors(path, &t, HashMap::new())?)
}

/// One row of the OOD table.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OodRow {
    /// Score name.
    pub score: String,
    /// Its metrics (in-distribution = positive).
    pub metrics: OodMetrics,
}

/// OOD detection with three scores (higher = in-distribution): MSP of a probe trained on
/// `train`, Mahalanobis distance (class means, shared covariance) and kNN similarity to the
/// `k`-th neighbour. Returns the rows and the in-distribution probe accuracy on `inside` when
/// it is labelled.
pub fn ood_report(
    train: &FeatureSet,
    inside: &FeatureSet,
    outside: &FeatureSet,
    cfg: &ProbeConfig,
    knn_k: usize,
) -> Result<(Vec<OodRow>, Option<f64>)> {
    let classes = class_count(&[train]);
    if classes < 2 {
        return Err(arg_err(
            "--train-data",
            &train.data,
            format!(
                "has {classes} class(es); OOD scores need at least two (label webdataset data \
                 with --label-field)"
            ),
        ));
    }
    if knn_k == 0 {
        return Err(arg_err("--knn-k", 0, "must be at least 1"));
    }
    check_probe_config(cfg)?;
    let labels = train.labels_u32("--train-data")?;
    let (head, _) = train_probe(&train.features, &labels, classes, cfg)?;
    let msp = |f: &FeatureSet| -> Result<Vec<f64>> {
        Ok(m3ae_eval::ood::max_softmax(
            &probe_logits(&head, &f.features)?,
            classes,
        )?)
    };
    let maha = m3ae_eval::ood::Mahalanobis::fit(&train.features, &labels, classes, 1e-4)?;
    // at most every training sample
    let k = knn_k.min(labels.len());
    let knn = |f: &FeatureSet| -> Result<Vec<f64>> {
        Ok(m3ae_eval::knn::knn_score(&train.features, &f.features, k)?)
    };
    let rows = vec![
        OodRow {
            score: "msp".into(),
            metrics: ood_metrics(&msp(inside)?, &msp(outside)?)?,
        },
        OodRow {
            score: "mahalanobis".into(),
            metrics: ood_metrics(
                &maha.score(&inside.features)?,
                &maha.score(&outside.features)?,
            )?,
        },
        OodRow {
            score: format!("knn (k={k})"),
            metrics: ood_metrics(&knn(inside)?, &knn(outside)?)?,
        },
    ];
    let acc = if inside
        .labels
        .iter()
        .all(|&l| l >= 0 && (l as usize) < classes)
    {
        Some(evaluate_head(&head, inside, classes)?.0)
    } else {
        None
    };
    Ok((rows, acc))
}

/// The OOD rows as a plain-text table.
pub fn format_ood_table(rows: &[OodRow]) -> String {
    let mut s = format!(
        "{:<14} {:>7} {:>8} {:>9} {:>7}\n",
        "score", "AUROC", "AUPR-in", "AUPR-out", "FPR@95"
    );
    for r in rows {
        let m = r.metrics;
        s.push_str(&format!(
            "{:<14} {:>7.4} {:>8.4} {:>9.4} {:>7.4}\n",
            r.score, m.auroc, m.aupr_in, m.aupr_out, m.fpr95
        ));
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Reconstruction and attention

/// What [`reconstruct`] produced.
#[derive(Debug, Clone)]
pub struct Reconstruction {
    /// Side of one panel in pixels (the model's image size).
    pub size: usize,
    /// Four `[size, size, 3]` u8 panels: original, masked input, prediction, prediction with
    /// the visible patches pasted back.
    pub panels: [Vec<u8>; 4],
    /// `[Li]` 1 = masked patch.
    pub image_mask: Vec<f32>,
    /// Masked (non-padding) text positions: (position, original token, predicted token).
    pub words: Vec<(usize, String, String)>,
    /// The caption with every masked token replaced by its prediction.
    pub predicted_caption: Option<String>,
    /// Attention of the cls token over the image patches `[Li]` (last encoder block, mean over
    /// heads, unmasked input).
    pub patch_attention: Vec<f32>,
    /// Attention of the cls token over the caption's tokens (token, weight).
    pub word_attention: Vec<(String, f32)>,
    /// Mean squared error of the prediction on the masked patches (normalised pixels).
    pub masked_mse: f64,
}

fn uniform_noise(len: usize, seed: u64, purpose: u64) -> Noise {
    use rand::Rng;
    let mut rng = m3ae_data::seed::rng(seed, purpose, 0, 0);
    Noise::Shared((0..len).map(|_| rng.random::<f32>()).collect())
}

fn to_pixels(hwc: &[f32], norm: Normalization) -> Vec<u8> {
    let (mean, std) = norm.mean_std();
    hwc.chunks_exact(3)
        .flat_map(|px| {
            (0..3).map(move |c| {
                ((px[c] * std[c] + mean[c]) * 255.0)
                    .round()
                    .clamp(0.0, 255.0) as u8
            })
        })
        .collect()
}

/// cls-token attention of the last encoder block on the unmasked input (cls, patches, then the
/// text tokens for M3AE): `[1 + Li + T]`, averaged over heads, for the first sample. The model
/// computes it with its own blocks ([`m3ae_model::M3ae::cls_attention`]).
pub fn cls_attention(
    model: &LoadedModel,
    patches: &Tensor,
    text: Option<(&Tensor, &Tensor)>,
) -> Result<Vec<f32>> {
    Ok(match model {
        LoadedModel::M3ae(m) => m.cls_attention(patches, text)?,
        LoadedModel::Mae(m) => m.cls_attention(patches)?,
    })
}

/// Masks an image (and caption) with `seed`, runs the model and assembles the panels, the
/// predicted words and the cls attention. `image` is any RGB image; it is resized to the
/// model's image size with the evaluation transform.
pub fn reconstruct(
    model: &LoadedModel,
    image: &RgbImage,
    caption: Option<(&str, &Tokenizer)>,
    seed: u64,
    norm: Normalization,
) -> Result<Reconstruction> {
    let cfg = model.config().clone();
    let unusable = |msg: String| Error::Unusable {
        model: "the model".into(),
        msg,
    };
    if cfg.image_output_dim() != cfg.patch_dim() {
        return Err(unusable(format!(
            "the image head does not predict pixels (image_output_dim {} != P*P*3 = {})",
            cfg.image_output_dim(),
            cfg.patch_dim()
        )));
    }
    let dev = Device::Cpu;
    let s = cfg.image_size;
    let hwc = image_config(&cfg, norm).apply(image, &mut m3ae_data::seed::rng(seed, 0, 0, 0));
    let img = Tensor::from_vec(hwc.clone(), (1, s, s, 3), &dev)?;
    let patches = m3ae_model::patchify(&img, cfg.patch_size)?;
    let li = patches.dim(1)?;
    let im = Masking::new(&uniform_noise(li, seed, 1), 1, cfg.image_keep(li), &dev)?;
    let mut text = None;
    if let (Some((cap, tok)), LoadedModel::M3ae(_)) = (caption, model) {
        if tok.vocab_size() > cfg.text_vocab_size {
            return Err(unusable(format!(
                "the tokenizer's vocabulary ({} tokens) is larger than the model's ({})",
                tok.vocab_size(),
                cfg.text_vocab_size
            )));
        }
        let t = tok.encode(cap, cfg.text_length)?;
        let len = t.ids.len();
        let ids = Tensor::from_vec(t.ids.clone(), (1, len), &dev)?;
        let padv: Vec<f32> = t.padding.iter().map(|&p| p as f32).collect();
        let pad = Tensor::from_vec(padv, (1, len), &dev)?;
        text = Some((t, ids, pad));
    }
    let (pred, text_logits, text_mask) = match model {
        LoadedModel::Mae(m) => (m.forward(&patches, &im)?.image, None, None),
        LoadedModel::M3ae(m) => {
            let (input, tm) = match &text {
                Some((_, ids, pad)) => {
                    let t = ids.dim(1)?;
                    let tm = Masking::new(&uniform_noise(t, seed, 2), 1, cfg.text_keep(t), &dev)?;
                    (
                        ModelInput {
                            image_patches: Some(patches.clone()),
                            text_ids: Some(ids.clone()),
                            text_padding: Some(pad.clone()),
                        },
                        Some(tm),
                    )
                }
                None => (
                    ModelInput {
                        image_patches: Some(patches.clone()),
                        ..Default::default()
                    },
                    None,
                ),
            };
            let out = m.forward(&input, Some(&im), tm.as_ref())?;
            (out.image, out.text_logits, out.text_mask)
        }
    };
    let pred = pred.ok_or_else(|| unusable("the model returned no image".into()))?;
    let bad = pred
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .filter(|x| !x.is_finite())
        .count();
    if bad > 0 {
        return Err(unusable(format!(
            "{bad} of {} predicted pixel values are not finite (NaN or infinite): the \
             checkpoint's weights are broken",
            pred.elem_count()
        )));
    }
    let mask = im.mask.flatten_all()?.to_vec1::<f32>()?;
    let m3 = im.mask.unsqueeze(2)?; // [1, Li, 1]
    let grey = Tensor::zeros_like(&patches)?; // normalised 0 = the mean colour
    let masked_in = (patches.broadcast_mul(&(1.0 - &m3)?)? + grey.broadcast_mul(&m3)?)?;
    let pasted = (patches.broadcast_mul(&(1.0 - &m3)?)? + pred.broadcast_mul(&m3)?)?;
    let diff = (&pred - &patches)?
        .sqr()?
        .mean(2)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let masked_n = mask.iter().sum::<f32>().max(1.0);
    let masked_mse = diff
        .iter()
        .zip(&mask)
        .map(|(d, m)| (d * m) as f64)
        .sum::<f64>()
        / masked_n as f64;
    let to_img = |p: &Tensor| -> Result<Vec<u8>> {
        let hwc = m3ae_model::unpatchify(p, cfg.patch_size, 3)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(to_pixels(&hwc, norm))
    };
    let panels = [
        to_pixels(&hwc, norm),
        to_img(&masked_in)?,
        to_img(&pred)?,
        to_img(&pasted)?,
    ];
    let mut words = Vec::new();
    let mut predicted_caption = None;
    let mut word_attention = Vec::new();
    let attn_text = text.as_ref().map(|(_, ids, pad)| (ids, pad));
    let attention = cls_attention(model, &patches, attn_text)?;
    let patch_attention = attention[1..1 + li].to_vec();
    if let (Some((t, _, _)), Some((_, tok))) = (&text, caption) {
        for (j, (&id, &p)) in t.ids.iter().zip(&t.padding).enumerate() {
            if p == 0 {
                let w = attention.get(1 + li + j).copied().unwrap_or(0.0);
                word_attention.push((tok.decode(&[id])?, w));
            }
        }
        if let (Some(logits), Some(tm)) = (&text_logits, &text_mask) {
            let v = logits.dim(D::Minus1)?;
            let pred_ids: Vec<u32> =
                m3ae_eval::metrics::argmax_rows(&logits.flatten_all()?.to_vec1::<f32>()?, v)?
                    .into_iter()
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        unusable(
                            "the predicted word scores are not finite (NaN or infinite): the \
                             checkpoint's weights are broken"
                                .into(),
                        )
                    })?;
            let tmask = tm.flatten_all()?.to_vec1::<f32>()?;
            let mut filled = Vec::new();
            for (j, (&id, &p)) in t.ids.iter().zip(&t.padding).enumerate() {
                if p != 0 {
                    continue;
                }
                if tmask[j] > 0.5 {
                    let name = |i: u32| -> Result<String> {
                        let w = tok.decode(&[i])?;
                        Ok(if w.is_empty() { format!("[id {i}]") } else { w })
                    };
                    words.push((j, name(id)?, name(pred_ids[j])?));
                    filled.push(pred_ids[j]);
                } else {
                    filled.push(id);
                }
            }
            predicted_caption = Some(tok.decode(&filled)?);
        }
    }
    Ok(Reconstruction {
        size: s,
        panels,
        image_mask: mask,
        words,
        predicted_caption,
        patch_attention,
        word_attention,
        masked_mse,
    })
}

fn write_png(path: &Path, width: usize, height: usize, data: Vec<u8>) -> Result<()> {
    let img = image::RgbImage::from_raw(width as u32, height as u32, data)
        .ok_or_else(|| path_err(path, "image buffer has the wrong size"))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(path_err(dir, "output directory does not exist"));
    }
    let name = path
        .file_name()
        .ok_or_else(|| path_err(path, "no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| path_err(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| path_err(path, e.to_string()))?;
    Ok(())
}

fn upscale(src: &[u8], size: usize, scale: usize) -> Vec<u8> {
    let out = size * scale;
    let mut v = Vec::with_capacity(out * out * 3);
    for y in 0..out {
        for x in 0..out {
            let i = ((y / scale) * size + x / scale) * 3;
            v.extend_from_slice(&src[i..i + 3]);
        }
    }
    v
}

/// Panel magnification so that a panel is at least 128 pixels wide.
pub fn panel_scale(size: usize) -> usize {
    (128 / size.max(1)).max(1)
}

/// Writes the four panels side by side (4 px white gaps), magnified by [`panel_scale`].
pub fn write_reconstruction_png(r: &Reconstruction, path: &Path) -> Result<(usize, usize)> {
    let scale = panel_scale(r.size);
    let side = r.size * scale;
    let gap = 4;
    let w = 4 * side + 3 * gap;
    let mut data = vec![255u8; w * side * 3];
    for (k, panel) in r.panels.iter().enumerate() {
        let big = upscale(panel, r.size, scale);
        let x0 = k * (side + gap);
        for y in 0..side {
            let dst = (y * w + x0) * 3;
            data[dst..dst + side * 3].copy_from_slice(&big[y * side * 3..(y + 1) * side * 3]);
        }
    }
    write_png(path, w, side, data)?;
    Ok((w, side))
}

/// Writes the cls attention over patches as a red overlay on the original image and, below it,
/// a strip with one cell per caption token (brighter = more attention).
pub fn write_attention_png(r: &Reconstruction, path: &Path) -> Result<(usize, usize)> {
    let scale = panel_scale(r.size);
    let side = r.size * scale;
    let g = (r.patch_attention.len() as f64).sqrt().round() as usize;
    let patch_px = r.size / g.max(1);
    let all_max = r
        .patch_attention
        .iter()
        .chain(r.word_attention.iter().map(|(_, w)| w))
        .fold(0f32, |a, &b| a.max(b))
        .max(1e-12);
    let base = upscale(&r.panels[0], r.size, scale);
    let strip = if r.word_attention.is_empty() { 0 } else { 16 };
    let mut data = vec![255u8; side * (side + strip) * 3];
    for y in 0..side {
        for x in 0..side {
            let (py, px) = (y / scale / patch_px.max(1), x / scale / patch_px.max(1));
            let a = r
                .patch_attention
                .get(py.min(g - 1) * g + px.min(g - 1))
                .copied()
                .unwrap_or(0.0)
                / all_max;
            let i = (y * side + x) * 3;
            let grey = (base[i] as f32 + base[i + 1] as f32 + base[i + 2] as f32) / 3.0 * 0.5;
            data[i] = ((grey * (1.0 - a)) + 255.0 * a).min(255.0) as u8;
            data[i + 1] = (grey * (1.0 - a)) as u8;
            data[i + 2] = (grey * (1.0 - a)) as u8;
        }
    }
    if strip > 0 {
        let n = r.word_attention.len();
        for x in 0..side {
            let j = (x * n / side).min(n - 1);
            let v = (r.word_attention[j].1 / all_max * 255.0).clamp(0.0, 255.0) as u8;
            let border = n > 1 && (x * n) % side < n;
            for y in side + 2..side + strip {
                let i = (y * side + x) * 3;
                let c = if border { 255 } else { v };
                data[i] = c;
                data[i + 1] = if border { 255 } else { 0 };
                data[i + 2] = if border { 255 } else { 0 };
            }
        }
    }
    write_png(path, side, side + strip, data)?;
    Ok((side, side + strip))
}

/// Reads an image file (JPEG, PNG, WebP) to RGB; errors name the file.
pub fn read_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| path_err(path, e.to_string()))?;
    m3ae_data::decode_rgb(&bytes).map_err(|e| path_err(path, e))
}

/// The tokenizer for a checkpoint: `explicit` (a `tokenizer.json`, a folder holding one or, with
/// the `hub` feature, a Hugging Face repository id such as `bert-base-uncased`), else a
/// `tokenizer.json` next to the (resolved) checkpoint, in its parent or in the run directory two
/// levels up.
pub fn find_tokenizer(explicit: Option<&Path>, checkpoint: Option<&Path>) -> Result<Tokenizer> {
    Ok(find_tokenizer_and_source(explicit, checkpoint)?.0)
}

/// [`find_tokenizer`], with where the tokenizer came from (the `--tokenizer` value, or the
/// `tokenizer.json` found near the checkpoint) for messages.
pub fn find_tokenizer_and_source(
    explicit: Option<&Path>,
    checkpoint: Option<&Path>,
) -> Result<(Tokenizer, String)> {
    if let Some(p) = explicit {
        let name = p.to_str().unwrap_or_default();
        if !p.exists() && !m3ae_data::hub::is_repo_id(name) {
            return Err(path_err(p, "no such tokenizer file"));
        }
        let tok = Tokenizer::from_pretrained(name, &m3ae_data::HubOptions::default())?;
        return Ok((tok, p.display().to_string()));
    }
    let mut tried = Vec::new();
    if let Some(c) = checkpoint {
        let start = if c.is_file() { c.parent() } else { Some(c) };
        let mut dir = start.map(Path::to_path_buf);
        for _ in 0..3 {
            let Some(d) = dir else { break };
            let f = d.join("tokenizer.json");
            if f.is_file() {
                return Ok((Tokenizer::from_file(&f)?, f.display().to_string()));
            }
            tried.push(f.display().to_string());
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    Err(flag_err(
        "--tokenizer",
        format!(
            "a caption needs a tokenizer: pass --tokenizer (looked for {})",
            if tried.is_empty() {
                "none: no checkpoint".into()
            } else {
                tried.join(", ")
            }
        ),
    ))
}

// ---------------------------------------------------------------------------------------------
// Command line

/// Which model to evaluate.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A checkpoint directory `step-*`, a run directory (newest `checkpoints/step-*`), a
    /// `model.safetensors`, a converted folder, an official `model.pkl`, or (feature `hub`) a
    /// Hugging Face repository id `org/name` (from the local cache; see `--offline`).
    #[arg(
        long,
        value_name = "PATH|REPO",
        required_unless_present = "random_init"
    )]
    pub checkpoint: Option<PathBuf>,
    /// Evaluate a randomly initialised `--preset` instead (the baseline).
    #[arg(long, conflicts_with = "checkpoint")]
    pub random_init: bool,
    /// Preset of `--random-init`.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Initialisation seed of `--random-init`.
    #[arg(long, default_value_t = 0)]
    pub init_seed: u64,
    /// `--random-init` of the image-only MAE instead of M3AE.
    #[arg(long)]
    pub mae: bool,
}

impl ModelArgs {
    /// The model source these flags name.
    pub fn source(&self) -> ModelSource {
        match &self.checkpoint {
            Some(p) => ModelSource::Checkpoint(p.clone()),
            None => ModelSource::RandomInit {
                preset: self.preset.clone(),
                seed: self.init_seed,
                mae: self.mae,
            },
        }
    }
}

/// Label of the captioned scenes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelArg {
    /// Shape of the main object.
    Shape,
    /// Colour of the main object.
    Colour,
    /// Shape and colour.
    Both,
}

/// Pixel normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NormArg {
    /// CC12M mean / std (the pretraining default).
    Cc12m,
    /// ImageNet mean / std.
    Imagenet,
    /// Pixels in [0, 1].
    None,
}

/// Pooling of the encoder output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PoolArg {
    /// The cls token (official default).
    Cls,
    /// Mean of the patch tokens.
    Mean,
}

/// How data is read.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Label of `scenes` data.
    #[arg(long, value_enum, default_value = "shape")]
    pub label: LabelArg,
    /// Use at most N images of each data set (evenly strided).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Use at most N training images (overrides `--limit` for the training set).
    #[arg(long, value_name = "N")]
    pub train_limit: Option<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Pixel normalisation.
    #[arg(long, value_enum, default_value = "cc12m")]
    pub normalization: NormArg,
    /// Feature pooling.
    #[arg(long, value_enum, default_value = "cls")]
    pub pool: PoolArg,
    /// Progress line on stderr every N batches (0: none).
    #[arg(long, default_value_t = 20)]
    pub progress_every: usize,
    /// Label WebDataset (`wds:`) samples by this field of their `.json` member (e.g.
    /// `category`); the classes are the sorted values found over all the command's sets.
    #[arg(long, value_name = "FIELD")]
    pub label_field: Option<String>,
    /// With `--label-field`: keep the first N `/`-separated parts of the value (1:
    /// `animals/birds` -> `animals`).
    #[arg(long, value_name = "N", requires = "label_field")]
    pub label_depth: Option<usize>,
    /// Largest tolerated fraction of bad samples (undecodable, truncated or missing image) in
    /// [0, 1]: they are skipped and counted (summary on stderr); above it the command stops.
    #[arg(long, value_name = "F", default_value_t = 0.1)]
    pub max_bad_fraction: f64,
}

impl DataArgs {
    /// Options for an evaluation set (`train`: the training set, which `--train-limit` caps).
    pub fn options(&self, train: bool) -> Result<DataOptions> {
        if self.batch_size == 0 {
            return Err(arg_err("--batch-size", 0, "must be positive"));
        }
        let limit = if train {
            self.train_limit.or(self.limit)
        } else {
            self.limit
        };
        if limit == Some(0) {
            let flag = if train && self.train_limit.is_some() {
                "--train-limit"
            } else {
                "--limit"
            };
            return Err(arg_err(flag, 0, "must be positive"));
        }
        check_float(
            "--max-bad-fraction",
            self.max_bad_fraction,
            0.0..=1.0,
            "in [0, 1]",
        )?;
        Ok(DataOptions {
            label: match self.label {
                LabelArg::Shape => LabelKind::Shape,
                LabelArg::Colour => LabelKind::Colour,
                LabelArg::Both => LabelKind::Both,
            },
            limit,
            batch_size: self.batch_size,
            normalization: norm_of(self.normalization),
            pooling: match self.pool {
                PoolArg::Cls => Pooling::Cls,
                PoolArg::Mean => Pooling::Mean,
            },
            progress_every: self.progress_every,
            json_label: None,
            max_bad_fraction: self.max_bad_fraction,
            scenes: Default::default(),
        })
    }

    /// The `--label-field` rule over the command's data sets (see [`json_label`]).
    pub fn json_label(&self, specs: &[&DataSpec]) -> Result<Option<JsonLabel>> {
        self.label_field
            .as_deref()
            .map(|f| json_label(f, self.label_depth, specs))
            .transpose()
    }

    /// [`DataArgs::options`] with the `--label-field` rule set.
    pub fn labelled(&self, train: bool, json_label: &Option<JsonLabel>) -> Result<DataOptions> {
        Ok(DataOptions {
            json_label: json_label.clone(),
            ..self.options(train)?
        })
    }
}

fn norm_of(n: NormArg) -> Normalization {
    match n {
        NormArg::Cc12m => Normalization::Cc12m,
        NormArg::Imagenet => Normalization::Imagenet,
        NormArg::None => Normalization::None,
    }
}

/// Probe training flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// Probe epochs over the cached features (official: 90).
    #[arg(long, default_value_t = 90)]
    pub epochs: usize,
    /// Probe batch size (the learning rate is scaled by batch / 256).
    #[arg(long, default_value_t = 256)]
    pub probe_batch: usize,
    /// Peak learning rate before scaling (official README: 0.1).
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// Warmup epochs.
    #[arg(long, default_value_t = 3)]
    pub warmup_epochs: usize,
    /// LARS weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Seed of the head initialisation and shuffling.
    #[arg(long, default_value_t = 1)]
    pub probe_seed: u64,
}

impl ProbeArgs {
    /// The probe configuration.
    /// Every flag is checked ([`check_probe_config`]): an error names the first bad one.
    pub fn config(&self) -> Result<ProbeConfig> {
        let cfg = ProbeConfig {
            epochs: self.epochs,
            batch_size: self.probe_batch,
            lr_peak: self.lr,
            warmup_epochs: self.warmup_epochs.min(self.epochs.saturating_sub(1)),
            weight_decay: self.weight_decay,
            seed: self.probe_seed,
            ..Default::default()
        };
        check_probe_config(&cfg)?;
        Ok(cfg)
    }
}

/// `m3ae embed`.
#[derive(Debug, Clone, clap::Args)]
pub struct EmbedCommand {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    /// The data set (`u8:<file>`, `scenes[:split[:N]]`, `folder:<dir>`, `wds:<shards>`).
    #[arg(long)]
    pub data: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub opts: DataArgs,
    /// Output safetensors (`features` `[N, D]`, `labels` `[N]`, keys in the metadata).
    #[arg(long)]
    pub out: PathBuf,
}

/// `m3ae probe`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeCommand {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    /// Training data (`u8:<file>`, `scenes[:split[:N]]`, `folder:<dir>`, `wds:<shards>`;
    /// required unless `--evaluate`).
    #[arg(long, required_unless_present = "evaluate")]
    pub train_data: Option<String>,
    /// Test data.
    #[arg(long)]
    pub test_data: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub opts: DataArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub probe: ProbeArgs,
    /// Cache extracted features here.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Evaluate this probe head (`probe.safetensors`) instead of training one.
    #[arg(long)]
    pub evaluate: Option<PathBuf>,
    /// Write the trained head (`probe.safetensors` layout).
    #[arg(long)]
    pub save_probe: Option<PathBuf>,
    /// Neighbours of the kNN classifier.
    #[arg(long, default_value_t = 20)]
    pub knn_k: usize,
    /// Vote temperature of the kNN classifier.
    #[arg(long, default_value_t = 0.07)]
    pub knn_t: f64,
}

/// `m3ae ood`.
#[derive(Debug, Clone, clap::Args)]
pub struct OodCommand {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    /// In-distribution training data (probe, class means, kNN bank).
    #[arg(long)]
    pub train_data: String,
    /// In-distribution test data.
    #[arg(long)]
    pub in_data: String,
    /// Out-of-distribution test data.
    #[arg(long)]
    pub out_data: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub opts: DataArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub probe: ProbeArgs,
    /// Cache extracted features here.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// k of the kNN-distance score.
    #[arg(long, default_value_t = 20)]
    pub knn_k: usize,
}

/// `m3ae reconstruct`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconstructCommand {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    /// The image (JPEG, PNG, WebP).
    #[arg(long)]
    pub image: PathBuf,
    /// The caption (M3AE only).
    #[arg(long)]
    pub caption: Option<String>,
    /// Tokenizer file, folder or (feature `hub`) Hugging Face repository id (default:
    /// `tokenizer.json` of the run directory or next to the checkpoint).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Output PNG: original | masked input | prediction | prediction with visible patches.
    #[arg(long)]
    pub out: PathBuf,
    /// Attention overlay PNG (default: `<out>` with `-attention` before the extension).
    #[arg(long)]
    pub attention_out: Option<PathBuf>,
    /// Seed of the masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Pixel normalisation.
    #[arg(long, value_enum, default_value = "cc12m")]
    pub normalization: NormArg,
}

/// The evaluation subcommands (flattened into the `m3ae` CLI).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum EvalCommand {
    /// Write pooled image features, labels and keys of a data set to safetensors.
    Embed(Box<EmbedCommand>),
    /// Linear probe (official recipe) and kNN accuracy of a model's features.
    Probe(Box<ProbeCommand>),
    /// OOD detection: MSP, Mahalanobis and kNN scores with AUROC / AUPR / FPR@95.
    Ood(Box<OodCommand>),
    /// Reconstruction PNG, predicted masked words and the cls attention overlay.
    Reconstruct(Box<ReconstructCommand>),
}

fn print_model(model: &LoadedModel, src: &ModelSource) {
    let cfg = model.config();
    let kind = match model {
        LoadedModel::M3ae(_) => "M3AE",
        LoadedModel::Mae(_) => "MAE",
    };
    let what = match src {
        ModelSource::Checkpoint(p) => resolve_checkpoint(p)
            .map(|r| r.display().to_string())
            .unwrap_or_else(|_| p.display().to_string()),
        ModelSource::RandomInit { preset, seed, .. } => {
            format!("random init, preset {preset}, seed {seed}")
        }
    };
    println!(
        "model: {kind} ({what}): dim {}, depth {}, image {} px, patch {}",
        cfg.emb_dim, cfg.depth, cfg.image_size, cfg.patch_size
    );
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

/// The bad-sample summary of each data set read: one line per set on stderr,
/// `<command>: <data> (<role>): <counts per reason>` (nothing for features read from a cache).
fn print_bad_summary(command: &str, sets: &[(&str, &FeatureSet)]) {
    for (role, f) in sets {
        if let Some(stats) = &f.stats {
            let role = if role.is_empty() {
                String::new()
            } else {
                format!(" ({role})")
            };
            eprintln!(
                "{command}: {}{role}: {}",
                escape_control(&f.data),
                escape_control(&stats.to_string())
            );
        }
    }
}

/// Runs an evaluation subcommand, printing its results on stdout (progress, notes and the
/// per-data-set bad-sample summary on stderr). Every flag is checked before the model loads.
pub fn run_cli(cmd: EvalCommand) -> anyhow::Result<()> {
    match cmd {
        EvalCommand::Embed(c) => {
            let spec: DataSpec = c.data.parse()?;
            c.opts.options(false)?;
            let opts = c.opts.labelled(false, &c.opts.json_label(&[&spec])?)?;
            let src = c.model.source();
            let model = load_model(&src)?;
            print_model(&model, &src);
            let t0 = Instant::now();
            let f = extract_cached(&model, &src, &spec, &opts, None, "embed")?;
            f.save(
                &c.out,
                HashMap::from([
                    ("data".to_string(), spec.to_string()),
                    ("model".to_string(), model_identity(&src)?),
                    ("pooling".to_string(), format!("{:?}", opts.pooling)),
                ]),
            )?;
            let (n, d) = f.features.dims2()?;
            println!(
                "wrote {}: {n} x {d} features ({:.1}s)",
                c.out.display(),
                t0.elapsed().as_secs_f64()
            );
            print_bad_summary("embed", &[("", &f)]);
        }
        EvalCommand::Probe(c) => {
            let test_spec: DataSpec = c.test_data.parse()?;
            let train_spec: Option<DataSpec> =
                c.train_data.as_deref().map(str::parse).transpose()?;
            let knn = KnnConfig {
                k: c.knn_k,
                temperature: c.knn_t,
            };
            knn.validate()?;
            let cfg = c.probe.config()?;
            c.opts.options(true)?;
            c.opts.options(false)?;
            let head_file = match &c.evaluate {
                Some(p) => Some(load_probe_head(p)?),
                None => None,
            };
            let jl = c.opts.json_label(
                &[&test_spec]
                    .into_iter()
                    .chain(&train_spec)
                    .collect::<Vec<_>>(),
            )?;
            let src = c.model.source();
            let model = load_model(&src)?;
            print_model(&model, &src);
            let cache = c.cache_dir.as_deref();
            let t0 = Instant::now();
            let test = extract_cached(
                &model,
                &src,
                &test_spec,
                &c.opts.labelled(false, &jl)?,
                cache,
                "test",
            )?;
            let train = match &train_spec {
                Some(s) => Some(extract_cached(
                    &model,
                    &src,
                    s,
                    &c.opts.labelled(true, &jl)?,
                    cache,
                    "train",
                )?),
                None => None,
            };
            println!(
                "features: train {}, test {} ({:.1}s)",
                train.as_ref().map(|t| t.labels.len()).unwrap_or(0),
                test.labels.len(),
                t0.elapsed().as_secs_f64()
            );
            if let Some(head) = head_file {
                let classes = head.weight.dims2()?.0;
                let (t1, t5, k) = evaluate_head(&head, &test, classes)?;
                println!("probe (evaluated): top-1 {} top-{k} {}", pct(t1), pct(t5));
                if let Some(train) = &train {
                    let classes = class_count(&[train, &test]);
                    let a = knn_accuracy(train, &test, classes, knn)?;
                    println!("knn (k={}, T={}): top-1 {}", knn.k, knn.temperature, pct(a));
                }
            } else if let Some(train) = &train {
                let (r, head) = probe_report(train, &test, &cfg, knn)?;
                println!(
                    "probe: top-1 {} top-{} {} ({} epochs, {:.1}s, final loss {:.4})",
                    pct(r.top1),
                    r.top5_k,
                    pct(r.top5),
                    cfg.epochs,
                    r.train_seconds,
                    r.final_loss
                );
                if let Some(a) = r.knn_top1 {
                    println!("knn (k={}, T={}): top-1 {}", knn.k, knn.temperature, pct(a));
                }
                if let Some(p) = &c.save_probe {
                    save_probe_head(&head, p)?;
                    println!("wrote {}", p.display());
                }
            }
            println!("total: {:.1}s", t0.elapsed().as_secs_f64());
            let mut sets: Vec<(&str, &FeatureSet)> = train.iter().map(|t| ("train", t)).collect();
            sets.push(("test", &test));
            print_bad_summary("probe", &sets);
        }
        EvalCommand::Ood(c) => {
            let train_spec: DataSpec = c.train_data.parse()?;
            let in_spec: DataSpec = c.in_data.parse()?;
            let out_spec: DataSpec = c.out_data.parse()?;
            if c.knn_k == 0 {
                return Err(arg_err("--knn-k", 0, "must be at least 1").into());
            }
            let cfg = c.probe.config()?;
            c.opts.options(true)?;
            c.opts.options(false)?;
            let jl = c.opts.json_label(&[&train_spec, &in_spec, &out_spec])?;
            let src = c.model.source();
            let model = load_model(&src)?;
            print_model(&model, &src);
            let cache = c.cache_dir.as_deref();
            let t0 = Instant::now();
            let eval_opts = c.opts.labelled(false, &jl)?;
            let train = extract_cached(
                &model,
                &src,
                &train_spec,
                &c.opts.labelled(true, &jl)?,
                cache,
                "train",
            )?;
            let inside = extract_cached(&model, &src, &in_spec, &eval_opts, cache, "in")?;
            let outside = extract_cached(&model, &src, &out_spec, &eval_opts, cache, "out")?;
            println!(
                "features: train {}, in {}, out {} ({:.1}s)",
                train.labels.len(),
                inside.labels.len(),
                outside.labels.len(),
                t0.elapsed().as_secs_f64()
            );
            let (rows, acc) = ood_report(&train, &inside, &outside, &cfg, c.knn_k)?;
            if let Some(a) = acc {
                println!("in-distribution probe top-1: {}", pct(a));
            }
            print!("{}", format_ood_table(&rows));
            println!("total: {:.1}s", t0.elapsed().as_secs_f64());
            print_bad_summary(
                "ood",
                &[("train", &train), ("in", &inside), ("out", &outside)],
            );
        }
        EvalCommand::Reconstruct(c) => {
            let img = read_image(&c.image)?;
            let src = c.model.source();
            let model = load_model(&src)?;
            print_model(&model, &src);
            let tok = match (&c.caption, &model) {
                (Some(_), LoadedModel::M3ae(_)) => {
                    let resolved = match &c.model.checkpoint {
                        Some(p) => Some(resolve_checkpoint(p)?),
                        None => None,
                    };
                    let (tok, from) =
                        find_tokenizer_and_source(c.tokenizer.as_deref(), resolved.as_deref())?;
                    let vocab = model.config().text_vocab_size;
                    if tok.vocab_size() > vocab {
                        return Err(arg_err(
                            "--tokenizer",
                            from,
                            format!(
                                "its vocabulary ({} tokens) is larger than the model's ({vocab})",
                                tok.vocab_size()
                            ),
                        )
                        .into());
                    }
                    Some(tok)
                }
                (Some(_), LoadedModel::Mae(_)) => {
                    eprintln!("note: an image-only MAE ignores the caption");
                    None
                }
                _ => None,
            };
            let caption = match (&c.caption, &tok) {
                (Some(cap), Some(t)) => Some((cap.as_str(), t)),
                _ => None,
            };
            let r = reconstruct(&model, &img, caption, c.seed, norm_of(c.normalization)).map_err(
                |e| match e {
                    Error::Unusable { msg, .. } => Error::Unusable {
                        model: src.describe(),
                        msg,
                    },
                    e => e,
                },
            )?;
            let (w, h) = write_reconstruction_png(&r, &c.out)?;
            println!(
                "wrote {} ({w}x{h}: original | masked | prediction | prediction + visible)",
                c.out.display()
            );
            println!(
                "masked patches: {} of {}, masked-patch MSE {:.4}",
                r.image_mask.iter().filter(|&&m| m > 0.5).count(),
                r.image_mask.len(),
                r.masked_mse
            );
            if let Some(p) = &r.predicted_caption {
                for (j, orig, pred) in &r.words {
                    println!("masked word {j}: {orig:?} -> predicted {pred:?}");
                }
                println!("predicted caption: {p}");
            }
            let att = c.attention_out.clone().unwrap_or_else(|| {
                let stem = c
                    .out
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_else(|| "recon".into());
                c.out.with_file_name(format!("{stem}-attention.png"))
            });
            let (w, h) = write_attention_png(&r, &att)?;
            println!(
                "wrote {} ({w}x{h}: cls attention over patches)",
                att.display()
            );
            if !r.word_attention.is_empty() {
                let words: Vec<String> = r
                    .word_attention
                    .iter()
                    .map(|(w, a)| format!("{w}:{a:.3}"))
                    .collect();
                println!("cls attention over words: {}", words.join(" "));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use m3ae_model::TraceLayers;

    #[test]
    fn traced_encoder_matches_the_model_and_attention_sums_to_one() -> anyhow::Result<()> {
        {
            let model = load_model(&ModelSource::RandomInit {
                preset: "tiny".into(),
                seed: 5,
                mae: false,
            })?;
            let cfg = model.config().clone();
            let patches = Tensor::randn(
                0f32,
                1.0,
                (2, cfg.num_patches(), cfg.patch_dim()),
                &Device::Cpu,
            )?;
            let LoadedModel::M3ae(m) = &model else {
                unreachable!("a random M3AE")
            };
            let input = ModelInput {
                image_patches: Some(patches.clone()),
                ..Default::default()
            };
            let trace = m.forward_representation_traced(&input, &TraceLayers::All)?;
            assert_eq!(trace.attention.len(), cfg.depth);
            let want = model.represent().represent(&patches)?;
            let err = (trace.representation - want)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(err < 1e-4, "{err}");
        }
        // the attention comes from a traced pass of the model's own blocks
        let model = load_model(&ModelSource::RandomInit {
            preset: "tiny".into(),
            seed: 3,
            mae: false,
        })?;
        let cfg = model.config().clone();
        let dev = Device::Cpu;
        let patches = Tensor::randn(0f32, 1.0, (1, cfg.num_patches(), cfg.patch_dim()), &dev)?;
        let a = cls_attention(&model, &patches, None)?;
        assert_eq!(a.len(), 1 + cfg.num_patches());
        assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        let t = 5;
        let ids = Tensor::new(&[[3u32, 7, 9, 0, 0]], &dev)?;
        let pad = Tensor::new(&[[0f32, 0., 0., 1., 1.]], &dev)?;
        let a = cls_attention(&model, &patches, Some((&ids, &pad)))?;
        assert_eq!(a.len(), 1 + cfg.num_patches() + t);
        assert!(a[a.len() - 1] < 1e-6 && a[a.len() - 2] < 1e-6);
        assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        Ok(())
    }
}
