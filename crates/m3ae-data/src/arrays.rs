//! uint8 image arrays in safetensors: tensor `images` U8 `[N, H, W]` (grey) or `[N, H, W, C]`
//! (C = 1, 3, 4) and an optional integer tensor `labels` `[N]`, as in
//! `shared/data/fashion_mnist`. Class names come from the `classes` metadata entry (a JSON list)
//! when present.

use crate::sample::{ImageData, Partition, Record, RecordIter, Sample, Source};
use crate::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An in-memory uint8 image array data set.
#[derive(Debug, Clone)]
pub struct U8Arrays {
    path: PathBuf,
    images: Arc<Vec<u8>>,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    labels: Option<Arc<Vec<i64>>>,
    classes: Vec<String>,
}

impl U8Arrays {
    /// Reads and validates the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let err = |msg: String| Error::Arrays {
            path: path.into(),
            msg,
        };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
        let im = st
            .tensor("images")
            .map_err(|_| err("no tensor `images`".into()))?;
        if im.dtype() != Dtype::U8 {
            return Err(err(format!("`images` is {:?}, expected U8", im.dtype())));
        }
        let (n, h, w, c) = match *im.shape() {
            [n, h, w] => (n, h, w, 1),
            [n, h, w, c] if matches!(c, 1 | 3 | 4) => (n, h, w, c),
            ref s => {
                return Err(err(format!(
                    "`images` has shape {s:?}, expected [N,H,W] or [N,H,W,C]"
                )))
            }
        };
        let labels = match st.tensor("labels") {
            Err(_) => None,
            Ok(l) => {
                if l.shape() != [n] {
                    return Err(err(format!(
                        "`labels` has shape {:?}, expected [{n}]",
                        l.shape()
                    )));
                }
                let d = l.data();
                let v: Vec<i64> = match l.dtype() {
                    Dtype::U8 => d.iter().map(|&x| x as i64).collect(),
                    Dtype::I32 => d
                        .chunks_exact(4)
                        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                        .collect(),
                    Dtype::U32 => d
                        .chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                        .collect(),
                    Dtype::I64 => d
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                        .collect(),
                    t => return Err(err(format!("`labels` has dtype {t:?}"))),
                };
                Some(Arc::new(v))
            }
        };
        let classes = SafeTensors::read_metadata(&bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().as_ref()?.get("classes").cloned())
            .and_then(|s| serde_json::from_str::<Vec<String>>(&s).ok())
            .unwrap_or_default();
        Ok(Self {
            path: path.into(),
            images: Arc::new(im.data().to_vec()),
            n,
            h,
            w,
            c,
            labels,
            classes,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True when there is no image.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// (height, width, channels) of every image.
    pub fn image_shape(&self) -> (usize, usize, usize) {
        (self.h, self.w, self.c)
    }

    /// Class names from the metadata (empty when absent).
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The labels, if the file has them.
    pub fn labels(&self) -> Option<&[i64]> {
        self.labels.as_deref().map(Vec::as_slice)
    }
}

impl Source for U8Arrays {
    fn open(&self, partition: &Partition) -> Result<RecordIter> {
        partition.check()?;
        let (p, n) = partition.index_and_count();
        let me = self.clone();
        let file: Arc<str> = self.path.display().to_string().into();
        Ok(Box::new((p..self.n).step_by(n).map(move |i| {
            let sz = me.h * me.w * me.c;
            Ok(Record::Sample(Sample {
                key: i.to_string(),
                image: Some(ImageData::Pixels {
                    width: me.w,
                    height: me.h,
                    channels: me.c,
                    data: me.images[i * sz..(i + 1) * sz].to_vec(),
                }),
                text: None,
                label: me.labels.as_ref().map(|l| l[i]),
                file: file.clone(),
                ..Default::default()
            }))
        })))
    }

    fn len_hint(&self) -> Option<usize> {
        Some(self.n)
    }

    fn describe(&self) -> String {
        format!(
            "uint8 arrays {} ({} x {}x{}x{})",
            self.path.display(),
            self.n,
            self.h,
            self.w,
            self.c
        )
    }
}
