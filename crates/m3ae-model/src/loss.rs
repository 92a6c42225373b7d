//! Losses and accuracies exactly as the official code computes them: per-sample means over the
//! valid positions (patch MSE, text cross-entropy and accuracy), then the batch mean; and the
//! classification losses of fine-tuning (label smoothing, soft-target cross-entropy, top-1).

use crate::config::ImageTarget;
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

/// Epsilon added to the patch variance of the normalised-pixel target (MAE's value).
pub const NORM_PIX_EPS: f64 = 1e-6;

/// Per patch `(mean, sqrt(var + 1e-6))` over its last dim, the variance unbiased (as MAE's
/// `norm_pix_loss`): `[B, L, P]` -> two `[B, L, 1]` tensors.
fn patch_stats(patches: &Tensor) -> Result<(Tensor, Tensor)> {
    let p = patches.dim(D::Minus1)?;
    if p < 2 {
        return Err(Error::Shape(format!(
            "normalised patch targets need patches of at least 2 values, got {p}"
        )));
    }
    let mean = patches.mean_keepdim(D::Minus1)?;
    let centred = patches.broadcast_sub(&mean)?;
    let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / (p - 1) as f64)?;
    Ok((mean, (var + NORM_PIX_EPS)?.sqrt()?))
}

/// The image head's regression target for `patches` `[B, L, P]`: the patches themselves, or
/// with [`ImageTarget::NormalizedPixels`] each patch standardised by its own mean and
/// `sqrt(var + 1e-6)` (unbiased variance).
///
/// ```
/// use m3ae_model::{loss::patch_target, ImageTarget};
/// let p = candle_core::Tensor::new(&[[[1f32, 3.0]]], &candle_core::Device::Cpu)?;
/// assert_eq!(patch_target(&p, ImageTarget::Pixels)?.to_vec3::<f32>()?, p.to_vec3::<f32>()?);
/// let n = patch_target(&p, ImageTarget::NormalizedPixels)?.to_vec3::<f32>()?;
/// assert!((n[0][0][0] + 0.7071).abs() < 1e-3 && (n[0][0][1] - 0.7071).abs() < 1e-3);
/// # Ok::<(), m3ae_model::Error>(())
/// ```
pub fn patch_target(patches: &Tensor, target: ImageTarget) -> Result<Tensor> {
    Ok(match target {
        ImageTarget::Pixels => patches.clone(),
        ImageTarget::NormalizedPixels => {
            let (mean, std) = patch_stats(patches)?;
            patches.broadcast_sub(&mean)?.broadcast_div(&std)?
        }
    })
}

/// Image predictions `[B, L, P]` back in pixel space: as they are for the pixel target; for the
/// normalised target, scaled and shifted by the statistics of the corresponding `patches` of
/// the input image (how MAE shows its reconstructions).
pub fn prediction_pixels(pred: &Tensor, patches: &Tensor, target: ImageTarget) -> Result<Tensor> {
    Ok(match target {
        ImageTarget::Pixels => pred.clone(),
        ImageTarget::NormalizedPixels => {
            let (mean, std) = patch_stats(patches)?;
            pred.broadcast_mul(&std)?.broadcast_add(&mean)?
        }
    })
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

/// Smoothed one-hot targets `[B, classes]`: `onehot * (1 - smoothing) + smoothing / classes`
/// (the official `cross_entropy_loss` on integer labels; `smoothing` 0 gives the one-hot).
/// A label outside `0..classes` is an error naming it.
///
/// ```
/// use candle_core::Device;
/// let t = m3ae_model::loss::smooth_labels(&[2, 0], 4, 0.2, &Device::Cpu)?.to_vec2::<f32>()?;
/// assert_eq!(t[0], vec![0.05, 0.05, 0.8 + 0.05, 0.05]);
/// assert_eq!(t[1], vec![0.8 + 0.05, 0.05, 0.05, 0.05]);
/// # Ok::<(), m3ae_model::Error>(())
/// ```
pub fn smooth_labels(
    labels: &[u32],
    classes: usize,
    smoothing: f64,
    device: &candle_core::Device,
) -> Result<Tensor> {
    if classes == 0 {
        return Err(Error::Shape("smooth_labels: 0 classes".into()));
    }
    if !(0.0..=1.0).contains(&smoothing) {
        return Err(Error::Shape(format!(
            "smooth_labels: smoothing {smoothing} is outside [0, 1]"
        )));
    }
    // f32 arithmetic as the official code: onehot * (1 - s) + s / classes.
    let on = (1.0 - smoothing) as f32;
    let off = (smoothing / classes as f64) as f32;
    let mut v = vec![off; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        if l as usize >= classes {
            return Err(Error::Shape(format!(
                "label {l} of sample {i} is outside the {classes} classes"
            )));
        }
        v[i * classes + l as usize] = 1.0f32 * on + off;
    }
    Ok(Tensor::from_vec(v, (labels.len(), classes), device)?)
}

/// Soft-target cross-entropy: the batch mean of `-sum_c target_c * log_softmax(logits)_c`.
/// `logits`, `targets`: `[B, C]` (targets such as [`smooth_labels`] or mixed labels; rows
/// summing to 1). Returns a scalar with gradient to `logits`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let logits = Tensor::new(&[[0f32, 0.0], [2.0, 0.0]], &Device::Cpu)?;
/// let targets = Tensor::new(&[[1f32, 0.0], [0.5, 0.5]], &Device::Cpu)?;
/// let l = m3ae_model::loss::soft_cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
/// // row 0: ln 2; row 1: ln(1 + e^2) - 1
/// let want = (2f32.ln() + (1.0 + 2f32.exp()).ln() - 1.0) / 2.0;
/// assert!((l - want).abs() < 1e-6);
/// # Ok::<(), m3ae_model::Error>(())
/// ```
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (_, _) = logits.dims2()?;
    if logits.dims() != targets.dims() {
        return Err(Error::Shape(format!(
            "soft_cross_entropy: logits {:?}, targets {:?}",
            logits.dims(),
            targets.dims()
        )));
    }
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok((logp * targets)?.sum(1)?.neg()?.mean_all()?)
}

