//! Helpers shared by the integration tests: temporary folders and small files written by the
//! tests themselves (tar shards, JPEG / PNG images, manifests).
#![allow(dead_code)]

use std::io::Cursor;
use std::path::{Path, PathBuf};

/// A fresh temporary folder under `std::env::temp_dir()`, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "m3ae-data-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `w x h` RGB gradient image encoded as JPEG.
pub fn jpeg(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7) as u8 ^ seed, (y * 5) as u8, seed.wrapping_mul(3)])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
        .unwrap();
    out
}

/// A `w x h` RGBA image (transparent left half) encoded as PNG.
pub fn png_rgba(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(w, h, |x, _| {
        image::Rgba([0, 0, 0, if x < w / 2 { 0 } else { 255 }])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgba8(img)
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// One member of a tar file.
pub fn member(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append_data(&mut h, name, data).unwrap();
}

/// A shard of `n` samples keyed `{shard:05}{i:04}` with jpg, txt, json and cls members.
pub fn shard_bytes(shard: usize, n: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..n {
        let key = format!("{shard:05}{i:04}");
        member(
            &mut b,
            &format!("{key}.jpg"),
            &jpeg(24, 20, (shard * 31 + i) as u8),
        );
        member(
            &mut b,
            &format!("{key}.txt"),
            format!("caption {shard} {i}").as_bytes(),
        );
        member(&mut b, &format!("{key}.json"), b"{\"status\": \"success\"}");
        member(
            &mut b,
            &format!("{key}.cls"),
            format!("{}", i % 3).as_bytes(),
        );
    }
    b.into_inner().unwrap()
}

/// Writes shards with the given sample counts as `dir/{00000..}.tar`.
pub fn write_shards(dir: &Path, counts: &[usize]) -> Vec<PathBuf> {
    counts
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            let p = dir.join(format!("{s:05}.tar"));
            std::fs::write(&p, shard_bytes(s, n)).unwrap();
            p
        })
        .collect()
}

/// `M3AE_DATA_DIR` (the tests that need it are `#[ignore]`d; run with `--ignored`).
pub fn data_dir() -> PathBuf {
    PathBuf::from(
        std::env::var_os("M3AE_DATA_DIR")
            .expect("set M3AE_DATA_DIR to the shared data folder to run the ignored tests"),
    )
}

/// The good samples of one partition (a bad record fails the test).
pub fn samples(src: &dyn m3ae_data::Source, p: &m3ae_data::Partition) -> Vec<m3ae_data::Sample> {
    src.open(p)
        .unwrap()
        .map(|r| match r.unwrap() {
            m3ae_data::Record::Sample(s) => s,
            m3ae_data::Record::Bad(b) => panic!("unexpected bad record {b}"),
        })
        .collect()
}

/// Every sample read exactly once over `ranks x workers` partitions of `total`.
pub fn assert_split_exact(src: &dyn m3ae_data::Source, ranks: usize, workers: usize, total: usize) {
    let mut seen = std::collections::BTreeMap::new();
    for rank in 0..ranks {
        for worker in 0..workers {
            let p = m3ae_data::Partition {
                rank,
                world_size: ranks,
                worker,
                num_workers: workers,
                seed: 5,
                epoch: 2,
            };
            for s in samples(src, &p) {
                *seen.entry(s.key).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(seen.len(), total, "samples lost");
    assert!(seen.values().all(|&n| n == 1), "a sample was read twice");
}

/// The kinds of [`attack_shard`].
pub const ATTACKS: [&str; 6] = [
    "gnu_long_name",
    "gnu_long_link",
    "pax_local",
    "pax_global",
    "pax_size",
    "base256_size",
];

/// An 8 KiB hostile shard (issue 16, defect 3): its first header claims gigabytes. The GNU
/// long-name / long-link and pax headers claim 3 GiB of extension data; `pax_size` is a valid
/// pax header whose `size` record gives the next member (`k.txt`) 3 GiB; `base256_size` a GNU
/// header with a base-256 size of 1 TiB. The rest of the 8 KiB is `A` bytes.
pub fn attack_shard(kind: &str) -> Vec<u8> {
    fn header(name: &str, kind: tar::EntryType, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_mode(0o644);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_cksum();
        h.as_bytes().to_vec()
    }
    const GIB3: u64 = 3 << 30;
    let mut out = match kind {
        "gnu_long_name" => header("././@LongLink", tar::EntryType::GNULongName, GIB3),
        "gnu_long_link" => header("././@LongLink", tar::EntryType::GNULongLink, GIB3),
        "pax_local" => header("PaxHeaders/k.txt", tar::EntryType::XHeader, GIB3),
        "pax_global" => header("PaxHeaders/global", tar::EntryType::XGlobalHeader, GIB3),
        "pax_size" => {
            let rec = format!("19 size={GIB3}\n");
            assert_eq!(rec.len(), 19);
            let mut v = header("PaxHeaders/k.txt", tar::EntryType::XHeader, 19);
            v.extend_from_slice(rec.as_bytes());
            v.resize(1024, 0);
            v.extend(header("k.txt", tar::EntryType::Regular, 1));
            v
        }
        "base256_size" => header("k.txt", tar::EntryType::Regular, 1 << 40),
        other => panic!("unknown attack {other}"),
    };
    out.resize(8192, b'A');
    out
}
