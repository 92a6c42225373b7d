//! The M3AE model (Geng, Liu et al. 2022) and the image-only MAE baseline on candle, numerically
//! identical to the official JAX/Flax code.
//!
//! * [`M3aeConfig`]: every field of the official model config, the official presets and ours.
//! * [`patchify`] / [`unpatchify`], [`posemb`]: patches and fixed sin-cos position embeddings.
//! * [`Masking`] built from explicit [`Noise`] (batch-shared as the official code, or per sample).
//! * [`M3ae`] and [`Mae`]: masked forward, losses, unmasked representation ([`Represent`]),
//!   optionally with the encoder's attention maps ([`AttentionTrace`]); [`AnyModel`] holds either.
//! * [`Classifier`] ([`classifier`]): the official fine-tuning classifier (`ViTClassifier`) on
//!   the image encoder of a pre-trained model; [`layer_decay`]: its layer-wise learning-rate
//!   decay (official and MAE rules) and weight-decay mask; [`loss`]: label smoothing,
//!   soft-target cross-entropy and top-1 accuracy next to the pre-training losses.
//! * [`LinearProbeHead`]: the official linear-probe head on pooled features; [`ranking`]: its
//!   argmax rule (NaN never wins), shared with the evaluation metrics.
//! * [`WarmupCosine`]: the official learning-rate schedule.
//! * [`Stochastic`] and [`DropRates`]: dropout, attention dropout and drop path in training
//!   forwards (`*_with` methods), seeded per forward pass ([`stochastic`]).
//! * [`params`]: weight specs, seeded initialisation, safetensors I/O, the official name mapping.
//! * [`flops`]: parameter and FLOP counts.
//! * [`device`]: the one parser of `--device` / `device = "..."` ([`parse_device`],
//!   [`DeviceSpec`]) and the training precision ([`Precision`]).
//!
//! ```
//! use m3ae_model::{M3ae, M3aeConfig, Masking, ModelInput, Noise};
//! use candle_core::{Device, Tensor, DType};
//! let dev = Device::Cpu;
//! let cfg = M3aeConfig::preset("tiny")?;
//! let model = M3ae::init(&cfg, 0, &dev)?;
//! let (li, t) = (cfg.num_patches(), cfg.text_length);
//! let input = ModelInput {
//!     image_patches: Some(Tensor::zeros((2, li, cfg.patch_dim()), DType::F32, &dev)?),
//!     text_ids: Some(Tensor::zeros((2, t), DType::U32, &dev)?),
//!     text_padding: Some(Tensor::zeros((2, t), DType::F32, &dev)?),
//! };
//! let noise = |l: usize| Noise::Shared((0..l).map(|i| ((i * 7) % l) as f32 / l as f32).collect());
//! let im = Masking::new(&noise(li), 2, cfg.image_keep(li), &dev)?;
//! let tm = Masking::new(&noise(t), 2, cfg.text_keep(t), &dev)?;
//! let out = model.forward(&input, Some(&im), Some(&tm))?;
//! assert_eq!(out.image.as_ref().unwrap().dims(), &[2, li, cfg.patch_dim()]);
//! let losses = model.losses(&input, &out)?;
//! assert!(losses.total.to_scalar::<f32>()? > 0.0);
//! # Ok::<(), m3ae_model::Error>(())
//! ```

pub mod any;
pub mod attention;
pub mod classifier;
pub mod config;
pub mod device;
pub mod flops;
pub mod fsio;
pub mod layer_decay;
pub mod layers;
pub mod loss;
pub mod masking;
pub mod model;
pub mod params;
pub mod patch;
pub mod posemb;
pub mod probe_head;
pub mod ranking;
pub mod resources;
pub mod schedule;
pub mod stochastic;

pub use any::AnyModel;
pub use attention::{AttentionTrace, TraceLayers};
pub use classifier::{classifier_specs, Classifier, ClassifierConfig};
pub use config::{ImageTarget, M3aeConfig, ModelType};
pub use device::{parse_device, DeviceSpec, Precision};
pub use layer_decay::{layer_decay_table, LayerDecayRule, LayerScale};
pub use loss::{
    cross_entropy_loss_and_accuracy, patch_mse_loss, smooth_labels, soft_cross_entropy,
    top1_accuracy,
};
pub use m3ae_kernels::TextTopK;
pub use masking::{keep_len, Masking, Noise};
pub use model::{pool, Losses, M3ae, Mae, ModelInput, Output, Pooling, Represent, Trace};
pub use params::{param_count, param_specs, ParamSpec, ParamStore, Unexpected, Variant};
pub use patch::{patchify, unpatchify};
pub use probe_head::LinearProbeHead;
pub use schedule::WarmupCosine;
pub use stochastic::{DropRates, Stochastic};

use std::path::PathBuf;

/// Errors of the model crate. Each names the field, weight, shape or file that was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A candle op failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A kernel rejected its input.
    #[error(transparent)]
    Kernel(#[from] m3ae_kernels::Error),
    /// An invalid configuration value.
    #[error("invalid config field `{field}`: {msg}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// What is wrong with its value.
        msg: String,
    },
    /// Inputs of the wrong shape or kind.
    #[error("{0}")]
    Shape(String),
    /// A device that cannot be used (the value as given, and why).
    #[error("device {value:?}: {msg}")]
    Device {
        /// The value (`cpu`, `cuda`, `cuda:N`, ...).
        value: String,
        /// Why it cannot be used.
        msg: String,
    },
    /// A precision that cannot be used here (the message names the setting).
    #[error("{0}")]
    Precision(String),
    /// A weight the model needs is absent.
    #[error("missing weight `{name}` in {origin}")]
    MissingWeight {
        /// The weight's name.
        name: String,
        /// Where it was looked up (a file or the parameter store).
        origin: String,
    },
    /// A weight the model does not have.
    #[error("unexpected weight `{name}` in {origin}")]
    UnexpectedWeight {
        /// The weight's name.
        name: String,
        /// Where it came from.
        origin: String,
    },
    /// A weight with the wrong shape.
    #[error("weight `{name}` in {origin} has shape {got:?}, expected {expected:?}")]
    WeightShape {
        /// The weight's name.
        name: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
        /// Where it came from.
        origin: String,
    },
    /// A file could not be read or written.
    // The I/O error is shown in the message and deliberately not returned as `source()`:
    // printing the error with its chain (`{:#}`) would show it twice.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A config file could not be parsed.
    #[error("{}: {msg}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        msg: String,
    },
    /// A safetensors file is malformed.
    #[error("{}: {msg}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The work would need more memory than the machine has available.
    #[error(
        "{what} needs about {need_gib:.1} GiB of memory but {available_gib:.1} GiB are available: \
         lower {hint}"
    )]
    OutOfMemory {
        /// The work (e.g. "a training step of batch 64").
        what: String,
        /// Estimated need, GiB.
        need_gib: f64,
        /// Available memory, GiB.
        available_gib: f64,
        /// The settings that size the work.
        hint: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
