//! Errors of the data crate, and the accounting of bad samples that are skipped instead.
//!
//! A fatal [`Error`] names the file, line or key that was wrong. A bad sample (corrupt image,
//! missing caption, ...) is not an error: it is skipped, counted per [`BadReason`] in
//! [`BadStats`] and logged with its key and file, until the fraction of bad samples exceeds
//! `max_bad_fraction`, which is then [`Error::TooManyBad`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Errors of the data crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    // The I/O error is shown in the message and deliberately not returned as `source()`:
    // printing the error with its chain (`{:#}`) would show it twice.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A line of a manifest or corpus could not be parsed.
    #[error("{}:{line}: {msg}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number (0 when the whole file is at fault).
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// A file named by a manifest does not exist.
    #[error("{}:{line}: image file {} not found", manifest.display(), image.display())]
    MissingFile {
        /// The manifest.
        manifest: PathBuf,
        /// 1-based line number in the manifest.
        line: usize,
        /// The missing file.
        image: PathBuf,
    },
    /// A tokenizer file could not be loaded.
    #[error("tokenizer {}: {msg}", path.display())]
    Tokenizer {
        /// The tokenizer file (empty for a tokenizer built in memory).
        path: PathBuf,
        /// The tokenizers crate's message.
        msg: String,
    },
    /// A file of a Hugging Face Hub repository could not be had (not cached while offline,
    /// download failed, or the `hub` feature is off).
    #[error("Hugging Face repository `{repo}`, file `{file}`: {msg}")]
    Hub {
        /// The repository id.
        repo: String,
        /// The file inside the repository.
        file: String,
        /// What went wrong.
        msg: String,
    },
    /// An HDF5 file or one of its datasets cannot be used (feature `hdf5`).
    #[error("{}: dataset `{dataset}`: {msg}", path.display())]
    Hdf5 {
        /// The file.
        path: PathBuf,
        /// The dataset (`/` for the file itself).
        dataset: String,
        /// What is wrong.
        msg: String,
    },
    /// A safetensors array file is malformed.
    #[error("{}: {msg}", path.display())]
    Arrays {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A shard pattern matched nothing or is malformed.
    #[error("shard pattern `{pattern}`: {msg}")]
    Shards {
        /// The pattern as given.
        pattern: String,
        /// What is wrong.
        msg: String,
    },
    /// An invalid configuration value.
    #[error("invalid config `{field}`: {msg}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// What is wrong with its value.
        msg: String,
    },
    /// Too many bad samples: persistent corruption.
    #[error("{stats}")]
    TooManyBad {
        /// What was found.
        stats: Box<BadStats>,
    },
    /// The model crate rejected a batch (patchify, masking).
    #[error(transparent)]
    Model(#[from] m3ae_model::Error),
    /// A candle op failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The loader's producer thread stopped unexpectedly.
    #[error("loader thread failed: {0}")]
    Loader(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }
}

/// Why a sample was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadReason {
    /// The image bytes do not decode (corrupt, truncated, unsupported).
    CorruptImage,
    /// A sample that needs an image has none.
    MissingImage,
    /// A sample that needs a caption has none.
    MissingCaption,
    /// The caption is empty or only whitespace.
    EmptyCaption,
    /// The caption or text is not valid UTF-8.
    NonUtf8,
    /// A tar shard ended in the middle of a member or has a corrupt header.
    TruncatedTar,
    /// A tar shard holds no sample.
    EmptyShard,
    /// A member larger than the reader accepts.
    Oversized,
}

impl BadReason {
    /// Every reason, in a fixed order.
    pub const ALL: [BadReason; 8] = [
        BadReason::CorruptImage,
        BadReason::MissingImage,
        BadReason::MissingCaption,
        BadReason::EmptyCaption,
        BadReason::NonUtf8,
        BadReason::TruncatedTar,
        BadReason::EmptyShard,
        BadReason::Oversized,
    ];

    /// Short snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            BadReason::CorruptImage => "corrupt_image",
            BadReason::MissingImage => "missing_image",
            BadReason::MissingCaption => "missing_caption",
            BadReason::EmptyCaption => "empty_caption",
            BadReason::NonUtf8 => "non_utf8",
            BadReason::TruncatedTar => "truncated_tar",
            BadReason::EmptyShard => "empty_shard",
            BadReason::Oversized => "oversized",
        }
    }
}

