//! Transformer building blocks (pre-norm ViT blocks as in the official code), each built from a
//! [`ParamStore`] prefix and running its numerics through `m3ae-kernels`.
//!
//! Dropout, attention dropout and drop path ([`DropRates`], set with `with_rates`) run in the
//! `forward_with` methods when they get a [`Stochastic`] key (training); every other forward is
//! deterministic. The sites and the official facts are in [`crate::stochastic`].
//!
//! With [`KernelPath::Fused`], a [`Block`] on the CPU (f32 tensors) runs as one op with a
//! hand-written backward ([`m3ae_kernels::fused::transformer_block_with`]) whenever no dropout,
//! attention dropout or drop path is active and no attention map is traced; otherwise (and on
//! other devices, and with [`KernelPath::Reference`]) it composes the per-op kernels below.
//!
//! Precision ([`Precision`], set with `with_precision`): at [`Precision::Bf16`] every [`Dense`]
//! layer casts its input and weight to bf16 for the matmul and the product back to f32 before
//! the (f32) bias is added; LayerNorm, attention, GELU and the losses stay f32, and so do the
//! weights and their gradients (the casts are differentiable). This is the mixed-precision path
//! of training on CUDA; the default [`Precision::F32`] adds no op. On the CPU with
//! [`KernelPath::Fused`], the one-op block and the [`Dense`] layers at bf16 round the same
//! operands to bf16 and sum in f32 but keep the f32 sum (no rounding of the product to bf16;
//! `m3ae_kernels::fused::bf16`), as bf16 matrix hardware accumulates.

use crate::device::Precision;
use crate::params::ParamStore;
use crate::stochastic::{site, DropRates, Stochastic};
use crate::Result;
use candle_core::{DType, Tensor, D};
use m3ae_kernels::KernelPath;

/// Epsilon of every LayerNorm (flax default).
pub const LN_EPS: f64 = 1e-6;

/// Dense layer `y = x W^T + b` with `W` stored `(out, in)`.
#[derive(Debug, Clone)]
pub struct Dense {
    weight: Tensor,
    bias: Tensor,
    path: KernelPath,
    precision: Precision,
}

impl Dense {
    /// Reads `{prefix}.weight` and `{prefix}.bias`; `path` selects the kernel implementation.
    pub fn new(p: &ParamStore, prefix: &str, path: KernelPath) -> Result<Self> {
        Ok(Self {
            weight: p.get(&format!("{prefix}.weight"))?,
            bias: p.get(&format!("{prefix}.bias"))?,
            path,
            precision: Precision::F32,
        })
    }

    /// The layer computing its matmul at `precision` (see the [module docs](self)).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// `x`: `[.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.precision {
            Precision::F32 => Ok(self.path.linear(x, &self.weight, &self.bias)?),
            // the fused CPU layer rounds the same operands and keeps the f32 sum, as the
            // one-op block does (module docs)
            Precision::Bf16
                if self.path == KernelPath::Fused
                    && x.device().is_cpu()
                    && x.dtype() == DType::F32 =>
            {
                Ok(m3ae_kernels::fused::linear_with(
                    x,
                    &self.weight,
                    &self.bias,
                    DType::BF16,
                )?)
            }
            Precision::Bf16 => cast_linear(x, &self.weight, &self.bias, DType::BF16),
        }
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

/// `x W^T + b` with the matmul in `dtype`: `x` `[.., in]` and `W` `[out, in]` are cast to
/// `dtype`, the product `[.., out]` is cast back to `x`'s dtype and the bias added there. The
/// casts are differentiable, so f32 weights get f32 gradients.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// let dev = Device::Cpu;
/// let x = Tensor::new(&[[[1f32, 2.0]]], &dev)?;
/// let w = Tensor::new(&[[0.5f32, 0.25], [1.0, -1.0]], &dev)?;
/// let b = Tensor::new(&[0.5f32, 0.0], &dev)?;
/// let y = m3ae_model::layers::cast_linear(&x, &w, &b, DType::BF16)?;
/// assert_eq!(y.dtype(), DType::F32);
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![1.5, -1.0]); // exact in bf16
/// # Ok::<(), m3ae_model::Error>(())
/// ```
pub fn cast_linear(x: &Tensor, weight: &Tensor, bias: &Tensor, dtype: DType) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims
        .last()
        .ok_or_else(|| crate::Error::Shape("a dense layer needs an input of rank >= 1".into()))?;
    let (out, _) = weight.dims2()?;
    let rows = x.elem_count() / k.max(1);
    let y = x
        .reshape((rows, k))?
        .to_dtype(dtype)?
        .matmul(&weight.to_dtype(dtype)?.t()?)?
        .to_dtype(x.dtype())?
        .broadcast_add(bias)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = out;
    Ok(y.reshape(out_dims)?)
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
    rates: DropRates,
}

