//! Metric sinks: where per-step scalars go. [`JsonlSink`] appends one JSON object per line to
//! `metrics.jsonl` (flushed every line, so a crash loses nothing written before it).

use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Receives one record per logged step.
pub trait MetricSink {
    /// Records `values` (a JSON object) for `step`.
    fn record(&mut self, step: u64, values: &serde_json::Value) -> Result<()>;
}

/// Appends JSON lines to a file.
pub struct JsonlSink {
    path: PathBuf,
    file: std::fs::File,
}

impl JsonlSink {
    /// Opens (appending) or creates `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::Io {
                path: path.to_path_buf(),
                error: e,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }
}

impl MetricSink for JsonlSink {
    fn record(&mut self, step: u64, values: &serde_json::Value) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        if let Some(m) = values.as_object() {
            for (k, v) in m {
                obj.insert(k.clone(), v.clone());
            }
        }
        let line = serde_json::to_string(&serde_json::Value::Object(obj))?;
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::Io {
                path: self.path.clone(),
                error: e,
            })
    }
}
