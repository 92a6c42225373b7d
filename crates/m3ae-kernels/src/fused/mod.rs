//! Fused CPU kernels as candle custom ops with hand-written backward passes.
//!
//! Each public function takes tensors of any layout and float dtype: inputs are made contiguous
//! and computed in f32 (other dtypes are converted and converted back). Tensors on a non-CPU
//! device use the reference path until the CUDA kernels exist.

mod attention;
mod gelu;
mod layer_norm;
mod linear;
pub mod math;
mod rows;
mod storage;
mod tile;
pub(crate) use storage::storage_slice;

use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::sync::OnceLock;

pub use attention::QUERY_TILE;

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

fn f32_contiguous(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.contiguous()?)
}

/// Fused masked attention; same contract as [`crate::masked_attention`].
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_padding: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    if !q.device().is_cpu() {
        return crate::reference::masked_attention(q, k, v, key_padding, scale);
    }
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
    let padding = match key_padding {
        None => None,
        Some(p) => {
            if p.dims() != [b, l] {
                return Err(Error::Shape {
                    op: "masked_attention",
                    msg: format!("key_padding is {:?}, expected [{b}, {l}]", p.dims()),
                });
            }
            Some(p.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        }
    };
    let op = attention::FusedAttention::new(scale, padding);
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
    if !qkv.device().is_cpu() {
        return crate::reference::qkv_attention(qkv, heads, key_padding, scale);
    }
    let (b, l, _) = crate::reference::qkv_shapes(qkv, heads)?;
    let padding = match key_padding {
        None => None,
        Some(p) => {
            if p.dims() != [b, l] {
                return Err(Error::Shape {
                    op: "qkv_attention",
                    msg: format!("key_padding is {:?}, expected [{b}, {l}]", p.dims()),
                });
            }
            Some(p.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        }
    };
    let op = attention::FusedQkvAttention::new(heads, scale, padding);
    Ok(f32_contiguous(qkv)?.apply_op1(op)?.to_dtype(qkv.dtype())?)
}

/// Fused LayerNorm; same contract as [`crate::layer_norm`].
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return crate::reference::layer_norm(x, gamma, beta, eps);
    }
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
    let op = layer_norm::FusedLayerNorm { eps: eps as f32 };
    let y = f32_contiguous(x)?.apply_op3(&f32_contiguous(gamma)?, &f32_contiguous(beta)?, op)?;
    Ok(y.to_dtype(x.dtype())?)
}

/// Fused tanh-GELU; same contract as [`crate::gelu_tanh`].
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return crate::reference::gelu_tanh(x);
    }
    let y = f32_contiguous(x)?.apply_op1(gelu::FusedGelu)?;
    Ok(y.to_dtype(x.dtype())?)
}

/// Fused dense layer; same contract as [`crate::linear`].
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return crate::reference::linear(x, weight, bias);
    }
    let (rows, inp, out_dims) = crate::reference::linear_shapes(x, weight, bias)?;
    let x2 = f32_contiguous(x)?.reshape((rows, inp))?;
    let y = x2.apply_op3(
        &f32_contiguous(weight)?,
        &f32_contiguous(bias)?,
        linear::FusedLinear,
    )?;
    Ok(y.reshape(out_dims)?.to_dtype(x.dtype())?)
}
