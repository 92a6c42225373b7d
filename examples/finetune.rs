//! Fine-tuning through the library API: the image encoder of a model (a checkpoint given as the
//! first argument, or a random-init tiny M3AE) becomes a classifier of the captioned scenes'
//! shapes with the official recipe (layer decay, mixup / CutMix, label smoothing), evaluated on
//! held-out scenes every epoch; the best classifier then labels a few test images.
//!
//! ```text
//! cargo run --release --example finetune                     # random-init tiny model
//! cargo run --release --example finetune -- runs/tiny-scenes # the default job's checkpoint
//! ```

use m3ae::eval::finetune::{load_classifier, predict, Finetune, FinetuneConfig};
use m3ae::eval::{load_model, DataOptions, DataSpec, ModelSource};

fn main() -> anyhow::Result<()> {
    let source = match std::env::args().nth(1) {
        Some(p) => ModelSource::Checkpoint(p.into()),
        None => ModelSource::RandomInit {
            preset: "tiny".into(),
            seed: 0,
            mae: false,
        },
    };
    let base = load_model(&source, &candle_core::Device::Cpu)?;
    // a short run: without mixup / CutMix (they pay off over long schedules)
    let mut cfg = FinetuneConfig {
        epochs: 8,
        warmup_epochs: 1,
        batch_size: 64,
        lr_peak: 2e-3,
        ..Default::default()
    };
    cfg.mixup.mixup_alpha = 0.0;
    cfg.mixup.cutmix_alpha = 0.0;
    let train: DataSpec = "scenes:train:2048".parse()?;
    let val: DataSpec = "scenes:test:256".parse()?;
    let out = std::env::temp_dir().join(format!("m3ae-finetune-example-{}", std::process::id()));
    let report = Finetune::new(&base, cfg, train, val.clone(), &out)?
        .on_eval(|e| println!("epoch {}: top-1 {:.1}%", e.epoch, 100.0 * e.top1))
        .run()?;
    println!(
        "best top-1 {:.1}% (epoch {}) in {:.1}s",
        100.0 * report.best_top1,
        report.best_epoch,
        report.train_seconds
    );
    // the saved classifier, as `m3ae predict` loads it
    let saved = load_classifier(&out, &candle_core::Device::Cpu)?;
    let p = predict(
        &saved.classifier,
        &"scenes:test:8".parse()?,
        &DataOptions::default(),
    )?;
    println!(
        "{}: predicted {:?}, labels {:?}",
        saved.file.display(),
        p.argmax()?,
        p.labels
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
