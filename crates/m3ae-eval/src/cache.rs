//! The feature cache of `m3ae probe | ood --cache-dir`: features of a model on a data set are
//! extracted once and read back from `<dir>/feats-<hash>.safetensors`, the hash covering the
//! model's identity (its weights' path, size and modification time, or the random-init preset
//! and seed), the data set and every option that changes the features.

use crate::error::{Error, Result};
use crate::features::{extract, DataOptions, DataSpec, FeatureSet};
use crate::source::ModelSource;
use m3ae_data::HubOptions;
use m3ae_model::AnyModel;
use std::collections::HashMap;
use std::path::Path;

/// `e` with the model named `model` when it is an [`Error::NonFinite`].
fn name_model(e: Error, model: &str) -> Error {
    match e {
        Error::NonFinite {
            count, total, data, ..
        } => Error::NonFinite {
            count,
            total,
            data,
            model: model.to_string(),
        },
        e => e,
    }
}

/// [`extract`] through a cache: with `cache_dir`, features are read from / written to
/// `cache_dir/feats-<hash>.safetensors`, the hash covering the model identity, data set and
/// options. `source` names the model in errors and gives its identity.
pub fn extract_cached(
    model: &AnyModel,
    source: &ModelSource,
    spec: &DataSpec,
    opts: &DataOptions,
    cache_dir: Option<&Path>,
    tag: &str,
) -> Result<FeatureSet> {
    extract_cached_as(
        model,
        &source.describe(),
        || source.identity(source.resolve(&HubOptions::default())?.as_deref()),
        spec,
        opts,
        cache_dir,
        tag,
    )
}

/// [`extract_cached`] for a model named `name` in errors, whose cache identity `identity` gives
/// (asked only when there is a cache).
pub fn extract_cached_as(
    model: &AnyModel,
    name: &str,
    identity: impl FnOnce() -> Result<String>,
    spec: &DataSpec,
    opts: &DataOptions,
    cache_dir: Option<&Path>,
    tag: &str,
) -> Result<FeatureSet> {
    let extract_named = || extract(model, spec, opts, Some(tag)).map_err(|e| name_model(e, name));
    let Some(dir) = cache_dir else {
        return extract_named();
    };
    let identity = identity()?;
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        identity.clone(),
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
    std::fs::create_dir_all(dir).map_err(|e| Error::path(dir, e.to_string()))?;
    let file = dir.join(format!("feats-{:016x}.safetensors", h.finish()));
    if file.is_file() {
        if let Ok(f) = FeatureSet::load(&file) {
            if f.check_finite(name).is_ok() {
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
            ("model".to_string(), identity),
        ]),
    )?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_extraction_reads_the_cache() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("m3ae-eval-cache-{}", std::process::id()));
        let source = ModelSource::RandomInit {
            preset: "tiny".into(),
            seed: 0,
            mae: true,
        };
        let model = source.load(&candle_core::Device::Cpu)?;
        let spec: DataSpec = "scenes:test:8".parse()?;
        let opts = DataOptions::default();
        let a = extract_cached(&model, &source, &spec, &opts, Some(&dir), "t")?;
        assert!(a.stats.is_some());
        let b = extract_cached(&model, &source, &spec, &opts, Some(&dir), "t")?;
        // read from the file: no reading statistics, the same features
        assert!(b.stats.is_none());
        let diff = (a.features - b.features)?.abs()?.max_all()?;
        assert_eq!(diff.to_scalar::<f32>()?, 0.0);
        assert_eq!(std::fs::read_dir(&dir)?.count(), 1);
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
