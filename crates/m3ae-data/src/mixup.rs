//! Mixup and CutMix of a training batch as the official fine-tuning code does
//! (`mixup_cutmix` in `jax_utils.py`), with label smoothing applied inside the mixing.
//!
//! The batch is paired with its reverse (sample `i` with sample `B - 1 - i`). One choice per
//! batch ([`MixChoice`]): with both alphas positive, CutMix with probability `switch_prob`,
//! else Mixup; with one alpha 0 only the other is used; with both 0 nothing is mixed. Then,
//! with `s` the smoothed one-hot labels (`onehot (1 - smoothing) + smoothing / classes`) and
//! `r` the reversed batch:
//!
//! * Mixup: `w = lambda ~ Beta(mixup_alpha, mixup_alpha)`, images `w x + (1 - w) r`;
//! * CutMix: `lambda ~ Beta(cutmix_alpha, cutmix_alpha)`, a box centre `(cy, cx)` uniform over
//!   the pixels, cut size `int(H sqrt(1 - lambda))` x `int(W sqrt(1 - lambda))`, box rows
//!   `[cy - cut_h / 2, cy + cut_h / 2)` and columns likewise (integer halves, clipped to the
//!   image: an odd cut loses a pixel), pixels inside the box taken from `r`;
//!   `w = 1 - box area / (H W)` (the kept area, not `lambda`);
//! * mixed labels `w s + (1 - w) s_r`.
//!
//! The random draws come from the crate's seeded streams ([`crate::seed`]; beta from two gamma
//! draws), so a batch's mixing depends only on (seed, step); numpy's / jax's numbers are not
//! reproduced. [`mix_with`] applies an explicit choice (lambda, box centre), which is what the
//! random [`mixup_cutmix`] does after drawing it.
//!
//! ```
//! use m3ae_data::mixup::{mixup_cutmix, MixChoice, MixupConfig};
//! use candle_core::{Device, Tensor};
//! let images = Tensor::arange(0f32, 768.0, &Device::Cpu)?.reshape((4, 8, 8, 3))?;
//! let mixed = mixup_cutmix(&images, &[0, 3, 1, 4], 5, &MixupConfig::default(), 7, 0)?;
//! assert_eq!(mixed.images.dims(), &[4, 8, 8, 3]);
//! for row in mixed.labels.to_vec2::<f32>()? {
//!     assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
//! }
//! assert!(matches!(mixed.choice, MixChoice::Mixup { .. } | MixChoice::Cutmix { .. }));
//! # Ok::<(), m3ae_data::Error>(())
//! ```

use crate::seed::{self, purpose};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use rand::Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

/// Mixup / CutMix settings (official fine-tuning defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MixupConfig {
    /// Beta parameter of Mixup (0: no Mixup).
    pub mixup_alpha: f64,
    /// Beta parameter of CutMix (0: no CutMix).
    pub cutmix_alpha: f64,
    /// Probability of CutMix when both alphas are positive.
    pub switch_prob: f64,
    /// Label smoothing applied to the one-hot labels before mixing.
    pub label_smoothing: f64,
}

impl Default for MixupConfig {
    fn default() -> Self {
        Self {
            mixup_alpha: 0.8,
            cutmix_alpha: 1.0,
            switch_prob: 0.5,
            label_smoothing: 0.1,
        }
    }
}

impl MixupConfig {
    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, msg: String| Err(Error::Config { field, msg });
        for (field, v) in [
            ("mixup_alpha", self.mixup_alpha),
            ("cutmix_alpha", self.cutmix_alpha),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, format!("{v} must be a finite number >= 0"));
            }
        }
        for (field, v) in [
            ("switch_prob", self.switch_prob),
            ("label_smoothing", self.label_smoothing),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(field, format!("{v} is outside [0, 1]"));
            }
        }
        Ok(())
    }

    /// Whether any mixing happens (an alpha is positive).
    pub fn is_active(&self) -> bool {
        self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0
    }

    /// Whether a batch uses CutMix, given its uniform switch draw `u` in `[0, 1)` (only read
    /// when both alphas are positive: CutMix iff `u < switch_prob`).
    ///
    /// ```
    /// use m3ae_data::mixup::MixupConfig;
    /// let cfg = MixupConfig::default();
    /// assert!(!cfg.use_cutmix(0.5488)); // the official default-flags draw: Mixup
    /// assert!(cfg.use_cutmix(0.3));
    /// assert!(MixupConfig { mixup_alpha: 0.0, ..cfg }.use_cutmix(0.9));
    /// ```
    pub fn use_cutmix(&self, u: f64) -> bool {
        match (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0) {
            (true, true) => u < self.switch_prob,
            (false, true) => true,
            _ => false,
        }
    }
}

