//! Patchify / unpatchify of NHWC images in the official order.
//!
//! `[B, H, W, C]` is reshaped to `[B, G, P, G, P, C]`, the two middle axes are swapped and the
//! result flattened to `[B, G*G, P*P*C]`: patches row-major over the grid, and inside a patch
//! (pixel row, pixel column, channel) with the channel fastest.

use crate::{Error, Result};
use candle_core::Tensor;

/// `[B, H, W, C]` (NHWC) -> `[B, (H/P)^2, P*P*C]`. The image must be square with `H % P == 0`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let img = Tensor::arange(0f32, 16., &Device::Cpu)?.reshape((1, 4, 4, 1))?;
/// let p = m3ae_model::patchify(&img, 2)?;
/// assert_eq!(p.dims(), &[1, 4, 4]);
/// assert_eq!(p.get(0)?.get(1)?.to_vec1::<f32>()?, vec![2., 3., 6., 7.]);
/// let back = m3ae_model::unpatchify(&p, 2, 1)?;
/// assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, img.flatten_all()?.to_vec1::<f32>()?);
/// # Ok::<(), m3ae_model::Error>(())
/// ```
pub fn patchify(images: &Tensor, patch: usize) -> Result<Tensor> {
    let (b, h, w, c) = images.dims4()?;
    if h != w || patch == 0 || h % patch != 0 {
        return Err(Error::Shape(format!(
            "patchify needs a square NHWC image with side divisible by the patch size {patch}, got {:?}",
            images.dims()
        )));
    }
    let g = h / patch;
    Ok(images
        .reshape((b, g, patch, g, patch, c))?
        .transpose(2, 3)?
        .contiguous()?
        .reshape((b, g * g, patch * patch * c))?)
}

/// Inverse of [`patchify`]: `[B, G*G, P*P*C]` -> `[B, G*P, G*P, C]`.
pub fn unpatchify(patches: &Tensor, patch: usize, channels: usize) -> Result<Tensor> {
    let (b, n, d) = patches.dims3()?;
    let g = (n as f64).sqrt().round() as usize;
    if g * g != n || patch * patch * channels != d {
        return Err(Error::Shape(format!(
            "unpatchify needs a square grid and patch dim {patch}*{patch}*{channels}, got {:?}",
            patches.dims()
        )));
    }
    Ok(patches
        .reshape((b, g, g, patch, patch, channels))?
        .transpose(2, 3)?
        .contiguous()?
        .reshape((b, g * patch, g * patch, channels))?)
}
