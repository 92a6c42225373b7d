//! Fused CPU kernels as candle custom ops with hand-written backward passes.
//!
//! Each public function takes tensors of any layout and float dtype: inputs are made contiguous
//! and computed in f32 (other dtypes are converted and converted back). Tensors on a CUDA device
//! run the kernels of the `cuda` module when the crate is built with the `cuda` feature (the
//! dense layer, attention longer than `cuda::attention_fits` allows and the text-head top-k with
//! `k` above `cuda::TOP_K_MAX` use the reference path there); without the feature, and on other
//! devices, they use the reference path. Attention dropout runs inside the CPU attention kernel;
//! the CUDA kernels have none, so attention with dropout on a CUDA device uses the reference path.
//! Each of these fallbacks on a non-CPU device is logged once per process (`log::warn!`).

mod attention;
pub mod bf16;
mod block;
#[cfg(feature = "cuda")]
pub mod cuda;
pub(crate) mod dropout;
mod gelu;
mod layer_norm;
mod linear;
pub mod math;
mod rows;
mod storage;
mod text_head;
pub(crate) mod text_top_k;
mod tile;
pub(crate) use storage::storage_slice;

use crate::{BlockParams, Dropout, Error, KernelPath, Result};
use candle_core::{DType, Tensor};
use std::sync::OnceLock;

pub use attention::QUERY_TILE;
pub use block::PARAM_ORDER as BLOCK_PARAM_ORDER;
pub use text_head::{
    MAX_TASKS as TEXT_HEAD_MAX_TASKS, ROW_TILE as TEXT_HEAD_ROW_TILE,
    VOCAB_TILE as TEXT_HEAD_VOCAB_TILE,
};

/// Why attention on a non-CPU `device` runs on the reference ops, as the key of its notice
/// (one notice per reason and process, [`warn_once`]).
fn attention_fallback(device: &candle_core::Device, dropout: bool) -> &'static str {
    if dropout {
        "attention-dropout"
    } else if device.is_cuda() {
        "attention-length"
    } else {
        "attention-device"
    }
}

/// The notice of an [`attention_fallback`] `reason`, for `l` keys with heads of size `dh`
/// (built only when it is logged: the fallback runs at every step).
fn attention_fallback_notice(
    reason: &str,
    device: &candle_core::Device,
    l: usize,
    dh: usize,
) -> String {
    match reason {
        "attention-dropout" => format!(
            "m3ae-kernels: attention with dropout on {device:?} runs on the reference ops \
             (the fused GPU kernels have no dropout)"
        ),
        "attention-length" => format!(
            "m3ae-kernels: attention over {l} keys (heads of {dh}) on CUDA runs on the \
             reference ops: the fused kernel keeps a score row per warp in shared memory, \
             up to about 1,500 keys at heads of 64"
        ),
        _ => format!(
            "m3ae-kernels: attention on {device:?} runs on the reference ops (the fused \
             kernels are for the CPU and CUDA)"
        ),
    }
}

/// Logs `msg` as a warning the first time `key` is seen in this process; returns whether it did.
/// For a fallback that a long run would otherwise hit silently at every step.
fn warn_once(key: &'static str, msg: impl FnOnce() -> String) -> bool {
    static SEEN: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen.contains(&key) {
        return false;
    }
    seen.push(key);
    log::warn!("{}", msg());
    true
}

/// Whether the CPU has AVX2 and FMA (checked once).
pub(crate) fn has_avx2_fma() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        {
            false
        }
    })
}

