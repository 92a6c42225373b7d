//! JSONL and CSV manifests: one sample per line with an `image` path (relative to the manifest's
//! folder), a `caption` (or `text`) and an optional integer `label`.
//!
//! ```text
//! {"image": "img/0001.jpg", "caption": "a brown potato", "label": 3}
//! ```
//! ```text
//! image,caption,label
//! img/0001.jpg,"a brown potato, peeled",3
//! ```
//! A line that does not parse, or an image file that does not exist, is an error naming the
//! manifest and the line; a caption that is not UTF-8 (or an image above `MAX_MEMBER_BYTES`)
//! is kept as a fault of the sample ([`crate::PartFault`]): the loader skips the sample only
//! when it needs that part. The manifest is streamed; only the lines of the partition read their
//! image file.

use crate::sample::{ImageData, PartFault, Partition, Record, RecordIter, Sample, Source};
use crate::webdataset::MAX_MEMBER_BYTES;
use crate::{BadReason, Error, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Manifest format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    /// One JSON object a line.
    Jsonl,
    /// Comma-separated with a header row.
    Csv,
}

/// A JSONL or CSV manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    path: PathBuf,
    format: ManifestFormat,
}

/// One parsed line.
struct Entry {
    line: usize,
    image: Option<String>,
    caption: std::result::Result<Option<String>, String>,
    label: Option<i64>,
}

impl Manifest {
    /// A manifest; the format follows the extension (`.csv` is CSV, anything else JSONL). The
    /// file must exist.
    pub fn new(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        let format = match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("csv") => ManifestFormat::Csv,
            _ => ManifestFormat::Jsonl,
        };
        Ok(Self { path, format })
    }

    fn entries(&self) -> Result<Box<dyn Iterator<Item = Result<Entry>> + Send>> {
        let f = std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let path = self.path.clone();
        match self.format {
            ManifestFormat::Jsonl => {
                let mut r = BufReader::new(f);
                let mut line = 0usize;
                Ok(Box::new(std::iter::from_fn(move || loop {
                    let mut buf = Vec::new();
                    line += 1;
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) => return None,
                        Ok(_) => {}
                        Err(e) => return Some(Err(Error::io(&path, e))),
                    }
                    if buf.iter().all(|b| b.is_ascii_whitespace()) {
                        continue;
                    }
                    return Some(parse_json_line(&path, line, &buf));
                })))
            }
            ManifestFormat::Csv => {
                let mut r = csv::ReaderBuilder::new().flexible(true).from_reader(f);
                let header = r.byte_headers().map_err(|e| Error::Parse {
                    path: path.clone(),
                    line: 1,
                    msg: e.to_string(),
                })?;
                let col = |name: &str| header.iter().position(|h| h == name.as_bytes());
                let (ci, cc, cl) = (
                    col("image"),
                    col("caption").or_else(|| col("text")),
                    col("label"),
                );
                if ci.is_none() && cc.is_none() {
                    return Err(Error::Parse {
                        path,
                        line: 1,
                        msg: "the header has neither an `image` nor a `caption` column".into(),
                    });
                }
                let mut rec = csv::ByteRecord::new();
                Ok(Box::new(std::iter::from_fn(move || {
                    match r.read_byte_record(&mut rec) {
                        Ok(false) => None,
                        Err(e) => Some(Err(Error::Parse {
                            path: path.clone(),
                            line: e.position().map(|p| p.line() as usize).unwrap_or(0),
                            msg: e.to_string(),
                        })),
                        Ok(true) => {
                            let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
                            let field = |c: Option<usize>| c.and_then(|c| rec.get(c));
                            let image = field(ci)
                                .map(|b| String::from_utf8_lossy(b).into_owned())
                                .filter(|s| !s.is_empty());
                            let caption = match field(cc) {
                                None => Ok(None),
                                Some(b) => match std::str::from_utf8(b) {
                                    Ok(s) => Ok(Some(s.to_string())),
                                    Err(e) => Err(e.to_string()),
                                },
                            };
                            let label = match field(cl).map(|b| {
                                std::str::from_utf8(b)
                                    .ok()
                                    .and_then(|s| s.trim().parse::<i64>().ok())
                            }) {
                                Some(None) if !field(cl).unwrap_or_default().is_empty() => {
                                    return Some(Err(Error::Parse {
                                        path: path.clone(),
                                        line,
                                        msg: "label is not an integer".into(),
                                    }))
                                }
                                l => l.flatten(),
                            };
                            Some(Ok(Entry {
                                line,
                                image,
                                caption,
                                label,
                            }))
                        }
                    }
                })))
            }
        }
    }
}

