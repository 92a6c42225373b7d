//! Reference kernels: plain compositions of differentiable candle ops.
//!
//! These are the ground truth for every fused or fast path: readable, f32, and differentiable
//! through candle's autograd (no `*_no_bwd` op is used anywhere in this module).

use crate::{BlockParams, Dropout, Error, KernelPath, Result};
use candle_core::{DType, Tensor, D};

/// Score given to a padding key before the softmax (the official code replaces, not adds, it).
pub const PADDING_SCORE: f64 = -1e7;

/// LayerNorm over the last axis (two-pass biased variance). See [`crate::layer_norm`].
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
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
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    Ok(xc
        .broadcast_mul(&inv)?
        .broadcast_mul(gamma)?
        .broadcast_add(beta)?)
}

/// Masked attention from matmul, `where_cond` and a max-subtracted softmax.
/// See [`crate::masked_attention`] for shapes.
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_padding: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    masked_attention_dropout(q, k, v, key_padding, scale, None)
}

/// [`masked_attention`] with dropout on the probabilities: `(P * M) V` with the mask `M` of
/// `dropout` over `[B, H, Lq, Lk]` built on the host (see [`crate::masked_attention_dropout`]).
pub fn masked_attention_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_padding: Option<&Tensor>,
    scale: f64,
    dropout: Option<&Dropout>,
) -> Result<Tensor> {
    let (b, h, l, dh) = q.dims4()?;
    let (kb, kh, lk, kdh) = k.dims4()?;
    if (kb, kh, kdh) != (b, h, dh) || v.dims() != k.dims() {
        return Err(Error::Shape {
            op: "masked_attention",
            msg: format!(
                "q {:?}, k {:?}, v {:?} do not agree",
                q.dims(),
                k.dims(),
                v.dims()
            ),
        });
    }
    let scores = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? * scale)?;
    let scores = match key_padding {
        None => scores,
        Some(pad) => {
            if pad.dims() != [b, lk] {
                return Err(Error::Shape {
                    op: "masked_attention",
                    msg: format!("key_padding is {:?}, expected [{b}, {lk}]", pad.dims()),
                });
            }
            let is_pad = pad
                .gt(0.0)?
                .reshape((b, 1, 1, lk))?
                .broadcast_as((b, h, l, lk))?;
            let fill = Tensor::full(PADDING_SCORE as f32, (b, h, l, lk), q.device())?
                .to_dtype(scores.dtype())?;
            is_pad.where_cond(&fill, &scores)?
        }
    };
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let p = match dropout {
        Some(d) => (p * crate::dropout::attention_mask(d, (b, h, l, lk), q)?)?,
        None => p,
    };
    Ok(p.matmul(&v.contiguous()?)?)
}

/// Dense layer `x W^T + b`: `x` `[.., in]`, `weight` `[out, in]`, `bias` `[out]` -> `[.., out]`
/// (flattened to one 2-D matmul).
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (rows, inp, out_dims) = linear_shapes(x, weight, bias)?;
    let y = x
        .contiguous()?
        .reshape((rows, inp))?
        .matmul(&weight.t()?)?
        .broadcast_add(bias)?;
    Ok(y.reshape(out_dims)?)
}

