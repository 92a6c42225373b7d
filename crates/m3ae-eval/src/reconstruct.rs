//! Reconstruction of one image (and caption) as `m3ae reconstruct` shows it: the image is masked
//! with a seed, the model predicts the masked patches (and masked words), and the result holds
//! the four panels, the predicted words and the cls-token attention over patches and words
//! ([`Reconstruction`]; [`crate::panels`] writes it as PNG).
//!
//! ```
//! use m3ae_data::{Normalization, RgbImage};
//! use m3ae_eval::reconstruct;
//! use m3ae_model::{AnyModel, M3aeConfig, Variant};
//! let cfg = M3aeConfig::preset("tiny")?;
//! let model = AnyModel::init(Variant::Mae, &cfg, 0, &candle_core::Device::Cpu)?;
//! let image = RgbImage { width: 40, height: 40, data: vec![128; 40 * 40 * 3] };
//! let r = reconstruct(&model, &image, None, 0, Normalization::Cc12m)?;
//! assert_eq!(r.size, cfg.image_size);
//! // three quarters of the patches are masked, and every panel is a full image
//! assert_eq!(r.image_mask.iter().filter(|&&m| m > 0.5).count(), 12);
//! assert!(r.panels.iter().all(|p| p.len() == 32 * 32 * 3));
//! # Ok::<(), m3ae_eval::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::features::eval_image_config;
use crate::panels::to_pixels;
use candle_core::Tensor;
use m3ae_data::{Normalization, RgbImage, Tokenizer};
use m3ae_model::{AnyModel, Masking, ModelInput, Noise};

/// What [`reconstruct`] produced.
#[derive(Debug, Clone)]
pub struct Reconstruction {
    /// Side of one panel in pixels (the model's image size).
    pub size: usize,
    /// Four `[size, size, 3]` u8 panels: original, masked input, prediction, prediction with
    /// the visible patches pasted back.
    pub panels: [Vec<u8>; 4],
    /// `[Li]` 1 = masked patch.
    pub image_mask: Vec<f32>,
    /// Masked (non-padding) text positions: (position, original token, predicted token).
    pub words: Vec<(usize, String, String)>,
    /// The caption with every masked token replaced by its prediction.
    pub predicted_caption: Option<String>,
    /// Attention of the cls token over the image patches `[Li]` (last encoder block, mean over
    /// heads, unmasked input).
    pub patch_attention: Vec<f32>,
    /// Attention of the cls token over the caption's tokens (token, weight).
    pub word_attention: Vec<(String, f32)>,
    /// Mean squared error of the prediction on the masked patches (normalised pixels).
    pub masked_mse: f64,
}

fn uniform_noise(len: usize, seed: u64, purpose: u64) -> Noise {
    use rand::Rng;
    let mut rng = m3ae_data::seed::rng(seed, purpose, 0, 0);
    Noise::Shared((0..len).map(|_| rng.random::<f32>()).collect())
}

/// Which positions [`reconstruct_with`] masks: every position gets a noise value, and the
/// model keeps (shows) the positions of lowest noise, as many as its mask ratio keeps
/// (`M3aeConfig::image_keep` / `text_keep`); the rest are masked.
#[derive(Debug, Clone, Default)]
pub struct MaskNoise {
    /// `[Li]` noise of the image patches (row-major patch order); `None`: uniform noise drawn
    /// from the seed.
    pub image: Option<Vec<f32>>,
    /// `[T]` noise of the caption's token positions (padding included, `T` = the model's text
    /// length); `None`: uniform noise drawn from the seed.
    pub text: Option<Vec<f32>>,
}

