//! Pooled image features of a data set: the one extraction path of evaluation (`m3ae embed |
//! probe | ood`, the pre-training run's final probe, the examples and the [`Pipeline`]).
//!
//! The images of a [`DataSpec`] go through the evaluation transform of the data crate (bicubic
//! resize to the model's image size, centre crop, normalisation), then the model's unmasked
//! encoder, images only, pooled (cls or mean) into a [`FeatureSet`] with the labels and keys.
//! Samples whose image cannot be used are skipped and counted up to
//! [`DataOptions::max_bad_fraction`]; NaN or infinite features are an error naming the model.
//!
//! ```
//! use m3ae_eval::{extract, DataOptions, DataSpec};
//! use m3ae_model::{AnyModel, M3aeConfig, Variant};
//! let cfg = M3aeConfig::preset("tiny")?;
//! let model = AnyModel::init(Variant::M3ae, &cfg, 0, &candle_core::Device::Cpu)?;
//! let spec: DataSpec = "scenes:train:16".parse()?;
//! let feats = extract(&model, &spec, &DataOptions::default(), None)?;
//! assert_eq!(feats.features.dims(), &[16, cfg.emb_dim]);
//! assert_eq!(feats.labels.len(), 16);
//! # Ok::<(), m3ae_eval::Error>(())
//! ```
//!
//! [`Pipeline`]: crate::Pipeline

use crate::error::{check_float, escape_control, Error, Result};
use candle_core::{DType, Device, Tensor};
use m3ae_data::{
    BadStats, ImageConfig, JsonLabel, Loader, LoaderConfig, Normalization, Transform, WebDataset,
};
use m3ae_model::params::{read_safetensors, write_safetensors};
use m3ae_model::{pool, M3aeConfig, Pooling, Represent};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

