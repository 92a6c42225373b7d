//! Random masking from explicit noise, as the official `random_masking`.
//!
//! The official code draws ONE uniform noise vector of shape `(L,)` per modality and shares it by
//! every sample of the batch; the original MAE draws per-sample noise `(B, L)`. Both are
//! [`Noise`] variants. `ids_shuffle = argsort(noise)` (ascending, stable), the first `keep` entries
//! are kept (in ascending-noise order), `ids_restore = argsort(ids_shuffle)`, and the mask is 1 at
//! removed positions. The index bookkeeping is done on the host and the model only uses `gather`
//! (whose backward is correct in candle 0.11, unlike `scatter*`).

use crate::{Error, Result};
use candle_core::{Device, Tensor};

/// Kept tokens for `len` tokens at `mask_ratio`, computed like the official Python
/// `int(len * (1.0 - ratio))` (float64, truncated).
///
/// ```
/// assert_eq!(m3ae_model::keep_len(16, 0.75), 4);
/// assert_eq!(m3ae_model::keep_len(10, 0.9), 0); // 1 - 0.9 = 0.0999..
/// assert_eq!(m3ae_model::keep_len(196, 0.75), 49);
/// ```
pub fn keep_len(len: usize, mask_ratio: f64) -> usize {
    ((len as f64) * (1.0 - mask_ratio)) as usize
}

/// Uniform masking noise for one modality.
#[derive(Debug, Clone, PartialEq)]
pub enum Noise {
    /// One vector of length `L` shared by the whole batch (the official behaviour).
    Shared(Vec<f32>),
    /// One vector per sample, row-major `[B, L]`.
    PerSample {
        /// Batch size B.
        batch: usize,
        /// `B * L` values.
        values: Vec<f32>,
    },
}

impl Noise {
    /// Sequence length L the noise covers.
    pub fn len(&self) -> usize {
        match self {
            Noise::Shared(v) => v.len(),
            Noise::PerSample { batch, values } => values.len() / (*batch).max(1),
        }
    }

    /// True when the noise covers no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads noise from a tensor of shape `(L,)` (shared) or `(B, L)` (per sample).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let t = t.to_dtype(candle_core::DType::F32)?;
        match t.dims() {
            [_] => Ok(Noise::Shared(t.to_vec1()?)),
            [b, _] => Ok(Noise::PerSample {
                batch: *b,
                values: t.flatten_all()?.to_vec1()?,
            }),
            d => Err(Error::Shape(format!(
                "masking noise must be (L,) or (B, L), got {d:?}"
            ))),
        }
    }
}

/// Stable ascending argsort of a noise row.
fn argsort(row: &[f32]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    idx.sort_by(|&a, &b| row[a as usize].total_cmp(&row[b as usize]));
    idx
}

/// Keep / restore indices and the 0/1 mask of one modality for a batch.
#[derive(Debug, Clone)]
pub struct Masking {
    /// Batch size B.
    pub batch: usize,
    /// Sequence length L.
    pub len: usize,
    /// Kept tokens per sample.
    pub keep: usize,
    /// `[B, L]` u32: argsort of the noise.
    pub ids_shuffle: Tensor,
    /// `[B, L]` u32: argsort of `ids_shuffle` (puts tokens back in order).
    pub ids_restore: Tensor,
    /// `[B, keep]` u32: `ids_shuffle[:, :keep]`.
    pub ids_keep: Tensor,
    /// `[B, L]` f32: 1 = removed (masked), 0 = kept.
    pub mask: Tensor,
    shared: bool,
}

impl Masking {
    /// Builds the masking of a batch of `batch` sequences of length `noise.len()` keeping `keep`
    /// tokens. Shared noise gives every sample the same pattern.
    ///
    /// ```
    /// use m3ae_model::{Masking, Noise};
    /// let dev = candle_core::Device::Cpu;
    /// let m = Masking::new(&Noise::Shared(vec![0.9, 0.1, 0.5, 0.3]), 2, 2, &dev)?;
    /// assert_eq!(m.ids_keep.to_vec2::<u32>()?, vec![vec![1, 3], vec![1, 3]]);
    /// assert_eq!(m.mask.to_vec2::<f32>()?[0], vec![1., 0., 1., 0.]);
    /// assert_eq!(m.ids_restore.to_vec2::<u32>()?[0], vec![3, 0, 2, 1]);
    /// # Ok::<(), m3ae_model::Error>(())
    /// ```
    pub fn new(noise: &Noise, batch: usize, keep: usize, device: &Device) -> Result<Self> {
        let len = noise.len();
        if keep > len {
            return Err(Error::Shape(format!("cannot keep {keep} of {len} tokens")));
        }
        let rows: Vec<&[f32]> = match noise {
            Noise::Shared(v) => vec![v.as_slice(); batch],
            Noise::PerSample { batch: nb, values } => {
                if *nb != batch || values.len() != batch * len {
                    return Err(Error::Shape(format!(
                        "per-sample noise has {} values for batch {nb}, expected batch {batch}",
                        values.len()
                    )));
                }
                values.chunks(len.max(1)).collect()
            }
        };
        if rows.iter().any(|r| r.iter().any(|x| !x.is_finite())) {
            return Err(Error::Shape(
                "masking noise contains NaN or infinity".into(),
            ));
        }
        let mut shuffle = Vec::with_capacity(batch * len);
        let mut restore = vec![0u32; batch * len];
        let mut kept = Vec::with_capacity(batch * keep);
        let mut mask = vec![1f32; batch * len];
        for (b, row) in rows.iter().enumerate() {
            let s = argsort(row);
            for (rank, &pos) in s.iter().enumerate() {
                restore[b * len + pos as usize] = rank as u32;
                if rank < keep {
                    mask[b * len + pos as usize] = 0.0;
                }
            }
            kept.extend_from_slice(&s[..keep]);
            shuffle.extend(s);
        }
        Ok(Self {
            batch,
            len,
            keep,
            ids_shuffle: Tensor::from_vec(shuffle, (batch, len), device)?,
            ids_restore: Tensor::from_vec(restore, (batch, len), device)?,
            ids_keep: Tensor::from_vec(kept, (batch, keep), device)?,
            mask: Tensor::from_vec(mask, (batch, len), device)?,
            shared: matches!(noise, Noise::Shared(_)),
        })
    }

