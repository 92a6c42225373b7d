//! Pre-training of M3AE and MAE: the official AdamW (decay masks, restorable state), the
//! warmup-cosine schedule with batch scaling, global-norm clipping, gradient accumulation, NaN
//! guards, atomic checkpoints and exact resume, behind the narrow [`Objective`] and
//! [`BatchSource`] traits. The data crate's [`m3ae_data::Streams`] are a [`BatchSource`]
//! ([`data`]).
//!
//! Devices: the trainer runs where the objective's weights are. On the CPU the optimiser and
//! the gradient norms run on host slices (bit for bit the arithmetic of every published
//! figure); elsewhere on device tensors ([`optim::UpdatePath`]), batches reach the device ahead
//! of the step through a [`DeviceFeed`], and checkpoints are written from host copies and read
//! back onto any device. `train.precision` ([`m3ae_model::Precision`]) selects f32 or bf16
//! matmuls (fast on CUDA; on the CPU the bf16 numerics run on f32 GEMMs).

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod feed;
pub mod learner;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod sync;
pub mod tensorboard;
pub mod trainer;

pub use feed::DeviceFeed;
pub use learner::{FitReport, Fitted, Hook, HookError, Learner, LogLines, Progress, Window};
pub use m3ae_model::Precision;
pub use metrics::{JsonlSink, MetricSink};
pub use objective::{LossReport, Objective, TrainBatch};
pub use optim::{AdamW, AdamWConfig, UpdatePath};
// The learning-rate schedule lives in the model crate (the probe of `m3ae-eval` uses it too); it
// stays reachable here as `m3ae_train::schedule` and `m3ae_train::WarmupCosine`.
pub use m3ae_model::schedule;
pub use m3ae_model::schedule::WarmupCosine;
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
    /// Another rank of a data-parallel job stopped (it failed, panicked or timed out) before a
    /// collective this rank entered; that rank's own error says why.
    #[error(
        "rank {rank} of {world}: rank {gone} stopped (failed, panicked or timed out) before the {what}"
    )]
    PeerStopped {
        /// This rank.
        rank: usize,
        /// Number of ranks.
        world: usize,
        /// The rank that stopped first.
        gone: usize,
        /// The collective.
        what: String,
    },
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
    /// Restoring a checkpoint failed.
    #[error("resuming from {}: {error}", dir.display())]
    Resume {
        /// The checkpoint folder.
        dir: PathBuf,
        /// Why.
        error: Box<Error>,
    },
    /// A [`learner::Hook`] failed.
    #[error("{name} at step {step}: {error}")]
    Hook {
        /// The hook's name.
        name: String,
        /// The step it ran at.
        step: u64,
        /// Its error.
        error: learner::HookError,
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
