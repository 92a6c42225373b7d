//! Helpers shared by the root package's integration tests: fresh temporary folders, the
//! official checkpoint fixtures, tensors as bit patterns for exact comparisons and the largest
//! difference of two checkpoints; for the
//! `m3ae` command-line tests (`tests/eval_cli.rs`, `tests/eval_cli_errors.rs`), running the
//! binary, small generated data sets (uint8 arrays, WebDataset shards) and saved checkpoints.
#![allow(dead_code)]

use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// Largest |a - b| over every tensor of two sets of tensors with the same names (two
/// checkpoints' `model.safetensors`, say).
pub fn max_abs_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (k, x) in a {
        let y = b.get(k).unwrap_or_else(|| panic!("{k} missing"));
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(d);
    }
    worst
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

/// Runs a prepared command (a job, perhaps under a launcher) and returns its stdout and stderr
/// together; panics with that text if it fails.
pub fn run_ok(mut c: Command) -> String {
    let out = c.output().expect("starting the job");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "job failed: {text}");
    text
}

pub fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_m3ae"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("the m3ae binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
/// `n` 28x28 grey images of `classes` classes: class c has a bright 8x8 square at a
/// class-dependent place, plus a little deterministic noise.
pub fn write_u8_arrays(path: &Path, n: usize, classes: usize) {
    let mut images = vec![0u8; n * 28 * 28];
    let mut labels = vec![0u8; n];
    for i in 0..n {
        let c = i % classes;
        labels[i] = c as u8;
        let (y0, x0) = ((c / 3) * 9 + 1, (c % 3) * 9 + 1);
        for y in 0..28 {
            for x in 0..28 {
                let inside = (y0..y0 + 8).contains(&y) && (x0..x0 + 8).contains(&x);
                let noise = ((i * 131 + y * 29 + x * 7) % 23) as u8;
                images[i * 784 + y * 28 + x] = if inside { 230 - noise } else { noise };
            }
        }
    }
    let views = vec![
        (
            "images",
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![n, 28, 28], &images)
                .unwrap(),
        ),
        (
            "labels",
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![n], &labels).unwrap(),
        ),
    ];
    let meta = HashMap::from([(
        "classes".to_string(),
        serde_json_list((0..classes).map(|c| format!("c{c}"))),
    )]);
    safetensors::tensor::serialize_to_file(views, Some(meta), path).unwrap();
}

fn serde_json_list(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", v.join(","))
}
/// A WebDataset shard of `n` samples: a JPEG that is red for category `warm/...` and blue for
/// `cold/...` (with a little variation), a caption and a json whose `category` names the class.
/// Appends a file member to a tar shard being built.
pub fn member(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, data).unwrap();
}

/// `img` encoded as a JPEG file.
pub fn jpeg(img: image::RgbImage) -> Vec<u8> {
    let mut jpg = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut jpg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    jpg
}

pub fn write_category_shard(path: &Path, n: usize, offset: usize) {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..n {
        let j = i + offset;
        let warm = j.is_multiple_of(2);
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            let v = ((x + y + j as u32) % 40) as u8;
            if warm {
                image::Rgb([200 + v, 40, 30])
            } else {
                image::Rgb([30, 60, 200 + v])
            }
        });
        let jpg = jpeg(img);
        let key = format!("{j:09}");
        let category = if warm { "warm/fire" } else { "cold/ice/deep" };
        member(&mut b, &format!("{key}.jpg"), &jpg);
        member(&mut b, &format!("{key}.txt"), b"a picture");
        member(
            &mut b,
            &format!("{key}.json"),
            format!("{{\"key\": \"{key}\", \"category\": \"{category}\"}}").as_bytes(),
        );
    }
    std::fs::write(path, b.into_inner().unwrap()).unwrap();
}
/// A checkpoint folder `dir/step-00000001` holding `model` with every weight replaced by
/// NaN (`nan`) or as is; returns the folder.
pub fn save_checkpoint(dir: &Path, model: &m3ae::model::AnyModel, nan: bool) -> PathBuf {
    let ckpt = dir.join("step-00000001");
    std::fs::create_dir_all(&ckpt).unwrap();
    let mut tensors = model.params().tensors();
    if nan {
        for t in tensors.values_mut() {
            *t = (t.ones_like().unwrap() * f64::NAN).unwrap();
        }
    }
    m3ae::model::params::write_safetensors(
        &ckpt.join("model.safetensors"),
        &tensors,
        HashMap::from([(
            "m3ae_config".to_string(),
            serde_json::to_string(model.config()).unwrap(),
        )]),
    )
    .unwrap();
    ckpt
}
pub fn random_m3ae(cfg: &m3ae::model::M3aeConfig, seed: u64) -> m3ae::model::AnyModel {
    m3ae::model::AnyModel::M3ae(
        m3ae::model::M3ae::init(cfg, seed, &candle_core::Device::Cpu).unwrap(),
    )
}
