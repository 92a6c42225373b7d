//! Attention maps of the unmasked encoder pass, for inspection (the cls-attention overlay of
//! `m3ae reconstruct`): which blocks to record ([`TraceLayers`]) and what a traced pass returns
//! ([`AttentionTrace`]). The maps come from the model's own blocks
//! ([`crate::layers::Block::forward_traced`]); the representation of a traced pass is the
//! untraced one.

use crate::{Error, Result};
use candle_core::Tensor;

/// Which encoder blocks a traced pass records the attention of.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TraceLayers {
    /// Every block.
    #[default]
    All,
    /// The last block.
    Last,
    /// These blocks (indices from 0; indices past the last block are ignored).
    Only(Vec<usize>),
}

impl TraceLayers {
    /// Whether block `i` of an encoder of `depth` blocks is recorded.
    pub fn records(&self, i: usize, depth: usize) -> bool {
        match self {
            TraceLayers::All => true,
            TraceLayers::Last => i + 1 == depth,
            TraceLayers::Only(v) => v.contains(&i),
        }
    }
}

/// An unmasked encoder pass with the attention maps of its recorded blocks (from
/// `M3ae::forward_representation_traced` / `Mae::forward_representation_traced`).
#[derive(Debug, Clone)]
pub struct AttentionTrace {
    /// `[B, L, D]` encoder output after its final LayerNorm, `L = 1 + Li (+ T)` (cls, patches,
    /// text tokens): equal to the untraced representation.
    pub representation: Tensor,
    /// `[B, L]` key padding the encoder used (1 = padding); `None` without text.
    pub key_padding: Option<Tensor>,
    /// `(block index, [B, heads, L, L] probabilities)` of each recorded block, in block order:
    /// entry `[b, h, q, k]` is how much query `q` attends to key `k` in head `h`; each row sums
    /// to 1 and padding keys get 0.
    pub attention: Vec<(usize, Tensor)>,
}

impl AttentionTrace {
    /// The probabilities `[B, heads, L, L]` of encoder block `block`, if it was recorded.
    pub fn block(&self, block: usize) -> Option<&Tensor> {
        self.attention
            .iter()
            .find(|(i, _)| *i == block)
            .map(|(_, t)| t)
    }

