//! The `Objective` trait: what the trainer needs from a model (a loss on a batch and its
//! weights). M3AE and the image-only MAE implement it, and so does the fine-tuning classifier
//! (`m3ae_eval::finetune`); the trainer knows nothing else about models.
//!
//! The trainer calls [`Objective::loss_with`] with the [`Stochastic`] key of the micro-batch
//! (see [`crate::Trainer::micro_batch_key`]): M3AE and MAE run their training forwards with the
//! configuration's dropout, attention dropout and drop path drawn from it (with rates of 0 the
//! forward is the deterministic one, bit for bit). [`Objective::loss`] is the same loss without
//! a key (deterministic).

use crate::optim::{is_decayed, ParamGroup};
use crate::Result;
use candle_core::Tensor;
use m3ae_model::{
    M3ae, M3aeConfig, Mae, Masking, ModelInput, ParamSpec, ParamStore, Precision, Stochastic,
    Variant,
};
use std::collections::{BTreeMap, HashMap};

/// The fork of a micro-batch's key that the unpaired-text forward of M3AE uses (the paired
/// forward uses the key itself).
pub const UNPAIRED_TEXT_FORK: u64 = 0x554e_5041_4952_4544;

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

impl TrainBatch {
    /// The same batch with every tensor on `device` (a clone of each tensor already there):
    /// how a batch prepared on the host reaches the weights' device.
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            input: self.input.to_device(device)?,
            image_masking: self
                .image_masking
                .as_ref()
                .map(|m| m.to_device(device))
                .transpose()?,
            text_masking: self
                .text_masking
                .as_ref()
                .map(|m| m.to_device(device))
                .transpose()?,
            unpaired: self
                .unpaired
                .as_ref()
                .map(|(i, m)| Ok::<_, crate::Error>((i.to_device(device)?, m.to_device(device)?)))
                .transpose()?,
            targets: self
                .targets
                .as_ref()
                .map(|t| t.to_device(device))
                .transpose()?,
        })
    }
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
    /// Loss of one batch (forward pass with gradients recorded), deterministic (no dropout).
    fn loss(&self, batch: &TrainBatch) -> Result<LossReport>;
    /// Loss of one batch in training mode: `stochastic` is the key of the micro-batch's random
    /// choices (dropout, drop path); `None` is [`Objective::loss`]. The default ignores the key
    /// (a model without random layers); M3AE and MAE use it.
    fn loss_with(&self, batch: &TrainBatch, stochastic: Option<&Stochastic>) -> Result<LossReport> {
        let _ = stochastic;
        self.loss(batch)
    }
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
    /// Sets the compute precision of the training forwards (`train.precision`, already checked
    /// against the device by the trainer). The default accepts f32 only; M3AE and MAE run
    /// their dense layers' matmuls in bf16 ([`m3ae_model::layers`]).
    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        match precision {
            Precision::F32 => Ok(()),
            other => Err(crate::Error::Config(format!(
                "train.precision = \"{other}\": this objective computes in f32 only"
            ))),
        }
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
        self.loss_with(batch, None)
    }
    fn loss_with(&self, batch: &TrainBatch, stochastic: Option<&Stochastic>) -> Result<LossReport> {
        // the training forward: with fused kernels the text loss never materialises the logits
        let out = self.forward_train_with(
            &batch.input,
            batch.image_masking.as_ref(),
            batch.text_masking.as_ref(),
            stochastic,
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
            let st = stochastic.map(|s| s.fork(UNPAIRED_TEXT_FORK));
            let uo = self.forward_train_with(input, None, Some(masking), st.as_ref())?;
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
    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        if self.precision() != precision {
            *self = self.clone().with_precision(precision);
        }
        Ok(())
    }
}

impl Objective for Mae {
    fn loss(&self, batch: &TrainBatch) -> Result<LossReport> {
        self.loss_with(batch, None)
    }
    fn loss_with(&self, batch: &TrainBatch, stochastic: Option<&Stochastic>) -> Result<LossReport> {
        let patches =
            batch.input.image_patches.as_ref().ok_or_else(|| {
                crate::Error::State("the MAE objective needs image patches".into())
            })?;
        let masking = batch.image_masking.as_ref().ok_or_else(|| {
            crate::Error::State("the MAE objective needs an image masking".into())
        })?;
        let out = self.forward_with(patches, masking, stochastic)?;
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
    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        if self.precision() != precision {
            *self = self.clone().with_precision(precision);
        }
        Ok(())
    }
}
