//! WebDataset tar shards in the img2dataset layout: consecutive members sharing a key
//! (`{key}.jpg|.jpeg|.png|.webp`, `{key}.txt`, optional `{key}.json` and `{key}.cls`).
//!
//! Shards are read as a stream by the crate's own bounded tar reader ([`crate::tarstream`]:
//! one member in memory at a time, extension headers capped at 64 KiB, no buffer sized from a
//! header) on a reader thread that feeds a small bounded channel, so a shard is never held in
//! memory whole and file reading overlaps the consumer's work. A truncated or corrupt shard
//! (including an extension header above the cap) ends that shard: the group being read is
//! counted as [`BadReason::TruncatedTar`] and reading goes on with the next shard; an empty
//! shard is counted as [`BadReason::EmptyShard`]. A caption that is not UTF-8 or a caption or
//! image member above [`MAX_MEMBER_BYTES`] does not make the record bad: the sample carries the
//! fault ([`Sample::text_fault`], [`Sample::image_fault`]) and the loader skips it only when it
//! needs that part.
//!
//! Labels come from `{key}.cls` (an integer), or, with [`WebDataset::with_json_label`], from a
//! string field of `{key}.json` mapped to a class index through a [`JsonLabel`] class list
//! (e.g. the `category` of the Tux Paint shards); [`WebDataset::json_values`] lists a field's
//! values to build that list.

use crate::error::escape_text;
use crate::sample::{ImageData, PartFault, Partition, Record, RecordIter, Sample, Source};
use crate::shards::{expand_shards, plan_shards};
use crate::tarstream::{TarError, TarReader};
use crate::{BadReason, BadSample, Error, Result};
use std::collections::BTreeSet;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

/// Largest member the reader loads (larger ones are skipped as [`BadReason::Oversized`]).
pub const MAX_MEMBER_BYTES: u64 = 256 << 20;

/// A list of WebDataset shards.
///
/// ```
/// use m3ae_data::WebDataset;
/// let ds = WebDataset::from_spec("cc12m/{00000..02175}.tar")?;
/// assert_eq!(ds.shards().len(), 2176);
/// assert_eq!(ds.shards()[1], std::path::Path::new("cc12m/00001.tar"));
/// // Read as a `Source`: `for rec in ds.open(&Partition::whole(0, 0))? { ... }`, each record a
/// // sample or a bad sample with its reason.
/// # Ok::<(), m3ae_data::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct WebDataset {
    shards: Vec<PathBuf>,
    /// Shuffle the shard order every epoch (the same order on every rank). Default false.
    pub shuffle_shards: bool,
    /// Channel capacity of the reader thread, in samples.
    pub read_ahead: usize,
    /// Labels from a field of each sample's `.json` member (overrides `.cls`).
    pub json_label: Option<JsonLabel>,
}

/// Labels read from a field of each sample's `{key}.json`: the value (a string, or a number
/// written as JSON), cut to its first `depth` `/`-separated parts, is looked up in `classes`;
/// its index is the label. A sample whose json lacks the field, or whose value is not in the
/// list, gets no label.
///
/// ```
/// use m3ae_data::webdataset::JsonLabel;
/// let l = JsonLabel::new("category", Some(1), ["animals", "food"]);
/// assert_eq!(l.label(br#"{"category": "food/fruit"}"#), Some(1));
/// assert_eq!(l.value(br#"{"category": "animals/birds"}"#).as_deref(), Some("animals"));
/// assert_eq!(l.label(br#"{"category": "town"}"#), None);
/// assert_eq!(l.label(br#"{"caption": "x"}"#), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JsonLabel {
    /// The top-level field of the json object, e.g. `category`.
    pub field: String,
    /// Keep only the first `depth` `/`-separated parts of the value (`None`: the whole value).
    pub depth: Option<usize>,
    /// Class names: the label of a sample is the index of its value here.
    pub classes: Arc<Vec<String>>,
}

impl JsonLabel {
    /// A label rule over the given class names (in label order).
    pub fn new<S: Into<String>>(
        field: impl Into<String>,
        depth: Option<usize>,
        classes: impl IntoIterator<Item = S>,
    ) -> Self {
        Self {
            field: field.into(),
            depth,
            classes: Arc::new(classes.into_iter().map(Into::into).collect()),
        }
    }