/// Reads an image file named by a manifest line: only regular files (a path to a device or a
/// FIFO, e.g. `/dev/zero`, would otherwise read forever or block), at most
/// [`MAX_MEMBER_BYTES`] (`None` when larger).
fn read_image_file(p: &Path) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    if !std::fs::metadata(p)?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let f = std::fs::File::open(p)?;
    let mut buf = Vec::new();
    f.take(MAX_MEMBER_BYTES + 1).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= MAX_MEMBER_BYTES).then_some(buf))
}

fn parse_json_line(path: &Path, line: usize, buf: &[u8]) -> Result<Entry> {
    let perr = |msg: String| Error::Parse {
        path: path.into(),
        line,
        msg,
    };
    let text = match std::str::from_utf8(buf) {
        Ok(t) => t,
        Err(e) => {
            return Ok(Entry {
                line,
                image: None,
                caption: Err(e.to_string()),
                label: None,
            })
        }
    };
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| perr(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| perr("not a JSON object".into()))?;
    let image = match obj.get("image") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(perr("`image` is not a string".into())),
    };
    let caption = match obj.get("caption").or_else(|| obj.get("text")) {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(perr("`caption` is not a string".into())),
    };
    let label = match obj.get("label") {
        None | Some(serde_json::Value::Null) => None,
        Some(l) => Some(
            l.as_i64()
                .ok_or_else(|| perr("`label` is not an integer".into()))?,
        ),
    };
    Ok(Entry {
        line,
        image,
        caption: Ok(caption),
        label,
    })
}

impl Source for Manifest {
    fn open(&self, partition: &Partition) -> Result<RecordIter> {
        partition.check()?;
        let part = *partition;
        let mut entries = self.entries()?;
        let dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let path = self.path.clone();
        let file: Arc<str> = path.display().to_string().into();
        let mut index = 0usize;
        Ok(Box::new(std::iter::from_fn(move || loop {
            let e = match entries.next()? {
                Ok(e) => e,
                Err(e) => return Some(Err(e)),
            };
            let i = index;
            index += 1;
            if !part.owns(i) {
                continue;
            }
            let key = format!("line {}", e.line);
            let (text, text_fault) = match e.caption {
                Ok(c) => (c, None),
                Err(msg) => (
                    None,
                    Some(PartFault {
                        reason: BadReason::NonUtf8,
                        detail: msg,
                    }),
                ),
            };
            let mut image_fault = None;
            let image = match e.image {
                None => None,
                Some(rel) => {
                    let p = dir.join(&rel);
                    match read_image_file(&p) {
                        Ok(Some(b)) => Some(ImageData::Encoded(Arc::new(b))),
                        Ok(None) => {
                            image_fault = Some(PartFault {
                                reason: BadReason::Oversized,
                                detail: format!("{} exceeds {MAX_MEMBER_BYTES} bytes", p.display()),
                            });
                            None
                        }
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                            return Some(Err(Error::MissingFile {
                                manifest: path.clone(),
                                line: e.line,
                                image: p,
                            }))
                        }
                        Err(err) => return Some(Err(Error::io(p, err))),
                    }
                }
            };
            return Some(Ok(Record::Sample(Sample {
                key,
                image,
                text,
                label: e.label,
                file: file.clone(),
                text_fault,
                image_fault,
            })));
        })))
    }

    fn describe(&self) -> String {
        format!("manifest {}", self.path.display())
    }
}