/// Runs `f(i)` for every `i` in `0..n` in parallel (independent tasks; any split gives the same
/// results).
///
/// When candle's own worker pool (the threads that run candle's elementwise ops, sized by
/// `CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS`) has as many threads as the current rayon pool, the
/// tasks run there: in a training step the kernels sit between candle ops, whose worker has just
/// finished and is still spinning, while rayon's workers have gone to sleep; two pools of busy
/// threads on the same cores also compete, so staying on candle's pool saves the wake-up and the
/// contention (docs/performance.md has the timings). Otherwise (for example inside a smaller
/// rayon pool) they run on rayon. Called from a rayon worker thread they also run on rayon: the
/// fused transformer block runs its whole body on a rayon worker so that its GEMMs (which use
/// rayon) and its row passes keep one set of busy threads instead of handing the cores back
/// and forth between two spinning pools.
pub(crate) fn for_each_index(n: usize, f: impl Fn(usize) + Sync + Send) {
    use rayon::prelude::*;
    let pool = candle_core::utils::barrier_pool();
    if rayon::current_thread_index().is_none()
        && pool.n_workers() + 1 == rayon::current_num_threads()
    {
        pool.execute_chunked(n, |r| r.for_each(&f));
    } else {
        (0..n).into_par_iter().for_each(f);
    }
}

/// A raw pointer that parallel tasks share; each task touches a disjoint set of elements.
pub(crate) struct SharedMut<T = f32>(pub(crate) *mut T);
// SAFETY: every user hands each task a disjoint region (see the callers' SAFETY notes).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}
// (not derived: a derive would ask `T: Copy`, and copying the pointer never copies a `T`)
impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    pub(crate) fn ptr(&self) -> *mut T {
        self.0
    }
}

/// Runs `f(i, piece)` for every `chunk`-sized piece of `out` (the last one may be shorter), in
/// parallel as [`for_each_index`].
pub(crate) fn for_each_chunk_mut(
    out: &mut [f32],
    chunk: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    let (chunk, len) = (chunk.max(1), out.len());
    let base = SharedMut(out.as_mut_ptr());
    for_each_index(len.div_ceil(chunk), |i| {
        let lo = i * chunk;
        // SAFETY: the pieces are disjoint and lie inside `out`, which outlives the call.
        let piece =
            unsafe { std::slice::from_raw_parts_mut(base.ptr().add(lo), chunk.min(len - lo)) };
        f(i, piece)
    });
}

fn f32_contiguous(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.contiguous()?)
}

/// Checks that a key-padding mask is `[b, l]`.
fn check_padding(op: &'static str, key_padding: Option<&Tensor>, b: usize, l: usize) -> Result<()> {
    match key_padding {
        Some(p) if p.dims() != [b, l] => Err(Error::Shape {
            op,
            msg: format!("key_padding is {:?}, expected [{b}, {l}]", p.dims()),
        }),
        _ => Ok(()),
    }
}

/// The padding mask as host f32 values (CPU kernels).
fn host_padding(key_padding: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    Ok(match key_padding {
        Some(p) => Some(p.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    })
}

/// The padding mask as a contiguous f32 tensor on its device (CUDA kernels).
#[cfg(feature = "cuda")]
fn device_padding(key_padding: Option<&Tensor>) -> Result<Option<Tensor>> {
    key_padding.map(f32_contiguous).transpose()
}

/// Fused masked attention; same contract as [`crate::masked_attention`].
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_padding: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    masked_attention_dropout(q, k, v, key_padding, scale, None)
}

/// Fused masked attention with dropout on the probabilities; same contract as
/// [`crate::masked_attention_dropout`]. With `dropout` on a non-CPU device the reference path
/// runs (the CUDA kernels have no dropout).
pub fn masked_attention_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_padding: Option<&Tensor>,
    scale: f64,
    dropout: Option<&Dropout>,
) -> Result<Tensor> {
    let (b, _, l, _) = q.dims4()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        return Err(Error::Shape {
            op: "masked_attention",
            msg: format!(
                "the fused kernel needs q, k, v of one shape, got {:?}, {:?}, {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            ),
        });
    }
    check_padding("masked_attention", key_padding, b, l)?;
    if !q.device().is_cpu() {
        #[cfg(feature = "cuda")]
        if dropout.is_none() && q.device().is_cuda() && cuda::attention_fits(l, q.dim(3)?) {
            let op = cuda::CudaAttention::new(scale, device_padding(key_padding)?);
            let y = f32_contiguous(q)?.apply_op3(&f32_contiguous(k)?, &f32_contiguous(v)?, op)?;
            return Ok(y.to_dtype(q.dtype())?);
        }
        let reason = attention_fallback(q.device(), dropout.is_some());
        let dh = q.dim(3)?;
        warn_once(reason, || {
            attention_fallback_notice(reason, q.device(), l, dh)
        });
        return crate::reference::masked_attention_dropout(q, k, v, key_padding, scale, dropout);
    }
    let op = attention::FusedAttention::new(scale, host_padding(key_padding)?, dropout.copied());
    let y = f32_contiguous(q)?.apply_op3(&f32_contiguous(k)?, &f32_contiguous(v)?, op)?;
    Ok(y.to_dtype(q.dtype())?)
}

