//! Evaluation of M3AE representations: the official linear-probe head (non-affine BatchNorm and a
//! linear layer on the post-LayerNorm cls feature). Feature extraction, the probe's training
//! loop, kNN, OOD scores and visualisation are planned in this crate (see the README status table).

pub mod probe;

pub use probe::LinearProbeHead;

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
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
