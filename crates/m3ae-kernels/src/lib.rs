//! Tensor kernels for the M3AE training hot path.
//!
//! The model never calls candle's fused `LayerNorm` / `softmax_last_dim` (they have no backward in
//! candle 0.11 and silently stop gradients). It calls the entry points of this crate instead:
//!
//! * [`layer_norm`]: LayerNorm over the last axis with scale and bias (flax semantics, eps given).
//! * [`masked_attention`]: multi-head scaled dot-product attention with a key-padding mask applied
//!   the official way (the score of a padding key is *replaced* by `-1e7`).
//! * [`gelu_tanh`]: the tanh approximation of GELU (flax `nn.gelu`).
//! * [`text_head_loss`]: weighted cross-entropy (and accuracy) of the text output head without
//!   materialising the `N x V` logits.
//! * [`text_head_top_k`]: the best words of the text output head at chosen rows (inference),
//!   also without the `N x V` logits.
//! * [`transformer_block`]: a whole pre-LN transformer block (LayerNorm, qkv, masked attention,
//!   projection, residual, LayerNorm, MLP with tanh-GELU, residual) as one op on the fused path.
//! * [`fn@dropout`], [`drop_path`] and attention dropout ([`qkv_attention_dropout`],
//!   [`masked_attention_dropout`]): training-time dropout whose masks are a pure function of a
//!   key and the element's index ([`Dropout`], [`mod@dropout`]), the same on both paths.
//!
//! Each entry point dispatches on a [`KernelPath`]: [`KernelPath::Fused`] (the default) runs the
//! custom ops of [`fused`] (forward and hand-written backward, rayon-parallel, AVX2+FMA when the
//! CPU has it); [`KernelPath::Reference`] runs plain compositions of differentiable candle ops in
//! [`mod@reference`], the ground truth every fused op is tested against.
//!
//! On the fused path the transformer block and the dense layer also take their products in bf16
//! ([`fused::transformer_block_with`], [`fused::linear_with`]): bf16-rounded operands summed in
//! f32, on the CPU's AMX or AVX512-BF16 instructions where it has them ([`fused::bf16`]).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let x = Tensor::new(&[[1f32, 2., 3.]], &Device::Cpu)?;
//! let g = Tensor::ones(3, candle_core::DType::F32, &Device::Cpu)?;
//! let b = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu)?;
//! let y = m3ae_kernels::layer_norm(&x, &g, &b, 1e-6)?;
//! let v = y.flatten_all()?.to_vec1::<f32>()?;
//! assert!((v[0] + 1.2247).abs() < 1e-3 && v[1].abs() < 1e-6);
//! # Ok::<(), m3ae_kernels::Error>(())
//! ```

pub mod alloc;
pub mod dropout;
pub mod fused;
pub mod reference;
pub mod testing;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use dropout::{drop_path, dropout, Dropout};

/// Errors of the kernels crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error raised by candle while running an op.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An input had a shape the kernel does not accept.
    #[error("{op}: {msg}")]
    Shape {
        /// The kernel that rejected the input.
        op: &'static str,
        /// What was wrong, with the offending shapes.
        msg: String,
    },
    /// A parameter had a value the kernel does not accept (e.g. a dropout rate outside [0, 1)).
    #[error("{op}: {msg}")]
    Value {
        /// The kernel that rejected the value.
        op: &'static str,
        /// What was wrong.
        msg: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Which implementation of the kernels to run.
///
/// ```
/// use m3ae_kernels::KernelPath;
/// assert_eq!(KernelPath::default(), KernelPath::Fused);
/// assert_eq!(serde_json::to_string(&KernelPath::Reference).unwrap(), "\"reference\"");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelPath {
    /// Fused custom ops with hand-written backward passes ([`fused`]); CPU, f32 compute.
    #[default]
    Fused,
    /// Composition of differentiable candle ops ([`mod@reference`]): the f32 ground truth every
    /// fast path is tested against.
    Reference,
}

impl KernelPath {
    /// LayerNorm over the last axis on this path. See [`layer_norm`].
    pub fn layer_norm(self, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
        match self {
            KernelPath::Fused => fused::layer_norm(x, gamma, beta, eps),
            KernelPath::Reference => reference::layer_norm(x, gamma, beta, eps),
        }
    }

