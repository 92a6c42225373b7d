//! Decoding to [`RgbImage`]: JPEG / PNG / WebP through the `image` crate under size and memory
//! limits, a check that the file is not truncated, and grey / alpha to RGB (alpha composited on
//! white); raw pixel buffers of a sample are converted the same way.

use crate::sample::ImageData;

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
