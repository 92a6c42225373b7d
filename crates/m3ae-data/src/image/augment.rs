//! RandAugment as timm applies it (`auto_augment = "rand-m9-mstd0.5-inc1"`, the official
//! fine-tuning transform): after the crop and flip, `n` operations drawn with replacement from
//! fifteen, each applied with probability `p` at a magnitude drawn around `m`.
//!
//! The policy string follows timm's grammar: `rand` then dash-separated settings, `m<float>`
//! magnitude (0-10), `n<int>` operations per image (default 2), `mstd<float>` standard deviation
//! of the magnitude (default 0; `inf` draws it uniformly from [0, m]), `mmax<float>` its upper
//! bound (default 10), `p<float>` probability of each operation (default 0.5), `inc<0|1>` the
//! "increasing" operation set whose strength grows with the magnitude (default 0). `none` turns
//! augmentation off.
//!
//! The operations reproduce Pillow's on 8-bit RGB (what timm calls): the look-up-table
//! operations exactly, the blends (`Color`, `Contrast`, `Brightness`, `Sharpness`) with Pillow's
//! single-precision arithmetic and truncation, and the affine ones (`Rotate`, `ShearX/Y`,
//! `TranslateX/YRel`) with Pillow's bicubic filter (a = -1, edges clamped) and the fill colour
//! outside the source. `tests/randaugment.rs` checks every operation against Pillow's output.
//! The random draws are this crate's (seeded), not Python's: the same seed gives the same
//! augmentation, with the distribution timm's gives.

use super::RgbImage;
use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One augmentation operation with its argument (what timm's level functions produce).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AugmentOp {
    /// Stretch each channel to the full range (`ImageOps.autocontrast`).
    AutoContrast,
    /// Equalise each channel's histogram (`ImageOps.equalize`).
    Equalize,
    /// `255 - v`.
    Invert,
    /// Rotate by this many degrees counter-clockwise about the centre (bicubic, filled).
    Rotate(f64),
    /// Keep this many high bits of each value (8 or more: unchanged).
    Posterize(u32),
    /// Invert the values at or above this threshold.
    Solarize(u32),
    /// Add this to the values below 128 (saturating).
    SolarizeAdd(u32),
    /// Blend with the grey image by this factor (1: unchanged).
    Color(f64),
    /// Blend with the mean grey level by this factor.
    Contrast(f64),
    /// Blend with black by this factor.
    Brightness(f64),
    /// Blend with the smoothed image by this factor.
    Sharpness(f64),
    /// Affine shear `x' = x + f y` (bicubic, filled).
    ShearX(f64),
    /// Affine shear `y' = y + f x`.
    ShearY(f64),
    /// Shift by this fraction of the width (positive: content moves left).
    TranslateX(f64),
    /// Shift by this fraction of the height (positive: content moves up).
    TranslateY(f64),
}

/// The operation set of `inc0` policies (timm's `_RAND_TRANSFORMS`) and, with the level
/// functions of the increasing variants, of `inc1` (`_RAND_INCREASING_TRANSFORMS`): both list
/// the same fifteen kinds in the same order.
const KINDS: usize = 15;

/// A RandAugment policy.
///
/// ```
/// use m3ae_data::image::RandAugment;
/// let ra: RandAugment = "rand-m9-mstd0.5-inc1".parse().unwrap();
/// assert_eq!((ra.ops, ra.magnitude, ra.magnitude_std, ra.increasing), (2, 9.0, 0.5, true));
/// assert_eq!(ra.to_string(), "rand-m9-n2-mstd0.5-mmax10-p0.5-inc1");
/// assert!("rand-m9-x3".parse::<RandAugment>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandAugment {
    /// Operations per image (drawn with replacement).
    pub ops: usize,
    /// Magnitude, 0-10.
    pub magnitude: f64,
    /// Standard deviation of the per-operation magnitude (0: fixed; infinite: uniform in
    /// `[0, magnitude]`).
    pub magnitude_std: f64,
    /// Upper bound of the drawn magnitude.
    pub magnitude_max: f64,
    /// Probability of applying each drawn operation.
    pub prob: f64,
    /// The increasing operation set (`inc1`).
    pub increasing: bool,
}

impl Default for RandAugment {
    /// timm's defaults for a bare `rand-m<M>`: 2 operations, fixed magnitude 10's bound, p 0.5.
    fn default() -> Self {
        Self {
            ops: 2,
            magnitude: 10.0,
            magnitude_std: 0.0,
            magnitude_max: 10.0,
            prob: 0.5,
            increasing: false,
        }
    }
}

