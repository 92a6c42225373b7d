//! Helpers shared by the root package's integration tests: fresh temporary folders, the
//! official checkpoint fixtures, and tensors as bit patterns for exact comparisons.
#![allow(dead_code)]

use candle_core::{DType, Tensor};
use std::path::{Path, PathBuf};

/// A fresh (emptied) folder `m3ae-<suite>-<pid>-<name>` under the system temp dir.
pub fn temp_dir(suite: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("m3ae-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `tests/fixtures/official_checkpoint`.
pub fn ckpt_dir() -> PathBuf {
    fixtures().join("official_checkpoint")
}

/// The values of a tensor (as f32) as bit patterns, for bit-exact comparisons.
pub fn f32_bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 tensor")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}