/// Top-1 accuracy of `logits` `[B, C]` against integer labels: the fraction of rows whose
/// argmax ([`crate::ranking::argmax_rows`]: ties to the lower class, NaN never wins, a row
/// without a finite best logit is wrong) is the label.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let logits = Tensor::new(&[[0f32, 1.0, 0.0], [3.0, 1.0, 3.0]], &Device::Cpu)?;
/// assert_eq!(m3ae_model::loss::top1_accuracy(&logits, &[1, 2])?, 0.5);
/// # Ok::<(), m3ae_model::Error>(())
/// ```
pub fn top1_accuracy(logits: &Tensor, labels: &[u32]) -> Result<f64> {
    let (b, c) = logits.dims2()?;
    if labels.len() != b || b == 0 {
        return Err(Error::Shape(format!(
            "top1_accuracy: {} labels for logits {:?}",
            labels.len(),
            logits.dims()
        )));
    }
    let scores = logits
        .detach()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let pred = crate::ranking::argmax_rows(&scores, c)?;
    let correct = pred
        .iter()
        .zip(labels)
        .filter(|(p, l)| **p == Some(**l))
        .count();
    Ok(correct as f64 / b as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn smoothing_cross_entropy_and_accuracy_on_a_tiny_batch() -> Result<()> {
        let dev = Device::Cpu;
        let t = smooth_labels(&[1, 0, 2], 3, 0.3, &dev)?.to_vec2::<f32>()?;
        assert_eq!(t[0], vec![0.1, 0.8, 0.1]);
        for row in &t {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        assert_eq!(
            smooth_labels(&[2], 3, 0.0, &dev)?.to_vec2::<f32>()?,
            vec![vec![0.0, 0.0, 1.0]]
        );
        assert!(smooth_labels(&[3], 3, 0.1, &dev)
            .unwrap_err()
            .to_string()
            .contains("label 3"));
        let logits = Tensor::new(&[[1f32, 2.0, 3.0], [0.5, 0.0, -1.0]], &dev)?;
        let targets = smooth_labels(&[2, 1], 3, 0.3, &dev)?;
        let ce = soft_cross_entropy(&logits, &targets)?.to_scalar::<f32>()? as f64;
        // by hand in f64
        let rows = [[1.0f64, 2.0, 3.0], [0.5, 0.0, -1.0]];
        let tg = [[0.1f64, 0.1, 0.8], [0.1, 0.8, 0.1]];
        let mut want = 0.0;
        for (r, t) in rows.iter().zip(&tg) {
            let lse = r.iter().map(|x| x.exp()).sum::<f64>().ln();
            want -= r.iter().zip(t).map(|(x, t)| t * (x - lse)).sum::<f64>();
        }
        want /= 2.0;
        assert!((ce - want).abs() < 1e-6, "{ce} vs {want}");
        // hard targets: the usual cross-entropy
        let hard = soft_cross_entropy(&logits, &smooth_labels(&[2, 1], 3, 0.0, &dev)?)?;
        let (l, _) = cross_entropy_loss_and_accuracy(
            &logits.unsqueeze(1)?,
            &Tensor::new(&[[2u32], [1]], &dev)?,
            &Tensor::ones((2, 1), DType::F32, &dev)?,
        )?;
        assert!((hard.to_scalar::<f32>()? - l.to_scalar::<f32>()?).abs() < 1e-6);
        assert_eq!(top1_accuracy(&logits, &[2, 1])?, 0.5);
        assert_eq!(top1_accuracy(&logits, &[2, 0])?, 1.0);
        assert!(top1_accuracy(&logits, &[2]).is_err());
        assert!(soft_cross_entropy(&logits, &targets.narrow(0, 0, 1)?).is_err());
        Ok(())
    }

    #[test]
    fn normalised_pixel_targets_standardise_each_patch_and_map_back() -> anyhow::Result<()> {
        let dev = candle_core::Device::Cpu;
        let v: Vec<f32> = (0..2 * 3 * 12)
            .map(|i| ((i * 29) % 17) as f32 * 0.3)
            .collect();
        let patches = Tensor::from_vec(v.clone(), (2, 3, 12), &dev)?;
        let t = patch_target(&patches, ImageTarget::NormalizedPixels)?;
        for (row, out) in v
            .chunks(12)
            .zip(t.flatten_all()?.to_vec1::<f32>()?.chunks(12))
        {
            let mean = row.iter().map(|&x| x as f64).sum::<f64>() / 12.0;
            let var = row.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / 11.0;
            for (x, y) in row.iter().zip(out) {
                let want = (*x as f64 - mean) / (var + NORM_PIX_EPS).sqrt();
                assert!((*y as f64 - want).abs() < 1e-5, "{y} vs {want}");
            }
        }
        // predicting the target exactly gives back the patches
        let back = prediction_pixels(&t, &patches, ImageTarget::NormalizedPixels)?;
        let err = (back - &patches)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "{err}");
        // the pixel target is the identity both ways
        let same = prediction_pixels(&patches, &patches, ImageTarget::Pixels)?;
        assert_eq!(same.to_vec3::<f32>()?, patches.to_vec3::<f32>()?);
        assert!(patch_target(&patches.narrow(2, 0, 1)?, ImageTarget::NormalizedPixels).is_err());
        Ok(())
    }
}