    /// Masked attention on this path. See [`masked_attention`].
    pub fn masked_attention(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_padding: Option<&Tensor>,
        scale: f64,
    ) -> Result<Tensor> {
        match self {
            KernelPath::Fused => fused::masked_attention(q, k, v, key_padding, scale),
            KernelPath::Reference => reference::masked_attention(q, k, v, key_padding, scale),
        }
    }

    /// Masked attention with dropout on the probabilities on this path. See
    /// [`masked_attention_dropout`].
    pub fn masked_attention_dropout(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_padding: Option<&Tensor>,
        scale: f64,
        dropout: Option<&Dropout>,
    ) -> Result<Tensor> {
        match self {
            KernelPath::Fused => {
                fused::masked_attention_dropout(q, k, v, key_padding, scale, dropout)
            }
            KernelPath::Reference => {
                reference::masked_attention_dropout(q, k, v, key_padding, scale, dropout)
            }
        }
    }

    /// Attention on a packed qkv projection on this path. See [`qkv_attention`].
    pub fn qkv_attention(
        self,
        qkv: &Tensor,
        heads: usize,
        key_padding: Option<&Tensor>,
        scale: f64,
    ) -> Result<Tensor> {
        self.qkv_attention_dropout(qkv, heads, key_padding, scale, None)
    }

    /// Attention on a packed qkv projection with dropout on the probabilities on this path.
    /// See [`qkv_attention_dropout`].
    pub fn qkv_attention_dropout(
        self,
        qkv: &Tensor,
        heads: usize,
        key_padding: Option<&Tensor>,
        scale: f64,
        dropout: Option<&Dropout>,
    ) -> Result<Tensor> {
        match self {
            KernelPath::Fused => {
                fused::qkv_attention_dropout(qkv, heads, key_padding, scale, dropout)
            }
            KernelPath::Reference => {
                reference::qkv_attention_dropout(qkv, heads, key_padding, scale, dropout)
            }
        }
    }

    /// Activation dropout on this path (the fused op on the CPU, or `x * mask`): bit-identical
    /// values either way. See [`fn@dropout`].
    pub fn dropout(self, x: &Tensor, dropout: Option<&Dropout>) -> Result<Tensor> {
        match self {
            KernelPath::Fused => dropout::dropout(x, dropout),
            KernelPath::Reference => dropout::dropout_reference(x, dropout),
        }
    }

    /// Dense layer on this path. See [`linear`].
    pub fn linear(self, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        match self {
            KernelPath::Fused => fused::linear(x, weight, bias),
            KernelPath::Reference => reference::linear(x, weight, bias),
        }
    }

    /// Text-head loss on this path. See [`text_head_loss`].
    pub fn text_head_loss(
        self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        targets: &Tensor,
        row_weights: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            KernelPath::Fused => fused::text_head_loss(hidden, weight, bias, targets, row_weights),
            KernelPath::Reference => {
                reference::text_head_loss(hidden, weight, bias, targets, row_weights)
            }
        }
    }

    /// Text-head top-k on this path. See [`text_head_top_k`].
    pub fn text_head_top_k(
        self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        rows: &[usize],
        k: usize,
    ) -> Result<TextTopK> {
        match self {
            KernelPath::Fused => fused::text_head_top_k(hidden, weight, bias, rows, k),
            KernelPath::Reference => reference::text_head_top_k(hidden, weight, bias, rows, k),
        }
    }

    /// A pre-LN transformer block on this path. See [`transformer_block`].
    pub fn transformer_block(
        self,
        x: &Tensor,
        params: &BlockParams<'_>,
        heads: usize,
        key_padding: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        match self {
            KernelPath::Fused => fused::transformer_block(x, params, heads, key_padding, eps),
            KernelPath::Reference => {
                reference::transformer_block(x, params, heads, key_padding, eps)
            }
        }
    }

    /// tanh-GELU on this path. See [`gelu_tanh`].
    pub fn gelu_tanh(self, x: &Tensor) -> Result<Tensor> {
        match self {
            KernelPath::Fused => fused::gelu_tanh(x),
            KernelPath::Reference => reference::gelu_tanh(x),
        }
    }
}

/// LayerNorm over the last axis: `(x - mean) / sqrt(var + eps) * gamma + beta` with the biased
/// variance. `x`: `[.., D]`; `gamma`, `beta`: `[D]`. Differentiable in all three inputs.
/// Runs the default ([`KernelPath::Fused`]) path.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    KernelPath::default().layer_norm(x, gamma, beta, eps)
}

