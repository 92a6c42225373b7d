//! The official (JAX/Flax) M3AE format: everything needed to read, convert, export and check
//! against the official code, without Python.
//!
//! * [`pickle`]: a pickle reader that never runs pickled code (protocols 2 to 5, bounded by
//!   [`pickle::Limits`]).
//! * [`checkpoint`]: the official `model.pkl` train states ([`OfficialCheckpoint`]) with their
//!   exact tensors, model config, training settings and optimizer state.
//! * [`convert`]: official checkpoints to our native files ([`convert_official`],
//!   [`convert_official_resumable`]) and ours back under the official names
//!   ([`export_official`]).
//! * [`native`]: loading native weights (or an official `model.pkl`) as a model
//!   ([`load_m3ae`], [`load_mae`], [`load_native`]).
//! * [`pretrained`]: models by name: local checkpoints, runs, converted folders, official
//!   `model.pkl` files and (feature `hub`) Hugging Face repository ids ([`FromPretrained`]).
//! * [`parity`]: the comparison against golden outputs of the official JAX code.
//!
//! ```
//! use m3ae_official::pickle::Pickle;
//! use m3ae_official::{Error, OfficialCheckpoint};
//! // A pickle that is not a train state is an error naming what was missing.
//! let data = b"\x80\x05}\x8c\x04stepK\x01s.";
//! let p = Pickle::parse(data).unwrap();
//! let e = OfficialCheckpoint::from_pickle(&p, "demo.pkl").unwrap_err();
//! assert!(matches!(e, Error::Structure { .. }), "{e}");
//! assert!(e.to_string().contains("state"), "{e}");
//! ```

pub mod checkpoint;
pub mod convert;
pub mod native;
pub mod parity;
pub mod pickle;
pub mod pretrained;

pub use checkpoint::{CheckpointKind, OfficialCheckpoint, OptState, RawDtype, RawTensor};
pub use convert::{convert_official, convert_official_resumable, export_official, Converted};
pub use native::{load_m3ae, load_mae, load_native};
pub use pretrained::{FromPretrained, HubOptions};

use std::path::PathBuf;

/// Errors of this crate; each names the file and, where it applies, the key or byte offset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    /// The pickle stream is corrupt, hostile or uses something the reader refuses.
    #[error("{origin}: {cause}")]
    Pickle {
        /// The file.
        origin: String,
        /// What the reader met, with its byte offset.
        cause: pickle::Error,
    },
    /// The pickle parsed but does not hold the expected train state.
    #[error("{origin}: `{key}`: {msg}")]
    Structure {
        /// The file.
        origin: String,
        /// The path inside the checkpoint (`state.params.encoder...`).
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// Building or writing the model failed.
    #[error(transparent)]
    Model(#[from] m3ae_model::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The optimizer state does not fit.
    #[error(transparent)]
    Train(#[from] m3ae_train::Error),
    /// A checkpoint path or name that leads to no model weights.
    #[error("{name}: {msg}")]
    Checkpoint {
        /// The path or repository id as given.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A Hugging Face Hub file could not be had (the message names the repository and file).
    #[error(transparent)]
    Data(#[from] m3ae_data::Error),
    /// A parity fixture lacks a file or tensor, or its parts disagree (the message says which).
    #[error("{0}")]
    Fixture(String),
    /// JSON (de)serialisation failed.
    #[error("{origin}: {msg}")]
    Json {
        /// The file or field.
        origin: String,
        /// The message.
        msg: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