impl FromStr for RandAugment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split('-');
        if parts.next() != Some("rand") {
            return Err(format!(
                "auto-augment policy {s:?}: expected \"rand-...\" (e.g. \"rand-m9-mstd0.5-inc1\") or \"none\""
            ));
        }
        let mut ra = RandAugment::default();
        let num = |key: &str, v: &str| -> Result<f64, String> {
            let x: f64 = v
                .parse()
                .map_err(|_| format!("auto-augment policy {s:?}: {key}{v:?} is not a number"))?;
            if x.is_nan() || x < 0.0 {
                return Err(format!(
                    "auto-augment policy {s:?}: {key} must be >= 0, got {v}"
                ));
            }
            Ok(x)
        };
        for part in parts {
            // longest keys first: "mstd" and "mmax" also start with "m"
            if let Some(v) = part.strip_prefix("mstd") {
                ra.magnitude_std = num("mstd", v)?;
            } else if let Some(v) = part.strip_prefix("mmax") {
                ra.magnitude_max = num("mmax", v)?;
            } else if let Some(v) = part.strip_prefix("inc") {
                ra.increasing = match v {
                    "0" => false,
                    "1" => true,
                    _ => return Err(format!("auto-augment policy {s:?}: inc must be 0 or 1")),
                };
            } else if let Some(v) = part.strip_prefix('m') {
                ra.magnitude = num("m", v)?;
            } else if let Some(v) = part.strip_prefix('n') {
                ra.ops = v
                    .parse()
                    .map_err(|_| format!("auto-augment policy {s:?}: n{v:?} is not a count"))?;
            } else if let Some(v) = part.strip_prefix('p') {
                ra.prob = num("p", v)?;
                if ra.prob > 1.0 {
                    return Err(format!("auto-augment policy {s:?}: p must be <= 1"));
                }
            } else {
                return Err(format!(
                    "auto-augment policy {s:?}: unknown setting {part:?} (m, n, mstd, mmax, p, inc)"
                ));
            }
        }
        if !ra.magnitude.is_finite() || !ra.magnitude_max.is_finite() {
            return Err(format!(
                "auto-augment policy {s:?}: m and mmax must be finite"
            ));
        }
        Ok(ra)
    }
}

impl fmt::Display for RandAugment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rand-m{}-n{}-mstd{}-mmax{}-p{}-inc{}",
            self.magnitude,
            self.ops,
            self.magnitude_std,
            self.magnitude_max,
            self.prob,
            u8::from(self.increasing)
        )
    }
}

/// Whether and how training images are augmented after the crop: `"none"` or a RandAugment
/// policy string (serialised as that string).
///
/// ```
/// use m3ae_data::image::AutoAugment;
/// let a: AutoAugment = "none".parse().unwrap();
/// assert_eq!(a, AutoAugment::None);
/// let b: AutoAugment = "rand-m9-mstd0.5-inc1".parse().unwrap();
/// assert_eq!(b.to_string().parse::<AutoAugment>().unwrap(), b);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum AutoAugment {
    /// No augmentation.
    #[default]
    None,
    /// RandAugment with this policy.
    Rand(RandAugment),
}

impl AutoAugment {
    /// timm's `rand-m9-mstd0.5-inc1`, the official fine-tuning policy.
    pub fn official_finetune() -> Self {
        AutoAugment::Rand(RandAugment {
            magnitude: 9.0,
            magnitude_std: 0.5,
            increasing: true,
            ..RandAugment::default()
        })
    }
}

impl FromStr for AutoAugment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "none" {
            Ok(AutoAugment::None)
        } else {
            s.parse().map(AutoAugment::Rand)
        }
    }
}

impl fmt::Display for AutoAugment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AutoAugment::None => f.write_str("none"),
            AutoAugment::Rand(ra) => ra.fmt(f),
        }
    }
}