impl Attention {
    /// Reads `{prefix}.qkv` and `{prefix}.proj`.
    pub fn new(p: &ParamStore, prefix: &str, heads: usize, path: KernelPath) -> Result<Self> {
        Ok(Self {
            qkv: Dense::new(p, &format!("{prefix}.qkv"), path)?,
            proj: Dense::new(p, &format!("{prefix}.proj"), path)?,
            heads,
            path,
            rates: DropRates::default(),
        })
    }

    /// The layer with its projections at `precision` (see the [module docs](self)).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.qkv = self.qkv.with_precision(precision);
        self.proj = self.proj.with_precision(precision);
        self
    }

    /// The layer with dropout rates (`att_drop` on the probabilities, `drop` on the output
    /// projection; `drop_path` is the block's).
    pub fn with_rates(mut self, rates: DropRates) -> Self {
        self.rates = rates;
        self
    }

    /// `x`: `[B, L, C]`; `key_padding`: `[B, L]` (1 = padding key) -> `[B, L, C]`.
    pub fn forward(&self, x: &Tensor, key_padding: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.forward_inner(x, key_padding, false, None)?.0)
    }

    /// [`Attention::forward`] in training mode when `stochastic` is given: dropout on the
    /// attention probabilities (fork [`site::ATT_PROBS`] of the key) and on the output
    /// projection ([`site::ATT_PROJ`]). `None`, or rates of 0: [`Attention::forward`].
    pub fn forward_with(
        &self,
        x: &Tensor,
        key_padding: Option<&Tensor>,
        stochastic: Option<&Stochastic>,
    ) -> Result<Tensor> {
        Ok(self.forward_inner(x, key_padding, false, stochastic)?.0)
    }

    /// [`Attention::forward`] plus the attention probabilities `[B, heads, L, L]` (row `q` is
    /// query `q`'s distribution over the keys). The output is the untraced one (same kernel
    /// path); the probabilities come from the same qkv projection through reference ops, with
    /// probability 0 on padding keys.
    pub fn forward_traced(
        &self,
        x: &Tensor,
        key_padding: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (y, probs) = self.forward_inner(x, key_padding, true, None)?;
        Ok((y, probs.expect("probabilities were asked for")))
    }

    fn forward_inner(
        &self,
        x: &Tensor,
        key_padding: Option<&Tensor>,
        trace: bool,
        st: Option<&Stochastic>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let c = x.dim(2)?;
        let scale = 1.0 / ((c / self.heads) as f64).sqrt();
        let qkv = self.qkv.forward(x)?;
        let probs = if trace {
            Some(attention_probabilities(&qkv, self.heads, key_padding)?)
        } else {
            None
        };
        let att = Stochastic::site(st, site::ATT_PROBS, self.rates.att_drop)?;
        let y =
            self.path
                .qkv_attention_dropout(&qkv, self.heads, key_padding, scale, att.as_ref())?;
        let proj = Stochastic::site(st, site::ATT_PROJ, self.rates.drop)?;
        let y = self.path.dropout(&self.proj.forward(&y)?, proj.as_ref())?;
        Ok((y, probs))
    }
}

