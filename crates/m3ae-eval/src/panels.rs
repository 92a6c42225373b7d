//! The one PNG panel writer of the project: reconstructions as rows of four panels (original |
//! masked input | prediction | prediction with the visible patches pasted back) and the
//! cls-attention overlay. `m3ae reconstruct` writes one image's panels
//! ([`write_reconstruction_png`], [`write_attention_png`]); a pre-training run writes a held-out
//! batch's periodically ([`write_batch_reconstruction`], with a `.txt` of the captions and the
//! masked and predicted words). Panels are magnified by whole pixels so small models stay
//! legible, and every file is written atomically.
//!
//! ```
//! use m3ae_data::RgbImage;
//! use m3ae_eval::panels::{panel_scale, write_reconstruction_png};
//! use m3ae_model::{AnyModel, M3aeConfig, Variant};
//! let cfg = M3aeConfig::preset("tiny")?;
//! let model = AnyModel::init(Variant::Mae, &cfg, 0, &candle_core::Device::Cpu)?;
//! let image = RgbImage { width: 32, height: 32, data: vec![200; 32 * 32 * 3] };
//! let r = m3ae_eval::reconstruct(&model, &image, None, 0, Default::default())?;
//! let dir = std::env::temp_dir().join(format!("m3ae-panels-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! // 32 px panels are magnified 4x: four 128 px panels with 4 px gaps
//! assert_eq!(panel_scale(32), 4);
//! let (w, h) = write_reconstruction_png(&r, &dir.join("r.png"))?;
//! assert_eq!((w, h), (4 * 128 + 3 * 4, 128));
//! std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), m3ae_eval::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::reconstruct::Reconstruction;
use candle_core::DType;
use m3ae_data::{Batch, Normalization, Tokenizer};
use m3ae_model::{M3ae, M3aeConfig, Output};
use std::path::Path;

/// Normalised HWC values back to RGB bytes (the inverse of `normalization`, rounded and
/// clamped).
pub fn to_pixels(hwc: &[f32], normalization: Normalization) -> Vec<u8> {
    let (mean, std) = normalization.mean_std();
    hwc.chunks_exact(3)
        .flat_map(|px| {
            (0..3).map(move |c| {
                ((px[c] * std[c] + mean[c]) * 255.0)
                    .round()
                    .clamp(0.0, 255.0) as u8
            })
        })
        .collect()
}

/// A `size` x `size` RGB image magnified `scale` times (each pixel becomes a square).
pub fn upscale(src: &[u8], size: usize, scale: usize) -> Vec<u8> {
    let out = size * scale;
    let mut v = Vec::with_capacity(out * out * 3);
    for y in 0..out {
        for x in 0..out {
            let i = ((y / scale) * size + x / scale) * 3;
            v.extend_from_slice(&src[i..i + 3]);
        }
    }
    v
}

/// Copies the `size` x `size` RGB image `src`, magnified `scale` times, into the RGB canvas
/// `dst` (`dst_w` pixels wide) with its top-left corner at (`x0`, `y0`).
fn blit(dst: &mut [u8], dst_w: usize, src: &[u8], size: usize, scale: usize, x0: usize, y0: usize) {
    let side = size * scale;
    for y in 0..side {
        for x in 0..side {
            let s = ((y / scale) * size + x / scale) * 3;
            let d = ((y0 + y) * dst_w + x0 + x) * 3;
            dst[d..d + 3].copy_from_slice(&src[s..s + 3]);
        }
    }
}

/// Panel magnification so that a panel is at least 128 pixels wide.
pub fn panel_scale(size: usize) -> usize {
    (128 / size.max(1)).max(1)
}

/// Writes `width` x `height` RGB bytes as a PNG, atomically; the folder must exist.
pub fn write_png(path: &Path, width: usize, height: usize, data: Vec<u8>) -> Result<()> {
    let img = image::RgbImage::from_raw(width as u32, height as u32, data)
        .ok_or_else(|| Error::path(path, "image buffer has the wrong size"))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(Error::path(dir, "output directory does not exist"));
    }
    m3ae_model::fsio::atomic_write_with(path, |w| {
        img.write_to(w, image::ImageFormat::Png)
            .map_err(std::io::Error::other)
    })
    .map_err(|e| Error::path(path, e.to_string()))
}

