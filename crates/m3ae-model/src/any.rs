//! [`AnyModel`]: either model (multimodal M3AE or image-only MAE) behind one type, for code that
//! takes whichever a checkpoint holds (evaluation, export, inspection), with native safetensors
//! load and save.
//!
//! ```
//! use m3ae_model::{AnyModel, M3aeConfig, Variant};
//! use candle_core::{DType, Device, Tensor};
//! let dev = Device::Cpu;
//! let cfg = M3aeConfig::preset("tiny")?;
//! let model = AnyModel::init(Variant::Mae, &cfg, 0, &dev)?;
//! assert_eq!(model.variant(), Variant::Mae);
//! assert!(!model.is_m3ae());
//! let patches = Tensor::zeros((2, cfg.num_patches(), cfg.patch_dim()), DType::F32, &dev)?;
//! let repr = model.as_represent().represent(&patches)?;
//! assert_eq!(repr.dims(), &[2, 1 + cfg.num_patches(), cfg.emb_dim]);
//! let attention = model.cls_attention(&patches, None)?;
//! assert_eq!(attention.len(), 1 + cfg.num_patches());
//! assert!((attention.iter().sum::<f32>() - 1.0).abs() < 1e-4);
//! # Ok::<(), m3ae_model::Error>(())
//! ```

use crate::attention::{AttentionTrace, TraceLayers};
use crate::config::M3aeConfig;
use crate::model::{M3ae, Mae, ModelInput, Represent};
use crate::params::{param_specs, read_safetensors, ParamSpec, ParamStore, Unexpected, Variant};
use crate::stochastic::Stochastic;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The safetensors metadata key that holds the model config as JSON.
pub const CONFIG_METADATA_KEY: &str = "m3ae_config";

/// The weight only the multimodal model has; its presence tells the variant of native weights.
const TEXT_WEIGHT: &str = "text_embedding.weight";

/// Either model.
#[derive(Debug, Clone)]
pub enum AnyModel {
    /// The multimodal masked autoencoder.
    M3ae(M3ae),
    /// The image-only masked autoencoder.
    Mae(Mae),
}

impl From<M3ae> for AnyModel {
    fn from(m: M3ae) -> Self {
        AnyModel::M3ae(m)
    }
}

impl From<Mae> for AnyModel {
    fn from(m: Mae) -> Self {
        AnyModel::Mae(m)
    }
}

impl AnyModel {
    /// Builds the `variant` model from `params` (see [`M3ae::new`]).
    pub fn new(variant: Variant, cfg: &M3aeConfig, params: ParamStore) -> Result<Self> {
        Ok(match variant {
            Variant::M3ae => AnyModel::M3ae(M3ae::new(cfg, params)?),
            Variant::Mae => AnyModel::Mae(Mae::new(cfg, params)?),
        })
    }

    /// A freshly initialised `variant` model drawn from `seed` (see [`M3ae::init`]).
    pub fn init(variant: Variant, cfg: &M3aeConfig, seed: u64, device: &Device) -> Result<Self> {
        Ok(match variant {
            Variant::M3ae => AnyModel::M3ae(M3ae::init(cfg, seed, device)?),
            Variant::Mae => AnyModel::Mae(Mae::init(cfg, seed, device)?),
        })
    }

    /// Builds the model from native-named tensors; the variant is M3AE when they hold the text
    /// embedding, MAE otherwise. Every weight is checked by name and shape; `source` names the
    /// origin in errors.
    pub fn from_native(
        cfg: &M3aeConfig,
        tensors: HashMap<String, Tensor>,
        unexpected: Unexpected,
        source: &str,
        device: &Device,
    ) -> Result<Self> {
        let variant = if tensors.contains_key(TEXT_WEIGHT) {
            Variant::M3ae
        } else {
            Variant::Mae
        };
        let store = ParamStore::from_tensors(
            &param_specs(cfg, variant),
            tensors,
            unexpected,
            source,
            device,
        )?;
        Self::new(variant, cfg, store)
    }