/// Softmax attention probabilities `[B, heads, L, L]` of a packed qkv projection `[B, L, 3 C]`
/// (columns `[q | k | v]`, each head-contiguous), from reference ops: scores
/// `q k^T / sqrt(C / heads)`, padding keys pushed down by `1e9` (probability 0 in f32), then a
/// max-subtracted softmax over the keys.
fn attention_probabilities(
    qkv: &Tensor,
    heads: usize,
    key_padding: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, l, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let hd = c / heads;
    let split = |i: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(2, i * c, c)?
            .reshape((b, l, heads, hd))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (q, k) = (split(0)?, split(1)?);
    let mut s = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (hd as f64).sqrt())?;
    if let Some(pad) = key_padding {
        s = s.broadcast_add(&(pad.to_dtype(s.dtype())?.reshape((b, 1, 1, l))? * -1e9)?)?;
    }
    let m = s.max_keepdim(D::Minus1)?;
    let e = s.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Pre-norm transformer block: `x + Attn(LN(x))`, then `x + MLP(LN(x))` with tanh-GELU; in
/// training ([`Block::forward_with`]) `x + DropPath(Attn(LN(x)))`, then
/// `x + DropPath(Dropout(fc2(Dropout(GELU(fc1(LN(x)))))))`.
#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Dense,
    fc2: Dense,
    path: KernelPath,
    rates: DropRates,
    precision: Precision,
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
            rates: DropRates::default(),
            precision: Precision::F32,
        })
    }

    /// The block with its dense layers at `precision` (see the [module docs](self)).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.attn = self.attn.with_precision(precision);
        self.fc1 = self.fc1.with_precision(precision);
        self.fc2 = self.fc2.with_precision(precision);
        self.precision = precision;
        self
    }

    /// The block with dropout rates (see [`DropRates`]).
    pub fn with_rates(mut self, rates: DropRates) -> Self {
        self.attn = self.attn.with_rates(rates);
        self.rates = rates;
        self
    }

    /// `x`: `[B, L, C]` -> `[B, L, C]`.
    pub fn forward(&self, x: &Tensor, key_padding: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.forward_inner(x, key_padding, false, None)?.0)
    }

    /// [`Block::forward`] in training mode when `stochastic` is given: the attention layer gets
    /// fork [`site::ATTENTION`] of the key ([`Attention::forward_with`]); dropout after the GELU
    /// ([`site::MLP_HIDDEN`]) and after the second MLP layer ([`site::MLP_OUT`]); drop path of
    /// the attention ([`site::PATH_ATTENTION`]) and MLP ([`site::PATH_MLP`]) branches, per
    /// sample. `None`, or rates of 0: [`Block::forward`].
    pub fn forward_with(
        &self,
        x: &Tensor,
        key_padding: Option<&Tensor>,
        stochastic: Option<&Stochastic>,
    ) -> Result<Tensor> {
        Ok(self.forward_inner(x, key_padding, false, stochastic)?.0)
    }

    /// [`Block::forward`] plus the attention probabilities `[B, heads, L, L]` of its attention
    /// layer (see [`Attention::forward_traced`]); the output is the untraced one.
    pub fn forward_traced(
        &self,
        x: &Tensor,
        key_padding: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (y, probs) = self.forward_inner(x, key_padding, true, None)?;
        Ok((y, probs.expect("probabilities were asked for")))
    }

    /// Whether this forward runs as the one-op fused block: fused kernels, f32 tensors on the
    /// CPU (the products at the block's precision), no attention map asked for, and no dropout
    /// or drop path active (rates of 0 add no op, so they do not count).
    fn one_op(&self, x: &Tensor, trace: bool, st: Option<&Stochastic>) -> bool {
        let r = self.rates;
        let stochastic = st.is_some() && (r.drop > 0.0 || r.att_drop > 0.0 || r.drop_path > 0.0);
        self.path == KernelPath::Fused
            && !trace
            && !stochastic
            && x.device().is_cpu()
            && x.dtype() == DType::F32
    }

    fn forward_inner(
        &self,
        x: &Tensor,
        key_padding: Option<&Tensor>,
        trace: bool,
        st: Option<&Stochastic>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if self.one_op(x, trace, st) {
            let (a, m) = (&self.attn, self);
            let params = m3ae_kernels::BlockParams {
                norm1: (&m.norm1.weight, &m.norm1.bias),
                qkv: (&a.qkv.weight, &a.qkv.bias),
                proj: (&a.proj.weight, &a.proj.bias),
                norm2: (&m.norm2.weight, &m.norm2.bias),
                fc1: (&m.fc1.weight, &m.fc1.bias),
                fc2: (&m.fc2.weight, &m.fc2.bias),
            };
            let y = m3ae_kernels::fused::transformer_block_with(
                x,
                &params,
                a.heads,
                key_padding,
                LN_EPS,
                self.precision.matmul_dtype(),
            )?;
            return Ok((y, None));
        }
        let r = self.rates;
        let attn_st = st.map(|s| s.fork(site::ATTENTION));
        let (a, probs) = self.attn.forward_inner(
            &self.norm1.forward(x)?,
            key_padding,
            trace,
            attn_st.as_ref(),
        )?;
        let dp = Stochastic::site(st, site::PATH_ATTENTION, r.drop_path)?;
        let x = (x + m3ae_kernels::drop_path(&a, dp.as_ref())?)?;
        let h = self
            .path
            .gelu_tanh(&self.fc1.forward(&self.norm2.forward(&x)?)?)?;
        let dh = Stochastic::site(st, site::MLP_HIDDEN, r.drop)?;
        let h = self.path.dropout(&h, dh.as_ref())?;
        let d_out = Stochastic::site(st, site::MLP_OUT, r.drop)?;
        let m = self.path.dropout(&self.fc2.forward(&h)?, d_out.as_ref())?;
        let dp = Stochastic::site(st, site::PATH_MLP, r.drop_path)?;
        Ok(((&x + m3ae_kernels::drop_path(&m, dp.as_ref())?)?, probs))
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

    /// The transformer with every block's dense layers at `precision` (see the
    /// [module docs](self)).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.blocks = self
            .blocks
            .into_iter()
            .map(|b| b.with_precision(precision))
            .collect();
        self
    }

    /// The transformer with dropout rates, the same in every block (as the official code).
    pub fn with_rates(mut self, rates: DropRates) -> Self {
        self.blocks = self
            .blocks
            .into_iter()
            .map(|b| b.with_rates(rates))
            .collect();
        self
    }

    /// `x`: `[B, L, C]` -> `[B, L, C]` (post final LayerNorm).
    pub fn forward(&self, x: &Tensor, key_padding: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.forward_traced(x, key_padding, |_| false)?.0)
    }

    /// [`Transformer::forward`] in training mode when `stochastic` is given: block `i` runs
    /// [`Block::forward_with`] with fork `i` of the key. `None`, or rates of 0:
    /// [`Transformer::forward`], bit for bit.
    pub fn forward_with(
        &self,
        x: &Tensor,
        key_padding: Option<&Tensor>,
        stochastic: Option<&Stochastic>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, b) in self.blocks.iter().enumerate() {
            let st = stochastic.map(|s| s.fork(i as u64));
            x = b.forward_inner(&x, key_padding, false, st.as_ref())?.0;
        }
        self.norm.forward(&x)
    }

    /// [`Transformer::forward`] that also returns the attention probabilities
    /// `[B, heads, L, L]` of every block `i` with `record(i)`, as `(i, probabilities)` in block
    /// order. The output is the untraced one.
    pub fn forward_traced(
        &self,
        x: &Tensor,
        key_padding: Option<&Tensor>,
        record: impl Fn(usize) -> bool,
    ) -> Result<(Tensor, Vec<(usize, Tensor)>)> {
        let mut x = x.clone();
        let mut maps = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let (y, probs) = b.forward_inner(&x, key_padding, record(i), None)?;
            x = y;
            if let Some(p) = probs {
                maps.push((i, p));
            }
        }
        Ok((self.norm.forward(&x)?, maps))
    }

    /// Number of blocks.
    pub fn depth(&self) -> usize {
        self.blocks.len()
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

    /// The head with its dense layers at `precision` (see the [module docs](self)). The fused
    /// text loss reads [`Head::out`]'s f32 weight directly and stays f32.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.layers = self
            .layers
            .into_iter()
            .map(|(fc, norm)| (fc.with_precision(precision), norm))
            .collect();
        self.out = self.out.with_precision(precision);
        self
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
