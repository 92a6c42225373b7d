//! The fine-tuning classifier: the official `ViTClassifier` (`finetune_main`).
//!
//! `patches -> image-only encoder, unmasked (forward_representation) -> pool -> LayerNorm ->
//! Dense(num_classes)`. The encoder is the image path of a pre-trained M3AE or MAE (cls token,
//! patch embedding, fixed 2-D sin-cos position embedding, optional learned image type
//! embedding, the encoder blocks and the encoder's final LayerNorm); the decoder is not part of
//! the classifier and is never needed. Pooling ([`Pooling`]): the cls token output
//! (`global_pool=False`, default) or the mean of the patch tokens (`global_pool=True`), both
//! **after** the encoder's final LayerNorm (the official code; MAE-PyTorch differs). The head
//! is an affine LayerNorm (eps 1e-6) and a dense layer, initialised as Flax does (scale 1,
//! biases 0, kernel `lecun_normal`).
//!
//! Weights keep the base model's native names (`cls_token`, `image_embedding.*`,
//! `encoder.*`), the head is `head.norm.*` / `head.fc.*`. Official names are the Flax paths of
//! the classifier's tree without the `params.` collection: `base_model.encoder.Block_0.…`,
//! `LayerNorm_0.scale`, `Dense_0.kernel` (what [`crate::layer_decay`] reads).
//!
//! ```
//! use m3ae_model::{AnyModel, Classifier, ClassifierConfig, M3aeConfig, Pooling, Variant};
//! use candle_core::{DType, Device, Tensor};
//! let dev = Device::Cpu;
//! let cfg = M3aeConfig::preset("tiny")?;
//! let base = AnyModel::init(Variant::M3ae, &cfg, 0, &dev)?;
//! let clf = Classifier::from_base(&base, ClassifierConfig { num_classes: 10, pooling: Pooling::Mean }, 1)?;
//! let patches = Tensor::zeros((2, cfg.num_patches(), cfg.patch_dim()), DType::F32, &dev)?;
//! assert_eq!(clf.forward(&patches)?.dims(), &[2, 10]);
//! assert_eq!(clf.features(&patches)?.dims(), &[2, cfg.emb_dim]);
//! // the text weights and the decoder are dropped
//! assert!(clf.params().vars().all(|(n, _)| !n.starts_with("text") && !n.starts_with("decoder")));
//! # Ok::<(), m3ae_model::Error>(())
//! ```

use crate::any::{AnyModel, CONFIG_METADATA_KEY};
use crate::config::M3aeConfig;
use crate::layer_decay::{layer_decay_table, LayerDecayRule, LayerScale};
use crate::layers::{Dense, LayerNorm, Transformer};
use crate::model::{pool, Pooling, Represent};
use crate::params::{
    param_specs, read_safetensors, Init, ParamSpec, ParamStore, Unexpected, Variant,
};
use crate::posemb::sincos_2d;
use crate::stochastic::{site, DropRates, Stochastic};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The safetensors metadata key that holds the [`ClassifierConfig`] as JSON (next to the model
/// config under [`CONFIG_METADATA_KEY`]).
pub const CLASSIFIER_METADATA_KEY: &str = "m3ae_classifier";

/// The classifier's own settings (the encoder's are an [`M3aeConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// Number of classes (outputs of the head).
    pub num_classes: usize,
    /// How the encoder output is pooled (`"cls"`, default, or `"mean"` = official
    /// `global_pool`).
    #[serde(default)]
    pub pooling: Pooling,
}

impl ClassifierConfig {
    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if self.num_classes == 0 {
            return Err(Error::Config {
                field: "num_classes",
                msg: "must be > 0".into(),
            });
        }
        Ok(())
    }
}

/// Whether a native weight of the base model belongs to the image encoder.
fn is_encoder_weight(name: &str) -> bool {
    name == "cls_token" || name.starts_with("image_embedding.") || name.starts_with("encoder.")
}

