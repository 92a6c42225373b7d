//! The transform configuration: [`Normalization`], [`Transform`] and [`ImageConfig`], and the
//! crop box each transform picks ([`random_resized_crop`] is torchvision's); [`ImageConfig::apply`]
//! and [`ImageConfig::apply_into`] hand the box to the resampler.

use super::resample::resample_normalized;
use super::{AutoAugment, RgbImage};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Per-channel mean and standard deviation applied after scaling pixels to [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// CC12M statistics (the default for image-text data).
    #[default]
    Cc12m,
    /// ImageNet statistics.
    Imagenet,
    /// Pixels in [0, 1].
    None,
    /// Explicit mean and std.
    Custom {
        /// Mean per channel.
        mean: [f32; 3],
        /// Standard deviation per channel.
        std: [f32; 3],
    },
}

impl Normalization {
    /// (mean, std) per channel.
    ///
    /// ```
    /// let (m, s) = m3ae_data::Normalization::Cc12m.mean_std();
    /// assert_eq!((m[0], s[2]), (0.5762, 0.3307));
    /// ```
    pub fn mean_std(&self) -> ([f32; 3], [f32; 3]) {
        match self {
            Normalization::Cc12m => ([0.5762, 0.5503, 0.5213], [0.3207, 0.3169, 0.3307]),
            Normalization::Imagenet => ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            Normalization::None => ([0.0; 3], [1.0; 3]),
            Normalization::Custom { mean, std } => (*mean, *std),
        }
    }
}

/// Geometric transform of an image to a `size x size` square.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// torchvision RandomResizedCrop (bicubic), then an optional horizontal flip with p = 0.5.
    RandomResizedCrop {
        /// Area fraction range.
        scale: (f64, f64),
        /// Aspect ratio (w/h) range.
        ratio: (f64, f64),
        /// Random horizontal flip.
        flip: bool,
    },
    /// Resize the shorter side to `size` (bicubic), then crop the centre.
    ResizeCenterCrop,
    /// Resize to `size x size`, ignoring the aspect ratio.
    Resize,
}

impl Transform {
    /// The official pretraining transform: RRC scale (0.2, 1), ratio (3/4, 4/3), flip.
    pub fn pretrain() -> Self {
        Transform::RandomResizedCrop {
            scale: (0.2, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip: true,
        }
    }
    /// The official linear-probe training transform: RRC scale (0.08, 1), flip.
    pub fn linear_probe() -> Self {
        Transform::RandomResizedCrop {
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip: true,
        }
    }
    /// The official evaluation transform: resize + centre crop.
    pub fn test() -> Self {
        Transform::ResizeCenterCrop
    }
}

/// Size, transform and normalisation of images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Output side in pixels.
    pub size: usize,
    /// The geometric transform.
    pub transform: Transform,
    /// The normalisation.
    pub normalization: Normalization,
    /// Augmentation after the crop (none by default; the official fine-tuning transform uses
    /// RandAugment `rand-m9-mstd0.5-inc1`).
    #[serde(default)]
    pub augment: AutoAugment,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            size: 256,
            transform: Transform::pretrain(),
            normalization: Normalization::Cc12m,
            augment: AutoAugment::None,
        }
    }
}

/// A crop box in source pixels (left, top, width, height), and whether to flip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropBox {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
    /// Mirror horizontally.
    pub flip: bool,
    /// Resample only from inside the box (crop, then resize) instead of the whole image.
    pub clamp_to_box: bool,
}

/// torchvision `RandomResizedCrop.get_params` on a `width x height` image.
pub fn random_resized_crop<R: Rng>(
    width: usize,
    height: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut R,
) -> (usize, usize, usize, usize) {
    let (wf, hf) = (width as f64, height as f64);
    let area = wf * hf;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * (scale.0 + (scale.1 - scale.0) * rng.random::<f64>());
        let aspect = (lr0 + (lr1 - lr0) * rng.random::<f64>()).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (left, top, w, h);
        }
    }
    let in_ratio = wf / hf;
    let (w, h) = if in_ratio < ratio.0.min(ratio.1) {
        (width, ((wf / ratio.0.min(ratio.1)).round() as usize).max(1))
    } else if in_ratio > ratio.0.max(ratio.1) {
        (
            ((hf * ratio.0.max(ratio.1)).round() as usize).max(1),
            height,
        )
    } else {
        (width, height)
    };
    let (w, h) = (w.min(width), h.min(height));
    ((width - w) / 2, (height - h) / 2, w, h)
}

