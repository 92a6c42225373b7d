//! Pre-training of M3AE and MAE: the official AdamW (decay masks, restorable state), the
//! warmup-cosine schedule with batch scaling, global-norm clipping, gradient accumulation, NaN
//! guards, atomic checkpoints and exact resume, behind the narrow [`Objective`] and
//! [`BatchSource`] traits. The data crate's [`m3ae_data::Streams`] are a [`BatchSource`]
//! ([`data`]).

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod schedule;
pub mod sync;
pub mod tensorboard;
pub mod trainer;

pub use metrics::{JsonlSink, MetricSink};
pub use objective::{LossReport, Objective, TrainBatch};
pub use optim::{AdamW, AdamWConfig};
pub use schedule::WarmupCosine;
pub use sync::{GradSync, SingleProcess};
pub use trainer::{BatchSource, StepReport, TrainConfig, Trainer, TrainerState};

use std::path::PathBuf;

/// Errors of the training crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A candle op failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] m3ae_model::Error),
    /// A kernel failed.
    #[error(transparent)]
    Kernel(#[from] m3ae_kernels::Error),
    /// JSON (de)serialisation failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// An invalid training setting (the message names the field).
    #[error("invalid config {0}")]
    Config(String),
    /// Optimiser or trainer state that does not fit the model.
    #[error("{0}")]
    State(String),
    /// Too many non-finite steps in a row.
    #[error(
        "{count} consecutive steps had a non-finite loss or gradient (at step {step}); stopping"
    )]
    NonFinite {
        /// Consecutive bad micro-batches.
        count: u32,
        /// Optimiser step reached.
        step: u64,
    },
    /// A file could not be read or written. (The I/O error is shown in the message and not
    /// returned as `source()`, so a chain printed with `{:#}` shows it once.)
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A file could not be parsed.
    #[error("{}: {msg}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        msg: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