/// Masked multi-head attention. `q`, `k`, `v`: `[B, H, L, Dh]`; `key_padding`: `[B, L]` with
/// `1` = padding key (its score is replaced by `-1e7`) or `None`; returns `[B, H, L, Dh]`.
/// Runs the default ([`KernelPath::Fused`]) path.
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_padding: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    KernelPath::default().masked_attention(q, k, v, key_padding, scale)
}

/// Multi-head attention on the packed output of a qkv projection: `qkv` `[B, L, 3 D]` (columns
/// `[q | k | v]`, head `h` at columns `h Dh .. (h+1) Dh` of each block), `key_padding` `[B, L]`
/// (1 = padding key) -> `[B, L, D]` with heads concatenated. The fused path reads the heads in
/// place (no permute or copies). Runs the default ([`KernelPath::Fused`]) path.
pub fn qkv_attention(
    qkv: &Tensor,
    heads: usize,
    key_padding: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    KernelPath::default().qkv_attention(qkv, heads, key_padding, scale)
}

/// [`masked_attention`] with dropout on the attention probabilities (flax `nn.Dropout` after
/// the softmax, official `att_drop`): `O = (P * M) V` where `M` is the mask of `dropout` over
/// the probabilities `[B, H, L, L]` (row `(b H + h) L + q`, column the key index; values 0 or
/// `1 / (1 - rate)`, see [`mod@dropout`]). The softmax itself is unchanged. `None` is
/// [`masked_attention`]. The fused CPU kernel applies the mask to its probability tiles and
/// regenerates it in the backward; on other devices (CUDA included) the reference composition
/// runs whenever `dropout` is given. Runs the default ([`KernelPath::Fused`]) path.
pub fn masked_attention_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_padding: Option<&Tensor>,
    scale: f64,
    dropout: Option<&Dropout>,
) -> Result<Tensor> {
    KernelPath::default().masked_attention_dropout(q, k, v, key_padding, scale, dropout)
}

/// [`qkv_attention`] with dropout on the attention probabilities, with the masks of
/// [`masked_attention_dropout`] (head `h` of sample `b` is `(b, h)` there). Runs the default
/// ([`KernelPath::Fused`]) path.
pub fn qkv_attention_dropout(
    qkv: &Tensor,
    heads: usize,
    key_padding: Option<&Tensor>,
    scale: f64,
    dropout: Option<&Dropout>,
) -> Result<Tensor> {
    KernelPath::default().qkv_attention_dropout(qkv, heads, key_padding, scale, dropout)
}

/// Dense layer `y = x W^T + b`: `x` `[.., in]`, `weight` `[out, in]`, `bias` `[out]`.
/// Runs the default ([`KernelPath::Fused`]) path.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    KernelPath::default().linear(x, weight, bias)
}

/// tanh-approximated GELU, elementwise: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
/// Runs the default ([`KernelPath::Fused`]) path.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    KernelPath::default().gelu_tanh(x)
}

/// The twelve parameters of a pre-LN transformer block ([`transformer_block`]); dense weights
/// are `(out, in)` as in [`linear`].
#[derive(Debug, Clone, Copy)]
pub struct BlockParams<'a> {
    /// First LayerNorm's scale and bias, `[C]` each.
    pub norm1: (&'a Tensor, &'a Tensor),
    /// The qkv projection, `[3 C, C]` and `[3 C]` (output columns `[q | k | v]`, each
    /// head-contiguous).
    pub qkv: (&'a Tensor, &'a Tensor),
    /// The attention output projection, `[C, C]` and `[C]`.
    pub proj: (&'a Tensor, &'a Tensor),
    /// Second LayerNorm's scale and bias, `[C]` each.
    pub norm2: (&'a Tensor, &'a Tensor),
    /// The first MLP layer, `[M, C]` and `[M]`.
    pub fc1: (&'a Tensor, &'a Tensor),
    /// The second MLP layer, `[C, M]` and `[C]`.
    pub fc2: (&'a Tensor, &'a Tensor),
}

impl<'a> BlockParams<'a> {
    /// The twelve tensors in the order of [`fused::BLOCK_PARAM_ORDER`].
    pub fn tensors(&self) -> [&'a Tensor; 12] {
        let p = self;
        [
            p.norm1.0, p.norm1.1, p.qkv.0, p.qkv.1, p.proj.0, p.proj.1, p.norm2.0, p.norm2.1,
            p.fc1.0, p.fc1.1, p.fc2.0, p.fc2.1,
        ]
    }
}