impl ImageConfig {
    /// The crop box of `img` for this config, drawing from `rng` for random transforms.
    pub fn crop_box<R: Rng>(&self, width: usize, height: usize, rng: &mut R) -> CropBox {
        let s = self.size as f64;
        match self.transform {
            Transform::RandomResizedCrop { scale, ratio, flip } => {
                let (x, y, w, h) = random_resized_crop(width, height, scale, ratio, rng);
                let flip = flip && rng.random::<f64>() < 0.5;
                CropBox {
                    x: x as f64,
                    y: y as f64,
                    w: w as f64,
                    h: h as f64,
                    flip,
                    clamp_to_box: true,
                }
            }
            Transform::ResizeCenterCrop => {
                // torchvision Resize(int): shorter side to size, longer side truncated.
                let (rw, rh) = if width <= height {
                    (s, (s * height as f64 / width as f64).floor())
                } else {
                    ((s * width as f64 / height as f64).floor(), s)
                };
                let left = ((rw - s) / 2.0).round();
                let top = ((rh - s) / 2.0).round();
                let (sx, sy) = (width as f64 / rw, height as f64 / rh);
                CropBox {
                    x: left * sx,
                    y: top * sy,
                    w: s * sx,
                    h: s * sy,
                    flip: false,
                    clamp_to_box: false,
                }
            }
            Transform::Resize => CropBox {
                x: 0.0,
                y: 0.0,
                w: width as f64,
                h: height as f64,
                flip: false,
                clamp_to_box: false,
            },
        }
    }

    /// Transforms and normalises `img` to `[size, size, 3]` HWC f32.
    ///
    /// ```
    /// use m3ae_data::{ImageConfig, Normalization, RgbImage, Transform};
    /// let img = RgbImage { width: 8, height: 4, data: vec![255; 8 * 4 * 3] };
    /// let cfg = ImageConfig { size: 4, transform: Transform::test(), normalization: Normalization::None, augment: Default::default() };
    /// let out = cfg.apply(&img, &mut m3ae_data::seed::rng(0, 0, 0, 0));
    /// assert_eq!(out.len(), 4 * 4 * 3);
    /// assert!(out.iter().all(|v| (v - 1.0).abs() < 1e-5));
    /// ```
    pub fn apply<R: Rng>(&self, img: &RgbImage, rng: &mut R) -> Vec<f32> {
        let mut out = vec![0f32; self.size * self.size * 3];
        self.apply_into(img, rng, Layout::Hwc, &mut out);
        out
    }

    /// Transforms and normalises `img` straight into `out` (`size * size * 3` values) in the
    /// given layout: the fast path of the loader, which writes each sample's patches into the
    /// batch once. Numerically it matches the reference ([`resample`] then normalisation) to
    /// within float rounding (the tests bound the difference by 1e-4 after normalisation).
    ///
    /// # Panics
    /// When `out` does not hold `size * size * 3` values or a patch layout's patch size does
    /// not divide `size`.
    ///
    /// ```
    /// use m3ae_data::{image::Layout, ImageConfig, Normalization, RgbImage, Transform};
    /// let img = RgbImage { width: 8, height: 8, data: vec![255; 8 * 8 * 3] };
    /// let cfg = ImageConfig { size: 4, transform: Transform::test(), normalization: Normalization::None, augment: Default::default() };
    /// let mut out = vec![0.0; 4 * 4 * 3];
    /// cfg.apply_into(&img, &mut m3ae_data::seed::rng(0, 0, 0, 0), Layout::Patches(2), &mut out);
    /// assert!(out.iter().all(|v| (v - 1.0).abs() < 1e-5));
    /// ```
    ///
    /// [`resample`]: fn@super::resample
    pub fn apply_into<R: Rng>(&self, img: &RgbImage, rng: &mut R, layout: Layout, out: &mut [f32]) {
        let b = self.crop_box(img.width, img.height, rng);
        let (mean, std) = self.normalization.mean_std();
        let AutoAugment::Rand(ra) = self.augment else {
            resample_normalized(img, &b, self.size, mean, std, layout, out);
            return;
        };
        // RandAugment works on 8-bit images, as after torchvision's / PIL's resize: resample to
        // [0, 1], round to bytes, augment, then normalise into the layout
        let n = self.size;
        resample_normalized(img, &b, n, [0.0; 3], [1.0; 3], Layout::Hwc, out);
        let mut small = RgbImage {
            width: n,
            height: n,
            data: out
                .iter()
                .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect(),
        };
        let fill = mean.map(|m| (m * 255.0).round().clamp(0.0, 255.0) as u8);
        ra.apply(&mut small, fill, rng);
        let mut row = vec![0f32; n * 3];
        for (j, bytes) in small.data.chunks_exact(n * 3).enumerate() {
            for (k, (r, &v)) in row.iter_mut().zip(bytes).enumerate() {
                *r = (v as f32 / 255.0 - mean[k % 3]) / std[k % 3];
            }
            layout.write_row(n, j, &row, out);
        }
    }
}

