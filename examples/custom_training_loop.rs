//! Drives the trainer from the library API: M3AE `tiny` on the built-in captioned scenes.
//!
//! ```text
//! cargo run --release --example custom_training_loop
//! ```

use anyhow::Result;
use candle_core::Device;
use m3ae::data::{CaptionedScenes, Loader, LoaderConfig, Position, ScenesConfig, Tokenizer};
use m3ae::model::{M3ae, M3aeConfig};
use m3ae::train::{TrainBatch, TrainConfig, Trainer};
use std::sync::Arc;

fn main() -> Result<()> {
    // As the `m3ae` binary does: keep freed tensor buffers in the heap (fewer page faults).
    m3ae_kernels::alloc::keep_freed_memory();
    // Data: 2,000 generated scenes, a WordPiece vocabulary trained on their captions.
    let scenes = CaptionedScenes::new(ScenesConfig {
        len: 2000,
        image_size: 32,
        ..Default::default()
    })?;
    let corpus = scenes.corpus(2000);
    let tokenizer = Tokenizer::train_wordpiece(corpus.iter().map(String::as_str), 500)?;

    // Model: the tiny preset (32 px images, patch 8) with the tokenizer's vocabulary.
    let mut cfg = M3aeConfig::preset("tiny")?;
    cfg.text_vocab_size = tokenizer.vocab_size();
    cfg.text_length = 24;
    let model = M3ae::init(&cfg, 0, &Device::Cpu)?;

    // Loader: the official augmentation, batch-shared masks at the model's ratios.
    let mut lc = LoaderConfig::pretrain(32, cfg.image_size, cfg.patch_size);
    lc.text_len = Some(cfg.text_length);
    let loader = Loader::new(Arc::new(scenes), Some(Arc::new(tokenizer)), lc)?;

    // Trainer: AdamW with the official decay mask, warmup + cosine.
    let tc = TrainConfig {
        steps: 60,
        batch_size: 32,
        lr_peak: 4e-3,
        warmup_steps: 10,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, tc)?;

    for batch in loader.iter(Position::default()).take(60) {
        let b = batch?;
        let report = trainer.train_step(&TrainBatch {
            input: b.input,
            image_masking: b.image_masking,
            text_masking: b.text_masking,
            unpaired: None,
        })?;
        if report.step % 10 == 0 {
            println!(
                "step {:>3}  image loss {:.4}  text loss {:.3}  lr {:.2e}",
                report.step, report.scalars["image_loss"], report.scalars["text_loss"], report.lr
            );
        }
    }
    let dir = std::env::temp_dir().join("m3ae-custom-loop");
    let ck = trainer.save_checkpoint(&dir, serde_json::Value::Null, serde_json::Value::Null, 1)?;
    println!("checkpoint: {}", ck.display());
    Ok(())
}