/// A pre-LN transformer block (the official `Block` without dropout):
/// `x1 = x + proj(attn(qkv(LN1(x))))`, `y = x1 + fc2(gelu_tanh(fc1(LN2(x1))))`, with `x`
/// `[B, L, C]`, `heads` attention heads of width `C / heads` (scale `1 / sqrt(C / heads)`),
/// `key_padding` `[B, L]` (1 = padding key, see [`masked_attention`]) and LayerNorm epsilon
/// `eps`; returns `[B, L, C]`. Differentiable in `x` and every parameter.
/// On the fused path a CPU f32 block is one custom op with a hand-written backward
/// (`fused::block`: GEMMs on contiguous buffers with bias and residual fused, only the products
/// the backward needs saved); other devices and dtypes compose the fused per-op kernels.
/// Runs the default ([`KernelPath::Fused`]) path.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// let dev = Device::Cpu;
/// let (c, m) = (8, 16);
/// let w = |o: usize, i: usize| Tensor::ones((o, i), DType::F32, &dev).unwrap() * 0.01;
/// let (ones, zeros) = (Tensor::ones(c, DType::F32, &dev)?, Tensor::zeros(c, DType::F32, &dev)?);
/// let (wqkv, wp, w1, w2) = (w(3 * c, c)?, w(c, c)?, w(m, c)?, w(c, m)?);
/// let (bqkv, b1) = (Tensor::zeros(3 * c, DType::F32, &dev)?, Tensor::zeros(m, DType::F32, &dev)?);
/// let p = m3ae_kernels::BlockParams {
///     norm1: (&ones, &zeros),
///     qkv: (&wqkv, &bqkv),
///     proj: (&wp, &zeros),
///     norm2: (&ones, &zeros),
///     fc1: (&w1, &b1),
///     fc2: (&w2, &zeros),
/// };
/// let x = Tensor::arange(0f32, 32., &dev)?.reshape((1, 4, c))?;
/// let y = m3ae_kernels::transformer_block(&x, &p, 2, None, 1e-6)?;
/// let r = m3ae_kernels::KernelPath::Reference.transformer_block(&x, &p, 2, None, 1e-6)?;
/// let diff = (y - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-5);
/// # Ok::<(), m3ae_kernels::Error>(())
/// ```
pub fn transformer_block(
    x: &Tensor,
    params: &BlockParams<'_>,
    heads: usize,
    key_padding: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    KernelPath::default().transformer_block(x, params, heads, key_padding, eps)
}

/// The block of [`transformer_block`] composed from the ops of `path` (the reference path, and
/// the fused path where the one-op block does not run).
pub(crate) fn composed_block(
    path: KernelPath,
    x: &Tensor,
    p: &BlockParams<'_>,
    heads: usize,
    key_padding: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let (_, _, c, _) = reference::block_shapes(x, p, heads)?;
    let scale = 1.0 / ((c / heads) as f64).sqrt();
    let a = path.layer_norm(x, p.norm1.0, p.norm1.1, eps)?;
    let qkv = path.linear(&a, p.qkv.0, p.qkv.1)?;
    let o = path.qkv_attention(&qkv, heads, key_padding, scale)?;
    let x1 = (x + path.linear(&o, p.proj.0, p.proj.1)?)?;
    let a = path.layer_norm(&x1, p.norm2.0, p.norm2.1, eps)?;
    let h = path.gelu_tanh(&path.linear(&a, p.fc1.0, p.fc1.1)?)?;
    Ok((&x1 + path.linear(&h, p.fc2.0, p.fc2.1)?)?)
}

