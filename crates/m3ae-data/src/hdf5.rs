//! The official HDF5 data files, read through the HDF5 C library (crate feature
//! `hdf5`; see docs/data.md for installing the library).
//!
//! Three layouts, each of 1-D datasets of equal length (one row per sample):
//!
//! | layout | datasets |
//! |---|---|
//! | [`Hdf5Layout::Paired`] (CC12M, CC3M) | `jpg` (encoded image bytes), `caption` (UTF-8 text) |
//! | [`Hdf5Layout::ImageNet`] | `{split}_jpg` and integer `{split}_labels`, split `train` or `val` |
//! | [`Hdf5Layout::Text`] (unpaired text) | `text` (UTF-8 text) |
//!
//! Image rows are variable-length `uint8` sequences (h5py `vlen_dtype(uint8)`); text rows are
//! variable-length UTF-8 or ASCII strings (h5py `string_dtype()`, `vlen=bytes`) or
//! variable-length `uint8` sequences holding UTF-8; labels are any integer type. Another element
//! type is an error naming the file and the dataset.
//!
//! Partition `p` of `n` (see [`Partition`]) reads the contiguous rows
//! `[start + p * len / n, start + (p + 1) * len / n)`, as the official loader gives each host
//! its own block, in slabs of [`Hdf5::SLAB`] rows. An empty image row is skipped as
//! `missing_image`, a text row that is not UTF-8 as `non_utf8`; an empty caption is left to the
//! loader (`empty_caption`, or the official all-padding text).

use crate::sample::{ImageData, Partition, Record, RecordIter, Sample, Source};
use crate::{BadReason, BadSample, Error, Result};
use hdf5_metno::types::{TypeDescriptor, VarLenArray, VarLenAscii, VarLenUnicode};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which official layout a file has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hdf5Layout {
    /// Image-text pairs: `jpg` + `caption`.
    Paired,
    /// Labelled images: `{split}_jpg` + `{split}_labels` (split `train` or `val`).
    ImageNet {
        /// `train` or `val`.
        split: String,
    },
    /// Unpaired text: `text`.
    Text,
}

impl Hdf5Layout {
    /// (image, text, label) dataset names of the layout.
    fn datasets(&self) -> (Option<String>, Option<String>, Option<String>) {
        match self {
            Hdf5Layout::Paired => (Some("jpg".into()), Some("caption".into()), None),
            Hdf5Layout::ImageNet { split } => (
                Some(format!("{split}_jpg")),
                None,
                Some(format!("{split}_labels")),
            ),
            Hdf5Layout::Text => (None, Some("text".into()), None),
        }
    }
}

/// How a text or byte dataset is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Variable-length `uint8` sequences.
    Bytes,
    /// Variable-length UTF-8 strings.
    Unicode,
    /// Variable-length ASCII strings.
    Ascii,
}

/// A source over one official HDF5 file.
#[derive(Debug, Clone)]
pub struct Hdf5 {
    path: PathBuf,
    layout: Hdf5Layout,
    image: Option<String>,
    text: Option<(String, Kind)>,
    label: Option<String>,
    start: usize,
    len: usize,
}

fn h5_err(path: &Path, dataset: &str, e: impl std::fmt::Display) -> Error {
    Error::Hdf5 {
        path: path.into(),
        dataset: dataset.into(),
        msg: e.to_string(),
    }
}

/// Opens `name` in `file` as a 1-D dataset and returns it with its length.
fn dataset_1d(
    file: &hdf5_metno::File,
    path: &Path,
    name: &str,
) -> Result<(hdf5_metno::Dataset, usize)> {
    let ds = file
        .dataset(name)
        .map_err(|e| h5_err(path, name, format!("no such dataset ({e})")))?;
    match ds.shape().as_slice() {
        [n] => Ok((ds, *n)),
        s => Err(h5_err(
            path,
            name,
            format!("has shape {s:?}, expected one row per sample (1-D)"),
        )),
    }
}