    /// The (cut) value of the field in a json document, `None` when it is missing, null, not
    /// a string or number, or the document is not a json object.
    pub fn value(&self, json: &[u8]) -> Option<String> {
        field_value(json, &self.field, self.depth)
    }

    /// The label of a json document: the index of its value in `classes`.
    pub fn label(&self, json: &[u8]) -> Option<i64> {
        let v = self.value(json)?;
        self.classes.iter().position(|c| *c == v).map(|i| i as i64)
    }
}

fn field_value(json: &[u8], field: &str, depth: Option<usize>) -> Option<String> {
    let doc: serde_json::Value = serde_json::from_slice(json).ok()?;
    let v = match doc.get(field)? {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        _ => return None,
    };
    Some(match depth {
        Some(d) => v.split('/').take(d.max(1)).collect::<Vec<_>>().join("/"),
        None => v,
    })
}

impl WebDataset {
    /// From explicit shard paths.
    pub fn new(shards: Vec<PathBuf>) -> Result<Self> {
        if shards.is_empty() {
            return Err(Error::Shards {
                pattern: String::new(),
                msg: "no shard given".into(),
            });
        }
        Ok(Self {
            shards,
            shuffle_shards: false,
            read_ahead: 64,
            json_label: None,
        })
    }

    /// From a pattern: list (`::`), glob or brace range, see [`expand_shards`].
    pub fn from_spec(spec: &str) -> Result<Self> {
        Self::new(expand_shards(spec)?)
    }

    /// The shards, in order.
    pub fn shards(&self) -> &[PathBuf] {
        &self.shards
    }

    /// Labels samples from a field of their `.json` member instead of `.cls`.
    pub fn with_json_label(mut self, label: JsonLabel) -> Self {
        self.json_label = Some(label);
        self
    }

    /// The distinct values (cut to `depth` parts, see [`JsonLabel`]) of a json field over every
    /// shard, sorted, and the number of samples whose json has no usable value for it. A shard
    /// that cannot be read is an error naming it.
    pub fn json_values(
        &self,
        field: &str,
        depth: Option<usize>,
    ) -> Result<(BTreeSet<String>, usize)> {
        let mut values = BTreeSet::new();
        let mut missing = 0usize;
        for shard in &self.shards {
            let f = std::fs::File::open(shard).map_err(|e| Error::io(shard, e))?;
            let mut tar = TarReader::new(BufReader::with_capacity(1 << 20, f));
            let tar_err = |source| Error::Tar {
                path: shard.clone(),
                source,
            };
            while let Some(m) = tar.next_member().map_err(tar_err)? {
                if !m.is_file()
                    || split_name(&m.name).is_none_or(|(_, ext)| ext != "json")
                    || m.size > MAX_MEMBER_BYTES
                {
                    continue;
                }
                let buf = tar.read_data().map_err(tar_err)?;
                match field_value(&buf, field, depth) {
                    Some(v) => {
                        values.insert(v);
                    }
                    None => missing += 1,
                }
            }
        }
        Ok((values, missing))
    }
}

impl Source for WebDataset {
    fn open(&self, partition: &Partition) -> Result<RecordIter> {
        partition.check()?;
        let plan = plan_shards(&self.shards, partition, self.shuffle_shards);
        let (tx, rx) = sync_channel(self.read_ahead.max(1));
        let json_label = self.json_label.clone();
        std::thread::Builder::new()
            .name("m3ae-tar".into())
            .spawn(move || {
                let mut st = SplitState {
                    index: 0,
                    split: plan.sample_split,
                    tx,
                    json_label,
                };
                for shard in &plan.shards {
                    if !read_shard(shard, &mut st) {
                        return;
                    }
                }
            })
            .map_err(|e| Error::Loader(e.to_string()))?;
        Ok(Box::new(ChannelIter(rx)))
    }

    fn describe(&self) -> String {
        match self.shards.as_slice() {
            [one] => format!("webdataset {}", one.display()),
            [first, ..] => format!(
                "webdataset {} and {} more shards",
                first.display(),
                self.shards.len() - 1
            ),
            [] => "webdataset (no shard)".into(),
        }
    }
}

struct ChannelIter(Receiver<Result<Record>>);

impl Iterator for ChannelIter {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Self::Item> {
        self.0.recv().ok()
    }
}