    /// Loads a native checkpoint: a `model.safetensors` file (config in its `m3ae_config`
    /// metadata), or a folder holding one (its `config.json`, when present, is the config). The
    /// weights must be exactly the model's.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("model.safetensors")
        } else {
            path.to_path_buf()
        };
        let (tensors, meta) = read_safetensors(&file, device)?;
        let config_json = path.join("config.json");
        let cfg = if path.is_dir() && config_json.is_file() {
            M3aeConfig::from_file(&config_json)?
        } else {
            let parse = |msg: String| Error::Parse {
                path: file.clone(),
                msg,
            };
            let text = meta.get(CONFIG_METADATA_KEY).ok_or_else(|| {
                parse(format!(
                    "no `{CONFIG_METADATA_KEY}` in the safetensors metadata"
                ))
            })?;
            serde_json::from_str(text).map_err(|e| parse(format!("{CONFIG_METADATA_KEY}: {e}")))?
        };
        Self::from_native(
            &cfg,
            tensors,
            Unexpected::Error,
            &file.display().to_string(),
            device,
        )
    }

    /// Writes the weights to a `model.safetensors` file at `path` (atomically) with the config
    /// in its `m3ae_config` metadata, which [`AnyModel::load`] reads back.
    pub fn save(&self, path: &Path) -> Result<()> {
        let cfg = serde_json::to_string(self.config()).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            msg: format!("{CONFIG_METADATA_KEY}: {e}"),
        })?;
        self.params().save(
            path,
            HashMap::from([(CONFIG_METADATA_KEY.to_string(), cfg)]),
        )
    }

    /// Which model this is.
    pub fn variant(&self) -> Variant {
        match self {
            AnyModel::M3ae(_) => Variant::M3ae,
            AnyModel::Mae(_) => Variant::Mae,
        }
    }

    /// True for the multimodal model.
    pub fn is_m3ae(&self) -> bool {
        matches!(self, AnyModel::M3ae(_))
    }

    /// The multimodal model, if this is one.
    pub fn as_m3ae(&self) -> Option<&M3ae> {
        match self {
            AnyModel::M3ae(m) => Some(m),
            AnyModel::Mae(_) => None,
        }
    }

    /// The image-only model, if this is one.
    pub fn as_mae(&self) -> Option<&Mae> {
        match self {
            AnyModel::Mae(m) => Some(m),
            AnyModel::M3ae(_) => None,
        }
    }

    /// The resolved configuration.
    pub fn config(&self) -> &M3aeConfig {
        match self {
            AnyModel::M3ae(m) => m.config(),
            AnyModel::Mae(m) => m.config(),
        }
    }

    /// The trainable weights.
    pub fn params(&self) -> &ParamStore {
        match self {
            AnyModel::M3ae(m) => m.params(),
            AnyModel::Mae(m) => m.params(),
        }
    }

    /// Every weight of this model.
    pub fn specs(&self) -> Vec<ParamSpec> {
        param_specs(self.config(), self.variant())
    }

    /// The model as a feature extractor.
    pub fn as_represent(&self) -> &dyn Represent {
        match self {
            AnyModel::M3ae(m) => m,
            AnyModel::Mae(m) => m,
        }
    }

    /// The unmasked representation `[B, 1+N, D]` after the encoder's final LayerNorm, in
    /// training mode when `stochastic` is given (see [`M3ae::forward_representation_with`] and
    /// [`Mae::forward_representation_with`]); `None` is the deterministic representation. Text
    /// in `input` is an error for MAE.
    pub fn forward_representation_with(
        &self,
        input: &ModelInput,
        stochastic: Option<&Stochastic>,
    ) -> Result<Tensor> {
        match self {
            AnyModel::M3ae(m) => m.forward_representation_with(input, stochastic),
            AnyModel::Mae(m) => {
                if input.text_ids.is_some() {
                    return Err(Error::Shape("the MAE model takes no text".into()));
                }
                let patches = input
                    .image_patches
                    .as_ref()
                    .ok_or_else(|| Error::Shape("the input has no image".into()))?;
                m.forward_representation_with(patches, stochastic)
            }
        }
    }

    /// The unmasked representation with the attention of the blocks `layers` names (see
    /// [`M3ae::forward_representation_traced`]). Text in `input` is an error for MAE.
    pub fn forward_representation_traced(
        &self,
        input: &ModelInput,
        layers: &TraceLayers,
    ) -> Result<AttentionTrace> {
        match self {
            AnyModel::M3ae(m) => m.forward_representation_traced(input, layers),
            AnyModel::Mae(m) => {
                if input.text_ids.is_some() {
                    return Err(Error::Shape("the MAE model takes no text".into()));
                }
                let patches = input
                    .image_patches
                    .as_ref()
                    .ok_or_else(|| Error::Shape("the input has no image".into()))?;
                m.forward_representation_traced(patches, layers)
            }
        }
    }

    /// cls-token attention of the last encoder block, averaged over heads, for the first sample
    /// (see [`M3ae::cls_attention`]); `text` (ids, padding) is used by M3AE and ignored by MAE.
    pub fn cls_attention(
        &self,
        image_patches: &Tensor,
        text: Option<(&Tensor, &Tensor)>,
    ) -> Result<Vec<f32>> {
        match self {
            AnyModel::M3ae(m) => m.cls_attention(image_patches, text),
            AnyModel::Mae(m) => m.cls_attention(image_patches),
        }
    }
}

