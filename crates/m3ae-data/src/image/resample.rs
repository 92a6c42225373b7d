//! Separable bicubic resampling (a = -0.5, support widened when downscaling, as PIL's `resize`):
//! the simple reference [`resample`], and the fast path the transforms use, with flat fixed-width
//! taps, the flip folded into them, and normalisation and the output layout fused into the
//! vertical pass (compiled for AVX2 too where the CPU has it).

use super::{CropBox, Layout, RgbImage};

/// Filter taps of one axis with a fixed number `k` of taps per output: output `i` reads
/// source indices `start[i]..start[i] + k` with weights `w[i * k..(i + 1) * k]`. Windows near
/// an edge are shifted inwards and padded with zero weights, so the sums are the reference's.
struct FlatTaps {
    k: usize,
    start: Vec<usize>,
    w: Vec<f32>,
}

impl FlatTaps {
    fn new(taps: &[(usize, Vec<f32>)], lo: usize, hi: usize, reverse: bool) -> Self {
        let k = taps.iter().map(|t| t.1.len()).max().unwrap_or(1).max(1);
        let mut start = Vec::with_capacity(taps.len());
        let mut w = vec![0f32; taps.len() * k];
        let order: Box<dyn Iterator<Item = &(usize, Vec<f32>)>> = if reverse {
            Box::new(taps.iter().rev())
        } else {
            Box::new(taps.iter())
        };
        for (i, (a, tw)) in order.enumerate() {
            // the window [a, a + len) lies in [lo, hi) and hi - lo >= k (see `taps`)
            let s = (*a).min(hi.saturating_sub(k)).max(lo.min(*a));
            let off = a - s;
            w[i * k + off..i * k + off + tw.len()].copy_from_slice(tw);
            start.push(s);
        }
        Self { k, start, w }
    }
}

/// Horizontal pass of one row of f32 pixels (`row[3 * x + c]`, one padding value at the end):
/// `dst[i] = sum_k w[i, k] * row[start[i] - x0 + k]` per channel. The three channels of a tap
/// are one 4-lane multiply-add (the fourth lane is ignored), which vectorises on every x86-64.
#[inline(always)]
fn hpass_k<const K: usize>(row: &[f32], x0: usize, t: &FlatTaps, dst: &mut [f32]) {
    for ((&s, w), d) in t
        .start
        .iter()
        .zip(t.w.chunks_exact(K))
        .zip(dst.chunks_exact_mut(3))
    {
        let win = &row[(s - x0) * 3..(s - x0) * 3 + K * 3 + 1];
        let mut acc = [0f32; 4];
        for k in 0..K {
            let wk = w[k];
            let p = &win[3 * k..3 * k + 4];
            for l in 0..4 {
                acc[l] += wk * p[l];
            }
        }
        d.copy_from_slice(&acc[..3]);
    }
}

#[inline(always)]
fn hpass_dyn(row: &[f32], x0: usize, t: &FlatTaps, dst: &mut [f32]) {
    let k = t.k;
    for ((&s, w), d) in t
        .start
        .iter()
        .zip(t.w.chunks_exact(k))
        .zip(dst.chunks_exact_mut(3))
    {
        let win = &row[(s - x0) * 3..(s - x0) * 3 + k * 3];
        let (mut a0, mut a1, mut a2) = (0f32, 0f32, 0f32);
        for (wk, p) in w.iter().zip(win.chunks_exact(3)) {
            a0 += wk * p[0];
            a1 += wk * p[1];
            a2 += wk * p[2];
        }
        d[0] = a0;
        d[1] = a1;
        d[2] = a2;
    }
}

#[inline(always)]
fn hpass(row: &[f32], x0: usize, t: &FlatTaps, dst: &mut [f32]) {
    match t.k {
        4 => hpass_k::<4>(row, x0, t, dst),
        5 => hpass_k::<5>(row, x0, t, dst),
        6 => hpass_k::<6>(row, x0, t, dst),
        7 => hpass_k::<7>(row, x0, t, dst),
        8 => hpass_k::<8>(row, x0, t, dst),
        _ => hpass_dyn(row, x0, t, dst),
    }
}