    /// True when every sample has the same pattern (shared noise).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// The same masking with its tensors on `device` (a cheap clone when they are there
    /// already). The model moves a masking's indices to its tokens' device by itself; this
    /// lets a loader copy them ahead of the step.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            ids_shuffle: self.ids_shuffle.to_device(device)?,
            ids_restore: self.ids_restore.to_device(device)?,
            ids_keep: self.ids_keep.to_device(device)?,
            mask: self.mask.to_device(device)?,
            ..self.clone()
        })
    }

    /// Keeps the tokens of `x` `[B, L, D]` -> `[B, keep, D]` (in ascending-noise order).
    pub fn keep_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        self.check(b, l)?;
        let idx = self
            .ids_keep
            .to_device(x.device())?
            .unsqueeze(2)?
            .broadcast_as((b, self.keep, d))?
            .contiguous()?;
        Ok(x.contiguous()?.gather(&idx, 1)?)
    }

    /// Keeps the entries of a per-token mask `[B, L]` -> `[B, keep]`.
    pub fn keep_mask(&self, m: &Tensor) -> Result<Tensor> {
        let (b, l) = m.dims2()?;
        self.check(b, l)?;
        Ok(m.contiguous()?
            .gather(&self.ids_keep.to_device(m.device())?, 1)?)
    }

    /// Appends `mask_token` `[1, 1, D]` to the kept tokens `x` `[B, keep, D]` and un-shuffles them
    /// back to the original order: `[B, L, D]`.
    pub fn restore_tokens(&self, x: &Tensor, mask_token: &Tensor) -> Result<Tensor> {
        let (b, k, d) = x.dims3()?;
        self.check(b, self.len)?;
        if k != self.keep {
            return Err(Error::Shape(format!(
                "restore expects {} kept tokens, got {k}",
                self.keep
            )));
        }
        let full = if self.len > k {
            let fill = mask_token.broadcast_as((b, self.len - k, d))?;
            Tensor::cat(&[x, &fill], 1)?
        } else {
            x.clone()
        };
        let idx = self
            .ids_restore
            .to_device(x.device())?
            .unsqueeze(2)?
            .broadcast_as((b, self.len, d))?
            .contiguous()?;
        Ok(full.contiguous()?.gather(&idx, 1)?)
    }

    fn check(&self, b: usize, l: usize) -> Result<()> {
        if b != self.batch || l != self.len {
            return Err(Error::Shape(format!(
                "masking is for batch {} x length {}, got batch {b} x length {l}",
                self.batch, self.len
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_sample_noise_and_round_trip() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let noise = Noise::PerSample {
            batch: 2,
            values: vec![0.1, 0.2, 0.3, 0.4, 0.4, 0.3, 0.2, 0.1],
        };
        let m = Masking::new(&noise, 2, 1, &dev)?;
        assert_eq!(m.ids_keep.to_vec2::<u32>()?, vec![vec![0], vec![3]]);
        let x = Tensor::arange(0f32, 8., &dev)?.reshape((2, 4, 1))?;
        let kept = m.keep_tokens(&x)?;
        assert_eq!(kept.flatten_all()?.to_vec1::<f32>()?, vec![0., 7.]);
        let tok = Tensor::new(&[[[-1f32]]], &dev)?;
        let back = m.restore_tokens(&kept, &tok)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            vec![0., -1., -1., -1., -1., -1., -1., 7.]
        );
        assert!(Masking::new(&noise, 3, 1, &dev).is_err());
        assert!(Masking::new(&Noise::Shared(vec![0.1, f32::NAN]), 1, 1, &dev).is_err());
        assert!(Masking::new(&Noise::Shared(vec![0.1]), 1, 2, &dev).is_err());
        Ok(())
    }

    #[test]
    fn ties_are_broken_stably() -> anyhow::Result<()> {
        let m = Masking::new(&Noise::Shared(vec![0.5, 0.5, 0.2]), 1, 2, &Device::Cpu)?;
        assert_eq!(m.ids_shuffle.to_vec2::<u32>()?, vec![vec![2, 0, 1]]);
        Ok(())
    }
}