/// Every weight of the classifier for the encoder `model_cfg` and the head `cfg`: the image
/// encoder's weights of the base model (native names unchanged, official names under
/// `base_model.`), then the head.
pub fn classifier_specs(model_cfg: &M3aeConfig, cfg: &ClassifierConfig) -> Vec<ParamSpec> {
    let d = model_cfg.resolved().emb_dim;
    let mut specs: Vec<ParamSpec> = param_specs(model_cfg, Variant::Mae)
        .into_iter()
        .filter(|s| is_encoder_weight(&s.name))
        .map(|mut s| {
            s.official = format!("base_model.{}", s.official);
            s
        })
        .collect();
    let spec = |name: &str, shape: Vec<usize>, init, official: &str, transposed| ParamSpec {
        name: name.into(),
        shape,
        init,
        official: official.into(),
        transposed,
    };
    specs.push(spec(
        "head.norm.weight",
        vec![d],
        Init::Ones,
        "LayerNorm_0.scale",
        false,
    ));
    specs.push(spec(
        "head.norm.bias",
        vec![d],
        Init::Zeros,
        "LayerNorm_0.bias",
        false,
    ));
    specs.push(spec(
        "head.fc.weight",
        vec![cfg.num_classes, d],
        Init::LecunNormal { fan_in: d },
        "Dense_0.kernel",
        true,
    ));
    specs.push(spec(
        "head.fc.bias",
        vec![cfg.num_classes],
        Init::Zeros,
        "Dense_0.bias",
        false,
    ));
    specs
}

/// The image-only encoder, unmasked: `[cls, patch embedding + 2-D sin-cos + type]` through the
/// blocks and the final LayerNorm (the computation of `Mae::forward_representation`).
#[derive(Debug, Clone)]
struct ImageEncoder {
    cls: Tensor,
    image_embedding: Dense,
    image_type: Option<Tensor>,
    encoder: Transformer,
    emb_dim: usize,
    patch_dim: usize,
}

impl ImageEncoder {
    fn new(cfg: &M3aeConfig, p: &ParamStore) -> Result<Self> {
        let kp = cfg.kernels;
        Ok(Self {
            cls: p.get("cls_token")?,
            image_embedding: Dense::new(p, "image_embedding", kp)?,
            image_type: if cfg.use_type_embedding {
                Some(p.get("encoder.image_type_embedding")?)
            } else {
                None
            },
            encoder: Transformer::new(p, "encoder", cfg.depth, cfg.num_heads, kp)?
                .with_rates(DropRates::of(cfg)),
            emb_dim: cfg.emb_dim,
            patch_dim: cfg.patch_dim(),
        })
    }

    /// `[B, Li, P*P*3]` -> `[B, 1+Li, D]`; with a key, the blocks' dropout and drop path are
    /// drawn from its encoder fork (as in the models' training forwards).
    fn forward(&self, patches: &Tensor, st: Option<&Stochastic>) -> Result<Tensor> {
        // patches built on the host move to the weights' device (a clone when already there)
        let patches = &patches.to_device(self.image_embedding.weight().device())?;
        let (b, li, pd) = patches.dims3()?;
        if pd != self.patch_dim {
            return Err(Error::Shape(format!(
                "image patches have dim {pd}, the classifier expects P*P*3 = {}",
                self.patch_dim
            )));
        }
        let x = self.image_embedding.forward(patches)?;
        let x = x.broadcast_add(&sincos_2d(li, self.emb_dim, patches.device())?)?;
        let x = match &self.image_type {
            Some(t) => x.broadcast_add(t)?,
            None => x,
        };
        let cls = self.cls.broadcast_as((b, 1, self.emb_dim))?;
        let st = st.map(|s| s.fork(site::ENCODER));
        self.encoder
            .forward_with(&Tensor::cat(&[&cls, &x], 1)?, None, st.as_ref())
    }
}

