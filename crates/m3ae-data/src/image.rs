//! Image decoding and the official transforms.
//!
//! * [`decode_rgb`]: JPEG / PNG / WebP to 8-bit RGB; grey becomes RGB and alpha is composited on
//!   white, as the official skimage-based loader does. Image size and memory are limited, so no
//!   input bytes can make it panic or allocate without bound. A file that ends before its image
//!   data does (no JPEG EOI after the scan, no PNG `IEND`, fewer bytes than the WebP RIFF size)
//!   is an error, not a partly grey image.
//! * [`Transform`]: `pretrain` = RandomResizedCrop(scale (0.2, 1), ratio (3/4, 4/3), bicubic) +
//!   horizontal flip; `linear_probe` = the same with scale (0.08, 1); `test` = Resize(size,
//!   bicubic) of the shorter side + CenterCrop(size).
//! * [`Normalization`]: CC12M or ImageNet mean / std, none, or custom.
//!
//! Resampling is a separable bicubic (a = -0.5) filter whose support widens when downscaling
//! (antialiasing), as PIL's `resize` that torchvision calls. The output is HWC f32, ready for
//! [`m3ae_model::patchify`]. All randomness comes from the generator the caller passes.

use crate::sample::ImageData;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// An 8-bit RGB image, row-major `[height, width, 3]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes.
    pub data: Vec<u8>,
}

/// Largest accepted side, in pixels.
pub const MAX_SIDE: u32 = 16384;
/// Largest allocation a decoder may make, in bytes.
pub const MAX_ALLOC: u64 = 512 << 20;

/// Decodes JPEG, PNG or WebP bytes to RGB (grey -> RGB, alpha composited on white).
///
/// ```
/// // a 1x1 grey PNG written by the image crate itself
/// let mut png = Vec::new();
/// image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(1, 1, image::Luma([200])))
///     .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
/// let rgb = m3ae_data::decode_rgb(&png).unwrap();
/// assert_eq!((rgb.width, rgb.height, rgb.data.clone()), (1, 1, vec![200, 200, 200]));
/// assert!(m3ae_data::decode_rgb(b"not an image").is_err());
/// ```
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, String> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    if let Some(format) = reader.format() {
        check_complete(bytes, format)?;
    }
    let img = reader.decode().map_err(|e| e.to_string())?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err("image has no pixels".into());
    }
    if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        Ok(RgbImage {
            width: w,
            height: h,
            data: composite_on_white(rgba.as_raw(), 4),
        })
    } else {
        Ok(RgbImage {
            width: w,
            height: h,
            data: img.into_rgb8().into_raw(),
        })
    }
}

/// Rejects a JPEG, PNG or WebP file that ends before its image data does.
///
/// The decoders forgive truncation (zune-jpeg, in the non-strict mode the `image` crate uses,
/// fills the missing blocks with grey), so it is checked on the container: a JPEG needs its
/// EOI marker after the first scan's SOS (entropy-coded data stuffs every `FF` byte, and EXIF
/// thumbnails come before the SOS, so an `FF D9` there is the end of the image); a PNG needs
/// its chunks, walked by their lengths, to reach a whole `IEND` chunk; a WebP needs the bytes its RIFF header
/// announces. Bytes after the end (trailing garbage) are accepted, as decoders do.
fn check_complete(bytes: &[u8], format: image::ImageFormat) -> Result<(), String> {
    match format {
        image::ImageFormat::Jpeg => jpeg_complete(bytes),
        image::ImageFormat::Png => png_complete(bytes),
        image::ImageFormat::WebP => webp_complete(bytes),
        _ => Ok(()),
    }
}

fn jpeg_complete(b: &[u8]) -> Result<(), String> {
    let truncated = |what: &str| Err(format!("truncated JPEG: {what} ({} bytes)", b.len()));
    if !b.starts_with(&[0xFF, 0xD8]) {
        return Err("not a JPEG (no SOI marker)".into());
    }
    // walk the marker segments up to the first SOS
    let mut i = 2;
    loop {
        while i < b.len() && b[i] != 0xFF {
            i += 1; // tolerate stray bytes between segments, as decoders do
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1; // fill bytes
        }
        let Some(&m) = b.get(i) else {
            return truncated("no scan (SOS) before the end");
        };
        i += 1;
        match m {
            0xD9 => return truncated("EOI before any scan"),
            0x01 | 0xD0..=0xD7 => continue, // markers without a length
            _ => {}
        }
        let Some(len) = b
            .get(i..i + 2)
            .map(|l| u16::from_be_bytes([l[0], l[1]]) as usize)
        else {
            return truncated("a marker segment is cut");
        };
        if m == 0xDA {
            break;
        }
        i += len;
    }
    if b[i..].windows(2).any(|w| w == [0xFF, 0xD9]) {
        Ok(())
    } else {
        truncated("no EOI marker after the scan data")
    }
}