impl Represent for AnyModel {
    fn represent(&self, image_patches: &Tensor) -> Result<Tensor> {
        self.as_represent().represent(image_patches)
    }
    fn config(&self) -> &M3aeConfig {
        AnyModel::config(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
    }

    #[test]
    fn each_variant_reports_itself_and_matches_its_model() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = M3aeConfig::preset("tiny")?;
        for variant in [Variant::M3ae, Variant::Mae] {
            let any = AnyModel::init(variant, &cfg, 4, &dev)?;
            assert_eq!(any.variant(), variant);
            assert_eq!(any.is_m3ae(), variant == Variant::M3ae);
            assert_eq!(any.as_m3ae().is_some(), any.is_m3ae());
            assert_eq!(any.as_mae().is_some(), !any.is_m3ae());
            assert_eq!(any.params().len(), any.specs().len());
            assert_eq!(any.config(), &cfg.resolved());
            let patches = m3ae_kernels::testing::tensor(
                &[2, cfg.num_patches(), cfg.patch_dim()],
                12,
                1.0,
                &dev,
            )?;
            let want = match variant {
                Variant::M3ae => M3ae::init(&cfg, 4, &dev)?.represent(&patches)?,
                Variant::Mae => Mae::init(&cfg, 4, &dev)?.represent(&patches)?,
            };
            assert_eq!(max_diff(&any.represent(&patches)?, &want)?, 0.0);
            assert_eq!(
                max_diff(&any.as_represent().represent(&patches)?, &want)?,
                0.0
            );
        }
        Ok(())
    }

    #[test]
    fn saves_and_loads_native_checkpoints_of_both_variants() -> Result<()> {
        let dev = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("m3ae-any-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
            path: dir.clone(),
            error: e,
        })?;
        let mut cfg = M3aeConfig::preset("tiny")?;
        cfg.use_type_embedding = false;
        for variant in [Variant::M3ae, Variant::Mae] {
            let any = AnyModel::init(variant, &cfg, 9, &dev)?;
            let path = dir.join("model.safetensors");
            any.save(&path)?;
            for p in [path.clone(), dir.clone()] {
                let back = AnyModel::load(&p, &dev)?;
                assert_eq!(back.variant(), variant);
                assert_eq!(back.config(), any.config());
                for (name, v) in any.params().vars() {
                    assert_eq!(max_diff(v.as_tensor(), &back.params().get(name)?)?, 0.0);
                }
            }
        }
        // a file without the config metadata is an error naming the file and the key
        let bare = dir.join("bare.safetensors");
        crate::params::write_safetensors(
            &bare,
            &HashMap::from([("x".to_string(), Tensor::zeros(2, DType::F32, &dev)?)]),
            HashMap::new(),
        )?;
        let e = AnyModel::load(&bare, &dev).unwrap_err().to_string();
        assert!(
            e.contains("bare.safetensors") && e.contains("m3ae_config"),
            "{e}"
        );
        // an extra weight is rejected by name
        let any = AnyModel::init(Variant::Mae, &cfg, 9, &dev)?;
        let mut t = any.params().tensors();
        t.insert("extra".into(), Tensor::zeros(1, DType::F32, &dev)?);
        let e = AnyModel::from_native(&cfg, t, Unexpected::Error, "test", &dev).unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