/// The mixing of one batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MixChoice {
    /// No mixing (only label smoothing).
    None,
    /// Mixup with weight `lambda` on the batch itself.
    Mixup {
        /// Weight of the batch (the reversed batch gets `1 - lambda`).
        lambda: f64,
    },
    /// CutMix of a box centred at pixel `(cy, cx)` whose size follows from `lambda`.
    Cutmix {
        /// The drawn Beta value that sets the cut size.
        lambda: f64,
        /// Row of the box centre.
        cy: usize,
        /// Column of the box centre.
        cx: usize,
    },
}

/// A CutMix box, half-open rows `[y0, y1)` and columns `[x0, x1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutBox {
    /// First row.
    pub y0: usize,
    /// One past the last row.
    pub y1: usize,
    /// First column.
    pub x0: usize,
    /// One past the last column.
    pub x1: usize,
}

impl CutBox {
    /// Pixels in the box.
    pub fn area(&self) -> usize {
        (self.y1 - self.y0) * (self.x1 - self.x0)
    }
}

/// The CutMix box of an `height x width` image for `lambda` and centre `(cy, cx)`: cut size
/// `int(height sqrt(1 - lambda))` x `int(width sqrt(1 - lambda))`, box
/// `[c - cut / 2, c + cut / 2)` per axis, clipped to the image.
///
/// ```
/// use m3ae_data::mixup::{cutmix_box, CutBox};
/// // the official fixture's draw: lambda 0.449125, centre (3, 0) on 8 x 8 -> cut 5
/// let b = cutmix_box(8, 8, 0.449125, 3, 0);
/// assert_eq!(b, CutBox { y0: 1, y1: 5, x0: 0, x1: 2 });
/// assert_eq!(1.0 - b.area() as f64 / 64.0, 0.875);
/// ```
pub fn cutmix_box(height: usize, width: usize, lambda: f64, cy: usize, cx: usize) -> CutBox {
    let ratio = (1.0 - lambda.clamp(0.0, 1.0)).sqrt();
    let span = |size: usize, c: usize| {
        let cut = (size as f64 * ratio) as usize;
        let lo = c.saturating_sub(cut / 2).min(size);
        let hi = (c + cut / 2).min(size);
        (lo, hi)
    };
    let (y0, y1) = span(height, cy);
    let (x0, x1) = span(width, cx);
    CutBox { y0, y1, x0, x1 }
}

/// A mixed batch.
#[derive(Debug, Clone)]
pub struct Mixed {
    /// Mixed images, same shape and layout as the input (`[B, H, W, C]`).
    pub images: Tensor,
    /// Mixed smoothed labels `[B, classes]` (f32, rows sum to 1).
    pub labels: Tensor,
    /// What was done.
    pub choice: MixChoice,
    /// Weight of each sample's own labels (`lambda` for Mixup, the kept area for CutMix, 1
    /// without mixing).
    pub weight: f64,
    /// The CutMix box, for CutMix.
    pub cut: Option<CutBox>,
}

/// A `Beta(a, b)` draw from two gamma draws, `X / (X + Y)` with `X ~ Gamma(a)`,
/// `Y ~ Gamma(b)`. `a` and `b` must be positive.
pub fn sample_beta(a: f64, b: f64, rng: &mut impl Rng) -> Result<f64> {
    let gamma = |shape: f64| {
        Gamma::new(shape, 1.0).map_err(|e| Error::Config {
            field: "mixup_alpha",
            msg: format!("beta parameter {shape}: {e}"),
        })
    };
    let x = gamma(a)?.sample(rng);
    let y = gamma(b)?.sample(rng);
    Ok(if x + y > 0.0 { x / (x + y) } else { 0.5 })
}