/// Fused attention on the packed qkv projection; same contract as [`crate::qkv_attention`].
pub fn qkv_attention(
    qkv: &Tensor,
    heads: usize,
    key_padding: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    qkv_attention_dropout(qkv, heads, key_padding, scale, None)
}

/// Fused attention on the packed qkv projection with dropout on the probabilities; same
/// contract as [`crate::qkv_attention_dropout`]. With `dropout` on a non-CPU device the
/// reference path runs (the CUDA kernels have no dropout).
pub fn qkv_attention_dropout(
    qkv: &Tensor,
    heads: usize,
    key_padding: Option<&Tensor>,
    scale: f64,
    dropout: Option<&Dropout>,
) -> Result<Tensor> {
    let (b, l, _) = crate::reference::qkv_shapes(qkv, heads)?;
    check_padding("qkv_attention", key_padding, b, l)?;
    if !qkv.device().is_cpu() {
        #[cfg(feature = "cuda")]
        if dropout.is_none()
            && qkv.device().is_cuda()
            && cuda::attention_fits(l, qkv.dim(2)? / (3 * heads))
        {
            let op = cuda::CudaQkvAttention::new(heads, scale, device_padding(key_padding)?);
            return Ok(f32_contiguous(qkv)?.apply_op1(op)?.to_dtype(qkv.dtype())?);
        }
        let reason = attention_fallback(qkv.device(), dropout.is_some());
        let dh = qkv.dim(2)? / (3 * heads);
        warn_once(reason, || {
            attention_fallback_notice(reason, qkv.device(), l, dh)
        });
        return crate::reference::qkv_attention_dropout(qkv, heads, key_padding, scale, dropout);
    }
    let op = attention::FusedQkvAttention::new(
        heads,
        scale,
        host_padding(key_padding)?,
        dropout.copied(),
    );
    Ok(f32_contiguous(qkv)?.apply_op1(op)?.to_dtype(qkv.dtype())?)
}

/// Whether `products` (the dtype an op's products run in) asks for bf16 products: `F32` is
/// always accepted, `BF16` where `fits` (the op's fused CPU form can run on input `x`; it needs
/// `needs`), anything else is an error naming `op`.
fn bf16_products(
    op: &'static str,
    products: DType,
    fits: bool,
    needs: &str,
    x: &Tensor,
) -> Result<bool> {
    match products {
        DType::F32 => Ok(false),
        DType::BF16 if fits => Ok(true),
        other => Err(Error::Value {
            op,
            msg: format!(
                "products in {other:?} need {needs}; x is {:?} on {:?}",
                x.dtype(),
                x.device().location()
            ),
        }),
    }
}

/// Fused transformer block; same contract as [`crate::transformer_block`]. On the CPU with `x`
/// and every parameter in f32 it is one op with a hand-written backward (module docs of
/// `block`); the parameters are flattened and concatenated into one tensor for it, in
/// [`BLOCK_PARAM_ORDER`]. Anything else (other devices, other dtypes) composes the fused
/// per-op kernels, as before the one-op block existed.
pub fn transformer_block(
    x: &Tensor,
    params: &BlockParams<'_>,
    heads: usize,
    key_padding: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    transformer_block_with(x, params, heads, key_padding, eps, DType::F32)
}

