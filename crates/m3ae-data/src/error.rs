//! Errors of the data crate, and the accounting of bad samples that are skipped instead.
//!
//! A fatal [`Error`] names the file, line or key that was wrong. A bad sample (corrupt image,
//! missing caption, ...) is not an error: it is skipped, counted per [`BadReason`] in
//! [`BadStats`] and logged with its key and file, until there are more than the loader allows
//! ([`BadStats::check`]), which is then [`Error::TooManyBad`]. Text taken from files is escaped
//! before it is printed ([`escape_text`]).

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
    /// A tar archive is truncated, corrupt or hostile (where that is fatal, e.g. listing the
    /// values of a json field; the loader counts such a shard as a bad sample instead).
    #[error("{}: {source}", path.display())]
    Tar {
        /// The archive.
        path: PathBuf,
        /// What is wrong with it.
        source: crate::tarstream::TarError,
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
    /// Too many bad samples: persistent corruption (see [`BadStats::check`]).
    #[error("too many bad samples: {stats}")]
    TooManyBad {
        /// What was found.
        stats: Box<BadStats>,
    },
    /// A whole pass over the data gives no batch: fewer usable samples than one batch (with
    /// `drop_last`), or none at all. Without this error the loader would read the data again
    /// and again without ever producing a batch.
    #[error("{}", not_enough_data(data, *usable, *batch_size, *drop_last, bad))]
    NotEnoughData {
        /// The data ([`crate::Source::describe`]).
        data: String,
        /// Usable samples one pass gives (an upper bound when known before reading).
        usable: u64,
        /// The batch size.
        batch_size: usize,
        /// Whether incomplete batches are dropped.
        drop_last: bool,
        /// The bad samples read so far (why so few were usable).
        bad: Box<BadStats>,
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
    /// A data set named on the command line ([`crate::DataSpec`]) or an option of it that
    /// cannot be used.
    #[error("{flag} {value:?}: {msg}")]
    Arg {
        /// The flag (`--data`, `--limit`).
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        msg: String,
    },
    /// A path named by a data set that does not exist or is not what it should be.
    #[error("{}: {msg}", path.display())]
    Path {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// The data streams of a run ([`crate::streams::Streams`]) cannot be set up, or their
    /// positions do not fit together.
    #[error("{0}")]
    Streams(String),
    /// A data stream of a run failed.
    #[error("data stream {index}: {source}")]
    Stream {
        /// The stream.
        index: usize,
        /// Why.
        source: Box<Error>,
    },
}

fn not_enough_data(
    data: &str,
    usable: u64,
    batch_size: usize,
    drop_last: bool,
    bad: &BadStats,
) -> String {
    let why = if bad.total_bad() > 0 {
        format!("; {bad}")
    } else {
        String::new()
    };
    not_enough_data_line(data, usable, batch_size, drop_last) + &why
}

fn not_enough_data_line(data: &str, usable: u64, batch_size: usize, drop_last: bool) -> String {
    if usable == 0 {
        format!("{data}: a whole pass over the data gives 0 usable samples")
    } else if drop_last {
        format!(
            "{data}: a whole pass over the data gives {usable} usable samples (per rank), fewer \
             than one batch of {batch_size} (incomplete batches are dropped)"
        )
    } else {
        format!(
            "{data}: a whole pass over the data gives {usable} usable samples (per rank) but no \
             batch of {batch_size}"
        )
    }
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
            escape_text(&self.key),
            escape_text(&self.file),
            self.reason.name(),
            escape_text(&self.detail)
        )
    }
}

/// Text taken from a file, made safe to print: control characters (escape sequences that
/// would drive a terminal, NUL, ...) are written escaped (`\u{1b}`); the rest is kept.
///
/// ```
/// assert_eq!(m3ae_data::error::escape_text("a\x1b[2Jb"), "a\\u{1b}[2Jb");
/// assert_eq!(m3ae_data::error::escape_text("héllo"), "héllo");
/// ```
pub fn escape_text(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out.into()
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

    /// Counts and logs one bad sample: the first [`BadStats::MAX_EXAMPLES`] of the process at
    /// level `warn`, later ones at `debug` (a shard with thousands of bad samples must not
    /// flood the terminal; the per-reason counts say how many there were).
    pub fn record(&mut self, bad: BadSample) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static LOGGED: AtomicUsize = AtomicUsize::new(0);
        match LOGGED.fetch_add(1, Ordering::Relaxed) {
            n if n < Self::MAX_EXAMPLES => log::warn!("{bad}"),
            n if n == Self::MAX_EXAMPLES => {
                log::warn!("{bad} (further bad samples are logged at level debug)")
            }
            _ => log::debug!("{bad}"),
        }
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
    /// assert_eq!(s.to_string(), "1 bad of 4 samples (25.0 %): non_utf8 1; first: `k` in f.tar (non_utf8)");
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

    /// `Err(TooManyBad)` when `bad > max_fraction * max(seen, window)`, where `seen` counts the
    /// good and bad samples so far: a fixed allowance of `max_fraction * window` bad samples
    /// while little was seen, the fraction `max_fraction` once more than `window` samples were.
    /// `max_fraction` 1 never fails.
    ///
    /// ```
    /// use m3ae_data::{BadReason, BadSample, BadStats};
    /// let bad = BadSample { reason: BadReason::NonUtf8, key: "k".into(), file: "f".into(),
    ///     detail: String::new() };
    /// let mut s = BadStats { good: 6, ..Default::default() };
    /// s.record(bad.clone());
    /// assert!(s.check(0.1, 100).is_ok()); // 1 of 7: within the allowance of 10
    /// for _ in 0..9 { s.record(bad.clone()) }
    /// assert!(s.check(0.1, 100).is_ok()); // 10 of 16: still within it
    /// s.record(bad);
    /// assert!(s.check(0.1, 100).is_err()); // 11 of 17
    /// s.good = 1000;
    /// assert!(s.check(0.1, 100).is_ok()); // 11 of 1011: the fraction is what counts now
    /// assert!(s.check(1.0, 100).is_ok() && s.check(0.0, 100).is_err());
    /// ```
    pub fn check(&self, max_fraction: f64, window: u64) -> Result<()> {
        let bad = self.total_bad();
        let seen = self.good + bad;
        if bad as f64 > max_fraction * seen.max(window) as f64 {
            return Err(Error::TooManyBad {
                stats: Box::new(self.clone()),
            });
        }
        Ok(())
    }
}

impl std::fmt::Display for BadStats {
    /// `3 bad of 7 samples (42.9 %): non_utf8 2, corrupt_image 1; first: `a` in x.tar
    /// (non_utf8), ...` with at most 3 examples.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bad of {} samples ({:.1} %)",
            self.total_bad(),
            self.good + self.total_bad(),
            100.0 * self.bad_fraction()
        )?;
        for (i, (r, n)) in self.bad.iter().enumerate() {
            write!(f, "{} {} {n}", if i == 0 { ":" } else { "," }, r.name())?;
        }
        for (i, e) in self.examples.iter().take(3).enumerate() {
            let key = if e.key.is_empty() {
                "(no key)".into()
            } else {
                format!("`{}`", escape_text(&e.key))
            };
            write!(
                f,
                "{} {key} in {} ({})",
                if i == 0 { "; first:" } else { "," },
                escape_text(&e.file),
                e.reason.name()
            )?;
        }
        if self.examples.len() > 3 {
            write!(f, ", ...")?;
        }
        Ok(())
    }
}