impl TryFrom<String> for AutoAugment {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<AutoAugment> for String {
    fn from(a: AutoAugment) -> String {
        a.to_string()
    }
}

/// `v` or `-v` with probability 1/2 each (timm's `_randomly_negate`).
fn negate<R: Rng>(v: f64, rng: &mut R) -> f64 {
    if rng.random::<f64>() > 0.5 {
        -v
    } else {
        v
    }
}

impl RandAugment {
    /// The operation of kind `kind` (0-14) at `magnitude`: timm's level functions.
    fn op<R: Rng>(&self, kind: usize, magnitude: f64, rng: &mut R) -> AugmentOp {
        let level = magnitude / 10.0;
        let enhance = |rng: &mut R| {
            if self.increasing {
                (1.0 + negate(level * 0.9, rng)).max(0.1)
            } else {
                level * 1.8 + 0.1
            }
        };
        match kind {
            0 => AugmentOp::AutoContrast,
            1 => AugmentOp::Equalize,
            2 => AugmentOp::Invert,
            3 => AugmentOp::Rotate(negate(level * 30.0, rng)),
            4 => {
                let bits = (level * 4.0) as u32;
                AugmentOp::Posterize(if self.increasing {
                    4 - bits.min(4)
                } else {
                    bits
                })
            }
            5 => {
                let t = (level * 256.0) as u32;
                AugmentOp::Solarize(if self.increasing { 256 - t.min(256) } else { t })
            }
            6 => AugmentOp::SolarizeAdd((level * 110.0) as u32),
            7 => AugmentOp::Color(enhance(rng)),
            8 => AugmentOp::Contrast(enhance(rng)),
            9 => AugmentOp::Brightness(enhance(rng)),
            10 => AugmentOp::Sharpness(enhance(rng)),
            11 => AugmentOp::ShearX(negate(level * 0.3, rng)),
            12 => AugmentOp::ShearY(negate(level * 0.3, rng)),
            13 => AugmentOp::TranslateX(negate(level * 0.45, rng)),
            _ => AugmentOp::TranslateY(negate(level * 0.45, rng)),
        }
    }

    /// The operations drawn for one image, in order (those skipped by `prob` left out).
    pub fn draw<R: Rng>(&self, rng: &mut R) -> Vec<AugmentOp> {
        let mut ops = Vec::with_capacity(self.ops);
        for _ in 0..self.ops {
            let kind = rng.random_range(0..KINDS);
            if self.prob < 1.0 && rng.random::<f64>() > self.prob {
                continue;
            }
            let mut m = self.magnitude;
            if self.magnitude_std == f64::INFINITY {
                m *= rng.random::<f64>();
            } else if self.magnitude_std > 0.0 {
                m += self.magnitude_std * rng.sample::<f64, _>(StandardNormal);
            }
            let m = m.min(self.magnitude_max).max(0.0);
            ops.push(self.op(kind, m, rng));
        }
        ops
    }

    /// Augments `img` in place; `fill` is the colour of pixels that the geometric operations
    /// bring in from outside the image (timm: the normalisation mean, in 0-255).
    pub fn apply<R: Rng>(&self, img: &mut RgbImage, fill: [u8; 3], rng: &mut R) {
        for op in self.draw(rng) {
            *img = op.apply(img, fill);
        }
    }
}

impl AugmentOp {
    /// This operation applied to `img`, as Pillow computes it.
    ///
    /// ```
    /// use m3ae_data::{image::AugmentOp, RgbImage};
    /// let img = RgbImage { width: 2, height: 1, data: vec![0, 100, 200, 50, 150, 250] };
    /// assert_eq!(AugmentOp::Invert.apply(&img, [0; 3]).data, vec![255, 155, 55, 205, 105, 5]);
    /// assert_eq!(AugmentOp::Solarize(128).apply(&img, [0; 3]).data, vec![0, 100, 55, 50, 105, 5]);
    /// ```
    pub fn apply(&self, img: &RgbImage, fill: [u8; 3]) -> RgbImage {
        let (w, h) = (img.width as f64, img.height as f64);
        match *self {
            AugmentOp::AutoContrast => lut_per_channel(img, auto_contrast_lut),
            AugmentOp::Equalize => lut_per_channel(img, equalize_lut),
            AugmentOp::Invert => lut(img, |v| 255 - v),
            AugmentOp::Posterize(bits) if bits >= 8 => img.clone(),
            AugmentOp::Posterize(bits) => {
                let mask = !((1u32 << (8 - bits)) - 1) as u8;
                lut(img, |v| v & mask)
            }
            AugmentOp::Solarize(t) => lut(img, |v| if (v as u32) < t { v } else { 255 - v }),
            AugmentOp::SolarizeAdd(add) => lut(img, |v| {
                if v < 128 {
                    (v as u32 + add).min(255) as u8
                } else {
                    v
                }
            }),
            AugmentOp::Color(f) => {
                let grey: Vec<u8> = img
                    .data
                    .chunks_exact(3)
                    .flat_map(|p| [luma(p); 3])
                    .collect();
                blend(&grey, img, f)
            }
            AugmentOp::Contrast(f) => {
                let n = img.data.len() / 3;
                let sum: u64 = img.data.chunks_exact(3).map(|p| luma(p) as u64).sum();
                let mean = (sum as f64 / n.max(1) as f64 + 0.5) as u8;
                blend(&vec![mean; img.data.len()], img, f)
            }
            AugmentOp::Brightness(f) => blend(&vec![0; img.data.len()], img, f),
            AugmentOp::Sharpness(f) => blend(&smooth(img), img, f),
            AugmentOp::Rotate(deg) => {
                if deg % 360.0 == 0.0 {
                    return img.clone();
                }
                // Pillow's `rotate`: the inverse map about the centre, with the matrix entries
                // rounded to 15 decimals
                let a = -deg.rem_euclid(360.0).to_radians();
                let r15 = |v: f64| (v * 1e15).round() / 1e15;
                let (c, s) = (r15(a.cos()), r15(a.sin()));
                let (cx, cy) = (w / 2.0, h / 2.0);
                let m = [c, s, c * -cx + s * -cy + cx, -s, c, -s * -cx + c * -cy + cy];
                affine(img, m, fill)
            }
            AugmentOp::ShearX(f) => affine(img, [1.0, f, 0.0, 0.0, 1.0, 0.0], fill),
            AugmentOp::ShearY(f) => affine(img, [1.0, 0.0, 0.0, f, 1.0, 0.0], fill),
            AugmentOp::TranslateX(p) => affine(img, [1.0, 0.0, p * w, 0.0, 1.0, 0.0], fill),
            AugmentOp::TranslateY(p) => affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, p * h], fill),
        }
    }
}

