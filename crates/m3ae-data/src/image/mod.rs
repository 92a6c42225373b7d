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
//! * [`AutoAugment`]: optional RandAugment after the crop (timm's policies, Pillow's operations;
//!   the official fine-tuning transform uses `rand-m9-mstd0.5-inc1`).
//!
//! Resampling is a separable bicubic (a = -0.5) filter whose support widens when downscaling
//! (antialiasing), as PIL's `resize` that torchvision calls. The output is HWC f32, ready for
//! [`m3ae_model::patchify`]. All randomness comes from the generator the caller passes.
//!
//! The code is in three parts: decoding to [`RgbImage`] (`decode`), the transform configuration
//! and crop boxes (`transform`), and the resamplers, the reference [`resample`] and the fused fast
//! path (`resample`). Everything public is re-exported here.
//!
//! [`resample`]: fn@resample

mod augment;
mod decode;
mod resample;
mod transform;

pub use augment::{AugmentOp, AutoAugment, RandAugment};
pub use decode::{decode_rgb, RgbImage, MAX_ALLOC, MAX_SIDE};
pub use resample::resample;
pub use transform::{random_resized_crop, CropBox, ImageConfig, Layout, Normalization, Transform};