/// Writes the four panels side by side (4 px white gaps), magnified by [`panel_scale`];
/// returns the PNG's width and height.
pub fn write_reconstruction_png(r: &Reconstruction, path: &Path) -> Result<(usize, usize)> {
    let scale = panel_scale(r.size);
    let side = r.size * scale;
    let gap = 4;
    let w = 4 * side + 3 * gap;
    let mut data = vec![255u8; w * side * 3];
    for (k, panel) in r.panels.iter().enumerate() {
        blit(&mut data, w, panel, r.size, scale, k * (side + gap), 0);
    }
    write_png(path, w, side, data)?;
    Ok((w, side))
}

/// Writes the cls attention over patches as a red overlay on the original image and, below it,
/// a strip with one cell per caption token (brighter = more attention); returns the PNG's width
/// and height.
pub fn write_attention_png(r: &Reconstruction, path: &Path) -> Result<(usize, usize)> {
    let scale = panel_scale(r.size);
    let side = r.size * scale;
    let g = (r.patch_attention.len() as f64).sqrt().round() as usize;
    let patch_px = r.size / g.max(1);
    let all_max = r
        .patch_attention
        .iter()
        .chain(r.word_attention.iter().map(|(_, w)| w))
        .fold(0f32, |a, &b| a.max(b))
        .max(1e-12);
    let base = upscale(&r.panels[0], r.size, scale);
    let strip = if r.word_attention.is_empty() { 0 } else { 16 };
    let mut data = vec![255u8; side * (side + strip) * 3];
    for y in 0..side {
        for x in 0..side {
            let (py, px) = (y / scale / patch_px.max(1), x / scale / patch_px.max(1));
            let a = r
                .patch_attention
                .get(py.min(g - 1) * g + px.min(g - 1))
                .copied()
                .unwrap_or(0.0)
                / all_max;
            let i = (y * side + x) * 3;
            let grey = (base[i] as f32 + base[i + 1] as f32 + base[i + 2] as f32) / 3.0 * 0.5;
            data[i] = ((grey * (1.0 - a)) + 255.0 * a).min(255.0) as u8;
            data[i + 1] = (grey * (1.0 - a)) as u8;
            data[i + 2] = (grey * (1.0 - a)) as u8;
        }
    }
    if strip > 0 {
        let n = r.word_attention.len();
        for x in 0..side {
            let j = (x * n / side).min(n - 1);
            let v = (r.word_attention[j].1 / all_max * 255.0).clamp(0.0, 255.0) as u8;
            let border = n > 1 && (x * n) % side < n;
            for y in side + 2..side + strip {
                let i = (y * side + x) * 3;
                let c = if border { 255 } else { v };
                data[i] = c;
                data[i + 1] = if border { 255 } else { 0 };
                data[i + 2] = if border { 255 } else { 0 };
            }
        }
    }
    write_png(path, side, side + strip, data)?;
    Ok((side, side + strip))
}