/// `img` with the same table applied to every value.
fn lut(img: &RgbImage, f: impl Fn(u8) -> u8) -> RgbImage {
    let table: Vec<u8> = (0..=255u8).map(f).collect();
    RgbImage {
        width: img.width,
        height: img.height,
        data: img.data.iter().map(|&v| table[v as usize]).collect(),
    }
}

/// `img` with a table per channel, each built from that channel's histogram.
fn lut_per_channel(img: &RgbImage, build: fn(&[u64; 256]) -> [u8; 256]) -> RgbImage {
    let mut tables = [[0u8; 256]; 3];
    for (c, table) in tables.iter_mut().enumerate() {
        let mut hist = [0u64; 256];
        for p in img.data.chunks_exact(3) {
            hist[p[c] as usize] += 1;
        }
        *table = build(&hist);
    }
    let data = img
        .data
        .chunks_exact(3)
        .flat_map(|p| {
            [
                tables[0][p[0] as usize],
                tables[1][p[1] as usize],
                tables[2][p[2] as usize],
            ]
        })
        .collect();
    RgbImage {
        width: img.width,
        height: img.height,
        data,
    }
}

fn identity() -> [u8; 256] {
    std::array::from_fn(|i| i as u8)
}

/// `ImageOps.autocontrast` without cutoff: the lowest and highest occupied values go to 0 and
/// 255 (truncated).
fn auto_contrast_lut(h: &[u64; 256]) -> [u8; 256] {
    let lo = h.iter().position(|&n| n > 0);
    let hi = h.iter().rposition(|&n| n > 0);
    match (lo, hi) {
        (Some(lo), Some(hi)) if hi > lo => {
            let scale = 255.0 / (hi - lo) as f64;
            let offset = -(lo as f64) * scale;
            std::array::from_fn(|i| (i as f64 * scale + offset).clamp(0.0, 255.0) as i64 as u8)
        }
        _ => identity(),
    }
}

/// `ImageOps.equalize`: cumulative histogram in steps of (pixels - last occupied bin) / 255.
fn equalize_lut(h: &[u64; 256]) -> [u8; 256] {
    let occupied: Vec<u64> = h.iter().copied().filter(|&n| n > 0).collect();
    if occupied.len() <= 1 {
        return identity();
    }
    let step = (occupied.iter().sum::<u64>() - occupied[occupied.len() - 1]) / 255;
    if step == 0 {
        return identity();
    }
    let mut n = step / 2;
    std::array::from_fn(|i| {
        let v = (n / step).min(255) as u8;
        n += h[i];
        v
    })
}

