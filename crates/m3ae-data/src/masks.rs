//! Mask sampling: uniform noise drawn from (seed, step, stream) and turned into
//! [`m3ae_model::Masking`] (the model crate owns the argsort / keep / restore logic).
//!
//! [`NoiseKind::Shared`] draws one `(L,)` vector per modality for the whole batch (the official
//! behaviour, spec §4); [`NoiseKind::PerSample`] draws `(B, L)` (the original MAE). The same
//! (seed, step) always gives the same masks, whatever the thread count.

use crate::seed::{self, purpose};
use crate::Result;
use candle_core::Device;
use m3ae_model::{keep_len, Masking, Noise};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Whether the noise is shared by the batch or drawn per sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseKind {
    /// One noise vector for the whole batch (official).
    #[default]
    Shared,
    /// One noise vector per sample.
    PerSample,
}

/// Which modality a mask is for (separate random streams).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Image patches.
    Image,
    /// Paired text.
    Text,
    /// Unpaired text.
    UnpairedText,
}

/// Draws masking noise from (seed, step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskSampler {
    /// Base seed.
    pub seed: u64,
    /// Shared or per-sample noise.
    pub kind: NoiseKind,
}

impl MaskSampler {
    /// A sampler.
    pub fn new(seed: u64, kind: NoiseKind) -> Self {
        Self { seed, kind }
    }

    /// Uniform [0, 1) noise for `batch` sequences of length `len` at `step`.
    pub fn noise(&self, step: u64, stream: Stream, batch: usize, len: usize) -> Noise {
        let p = match stream {
            Stream::Image => purpose::IMAGE_NOISE,
            Stream::Text => purpose::TEXT_NOISE,
            Stream::UnpairedText => purpose::UNPAIRED_NOISE,
        };
        let mut rng = seed::rng(self.seed, p, step, 0);
        match self.kind {
            NoiseKind::Shared => Noise::Shared((0..len).map(|_| rng.random::<f32>()).collect()),
            NoiseKind::PerSample => Noise::PerSample {
                batch,
                values: (0..batch * len).map(|_| rng.random::<f32>()).collect(),
            },
        }
    }

    /// The masking of `batch` sequences of `len` tokens at `mask_ratio` (keep computed like the
    /// official `int(len * (1 - ratio))`).
    ///
    /// ```
    /// use m3ae_data::{MaskSampler, NoiseKind, masks::Stream};
    /// let dev = candle_core::Device::Cpu;
    /// let s = MaskSampler::new(3, NoiseKind::Shared);
    /// let a = s.masking(10, Stream::Image, 2, 16, 0.75, &dev)?;
    /// let b = s.masking(10, Stream::Image, 2, 16, 0.75, &dev)?;
    /// assert_eq!(a.keep, 4);
    /// assert_eq!(a.mask.to_vec2::<f32>()?, b.mask.to_vec2::<f32>()?);
    /// let m = a.mask.to_vec2::<f32>()?;
    /// assert_eq!(m[0], m[1]); // shared by the batch
    /// # Ok::<(), m3ae_data::Error>(())
    /// ```
    pub fn masking(
        &self,
        step: u64,
        stream: Stream,
        batch: usize,
        len: usize,
        mask_ratio: f64,
        device: &Device,
    ) -> Result<Masking> {
        let noise = self.noise(step, stream, batch, len);
        Ok(Masking::new(
            &noise,
            batch,
            keep_len(len, mask_ratio),
            device,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_sample_differs_and_steps_differ() {
        let dev = Device::Cpu;
        let s = MaskSampler::new(1, NoiseKind::PerSample);
        let m = s
            .masking(0, Stream::Text, 3, 32, 0.75, &dev)
            .unwrap()
            .mask
            .to_vec2::<f32>()
            .unwrap();
        assert_ne!(m[0], m[1]);
        assert!(m
            .iter()
            .all(|r| r.iter().filter(|&&v| v == 0.0).count() == 8));
        let a = s.noise(0, Stream::Image, 1, 8);
        let b = s.noise(1, Stream::Image, 1, 8);
        let c = s.noise(0, Stream::Text, 1, 8);
        assert_ne!(a, b);
        assert_ne!(a, c);
    }
}
