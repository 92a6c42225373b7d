//! The `Objective` trait: what the trainer needs from a model (a loss on a batch and its
//! weights). M3AE and the image-only MAE implement it, and so does the fine-tuning classifier
//! ([`crate::finetune`]); the trainer knows nothing else about models.

use crate::optim::{is_decayed, ParamGroup};
use crate::Result;
use candle_core::Tensor;
use m3ae_model::{M3ae, M3aeConfig, Mae, Masking, ModelInput, ParamSpec, ParamStore, Variant};
use std::collections::{BTreeMap, HashMap};

/// One training batch: the paired (or image-only) input with its maskings, and optionally an
/// unpaired text batch with its masking (weighted by `unpaired_text_loss_weight`).
#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// The main input.
    pub input: ModelInput,
    /// Masking of the image patches (required when the input has an image).
    pub image_masking: Option<Masking>,
    /// Masking of the text (required when the input has text).
    pub text_masking: Option<Masking>,
    /// Unpaired text: ids, padding and masking (M3AE only).
    pub unpaired: Option<(ModelInput, Masking)>,
    /// Soft class targets `[B, classes]` (rows sum to 1) of a classification objective.
    pub targets: Option<Tensor>,
}

/// The differentiable total loss of a batch, and scalar metrics for logging.
#[derive(Debug, Clone)]
pub struct LossReport {
    /// Scalar tensor to differentiate.
    pub total: Tensor,
    /// Named scalars (`loss`, `image_loss`, `text_loss`, `text_accuracy`, ...).
    pub scalars: BTreeMap<String, f64>,
}

/// A model the trainer can optimise.
pub trait Objective {
    /// Loss of one batch (forward pass with gradients recorded).
    fn loss(&self, batch: &TrainBatch) -> Result<LossReport>;
    /// The trainable weights.
    fn params(&self) -> &ParamStore;
    /// Weight specs (names, official names, shapes).
    fn specs(&self) -> Vec<ParamSpec>;
    /// Which parameter set (for the official weight-decay mask).
    fn variant(&self) -> Variant;
    /// The model configuration (saved in checkpoints).
    fn model_config(&self) -> &M3aeConfig;
    /// How the optimiser treats each weight, by native name. The default is pre-training's:
    /// the official decay mask of [`Objective::variant`], learning-rate scale 1, one clipping
    /// group.
    fn param_groups(&self) -> BTreeMap<String, ParamGroup> {
        let variant = self.variant();
        self.specs()
            .into_iter()
            .map(|s| {
                let g = ParamGroup {
                    lr_scale: 1.0,
                    decayed: is_decayed(&s.official, variant),
                    clip_group: 0,
                };
                (s.name, g)
            })
            .collect()
    }
    /// Metadata written with the weights of a checkpoint (`model.safetensors`). The default
    /// holds the model configuration under `m3ae_config`, which every model loader reads.
    fn checkpoint_metadata(&self) -> Result<HashMap<String, String>> {
        Ok(HashMap::from([(
            "m3ae_config".to_string(),
            serde_json::to_string(self.model_config())?,
        )]))
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

impl Objective for M3ae {
    fn loss(&self, batch: &TrainBatch) -> Result<LossReport> {
        // the training forward: with fused kernels the text loss never materialises the logits
        let out = self.forward_train(
            &batch.input,
            batch.image_masking.as_ref(),
            batch.text_masking.as_ref(),
        )?;
        let l = self.losses(&batch.input, &out)?;
        let mut scalars = BTreeMap::new();
        let mut total = l.total.clone();
        if let Some(t) = &l.image_loss {
            scalars.insert("image_loss".into(), scalar(t)?);
        }
        if let Some(t) = &l.text_loss {
            scalars.insert("text_loss".into(), scalar(t)?);
        }
        if let Some(t) = &l.text_accuracy {
            scalars.insert("text_accuracy".into(), scalar(t)?);
        }
        let w = self.config().unpaired_text_loss_weight;
        if let (Some((input, masking)), true) = (&batch.unpaired, w > 0.0) {
            let uo = self.forward_train(input, None, Some(masking))?;
            let ul = self.losses(input, &uo)?;
            if let Some(t) = &ul.text_loss {
                scalars.insert("unpaired_text_loss".into(), scalar(t)?);
                total = (total + (t * w)?)?;
            }
            if let Some(t) = &ul.text_accuracy {
                scalars.insert("unpaired_text_accuracy".into(), scalar(t)?);
            }
        }
        scalars.insert("loss".into(), scalar(&total)?);
        Ok(LossReport { total, scalars })
    }
    fn params(&self) -> &ParamStore {
        M3ae::params(self)
    }
    fn specs(&self) -> Vec<ParamSpec> {
        M3ae::specs(self.config())
    }
    fn variant(&self) -> Variant {
        Variant::M3ae
    }
    fn model_config(&self) -> &M3aeConfig {
        M3ae::config(self)
    }
}

impl Objective for Mae {
    fn loss(&self, batch: &TrainBatch) -> Result<LossReport> {
        let patches =
            batch.input.image_patches.as_ref().ok_or_else(|| {
                crate::Error::State("the MAE objective needs image patches".into())
            })?;
        let masking = batch.image_masking.as_ref().ok_or_else(|| {
            crate::Error::State("the MAE objective needs an image masking".into())
        })?;
        let out = self.forward(patches, masking)?;
        let l = self.losses(patches, &out)?;
        let mut scalars = BTreeMap::new();
        scalars.insert("loss".into(), scalar(&l.total)?);
        if let Some(t) = &l.image_loss {
            scalars.insert("image_loss".into(), scalar(t)?);
        }
        Ok(LossReport {
            total: l.total,
            scalars,
        })
    }
    fn params(&self) -> &ParamStore {
        Mae::params(self)
    }
    fn specs(&self) -> Vec<ParamSpec> {
        Mae::specs(self.config())
    }
    fn variant(&self) -> Variant {
        Variant::Mae
    }
    fn model_config(&self) -> &M3aeConfig {
        Mae::config(self)
    }
}
