//! The fine-tuning settings ([`FinetuneConfig`]): the official `finetune_main` defaults, as a
//! serde struct that round-trips through TOML and JSON and is saved with every checkpoint.

use crate::{Error, Result};
use m3ae_data::image::AutoAugment;
use m3ae_data::mixup::MixupConfig;
use m3ae_data::Normalization;
use m3ae_model::{LayerDecayRule, Pooling};
use m3ae_train::{AdamWConfig, TrainConfig};
use serde::{Deserialize, Serialize};

/// Fine-tuning settings. The defaults are the official `finetune_main` flags (90 epochs, peak lr
/// 1.5e-4 after 5 warmup epochs, cosine to 0, layer decay 0.75, AdamW b2 0.999 without weight
/// decay, mixup 0.8 / cutmix 1.0 / switch 0.5 with label smoothing 0.1, RandAugment
/// `rand-m9-mstd0.5-inc1` after the crop, no clipping), except the batch size (official 2, a
/// typo-sized default; 256 here).
///
/// ```
/// use m3ae_eval::finetune::FinetuneConfig;
/// let cfg = FinetuneConfig::default();
/// assert_eq!((cfg.epochs, cfg.warmup_epochs, cfg.adamw.b2), (90, 5, 0.999));
/// let text = toml::to_string(&cfg).unwrap();
/// assert_eq!(toml::from_str::<FinetuneConfig>(&text).unwrap(), cfg);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// Passes over the training set.
    pub epochs: u64,
    /// Images per optimiser step.
    pub batch_size: usize,
    /// Peak learning rate (before the layer scale).
    pub lr_peak: f64,
    /// Learning rate at step 0.
    pub lr_init: f64,
    /// Learning rate at the end of the cosine.
    pub lr_end: f64,
    /// Linear warmup, in epochs.
    pub warmup_epochs: u64,
    /// Multiply the learning rates by `batch_size / 256`. The official code only logs that
    /// product and trains with the unscaled rates (false, the default).
    pub scale_lr_by_batch: bool,
    /// Layer-wise learning-rate decay: weights of layer `i` train at `decay^(depth + 1 - i)`
    /// times the rate (1: off).
    pub layer_decay: f64,
    /// Which layer each weight belongs to ([`LayerDecayRule`]; the official rule by default).
    pub layer_decay_assignment: LayerDecayRule,
    /// AdamW (b1 0.9, b2 0.999, eps 1e-8, weight decay 0).
    pub adamw: AdamWConfig,
    /// Global-norm clipping threshold, per layer group (official 1e9: off).
    pub clip_gradient: f64,
    /// Mixup / CutMix and label smoothing of the training targets.
    pub mixup: MixupConfig,
    /// The classifier's input: the cls token, or the mean of the patch tokens (`global_pool`).
    pub pooling: Pooling,
    /// Drop-path (stochastic depth) rate of the encoder blocks while fine-tuning.
    pub drop_path: f64,
    /// Dropout rate (MLP and projection outputs) while fine-tuning.
    pub drop: f64,
    /// Attention-probability dropout rate while fine-tuning.
    pub att_drop: f64,
    /// Area range of the training RandomResizedCrop (a horizontal flip follows).
    pub crop_scale: (f64, f64),
    /// Augmentation of the training images after the crop and flip: a timm RandAugment policy
    /// (official: `"rand-m9-mstd0.5-inc1"`) or `"none"`.
    pub auto_augment: AutoAugment,
    /// Pixel normalisation (training and evaluation).
    pub normalization: Normalization,
    /// Seed of the classifier head, the data order, the augmentation, mixup and dropout.
    pub seed: u64,
    /// Evaluate on the validation set every this many epochs (and keep the best classifier).
    pub eval_every_epochs: u64,
    /// Write a checkpoint every this many epochs (and at the end).
    pub checkpoint_every_epochs: u64,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Log training metrics every this many steps.
    pub log_every: u64,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            epochs: 90,
            batch_size: 256,
            lr_peak: 1.5e-4,
            lr_init: 0.0,
            lr_end: 0.0,
            warmup_epochs: 5,
            scale_lr_by_batch: false,
            layer_decay: 0.75,
            layer_decay_assignment: LayerDecayRule::Official,
            adamw: AdamWConfig {
                b1: 0.9,
                b2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            clip_gradient: 1e9,
            mixup: MixupConfig::default(),
            pooling: Pooling::Cls,
            drop_path: 0.0,
            drop: 0.0,
            att_drop: 0.0,
            crop_scale: (0.08, 1.0),
            auto_augment: AutoAugment::official_finetune(),
            normalization: Normalization::Cc12m,
            seed: 0,
            eval_every_epochs: 1,
            checkpoint_every_epochs: 1,
            keep_checkpoints: 2,
            log_every: 25,
        }
    }
}