/// [`transformer_block`] with its dense layers' products computed in `products`: `F32`, or
/// `BF16` for bf16-rounded operands summed in f32 ([`bf16`]: the numerics of bf16 hardware, on
/// AMX or `VDPBF16PS` where the CPU has them). Inputs, outputs, attention, LayerNorm and GELU
/// stay f32. `BF16` needs the one-op block's conditions (CPU, f32 tensors) and is an error
/// elsewhere, as is any other dtype.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use m3ae_kernels::{fused, testing::tensor, BlockParams};
/// let dev = Device::Cpu;
/// let (c, m) = (8, 16);
/// let ones = Tensor::ones(c, DType::F32, &dev)?;
/// let zeros = Tensor::zeros(c, DType::F32, &dev)?;
/// let (w_qkv, b_qkv) = (tensor(&[3 * c, c], 1, 0.3, &dev)?, tensor(&[3 * c], 2, 0.1, &dev)?);
/// let (w_proj, b_proj) = (tensor(&[c, c], 3, 0.3, &dev)?, tensor(&[c], 4, 0.1, &dev)?);
/// let (w_fc1, b_fc1) = (tensor(&[m, c], 5, 0.3, &dev)?, tensor(&[m], 6, 0.1, &dev)?);
/// let (w_fc2, b_fc2) = (tensor(&[c, m], 7, 0.3, &dev)?, tensor(&[c], 8, 0.1, &dev)?);
/// let params = BlockParams {
///     norm1: (&ones, &zeros),
///     qkv: (&w_qkv, &b_qkv),
///     proj: (&w_proj, &b_proj),
///     norm2: (&ones, &zeros),
///     fc1: (&w_fc1, &b_fc1),
///     fc2: (&w_fc2, &b_fc2),
/// };
/// let x = tensor(&[2, 5, c], 9, 1.0, &dev)?;
/// let y32 = fused::transformer_block_with(&x, &params, 2, None, 1e-6, DType::F32)?;
/// let y16 = fused::transformer_block_with(&x, &params, 2, None, 1e-6, DType::BF16)?;
/// assert_eq!(y16.dtype(), DType::F32);
/// let diff = (&y32 - &y16)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff > 0.0 && diff < 0.05, "{diff}"); // bf16 operands: about 3 significant digits
/// # Ok::<(), m3ae_kernels::Error>(())
/// ```
pub fn transformer_block_with(
    x: &Tensor,
    params: &BlockParams<'_>,
    heads: usize,
    key_padding: Option<&Tensor>,
    eps: f64,
    products: DType,
) -> Result<Tensor> {
    let (b, l, c, m) = crate::reference::block_shapes(x, params, heads)?;
    check_padding("transformer_block", key_padding, b, l)?;
    let tensors = params.tensors();
    let f32_cpu = x.device().is_cpu()
        && x.dtype() == DType::F32
        && tensors
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.device().is_cpu());
    let bf16 = bf16_products(
        "transformer_block",
        products,
        f32_cpu,
        "the one-op block (CPU, f32 tensors)",
        x,
    )?;
    if !f32_cpu {
        return crate::composed_block(KernelPath::Fused, x, params, heads, key_padding, eps);
    }
    let flat = tensors
        .iter()
        .map(|t| t.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let flat = Tensor::cat(&flat, 0)?;
    let x = x.contiguous()?;
    // Without a tracked input no backward can follow: run without saving anything.
    let train = x.track_op() || flat.track_op();
    let dims = block::BlockDims { b, l, c, m, heads };
    let op = block::FusedBlock::new(dims, eps, host_padding(key_padding)?, train, bf16);
    Ok(if train {
        x.apply_op2(&flat, op)?
    } else {
        x.apply_op2_no_bwd(&flat, &op)?
    })
}

/// The block of [`transformer_block`] composed from the fused per-op kernels (LayerNorm, dense,
/// packed attention, GELU): what the fused path runs where the one-op block does not, kept
/// callable for comparisons and benchmarks.
pub fn transformer_block_composed(
    x: &Tensor,
    params: &BlockParams<'_>,
    heads: usize,
    key_padding: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    crate::composed_block(KernelPath::Fused, x, params, heads, key_padding, eps)
}

