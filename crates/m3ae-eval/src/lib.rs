//! Evaluation of M3AE representations on features:
//!
//! * [`features`]: pooled features of any [`m3ae_model::Represent`] model (cls or mean).
//! * [`probe`]: the official linear probe (non-affine BatchNorm + linear head, LARS, warmup +
//!   cosine, lr scaled by batch/256) trained on cached features.
//! * [`knn`]: cosine kNN classifier and kNN-distance OOD score.
//! * [`ood`]: maximum softmax probability and Mahalanobis scores.
//! * [`metrics`]: top-k accuracy, AUROC, AUPR (in/out), FPR at 95% TPR.

pub mod features;
pub mod knn;
pub mod metrics;
pub mod ood;
pub mod probe;

pub use probe::{train_probe, LinearProbeHead, ProbeConfig};

/// Errors of the evaluation crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A candle op failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] m3ae_model::Error),
    /// Inputs of the wrong shape.
    #[error("{0}")]
    Shape(String),
    /// A setting that is not a finite number in its range.
    #[error("invalid probe setting `{field}`: {value} is not {expected}")]
    Config {
        /// The setting.
        field: &'static str,
        /// Its value.
        value: f64,
        /// What it must be.
        expected: &'static str,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
