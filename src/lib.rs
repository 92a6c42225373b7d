//! m3ae: the M3AE multimodal masked autoencoder in Rust, on candle.
//!
//! This facade re-exports the workspace crates under short names and holds what spans them:
//! the pre-training recipe of `m3ae pretrain` ([`pretrain`]), the device check of `m3ae doctor`
//! ([`doctor`]) and the subcommands of the `m3ae` tool ([`cli`]).
//!
//! * [`official`]: the official (JAX) format: the safe pickle reader, official checkpoints,
//!   conversion and export, the parity harness against the official code.
//!   Models by name ([`FromPretrained`]): local checkpoints, runs, converted folders, official
//!   `model.pkl` files and (feature `hub`) Hugging Face repository ids.
//! * [`kernels`]: differentiable tensor kernels (LayerNorm, masked attention, GELU).
//! * [`model`]: configuration, the M3AE and MAE models, losses, weights.
//! * [`data`], [`train`]: data pipeline, training.
//! * [`eval`]: evaluation: feature extraction, probe / kNN / OOD reports, reconstruction panels
//!   and the high-level inference API ([`Pipeline`]).

pub use m3ae_data as data;
pub use m3ae_eval as eval;
pub use m3ae_kernels as kernels;
pub use m3ae_model as model;
pub use m3ae_official as official;
pub use m3ae_train as train;

pub mod cli;
pub mod doctor;
pub mod pretrain;
mod progress;

pub use m3ae_eval::Pipeline;
pub use m3ae_official::{FromPretrained, HubOptions};