/// Writes the reconstruction panels of a masked batch and the model's output on it: per sample
/// a row of original | masked input | prediction | prediction with the visible patches pasted
/// back (magnified to at least 192 px, 4 px white borders). With `text` (the M3AE model that
/// produced `out`, from [`M3ae::forward_train`] or [`M3ae::forward`], and a tokenizer) and text
/// outputs, `png` with the extension `.txt` receives each sample's caption with its masked and
/// predicted words; the words are predicted at the masked positions only
/// ([`M3ae::predict_text`]), without the `B x T x V` logits. The folder of `png` is created.
pub fn write_batch_reconstruction(
    cfg: &M3aeConfig,
    out: &Output,
    batch: &Batch,
    text: Option<(&M3ae, &Tokenizer)>,
    normalization: Normalization,
    png: &Path,
) -> Result<()> {
    let missing = |what: &str| Error::Shape(what.into());
    // the image is drawn from host copies, wherever the model ran
    let host = m3ae_model::device::to_host;
    let patches = &host(
        batch
            .input
            .image_patches
            .as_ref()
            .ok_or_else(|| missing("no image"))?,
    )?;
    let pred = host(
        out.image
            .as_ref()
            .ok_or_else(|| missing("no image output"))?,
    )?;
    // a normalised-pixel model predicts standardised patches: shown with the input's statistics
    let pred = m3ae_model::loss::prediction_pixels(&pred, patches, cfg.image_target)?;
    let mask = host(
        out.image_mask
            .as_ref()
            .ok_or_else(|| missing("no image mask"))?,
    )?;
    let m3 = mask.unsqueeze(2)?.broadcast_as(pred.shape())?;
    let grey = patches.zeros_like()?;
    let masked_in = ((patches * (1.0 - &m3)?)? + (&grey * &m3)?)?;
    let pasted = ((&pred * &m3)? + (patches * (1.0 - &m3)?)?)?;
    let panels = [patches.clone(), masked_in, pred, pasted];
    let (b, s) = (patches.dim(0)?, cfg.image_size);
    let scale = (192 / s).max(1);
    let gap = 4;
    let (w, h) = (4 * s * scale + 5 * gap, b * s * scale + (b + 1) * gap);
    let mut data = vec![255u8; w * h * 3];
    for (col, p) in panels.iter().enumerate() {
        let pix = m3ae_model::unpatchify(p, cfg.patch_size, 3)?.to_dtype(DType::F32)?;
        let rgb = to_pixels(&pix.flatten_all()?.to_vec1::<f32>()?, normalization);
        for (i, sample) in rgb.chunks_exact(s * s * 3).enumerate() {
            let x0 = gap + col * (s * scale + gap);
            let y0 = gap + i * (s * scale + gap);
            blit(&mut data, w, sample, s, scale, x0, y0);
        }
    }
    if let Some(parent) = png.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::path(parent, e.to_string()))?;
    }
    write_png(png, w, h, data)?;
    // Captions, masked words and predicted words.
    if let (Some((model, tok)), Some(tmask), Some(ids)) =
        (text, out.text_mask.as_ref(), batch.input.text_ids.as_ref())
    {
        let ids = ids.to_vec2::<u32>()?;
        let pad = batch
            .input
            .text_padding
            .as_ref()
            .ok_or_else(|| missing("no padding"))?
            .to_vec2::<f32>()?;
        let tmask = tmask.to_vec2::<f32>()?;
        let mut positions = Vec::new();
        for i in 0..ids.len() {
            for t in 0..ids[i].len() {
                if tmask[i][t] > 0.0 && pad[i][t] == 0.0 {
                    positions.push((i, t));
                }
            }
        }
        let top = model.predict_text(out, &positions, 1)?;
        let mut predicted: Vec<Vec<String>> = vec![Vec::new(); ids.len()];
        let mut masked: Vec<Vec<String>> = vec![Vec::new(); ids.len()];
        for (&(i, t), p) in positions.iter().zip(&top.ids) {
            masked[i].push(tok.decode(&[ids[i][t]])?);
            predicted[i].push(tok.decode(&p[..1])?);
        }
        let mut text = String::new();
        for i in 0..ids.len() {
            let valid: Vec<u32> = ids[i]
                .iter()
                .zip(&pad[i])
                .filter(|(_, &p)| p == 0.0)
                .map(|(&t, _)| t)
                .collect();
            text.push_str(&format!("sample {i}: {}\n", tok.decode(&valid)?));
            text.push_str(&format!("  masked words:    {}\n", masked[i].join(" ")));
            text.push_str(&format!("  predicted words: {}\n", predicted[i].join(" ")));
        }
        let txt = png.with_extension("txt");
        m3ae_model::fsio::atomic_write(&txt, text.as_bytes())
            .map_err(|e| Error::path(&txt, e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blit_matches_upscale_and_pixels_invert_the_normalisation() {
        let src: Vec<u8> = (0..2 * 2 * 3).map(|i| i as u8 * 10).collect();
        let big = upscale(&src, 2, 3);
        let mut canvas = vec![0u8; 6 * 6 * 3];
        blit(&mut canvas, 6, &src, 2, 3, 0, 0);
        assert_eq!(canvas, big);
        // an offset copy leaves the rest of the canvas alone
        let mut canvas = vec![7u8; 8 * 7 * 3];
        blit(&mut canvas, 8, &src, 2, 3, 2, 1);
        assert_eq!(&canvas[..3], &[7, 7, 7]);
        assert_eq!(&canvas[(8 + 2) * 3..(8 + 2) * 3 + 3], &big[..3]);
        let (mean, std) = Normalization::Imagenet.mean_std();
        let hwc: Vec<f32> = (0..3).map(|c| (0.5 - mean[c]) / std[c]).collect();
        assert_eq!(
            to_pixels(&hwc, Normalization::Imagenet),
            vec![128, 128, 128]
        );
        assert_eq!(
            to_pixels(&[9.0, -9.0, 0.0], Normalization::None),
            vec![255, 0, 0]
        );
    }
}
