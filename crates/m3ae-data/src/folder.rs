//! Image folders: `root/<class>/*.{jpg,jpeg,png,webp}`, classes sorted by name (label = index
//! of the class), files sorted within a class. Scanned once when built; files are read when
//! the partition that owns them is iterated.

use crate::sample::{ImageData, Partition, Record, RecordIter, Sample, Source};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// True for the image extensions the crate decodes.
pub fn is_image_path(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("jpg" | "jpeg" | "png" | "webp")
    )
}

/// An image-folder data set.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    files: Vec<(PathBuf, i64)>,
}

impl ImageFolder {
    /// Scans `root`. A root that does not exist, or that holds no class folder, is an error.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let list = |dir: &Path| -> Result<Vec<PathBuf>> {
            let mut v = Vec::new();
            for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
                v.push(e.map_err(|e| Error::io(dir, e))?.path());
            }
            v.sort();
            Ok(v)
        };
        let mut classes = Vec::new();
        let mut files = Vec::new();
        for dir in list(&root)?.into_iter().filter(|p| p.is_dir()) {
            let label = classes.len() as i64;
            classes.push(
                dir.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
            for f in list(&dir)?.into_iter().filter(|p| is_image_path(p)) {
                files.push((f, label));
            }
        }
        if classes.is_empty() {
            return Err(Error::Config {
                field: "image folder",
                msg: format!("{} has no class sub-folder", root.display()),
            });
        }
        Ok(Self {
            root,
            classes,
            files,
        })
    }

    /// Class names, sorted; the label of a sample is its class's index here.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True when there is no image.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl Source for ImageFolder {
    fn open(&self, partition: &Partition) -> Result<RecordIter> {
        partition.check()?;
        let part = *partition;
        let files: Vec<(PathBuf, i64)> = self
            .files
            .iter()
            .enumerate()
            .filter(|(i, _)| part.owns(*i))
            .map(|(_, f)| f.clone())
            .collect();
        let root = self.root.clone();
        Ok(Box::new(files.into_iter().map(move |(p, label)| {
            let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
            let key = p.strip_prefix(&root).unwrap_or(&p).display().to_string();
            Ok(Record::Sample(Sample {
                key,
                image: Some(ImageData::Encoded(Arc::new(bytes))),
                text: None,
                label: Some(label),
                file: p.display().to_string().into(),
                ..Default::default()
            }))
        })))
    }

    fn len_hint(&self) -> Option<usize> {
        Some(self.files.len())
    }

    fn describe(&self) -> String {
        format!(
            "image folder {} ({} classes, {} images)",
            self.root.display(),
            self.classes.len(),
            self.files.len()
        )
    }
}
