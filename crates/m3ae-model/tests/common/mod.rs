//! Inputs shared by the model integration tests.

use candle_core::{Device, Tensor};
use m3ae_model::{M3aeConfig, ModelInput, Noise};

/// Batch-shared mask noise, deterministic in `salt`.
pub fn noise(len: usize, salt: usize) -> Noise {
    Noise::Shared(
        (0..len)
            .map(|i| ((i * 7919 + salt * 104729) % 1009) as f32 / 1009.0)
            .collect(),
    )
}

/// A batch of `b` samples: smooth patch values, cycling token ids, sample `j` with `3 j`
/// trailing padding tokens.
pub fn batch(cfg: &M3aeConfig, b: usize, dev: &Device) -> anyhow::Result<ModelInput> {
    let li = cfg.num_patches();
    let t = cfg.text_length;
    let vals: Vec<f32> = (0..b * li * cfg.patch_dim())
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let ids: Vec<u32> = (0..b * t)
        .map(|i| (i * 13 % cfg.text_vocab_size) as u32)
        .collect();
    // sample j has j*3 trailing padding tokens
    let pad: Vec<f32> = (0..b * t)
        .map(|i| if i % t >= t - (i / t) * 3 { 1.0 } else { 0.0 })
        .collect();
    Ok(ModelInput {
        image_patches: Some(Tensor::from_vec(vals, (b, li, cfg.patch_dim()), dev)?),
        text_ids: Some(Tensor::from_vec(ids, (b, t), dev)?),
        text_padding: Some(Tensor::from_vec(pad, (b, t), dev)?),
    })
}