/// Pillow's RGB -> L conversion (ITU-R 601-2 luma in 16-bit fixed point, rounded).
fn luma(p: &[u8]) -> u8 {
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// `Image.blend(degenerate, img, f)`: `d + f (v - d)` in single precision, truncated to 0-255.
fn blend(degenerate: &[u8], img: &RgbImage, f: f64) -> RgbImage {
    let alpha = f as f32;
    let data = degenerate
        .iter()
        .zip(&img.data)
        .map(|(&d, &v)| {
            let t = d as f32 + alpha * (v as i32 - d as i32) as f32;
            t.clamp(0.0, 255.0) as u8
        })
        .collect();
    RgbImage {
        width: img.width,
        height: img.height,
        data,
    }
}

/// `ImageFilter.SMOOTH` (3 x 3 kernel 1 1 1 / 1 5 1 / 1 1 1, divided by 13): single-precision
/// sums plus 0.5, truncated; the border pixels are copied.
fn smooth(img: &RgbImage) -> Vec<u8> {
    let (w, h) = (img.width, img.height);
    let mut out = img.data.clone();
    if w < 3 || h < 3 {
        return out;
    }
    let k = [1.0f32 / 13.0, 5.0f32 / 13.0];
    let at = |x: usize, y: usize, c: usize| img.data[(y * w + x) * 3 + c] as f32;
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for c in 0..3 {
                // Pillow's order: the row below, the row itself, the row above; left to right
                let row = |yy: usize, centre: f32| {
                    at(x - 1, yy, c) * k[0] + at(x, yy, c) * centre + at(x + 1, yy, c) * k[0]
                };
                let mut ss = 0.5f32;
                ss += row(y + 1, k[0]);
                ss += row(y, k[1]);
                ss += row(y - 1, k[0]);
                out[(y * w + x) * 3 + c] = ss.clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// Pillow's affine transform with the bicubic filter: output pixel `(x, y)` samples the source
/// at `(m0 (x + .5) + m1 (y + .5) + m2, m3 (x + .5) + m4 (y + .5) + m5)`; points outside the
/// source keep `fill`.
fn affine(img: &RgbImage, m: [f64; 6], fill: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let mut data = Vec::with_capacity(w * h * 3);
    let clampx = |x: i64| x.clamp(0, w as i64 - 1) as usize;
    let clampy = |y: i64| y.clamp(0, h as i64 - 1) as usize;
    for y in 0..h {
        for x in 0..w {
            let (xo, yo) = (x as f64 + 0.5, y as f64 + 0.5);
            let xin = m[0] * xo + m[1] * yo + m[2];
            let yin = m[3] * xo + m[4] * yo + m[5];
            if !(0.0..w as f64).contains(&xin) || !(0.0..h as f64).contains(&yin) {
                data.extend_from_slice(&fill);
                continue;
            }
            let (xs, ys) = (xin - 0.5, yin - 0.5);
            let (x0, y0) = (xs.floor(), ys.floor());
            let (dx, dy) = (xs - x0, ys - y0);
            let (x0, y0) = (x0 as i64 - 1, y0 as i64 - 1);
            let cols = [clampx(x0), clampx(x0 + 1), clampx(x0 + 2), clampx(x0 + 3)];
            for c in 0..3 {
                let mut rows = [0f64; 4];
                for (j, r) in rows.iter_mut().enumerate() {
                    let base = clampy(y0 + j as i64) * w;
                    let v = |i: usize| img.data[(base + cols[i]) * 3 + c] as f64;
                    *r = cubic(v(0), v(1), v(2), v(3), dx);
                }
                let v = cubic(rows[0], rows[1], rows[2], rows[3], dy);
                data.push(if v <= 0.0 {
                    0
                } else if v >= 255.0 {
                    255
                } else {
                    v as u8
                });
            }
        }
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

/// Pillow's cubic interpolation between `v2` and `v3` at `d` in [0, 1) (a = -1).
fn cubic(v1: f64, v2: f64, v3: f64, v4: f64, d: f64) -> f64 {
    let p1 = v2;
    let p2 = -v1 + v3;
    let p3 = 2.0 * (v1 - v2) + v3 - v4;
    let p4 = -v1 + v2 - v3 + v4;
    p1 + d * (p2 + d * (p3 + d * p4))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> RgbImage {
        RgbImage {
            width: 16,
            height: 12,
            data: (0..16 * 12 * 3).map(|i| (i * 37 % 251) as u8).collect(),
        }
    }

    #[test]
    fn policies_parse_print_and_reject() {
        let ra: RandAugment = "rand-m7-n3-mstd0.5-mmax9-p0.8-inc0".parse().unwrap();
        assert_eq!(
            (
                ra.ops,
                ra.magnitude,
                ra.magnitude_std,
                ra.magnitude_max,
                ra.prob,
                ra.increasing
            ),
            (3, 7.0, 0.5, 9.0, 0.8, false)
        );
        assert_eq!(ra.to_string().parse::<RandAugment>().unwrap(), ra);
        let inf: RandAugment = "rand-m9-mstdinf".parse().unwrap();
        assert_eq!(inf.magnitude_std, f64::INFINITY);
        for bad in [
            "",
            "rnd-m9",
            "rand-m",
            "rand-mx",
            "rand-m-1",
            "rand-p2",
            "rand-inc2",
            "rand-q1",
        ] {
            let e = bad.parse::<RandAugment>().unwrap_err();
            assert!(e.contains("auto-augment policy"), "{bad}: {e}");
        }
        assert_eq!(
            AutoAugment::official_finetune(),
            "rand-m9-mstd0.5-inc1".parse().unwrap()
        );
        // serde: the policy string, and an error that names it
        let json = serde_json::to_string(&AutoAugment::official_finetune()).unwrap();
        assert_eq!(json, "\"rand-m9-n2-mstd0.5-mmax10-p0.5-inc1\"");
        assert!(serde_json::from_str::<AutoAugment>("\"rand-z\"")
            .unwrap_err()
            .to_string()
            .contains("rand-z"));
    }

    #[test]
    fn draws_are_seeded_and_follow_the_policy() {
        let ra: RandAugment = "rand-m9-mstd0.5-inc1".parse().unwrap();
        let draw = |seed| ra.draw(&mut crate::seed::rng(seed, 0, 0, 0));
        assert_eq!(draw(3), draw(3));
        let mut applied = 0;
        for seed in 0..2000 {
            let ops = draw(seed);
            assert!(ops.len() <= 2);
            applied += ops.len();
            for op in ops {
                match op {
                    AugmentOp::Rotate(d) => assert!(d.abs() <= 30.0),
                    AugmentOp::Posterize(b) => assert!(b <= 4),
                    AugmentOp::Color(f) | AugmentOp::Sharpness(f) => {
                        assert!((0.1..=1.9).contains(&f))
                    }
                    AugmentOp::ShearX(f) => assert!(f.abs() <= 0.3),
                    AugmentOp::TranslateY(p) => assert!(p.abs() <= 0.45),
                    _ => {}
                }
            }
        }
        // p = 0.5 of 2 operations: about one per image
        assert!((1800..2200).contains(&applied), "{applied}");
        // magnitude 0 and p 1: every operation is the identity or a fixed one
        let zero: RandAugment = "rand-m0-p1-n4".parse().unwrap();
        let img = image();
        for seed in 0..50 {
            for op in zero.draw(&mut crate::seed::rng(seed, 1, 0, 0)) {
                let geometric = matches!(
                    op,
                    AugmentOp::Rotate(_)
                        | AugmentOp::ShearX(_)
                        | AugmentOp::ShearY(_)
                        | AugmentOp::TranslateX(_)
                        | AugmentOp::TranslateY(_)
                );
                if geometric {
                    assert_eq!(op.apply(&img, [0; 3]), img, "{op:?}");
                }
            }
        }
    }

    #[test]
    fn blends_at_factor_one_and_identity_affine_change_nothing() {
        let img = image();
        for op in [
            AugmentOp::Color(1.0),
            AugmentOp::Contrast(1.0),
            AugmentOp::Brightness(1.0),
            AugmentOp::Sharpness(1.0),
            AugmentOp::Posterize(8),
            AugmentOp::Solarize(256),
            AugmentOp::SolarizeAdd(0),
            AugmentOp::Rotate(0.0),
            AugmentOp::TranslateX(0.0),
        ] {
            assert_eq!(op.apply(&img, [1, 2, 3]), img, "{op:?}");
        }
        // a whole-width shift leaves only the fill colour
        let out = AugmentOp::TranslateX(1.0).apply(&img, [1, 2, 3]);
        assert!(out.data.chunks_exact(3).all(|p| p == [1, 2, 3]));
        assert_eq!(
            AugmentOp::Brightness(0.0).apply(&img, [0; 3]).data,
            vec![0; img.data.len()]
        );
    }
}
