//! The linear probe through the library API: features of a model (a checkpoint given as the
//! first argument, or a random-init tiny M3AE) on the captioned scenes (shape labels), the
//! official probe (BatchNorm + linear, LARS, warmup + cosine) and the kNN classifier.
//!
//! ```text
//! cargo run --release --example linear_probe                     # random-init tiny model
//! cargo run --release --example linear_probe -- runs/x           # newest checkpoint of a run
//! ```

use m3ae::eval::ProbeConfig;
use m3ae::eval::{
    extract, load_model, probe_report, DataOptions, DataSpec, KnnConfig, ModelSource,
};

fn main() -> anyhow::Result<()> {
    let source = match std::env::args().nth(1) {
        Some(p) => ModelSource::Checkpoint(p.into()),
        None => ModelSource::RandomInit {
            preset: "tiny".into(),
            seed: 0,
            mae: false,
        },
    };
    let model = load_model(&source, &candle_core::Device::Cpu)?;
    let opts = DataOptions::default(); // cls pooling, CC12M normalisation, shape labels
    let train_spec: DataSpec = "scenes:train:2000".parse()?;
    let test_spec: DataSpec = "scenes:test:500".parse()?;
    let t0 = std::time::Instant::now();
    let train = extract(&model, &train_spec, &opts, None)?;
    let test = extract(&model, &test_spec, &opts, None)?;
    println!(
        "features: train {:?}, test {:?} ({:.1}s)",
        train.features.dims(),
        test.features.dims(),
        t0.elapsed().as_secs_f64()
    );
    let cfg = ProbeConfig {
        epochs: 30,
        ..Default::default()
    };
    let (report, _head) = probe_report(&train, &test, &cfg, KnnConfig::default())?;
    println!(
        "probe: top-1 {:.2}% top-{} {:.2}% ({:.1}s); kNN (k=20, T=0.07) top-1 {:.2}%",
        100.0 * report.top1,
        report.top5_k,
        100.0 * report.top5,
        report.train_seconds,
        100.0 * report.knn_top1.unwrap_or(f64::NAN)
    );
    Ok(())
}