/// Fused LayerNorm; same contract as [`crate::layer_norm`].
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if gamma.dims() != [d] || beta.dims() != [d] {
        return Err(Error::Shape {
            op: "layer_norm",
            msg: format!(
                "x has last dim {d} but gamma is {:?} and beta is {:?}",
                gamma.dims(),
                beta.dims()
            ),
        });
    }
    if !x.device().is_cpu() {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let op = cuda::CudaLayerNorm {
                eps: eps as f32,
                backward: false,
            };
            let y = f32_contiguous(x)?.apply_op3(
                &f32_contiguous(gamma)?,
                &f32_contiguous(beta)?,
                op,
            )?;
            return Ok(y.to_dtype(x.dtype())?);
        }
        return crate::reference::layer_norm(x, gamma, beta, eps);
    }
    let op = layer_norm::FusedLayerNorm { eps: eps as f32 };
    let y = f32_contiguous(x)?.apply_op3(&f32_contiguous(gamma)?, &f32_contiguous(beta)?, op)?;
    Ok(y.to_dtype(x.dtype())?)
}

/// Fused tanh-GELU; same contract as [`crate::gelu_tanh`].
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return Ok(f32_contiguous(x)?
                .apply_op1(cuda::CudaGelu)?
                .to_dtype(x.dtype())?);
        }
        return crate::reference::gelu_tanh(x);
    }
    let y = f32_contiguous(x)?.apply_op1(gelu::FusedGelu)?;
    Ok(y.to_dtype(x.dtype())?)
}

/// Fused dense layer; same contract as [`crate::linear`].
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    linear_with(x, weight, bias, DType::F32)
}

/// [`linear`] with its products in `products`: `F32`, or `BF16` for bf16-rounded operands
/// summed in f32 ([`bf16`]), forward and backward; the output and the gradients stay in the
/// inputs' dtype. `BF16` runs on the CPU only (an error elsewhere), as does any other dtype.
pub fn linear_with(x: &Tensor, weight: &Tensor, bias: &Tensor, products: DType) -> Result<Tensor> {
    let bf16 = bf16_products("linear", products, x.device().is_cpu(), "the CPU", x)?;
    if !x.device().is_cpu() {
        return crate::reference::linear(x, weight, bias);
    }
    let (rows, inp, out_dims) = crate::reference::linear_shapes(x, weight, bias)?;
    let x2 = f32_contiguous(x)?.reshape((rows, inp))?;
    let y = x2.apply_op3(
        &f32_contiguous(weight)?,
        &f32_contiguous(bias)?,
        linear::FusedLinear { bf16 },
    )?;
    Ok(y.reshape(out_dims)?.to_dtype(x.dtype())?)
}

/// Fused text-head loss; same contract as [`crate::text_head_loss`]. Only the rows with a
/// non-zero weight are multiplied, in tiles, and no `N x V` tensor is stored (module docs of
/// `text_head`). Tensors on a CUDA device run the CUDA kernels (`cuda::CudaTextHeadLoss`) when
/// the crate is built with the `cuda` feature; tensors on other devices, and CUDA without the
/// feature, use the reference path.
pub fn text_head_loss(
    hidden: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    targets: &Tensor,
    row_weights: &Tensor,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    let supported = hidden.device().is_cpu() || hidden.device().is_cuda();
    #[cfg(not(feature = "cuda"))]
    let supported = hidden.device().is_cpu();
    if !supported {
        return crate::reference::text_head_loss(hidden, weight, bias, targets, row_weights);
    }
    let inputs = crate::reference::text_head_inputs(hidden, weight, bias, targets, row_weights)?;
    let (t, w) = (inputs.targets, inputs.weights);
    let mut rows = Vec::new();
    let (mut tg, mut wg) = (Vec::new(), Vec::new());
    for (i, (&ti, &wi)) in t.iter().zip(&w).enumerate() {
        if wi != 0.0 {
            rows.push(i as u32);
            tg.push(ti);
            wg.push(wi);
        }
    }
    let (h, wt, b) = (
        f32_contiguous(hidden)?,
        f32_contiguous(weight)?,
        f32_contiguous(bias)?,
    );
    #[cfg(feature = "cuda")]
    let out = if hidden.device().is_cuda() {
        h.apply_op3(&wt, &b, cuda::CudaTextHeadLoss::new(&rows, &tg, wg)?)?
    } else {
        h.apply_op3(&wt, &b, text_head::FusedTextHeadLoss::new(rows, tg, wg))?
    };
    #[cfg(not(feature = "cuda"))]
    let out = h.apply_op3(&wt, &b, text_head::FusedTextHeadLoss::new(rows, tg, wg))?;
    let loss = out.get(0)?.to_dtype(hidden.dtype())?;
    let acc = out.get(1)?.detach().to_dtype(hidden.dtype())?;
    Ok((loss, acc))
}

