//! The classifier as the trainer's [`Objective`]: soft-target cross-entropy on the batch's
//! mixed targets, layer-wise learning-rate decay and the fine-tuning weight-decay mask as the
//! optimiser's parameter groups (one clipping group per layer, as the official per-layer
//! `clip_by_global_norm`), and the classifier's configuration in every checkpoint.

use m3ae_model::any::CONFIG_METADATA_KEY;
use m3ae_model::classifier::CLASSIFIER_METADATA_KEY;
use m3ae_model::{
    Classifier, LayerDecayRule, M3aeConfig, ParamSpec, ParamStore, Stochastic, Variant,
};
use m3ae_train::optim::ParamGroup;
use m3ae_train::{LossReport, Objective, TrainBatch};
use std::collections::{BTreeMap, HashMap};

/// A [`Classifier`] being fine-tuned.
pub struct ClassifierObjective {
    classifier: Classifier,
    groups: BTreeMap<String, ParamGroup>,
    metadata: HashMap<String, String>,
}

impl ClassifierObjective {
    /// Fine-tunes `classifier` with layer decay `decay` under `rule`; `extra` metadata (the
    /// fine-tuning settings) is saved with its weights in every checkpoint, next to its configs.
    pub fn new(
        classifier: Classifier,
        decay: f64,
        rule: LayerDecayRule,
        extra: HashMap<String, String>,
    ) -> m3ae_train::Result<Self> {
        let groups = classifier
            .layer_decay(decay, rule)
            .into_iter()
            .map(|d| {
                let g = ParamGroup {
                    lr_scale: d.lr_scale,
                    decayed: d.weight_decay,
                    clip_group: d.layer_id,
                };
                (d.name, g)
            })
            .collect();
        let mut metadata = classifier_metadata(&classifier)?;
        metadata.extend(extra);
        Ok(Self {
            classifier,
            groups,
            metadata,
        })
    }

    /// The metadata saved with the weights.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The classifier (its weights are the trainer's).
    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }
}

/// The configs [`Classifier::load`] reads back: the encoder's and the classifier's.
pub fn classifier_metadata(c: &Classifier) -> m3ae_train::Result<HashMap<String, String>> {
    Ok(HashMap::from([
        (
            CONFIG_METADATA_KEY.to_string(),
            serde_json::to_string(c.model_config())?,
        ),
        (
            CLASSIFIER_METADATA_KEY.to_string(),
            serde_json::to_string(c.config())?,
        ),
    ]))
}

fn state(msg: impl Into<String>) -> m3ae_train::Error {
    m3ae_train::Error::State(msg.into())
}

fn scalar(t: &candle_core::Tensor) -> m3ae_train::Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

impl Objective for ClassifierObjective {
    fn loss(&self, batch: &TrainBatch) -> m3ae_train::Result<LossReport> {
        self.loss_with(batch, None)
    }
    fn loss_with(
        &self,
        batch: &TrainBatch,
        stochastic: Option<&Stochastic>,
    ) -> m3ae_train::Result<LossReport> {
        let patches = batch
            .input
            .image_patches
            .as_ref()
            .ok_or_else(|| state("the classifier objective needs image patches"))?;
        let targets = batch
            .targets
            .as_ref()
            .ok_or_else(|| state("the classifier objective needs soft targets"))?;
        let logits = self.classifier.forward_train(patches, stochastic)?;
        let loss = m3ae_model::soft_cross_entropy(&logits, targets)?;
        // training accuracy against the dominant class of each (mixed) target
        let hit = logits
            .argmax(1)?
            .eq(&targets.argmax(1)?)?
            .to_dtype(candle_core::DType::F32)?
            .mean_all()?;
        let mut scalars = BTreeMap::new();
        scalars.insert("loss".into(), scalar(&loss)?);
        scalars.insert("accuracy".into(), scalar(&hit)?);
        Ok(LossReport {
            total: loss,
            scalars,
        })
    }
    fn params(&self) -> &ParamStore {
        self.classifier.params()
    }
    fn specs(&self) -> Vec<ParamSpec> {
        self.classifier.specs()
    }
    /// The classifier is image-only; the variant only picks pre-training's decay mask, which
    /// [`Objective::param_groups`] replaces here.
    fn variant(&self) -> Variant {
        Variant::Mae
    }
    fn model_config(&self) -> &M3aeConfig {
        self.classifier.model_config()
    }
    fn param_groups(&self) -> BTreeMap<String, ParamGroup> {
        self.groups.clone()
    }
    fn checkpoint_metadata(&self) -> m3ae_train::Result<HashMap<String, String>> {
        Ok(self.metadata.clone())
    }
}