struct SplitState {
    index: usize,
    split: Option<(usize, usize)>,
    tx: SyncSender<Result<Record>>,
    json_label: Option<JsonLabel>,
}

impl SplitState {
    /// Sends a per-sample record if this partition owns it; false when the receiver is gone.
    fn sample(&mut self, rec: Record) -> bool {
        let i = self.index;
        self.index += 1;
        match self.split {
            Some((p, n)) if i % n != p => true,
            _ => self.tx.send(Ok(rec)).is_ok(),
        }
    }

    /// Sends a per-shard record (only partition 0 of a sample split reports it).
    fn shard_event(&mut self, rec: Result<Record>) -> bool {
        match self.split {
            Some((p, _)) if p != 0 => true,
            _ => self.tx.send(rec).is_ok(),
        }
    }
}

/// The members of one key being assembled.
#[derive(Default)]
struct Group {
    key: String,
    image: Option<Vec<u8>>,
    text: Option<Vec<u8>>,
    label: Option<i64>,
    /// The label from the json member (when labels come from json).
    json_label: Option<i64>,
    /// The image member exceeds [`MAX_MEMBER_BYTES`].
    image_oversized: Option<u64>,
    /// The caption member exceeds [`MAX_MEMBER_BYTES`].
    text_oversized: Option<u64>,
    /// A label member (`.cls`, `.json`) exceeds [`MAX_MEMBER_BYTES`].
    other_oversized: Option<(String, u64)>,
    any: bool,
}

impl Group {
    /// The record of the group; `json_labels`: the label comes from the json member (none
    /// without one) instead of `.cls`. A caption or image fault (not UTF-8, oversized) is kept
    /// on the sample ([`Sample::text_fault`], [`Sample::image_fault`]) for the loader to decide
    /// on: image-only evaluation does not need the caption, text-only use not the image.
    fn finish(self, file: &Arc<str>, json_labels: bool) -> Option<Record> {
        if !self.any {
            return None;
        }
        let oversized = |member: &str, size: u64| PartFault {
            reason: BadReason::Oversized,
            detail: format!(
                "{}: {size} bytes exceed {MAX_MEMBER_BYTES}",
                escape_text(member)
            ),
        };
        if let Some((ext, size)) = &self.other_oversized {
            let f = oversized(&format!("{}.{ext}", self.key), *size);
            return Some(Record::Bad(BadSample {
                reason: f.reason,
                key: self.key,
                file: file.to_string(),
                detail: f.detail,
            }));
        }
        let (text, text_fault) = match (self.text, self.text_oversized) {
            (_, Some(size)) => (None, Some(oversized(&format!("{}.txt", self.key), size))),
            (None, None) => (None, None),
            (Some(bytes), None) => match String::from_utf8(bytes) {
                Ok(s) => (Some(s), None),
                Err(e) => (
                    None,
                    Some(PartFault {
                        reason: BadReason::NonUtf8,
                        detail: format!("{}.txt: {e}", escape_text(&self.key)),
                    }),
                ),
            },
        };
        let image_fault = self
            .image_oversized
            .map(|size| oversized(&format!("{} image", self.key), size));
        Some(Record::Sample(Sample {
            image: self.image.map(|b| ImageData::Encoded(Arc::new(b))),
            text,
            label: if json_labels {
                self.json_label
            } else {
                self.label
            },
            file: file.clone(),
            key: self.key,
            text_fault,
            image_fault,
        }))
    }
}

/// Splits a member name into (key, lower-case extension) the WebDataset way: the key is the
/// path up to the first `.` of the file name.
fn split_name(name: &str) -> Option<(String, String)> {
    let slash = name.rfind('/').map(|i| i + 1).unwrap_or(0);
    let base = &name[slash..];
    let dot = base.find('.')?;
    if dot == 0 {
        return None;
    }
    Some((
        name[..slash + dot].to_string(),
        base[dot + 1..].to_ascii_lowercase(),
    ))
}