/// Checks a dense layer's shapes; returns `(rows, in, output dims)`.
pub(crate) fn linear_shapes(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<(usize, usize, Vec<usize>)> {
    let mut dims = x.dims().to_vec();
    let inp = *dims.last().unwrap_or(&0);
    let (out, win) = weight.dims2()?;
    if win != inp || bias.dims() != [out] {
        return Err(Error::Shape {
            op: "linear",
            msg: format!(
                "x {:?}, weight {:?}, bias {:?} do not agree",
                x.dims(),
                weight.dims(),
                bias.dims()
            ),
        });
    }
    let rows = x.elem_count() / inp.max(1);
    if let Some(l) = dims.last_mut() {
        *l = out;
    }
    Ok((rows, inp, dims))
}

/// A pre-LN transformer block composed from the reference ops. See
/// [`crate::transformer_block`].
pub fn transformer_block(
    x: &Tensor,
    params: &BlockParams<'_>,
    heads: usize,
    key_padding: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    crate::composed_block(KernelPath::Reference, x, params, heads, key_padding, eps)
}

/// Checks a transformer block's shapes; returns `(B, L, C, M)` (`M` the MLP width).
pub(crate) fn block_shapes(
    x: &Tensor,
    p: &BlockParams<'_>,
    heads: usize,
) -> Result<(usize, usize, usize, usize)> {
    let (b, l, c) = x.dims3()?;
    let m = p.fc1.0.dims().first().copied().unwrap_or(0);
    let want: [(&Tensor, Vec<usize>); 12] = [
        (p.norm1.0, vec![c]),
        (p.norm1.1, vec![c]),
        (p.qkv.0, vec![3 * c, c]),
        (p.qkv.1, vec![3 * c]),
        (p.proj.0, vec![c, c]),
        (p.proj.1, vec![c]),
        (p.norm2.0, vec![c]),
        (p.norm2.1, vec![c]),
        (p.fc1.0, vec![m, c]),
        (p.fc1.1, vec![m]),
        (p.fc2.0, vec![c, m]),
        (p.fc2.1, vec![c]),
    ];
    for (i, (t, dims)) in want.iter().enumerate() {
        if t.dims() != dims.as_slice() {
            return Err(Error::Shape {
                op: "transformer_block",
                msg: format!(
                    "{} is {:?}, expected {dims:?} for x {:?}",
                    crate::fused::BLOCK_PARAM_ORDER[i],
                    t.dims(),
                    x.dims()
                ),
            });
        }
    }
    if heads == 0 || c % heads != 0 {
        return Err(Error::Shape {
            op: "transformer_block",
            msg: format!("width {c} is not a multiple of {heads} heads"),
        });
    }
    Ok((b, l, c, m))
}

/// Checks a packed qkv tensor `[B, L, 3 x heads x Dh]`; returns `(B, L, Dh)`.
pub(crate) fn qkv_shapes(qkv: &Tensor, heads: usize) -> Result<(usize, usize, usize)> {
    let (b, l, c3) = qkv.dims3()?;
    if heads == 0 || c3 % (3 * heads) != 0 {
        return Err(Error::Shape {
            op: "qkv_attention",
            msg: format!(
                "qkv {:?} is not [B, L, 3 x {heads} heads x head dim]",
                qkv.dims()
            ),
        });
    }
    Ok((b, l, c3 / (3 * heads)))
}

/// Attention on the packed qkv projection: `qkv` `[B, L, 3 D]` (columns `[q | k | v]`, each
/// head-contiguous) -> `[B, L, D]` with the heads concatenated.
pub fn qkv_attention(
    qkv: &Tensor,
    heads: usize,
    key_padding: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    qkv_attention_dropout(qkv, heads, key_padding, scale, None)
}

/// [`qkv_attention`] with dropout on the probabilities (the masks of
/// [`masked_attention_dropout`] on the heads split out).
pub fn qkv_attention_dropout(
    qkv: &Tensor,
    heads: usize,
    key_padding: Option<&Tensor>,
    scale: f64,
    dropout: Option<&Dropout>,
) -> Result<Tensor> {
    let (b, l, dh) = qkv_shapes(qkv, heads)?;
    let x = qkv
        .reshape((b, l, 3, heads, dh))?
        .permute((2, 0, 3, 1, 4))?;
    let (q, k, v) = (
        x.get(0)?.contiguous()?,
        x.get(1)?.contiguous()?,
        x.get(2)?.contiguous()?,
    );
    let y = masked_attention_dropout(&q, &k, &v, key_padding, scale, dropout)?;
    Ok(y.transpose(1, 2)?
        .contiguous()?
        .reshape((b, l, heads * dh))?)
}

/// The checked inputs of a text-head loss, on the host.
pub(crate) struct TextHeadInputs {
    /// Target word of each row.
    pub(crate) targets: Vec<u32>,
    /// Weight of each row.
    pub(crate) weights: Vec<f32>,
}

/// Checks the inputs of a text-head loss and returns the targets as host `u32` and the row
/// weights as host `f32`: `hidden` `[N, D]`, `weight` `[V, D]`, `bias` `[V]`, `targets` `[N]`
/// (integer ids below `V`), `row_weights` `[N]`.
pub(crate) fn text_head_inputs(
    hidden: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    targets: &Tensor,
    row_weights: &Tensor,
) -> Result<TextHeadInputs> {
    let bad = |msg: String| Error::Shape {
        op: "text_head_loss",
        msg,
    };
    let (n, d) = hidden
        .dims2()
        .map_err(|_| bad(format!("hidden must be [N, D], got {:?}", hidden.dims())))?;
    let v = weight.dim(0).unwrap_or(0);
    if weight.dims() != [v, d] || bias.dims() != [v] || v == 0 {
        return Err(bad(format!(
            "hidden {:?}, weight {:?}, bias {:?} do not agree (weight must be [V, D], bias [V])",
            hidden.dims(),
            weight.dims(),
            bias.dims()
        )));
    }
    if targets.dims() != [n] || row_weights.dims() != [n] {
        return Err(bad(format!(
            "targets {:?} and row_weights {:?} must be [{n}]",
            targets.dims(),
            row_weights.dims()
        )));
    }
    let t = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if let Some(&x) = t.iter().find(|&&x| x as usize >= v) {
        return Err(bad(format!(
            "target {x} is outside the vocabulary of {v} words"
        )));
    }
    let w = row_weights.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(TextHeadInputs {
        targets: t,
        weights: w,
    })
}

/// Weighted cross-entropy and accuracy of a linear output head, composed from candle ops (the
/// `N x V` logits are materialised): `loss = sum_i w_i * -log softmax(h_i W^T + b)[t_i]` and
/// `accuracy = sum_i w_i [argmax = t_i]` (no gradient). See [`crate::text_head_loss`].
/// A row of weight 0 still enters the products, so a NaN in it makes the loss NaN here (the
/// fused op skips such rows).
pub fn text_head_loss(
    hidden: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    targets: &Tensor,
    row_weights: &Tensor,
) -> Result<(Tensor, Tensor)> {
    text_head_inputs(hidden, weight, bias, targets, row_weights)?;
    let t = targets.to_dtype(DType::U32)?;
    let w = row_weights.to_dtype(DType::F32)?.detach();
    let logits = linear(hidden, weight, bias)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = logp.gather(&t.unsqueeze(1)?.contiguous()?, 1)?.squeeze(1)?;
    let loss = (picked * &w)?.sum_all()?.neg()?;
    let correct = logits
        .detach()
        .argmax(D::Minus1)?
        .eq(&t)?
        .to_dtype(DType::F32)?;
    let acc = (correct * w)?.sum_all()?;
    Ok((loss, acc))
}

/// Checks the inputs of a text-head top-k: `hidden` `[N, D]`, `weight` `[V, D]`, `bias` `[V]`,
/// rows below `N`; returns `(N, D, V)`.
pub(crate) fn text_top_k_shapes(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    rows: &[usize],
) -> Result<(usize, usize, usize)> {
    let bad = |msg: String| Error::Shape {
        op: "text_head_top_k",
        msg,
    };
    let (n, d) = hidden
        .dims2()
        .map_err(|_| bad(format!("hidden must be [N, D], got {:?}", hidden.dims())))?;
    let v = match weight.dims() {
        &[v, d2] if d2 == d => v,
        w => {
            return Err(bad(format!(
                "hidden is {:?} but weight is {w:?}",
                hidden.dims()
            )))
        }
    };
    if let Some(b) = bias.filter(|b| b.dims() != [v]) {
        return Err(bad(format!(
            "weight is {:?} but bias is {:?}",
            weight.dims(),
            b.dims()
        )));
    }
    if let Some(&r) = rows.iter().find(|&&r| r >= n) {
        return Err(bad(format!("row {r} is outside the {n} rows of hidden")));
    }
    Ok((n, d, v))
}

/// Top-k words of a linear text head at the requested rows, composed: the logits of those rows
/// only (`index_select`, `matmul`, bias), then the selection on the CPU with the order of
/// [`crate::text_head_top_k`]. See there.
pub fn text_head_top_k(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    rows: &[usize],
    k: usize,
) -> Result<crate::TextTopK> {
    let (_, _, v) = text_top_k_shapes(hidden, weight, bias, rows)?;
    if rows.is_empty() || k == 0 || v == 0 {
        return Ok(crate::TextTopK::from_lists(vec![Vec::new(); rows.len()]));
    }
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let idx = Tensor::new(idx.as_slice(), hidden.device())?;
    let h = hidden.detach().index_select(&idx, 0)?;
    let mut logits = h.matmul(&weight.detach().t()?)?;
    if let Some(b) = bias {
        logits = logits.broadcast_add(&b.detach())?;
    }
    let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let lists = logits
        .iter()
        .map(|row| crate::fused::text_top_k::top_k_of_row(row, k))
        .collect();
    Ok(crate::TextTopK::from_lists(lists))
}

/// tanh-approximated GELU (candle's `Tensor::gelu` is this form and has a backward).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu()?)
}

