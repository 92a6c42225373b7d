//! Pre-trains M3AE `tiny` on the built-in captioned scenes with the library crates only: the
//! data streams of m3ae-data, the model of m3ae-model, the loop of m3ae-train (`Learner`) with
//! checkpoints every 20 steps; run it again and it resumes from the newest one.
//!
//! ```text
//! cargo run --release --example custom_training_loop -- [RUN_DIR] [STEPS]
//! ```

use anyhow::Result;
use m3ae_data::{CaptionedScenes as Scenes, LoaderConfig, MaskConfig, NoiseKind, Streams};
use m3ae_model::{M3ae, M3aeConfig};
use m3ae_train::{FitReport, JsonlSink, Learner, TrainConfig, Trainer};
use std::{path::Path, sync::Arc};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let run = args.next().unwrap_or_else(|| "runs/custom-loop".into());
    m3ae_kernels::alloc::keep_freed_memory(); // fewer page faults, as the `m3ae` binary does
    let r = train(Path::new(&run), args.next().map_or(Ok(60), |s| s.parse())?)?;
    println!(
        "steps {}..{}, checkpoint {:?}",
        r.start_step, r.steps, r.checkpoint
    );
    Ok(())
}

/// Trains (or continues) the run in `run` up to `steps` optimiser steps.
pub fn train(run: &Path, steps: u64) -> Result<FitReport> {
    // 2,000 generated 32 px scenes and a WordPiece vocabulary trained on their captions
    let scenes = Scenes::new(m3ae_data::ScenesConfig {
        len: 2000,
        image_size: 32,
        ..Default::default()
    })?;
    let tokenizer = scenes.train_tokenizer(2000, 500)?;
    let mut cfg = M3aeConfig::preset("tiny")?;
    (cfg.text_vocab_size, cfg.text_length) = (tokenizer.vocab_size(), 24);

    // the official augmentation and batch-shared masks at the model's ratios, as one stream
    let mut lc = LoaderConfig::pretrain(32, cfg.image_size, cfg.patch_size);
    lc.text_len = Some(cfg.text_length);
    lc.masks = Some(MaskConfig::from_model(&cfg, NoiseKind::Shared));
    let tokenizer = Some(Arc::new(tokenizer));
    let source = Streams::from_source(1, 0, 1, true, Arc::new(scenes), tokenizer, &lc)?;

    // AdamW with the official decay mask and warmup + cosine, in the library's loop
    let tc = TrainConfig {
        steps,
        batch_size: 32,
        lr_peak: 4e-3,
        warmup_steps: 10,
        ..Default::default()
    };
    let trainer = Trainer::new(M3ae::init(&cfg, 0, &candle_core::Device::Cpu)?, tc)?;
    std::fs::create_dir_all(run)?;
    let fitted = Learner::new(trainer, source)
        .checkpoints(run.join("checkpoints"), 20, 2)
        .resume_latest()?
        .log_every(10)
        .sink(Box::new(JsonlSink::open(&run.join("metrics.jsonl"))?))
        .fit()?;
    Ok(fitted.report)
}
