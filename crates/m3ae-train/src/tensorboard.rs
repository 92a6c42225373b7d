//! A TensorBoard event-file writer (scalars), so `tensorboard --logdir runs` shows the curves.
//!
//! Written from the file format: a sequence of TFRecords (`u64` length, masked CRC-32C of the
//! length, the payload, masked CRC-32C of the payload), each payload an `Event` protocol buffer:
//! `wall_time` (field 1, double), `step` (field 2, varint), `file_version` (field 3, string) in the
//! first record, `summary` (field 5) holding `Value { tag (1, string), simple_value (2, float) }`.
//! The protobuf encoding is done by hand (a few fields), and CRC-32C by a small table.

use crate::metrics::MetricSink;
use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

fn crc32c_table() -> &'static [u32; 256] {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    })
}

/// CRC-32C (Castagnoli) of `data`.
///
/// ```
/// assert_eq!(m3ae_train::tensorboard::crc32c(b"123456789"), 0xE306_9283);
/// ```
pub fn crc32c(data: &[u8]) -> u32 {
    let t = crc32c_table();
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, ((field << 3) | wire) as u64);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    key(out, field, 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

fn event(wall_time: f64, step: u64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    key(&mut e, 1, 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut e, 2, 0);
    varint(&mut e, step);
    body(&mut e);
    e
}

/// Appends scalar summaries to `events.out.tfevents.<time>.<host>` in a folder.
pub struct TensorBoardSink {
    path: PathBuf,
    file: std::fs::File,
}

impl TensorBoardSink {
    /// Creates a new event file in `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.to_path_buf(),
            error: e,
        })?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let path = dir.join(format!(
            "events.out.tfevents.{}.m3ae.{}",
            now as u64,
            std::process::id()
        ));
        let file = std::fs::File::create(&path).map_err(|e| Error::Io {
            path: path.clone(),
            error: e,
        })?;
        let mut s = Self { path, file };
        let first = event(now, 0, |e| bytes_field(e, 3, b"brain.Event:2"));
        s.write_record(&first)?;
        Ok(s)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&rec)
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::Io {
                path: self.path.clone(),
                error: e,
            })
    }

    /// Writes one scalar.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f32) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut v = Vec::new();
        bytes_field(&mut v, 1, tag.as_bytes());
        key(&mut v, 2, 5);
        v.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::new();
        bytes_field(&mut summary, 1, &v);
        let e = event(now, step, |e| bytes_field(e, 5, &summary));
        self.write_record(&e)
    }
}

impl MetricSink for TensorBoardSink {
    fn record(&mut self, step: u64, values: &serde_json::Value) -> Result<()> {
        if let Some(m) = values.as_object() {
            for (k, v) in m {
                if let Some(x) = v.as_f64() {
                    self.scalar(k, step, x as f32)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_framed_with_valid_checksums() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("m3ae-tb-{}", std::process::id()));
        let mut tb = TensorBoardSink::create(&dir)?;
        tb.scalar("loss", 3, 1.5)?;
        let bytes = std::fs::read(tb.path())?;
        let mut off = 0;
        let mut n = 0;
        while off < bytes.len() {
            let len = u64::from_le_bytes(bytes[off..off + 8].try_into()?) as usize;
            assert_eq!(
                u32::from_le_bytes(bytes[off + 8..off + 12].try_into()?),
                masked_crc(&bytes[off..off + 8])
            );
            let data = &bytes[off + 12..off + 12 + len];
            assert_eq!(
                u32::from_le_bytes(bytes[off + 12 + len..off + 16 + len].try_into()?),
                masked_crc(data)
            );
            off += 16 + len;
            n += 1;
        }
        assert_eq!(n, 2);
        // the scalar's tag and value are inside the last record
        let tail = &bytes[bytes.len() - 40..];
        assert!(tail.windows(4).any(|w| w == b"loss"));
        assert!(tail.windows(4).any(|w| w == 1.5f32.to_le_bytes()));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
