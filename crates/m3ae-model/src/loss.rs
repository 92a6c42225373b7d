//! Losses and accuracies exactly as the official code computes them: per-sample means over the
//! valid positions (patch MSE, text cross-entropy and accuracy), then the batch mean.

use crate::layers::mean_sq_err_last;
use crate::{Error, Result};
use candle_core::{DType, Tensor, D};

/// Patch MSE: per patch the mean over its dims of `(target - pred)^2`; per sample the mean over
/// valid patches (`sum(valid e) / L / (sum(valid) / L)`); then the batch mean.
/// `pred`, `target`: `[B, L, P]`; `valid`: `[B, L]` (1 = counted). Returns a scalar.
pub fn patch_mse_loss(pred: &Tensor, target: &Tensor, valid: &Tensor) -> Result<Tensor> {
    if pred.dims() != target.dims() || valid.dims() != &pred.dims()[..2] {
        return Err(Error::Shape(format!(
            "patch_mse_loss: pred {:?}, target {:?}, valid {:?}",
            pred.dims(),
            target.dims(),
            valid.dims()
        )));
    }
    let l = pred.dim(1)? as f64;
    let e = mean_sq_err_last(target, pred)?;
    let num = ((e * valid)?.sum(1)? / l)?;
    let den = (valid.sum(1)? / l)?;
    Ok((num / den)?.mean_all()?)
}

/// Cross-entropy and accuracy: log-softmax over V; per sample
/// `-sum(valid logp(token)) / max(sum(valid), 1e-5)`; then the batch mean (a sample with no valid
/// token adds 0 but still counts). `logits`: `[B, T, V]`; `tokens`: `[B, T]` u32; `valid`: `[B, T]`.
/// Returns `(loss, accuracy)` scalars; the accuracy carries no gradient.
pub fn cross_entropy_loss_and_accuracy(
    logits: &Tensor,
    tokens: &Tensor,
    valid: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (b, t, _) = logits.dims3()?;
    if tokens.dims() != [b, t] || valid.dims() != [b, t] {
        return Err(Error::Shape(format!(
            "cross_entropy: logits {:?}, tokens {:?}, valid {:?}",
            logits.dims(),
            tokens.dims(),
            valid.dims()
        )));
    }
    let tokens = tokens.to_dtype(DType::U32)?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp
        .gather(&tokens.unsqueeze(2)?.contiguous()?, 2)?
        .squeeze(2)?;
    let count = valid.sum(1)?.maximum(1e-5)?;
    let loss = ((picked * valid)?.sum(1)? / &count)?.neg()?.mean_all()?;
    let correct = logits
        .detach()
        .argmax(D::Minus1)?
        .eq(&tokens)?
        .to_dtype(DType::F32)?;
    let acc = ((correct * valid.detach())?.sum(1)? / count.detach())?.mean_all()?;
    Ok((loss, acc))
}