impl FinetuneConfig {
    /// Checks every value; the error names the field (`finetune.<field>`).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, value: String, msg: &str| {
            Err(Error::Arg {
                flag: field,
                value,
                msg: msg.to_string(),
            })
        };
        if self.epochs == 0 {
            return bad("finetune.epochs", "0".into(), "must be positive");
        }
        if self.batch_size == 0 {
            return bad("finetune.batch_size", "0".into(), "must be positive");
        }
        if self.warmup_epochs > self.epochs {
            return bad(
                "finetune.warmup_epochs",
                self.warmup_epochs.to_string(),
                &format!("is more than finetune.epochs = {}", self.epochs),
            );
        }
        if !(self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            return bad(
                "finetune.layer_decay",
                self.layer_decay.to_string(),
                "must be in (0, 1]",
            );
        }
        for (field, r) in [
            ("finetune.drop_path", self.drop_path),
            ("finetune.drop", self.drop),
            ("finetune.att_drop", self.att_drop),
        ] {
            if !(0.0..1.0).contains(&r) {
                return bad(field, r.to_string(), "must be in [0, 1)");
            }
        }
        let (lo, hi) = self.crop_scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return bad(
                "finetune.crop_scale",
                format!("({lo}, {hi})"),
                "must satisfy 0 < low <= high <= 1",
            );
        }
        for (field, every) in [
            ("finetune.eval_every_epochs", self.eval_every_epochs),
            (
                "finetune.checkpoint_every_epochs",
                self.checkpoint_every_epochs,
            ),
            ("finetune.log_every", self.log_every),
        ] {
            if every == 0 {
                return bad(field, "0".into(), "must be positive");
            }
        }
        if self.keep_checkpoints == 0 {
            return bad("finetune.keep_checkpoints", "0".into(), "must be positive");
        }
        self.mixup.validate().map_err(|e| Error::Flag {
            flag: "finetune.mixup",
            msg: e.to_string(),
        })?;
        self.train_config(1)?;
        Ok(())
    }

    /// The trainer's settings for `steps_per_epoch` optimiser steps per epoch.
    pub fn train_config(&self, steps_per_epoch: u64) -> Result<TrainConfig> {
        let cfg = TrainConfig {
            steps: self.epochs * steps_per_epoch,
            batch_size: self.batch_size,
            lr_peak: self.lr_peak,
            lr_init: self.lr_init,
            lr_end: self.lr_end,
            warmup_steps: self.warmup_epochs * steps_per_epoch,
            scale_lr_by_batch: self.scale_lr_by_batch,
            adamw: self.adamw,
            clip_gradient: self.clip_gradient,
            accumulate_grad_steps: 1,
            max_bad_steps: 5,
            // the classifier computes in f32 (its objective has no bf16 path)
            precision: m3ae_train::Precision::F32,
        };
        cfg.validate().map_err(|e| Error::Flag {
            flag: "finetune",
            msg: e.to_string(),
        })?;
        Ok(cfg)
    }
}