fn kind_of(ds: &hdf5_metno::Dataset, path: &Path, name: &str, bytes_only: bool) -> Result<Kind> {
    let d = ds
        .dtype()
        .and_then(|t| t.to_descriptor())
        .map_err(|e| h5_err(path, name, e))?;
    match d {
        TypeDescriptor::VarLenArray(inner)
            if matches!(
                *inner,
                TypeDescriptor::Unsigned(hdf5_metno::types::IntSize::U1)
                    | TypeDescriptor::Integer(hdf5_metno::types::IntSize::U1)
            ) =>
        {
            Ok(Kind::Bytes)
        }
        TypeDescriptor::VarLenUnicode if !bytes_only => Ok(Kind::Unicode),
        TypeDescriptor::VarLenAscii if !bytes_only => Ok(Kind::Ascii),
        other => Err(h5_err(
            path,
            name,
            format!(
                "element type {other} is not supported: expected {}",
                if bytes_only {
                    "variable-length uint8 (encoded image bytes)"
                } else {
                    "variable-length strings or variable-length uint8"
                }
            ),
        )),
    }
}

impl Hdf5 {
    /// Rows read per HDF5 call.
    pub const SLAB: usize = 256;

    /// Opens `path` in `layout`: every dataset of the layout must exist, be 1-D with a supported
    /// element type, and all must have the same length. Errors name the file and the dataset.
    pub fn open(path: impl AsRef<Path>, layout: Hdf5Layout) -> Result<Self> {
        let path = path.as_ref();
        if let Err(e) = std::fs::metadata(path) {
            return Err(Error::io(path, e));
        }
        let file = hdf5_metno::File::open(path).map_err(|e| h5_err(path, "/", e))?;
        let (image, text, label) = layout.datasets();
        let mut len: Option<(String, usize)> = None;
        let mut check_len = |name: &str, n: usize| -> Result<()> {
            match &len {
                Some((first, m)) if *m != n => Err(h5_err(
                    path,
                    name,
                    format!("has {n} rows but `{first}` has {m}"),
                )),
                Some(_) => Ok(()),
                None => {
                    len = Some((name.to_string(), n));
                    Ok(())
                }
            }
        };
        if let Some(name) = &image {
            let (ds, n) = dataset_1d(&file, path, name)?;
            kind_of(&ds, path, name, true)?;
            check_len(name, n)?;
        }
        let text = match text {
            Some(name) => {
                let (ds, n) = dataset_1d(&file, path, &name)?;
                let k = kind_of(&ds, path, &name, false)?;
                check_len(&name, n)?;
                Some((name, k))
            }
            None => None,
        };
        if let Some(name) = &label {
            let (ds, n) = dataset_1d(&file, path, name)?;
            let d = ds
                .dtype()
                .and_then(|t| t.to_descriptor())
                .map_err(|e| h5_err(path, name, e))?;
            if !matches!(d, TypeDescriptor::Integer(_) | TypeDescriptor::Unsigned(_)) {
                return Err(h5_err(
                    path,
                    name,
                    format!("labels have element type {d}, expected integers"),
                ));
            }
            check_len(name, n)?;
        }
        let len = len.map(|(_, n)| n).unwrap_or(0);
        Ok(Self {
            path: path.into(),
            layout,
            image,
            text,
            label,
            start: 0,
            len,
        })
    }

    /// A paired image-text file (`jpg` + `caption`).
    pub fn paired(path: impl AsRef<Path>) -> Result<Self> {
        Self::open(path, Hdf5Layout::Paired)
    }

    /// An ImageNet file's `split` (`train` or `val`): `{split}_jpg` + `{split}_labels`.
    pub fn imagenet(path: impl AsRef<Path>, split: &str) -> Result<Self> {
        Self::open(
            path,
            Hdf5Layout::ImageNet {
                split: split.into(),
            },
        )
    }

    /// An unpaired text file (`text`).
    pub fn text(path: impl AsRef<Path>) -> Result<Self> {
        Self::open(path, Hdf5Layout::Text)
    }

    /// Only rows `start..start + max_len` (the official `start_index` / `max_length`; clipped to
    /// the file).
    pub fn with_range(mut self, start: usize, max_len: Option<usize>) -> Self {
        let total = self.start + self.len;
        self.start = start.min(total);
        let left = total - self.start;
        self.len = max_len.map_or(left, |m| m.min(left));
        self
    }

    /// Number of rows used.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no row is used.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The layout.
    pub fn layout(&self) -> &Hdf5Layout {
        &self.layout
    }