/// Draws the mixing of one batch of `height x width` images: the switch (when both alphas
/// are positive), then lambda, then (CutMix) the box centre row and column.
pub fn draw_mix(
    cfg: &MixupConfig,
    height: usize,
    width: usize,
    rng: &mut impl Rng,
) -> Result<MixChoice> {
    cfg.validate()?;
    if !cfg.is_active() {
        return Ok(MixChoice::None);
    }
    let u: f64 = if cfg.mixup_alpha > 0.0 && cfg.cutmix_alpha > 0.0 {
        rng.random()
    } else {
        0.0
    };
    Ok(if cfg.use_cutmix(u) {
        let lambda = sample_beta(cfg.cutmix_alpha, cfg.cutmix_alpha, rng)?;
        let cy = rng.random_range(0..height.max(1));
        let cx = rng.random_range(0..width.max(1));
        MixChoice::Cutmix { lambda, cy, cx }
    } else {
        MixChoice::Mixup {
            lambda: sample_beta(cfg.mixup_alpha, cfg.mixup_alpha, rng)?,
        }
    })
}

/// Mixes `images` (`[B, H, W, C]`, NHWC as the loader's images) and integer `labels` with an
/// explicit `choice`, smoothing the labels by `smoothing` first (see the module docs).
pub fn mix_with(
    images: &Tensor,
    labels: &[u32],
    num_classes: usize,
    smoothing: f64,
    choice: MixChoice,
) -> Result<Mixed> {
    let (b, h, w, _) = images.dims4()?;
    if labels.len() != b {
        return Err(Error::Config {
            field: "labels",
            msg: format!("{} labels for a batch of {b} images", labels.len()),
        });
    }
    let dev = images.device();
    let s = m3ae_model::smooth_labels(labels, num_classes, smoothing, dev)?;
    let reverse = |t: &Tensor| -> Result<Tensor> {
        let idx: Vec<u32> = (0..b as u32).rev().collect();
        Ok(t.index_select(&Tensor::from_vec(idx, b, dev)?, 0)?)
    };
    let (mixed_images, weight, cut) = match choice {
        MixChoice::None => (images.clone(), 1.0, None),
        MixChoice::Mixup { lambda } => {
            let l = lambda as f32;
            let r = reverse(images)?;
            let x = ((images * l as f64)? + (r * (1.0f32 - l) as f64)?)?;
            (x, lambda, None)
        }
        MixChoice::Cutmix { lambda, cy, cx } => {
            if cy >= h || cx >= w {
                return Err(Error::Config {
                    field: "cutmix",
                    msg: format!("box centre ({cy}, {cx}) is outside the {h} x {w} image"),
                });
            }
            let bx = cutmix_box(h, w, lambda, cy, cx);
            let mut mask = vec![0u8; h * w];
            for y in bx.y0..bx.y1 {
                for x in bx.x0..bx.x1 {
                    mask[y * w + x] = 1;
                }
            }
            let mask = Tensor::from_vec(mask, (1, h, w, 1), dev)?.broadcast_as(images.shape())?;
            let x = mask.where_cond(&reverse(images)?, images)?;
            let weight = 1.0 - bx.area() as f64 / (h * w) as f64;
            (x, weight, Some(bx))
        }
    };
    let labels = if weight == 1.0 {
        s
    } else {
        let wf = weight as f32;
        ((&s * wf as f64)? + (reverse(&s)? * (1.0f32 - wf) as f64)?)?
    };
    Ok(Mixed {
        images: mixed_images,
        labels: labels.to_dtype(DType::F32)?,
        choice,
        weight,
        cut,
    })
}