/// Top-k words of a linear text head at the requested rows; same contract as
/// [`crate::text_head_top_k`]. Only the requested rows are multiplied, tile by tile over the
/// vocabulary, keeping a running top-k per row (module docs of `text_top_k`); no `N x V` tensor
/// exists. Tensors on a CUDA device run the CUDA kernels when the crate is built with the `cuda`
/// feature and `k` is at most `cuda::TOP_K_MAX` (32; above it the reference path runs, logged
/// once); tensors on other devices, and CUDA without the feature, use the reference path (logits
/// of the requested rows only).
pub fn text_head_top_k(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    rows: &[usize],
    k: usize,
) -> Result<crate::TextTopK> {
    if !hidden.device().is_cpu() {
        #[cfg(feature = "cuda")]
        if hidden.device().is_cuda() {
            if k <= cuda::TOP_K_MAX {
                let (_, _, v) = crate::reference::text_top_k_shapes(hidden, weight, bias, rows)?;
                let bias = match bias {
                    Some(b) => f32_contiguous(&b.detach())?,
                    None => Tensor::zeros(v, DType::F32, hidden.device())?,
                };
                return Ok(cuda::text_head_top_k(
                    &f32_contiguous(&hidden.detach())?,
                    &f32_contiguous(&weight.detach())?,
                    &bias,
                    rows,
                    k,
                )?);
            }
            warn_once("text-top-k", || {
                format!(
                    "m3ae-kernels: text_head_top_k with k = {k} > {} runs the reference path on \
                     CUDA (logits of the requested rows)",
                    cuda::TOP_K_MAX
                )
            });
        }
        return crate::reference::text_head_top_k(hidden, weight, bias, rows, k);
    }
    let (n, d, v) = crate::reference::text_top_k_shapes(hidden, weight, bias, rows)?;
    let hidden = f32_contiguous(&hidden.detach())?;
    let weight = f32_contiguous(&weight.detach())?;
    let bias = match bias {
        Some(b) => f32_contiguous(&b.detach())?,
        None => Tensor::zeros(v, DType::F32, hidden.device())?,
    };
    let (hs, hl) = hidden.storage_and_layout();
    let (ws, wl) = weight.storage_and_layout();
    let (bs, bl) = bias.storage_and_layout();
    let (h, w, b) = (
        storage_slice(&hs, hl)?,
        storage_slice(&ws, wl)?,
        storage_slice(&bs, bl)?,
    );
    let mut g = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        g.extend_from_slice(&h[r * d..(r + 1) * d]);
    }
    let lists = text_top_k::top_k(&g, w, b, (n, rows.len(), d, v), k);
    Ok(crate::TextTopK::from_lists(lists))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fallback_is_logged_once_per_reason() {
        assert!(warn_once("test-first", || "first".into()));
        assert!(!warn_once("test-first", || unreachable!(
            "said once already"
        )));
        assert!(warn_once("test-second", || "second".into()));
    }

    #[test]
    fn an_attention_fallback_names_its_reason() {
        // (the CUDA length case needs a CUDA device; the GPU check covers it)
        let cpu = candle_core::Device::Cpu;
        let key = attention_fallback(&cpu, true);
        let msg = attention_fallback_notice(key, &cpu, 2000, 64);
        assert_eq!(key, "attention-dropout");
        assert!(msg.contains("dropout"), "{msg}");
        let key = attention_fallback(&cpu, false);
        let msg = attention_fallback_notice(key, &cpu, 2000, 64);
        assert_eq!(key, "attention-device");
        assert!(
            msg.contains("Cpu") && msg.contains("reference ops"),
            "{msg}"
        );
    }
}