/// Reads one shard into the channel; false when the receiver hung up or on a fatal error.
fn read_shard(shard: &Path, st: &mut SplitState) -> bool {
    let file: Arc<str> = shard.display().to_string().into();
    let f = match std::fs::File::open(shard) {
        Ok(f) => f,
        Err(e) => {
            let _ = st.tx.send(Err(Error::io(shard, e)));
            return false;
        }
    };
    let mut tar = TarReader::new(BufReader::with_capacity(1 << 20, f));
    let truncated = |key: &str, e: &TarError| {
        Record::Bad(BadSample {
            reason: BadReason::TruncatedTar,
            key: key.to_string(),
            file: file.to_string(),
            detail: e.to_string(),
        })
    };
    let mut group = Group::default();
    let mut samples = 0usize;
    loop {
        let entry = match tar.next_member() {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                let key = std::mem::take(&mut group.key);
                return st.shard_event(Ok(truncated(&key, &e)));
            }
        };
        if !entry.is_file() {
            continue;
        }
        let Some((key, ext)) = split_name(&entry.name) else {
            continue;
        };
        if key != group.key && group.any {
            let done = std::mem::take(&mut group);
            if let Some(rec) = done.finish(&file, st.json_label.is_some()) {
                samples += 1;
                if !st.sample(rec) {
                    return false;
                }
            }
        }
        group.key = key;
        let wanted = matches!(
            ext.as_str(),
            "jpg" | "jpeg" | "png" | "webp" | "txt" | "cls" | "json"
        );
        group.any |= wanted;
        if !wanted {
            continue;
        }
        if entry.size > MAX_MEMBER_BYTES {
            match ext.as_str() {
                "txt" => group.text_oversized = Some(entry.size),
                "cls" | "json" => group.other_oversized = Some((ext, entry.size)),
                _ => group.image_oversized = Some(entry.size),
            }
            continue;
        }
        let buf = match tar.read_data() {
            Ok(b) => b,
            Err(e) => {
                let key = std::mem::take(&mut group.key);
                return st.shard_event(Ok(truncated(&key, &e)));
            }
        };
        match ext.as_str() {
            "txt" => group.text = Some(buf),
            "cls" => {
                group.label = std::str::from_utf8(&buf)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
            }
            "json" => {
                if let Some(l) = &st.json_label {
                    group.json_label = l.label(&buf);
                }
            }
            _ => group.image = Some(buf),
        }
    }
    if let Some(rec) = group.finish(&file, st.json_label.is_some()) {
        samples += 1;
        if !st.sample(rec) {
            return false;
        }
    }
    if samples == 0 {
        return st.shard_event(Ok(Record::Bad(BadSample {
            reason: BadReason::EmptyShard,
            key: String::new(),
            file: file.to_string(),
            detail: "no sample in shard".into(),
        })));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_at_first_dot() {
        assert_eq!(
            split_name("a/b/000010001.jpg"),
            Some(("a/b/000010001".into(), "jpg".into()))
        );
        assert_eq!(
            split_name("x.seg.PNG"),
            Some(("x".into(), "seg.png".into()))
        );
        assert_eq!(split_name("a.dir/noext"), None);
        assert_eq!(split_name(".hidden"), None);
    }

    #[test]
    fn caption_and_image_faults_stay_with_the_sample() {
        let file: Arc<str> = "s.tar".into();
        let g = Group {
            key: "k".into(),
            image: Some(vec![1, 2]),
            text: Some(b"bad \xff".to_vec()),
            any: true,
            ..Default::default()
        };
        let Some(Record::Sample(s)) = g.finish(&file, false) else {
            panic!("expected a sample")
        };
        assert_eq!(s.text, None);
        assert_eq!(s.text_fault.unwrap().reason, BadReason::NonUtf8);
        assert!(s.image.is_some() && s.image_fault.is_none());
        let g = Group {
            key: "k".into(),
            text: Some(b"fine".to_vec()),
            image_oversized: Some(MAX_MEMBER_BYTES + 1),
            any: true,
            ..Default::default()
        };
        let Some(Record::Sample(s)) = g.finish(&file, false) else {
            panic!("expected a sample")
        };
        assert_eq!(s.text.as_deref(), Some("fine"));
        assert_eq!(s.image_fault.unwrap().reason, BadReason::Oversized);
        // an oversized label member still makes the whole sample bad
        let g = Group {
            key: "k".into(),
            other_oversized: Some(("json".into(), MAX_MEMBER_BYTES + 1)),
            any: true,
            ..Default::default()
        };
        assert!(matches!(
            g.finish(&file, true),
            Some(Record::Bad(BadSample {
                reason: BadReason::Oversized,
                ..
            }))
        ));
    }
}