/// Mixup / CutMix of a batch (`[B, H, W, C]` images, integer labels) with the draws of
/// `(seed, step)` ([`draw_mix`] on the stream `seed::rng(seed, MIXUP, step, 0)`), then
/// [`mix_with`]. Deterministic: the same arguments give the same batch.
pub fn mixup_cutmix(
    images: &Tensor,
    labels: &[u32],
    num_classes: usize,
    cfg: &MixupConfig,
    seed: u64,
    step: u64,
) -> Result<Mixed> {
    let (_, h, w, _) = images.dims4()?;
    let mut rng = seed::rng(seed, purpose::MIXUP, step, 0);
    let choice = draw_mix(cfg, h, w, &mut rng)?;
    mix_with(images, labels, num_classes, cfg.label_smoothing, choice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn batch() -> (Tensor, Vec<u32>) {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, (4 * 8 * 8 * 3) as f32, &dev)
            .unwrap()
            .reshape((4, 8, 8, 3))
            .unwrap();
        (x, vec![0, 3, 1, 4])
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().unwrap()
    }

    #[test]
    fn cutmix_arithmetic_of_the_official_draw() -> Result<()> {
        let (x, labels) = batch();
        let choice = MixChoice::Cutmix {
            lambda: 0.449_125_264_478_309_64,
            cy: 3,
            cx: 0,
        };
        let m = mix_with(&x, &labels, 5, 0.1, choice)?;
        assert_eq!(
            m.cut,
            Some(CutBox {
                y0: 1,
                y1: 5,
                x0: 0,
                x1: 2
            })
        );
        assert_eq!(m.weight, 0.875);
        // labels: 0.875 s + 0.125 s_reversed, s = onehot 0.9 + 0.02
        let l = rows(&m.labels);
        let want0 = [0.8075f32, 0.02, 0.02, 0.02, 0.1325];
        for (a, b) in l[0].iter().zip(want0) {
            assert!((a - b).abs() < 1e-6, "{:?}", l[0]);
        }
        for row in &l {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        // pixels: the box from the reversed batch, the rest untouched
        let xi = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mi = m.images.flatten_all()?.to_vec1::<f32>()?;
        let at = |b: usize, y: usize, xx: usize, c: usize| ((b * 8 + y) * 8 + xx) * 3 + c;
        let mut pasted = 0;
        for b in 0..4 {
            for y in 0..8 {
                for xx in 0..8 {
                    let inside = (1..5).contains(&y) && xx < 2;
                    for c in 0..3 {
                        let src = if inside { 3 - b } else { b };
                        assert_eq!(mi[at(b, y, xx, c)], xi[at(src, y, xx, c)]);
                    }
                    pasted += usize::from(inside && b == 0);
                }
            }
        }
        // the kept area is the label weight
        assert_eq!(1.0 - pasted as f64 / 64.0, m.weight);
        Ok(())
    }

    #[test]
    fn mixup_arithmetic_and_no_mixing() -> Result<()> {
        let (x, labels) = batch();
        let lambda = 0.615_605_831_146_240_2;
        let m = mix_with(&x, &labels, 5, 0.1, MixChoice::Mixup { lambda })?;
        assert_eq!(m.weight, lambda);
        let l = rows(&m.labels);
        assert!((l[0][0] - 0.574_045_2).abs() < 1e-6, "{:?}", l[0]);
        assert!((l[0][4] - 0.365_954_7).abs() < 1e-6, "{:?}", l[0]);
        for row in &l {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        let want = ((&x * lambda)?
            + (x.index_select(&Tensor::new(&[3u32, 2, 1, 0], &Device::Cpu)?, 0)?
                * (1.0 - lambda))?)?;
        let d = (m.images - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-3, "{d}"); // values up to 768
        let none = mix_with(&x, &labels, 5, 0.1, MixChoice::None)?;
        assert_eq!(none.weight, 1.0);
        // f32 arithmetic as the official code: 0.9 + 0.02 = 0.91999996
        assert_eq!(
            rows(&none.labels)[1],
            vec![0.02, 0.02, 0.02, 0.9f32 + 0.02, 0.02]
        );
        assert_eq!(
            (none.images - &x)?.abs()?.max_all()?.to_scalar::<f32>()?,
            0.0
        );
        // smoothing 0: plain one-hot mixing
        let hard = mix_with(&x, &labels, 5, 0.0, MixChoice::Mixup { lambda: 0.25 })?;
        assert_eq!(rows(&hard.labels)[0], vec![0.25, 0.0, 0.0, 0.0, 0.75]);
        assert!(mix_with(&x, &labels[..3], 5, 0.1, MixChoice::None).is_err());
        assert!(mix_with(&x, &[0, 3, 1, 5], 5, 0.1, MixChoice::None).is_err());
        Ok(())
    }

    #[test]
    fn alphas_pick_the_branch_and_draws_are_seeded() -> Result<()> {
        let (x, labels) = batch();
        let both = MixupConfig::default();
        let mixup_only = MixupConfig {
            cutmix_alpha: 0.0,
            ..both
        };
        let cutmix_only = MixupConfig {
            mixup_alpha: 0.0,
            ..both
        };
        let off = MixupConfig {
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            ..both
        };
        let (mut n_mix, mut n_cut) = (0, 0);
        for step in 0..200 {
            let m = mixup_cutmix(&x, &labels, 5, &both, 3, step)?;
            let again = mixup_cutmix(&x, &labels, 5, &both, 3, step)?;
            assert_eq!(m.choice, again.choice);
            for row in rows(&m.labels) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
            match m.choice {
                MixChoice::Mixup { lambda } => {
                    n_mix += 1;
                    assert!((0.0..=1.0).contains(&lambda));
                }
                MixChoice::Cutmix { lambda, cy, cx } => {
                    n_cut += 1;
                    let b = cutmix_box(8, 8, lambda, cy, cx);
                    assert_eq!(m.weight, 1.0 - b.area() as f64 / 64.0);
                }
                MixChoice::None => panic!("both alphas are positive"),
            }
            assert!(matches!(
                mixup_cutmix(&x, &labels, 5, &mixup_only, 3, step)?.choice,
                MixChoice::Mixup { .. }
            ));
            assert!(matches!(
                mixup_cutmix(&x, &labels, 5, &cutmix_only, 3, step)?.choice,
                MixChoice::Cutmix { .. }
            ));
            assert_eq!(
                mixup_cutmix(&x, &labels, 5, &off, 3, step)?.choice,
                MixChoice::None
            );
        }
        assert!(n_mix > 70 && n_cut > 70, "{n_mix} mixup, {n_cut} cutmix");
        let a = mixup_cutmix(&x, &labels, 5, &both, 3, 0)?.choice;
        let b = mixup_cutmix(&x, &labels, 5, &both, 4, 0)?.choice;
        assert_ne!(a, b);
        Ok(())
    }

    #[test]
    fn beta_draws_have_the_beta_mean_and_bad_configs_are_named() -> Result<()> {
        let mut rng = seed::rng(1, purpose::MIXUP, 0, 0);
        let n = 20_000;
        let mean = (0..n)
            .map(|_| sample_beta(0.8, 0.8, &mut rng))
            .sum::<Result<f64>>()?
            / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let mean = (0..n)
            .map(|_| sample_beta(2.0, 6.0, &mut rng))
            .sum::<Result<f64>>()?
            / n as f64;
        assert!((mean - 0.25).abs() < 0.01, "{mean}");
        let e = MixupConfig {
            switch_prob: 1.5,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("switch_prob"), "{e}");
        let e = MixupConfig {
            mixup_alpha: -1.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("mixup_alpha"), "{e}");
        let cfg: MixupConfig = serde_json::from_str(r#"{"cutmix_alpha": 0}"#).unwrap();
        assert_eq!(cfg.mixup_alpha, 0.8);
        assert_eq!(cfg.cutmix_alpha, 0.0);
        Ok(())
    }

    #[test]
    fn boxes_clip_at_the_borders() {
        assert_eq!(
            cutmix_box(8, 8, 0.0, 7, 7),
            CutBox {
                y0: 3,
                y1: 8,
                x0: 3,
                x1: 8
            }
        );
        assert_eq!(cutmix_box(8, 8, 1.0, 4, 4).area(), 0);
        // non-square: the cut follows each side
        assert_eq!(
            cutmix_box(4, 16, 0.75, 2, 8),
            CutBox {
                y0: 1,
                y1: 3,
                x0: 4,
                x1: 12
            }
        );
    }
}