/// The official fine-tuning classifier (`ViTClassifier`). See the module docs.
#[derive(Debug, Clone)]
pub struct Classifier {
    model_cfg: M3aeConfig,
    cfg: ClassifierConfig,
    params: ParamStore,
    encoder: ImageEncoder,
    head_norm: LayerNorm,
    head: Dense,
}

impl Classifier {
    /// Builds the classifier from `params` (native names, exactly the weights of
    /// [`classifier_specs`]; missing, extra or mis-shaped weights are errors that name them).
    /// Both configs are validated (errors name the field).
    pub fn new(model_cfg: &M3aeConfig, cfg: ClassifierConfig, params: ParamStore) -> Result<Self> {
        model_cfg.validate(false)?;
        cfg.validate()?;
        let model_cfg = model_cfg.resolved();
        crate::model::check_store(&classifier_specs(&model_cfg, &cfg), &params)?;
        let kp = model_cfg.kernels;
        Ok(Self {
            encoder: ImageEncoder::new(&model_cfg, &params)?,
            head_norm: LayerNorm::new(&params, "head.norm", kp)?,
            head: Dense::new(&params, "head.fc", kp)?,
            model_cfg,
            cfg,
            params,
        })
    }

    /// A classifier whose encoder and head are freshly initialised from `seed` (the encoder
    /// with the official pre-training initialisers): the "from scratch" baseline.
    pub fn init(
        model_cfg: &M3aeConfig,
        cfg: ClassifierConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        model_cfg.validate(false)?;
        cfg.validate()?;
        let specs = classifier_specs(model_cfg, &cfg);
        Self::new(model_cfg, cfg, ParamStore::init(&specs, seed, device)?)
    }

    /// A classifier on the image encoder of a pre-trained `base` (M3AE or MAE; an M3AE's text
    /// weights and either model's decoder are left out), with the head initialised from `seed`
    /// as the official code does (LayerNorm scale 1, bias 0; dense kernel `lecun_normal`, bias
    /// 0). The encoder weights are copied: training the classifier leaves `base` unchanged.
    pub fn from_base(base: &AnyModel, cfg: ClassifierConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let model_cfg = base.config().clone();
        let device = base.params().device().clone();
        let specs = classifier_specs(&model_cfg, &cfg);
        let head_specs: Vec<ParamSpec> = specs
            .iter()
            .filter(|s| !is_encoder_weight(&s.name))
            .cloned()
            .collect();
        let mut tensors = ParamStore::init(&head_specs, seed, &device)?.tensors();
        for s in specs.iter().filter(|s| is_encoder_weight(&s.name)) {
            // `detach` + `Var::from_tensor` in the store: a copy, not the base model's variable.
            tensors.insert(s.name.clone(), base.params().get(&s.name)?.detach());
        }
        let store =
            ParamStore::from_tensors(&specs, tensors, Unexpected::Error, "base model", &device)?;
        Self::new(&model_cfg, cfg, store)
    }

