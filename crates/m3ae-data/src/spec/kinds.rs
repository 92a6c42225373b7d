//! The built-in kinds of data sets (see the [`spec`](super) module docs) and the strided subset
//! that [`DataOptions::limit`] takes.

use super::{spec_err, DataOptions, OpenedData, SourceKind};
use crate::sample::{Partition, RecordIter, Source};
use crate::{
    CaptionedScenes, Error, ImageFolder, Result, SceneSplit, ScenesConfig, U8Arrays, WebDataset,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `u8:<file>`: uint8 arrays in safetensors (`images` `[N,H,W(,C)]`, optional `labels`).
pub(super) struct Arrays;

impl SourceKind for Arrays {
    fn name(&self) -> &str {
        "u8"
    }
    fn aliases(&self) -> &[&str] {
        &["fashion_mnist", "mnist", "arrays"]
    }
    fn usage(&self) -> String {
        "u8:<file>, fashion_mnist:<file>, mnist:<file>".into()
    }
    fn bare(&self, value: &str) -> bool {
        Path::new(value)
            .extension()
            .is_some_and(|e| e == "safetensors")
    }
    fn open(&self, arg: &str, _: &DataOptions) -> Result<OpenedData> {
        let p = Path::new(arg);
        if !p.is_file() {
            return Err(path_err(p, "no such data file"));
        }
        let a = U8Arrays::from_file(p)?;
        let from_labels = a
            .labels()
            .map(|l| l.iter().copied().max().unwrap_or(-1) + 1)
            .unwrap_or(0)
            .max(0) as usize;
        let classes = a.classes().len().max(from_labels);
        nonempty(self, arg, a.len())?;
        Ok(OpenedData {
            source: Arc::new(a),
            classes,
        })
    }
}

/// `scenes[:train|test|ood[:N]]`: the built-in captioned scenes.
pub(super) struct Scenes;

fn split_name(split: SceneSplit) -> &'static str {
    match split {
        SceneSplit::Train => "train",
        SceneSplit::Test => "test",
        SceneSplit::Ood => "ood",
    }
}

pub(super) fn scenes_arg(split: SceneSplit, len: Option<usize>) -> String {
    match len {
        Some(n) => format!("{}:{n}", split_name(split)),
        None => split_name(split).to_string(),
    }
}

/// The split and count of a `scenes` argument (`<split>[:<count>]`), or what is wrong with it.
fn parse_scenes(arg: &str) -> std::result::Result<(SceneSplit, Option<usize>), String> {
    let mut parts = arg.split(':');
    let split = match parts.next() {
        Some("train") => SceneSplit::Train,
        Some("test") => SceneSplit::Test,
        Some("ood") => SceneSplit::Ood,
        _ => return Err("the scenes split must be train, test or ood".into()),
    };
    let len = match parts.next() {
        None => None,
        Some(n) => Some(
            n.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or("the scene count must be a positive integer")?,
        ),
    };
    if parts.next().is_some() {
        return Err("too many `:` fields".into());
    }
    Ok((split, len))
}

impl SourceKind for Scenes {
    fn name(&self) -> &str {
        "scenes"
    }
    fn usage(&self) -> String {
        "scenes[:train|test|ood[:N]]".into()
    }
    /// `scenes` alone is the training split.
    fn arg<'a>(&self, value: &'a str) -> Option<&'a str> {
        if value == "scenes" {
            Some("train")
        } else {
            value.strip_prefix("scenes:")
        }
    }
    fn parse(&self, arg: &str) -> std::result::Result<String, String> {
        let (split, len) = parse_scenes(arg)?;
        Ok(scenes_arg(split, len))
    }
    fn open(&self, arg: &str, opts: &DataOptions) -> Result<OpenedData> {
        let (split, len) =
            parse_scenes(arg).map_err(|m| spec_err(&format!("{}:{arg}", self.name()), m))?;
        // `scenes:<split>:<N>` is a set of N scenes, of which `limit` takes an evenly strided
        // subset like of any data set; without N the set is `limit` scenes.
        let len = len.or(opts.limit).unwrap_or(1000);
        let s = CaptionedScenes::new(ScenesConfig {
            len,
            split,
            label: opts.label,
            ..opts.scenes.clone()
        })?;
        nonempty(self, arg, len)?;
        Ok(OpenedData {
            classes: s.num_classes(),
            source: Arc::new(s),
        })
    }
}

