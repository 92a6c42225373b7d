//! One M3AE training-step timing at a chosen text vocabulary (the text head's share of a step).
//!
//! `RAYON_NUM_THREADS=2 cargo run --release --example text_head_step -- <vocab> [fused|reference] [steps]`
//!
//! The CPU-sized configuration of docs/performance.md ("Text head"): encoder 192 x 6 (3 heads),
//! decoder 128 x 2 (4 heads), 64 px images in patches of 8, text of 32 tokens, batch 64,
//! official masking ratios; `m3ae_train::bench::preset_workload` times forward, backward and
//! AdamW (medians after 2 warm-up steps). Freed memory stays in the heap as in the `m3ae` binary
//! (`keep_freed_memory`). Run the vocabularies alternately and compare medians.

use m3ae::model::M3aeConfig;

fn main() -> anyhow::Result<()> {
    // as the `m3ae` binary does: keep freed buffers in the heap (no page faults per step)
    m3ae::kernels::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let vocab: usize = args
        .first()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(30_522);
    let kernels = args.get(1).map(String::as_str).unwrap_or("fused");
    let steps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let cfg = M3aeConfig {
        emb_dim: 192,
        depth: 6,
        num_heads: 3,
        dec_emb_dim: 128,
        dec_depth: 2,
        dec_num_heads: 4,
        image_size: 64,
        patch_size: 8,
        text_length: 32,
        text_vocab_size: vocab,
        kernels: serde_json::from_value(serde_json::Value::String(kernels.into()))?,
        ..M3aeConfig::default()
    };
    let r = m3ae::train::bench::preset_workload(
        &cfg,
        64,
        steps,
        &candle_core::Device::Cpu,
        m3ae::model::Precision::F32,
    )?;
    println!(
        "vocab {vocab} {kernels}: step {:.1} ms (forward {:.1}, backward {:.1}, optimizer {:.1}; median of {steps})",
        r.step_ms, r.forward_ms, r.backward_ms, r.optimizer_ms
    );
    Ok(())
}
