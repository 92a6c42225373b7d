//! Parameter and FLOP accounting for a configuration (used by `m3ae info` and throughput reports).
//!
//! FLOPs count matrix multiplications only (2 per multiply-add): embeddings, every dense layer,
//! the two attention products, and the output heads. Elementwise work (LayerNorm, GELU, softmax)
//! is not counted. A training step is taken as 3x the forward (forward + backward for inputs and
//! weights), the usual convention.

use crate::config::M3aeConfig;
use crate::params::Variant;

/// FLOPs of one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Flops {
    /// Forward pass of the masked model.
    pub forward: f64,
    /// Forward + backward (3x forward).
    pub training: f64,
    /// Tokens the encoder sees (`1 + kept image + kept text`).
    pub encoder_tokens: usize,
    /// Tokens the decoder sees (`1 + Li + T`).
    pub decoder_tokens: usize,
}

fn transformer_flops(tokens: usize, width: usize, mlp: usize, depth: usize) -> f64 {
    let (l, c, m) = (tokens as f64, width as f64, mlp as f64);
    // qkv (3c^2) + proj (c^2) + fc1 + fc2 (2cm) per token, plus q k^T and p v (2 l c per token).
    depth as f64 * 2.0 * (l * (4.0 * c * c + 2.0 * c * m) + 2.0 * l * l * c)
}

/// FLOPs per sample of masked pre-training for `cfg` (its image size, text length and ratios).
///
/// ```
/// use m3ae_model::{flops::training_flops, M3aeConfig, Variant};
/// let f = training_flops(&M3aeConfig::preset("base").unwrap(), Variant::M3ae);
/// assert_eq!((f.encoder_tokens, f.decoder_tokens), (1 + 64 + 16, 1 + 256 + 64));
/// assert!((f.training / f.forward - 3.0).abs() < 1e-12);
/// ```
pub fn training_flops(cfg: &M3aeConfig, variant: Variant) -> Flops {
    let c = cfg.resolved();
    let li = c.num_patches();
    let t = if variant == Variant::M3ae {
        c.text_length
    } else {
        0
    };
    let (ki, kt) = (c.image_keep(li), if t > 0 { c.text_keep(t) } else { 0 });
    let le = 1 + ki + kt;
    let ld = 1 + li + t;
    let (d, dd) = (c.emb_dim as f64, c.dec_emb_dim as f64);
    let mut f = 2.0 * li as f64 * c.patch_dim() as f64 * d; // patch embedding (all patches)
    f += transformer_flops(le, c.emb_dim, c.mlp_dim(c.emb_dim), c.depth);
    f += 2.0 * le as f64 * d * dd; // decoder input projection
    f += transformer_flops(ld, c.dec_emb_dim, c.mlp_dim(c.dec_emb_dim), c.dec_depth);
    let head_hidden = 2.0 * c.output_head_depth as f64 * dd * dd;
    f += li as f64 * (head_hidden + 2.0 * dd * c.image_output_dim() as f64);
    f += t as f64 * (head_hidden + 2.0 * dd * c.text_vocab_size as f64);
    Flops {
        forward: f,
        training: 3.0 * f,
        encoder_tokens: le,
        decoder_tokens: ld,
    }
}
