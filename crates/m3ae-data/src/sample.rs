//! The unit of data ([`Sample`]), what a reader yields ([`Record`]: a sample or a skipped one),
//! the partition of an epoch a reader opens ([`Partition`]) and the [`Source`] trait.

use crate::{BadReason, BadSample, Result};
use std::sync::Arc;

/// Image of a sample: still encoded (decoded later, in parallel) or raw 8-bit pixels.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageData {
    /// JPEG / PNG / WebP bytes.
    Encoded(Arc<Vec<u8>>),
    /// Row-major `[height, width, channels]` u8 pixels, channels 1 (grey), 3 (RGB) or 4 (RGBA).
    Pixels {
        /// Width in pixels.
        width: usize,
        /// Height in pixels.
        height: usize,
        /// 1, 3 or 4.
        channels: usize,
        /// `height * width * channels` bytes.
        data: Vec<u8>,
    },
}

/// One sample: each part optional (an image-only dataset has no text, a corpus no image).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sample {
    /// Unique key within the source (tar key, relative path, index).
    pub key: String,
    /// The image, if any.
    pub image: Option<ImageData>,
    /// The caption or passage, if any (valid UTF-8 by construction).
    pub text: Option<String>,
    /// A class label, if any.
    pub label: Option<i64>,
    /// The file it came from (for messages).
    pub file: Arc<str>,
    /// Why the reader found the caption unusable (not UTF-8, oversized); `text` is then `None`.
    /// The loader skips the sample for it only when it needs text.
    pub text_fault: Option<PartFault>,
    /// Why the reader found the image unusable (oversized); `image` is then `None`. The loader
    /// skips the sample for it only when it needs images.
    pub image_fault: Option<PartFault>,
}

/// What is wrong with one part (caption, image) of a sample that may still be usable without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartFault {
    /// The reason counted when the part is needed.
    pub reason: BadReason,
    /// Details (the member, the decoder's message, ...).
    pub detail: String,
}

impl Sample {
    /// The [`BadSample`] for a fault of this sample (its key and file).
    pub fn bad(&self, reason: BadReason, detail: impl Into<String>) -> BadSample {
        BadSample {
            reason,
            key: self.key.clone(),
            file: self.file.to_string(),
            detail: detail.into(),
        }
    }
}

/// What a reader yields: a sample, or a sample it had to skip.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A readable sample.
    Sample(Sample),
    /// A skipped sample (counted by the loader).
    Bad(BadSample),
}

/// The iterator a [`Source`] opens. `Err` items are fatal (missing file, bad manifest line).
pub type RecordIter = Box<dyn Iterator<Item = Result<Record>> + Send>;

/// One partition of an epoch: this process's rank among `world_size` processes, and this
/// worker among `num_workers` workers of the process, for the epoch `epoch` under `seed`.
///
/// Partitions `rank * num_workers + worker` of `world_size * num_workers` are disjoint and
/// together cover every sample exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Partition {
    /// Process rank, `< world_size`.
    pub rank: usize,
    /// Number of processes (0 is read as 1).
    pub world_size: usize,
    /// Worker of this process, `< num_workers`.
    pub worker: usize,
    /// Workers per process (0 is read as 1).
    pub num_workers: usize,
    /// Base seed.
    pub seed: u64,
    /// Epoch number.
    pub epoch: u64,
}

impl Partition {
    /// The whole data set as one partition.
    pub fn whole(seed: u64, epoch: u64) -> Self {
        Self {
            rank: 0,
            world_size: 1,
            worker: 0,
            num_workers: 1,
            seed,
            epoch,
        }
    }

    /// Index of this partition and total number of partitions.
    ///
    /// ```
    /// let p = m3ae_data::Partition { rank: 1, world_size: 2, worker: 1, num_workers: 2, seed: 0, epoch: 0 };
    /// assert_eq!(p.index_and_count(), (3, 4));
    /// ```
    pub fn index_and_count(&self) -> (usize, usize) {
        let w = self.num_workers.max(1);
        let n = self.world_size.max(1) * w;
        (self.rank * w + self.worker, n)
    }

    /// True when item `i` of a sequence split item-wise belongs to this partition.
    pub fn owns(&self, i: usize) -> bool {
        let (p, n) = self.index_and_count();
        i % n == p
    }

    pub(crate) fn check(&self) -> Result<()> {
        let (p, n) = self.index_and_count();
        if self.worker >= self.num_workers.max(1) || p >= n {
            return Err(crate::Error::Config {
                field: "partition",
                msg: format!("{self:?} is out of range"),
            });
        }
        Ok(())
    }
}

/// A data set that can open the samples of one [`Partition`].
///
/// Sources are cheap to share (`Arc<dyn Source>`); `open` may be called for many partitions and
/// epochs, concurrently.
pub trait Source: Send + Sync {
    /// Opens the records of `partition` in the source's order (shard order may depend on the
    /// partition's seed and epoch; the loader's shuffle buffer does the rest).
    fn open(&self, partition: &Partition) -> Result<RecordIter>;

    /// Number of samples when known without reading everything.
    fn len_hint(&self) -> Option<usize> {
        None
    }

    /// A short description for logs.
    fn describe(&self) -> String;
}

/// Reads one partition to its end and counts good and bad records (a test and tooling helper).
pub fn count_records(source: &dyn Source, partition: &Partition) -> Result<(usize, usize)> {
    let (mut good, mut bad) = (0, 0);
    for r in source.open(partition)? {
        match r? {
            Record::Sample(_) => good += 1,
            Record::Bad(_) => bad += 1,
        }
    }
    Ok((good, bad))
}
