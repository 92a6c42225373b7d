//! Text corpora for unpaired text: `.txt` files (one passage a line) or `.jsonl` files (a
//! `text` field per line). Streamed line by line; lines are split over partitions by their
//! running index over all files. An empty line or a line that is not UTF-8 is skipped and
//! counted; a `.jsonl` line that does not parse is an error naming the file and line.

use crate::sample::{Partition, Record, RecordIter, Sample, Source};
use crate::{BadReason, BadSample, Error, Result};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::Arc;

/// A text corpus of one or more files.
#[derive(Debug, Clone)]
pub struct TextCorpus {
    files: Vec<PathBuf>,
}

impl TextCorpus {
    /// A corpus over `files` (each `.jsonl` or anything else read as plain text). Every file must
    /// exist.
    pub fn new(files: Vec<PathBuf>) -> Result<Self> {
        for f in &files {
            std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        }
        Ok(Self { files })
    }

    /// A corpus over one file.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Self> {
        Self::new(vec![path.into()])
    }
}

fn line_record(path: &std::path::Path, file: &Arc<str>, line: usize, buf: &[u8]) -> Result<Record> {
    let key = format!("{}:{line}", file);
    let bad = |reason, detail: String| {
        Ok(Record::Bad(BadSample {
            reason,
            key: key.clone(),
            file: file.to_string(),
            detail,
        }))
    };
    let s = match std::str::from_utf8(buf) {
        Ok(s) => s.trim_end_matches(['\n', '\r']),
        Err(e) => return bad(BadReason::NonUtf8, e.to_string()),
    };
    let jsonl = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    let text = if jsonl {
        let v: serde_json::Value = serde_json::from_str(s).map_err(|e| Error::Parse {
            path: path.into(),
            line,
            msg: e.to_string(),
        })?;
        match v.get("text") {
            Some(serde_json::Value::String(t)) => t.clone(),
            _ => return bad(BadReason::MissingCaption, "no string `text` field".into()),
        }
    } else {
        s.to_string()
    };
    if text.trim().is_empty() {
        return bad(BadReason::EmptyCaption, "empty line".into());
    }
    Ok(Record::Sample(Sample {
        key,
        image: None,
        text: Some(text),
        label: None,
        file: file.clone(),
        ..Default::default()
    }))
}

impl Source for TextCorpus {
    fn open(&self, partition: &Partition) -> Result<RecordIter> {
        partition.check()?;
        let part = *partition;
        let mut files = self.files.clone().into_iter();
        let mut current: Option<(PathBuf, Arc<str>, BufReader<std::fs::File>, usize)> = None;
        let mut index = 0usize;
        Ok(Box::new(std::iter::from_fn(move || loop {
            if current.is_none() {
                let p = files.next()?;
                let f = match std::fs::File::open(&p) {
                    Ok(f) => f,
                    Err(e) => return Some(Err(Error::io(&p, e))),
                };
                let name: Arc<str> = p.display().to_string().into();
                current = Some((p, name, BufReader::with_capacity(1 << 16, f), 0));
            }
            let (p, name, r, line) = current.as_mut()?;
            let mut buf = Vec::new();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) => {
                    current = None;
                    continue;
                }
                Ok(_) => {}
                Err(e) => return Some(Err(Error::io(p.as_path(), e))),
            }
            *line += 1;
            let i = index;
            index += 1;
            if part.owns(i) {
                return Some(line_record(p, name, *line, &buf));
            }
        })))
    }

    fn describe(&self) -> String {
        format!("text corpus ({} files)", self.files.len())
    }
}
