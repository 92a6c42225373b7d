//! [`InMemory`]: samples held in memory as a [`Source`] (tests, benchmarks, data built in code).

use crate::{Partition, Record, RecordIter, Result, Sample, Source};

/// Samples held in memory, split item-wise between partitions ([`Partition::owns`]), in order.
///
/// It describes itself as `memory (<n> samples)` unless given a description
/// ([`InMemory::described`]), and gives no length hint ([`Source::len_hint`]: the loader then
/// finds out how much data there is by reading it) unless asked to ([`InMemory::with_len_hint`]).
///
/// ```
/// use m3ae_data::{sample::count_records, InMemory, Partition, Sample, Source};
/// let samples: Vec<Sample> = (0..5)
///     .map(|i| Sample { key: i.to_string(), ..Default::default() })
///     .collect();
/// let src = InMemory::new(samples.clone());
/// assert_eq!((src.describe().as_str(), src.len_hint()), ("memory (5 samples)", None));
/// // rank 1 of 2 reads the samples 1 and 3
/// let p = Partition { rank: 1, world_size: 2, ..Partition::whole(0, 0) };
/// assert_eq!(count_records(&src, &p)?, (2, 0));
///
/// let src = InMemory::new(samples).described("five").with_len_hint();
/// assert_eq!((src.describe().as_str(), src.len_hint()), ("five", Some(5)));
/// # Ok::<(), m3ae_data::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct InMemory {
    samples: Vec<Sample>,
    description: String,
    len_hint: bool,
}

impl InMemory {
    /// The source of `samples`, described as `memory (<n> samples)`, without a length hint.
    pub fn new(samples: Vec<Sample>) -> Self {
        let description = format!("memory ({} samples)", samples.len());
        Self {
            samples,
            description,
            len_hint: false,
        }
    }

    /// The same source, described as `description` (in logs and error messages).
    pub fn described(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// The same source, giving its number of samples as its length hint.
    pub fn with_len_hint(mut self) -> Self {
        self.len_hint = true;
        self
    }

    /// The samples, in order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }
}

impl Source for InMemory {
    fn open(&self, partition: &Partition) -> Result<RecordIter> {
        let owned: Vec<_> = self
            .samples
            .iter()
            .enumerate()
            .filter(|(i, _)| partition.owns(*i))
            .map(|(_, s)| Ok(Record::Sample(s.clone())))
            .collect();
        Ok(Box::new(owned.into_iter()))
    }

    fn len_hint(&self) -> Option<usize> {
        self.len_hint.then_some(self.samples.len())
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}