/// `folder:<dir>`: an image folder (one sub-folder per class).
pub(super) struct Folder;

impl SourceKind for Folder {
    fn name(&self) -> &str {
        "folder"
    }
    fn usage(&self) -> String {
        "folder:<dir>".into()
    }
    fn bare(&self, value: &str) -> bool {
        // a directory named `*.tar` is a shard pattern, as before there were kinds
        let p = Path::new(value);
        p.is_dir() && p.extension().is_none_or(|e| e != "tar")
    }
    fn open(&self, arg: &str, _: &DataOptions) -> Result<OpenedData> {
        let p = Path::new(arg);
        if !p.is_dir() {
            return Err(path_err(p, "no such image folder"));
        }
        let f = ImageFolder::new(p)?;
        nonempty(self, arg, f.len())?;
        Ok(OpenedData {
            classes: f.classes().len(),
            source: Arc::new(f),
        })
    }
}

/// `wds:<shards>`: WebDataset tar shards.
pub(super) struct Wds;

impl SourceKind for Wds {
    fn name(&self) -> &str {
        "wds"
    }
    fn aliases(&self) -> &[&str] {
        &["webdataset"]
    }
    fn usage(&self) -> String {
        "wds:<shards>".into()
    }
    fn bare(&self, value: &str) -> bool {
        Path::new(value).extension().is_some_and(|e| e == "tar")
    }
    fn parse(&self, arg: &str) -> std::result::Result<String, String> {
        if arg.is_empty() {
            return Err("expected wds:<shards>".into());
        }
        Ok(arg.to_string())
    }
    fn open(&self, arg: &str, opts: &DataOptions) -> Result<OpenedData> {
        if let Some(n) = opts.limit {
            return Err(Error::Arg {
                flag: "--limit",
                value: n.to_string(),
                msg: format!("is not supported for webdataset data (wds:{arg})"),
            });
        }
        let mut w = WebDataset::from_spec(arg)?;
        let mut classes = 0;
        if let Some(l) = &opts.json_label {
            classes = l.classes.len();
            w = w.with_json_label(l.clone());
        }
        Ok(OpenedData {
            source: Arc::new(w),
            classes,
        })
    }
}

/// `hdf5:<file>`: an official HDF5 file with `jpg` and `caption` datasets.
#[cfg(feature = "hdf5")]
pub(super) struct Hdf5File;

#[cfg(feature = "hdf5")]
impl SourceKind for Hdf5File {
    fn name(&self) -> &str {
        "hdf5"
    }
    fn usage(&self) -> String {
        "hdf5:<file>".into()
    }
    fn open(&self, arg: &str, _: &DataOptions) -> Result<OpenedData> {
        Ok(OpenedData {
            source: Arc::new(crate::hdf5::Hdf5::paired(arg)?),
            classes: 0,
        })
    }
}

fn path_err(path: &Path, msg: &str) -> Error {
    Error::Path {
        path: PathBuf::from(path),
        msg: msg.into(),
    }
}

/// An empty data set is an error naming its spec.
fn nonempty(kind: &dyn SourceKind, arg: &str, n: usize) -> Result<()> {
    if n == 0 {
        return Err(spec_err(
            &format!("{}:{arg}", kind.name()),
            "the data set is empty",
        ));
    }
    Ok(())
}

/// An evenly strided subset of a source: `take` of its `n` records.
pub(super) struct Strided {
    pub(super) inner: Arc<dyn Source>,
    pub(super) n: usize,
    pub(super) take: usize,
}

impl Source for Strided {
    fn open(&self, partition: &Partition) -> Result<RecordIter> {
        let it = self
            .inner
            .open(&Partition::whole(partition.seed, partition.epoch))?;
        let (n, take) = (self.n as u128, self.take as u128);
        let p = *partition;
        let mut next_pick = 0u128;
        let mut j = 0usize;
        Ok(Box::new(it.enumerate().filter_map(move |(i, r)| {
            if next_pick >= take || (i as u128) != next_pick * n / take {
                return None;
            }
            next_pick += 1;
            let mine = p.owns(j);
            j += 1;
            mine.then_some(r)
        })))
    }
    fn len_hint(&self) -> Option<usize> {
        Some(self.take)
    }
    fn describe(&self) -> String {
        format!("{} of {}", self.take, self.inner.describe())
    }
}
