//! A batch of the loader ([`Batch`], with its unpaired text [`TextBatch`]) and the collation
//! of processed samples ([`Item`]) into a [`ModelInput`].

use crate::loader::Position;
use crate::tokenize::Tokenized;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use m3ae_model::{patchify, Masking, ModelInput};

/// A processed sample, ready to collate.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The sample key.
    pub key: String,
    /// `[size, size, 3]` HWC normalised image.
    pub image: Option<Vec<f32>>,
    /// Tokenized text.
    pub text: Option<Tokenized>,
    /// Class label.
    pub label: Option<i64>,
}

/// Unpaired text of a batch.
#[derive(Debug, Clone)]
pub struct TextBatch {
    /// `[B, T]` u32 ids.
    pub ids: Tensor,
    /// `[B, T]` f32, 1 = padding.
    pub padding: Tensor,
    /// Mask of the unpaired text (when masks are configured).
    pub masking: Option<Masking>,
}

/// One batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Patches `[B, N, P*P*3]`, ids `[B, T]`, padding `[B, T]` (those configured).
    pub input: ModelInput,
    /// Image masking of this step.
    pub image_masking: Option<Masking>,
    /// Text masking of this step.
    pub text_masking: Option<Masking>,
    /// Labels, one per sample.
    pub labels: Vec<Option<i64>>,
    /// Keys, one per sample.
    pub keys: Vec<String>,
    /// Unpaired text batch, when an unpaired stream is attached.
    pub unpaired: Option<TextBatch>,
    /// Global step of this batch.
    pub step: u64,
    /// Epoch of this batch.
    pub epoch: u64,
    /// Position after this batch: resume from it to get the next batch.
    pub position: Position,
}

impl Batch {
    /// Labels as a `[B]` u32 tensor; `None` unless every sample has a non-negative label.
    pub fn labels_tensor(&self) -> Result<Option<Tensor>> {
        let v: Option<Vec<u32>> = self
            .labels
            .iter()
            .map(|l| l.and_then(|l| u32::try_from(l).ok()))
            .collect();
        Ok(match v {
            Some(v) => {
                let n = v.len();
                Some(Tensor::from_vec(v, n, &Device::Cpu)?)
            }
            None => None,
        })
    }
}

/// Stacks items into a [`ModelInput`]: images `[B, S, S, 3]` through
/// [`m3ae_model::patchify`] to `[B, (S/P)^2, P*P*3]`, ids `[B, T]` u32, padding `[B, T]` f32.
/// Parts missing from any item are left out.
///
/// ```
/// use m3ae_data::{collate, loader::Item, Tokenized};
/// let item = Item { key: "k".into(), image: Some(vec![0.5; 4 * 4 * 3]),
///     text: Some(Tokenized { ids: vec![7, 0], padding: vec![0, 1] }), label: None };
/// let input = collate(&[item.clone(), item], 4, 2)?;
/// assert_eq!(input.image_patches.unwrap().dims(), &[2, 4, 12]);
/// assert_eq!(input.text_padding.unwrap().to_vec2::<f32>()?, vec![vec![0., 1.]; 2]);
/// # Ok::<(), m3ae_data::Error>(())
/// ```
pub fn collate(items: &[Item], image_size: usize, patch: usize) -> Result<ModelInput> {
    // batches are built on the host; the trainer or the model copies them to its device
    let dev = Device::Cpu;
    let b = items.len();
    let image_patches = if b > 0 && items.iter().all(|i| i.image.is_some()) {
        let mut data = Vec::with_capacity(b * image_size * image_size * 3);
        for it in items {
            let im = it.image.as_deref().unwrap_or_default();
            if im.len() != image_size * image_size * 3 {
                return Err(Error::Config {
                    field: "image_size",
                    msg: format!(
                        "item `{}` has {} values, expected {image_size}^2*3",
                        it.key,
                        im.len()
                    ),
                });
            }
            data.extend_from_slice(im);
        }
        let t = Tensor::from_vec(data, (b, image_size, image_size, 3), &dev)?;
        Some(patchify(&t, patch)?)
    } else {
        None
    };
    let (text_ids, text_padding) = if b > 0 && items.iter().all(|i| i.text.is_some()) {
        let t = items[0].text.as_ref().map(|t| t.ids.len()).unwrap_or(0);
        let mut ids = Vec::with_capacity(b * t);
        let mut pad = Vec::with_capacity(b * t);
        for it in items {
            let tk = it.text.as_ref().expect("checked above");
            if tk.ids.len() != t || tk.padding.len() != t {
                return Err(Error::Config {
                    field: "text_len",
                    msg: format!(
                        "item `{}` has {} tokens, expected {t}",
                        it.key,
                        tk.ids.len()
                    ),
                });
            }
            ids.extend_from_slice(&tk.ids);
            pad.extend(tk.padding.iter().map(|&p| p as f32));
        }
        (
            Some(Tensor::from_vec(ids, (b, t), &dev)?),
            Some(Tensor::from_vec(pad, (b, t), &dev)?),
        )
    } else {
        (None, None)
    };
    Ok(ModelInput {
        image_patches,
        text_ids,
        text_padding,
    })
}

/// A zeroed buffer for a batch's images. A batch of 224 px images is tens of MB: the
/// allocator maps it fresh for every batch, and faulting it in 4 KiB pages cost about a quarter
/// of the loader's CPU time in profiles. On Linux the buffer is advised to use transparent huge
/// pages (a no-op where they are disabled).
pub(crate) fn batch_buffer(len: usize) -> Vec<f32> {
    let v = vec![0f32; len];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = len * std::mem::size_of::<f32>();
        if bytes >= 2 * HUGE {
            let start = v.as_ptr() as usize;
            let page = 4096;
            let a = start.div_ceil(page) * page;
            let b = (start + bytes) / page * page;
            if b > a {
                // SAFETY: [a, b) lies inside the allocation `v` owns; MADV_HUGEPAGE is only
                // advice and does not change the contents (still zero) or the mapping's
                // validity. Errors (e.g. THP compiled out) are ignored.
                unsafe {
                    libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE);
                }
            }
        }
    }
    v
}