/// One skipped sample: why, which key, which file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadSample {
    /// Why it was skipped.
    pub reason: BadReason,
    /// The sample key (may be empty when the key itself was unreadable).
    pub key: String,
    /// The file (shard, manifest, image) it came from.
    pub file: String,
    /// Details (the decoder's message, ...).
    pub detail: String,
}

impl std::fmt::Display for BadSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "skipped sample `{}` in {}: {} ({})",
            self.key,
            self.file,
            self.reason.name(),
            self.detail
        )
    }
}

/// Counts of good and bad samples, per reason, with the first few bad samples as examples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BadStats {
    /// Samples that made it into a batch (or were accepted by a reader).
    pub good: u64,
    /// Skipped samples per reason.
    pub bad: BTreeMap<BadReason, u64>,
    /// The first skipped samples (at most [`BadStats::MAX_EXAMPLES`]).
    pub examples: Vec<BadSample>,
}

impl BadStats {
    /// How many examples are kept.
    pub const MAX_EXAMPLES: usize = 16;

    /// Counts and logs one bad sample.
    pub fn record(&mut self, bad: BadSample) {
        log::warn!("{bad}");
        *self.bad.entry(bad.reason).or_insert(0) += 1;
        if self.examples.len() < Self::MAX_EXAMPLES {
            self.examples.push(bad);
        }
    }

    /// Adds the counts (and, up to the limit, the examples) of `other`.
    ///
    /// ```
    /// let mut a = m3ae_data::BadStats::default();
    /// a.good = 2;
    /// let mut b = a.clone();
    /// b.record(m3ae_data::BadSample { reason: m3ae_data::BadReason::NonUtf8,
    ///     key: "k".into(), file: "f.tar".into(), detail: String::new() });
    /// a.merge(&b);
    /// assert_eq!((a.good, a.total_bad(), a.examples.len()), (4, 1, 1));
    /// ```
    pub fn merge(&mut self, other: &BadStats) {
        self.good += other.good;
        for (r, n) in &other.bad {
            *self.bad.entry(*r).or_insert(0) += n;
        }
        let room = Self::MAX_EXAMPLES.saturating_sub(self.examples.len());
        self.examples
            .extend(other.examples.iter().take(room).cloned());
    }

    /// Total bad samples.
    pub fn total_bad(&self) -> u64 {
        self.bad.values().sum()
    }

    /// Bad samples of one reason.
    pub fn count(&self, reason: BadReason) -> u64 {
        self.bad.get(&reason).copied().unwrap_or(0)
    }

    /// Fraction of bad among all samples seen (0 when none was seen).
    ///
    /// ```
    /// let mut s = m3ae_data::BadStats::default();
    /// s.good = 3;
    /// s.record(m3ae_data::BadSample { reason: m3ae_data::BadReason::NonUtf8,
    ///     key: "k".into(), file: "f.tar".into(), detail: String::new() });
    /// assert_eq!(s.bad_fraction(), 0.25);
    /// assert!(s.to_string().contains("non_utf8: 1"));
    /// ```
    pub fn bad_fraction(&self) -> f64 {
        let bad = self.total_bad();
        let all = bad + self.good;
        if all == 0 {
            0.0
        } else {
            bad as f64 / all as f64
        }
    }

    /// `Err(TooManyBad)` when at least `min_seen` samples were seen and the bad fraction exceeds
    /// `max_fraction`.
    pub fn check(&self, max_fraction: f64, min_seen: u64) -> Result<()> {
        if self.good + self.total_bad() >= min_seen && self.bad_fraction() > max_fraction {
            return Err(Error::TooManyBad {
                stats: Box::new(self.clone()),
            });
        }
        Ok(())
    }
}

impl std::fmt::Display for BadStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bad of {} samples ({:.1} %):",
            self.total_bad(),
            self.good + self.total_bad(),
            100.0 * self.bad_fraction()
        )?;
        for (r, n) in &self.bad {
            write!(f, " {}: {n};", r.name())?;
        }
        if let Some(e) = self.examples.first() {
            write!(f, " first: {e}")?;
        }
        Ok(())
    }
}