pub use m3ae_data::spec::{DataOptions, DataSpec, OpenedData};

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
                    Error::arg(
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
            return Err(Error::path(path, "no such feature file"));
        }
        let (t, meta) = read_safetensors(path, &Device::Cpu)?;
        let get = |k: &str| {
            t.get(k)
                .cloned()
                .ok_or_else(|| Error::path(path, format!("no tensor `{k}`")))
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
            return Err(Error::path(
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

/// The evaluation image transform of a model: resize to its image size, centre crop,
/// `normalization`.
pub fn eval_image_config(cfg: &M3aeConfig, normalization: Normalization) -> ImageConfig {
    ImageConfig {
        size: cfg.image_size,
        transform: Transform::test(),
        normalization,
        augment: Default::default(),
    }
}

/// The [`JsonLabel`] rule that labels WebDataset samples by the json field `field` (cut to its
/// first `depth` `/`-separated parts): its classes are the sorted union of the field's values over
/// every WebDataset set among `specs`, so that train and test labels agree (a class seen only in
/// the test set gets an index the probe never trains on, and counts as an error). Other data sets
/// in `specs` are ignored; a note on stderr counts samples without the field.
pub fn json_label(field: &str, depth: Option<usize>, specs: &[&DataSpec]) -> Result<JsonLabel> {
    if depth == Some(0) {
        return Err(Error::arg("--label-depth", 0, "must be positive"));
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
            return Err(Error::arg(
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
        return Err(Error::arg(
            "--label-field",
            field,
            "labels webdataset data (wds:<shards>) only, and no data set is one",
        ));
    }
    Ok(JsonLabel::new(field, depth, classes))
}

/// How [`extract_with`] reads, beyond the [`DataOptions`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExtractSettings<'a> {
    /// Names the set in progress lines (default `features`).
    pub tag: Option<&'a str>,
    /// Decoding threads of the loader (0: its default).
    pub num_threads: usize,
    /// Whether NaN or infinite features are an error ([`Error::NonFinite`]).
    pub require_finite: bool,
}

/// Extracts pooled features of every image of `spec` (images only, no masking); `tag` names the
/// set in progress lines. Bad samples are skipped and counted (in [`FeatureSet::stats`]) up to
/// [`DataOptions::max_bad_fraction`]; a data set without any usable sample is an error, and so
/// are NaN or infinite features ([`Error::NonFinite`]; [`crate::extract_cached`] names the
/// model).
pub fn extract(
    model: &dyn Represent,
    spec: &DataSpec,
    opts: &DataOptions,
    tag: Option<&str>,
) -> Result<FeatureSet> {
    extract_with(
        model,
        spec,
        opts,
        &ExtractSettings {
            tag,
            require_finite: true,
            ..Default::default()
        },
    )
}

/// [`extract`] with the loader's threads and the finiteness check chosen by `settings`.
pub fn extract_with(
    model: &dyn Represent,
    spec: &DataSpec,
    opts: &DataOptions,
    settings: &ExtractSettings,
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
    lc.image = Some(eval_image_config(&cfg, opts.normalization));
    lc.text_len = None;
    lc.max_bad_fraction = opts.max_bad_fraction;
    lc.num_threads = settings.num_threads;
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
    let tag = settings.tag.unwrap_or("features");
    let result = extract_features(model, batches, opts.pooling, |done| {
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
        Err(Error::Shape(_)) if labels.is_empty() => {
            return Err(Error::arg(
                "--data",
                spec,
                format!("no usable sample: {}", escape_control(&stats.to_string())),
            ))
        }
        Err(e) => return Err(e),
    };
    let set = FeatureSet {
        features,
        labels,
        keys,
        classes: data.classes,
        data: spec.to_string(),
        stats: Some(stats),
    };
    if settings.require_finite {
        set.check_finite("the model")?;
    }
    Ok(set)
}

/// Pooled features `[N, D]` of an iterator of `[B, Li, P*P*3]` patch batches (the inner loop of
/// [`extract_with`] and of the [`Pipeline`](crate::Pipeline)'s embeddings); `on_batch(done)` is
/// called after each batch (for progress reporting). No batch at all is an [`Error::Shape`].
/// The batches may be on the host: the model moves them to its device. The features are
/// returned on the host (where the probe, kNN, OOD scores and the cache use them).
pub fn extract_features<I>(
    model: &dyn Represent,
    batches: I,
    pooling: Pooling,
    mut on_batch: impl FnMut(usize),
) -> Result<Tensor>
where
    I: IntoIterator<Item = Result<Tensor>>,
{
    let mut parts = Vec::new();
    let mut done = 0;
    for b in batches {
        let b = b?;
        done += b.dim(0)?;
        parts.push(pool(&model.represent(&b)?, pooling)?.detach());
        on_batch(done);
    }
    if parts.is_empty() {
        return Err(Error::Shape("no batches to extract features from".into()));
    }
    Ok(m3ae_model::device::to_host(
        &Tensor::cat(&parts, 0)?.contiguous()?,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use m3ae_model::{AnyModel, Mae, Variant};

    #[test]
    fn features_have_one_row_per_image() -> anyhow::Result<()> {
        let cfg = M3aeConfig::preset("tiny")?;
        let model = Mae::init(&cfg, 0, &Device::Cpu)?;
        let batch = || {
            Tensor::zeros(
                (3, cfg.num_patches(), cfg.patch_dim()),
                DType::F32,
                &Device::Cpu,
            )
        };
        let mut seen = vec![];
        let f = extract_features(
            &model,
            vec![Ok(batch()?), Ok(batch()?)],
            Pooling::Mean,
            |n| seen.push(n),
        )?;
        assert_eq!(f.dims(), &[6, cfg.emb_dim]);
        assert_eq!(seen, vec![3, 6]);
        Ok(())
    }

    #[test]
    fn feature_sets_round_trip_and_broken_models_are_named() -> anyhow::Result<()> {
        let cfg = M3aeConfig::preset("tiny")?;
        let model = AnyModel::init(Variant::Mae, &cfg, 1, &Device::Cpu)?;
        let spec: DataSpec = "scenes:test:10".parse()?;
        let opts = DataOptions {
            batch_size: 4,
            ..Default::default()
        };
        let f = extract(&model, &spec, &opts, Some("t"))?;
        assert_eq!(f.features.dims(), &[10, cfg.emb_dim]);
        assert_eq!(f.stats.as_ref().map(|s| s.good), Some(10));
        let dir = std::env::temp_dir().join(format!("m3ae-eval-feats-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join("f.safetensors");
        f.save(&p, HashMap::new())?;
        let back = FeatureSet::load(&p)?;
        assert_eq!((back.labels, back.keys), (f.labels.clone(), f.keys.clone()));
        assert_eq!(back.data, p.display().to_string());
        let diff = (back.features - &f.features)?.abs()?.max_all()?;
        assert_eq!(diff.to_scalar::<f32>()?, 0.0);
        // NaN features: an error counting the rows and naming the model
        let mut nan = f.clone();
        nan.features = (f.features.ones_like()? * f64::NAN)?;
        let e = nan.check_finite("model-x").unwrap_err().to_string();
        assert!(e.starts_with("10 of 10 samples of scenes:test:10"), "{e}");
        assert!(e.contains("model-x"), "{e}");
        // unlabelled samples are refused by name where labels are needed
        nan.labels[3] = -1;
        let e = nan.labels_u32("--test-data").unwrap_err().to_string();
        assert!(
            e.starts_with("--test-data \"scenes:test:10\": sample `"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