/// Memory layout of a transformed `size x size` image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[size, size, 3]`, row-major.
    Hwc,
    /// `[(size / P)^2, P * P * 3]`: the layout of [`m3ae_model::patchify`] with patch size `P`.
    Patches(usize),
}

impl Layout {
    /// Writes row `j` of a `size x size` image (`size * 3` values, HWC order) to its places in
    /// `out`, an image in this layout.
    #[inline(always)]
    pub(crate) fn write_row(self, size: usize, j: usize, row: &[f32], out: &mut [f32]) {
        match self {
            Layout::Hwc => out[j * row.len()..(j + 1) * row.len()].copy_from_slice(row),
            Layout::Patches(p) => {
                let g = size / p;
                let (gy, py) = (j / p, j % p);
                for (gx, chunk) in row.chunks_exact(p * 3).enumerate() {
                    let o = ((gy * g + gx) * p * p + py * p) * 3;
                    out[o..o + p * 3].copy_from_slice(chunk);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn augmented_images_are_seeded_and_laid_out_like_the_plain_path() {
        let img = RgbImage {
            width: 40,
            height: 30,
            data: (0..40 * 30 * 3).map(|i| (i * 7 % 256) as u8).collect(),
        };
        let plain = ImageConfig {
            size: 16,
            transform: Transform::linear_probe(),
            normalization: Normalization::Imagenet,
            augment: AutoAugment::None,
        };
        let aug = ImageConfig {
            augment: "rand-m9-mstd0.5-inc1-p1".parse().unwrap(),
            ..plain
        };
        let run = |cfg: &ImageConfig, seed, layout| {
            let mut out = vec![0f32; 16 * 16 * 3];
            cfg.apply_into(&img, &mut crate::seed::rng(seed, 0, 0, 0), layout, &mut out);
            out
        };
        assert_eq!(run(&aug, 5, Layout::Hwc), run(&aug, 5, Layout::Hwc));
        assert_ne!(run(&aug, 5, Layout::Hwc), run(&plain, 5, Layout::Hwc));
        // the patch layout holds the same values as the HWC one, patch by patch
        let (hwc, patches) = (run(&aug, 6, Layout::Hwc), run(&aug, 6, Layout::Patches(4)));
        for y in 0..16 {
            for x in 0..16 {
                for c in 0..3 {
                    let p = (y / 4) * 4 + x / 4;
                    let at = p * 48 + ((y % 4) * 4 + x % 4) * 3 + c;
                    assert_eq!(hwc[(y * 16 + x) * 3 + c], patches[at]);
                }
            }
        }
        // an old configuration without the field reads as no augmentation
        let json = r#"{"size":8,"transform":"resize","normalization":"none"}"#;
        let cfg: ImageConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.augment, AutoAugment::None);
    }

    #[test]
    fn rrc_boxes_respect_scale_and_ratio() {
        let mut rng = crate::seed::rng(1, 2, 3, 4);
        for _ in 0..200 {
            let (x, y, w, h) =
                random_resized_crop(256, 200, (0.2, 1.0), (0.75, 4.0 / 3.0), &mut rng);
            assert!(x + w <= 256 && y + h <= 200 && w > 0 && h > 0);
            let a = (w * h) as f64 / (256.0 * 200.0);
            assert!(a <= 1.0);
        }
        // impossible ratio falls back to a centre crop
        let (x, y, w, h) = random_resized_crop(100, 10, (0.9, 1.0), (0.1, 0.2), &mut rng);
        assert_eq!((w, h), (2, 10));
        assert_eq!((x, y), (49, 0));
    }
}
