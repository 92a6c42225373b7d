//! The fine-tuning data: labelled training batches with the classification augmentation and
//! mixup / CutMix ([`LabelledBatches`], a [`BatchSource`] for the trainer), and the loader
//! settings of the training and evaluation passes.

use crate::finetune::FinetuneConfig;
use crate::{Error, Result};
use m3ae_data::mixup::mixup_cutmix;
use m3ae_data::{ImageConfig, LoaderConfig, Source, Streams, Transform};
use m3ae_model::{patchify, unpatchify, M3aeConfig, ModelInput};
use m3ae_train::{BatchSource, TrainBatch};
use serde_json::Value;
use std::sync::Arc;

/// Records held by the training shuffle buffer: a whole epoch of the small sets this runs on,
/// a well-mixed window of larger ones.
const SHUFFLE_BUFFER: usize = 16_384;

/// The training loader: RandomResizedCrop with `cfg.crop_scale` and ratio (3/4, 4/3), a
/// horizontal flip, `cfg.auto_augment`, endless epochs in a seeded shuffled order, drop-last, no masks, no text.
pub fn train_loader_config(cfg: &FinetuneConfig, model: &M3aeConfig) -> LoaderConfig {
    let mut lc = LoaderConfig::eval(cfg.batch_size, model.image_size, model.patch_size);
    lc.image = Some(ImageConfig {
        size: model.image_size,
        transform: Transform::RandomResizedCrop {
            scale: cfg.crop_scale,
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip: true,
        },
        normalization: cfg.normalization,
        augment: cfg.auto_augment,
    });
    lc.seed = cfg.seed;
    lc.epochs = None;
    lc.drop_last = true;
    lc.shuffle_buffer = SHUFFLE_BUFFER;
    lc
}

/// Labelled training batches: images as patches and soft targets `[B, classes]` (mixup /
/// CutMix with label smoothing, or smoothed one-hot labels), drawn from a seed and the step, so
/// a resumed run sees the same batches.
pub struct LabelledBatches {
    streams: Streams,
    classes: usize,
    cfg: FinetuneConfig,
    patch: usize,
}

impl LabelledBatches {
    /// Batches of `source` (whose labels range over `classes`) for fine-tuning `model`.
    pub fn new(
        source: Arc<dyn Source>,
        classes: usize,
        cfg: &FinetuneConfig,
        model: &M3aeConfig,
        max_bad_fraction: f64,
    ) -> Result<Self> {
        let mut lc = train_loader_config(cfg, model);
        lc.max_bad_fraction = max_bad_fraction;
        let streams = Streams::from_source(1, 0, 1, false, source, None, &lc)?;
        Ok(Self {
            streams,
            classes,
            cfg: cfg.clone(),
            patch: model.patch_size,
        })
    }

    fn next(&mut self) -> Result<TrainBatch> {
        let b = self.streams.next_local()?;
        let mut labels = Vec::with_capacity(b.labels.len());
        for (key, l) in b.keys.iter().zip(&b.labels) {
            match l.and_then(|l| u32::try_from(l).ok()) {
                Some(l) if (l as usize) < self.classes => labels.push(l),
                Some(l) => {
                    return Err(Error::Shape(format!(
                        "training sample `{key}` has label {l}, outside the {} classes",
                        self.classes
                    )))
                }
                None => {
                    return Err(Error::Shape(format!(
                        "training sample `{key}` has no label: fine-tuning needs labelled data"
                    )))
                }
            }
        }
        let patches = b
            .input
            .image_patches
            .ok_or_else(|| Error::Shape("a training batch without images".into()))?;
        let images = unpatchify(&patches, self.patch, 3)?;
        let mixed = mixup_cutmix(
            &images,
            &labels,
            self.classes,
            &self.cfg.mixup,
            self.cfg.seed,
            b.step,
        )?;
        Ok(TrainBatch {
            input: ModelInput {
                image_patches: Some(patchify(&mixed.images, self.patch)?),
                ..Default::default()
            },
            image_masking: None,
            text_masking: None,
            unpaired: None,
            targets: Some(mixed.labels),
        })
    }
}

impl BatchSource for LabelledBatches {
    fn next_batch(&mut self) -> m3ae_train::Result<TrainBatch> {
        self.next()
            .map_err(|e| m3ae_train::Error::State(format!("training data: {e}")))
    }

    fn position(&self) -> Value {
        self.streams.local_position()
    }

    fn restore(&mut self, position: &Value) -> m3ae_train::Result<()> {
        self.streams
            .restore_all(position)
            .map_err(|e| m3ae_train::Error::State(e.to_string()))
    }

    fn merge_positions(&self, positions: &[Value]) -> m3ae_train::Result<Value> {
        Streams::merge(positions).map_err(|e| m3ae_train::Error::State(e.to_string()))
    }

    fn stats(&self) -> Option<Value> {
        serde_json::to_value(self.streams.stats()).ok()
    }
}
