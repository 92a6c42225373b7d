//! Evaluation of M3AE models, from a checkpoint name to reports and images:
//!
//! * [`pipeline`]: the high-level inference API ([`Pipeline`]): a model by name with its
//!   evaluation transforms and tokenizer; embeddings of images and image-caption pairs,
//!   reconstructions and predicted masked words, without building tensors by hand.
//! * [`source`]: where a model comes from ([`ModelSource`]: a checkpoint by name, or a randomly
//!   initialised preset), loaded as an [`m3ae_model::AnyModel`]; images and tokenizers next to
//!   checkpoints.
//! * [`features`]: pooled image features of a data set ([`FeatureSet`], [`extract`]): the one
//!   extraction path of the CLI, the examples and the pre-training run's final probe; and
//!   [`cache`], its feature cache ([`extract_cached`]).
//! * [`report`]: the probe, kNN and OOD reports (`m3ae probe`, `m3ae ood`) over the primitives
//!   below.
//! * [`mod@reconstruct`] and [`panels`]: reconstructions with predicted masked words and the cls
//!   attention, and the one PNG panel writer for them (the CLI and the pre-training run's
//!   periodic reconstructions alike).
//! * [`finetune`]: fine-tuning the encoder as an image classifier (the official recipe: layer
//!   decay, mixup / CutMix, drop path), its evaluation and predictions.
//! * [`probe`]: the official linear probe (non-affine BatchNorm + linear head, LARS, warmup +
//!   cosine, lr scaled by batch/256) trained on cached features.
//! * [`knn`]: cosine kNN classifier and kNN-distance OOD score.
//! * [`ood`]: maximum softmax probability and Mahalanobis scores.
//! * [`metrics`]: top-k accuracy, AUROC, AUPR (in/out), FPR at 95% TPR.

pub mod cache;
pub mod features;
pub mod finetune;
pub mod knn;
pub mod metrics;
pub mod ood;
pub mod panels;
pub mod pipeline;
pub mod probe;
pub mod reconstruct;
pub mod report;
pub mod source;

mod error;

pub use cache::extract_cached;
pub use error::{check_float, escape_control, Error, Result, POSITIVE};
pub use features::{
    extract, extract_with, json_label, DataOptions, DataSpec, ExtractSettings, FeatureSet,
};
pub use pipeline::{Pipeline, PipelineOptions};
pub use probe::{train_probe, LinearProbeHead, ProbeConfig};
pub use reconstruct::{reconstruct, reconstruct_with, MaskNoise, Reconstruction};
pub use report::{
    check_probe_config, class_count, evaluate_head, format_ood_table, knn_accuracy,
    load_probe_head, ood_report, probe_report, save_probe_head, KnnConfig, OodRow, ProbeReport,
};
pub use source::{
    find_tokenizer, find_tokenizer_and_source, load_model, read_image, resolve_checkpoint,
    ModelSource,
};