    /// Loads from official (Flax-named) tensors of a `ViTClassifier`: `base_model.…` and the
    /// head `LayerNorm_0.…` / `Dense_0.…` (kernels `(in, out)`); a leading `params.` on the
    /// keys is dropped. With [`Unexpected::Ignore`] the base model's other weights (decoder,
    /// text) are left out; with [`Unexpected::Error`] any of them is an error naming it.
    pub fn from_official(
        model_cfg: &M3aeConfig,
        cfg: ClassifierConfig,
        tensors: HashMap<String, Tensor>,
        unexpected: Unexpected,
        source: &str,
        device: &Device,
    ) -> Result<Self> {
        model_cfg.validate(false)?;
        cfg.validate()?;
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| match k.strip_prefix("params.") {
                Some(rest) => (rest.to_string(), t),
                None => (k, t),
            })
            .collect();
        let specs = classifier_specs(model_cfg, &cfg);
        let store = ParamStore::from_official(&specs, tensors, unexpected, source, device)?;
        Self::new(model_cfg, cfg, store)
    }

    /// Loads a classifier saved by [`Classifier::save`]: a safetensors file whose metadata
    /// holds both configs. The weights must be exactly the classifier's.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (tensors, meta) = read_safetensors(path, device)?;
        let parse = |msg: String| Error::Parse {
            path: path.to_path_buf(),
            msg,
        };
        let get = |key: &str| {
            meta.get(key)
                .ok_or_else(|| parse(format!("no `{key}` in the safetensors metadata")))
        };
        let model_cfg: M3aeConfig = serde_json::from_str(get(CONFIG_METADATA_KEY)?)
            .map_err(|e| parse(format!("{CONFIG_METADATA_KEY}: {e}")))?;
        let cfg: ClassifierConfig = serde_json::from_str(get(CLASSIFIER_METADATA_KEY)?)
            .map_err(|e| parse(format!("{CLASSIFIER_METADATA_KEY}: {e}")))?;
        let specs = classifier_specs(&model_cfg, &cfg);
        let store = ParamStore::from_tensors(
            &specs,
            tensors,
            Unexpected::Error,
            &path.display().to_string(),
            device,
        )?;
        Self::new(&model_cfg, cfg, store)
    }

    /// Writes the weights to a safetensors file at `path` (atomically) with the model config
    /// under [`CONFIG_METADATA_KEY`] and the classifier config under
    /// [`CLASSIFIER_METADATA_KEY`] in its metadata; [`Classifier::load`] reads it back.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = |key: &str, v: serde_json::Result<String>| {
            v.map_err(|e| Error::Parse {
                path: path.to_path_buf(),
                msg: format!("{key}: {e}"),
            })
        };
        let meta = HashMap::from([
            (
                CONFIG_METADATA_KEY.to_string(),
                json(CONFIG_METADATA_KEY, serde_json::to_string(&self.model_cfg))?,
            ),
            (
                CLASSIFIER_METADATA_KEY.to_string(),
                json(CLASSIFIER_METADATA_KEY, serde_json::to_string(&self.cfg))?,
            ),
        ]);
        self.params.save(path, meta)
    }

    /// The encoder output `[B, 1+Li, D]` after its final LayerNorm (unmasked; the official
    /// `base_model.forward_representation`).
    pub fn forward_representation(&self, image_patches: &Tensor) -> Result<Tensor> {
        self.encoder.forward(image_patches, None)
    }

    /// Logits `[B, num_classes]` of `[B, Li, P*P*3]` patches (evaluation mode).
    pub fn forward(&self, image_patches: &Tensor) -> Result<Tensor> {
        Ok(self.forward_inner(image_patches, None)?.1)
    }

    /// Logits in training mode: the model config's dropout, attention dropout and drop path
    /// drawn from `stochastic` (`None`, or rates of 0: [`Classifier::forward`], bit for bit).
    pub fn forward_train(
        &self,
        image_patches: &Tensor,
        stochastic: Option<&Stochastic>,
    ) -> Result<Tensor> {
        Ok(self.forward_inner(image_patches, stochastic)?.1)
    }

    /// The pooled representation `z` `[B, D]` (before the head's LayerNorm; the official
    /// `features=True` output).
    pub fn features(&self, image_patches: &Tensor) -> Result<Tensor> {
        pool(
            &self.forward_representation(image_patches)?,
            self.cfg.pooling,
        )
    }

    /// `(z, logits)` of one pass: [`Classifier::features`] and [`Classifier::forward`]
    /// together.
    pub fn forward_with_features(&self, image_patches: &Tensor) -> Result<(Tensor, Tensor)> {
        self.forward_inner(image_patches, None)
    }

    /// The one forward pass (training mode with a key).
    fn forward_inner(
        &self,
        image_patches: &Tensor,
        st: Option<&Stochastic>,
    ) -> Result<(Tensor, Tensor)> {
        let z = pool(&self.encoder.forward(image_patches, st)?, self.cfg.pooling)?;
        let logits = self.head.forward(&self.head_norm.forward(&z)?)?;
        Ok((z, logits))
    }

    /// The trainable weights.
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// Every weight of this classifier (official names in the classifier's tree, for
    /// [`crate::layer_decay`]).
    pub fn specs(&self) -> Vec<ParamSpec> {
        classifier_specs(&self.model_cfg, &self.cfg)
    }

    /// The classifier settings.
    pub fn config(&self) -> &ClassifierConfig {
        &self.cfg
    }

    /// The encoder's (resolved) model configuration.
    pub fn model_config(&self) -> &M3aeConfig {
        &self.model_cfg
    }

    /// The layer id, learning-rate factor and weight-decay flag of every weight (see
    /// [`crate::layer_decay`]).
    pub fn layer_decay(&self, decay: f64, rule: LayerDecayRule) -> Vec<LayerScale> {
        layer_decay_table(&self.specs(), self.model_cfg.depth, decay, rule)
    }
}

