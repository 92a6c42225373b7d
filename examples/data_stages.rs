//! Per-stage timing of the data pipeline on one thread (decode, transform, reference
//! resampler, tokenise), then the whole `Loader` with 1 and 2 threads, reporting wall-clock
//! samples/s and samples per CPU-second of this process (less sensitive to a shared machine).
//!
//! ```sh
//! M3AE_DATA_DIR=../shared/data cargo run --release --example data_stages
//! ```
//!
//! The samples are the ones of `benches/data_pipeline.rs`: 256x256 quality-90 JPEGs.

use m3ae::data::{
    image::{resample, Layout},
    CaptionedScenes, ImageConfig, ImageData, InMemory, Loader, LoaderConfig, Position, RgbImage,
    ScenesConfig, Source, Tokenizer,
};
use std::sync::Arc;
use std::time::Instant;

#[path = "../benches/common/mod.rs"]
mod common;
use common::samples;

/// CPU seconds (user + system) of this process so far, from /proc (Linux).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // fields 14 and 15 of the full line (utime, stime) are 11 and 12 after the `)`
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU nanoseconds this thread has run, from /proc/thread-self/schedstat (Linux), so that the
/// stage timings do not count the time other processes hold the core.
fn thread_cpu_ns() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// (wall, thread CPU) microseconds per call.
fn per_sample_us(n: usize, f: impl FnMut(usize)) -> (f64, f64) {
    let mut f = f;
    let (t, c) = (Instant::now(), thread_cpu_ns());
    for i in 0..n {
        f(i);
    }
    let cpu = (thread_cpu_ns() - c) / 1e3 / n as f64;
    (t.elapsed().as_secs_f64() * 1e6 / n as f64, cpu)
}

fn main() -> anyhow::Result<()> {
    let n = 256;
    let data = samples(n);
    let tok = match std::env::var_os("M3AE_DATA_DIR") {
        Some(d) => Tokenizer::from_file(
            std::path::Path::new(&d).join("tokenizer/bert-base-uncased/tokenizer.json"),
        )?,
        None => {
            let scenes = CaptionedScenes::new(ScenesConfig::default())?;
            let corpus = scenes.corpus(2000);
            Tokenizer::train_wordpiece(corpus.iter().map(String::as_str), 500)?
        }
    };
    let bytes: Vec<Arc<Vec<u8>>> = data
        .iter()
        .map(|s| match &s.image {
            Some(ImageData::Encoded(b)) => b.clone(),
            _ => unreachable!(),
        })
        .collect();
    let cfg = LoaderConfig::pretrain(64, 224, 16);
    let ic: ImageConfig = cfg.image.unwrap();
    let decoded: Vec<RgbImage> = bytes
        .iter()
        .map(|b| m3ae::data::decode_rgb(b).unwrap())
        .collect();
    let mut out = vec![0f32; 224 * 224 * 3];
    // M3AE_STAGES=loader skips the stage timings (to profile the loader alone)
    let rounds = if std::env::var("M3AE_STAGES").as_deref() == Ok("loader") {
        0
    } else {
        2
    };
    for round in 0..rounds {
        let dec = per_sample_us(n, |i| {
            std::hint::black_box(m3ae::data::decode_rgb(&bytes[i]).unwrap());
        });
        let fast = per_sample_us(n, |i| {
            let mut rng = m3ae::data::seed::rng(0, 1, 0, i as u64);
            ic.apply_into(&decoded[i], &mut rng, Layout::Patches(16), &mut out);
        });
        let reference = per_sample_us(n, |i| {
            let mut rng = m3ae::data::seed::rng(0, 1, 0, i as u64);
            let b = ic.crop_box(decoded[i].width, decoded[i].height, &mut rng);
            std::hint::black_box(resample(&decoded[i], &b, 224, 224));
        });
        let tk = per_sample_us(n, |i| {
            std::hint::black_box(tok.encode(data[i].text.as_deref().unwrap(), 64).unwrap());
        });
        println!(
            "round {round}: per sample on one thread, wall / CPU: decode {:.0} / {:.0} us, \
             crop+resize+flip+normalise+patchify (fast path) {:.0} / {:.0} us, \
             reference resample alone {:.0} / {:.0} us, tokenise {:.0} / {:.0} us",
            dec.0, dec.1, fast.0, fast.1, reference.0, reference.1, tk.0, tk.1
        );
    }
    let src: Arc<dyn Source> = Arc::new(InMemory::new(data));
    let tok = Arc::new(tok);
    for threads in [1usize, 2, 1, 2] {
        let mut c = LoaderConfig::pretrain(64, 224, 16);
        c.num_threads = threads;
        c.epochs = Some(4);
        c.shuffle_buffer = 0;
        let loader = Loader::new(src.clone(), Some(tok.clone()), c)?;
        let (t, c0) = (Instant::now(), cpu_seconds());
        let mut k = 0;
        for b in loader.iter(Position::default()) {
            k += b?.keys.len();
        }
        let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c0);
        println!(
            "loader, {threads} thread(s): {k} samples, {:.0} samples/s wall, {:.0} samples per CPU-second",
            k as f64 / wall,
            k as f64 / cpu
        );
    }
    Ok(())
}