/// Weighted cross-entropy of a linear output head and its weighted accuracy, without the logits:
/// `hidden` `[N, D]`, `weight` `[V, D]`, `bias` `[V]`, `targets` `[N]` (integer ids below `V`),
/// `row_weights` `[N]` (constants). Returns the scalars
/// `loss = sum_i w_i * -log softmax(h_i W^T + b)[t_i]` (differentiable in `hidden`, `weight`
/// and `bias`) and `accuracy = sum_i w_i [argmax_j (h_i W^T + b)_j = t_i]` (no gradient; ties
/// go to the smallest index, a row with a NaN logit never counts as correct).
/// The fused path multiplies only the rows with a non-zero weight, tile by tile, and stores
/// no `N x V` tensor in the forward or the backward, on the CPU and (feature `cuda`) on CUDA.
/// Runs the default ([`KernelPath::Fused`]) path.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let h = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev)?;
/// let w = Tensor::new(&[[2f32, 0.], [0., 2.], [0., 0.]], &dev)?;
/// let b = Tensor::zeros(3, candle_core::DType::F32, &dev)?;
/// let t = Tensor::new(&[0u32, 2], &dev)?;
/// let rw = Tensor::new(&[0.5f32, 0.0], &dev)?; // the second row is not counted
/// let (loss, acc) = m3ae_kernels::text_head_loss(&h, &w, &b, &t, &rw)?;
/// let want = 0.5 * -(2f32 - (2f32.exp() + 2.0).ln());
/// assert!((loss.to_scalar::<f32>()? - want).abs() < 1e-6);
/// assert_eq!(acc.to_scalar::<f32>()?, 0.5);
/// # Ok::<(), m3ae_kernels::Error>(())
/// ```
pub fn text_head_loss(
    hidden: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    targets: &Tensor,
    row_weights: &Tensor,
) -> Result<(Tensor, Tensor)> {
    KernelPath::default().text_head_loss(hidden, weight, bias, targets, row_weights)
}

/// The best words of a text head at the requested rows, best first (see [`text_head_top_k`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TextTopK {
    /// Per requested row, its `min(k, V)` word ids.
    pub ids: Vec<Vec<u32>>,
    /// Per requested row, the logits of those words.
    pub logits: Vec<Vec<f32>>,
}

impl TextTopK {
    fn from_lists(lists: Vec<Vec<(u32, f32)>>) -> Self {
        let (ids, logits) = lists
            .into_iter()
            .map(|l| l.into_iter().unzip::<u32, f32, Vec<u32>, Vec<f32>>())
            .unzip();
        Self { ids, logits }
    }
}

/// Top-k words of a linear output head `h W^T + b` at the requested rows, for inference (no
/// gradient): `hidden` `[N, D]`, `weight` `[V, D]`, `bias` `[V]` or `None`; `rows` index into
/// the `N` rows (any order, repeats allowed) and the result has one entry per requested row, in
/// that order, of `min(k, V)` ids and logits, best first. Order: larger logit first, equal
/// logits by the lower id (as `Tensor::argmax`, so the first id of each row is exactly the
/// argmax of the composed logits), a NaN logit after every number (it never wins over one).
/// The fused path multiplies only the requested rows, tile by tile over the vocabulary, and
/// never holds the `N x V` (or `rows x V`) logits, on the CPU and (feature `cuda`, `k` up to 32)
/// on CUDA; elsewhere it composes the logits of the requested rows. Runs the default
/// ([`KernelPath::Fused`]) path.
///
/// ```
/// use candle_core::{Device, Tensor, D};
/// let dev = Device::Cpu;
/// let h = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &dev)?;
/// let w = Tensor::new(&[[2f32, 0.], [0., 2.], [1., 1.], [0., 0.]], &dev)?;
/// let b = Tensor::new(&[0f32, 0., 0., 0.5], &dev)?;
/// let top = m3ae_kernels::text_head_top_k(&h, &w, Some(&b), &[2, 0], 2)?;
/// // row 2: logits [2, 2, 2, 0.5]: the tie goes to the lower ids
/// assert_eq!(top.ids, vec![vec![0, 1], vec![0, 2]]);
/// assert_eq!(top.logits[1], vec![2.0, 1.0]);
/// // the first id is the argmax of the composed logits
/// let logits = h.matmul(&w.t()?)?.broadcast_add(&b)?;
/// let argmax = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
/// assert_eq!((top.ids[0][0], top.ids[1][0]), (argmax[2], argmax[0]));
/// # Ok::<(), m3ae_kernels::Error>(())
/// ```
pub fn text_head_top_k(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    rows: &[usize],
    k: usize,
) -> Result<TextTopK> {
    KernelPath::default().text_head_top_k(hidden, weight, bias, rows, k)
}

/// Runs `f` on the f32 data of a CPU tensor without copying when it is already contiguous f32
/// (otherwise on a contiguous f32 copy).
///
/// ```
/// let t = candle_core::Tensor::new(&[1f32, 2., 3.], &candle_core::Device::Cpu)?;
/// let s = m3ae_kernels::with_f32_slice(&t, |x| x.iter().sum::<f32>())?;
/// assert_eq!(s, 6.0);
/// # Ok::<(), m3ae_kernels::Error>(())
/// ```
pub fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let slice = fused::storage_slice(&s, l)?;
    Ok(f(slice))
}