thread_local! {
    /// Per-thread scratch of the fast resampler (horizontal pass rows, one accumulator row,
    /// the tiled normalisation constants), reused across samples.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The fast path: separable bicubic with flat fixed-width taps, flip folded into the taps,
/// normalisation and the output layout fused into the vertical pass.
pub(super) fn resample_normalized(
    img: &RgbImage,
    b: &CropBox,
    size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    layout: Layout,
    out: &mut [f32],
) {
    assert_eq!(out.len(), size * size * 3, "output buffer size");
    if let Layout::Patches(p) = layout {
        assert!(
            p > 0 && size.is_multiple_of(p),
            "patch size {p} does not divide {size}"
        );
    }
    // the scratch is taken out of the thread-local so that no closure (which would not inherit
    // the target features) wraps the kernel
    let mut scratch = SCRATCH.with(|c| c.take());
    #[cfg(target_arch = "x86_64")]
    let done = if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { resample_normalized_avx2(img, b, size, mean, std, layout, out, &mut scratch) };
        true
    } else {
        false
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = false;
    if !done {
        resample_normalized_body(img, b, size, mean, std, layout, out, &mut scratch);
    }
    SCRATCH.with(|c| c.set(scratch));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn resample_normalized_avx2(
    img: &RgbImage,
    b: &CropBox,
    size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    layout: Layout,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    // Same code compiled for AVX2: only plain IEEE adds and multiplies (no FMA contraction),
    // so the results are the same as the baseline build's.
    resample_normalized_body(img, b, size, mean, std, layout, out, scratch)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn resample_normalized_body(
    img: &RgbImage,
    b: &CropBox,
    size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    layout: Layout,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (ow, oh) = (size, size);
    let (xlo, xhi, ylo, yhi) = source_window(img, b);
    let tx = FlatTaps::new(&taps(b.x, b.w, xlo, xhi, ow), xlo, xhi, b.flip);
    let ty = FlatTaps::new(&taps(b.y, b.h, ylo, yhi, oh), ylo, yhi, false);
    let r0 = ty.start.iter().copied().min().unwrap_or(0);
    let r1 = ty
        .start
        .iter()
        .map(|s| s + ty.k)
        .max()
        .unwrap_or(0)
        .min(img.height);
    let row_len = ow * 3;
    {
        let src_len = (xhi - xlo) * 3 + 1;
        let need = (r1 - r0) * row_len + 3 * row_len + src_len;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (tmp, rest) = scratch.split_at_mut((r1 - r0) * row_len);
        let (acc, rest) = rest.split_at_mut(row_len);
        let (scale, rest) = rest.split_at_mut(row_len);
        let (bias, rest) = rest.split_at_mut(row_len);
        let src = &mut rest[..src_len];
        src[src_len - 1] = 0.0;
        for i in 0..row_len {
            let c = i % 3;
            // (v / 255 - mean) / std as v * scale + bias
            scale[i] = 1.0 / (255.0 * std[c]);
            bias[i] = -mean[c] / std[c];
        }
        // horizontal pass over the rows the vertical pass needs
        let w3 = img.width * 3;
        for (y, dst) in (r0..r1).zip(tmp.chunks_exact_mut(row_len)) {
            let row = &img.data[y * w3 + xlo * 3..y * w3 + xhi * 3];
            for (f, &v) in src.iter_mut().zip(row) {
                *f = v as f32;
            }
            hpass(src, xlo, &tx, dst);
        }
        // vertical pass, normalisation and layout
        let k = ty.k;
        for (j, (&y0, w)) in ty.start.iter().zip(ty.w.chunks_exact(k)).enumerate() {
            acc.fill(0.0);
            for (kk, &wk) in w.iter().enumerate() {
                if wk == 0.0 {
                    continue;
                }
                let src = &tmp[(y0 + kk - r0) * row_len..(y0 + kk - r0 + 1) * row_len];
                for (a, s) in acc.iter_mut().zip(src) {
                    *a += wk * s;
                }
            }
            for ((a, s), bi) in acc.iter_mut().zip(scale.iter()).zip(bias.iter()) {
                *a = a.clamp(0.0, 255.0) * s + bi;
            }
            layout.write_row(size, j, acc, out);
        }
    }
}

/// The source rows and columns a crop box may read: `(xlo, xhi, ylo, yhi)`, never empty.
fn source_window(img: &RgbImage, b: &CropBox) -> (usize, usize, usize, usize) {
    let (xlo, xhi, ylo, yhi) = if b.clamp_to_box {
        (
            b.x.floor().max(0.0) as usize,
            ((b.x + b.w).ceil() as usize).min(img.width),
            b.y.floor().max(0.0) as usize,
            ((b.y + b.h).ceil() as usize).min(img.height),
        )
    } else {
        (0, img.width, 0, img.height)
    };
    (xlo, xhi.max(xlo + 1), ylo, yhi.max(ylo + 1))
}

fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Filter taps of one axis: for every output index, the first source index and the weights.
fn taps(start: f64, len: f64, lo: usize, hi: usize, out: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = len / out as f64;
    let fscale = scale.max(1.0);
    let support = 2.0 * fscale;
    (0..out)
        .map(|i| {
            let center = start + (i as f64 + 0.5) * scale;
            let a = ((center - support + 0.5).floor().max(lo as f64)) as usize;
            let b = ((center + support + 0.5).floor().min(hi as f64)) as usize;
            let (a, b) = (a.min(hi.saturating_sub(1)), b.max(a + 1).min(hi));
            let mut w: Vec<f64> = (a..b)
                .map(|x| cubic((x as f64 + 0.5 - center) / fscale))
                .collect();
            let sum: f64 = w.iter().sum();
            if sum.abs() > 1e-12 {
                w.iter_mut().for_each(|v| *v /= sum);
            } else {
                w.iter_mut().for_each(|v| *v = 0.0);
                if let Some(v) = w.first_mut() {
                    *v = 1.0;
                }
            }
            (a, w.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

/// Separable bicubic resampling of the box `b` of `img` to `ow x oh`, values in [0, 255] (not
/// clamped), HWC.
///
/// This is the simple reference implementation (one weight vector per output, a temporary
/// buffer per call); [`ImageConfig::apply`] and the loader use a fused fast path that the
/// tests check against it.
///
/// [`ImageConfig::apply`]: super::ImageConfig::apply
pub fn resample(img: &RgbImage, b: &CropBox, ow: usize, oh: usize) -> Vec<f32> {
    let (xlo, xhi, ylo, yhi) = source_window(img, b);
    let tx = taps(b.x, b.w, xlo, xhi, ow);
    let ty = taps(b.y, b.h, ylo, yhi, oh);
    let r0 = ty.iter().map(|t| t.0).min().unwrap_or(0);
    let r1 = ty
        .iter()
        .map(|t| t.0 + t.1.len())
        .max()
        .unwrap_or(0)
        .min(img.height);
    // horizontal pass over the rows the vertical pass needs
    let mut tmp = vec![0f32; (r1 - r0) * ow * 3];
    for y in r0..r1 {
        let row = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        let dst = &mut tmp[(y - r0) * ow * 3..(y - r0 + 1) * ow * 3];
        for (i, (x0, w)) in tx.iter().enumerate() {
            let mut acc = [0f32; 3];
            for (k, wk) in w.iter().enumerate() {
                let p = &row[(x0 + k) * 3..(x0 + k) * 3 + 3];
                acc[0] += wk * p[0] as f32;
                acc[1] += wk * p[1] as f32;
                acc[2] += wk * p[2] as f32;
            }
            let o = if b.flip { ow - 1 - i } else { i };
            dst[o * 3..o * 3 + 3].copy_from_slice(&acc);
        }
    }
    let mut out = vec![0f32; oh * ow * 3];
    for (j, (y0, w)) in ty.iter().enumerate() {
        let dst = &mut out[j * ow * 3..(j + 1) * ow * 3];
        for (k, wk) in w.iter().enumerate() {
            let src = &tmp[(y0 + k - r0) * ow * 3..(y0 + k - r0 + 1) * ow * 3];
            for (d, s) in dst.iter_mut().zip(src) {
                *d += wk * s;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{ImageConfig, Normalization, Transform};
    use rand::Rng;

    #[test]
    fn flip_mirrors_and_constant_stays_constant() {
        let mut data = Vec::new();
        for _y in 0..4 {
            for x in 0..4u8 {
                data.extend([x * 60, 0, 0]);
            }
        }
        let img = RgbImage {
            width: 4,
            height: 4,
            data,
        };
        let b = |flip| CropBox {
            x: 0.0,
            y: 0.0,
            w: 4.0,
            h: 4.0,
            flip,
            clamp_to_box: true,
        };
        let a = resample(&img, &b(false), 4, 4);
        let f = resample(&img, &b(true), 4, 4);
        assert!((a[0] - 0.0).abs() < 1e-3 && (a[9] - 180.0).abs() < 1e-3);
        assert!((f[0] - 180.0).abs() < 1e-3 && (f[9] - 0.0).abs() < 1e-3);
        let down = resample(&img, &b(false), 2, 2);
        assert!(down[0] < down[3]);
    }

    /// The reference: the simple resampler, then normalisation as the first implementation did.
    fn reference(cfg: &ImageConfig, img: &RgbImage, seed: u64) -> Vec<f32> {
        let mut rng = crate::seed::rng(seed, 1, 2, 3);
        let b = cfg.crop_box(img.width, img.height, &mut rng);
        let mut out = resample(img, &b, cfg.size, cfg.size);
        let (mean, std) = cfg.normalization.mean_std();
        for px in out.chunks_exact_mut(3) {
            for c in 0..3 {
                px[c] = (px[c].clamp(0.0, 255.0) / 255.0 - mean[c]) / std[c];
            }
        }
        out
    }

    fn noisy_image(w: usize, h: usize, seed: u64) -> RgbImage {
        let mut rng = crate::seed::rng(seed, 9, 9, 9);
        let data = (0..w * h * 3)
            .map(|i| {
                // smooth gradient plus strong noise and hard edges: worst case for ringing
                let (x, y) = ((i / 3) % w, (i / 3) / w);
                let base = ((x * 255 / w) ^ (y * 255 / h)) as u8;
                base.wrapping_add(rng.random::<u8>() / 4)
            })
            .collect();
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }

    /// Bound of the fast path against the reference, in normalised units (1/255 of a pixel
    /// step is ~0.012 in CC12M units; the fast path stays far below, at float rounding).
    const FAST_PATH_TOL: f32 = 1e-4;

    #[test]
    fn fast_path_matches_reference_resampler() {
        let cases = [
            (256, 256, 224, Transform::pretrain()),
            (256, 256, 224, Transform::linear_probe()),
            (97, 61, 32, Transform::pretrain()),
            (5, 3, 16, Transform::pretrain()),
            (1, 1, 8, Transform::pretrain()),
            (640, 480, 224, Transform::test()),
            (300, 1200, 64, Transform::test()),
            (50, 40, 64, Transform::Resize),
            (2000, 30, 16, Transform::Resize),
        ];
        let mut worst = 0f32;
        for (n, &(w, h, size, transform)) in cases.iter().enumerate() {
            let img = noisy_image(w, h, n as u64);
            for normalization in [Normalization::Cc12m, Normalization::None] {
                let cfg = ImageConfig {
                    size,
                    transform,
                    normalization,
                    augment: Default::default(),
                };
                for seed in 0..6 {
                    let want = reference(&cfg, &img, seed);
                    let got = cfg.apply(&img, &mut crate::seed::rng(seed, 1, 2, 3));
                    assert_eq!(got.len(), want.len());
                    let d = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    worst = worst.max(d);
                    assert!(d <= FAST_PATH_TOL, "case {n} seed {seed}: max diff {d}");
                }
            }
        }
        eprintln!("fast path vs reference: max abs diff {worst:e}");
    }

    #[test]
    fn patch_layout_is_the_model_patchify() {
        let img = noisy_image(120, 90, 7);
        let cfg = ImageConfig {
            size: 32,
            transform: Transform::pretrain(),
            normalization: Normalization::Cc12m,
            augment: Default::default(),
        };
        let hwc = cfg.apply(&img, &mut crate::seed::rng(3, 0, 0, 0));
        let mut patches = vec![0f32; hwc.len()];
        cfg.apply_into(
            &img,
            &mut crate::seed::rng(3, 0, 0, 0),
            Layout::Patches(8),
            &mut patches,
        );
        let dev = candle_core::Device::Cpu;
        let t = candle_core::Tensor::from_vec(hwc, (1, 32, 32, 3), &dev).unwrap();
        let want = m3ae_model::patchify(&t, 8)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(patches, want);
    }
}