    /// Rows `[a, b)` of a byte / text dataset, as bytes (strings as their UTF-8 / ASCII bytes).
    fn read_bytes(
        &self,
        file: &hdf5_metno::File,
        name: &str,
        kind: Kind,
        a: usize,
        b: usize,
    ) -> Result<Vec<Vec<u8>>> {
        let err = |e: hdf5_metno::Error| h5_err(&self.path, name, format!("rows {a}..{b}: {e}"));
        let ds = file.dataset(name).map_err(err)?;
        Ok(match kind {
            Kind::Bytes => ds
                .read_slice_1d::<VarLenArray<u8>, _>(a..b)
                .map_err(err)?
                .iter()
                .map(|v| v.as_slice().to_vec())
                .collect(),
            Kind::Unicode => ds
                .read_slice_1d::<VarLenUnicode, _>(a..b)
                .map_err(err)?
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect(),
            Kind::Ascii => ds
                .read_slice_1d::<VarLenAscii, _>(a..b)
                .map_err(err)?
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect(),
        })
    }

    /// The records of rows `[a, b)`.
    fn slab(&self, file: &hdf5_metno::File, a: usize, b: usize) -> Result<Vec<Record>> {
        let images = match &self.image {
            Some(name) => Some(self.read_bytes(file, name, Kind::Bytes, a, b)?),
            None => None,
        };
        let texts = match &self.text {
            Some((name, kind)) => Some(self.read_bytes(file, name, *kind, a, b)?),
            None => None,
        };
        let labels = match &self.label {
            Some(name) => {
                let ds = file
                    .dataset(name)
                    .map_err(|e| h5_err(&self.path, name, e))?;
                Some(
                    ds.read_slice_1d::<i64, _>(a..b)
                        .map_err(|e| h5_err(&self.path, name, format!("rows {a}..{b}: {e}")))?
                        .to_vec(),
                )
            }
            None => None,
        };
        let file_name: Arc<str> = self.path.display().to_string().into();
        let mut out = Vec::with_capacity(b - a);
        for (j, row) in (a..b).enumerate() {
            let key = row.to_string();
            let bad = |reason, detail: String| {
                Record::Bad(BadSample {
                    reason,
                    key: key.clone(),
                    file: file_name.to_string(),
                    detail,
                })
            };
            let image = match &images {
                Some(im) if im[j].is_empty() => {
                    out.push(bad(BadReason::MissingImage, "empty image row".into()));
                    continue;
                }
                Some(im) => Some(ImageData::Encoded(Arc::new(im[j].clone()))),
                None => None,
            };
            let text = match &texts {
                Some(t) => match String::from_utf8(t[j].clone()) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        out.push(bad(BadReason::NonUtf8, e.to_string()));
                        continue;
                    }
                },
                None => None,
            };
            out.push(Record::Sample(Sample {
                key,
                image,
                text,
                label: labels.as_ref().map(|l| l[j]),
                file: file_name.clone(),
                ..Default::default()
            }));
        }
        Ok(out)
    }
}

impl Source for Hdf5 {
    fn open(&self, partition: &Partition) -> Result<RecordIter> {
        partition.check()?;
        let (p, n) = partition.index_and_count();
        let begin = self.start + p * self.len / n;
        let end = self.start + (p + 1) * self.len / n;
        let file = hdf5_metno::File::open(&self.path).map_err(|e| h5_err(&self.path, "/", e))?;
        let me = self.clone();
        let mut next = begin;
        let mut pending = std::collections::VecDeque::new();
        Ok(Box::new(std::iter::from_fn(move || loop {
            if let Some(r) = pending.pop_front() {
                return Some(Ok(r));
            }
            if next >= end {
                return None;
            }
            let b = (next + Self::SLAB).min(end);
            match me.slab(&file, next, b) {
                Ok(recs) => pending.extend(recs),
                Err(e) => {
                    next = end;
                    return Some(Err(e));
                }
            }
            next = b;
        })))
    }

    fn len_hint(&self) -> Option<usize> {
        Some(self.len)
    }

    fn describe(&self) -> String {
        let what = match &self.layout {
            Hdf5Layout::Paired => "paired".to_string(),
            Hdf5Layout::ImageNet { split } => format!("imagenet {split}"),
            Hdf5Layout::Text => "text".to_string(),
        };
        format!("HDF5 {} ({what}, {} rows)", self.path.display(), self.len)
    }
}