    /// How the cls token (query 0) of sample `sample` attends to every token in block `block`,
    /// averaged over heads: `[L]` over (cls, patches, text tokens), summing to 1.
    pub fn cls_attention(&self, block: usize, sample: usize) -> Result<Vec<f32>> {
        let probs = self.block(block).ok_or_else(|| {
            let recorded: Vec<usize> = self.attention.iter().map(|(i, _)| *i).collect();
            Error::Shape(format!(
                "encoder block {block} was not recorded (recorded: {recorded:?})"
            ))
        })?;
        let b = probs.dim(0)?;
        if sample >= b {
            return Err(Error::Shape(format!(
                "sample {sample} of a trace of {b} samples"
            )));
        }
        let row = probs.narrow(0, sample, 1)?.narrow(2, 0, 1)?.contiguous()?; // [1, H, 1, L]
        Ok(row.mean(1)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{M3ae, M3aeConfig, Mae, ModelInput, Represent};
    use candle_core::{DType, Device, D};
    use m3ae_kernels::KernelPath;

    fn bits(t: &Tensor) -> Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.to_bits())
            .collect())
    }

    #[test]
    fn traced_passes_equal_the_untraced_ones_on_both_kernel_paths() -> Result<()> {
        let dev = Device::Cpu;
        for kernels in [KernelPath::Fused, KernelPath::Reference] {
            let mut cfg = M3aeConfig::preset("tiny")?;
            cfg.kernels = kernels;
            let (li, t) = (cfg.num_patches(), cfg.text_length);
            let patches = m3ae_kernels::testing::tensor(&[2, li, cfg.patch_dim()], 11, 1.0, &dev)?;
            let ids = Tensor::arange(0u32, (2 * t) as u32, &dev)?.reshape((2, t))?;
            let pad: Vec<f32> = (0..2 * t).map(|i| f32::from(i % t >= 3 + i / t)).collect();
            let input = ModelInput {
                image_patches: Some(patches.clone()),
                text_ids: Some(ids),
                text_padding: Some(Tensor::from_vec(pad, (2, t), &dev)?),
            };
            let m3ae = M3ae::init(&cfg, 2, &dev)?;
            let trace = m3ae.forward_representation_traced(&input, &TraceLayers::All)?;
            let want = m3ae.forward_representation(&input)?;
            assert_eq!(bits(&trace.representation)?, bits(&want)?, "{kernels:?}");
            assert_eq!(trace.attention.len(), cfg.depth);
            let l = 1 + li + t;
            for (i, (block, probs)) in trace.attention.iter().enumerate() {
                assert_eq!(*block, i);
                assert_eq!(probs.dims(), &[2, cfg.num_heads, l, l]);
                let sums = probs.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
                assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
                // padding keys (sample 0: text tokens 3.., sample 1: 4..) get nothing
                let p0 = probs.narrow(0, 0, 1)?.narrow(3, 1 + li + 3, t - 3)?;
                let p1 = probs.narrow(0, 1, 1)?.narrow(3, 1 + li + 4, t - 4)?;
                for p in [p0, p1] {
                    assert_eq!(p.max_all()?.to_scalar::<f32>()?, 0.0);
                }
            }
            let pad = trace.key_padding.as_ref().expect("text gives key padding");
            assert_eq!(pad.dims(), &[2, l]);

            let mae = Mae::init(&cfg, 2, &dev)?;
            let trace = mae.forward_representation_traced(&patches, &TraceLayers::Last)?;
            assert_eq!(
                bits(&trace.representation)?,
                bits(&mae.represent(&patches)?)?
            );
            assert!(trace.key_padding.is_none());
            assert_eq!(trace.attention.len(), 1);
            assert_eq!(trace.attention[0].0, cfg.depth - 1);
        }
        Ok(())
    }

    #[test]
    fn cls_attention_is_query_zero_of_the_last_block_averaged_over_heads() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = M3aeConfig::preset("tiny")?;
        let li = cfg.num_patches();
        let model = M3ae::init(&cfg, 7, &dev)?;
        let patches = m3ae_kernels::testing::tensor(&[2, li, cfg.patch_dim()], 11, 1.0, &dev)?;
        let ids = Tensor::new(&[[3u32, 7, 9, 0, 0]], &dev)?;
        let pad = Tensor::new(&[[0f32, 0., 0., 1., 1.]], &dev)?;
        let a = model.cls_attention(&patches, Some((&ids, &pad)))?;
        assert_eq!(a.len(), 1 + li + 5);
        assert!(a[a.len() - 1] == 0.0 && a[a.len() - 2] == 0.0);
        assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        // by hand from the full maps of a traced pass over every block
        let input = ModelInput {
            image_patches: Some(patches.narrow(0, 0, 1)?),
            text_ids: Some(ids),
            text_padding: Some(pad),
        };
        let trace = model.forward_representation_traced(&input, &TraceLayers::All)?;
        let last = trace.block(cfg.depth - 1).expect("recorded");
        let want = last.get(0)?.narrow(1, 0, 1)?.mean(0)?.flatten_all()?;
        let diff = (Tensor::new(a.as_slice(), &dev)? - want)?
            .abs()?
            .max_all()?;
        assert!(diff.to_scalar::<f32>()? < 1e-7);
        // only what was recorded can be asked for
        let only = model.forward_representation_traced(&input, &TraceLayers::Only(vec![0]))?;
        assert_eq!(only.attention.len(), 1);
        assert!(only.cls_attention(0, 0).is_ok());
        let e = only.cls_attention(1, 0).unwrap_err().to_string();
        assert!(e.contains("block 1 was not recorded"), "{e}");
        assert!(only.cls_attention(0, 1).is_err());
        let none = model.forward_representation_traced(&input, &TraceLayers::Only(vec![]))?;
        assert!(none.attention.is_empty());
        let z = Tensor::zeros((1, li, cfg.patch_dim()), DType::F32, &dev)?;
        assert_eq!(model.cls_attention(&z, None)?.len(), 1 + li);
        Ok(())
    }
}