/// Masks an image (and caption) with `seed`, runs the model and assembles the panels, the
/// predicted words and the cls attention. `image` is any RGB image; it is resized to the
/// model's image size with the evaluation transform. An image-only MAE ignores the caption.
/// Errors about the model's outputs are [`Error::Unusable`] naming "the model".
pub fn reconstruct(
    model: &AnyModel,
    image: &RgbImage,
    caption: Option<(&str, &Tokenizer)>,
    seed: u64,
    norm: Normalization,
) -> Result<Reconstruction> {
    reconstruct_with(model, image, caption, seed, &MaskNoise::default(), norm)
}

/// [`reconstruct`] with chosen masks: `noise` decides which patches and words are hidden (for
/// example, every patch of one object masked while the words naming it stay visible); what it
/// leaves `None` is drawn from `seed`. A noise vector of the wrong length is
/// [`Error::Unusable`] naming its length and the expected one.
///
/// ```
/// use m3ae_data::{Normalization, RgbImage};
/// use m3ae_eval::reconstruct::{reconstruct_with, MaskNoise};
/// use m3ae_model::{AnyModel, M3aeConfig, Variant};
/// let cfg = M3aeConfig::preset("tiny")?;
/// let model = AnyModel::init(Variant::Mae, &cfg, 0, &candle_core::Device::Cpu)?;
/// let image = RgbImage { width: 32, height: 32, data: vec![128; 32 * 32 * 3] };
/// // 16 patches: hide the last four (highest noise), keep the first four
/// let noise = MaskNoise { image: Some((0..16).map(|i| i as f32).collect()), text: None };
/// let r = reconstruct_with(&model, &image, None, 0, &noise, Normalization::Cc12m)?;
/// assert_eq!(&r.image_mask[..4], &[0.0; 4]);
/// assert_eq!(&r.image_mask[12..], &[1.0; 4]);
/// # Ok::<(), m3ae_eval::Error>(())
/// ```
pub fn reconstruct_with(
    model: &AnyModel,
    image: &RgbImage,
    caption: Option<(&str, &Tokenizer)>,
    seed: u64,
    noise: &MaskNoise,
    norm: Normalization,
) -> Result<Reconstruction> {
    let cfg = model.config().clone();
    let unusable = |msg: String| Error::Unusable {
        model: "the model".into(),
        msg,
    };
    if cfg.image_output_dim() != cfg.patch_dim() {
        return Err(unusable(format!(
            "the image head does not predict pixels (image_output_dim {} != P*P*3 = {})",
            cfg.image_output_dim(),
            cfg.patch_dim()
        )));
    }
    // inputs are built on the model's device; the panels are assembled from host copies
    let dev = model.params().device().clone();
    let s = cfg.image_size;
    let hwc = eval_image_config(&cfg, norm).apply(image, &mut m3ae_data::seed::rng(seed, 0, 0, 0));
    let img = Tensor::from_vec(hwc.clone(), (1, s, s, 3), &dev)?;
    let patches = m3ae_model::patchify(&img, cfg.patch_size)?;
    let li = patches.dim(1)?;
    let chosen = |given: &Option<Vec<f32>>, len: usize, purpose: u64, what: &str| match given {
        None => Ok(uniform_noise(len, seed, purpose)),
        Some(v) if v.len() == len => Ok(Noise::Shared(v.clone())),
        Some(v) => Err(unusable(format!(
            "the {what} mask noise has {} values, the model needs {len}",
            v.len()
        ))),
    };
    let im = Masking::new(
        &chosen(&noise.image, li, 1, "image")?,
        1,
        cfg.image_keep(li),
        &dev,
    )?;
    let mut text = None;
    if let (Some((cap, tok)), AnyModel::M3ae(_)) = (caption, model) {
        if tok.vocab_size() > cfg.text_vocab_size {
            return Err(unusable(format!(
                "the tokenizer's vocabulary ({} tokens) is larger than the model's ({})",
                tok.vocab_size(),
                cfg.text_vocab_size
            )));
        }
        let t = tok.encode(cap, cfg.text_length)?;
        let len = t.ids.len();
        let ids = Tensor::from_vec(t.ids.clone(), (1, len), &dev)?;
        let padv: Vec<f32> = t.padding.iter().map(|&p| p as f32).collect();
        let pad = Tensor::from_vec(padv, (1, len), &dev)?;
        text = Some((t, ids, pad));
    }
    let (pred, text_out) = match model {
        AnyModel::Mae(m) => (m.forward(&patches, &im)?.image, None),
        AnyModel::M3ae(m) => {
            let (input, tm) = match &text {
                Some((_, ids, pad)) => {
                    let t = ids.dim(1)?;
                    let tn = chosen(&noise.text, t, 2, "text")?;
                    let tm = Masking::new(&tn, 1, cfg.text_keep(t), &dev)?;
                    (
                        ModelInput {
                            image_patches: Some(patches.clone()),
                            text_ids: Some(ids.clone()),
                            text_padding: Some(pad.clone()),
                        },
                        Some(tm),
                    )
                }
                None => (
                    ModelInput {
                        image_patches: Some(patches.clone()),
                        ..Default::default()
                    },
                    None,
                ),
            };
            // without the `T x V` logits: words are predicted at the masked positions only
            let out = m.forward_train(&input, Some(&im), tm.as_ref())?;
            (out.image.clone(), Some((m, out)))
        }
    };
    let pred = pred.ok_or_else(|| unusable("the model returned no image".into()))?;
    // a normalised-pixel model predicts standardised patches: shown with the input's statistics
    let pred = m3ae_model::loss::prediction_pixels(&pred, &patches, cfg.image_target)?;
    let bad = pred
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .filter(|x| !x.is_finite())
        .count();
    if bad > 0 {
        return Err(unusable(format!(
            "{bad} of {} predicted pixel values are not finite (NaN or infinite): the \
             checkpoint's weights are broken",
            pred.elem_count()
        )));
    }
    let mask = im.mask.flatten_all()?.to_vec1::<f32>()?;
    let m3 = im.mask.unsqueeze(2)?; // [1, Li, 1]
    let grey = Tensor::zeros_like(&patches)?; // normalised 0 = the mean colour
    let masked_in = (patches.broadcast_mul(&(1.0 - &m3)?)? + grey.broadcast_mul(&m3)?)?;
    let pasted = (patches.broadcast_mul(&(1.0 - &m3)?)? + pred.broadcast_mul(&m3)?)?;
    let diff = (&pred - &patches)?
        .sqr()?
        .mean(2)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let masked_n = mask.iter().sum::<f32>().max(1.0);
    let masked_mse = diff
        .iter()
        .zip(&mask)
        .map(|(d, m)| (d * m) as f64)
        .sum::<f64>()
        / masked_n as f64;
    let to_img = |p: &Tensor| -> Result<Vec<u8>> {
        let hwc = m3ae_model::unpatchify(p, cfg.patch_size, 3)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(to_pixels(&hwc, norm))
    };
    let panels = [
        to_pixels(&hwc, norm),
        to_img(&masked_in)?,
        to_img(&pred)?,
        to_img(&pasted)?,
    ];
    let mut words = Vec::new();
    let mut predicted_caption = None;
    let mut word_attention = Vec::new();
    let attn_text = text.as_ref().map(|(_, ids, pad)| (ids, pad));
    let attention = model.cls_attention(&patches, attn_text)?;
    let patch_attention = attention[1..1 + li].to_vec();
    if let (Some((t, _, _)), Some((_, tok))) = (&text, caption) {
        for (j, (&id, &p)) in t.ids.iter().zip(&t.padding).enumerate() {
            if p == 0 {
                let w = attention.get(1 + li + j).copied().unwrap_or(0.0);
                word_attention.push((tok.decode(&[id])?, w));
            }
        }
        if let Some((m, out, tm)) = text_out
            .as_ref()
            .and_then(|(m, out)| Some((m, out, out.text_mask.as_ref()?)))
        {
            let tmask = tm.flatten_all()?.to_vec1::<f32>()?;
            let masked = |j: usize, p: u8| p == 0 && tmask[j] > 0.5;
            let positions: Vec<(usize, usize)> = (t.padding.iter().enumerate())
                .filter(|&(j, &p)| masked(j, p))
                .map(|(j, _)| (0, j))
                .collect();
            let top = m.predict_text(out, &positions, 1)?;
            let mut pred_ids = vec![0u32; t.ids.len()];
            for (&(_, j), (ids, logits)) in positions.iter().zip(top.ids.iter().zip(&top.logits)) {
                // as `argmax_rows`: a best score that is not finite is no prediction
                pred_ids[j] = match (ids.first(), logits.first()) {
                    (Some(&id), Some(x)) if x.is_finite() => id,
                    _ => {
                        return Err(unusable(
                            "the predicted word scores are not finite (NaN or infinite): the \
                             checkpoint's weights are broken"
                                .into(),
                        ))
                    }
                };
            }
            let mut filled = Vec::new();
            for (j, (&id, &p)) in t.ids.iter().zip(&t.padding).enumerate() {
                if p != 0 {
                    continue;
                }
                if masked(j, p) {
                    let name = |i: u32| -> Result<String> {
                        let w = tok.decode(&[i])?;
                        Ok(if w.is_empty() { format!("[id {i}]") } else { w })
                    };
                    words.push((j, name(id)?, name(pred_ids[j])?));
                    filled.push(pred_ids[j]);
                } else {
                    filled.push(id);
                }
            }
            predicted_caption = Some(tok.decode(&filled)?);
        }
    }
    Ok(Reconstruction {
        size: s,
        panels,
        image_mask: mask,
        words,
        predicted_caption,
        patch_attention,
        word_attention,
        masked_mse,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use m3ae_model::{M3aeConfig, TraceLayers, Variant};

    #[test]
    fn traced_encoder_matches_the_model_and_attention_sums_to_one() -> anyhow::Result<()> {
        {
            let cfg = M3aeConfig::preset("tiny")?;
            let model = AnyModel::init(Variant::M3ae, &cfg, 5, &Device::Cpu)?;
            let cfg = model.config().clone();
            let patches = m3ae_kernels::testing::tensor(
                &[2, cfg.num_patches(), cfg.patch_dim()],
                15,
                1.0,
                &Device::Cpu,
            )?;
            let input = ModelInput {
                image_patches: Some(patches.clone()),
                ..Default::default()
            };
            let trace = model.forward_representation_traced(&input, &TraceLayers::All)?;
            assert_eq!(trace.attention.len(), cfg.depth);
            let want = model.as_represent().represent(&patches)?;
            let err = (trace.representation - want)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(err < 1e-4, "{err}");
        }
        // the attention comes from a traced pass of the model's own blocks
        let cfg = M3aeConfig::preset("tiny")?;
        let model = AnyModel::init(Variant::M3ae, &cfg, 3, &Device::Cpu)?;
        let cfg = model.config().clone();
        let dev = Device::Cpu;
        let patches =
            m3ae_kernels::testing::tensor(&[1, cfg.num_patches(), cfg.patch_dim()], 16, 1.0, &dev)?;
        let a = model.cls_attention(&patches, None)?;
        assert_eq!(a.len(), 1 + cfg.num_patches());
        assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        let t = 5;
        let ids = Tensor::new(&[[3u32, 7, 9, 0, 0]], &dev)?;
        let pad = Tensor::new(&[[0f32, 0., 0., 1., 1.]], &dev)?;
        let a = model.cls_attention(&patches, Some((&ids, &pad)))?;
        assert_eq!(a.len(), 1 + cfg.num_patches() + t);
        assert!(a[a.len() - 1] < 1e-6 && a[a.len() - 2] < 1e-6);
        assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        Ok(())
    }
}
