//! Where a model comes from ([`ModelSource`]): a checkpoint by name (a checkpoint directory
//! `step-*`, a run directory, a `model.safetensors`, a converted folder, an official `model.pkl`
//! or, with the `hub` feature, a Hugging Face repository id; resolved by
//! [`m3ae_official::pretrained::resolve`]), or a randomly initialised preset (the baseline every
//! probe number should be read against). Loaded, either is an [`AnyModel`].
//!
//! Also what lives next to a checkpoint: its tokenizer ([`find_tokenizer`]), and images read
//! for evaluation ([`read_image`]).
//!
//! ```
//! use m3ae_eval::ModelSource;
//! let source = ModelSource::RandomInit { preset: "tiny".into(), seed: 0, mae: true };
//! assert_eq!(source.describe(), "random-init MAE preset tiny (seed 0)");
//! let model = source.load(&candle_core::Device::Cpu)?;
//! assert!(!model.is_m3ae());
//! # Ok::<(), m3ae_eval::Error>(())
//! ```

use crate::error::{Error, Result};
use candle_core::Device;
use m3ae_data::{HubOptions, RgbImage, Tokenizer};
use m3ae_model::{AnyModel, M3aeConfig, Variant};
use std::path::{Path, PathBuf};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A checkpoint directory, run directory, `model.safetensors`, converted folder, official
    /// `model.pkl` or (feature `hub`) Hugging Face repository id.
    Checkpoint(PathBuf),
    /// A freshly initialised preset.
    RandomInit {
        /// Preset name (`tiny`, `small`, ...), or a configuration file: a model config (JSON or
        /// TOML) or a pre-training config whose `[model]` table is used (a run's
        /// `config.toml`), for the baseline of exactly a trained model's architecture.
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

    /// The model file or folder of a checkpoint source (see [`resolve_checkpoint`]); `None` for
    /// a random init.
    pub fn resolve(&self, hub: &HubOptions) -> Result<Option<PathBuf>> {
        match self {
            ModelSource::Checkpoint(p) => Ok(Some(m3ae_official::pretrained::resolve(p, hub)?)),
            ModelSource::RandomInit { .. } => Ok(None),
        }
    }

    /// Loads the model (M3AE or MAE, as the weights say) on `device` (weights read to the host,
    /// then copied).
    pub fn load(&self, device: &Device) -> Result<AnyModel> {
        let resolved = self.resolve(&HubOptions::default())?;
        self.load_resolved(resolved.as_deref(), device)
    }

    /// Loads the model on `device`, with `resolved` the file or folder [`ModelSource::resolve`]
    /// gave (ignored for a random init).
    pub fn load_resolved(&self, resolved: Option<&Path>, device: &Device) -> Result<AnyModel> {
        match (self, resolved) {
            (ModelSource::RandomInit { preset, seed, mae }, _) => {
                let cfg = random_init_config(preset)?;
                let variant = if *mae { Variant::Mae } else { Variant::M3ae };
                Ok(AnyModel::init(variant, &cfg, *seed, device)?)
            }
            (ModelSource::Checkpoint(_), Some(file)) => {
                let (cfg, variant, store) = m3ae_official::load_native(file, device)?;
                Ok(AnyModel::new(variant, &cfg, store)?)
            }
            (ModelSource::Checkpoint(p), None) => Err(Error::path(p, "not resolved")),
        }
    }

    /// A stable identity of the model for feature caches: path, size and modification time of
    /// the weights `resolved` (see [`ModelSource::resolve`]), or the preset and seed.
    pub fn identity(&self, resolved: Option<&Path>) -> Result<String> {
        Ok(match (self, resolved) {
            (ModelSource::RandomInit { preset, seed, mae }, _) => {
                // a config file is identified by what it says, not by its name
                let arch = if Path::new(preset).is_file() {
                    serde_json::to_string(&random_init_config(preset)?)?
                } else {
                    preset.clone()
                };
                format!("random:{arch}:{seed}:{mae}")
            }
            (ModelSource::Checkpoint(p), None) => return Err(Error::path(p, "not resolved")),
            (ModelSource::Checkpoint(_), Some(r)) => {
                let file = if r.is_dir() {
                    r.join("model.safetensors")
                } else {
                    r.to_path_buf()
                };
                let meta =
                    std::fs::metadata(&file).map_err(|e| Error::path(&file, e.to_string()))?;
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
}

/// The configuration of a random init: a preset name, or a file holding a model config (JSON or
/// TOML) or a pre-training config (TOML with a `[model]` table).
pub fn random_init_config(preset: &str) -> Result<M3aeConfig> {
    let path = Path::new(preset);
    if !path.is_file() {
        return Ok(M3aeConfig::preset(preset)?);
    }
    if path.extension().is_some_and(|e| e == "toml") {
        let text = std::fs::read_to_string(path).map_err(|e| Error::path(path, e.to_string()))?;
        let value: toml::Value =
            toml::from_str(&text).map_err(|e| Error::path(path, e.to_string()))?;
        if let Some(model) = value.get("model") {
            let cfg: M3aeConfig = model
                .clone()
                .try_into()
                .map_err(|e| Error::path(path, format!("[model]: {e}")))?;
            return Ok(cfg.resolved());
        }
    }
    Ok(M3aeConfig::from_file(path)?.resolved())
}

/// The model file or folder a `--checkpoint` value stands for: a file as is, a folder holding
/// `model.safetensors` (checkpoint `step-*` or converted folder) as is, a run directory's newest
/// `checkpoints/step-*`, the newest `step-*` directly inside the folder, a folder's official
/// `model.pkl`, or (feature `hub`) a Hugging Face repository id through the local cache (see
/// [`m3ae_official::pretrained`]; `HF_HUB_OFFLINE=1` or `m3ae --offline` keep it off the
/// network).
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    Ok(m3ae_official::pretrained::resolve(
        path,
        &HubOptions::default(),
    )?)
}

/// Loads a model (M3AE or MAE, as the weights say) on `device` (see [`ModelSource::load`]).
pub fn load_model(source: &ModelSource, device: &Device) -> Result<AnyModel> {
    source.load(device)
}

/// Reads an image file (JPEG, PNG, WebP) to RGB; errors name the file.
pub fn read_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::path(path, e.to_string()))?;
    m3ae_data::decode_rgb(&bytes).map_err(|e| Error::path(path, e))
}

/// The tokenizer for a checkpoint: `explicit` (a `tokenizer.json`, a folder holding one or, with
/// the `hub` feature, a Hugging Face repository id such as `bert-base-uncased`), else a
/// `tokenizer.json` next to the (resolved) checkpoint, in its parent or in the run directory two
/// levels up.
pub fn find_tokenizer(explicit: Option<&Path>, checkpoint: Option<&Path>) -> Result<Tokenizer> {
    Ok(find_tokenizer_and_source(explicit, checkpoint, &HubOptions::default())?.0)
}

/// [`find_tokenizer`] through `hub`, with where the tokenizer came from (the `--tokenizer`
/// value, or the `tokenizer.json` found near the checkpoint) for messages.
pub fn find_tokenizer_and_source(
    explicit: Option<&Path>,
    checkpoint: Option<&Path>,
    hub: &HubOptions,
) -> Result<(Tokenizer, String)> {
    if let Some(p) = explicit {
        let name = p.to_str().unwrap_or_default();
        if !p.exists() && !m3ae_data::hub::is_repo_id(name) {
            return Err(Error::path(p, "no such tokenizer file"));
        }
        let tok = Tokenizer::from_pretrained(name, hub)?;
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
    Err(Error::flag(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_checkpoints_images_and_tokenizers_are_named() {
        let e = ModelSource::Checkpoint("/no/such/run".into())
            .load(&Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/no/such/run: "), "{e}");
        let e = read_image(Path::new("/no/such/image.png"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/no/such/image.png: "), "{e}");
        let e = find_tokenizer(Some(Path::new("/no/such/tok.json")), None)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "/no/such/tok.json: no such tokenizer file");
        let e = find_tokenizer(None, None).unwrap_err().to_string();
        assert_eq!(
            e,
            "--tokenizer: a caption needs a tokenizer: pass --tokenizer (looked for none: no \
             checkpoint)"
        );
    }

    #[test]
    fn random_inits_have_stable_identities() -> Result<()> {
        let s = ModelSource::RandomInit {
            preset: "tiny".into(),
            seed: 3,
            mae: false,
        };
        assert_eq!(s.identity(None)?, "random:tiny:3:false");
        assert_eq!(s.resolve(&HubOptions::offline())?, None);
        assert!(s.load(&Device::Cpu)?.is_m3ae());
        Ok(())
    }
}
