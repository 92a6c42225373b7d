//! The crate's error type and the checks shared by its modules. Errors name the file, flag or
//! value at fault, in the words the `m3ae` commands print.

use m3ae_data::BadStats;
use std::path::{Path, PathBuf};

/// Errors of the evaluation crate; each names the file, flag or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A candle op failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] m3ae_model::Error),
    /// Reading data, an image or a tokenizer failed.
    #[error(transparent)]
    Data(#[from] m3ae_data::Error),
    /// Finding or loading a checkpoint failed.
    #[error(transparent)]
    Official(#[from] m3ae_official::Error),
    /// Training (fine-tuning) failed.
    #[error(transparent)]
    Train(#[from] m3ae_train::Error),
    /// JSON (de)serialisation failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
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
    /// A path that does not exist or does not hold what it should.
    #[error("{}: {msg}", path.display())]
    Path {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A command-line value (or the library setting behind it) that cannot be used.
    #[error("{flag} {value:?}: {msg}")]
    Arg {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        msg: String,
    },
    /// A flag that is missing or cannot be used (no value to show).
    #[error("{flag}: {msg}")]
    Flag {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// Feature extraction produced NaN or infinite features: the model (or its checkpoint) is
    /// broken.
    #[error(
        "{count} of {total} samples of {data} have non-finite features (NaN or infinite) \
         with the model {model}: the checkpoint's weights are broken"
    )]
    NonFinite {
        /// Samples (rows) with at least one non-finite feature.
        count: usize,
        /// Samples extracted.
        total: usize,
        /// The data set.
        data: String,
        /// The model: the checkpoint as given, or the random-init preset.
        model: String,
    },
    /// The model's outputs or settings make the work impossible.
    #[error("{model}: {msg}")]
    Unusable {
        /// The model: the checkpoint as given, or the random-init preset.
        model: String,
        /// What is wrong.
        msg: String,
    },
    /// More bad samples than `--max-bad-fraction` allows.
    #[error(
        "{data}: more bad samples than --max-bad-fraction {max} allows (that fraction of the \
         samples read, at least of 100): {stats}"
    )]
    TooManyBad {
        /// The data set.
        data: String,
        /// The `--max-bad-fraction` in force.
        max: f64,
        /// What was found.
        stats: Box<BadStats>,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Arg`]: `flag` with `value` is wrong for the reason `msg`.
    pub fn arg(flag: &'static str, value: impl std::fmt::Display, msg: impl Into<String>) -> Self {
        Error::Arg {
            flag,
            value: value.to_string(),
            msg: msg.into(),
        }
    }

    /// An [`Error::Path`]: `path` is wrong for the reason `msg`.
    pub fn path(path: &Path, msg: impl Into<String>) -> Self {
        Error::Path {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    /// An [`Error::Flag`]: `flag` is missing or unusable for the reason `msg`.
    pub fn flag(flag: &'static str, msg: impl Into<String>) -> Self {
        Error::Flag {
            flag,
            msg: msg.into(),
        }
    }
}

/// The range of [`check_float`] for numbers > 0.
pub const POSITIVE: (std::ops::Bound<f64>, std::ops::Bound<f64>) =
    (std::ops::Bound::Excluded(0.0), std::ops::Bound::Unbounded);

/// `value` of `flag` when it is a finite number in `range` (shown as `what` in the error).
///
/// ```
/// use m3ae_eval::{check_float, POSITIVE};
/// assert_eq!(check_float("--lr", 0.5, POSITIVE, "> 0").unwrap(), 0.5);
/// let e = check_float("--lr", f64::NAN, POSITIVE, "> 0").unwrap_err();
/// assert_eq!(e.to_string(), "--lr \"NaN\": must be a finite number > 0");
/// ```
pub fn check_float(
    flag: &'static str,
    value: f64,
    range: impl std::ops::RangeBounds<f64>,
    what: &str,
) -> Result<f64> {
    if value.is_finite() && range.contains(&value) {
        Ok(value)
    } else {
        Err(Error::arg(
            flag,
            value,
            format!("must be a finite number {what}"),
        ))
    }
}

/// `s` with its control characters (newlines, escapes, ...) escaped, for messages that quote
/// file contents (sample keys, decoder messages): they stay on one line and cannot drive the
/// terminal.
///
/// ```
/// assert_eq!(m3ae_eval::escape_control("a\nb\u{1b}"), "a\\nb\\u{1b}");
/// ```
pub fn escape_control(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