impl Represent for Classifier {
    fn represent(&self, image_patches: &Tensor) -> Result<Tensor> {
        self.forward_representation(image_patches)
    }
    fn config(&self) -> &M3aeConfig {
        &self.model_cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer_decay::layer_id;
    use crate::model::Mae;
    use candle_core::{DType, D};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn small() -> M3aeConfig {
        let mut cfg = M3aeConfig::preset("tiny").unwrap();
        cfg.model_type = None;
        cfg.depth = 3;
        cfg
    }

    #[test]
    fn forward_is_representation_pool_layer_norm_dense() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let cfg = small();
        let mae = Mae::init(&cfg, 3, &dev)?;
        let patches =
            m3ae_kernels::testing::tensor(&[3, cfg.num_patches(), cfg.patch_dim()], 13, 1.0, &dev)?;
        let repr = mae.forward_representation(&patches)?;
        for pooling in [Pooling::Cls, Pooling::Mean] {
            let c = ClassifierConfig {
                num_classes: 7,
                pooling,
            };
            let clf = Classifier::from_base(&AnyModel::from(mae.clone()), c, 11)?;
            assert_eq!(max_diff(&clf.forward_representation(&patches)?, &repr), 0.0);
            // by hand: pool, LayerNorm (eps 1e-6, scale, bias), x W^T + b
            let z = match pooling {
                Pooling::Cls => repr.narrow(1, 0, 1)?.squeeze(1)?,
                Pooling::Mean => repr.narrow(1, 1, cfg.num_patches())?.mean(1)?,
            };
            let p = clf.params();
            let mu = z.mean_keepdim(D::Minus1)?;
            let xc = z.broadcast_sub(&mu)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            let n = xc
                .broadcast_div(&(var + 1e-6)?.sqrt()?)?
                .broadcast_mul(&p.get("head.norm.weight")?)?
                .broadcast_add(&p.get("head.norm.bias")?)?;
            let logits = n
                .matmul(&p.get("head.fc.weight")?.t()?)?
                .broadcast_add(&p.get("head.fc.bias")?)?;
            let (feat, out) = clf.forward_with_features(&patches)?;
            assert_eq!(max_diff(&feat, &z), 0.0);
            assert_eq!(max_diff(&clf.features(&patches)?, &z), 0.0);
            assert!(max_diff(&out, &logits) < 1e-5, "{pooling:?}");
            assert_eq!(max_diff(&clf.forward(&patches)?, &out), 0.0);
            assert_eq!(out.dims(), &[3, 7]);
        }
        Ok(())
    }