fn png_complete(b: &[u8]) -> Result<(), String> {
    let mut i = 8; // the signature
    while let Some(head) = b.get(i..i + 8) {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if &head[4..8] == b"IEND" && b.len() >= i + 12 {
            return Ok(());
        }
        i = i.saturating_add(12).saturating_add(len);
    }
    Err(format!(
        "truncated PNG: no IEND chunk within its {} bytes",
        b.len()
    ))
}

fn webp_complete(b: &[u8]) -> Result<(), String> {
    let Some(size) = b
        .get(4..8)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
    else {
        return Err("truncated WebP: no RIFF size".into());
    };
    let want = size.saturating_add(8);
    if b.len() < want {
        return Err(format!(
            "truncated WebP: the RIFF header announces {want} bytes, the file has {}",
            b.len()
        ));
    }
    Ok(())
}

/// RGB from grey (1), grey+alpha (2), RGB (3) or RGBA (4) pixels; alpha composited on white.
fn composite_on_white(px: &[u8], channels: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(px.len() / channels * 3);
    for p in px.chunks_exact(channels) {
        let (rgb, a) = match channels {
            1 => ([p[0]; 3], 255u8),
            2 => ([p[0]; 3], p[1]),
            3 => ([p[0], p[1], p[2]], 255),
            _ => ([p[0], p[1], p[2]], p[3]),
        };
        for c in rgb {
            let a = a as u32;
            out.push(((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    out
}

impl RgbImage {
    /// From a sample's image: decodes encoded bytes, converts raw pixels.
    pub fn from_data(data: &ImageData) -> Result<Self, String> {
        match data {
            ImageData::Encoded(b) => decode_rgb(b),
            ImageData::Pixels {
                width,
                height,
                channels,
                data,
            } => {
                if !(1..=4).contains(channels)
                    || *width == 0
                    || *height == 0
                    || data.len() != width * height * channels
                {
                    return Err(format!(
                        "pixel buffer of {} bytes does not match {width}x{height}x{channels}",
                        data.len()
                    ));
                }
                Ok(Self {
                    width: *width,
                    height: *height,
                    data: if *channels == 3 {
                        data.clone()
                    } else {
                        composite_on_white(data, *channels)
                    },
                })
            }
        }
    }
}

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
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            size: 256,
            transform: Transform::pretrain(),
            normalization: Normalization::Cc12m,
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
    /// let cfg = ImageConfig { size: 4, transform: Transform::test(), normalization: Normalization::None };
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
    /// let cfg = ImageConfig { size: 4, transform: Transform::test(), normalization: Normalization::None };
    /// let mut out = vec![0.0; 4 * 4 * 3];
    /// cfg.apply_into(&img, &mut m3ae_data::seed::rng(0, 0, 0, 0), Layout::Patches(2), &mut out);
    /// assert!(out.iter().all(|v| (v - 1.0).abs() < 1e-5));
    /// ```
    pub fn apply_into<R: Rng>(&self, img: &RgbImage, rng: &mut R, layout: Layout, out: &mut [f32]) {
        let b = self.crop_box(img.width, img.height, rng);
        let (mean, std) = self.normalization.mean_std();
        resample_normalized(img, &b, self.size, mean, std, layout, out);
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
fn resample_normalized(
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
            match layout {
                Layout::Hwc => out[j * row_len..(j + 1) * row_len].copy_from_slice(acc),
                Layout::Patches(p) => {
                    let g = size / p;
                    let (gy, py) = (j / p, j % p);
                    for (gx, chunk) in acc.chunks_exact(p * 3).enumerate() {
                        let o = ((gy * g + gx) * p * p + py * p) * 3;
                        out[o..o + p * 3].copy_from_slice(chunk);
                    }
                }
            }
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

    #[test]
    fn alpha_composites_on_white_and_grey_expands() {
        assert_eq!(composite_on_white(&[0, 0, 0, 0], 4), vec![255, 255, 255]);
        assert_eq!(composite_on_white(&[10, 20, 30, 255], 4), vec![10, 20, 30]);
        assert_eq!(composite_on_white(&[0, 128], 2), vec![127, 127, 127]);
        assert_eq!(composite_on_white(&[9], 1), vec![9, 9, 9]);
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

    #[test]
    fn pixels_are_validated() {
        let bad = ImageData::Pixels {
            width: 2,
            height: 2,
            channels: 3,
            data: vec![0; 5],
        };
        assert!(RgbImage::from_data(&bad).is_err());
    }
}
