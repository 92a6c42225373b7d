//! Transformer building blocks (pre-norm ViT blocks as in the official code), each built from a
//! [`ParamStore`] prefix and running its numerics through `m3ae-kernels`.

use crate::params::ParamStore;
use crate::Result;
use candle_core::{Tensor, D};
use m3ae_kernels::KernelPath;

/// Epsilon of every LayerNorm (flax default).
pub const LN_EPS: f64 = 1e-6;

/// Dense layer `y = x W^T + b` with `W` stored `(out, in)`.
#[derive(Debug, Clone)]
pub struct Dense {
    weight: Tensor,
    bias: Tensor,
    path: KernelPath,
}

impl Dense {
    /// Reads `{prefix}.weight` and `{prefix}.bias`; `path` selects the kernel implementation.
    pub fn new(p: &ParamStore, prefix: &str, path: KernelPath) -> Result<Self> {
        Ok(Self {
            weight: p.get(&format!("{prefix}.weight"))?,
            bias: p.get(&format!("{prefix}.bias"))?,
            path,
        })
    }

    /// `x`: `[.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.path.linear(x, &self.weight, &self.bias)?)
    }

    /// The weight, `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `(out)`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

/// LayerNorm over the last axis with scale and bias, eps 1e-6.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    path: KernelPath,
}

impl LayerNorm {
    /// Reads `{prefix}.weight` and `{prefix}.bias`; `path` selects the kernel implementation.
    pub fn new(p: &ParamStore, prefix: &str, path: KernelPath) -> Result<Self> {
        Ok(Self {
            weight: p.get(&format!("{prefix}.weight"))?,
            bias: p.get(&format!("{prefix}.bias"))?,
            path,
        })
    }

    /// `x`: `[.., D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.path.layer_norm(x, &self.weight, &self.bias, LN_EPS)?)
    }
}

/// Multi-head self-attention with fused qkv (columns `[q | k | v]`, each head-contiguous).
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Dense,
    proj: Dense,
    heads: usize,
    path: KernelPath,
}

impl Attention {
    /// Reads `{prefix}.qkv` and `{prefix}.proj`.
    pub fn new(p: &ParamStore, prefix: &str, heads: usize, path: KernelPath) -> Result<Self> {
        Ok(Self {
            qkv: Dense::new(p, &format!("{prefix}.qkv"), path)?,
            proj: Dense::new(p, &format!("{prefix}.proj"), path)?,
            heads,
            path,
        })
    }

    /// `x`: `[B, L, C]`; `key_padding`: `[B, L]` (1 = padding key) -> `[B, L, C]`.
    pub fn forward(&self, x: &Tensor, key_padding: Option<&Tensor>) -> Result<Tensor> {
        let c = x.dim(2)?;
        let scale = 1.0 / ((c / self.heads) as f64).sqrt();
        let qkv = self.qkv.forward(x)?;
        let y = self
            .path
            .qkv_attention(&qkv, self.heads, key_padding, scale)?;
        self.proj.forward(&y)
    }
}

/// Pre-norm transformer block: `x + Attn(LN(x))`, then `x + MLP(LN(x))` with tanh-GELU.
#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Dense,
    fc2: Dense,
    path: KernelPath,
}

impl Block {
    /// Reads the block under `prefix` (`encoder.blocks.0`).
    pub fn new(p: &ParamStore, prefix: &str, heads: usize, path: KernelPath) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(p, &format!("{prefix}.norm1"), path)?,
            attn: Attention::new(p, &format!("{prefix}.attn"), heads, path)?,
            norm2: LayerNorm::new(p, &format!("{prefix}.norm2"), path)?,
            fc1: Dense::new(p, &format!("{prefix}.mlp.fc1"), path)?,
            fc2: Dense::new(p, &format!("{prefix}.mlp.fc2"), path)?,
            path,
        })
    }

    /// `x`: `[B, L, C]` -> `[B, L, C]`.
    pub fn forward(&self, x: &Tensor, key_padding: Option<&Tensor>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?, key_padding)?)?;
        let h = self
            .path
            .gelu_tanh(&self.fc1.forward(&self.norm2.forward(&x)?)?)?;
        Ok((&x + self.fc2.forward(&h)?)?)
    }
}

/// `depth` blocks followed by a final LayerNorm.
#[derive(Debug, Clone)]
pub struct Transformer {
    blocks: Vec<Block>,
    norm: LayerNorm,
}

impl Transformer {
    /// Reads `{prefix}.blocks.{i}` for `i < depth` and `{prefix}.norm`.
    pub fn new(
        p: &ParamStore,
        prefix: &str,
        depth: usize,
        heads: usize,
        path: KernelPath,
    ) -> Result<Self> {
        let blocks = (0..depth)
            .map(|i| Block::new(p, &format!("{prefix}.blocks.{i}"), heads, path))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            blocks,
            norm: LayerNorm::new(p, &format!("{prefix}.norm"), path)?,
        })
    }

    /// `x`: `[B, L, C]` -> `[B, L, C]` (post final LayerNorm).
    pub fn forward(&self, x: &Tensor, key_padding: Option<&Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for b in &self.blocks {
            x = b.forward(&x, key_padding)?;
        }
        self.norm.forward(&x)
    }
}

/// Output head: a single Dense (depth 0) or `LN -> k x [Dense -> GELU -> LN (+ residual for j>0)]
/// -> Dense` (depth k).
#[derive(Debug, Clone)]
pub struct Head {
    norm_in: Option<LayerNorm>,
    layers: Vec<(Dense, LayerNorm)>,
    out: Dense,
    path: KernelPath,
}

impl Head {
    /// Reads the head under `prefix` (`decoder.image_head`).
    pub fn new(p: &ParamStore, prefix: &str, depth: usize, path: KernelPath) -> Result<Self> {
        let norm_in = if depth > 0 {
            Some(LayerNorm::new(p, &format!("{prefix}.norm_in"), path)?)
        } else {
            None
        };
        let layers = (0..depth)
            .map(|j| {
                Ok((
                    Dense::new(p, &format!("{prefix}.layers.{j}.fc"), path)?,
                    LayerNorm::new(p, &format!("{prefix}.layers.{j}.norm"), path)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm_in,
            layers,
            out: Dense::new(p, &format!("{prefix}.out"), path)?,
            path,
        })
    }

    /// `x`: `[B, L, Dd]` -> `[B, L, out]`: [`Head::out`] applied to [`Head::forward_hidden`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.forward_hidden(x)?)
    }

    /// Everything but the last projection: `x` `[B, L, Dd]` -> the input of [`Head::out`]
    /// (`x` itself at depth 0). The fused text loss multiplies this by the projection tile by
    /// tile instead of materialising the logits.
    pub fn forward_hidden(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = match &self.norm_in {
            Some(n) => n.forward(x)?,
            None => x.clone(),
        };
        for (j, (fc, norm)) in self.layers.iter().enumerate() {
            let y = norm.forward(&self.path.gelu_tanh(&fc.forward(&x)?)?)?;
            x = if j > 0 { (x + y)? } else { y };
        }
        Ok(x)
    }

    /// The last projection.
    pub fn out(&self) -> &Dense {
        &self.out
    }
}

/// Mean over the last axis of `(a - b)^2`: `[.., D]` -> `[..]`.
pub(crate) fn mean_sq_err_last(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.sqr()?.mean(D::Minus1)?)
}