/// Softmax over the last axis built from differentiable ops (max-subtracted).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Converts a 0/1 float mask to the `u8` form `where_cond` wants.
pub fn mask_to_u8(mask: &Tensor) -> Result<Tensor> {
    Ok(mask.gt(0.0)?.to_dtype(DType::U8)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32], s: &[usize]) -> Tensor {
        Tensor::from_slice(v, s, &Device::Cpu).unwrap()
    }

    #[test]
    fn attention_replaces_padding_scores() -> anyhow::Result<()> {
        // one head, two keys; the second key is padding so the output is v[0].
        let q = t(&[1.0, 0.0, 0.5, 0.5], &[1, 1, 2, 2]);
        let k = t(&[0.3, 0.1, 5.0, 5.0], &[1, 1, 2, 2]);
        let v = t(&[1.0, 2.0, 3.0, 4.0], &[1, 1, 2, 2]);
        let pad = t(&[0.0, 1.0], &[1, 2]);
        let y = masked_attention(&q, &k, &v, Some(&pad), 1.0)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![1.0, 2.0, 1.0, 2.0]);
        // every key padded: uniform attention (replacement, not -inf).
        let pad = t(&[1.0, 1.0], &[1, 2]);
        let y = masked_attention(&q, &k, &v, Some(&pad), 1.0)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![2.0, 3.0, 2.0, 3.0]);
        Ok(())
    }

    #[test]
    fn layer_norm_has_gradients_for_all_inputs() -> anyhow::Result<()> {
        let x = Var::from_tensor(&t(&[1.0, 2.0, 4.0, -1.0, 0.5, 3.0], &[2, 3]))?;
        let g = Var::from_tensor(&t(&[1.0, 2.0, 3.0], &[3]))?;
        let b = Var::from_tensor(&t(&[0.1, 0.2, 0.3], &[3]))?;
        let y = layer_norm(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-6)?;
        let w = t(&[1.0, -2.0, 0.5, 3.0, 1.0, -1.0], &[2, 3]);
        let grads = (y * w)?.sum_all()?.backward()?;
        for v in [&x, &g, &b] {
            let gr = grads.get(v.as_tensor()).expect("missing gradient");
            assert!(gr.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    #[test]
    fn attention_gradients_match_finite_differences() -> anyhow::Result<()> {
        let vals: Vec<f32> = (0..24)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let q = Var::from_tensor(&t(&vals, &[1, 2, 3, 4]))?;
        let k = t(
            &vals.iter().map(|x| x * 0.7 + 0.1).collect::<Vec<_>>(),
            &[1, 2, 3, 4],
        );
        let v = t(
            &vals.iter().map(|x| 1.0 - x).collect::<Vec<_>>(),
            &[1, 2, 3, 4],
        );
        let pad = t(&[0.0, 0.0, 1.0], &[1, 3]);
        let f = |q: &Tensor| -> anyhow::Result<f64> {
            let y = masked_attention(q, &k, &v, Some(&pad), 0.5)?;
            Ok((y.sqr()?.sum_all()?.to_dtype(DType::F64)?).to_scalar::<f64>()?)
        };
        let y = masked_attention(q.as_tensor(), &k, &v, Some(&pad), 0.5)?;
        let grads = y.sqr()?.sum_all()?.backward()?;
        let g = grads
            .get(q.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        let h = 1e-2f32;
        for i in [0usize, 5, 13, 23] {
            let mut plus = vals.clone();
            plus[i] += h;
            let mut minus = vals.clone();
            minus[i] -= h;
            let fd =
                (f(&t(&plus, &[1, 2, 3, 4]))? - f(&t(&minus, &[1, 2, 3, 4]))?) / (2.0 * h as f64);
            assert!(
                (fd - g[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                "{i}: fd {fd} vs {}",
                g[i]
            );
        }
        Ok(())
    }
}