    #[test]
    fn head_is_initialised_as_flax_and_the_base_is_copied() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let cfg = small();
        let base = AnyModel::init(Variant::M3ae, &cfg, 5, &dev)?;
        let c = ClassifierConfig {
            num_classes: 300,
            pooling: Pooling::Cls,
        };
        let clf = Classifier::from_base(&base, c, 2)?;
        let p = clf.params();
        assert_eq!(
            p.get("head.norm.weight")?.to_vec1::<f32>()?,
            vec![1.0; cfg.emb_dim]
        );
        assert_eq!(p.get("head.fc.bias")?.sum_all()?.to_scalar::<f32>()?, 0.0);
        let w = p.get("head.fc.weight")?.flatten_all()?.to_vec1::<f32>()?;
        let var = w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / w.len() as f64;
        let want = 1.0 / cfg.emb_dim as f64;
        assert!((var / want - 1.0).abs() < 0.1, "variance {var} vs {want}");
        let bound = 2.0 * want.sqrt() / 0.8796 + 1e-6;
        assert!(w.iter().all(|x| (*x as f64).abs() <= bound));
        // seeded
        let again = Classifier::from_base(&base, c, 2)?;
        assert_eq!(
            max_diff(
                &again.params().get("head.fc.weight")?,
                &p.get("head.fc.weight")?
            ),
            0.0
        );
        // encoder copied (equal values, separate storage)
        let name = "encoder.blocks.0.attn.qkv.weight";
        assert_eq!(max_diff(&p.get(name)?, &base.params().get(name)?), 0.0);
        let before = base.params().get(name)?.copy()?;
        p.var(name)?.set(&p.get(name)?.zeros_like()?)?;
        assert_eq!(max_diff(&base.params().get(name)?, &before), 0.0);
        // no decoder, no text
        assert_eq!(p.len(), clf.specs().len());
        assert!(p.vars().all(|(n, _)| n == "cls_token"
            || n.starts_with("image_embedding.")
            || n.starts_with("encoder.")
            || n.starts_with("head.")));
        Ok(())
    }

    #[test]
    fn saves_loads_and_rejects_bad_configs() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let cfg = small();
        let c = ClassifierConfig {
            num_classes: 4,
            pooling: Pooling::Mean,
        };
        let clf = Classifier::init(&cfg, c, 1, &dev)?;
        let dir = std::env::temp_dir().join(format!("m3ae-classifier-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("classifier.safetensors");
        clf.save(&path)?;
        let back = Classifier::load(&path, &dev)?;
        assert_eq!(back.config(), clf.config());
        assert_eq!(back.model_config(), clf.model_config());
        let x =
            m3ae_kernels::testing::tensor(&[2, cfg.num_patches(), cfg.patch_dim()], 14, 1.0, &dev)?;
        assert_eq!(max_diff(&back.forward(&x)?, &clf.forward(&x)?), 0.0);
        // a model checkpoint is not a classifier
        let model = AnyModel::init(Variant::Mae, &cfg, 1, &dev)?;
        let mpath = dir.join("model.safetensors");
        model.save(&mpath)?;
        let e = Classifier::load(&mpath, &dev).unwrap_err().to_string();
        assert!(e.contains(CLASSIFIER_METADATA_KEY), "{e}");
        std::fs::remove_dir_all(&dir).ok();
        let bad = ClassifierConfig {
            num_classes: 0,
            pooling: Pooling::Cls,
        };
        let e = Classifier::init(&cfg, bad, 1, &dev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_classes"), "{e}");
        let json: ClassifierConfig = serde_json::from_str(r#"{"num_classes": 3}"#)?;
        assert_eq!(json.pooling, Pooling::Cls);
        let json: ClassifierConfig =
            serde_json::from_str(r#"{"num_classes": 3, "pooling": "mean"}"#)?;
        assert_eq!(json.pooling, Pooling::Mean);
        // a wrong patch width is named
        let wrong = Tensor::zeros((1, cfg.num_patches(), 5), DType::F32, &dev)?;
        assert!(clf.forward(&wrong).is_err());
        Ok(())
    }

    #[test]
    fn official_loading_ignores_the_decoder_and_drops_the_params_prefix() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let cfg = small();
        let c = ClassifierConfig {
            num_classes: 3,
            pooling: Pooling::Cls,
        };
        let clf = Classifier::init(&cfg, c, 4, &dev)?;
        let mut official: HashMap<String, Tensor> = clf
            .params()
            .to_official(&clf.specs())?
            .into_iter()
            .map(|(k, v)| (format!("params.{k}"), v))
            .collect();
        official.insert(
            "params.base_model.decoder.LayerNorm_0.scale".into(),
            Tensor::zeros(3, DType::F32, &dev)?,
        );
        let e = Classifier::from_official(&cfg, c, official.clone(), Unexpected::Error, "f", &dev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("decoder.LayerNorm_0.scale"), "{e}");
        let back = Classifier::from_official(&cfg, c, official, Unexpected::Ignore, "f", &dev)?;
        let x =
            m3ae_kernels::testing::tensor(&[2, cfg.num_patches(), cfg.patch_dim()], 14, 1.0, &dev)?;
        assert_eq!(max_diff(&back.forward(&x)?, &clf.forward(&x)?), 0.0);
        Ok(())
    }

    /// The layer ids of every weight of a depth-3 classifier, both rules, written out.
    #[test]
    fn layer_ids_of_a_depth_3_classifier() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let cfg = small();
        assert!(cfg.use_type_embedding);
        let c = ClassifierConfig {
            num_classes: 3,
            pooling: Pooling::Cls,
        };
        let clf = Classifier::init(&cfg, c, 4, &dev)?;
        let block = |i: usize| {
            [
                "LayerNorm_0.scale",
                "LayerNorm_0.bias",
                "Attention_0.Dense_0.kernel",
                "Attention_0.Dense_0.bias",
                "Attention_0.Dense_1.kernel",
                "Attention_0.Dense_1.bias",
                "LayerNorm_1.scale",
                "LayerNorm_1.bias",
                "TransformerMLP_0.fc1.kernel",
                "TransformerMLP_0.fc1.bias",
                "TransformerMLP_0.fc2.kernel",
                "TransformerMLP_0.fc2.bias",
            ]
            .map(|s| format!("base_model.encoder.Block_{i}.{s}"))
        };
        // (official name, official id, MAE id)
        let mut want: Vec<(String, usize, usize)> = vec![
            ("base_model.cls_token".into(), 0, 0),
            ("base_model.image_embedding.kernel".into(), 4, 0),
            ("base_model.image_embedding.bias".into(), 4, 0),
            ("base_model.encoder_image_type_embedding".into(), 4, 0),
        ];
        for i in 0..3 {
            want.extend(block(i).into_iter().map(|n| (n, i + 1, i + 1)));
        }
        want.extend([
            ("base_model.encoder.LayerNorm_0.scale".into(), 0, 4),
            ("base_model.encoder.LayerNorm_0.bias".into(), 0, 4),
            ("LayerNorm_0.scale".into(), 4, 4),
            ("LayerNorm_0.bias".into(), 4, 4),
            ("Dense_0.kernel".into(), 4, 4),
            ("Dense_0.bias".into(), 4, 4),
        ]);
        let official = clf.layer_decay(0.75, LayerDecayRule::Official);
        let mae = clf.layer_decay(0.5, LayerDecayRule::Mae);
        assert_eq!(official.len(), want.len());
        let by_name = |t: &[LayerScale], n: &str| {
            t.iter()
                .find(|r| r.official == n)
                .unwrap_or_else(|| panic!("{n} is not a classifier weight"))
                .clone()
        };
        for (name, oid, mid) in &want {
            let o = by_name(&official, name);
            assert_eq!(o.layer_id, *oid, "official {name}");
            assert_eq!(o.lr_scale, 0.75f64.powi(4 - *oid as i32), "{name}");
            let m = by_name(&mae, name);
            assert_eq!(m.layer_id, *mid, "mae {name}");
            assert_eq!(m.lr_scale, 0.5f64.powi(4 - *mid as i32), "{name}");
            assert_eq!(layer_id(name, 3, LayerDecayRule::Official), *oid);
            let decayed = name.ends_with("kernel");
            assert_eq!(o.weight_decay, decayed, "{name}");
        }
        Ok(())
    }
}
