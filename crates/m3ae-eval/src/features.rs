//! Feature extraction for evaluation: runs any [`Represent`] model over batches of image patches
//! (no text, no masking: the official probe input) and pools the post-LayerNorm sequence.

use crate::Result;
use candle_core::Tensor;
use m3ae_model::{pool, Pooling, Represent};

/// Extracts pooled features `[N, D]` from an iterator of `[B, Li, P*P*3]` patch batches;
/// `on_batch(done)` is called after each batch (for progress reporting).
pub fn extract_features<I>(
    model: &dyn Represent,
    batches: I,
    pooling: Pooling,
    mut on_batch: impl FnMut(usize),
) -> Result<Tensor>
where
    I: IntoIterator<Item = Result<Tensor>>,
{
    let mut parts = Vec::new();
    let mut done = 0;
    for b in batches {
        let b = b?;
        done += b.dim(0)?;
        parts.push(pool(&model.represent(&b)?, pooling)?.detach());
        on_batch(done);
    }
    if parts.is_empty() {
        return Err(crate::Error::Shape(
            "no batches to extract features from".into(),
        ));
    }
    Ok(Tensor::cat(&parts, 0)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use m3ae_model::{M3aeConfig, Mae};

    #[test]
    fn features_have_one_row_per_image() -> anyhow::Result<()> {
        let cfg = M3aeConfig::preset("tiny")?;
        let model = Mae::init(&cfg, 0, &Device::Cpu)?;
        let batch = || {
            Tensor::zeros(
                (3, cfg.num_patches(), cfg.patch_dim()),
                DType::F32,
                &Device::Cpu,
            )
        };
        let mut seen = vec![];
        let f = extract_features(
            &model,
            vec![Ok(batch()?), Ok(batch()?)],
            Pooling::Mean,
            |n| seen.push(n),
        )?;
        assert_eq!(f.dims(), &[6, cfg.emb_dim]);
        assert_eq!(seen, vec![3, 6]);
        Ok(())
    }
}
