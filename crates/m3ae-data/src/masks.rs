//! Mask sampling: uniform noise drawn from (seed, step, stream) and turned into
//! [`m3ae_model::Masking`] (the model crate owns the argsort / keep / restore logic).
//!
//! [`NoiseKind::Shared`] draws one `(L,)` vector per modality for the whole batch (the official
//! behaviour); [`NoiseKind::PerSample`] draws `(B, L)` (the original MAE). The same
//! (seed, step) always gives the same masks, whatever the thread count.
//!
//! [`BatchMasks`] is the one place the masks of a batch are drawn, for the single [`Loader`]
//! and for the data streams of a data-parallel run ([`crate::streams::Streams`]) alike: it draws
//! the noise of the step's global batch and keeps the rows the batch holds ([`BatchRows`]).
//! Its ratios come from the model's configuration through [`MaskConfig::from_model`].
//!
//! [`Loader`]: crate::Loader

use crate::loader::Batch;
use crate::seed::{self, purpose};
use crate::{Error, Result};
use candle_core::Device;
use m3ae_model::{keep_len, M3aeConfig, Masking, Noise};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Mask ratios and noise kind of the masks attached to each batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MaskConfig {
    /// Fraction of image patches masked.
    pub image_ratio: f64,
    /// Fraction of text tokens masked.
    pub text_ratio: f64,
    /// Batch-shared (official) or per-sample noise.
    pub noise: NoiseKind,
}

impl Default for MaskConfig {
    fn default() -> Self {
        Self {
            image_ratio: 0.75,
            text_ratio: 0.75,
            noise: NoiseKind::Shared,
        }
    }
}

impl MaskConfig {
    /// The masks `model` is trained with: its image and text mask ratios, with `noise`. The
    /// ratios reach the data through this function only, so the model's configuration and the
    /// masks of its batches cannot disagree.
    ///
    /// ```
    /// use m3ae_data::{MaskConfig, NoiseKind};
    /// let mut model = m3ae_model::M3aeConfig::default();
    /// model.text_mask_ratio = 0.5;
    /// let m = MaskConfig::from_model(&model, NoiseKind::Shared);
    /// assert_eq!((m.image_ratio, m.text_ratio), (model.image_mask_ratio, 0.5));
    /// ```
    pub fn from_model(model: &M3aeConfig, noise: NoiseKind) -> Self {
        Self {
            image_ratio: model.image_mask_ratio,
            text_ratio: model.text_mask_ratio,
            noise,
        }
    }

    /// The ratio of the masks of `stream`.
    pub fn ratio(&self, stream: Stream) -> f64 {
        match stream {
            Stream::Image => self.image_ratio,
            Stream::Text | Stream::UnpairedText => self.text_ratio,
        }
    }
}

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

/// Which rows of a step's global batch a batch holds. The global batch is `total` equal blocks
/// of consecutive rows (the data streams of a data-parallel run, block `s` being stream `s`);
/// the batch is the blocks `blocks`, in that order. A single loader's batch is the whole global
/// batch ([`BatchRows::whole`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRows {
    blocks: Vec<usize>,
    total: usize,
}

impl BatchRows {
    /// The whole global batch.
    pub fn whole() -> Self {
        Self {
            blocks: vec![0],
            total: 1,
        }
    }

    /// The blocks `blocks` of a global batch of `total` blocks.
    pub fn new(blocks: Vec<usize>, total: usize) -> Result<Self> {
        if blocks.is_empty() || blocks.iter().any(|&b| b >= total) {
            return Err(Error::Streams(format!(
                "batch rows: blocks {blocks:?} of a global batch of {total} blocks"
            )));
        }
        Ok(Self { blocks, total })
    }

    /// The blocks this batch holds.
    pub fn blocks(&self) -> &[usize] {
        &self.blocks
    }

    /// The number of blocks of the global batch.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// The masks of a run's batches: the ratios and noise kind of a [`MaskConfig`], drawn from
/// (seed, step) for the step's global batch. The one place masks are drawn, for a single
/// [`Loader`](crate::Loader) and for the streams of a data-parallel run: with batch-shared noise
/// every part of the global batch uses the same noise vector, with per-sample noise each row
/// gets the noise of its row of the global batch, exactly as one process holding the whole
/// global batch would draw them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BatchMasks {
    /// Ratios and noise kind.
    pub config: MaskConfig,
    /// The noise of every step.
    pub sampler: MaskSampler,
}

impl BatchMasks {
    /// The masks of `config` drawn from `seed` (a loader's seed).
    pub fn new(config: MaskConfig, seed: u64) -> Self {
        Self {
            config,
            sampler: MaskSampler::new(seed, config.noise),
        }
    }

    /// The masking of a batch of `n` sequences of `len` tokens of `stream` at `step`, the batch
    /// being the rows `rows` of the global batch.
    ///
    /// ```
    /// use m3ae_data::{masks::Stream, BatchMasks, BatchRows, MaskConfig, NoiseKind};
    /// let per_sample = MaskConfig { noise: NoiseKind::PerSample, ..Default::default() };
    /// let m = BatchMasks::new(per_sample, 3);
    /// let global = m.masking(7, Stream::Image, &BatchRows::whole(), 4, 16)?;
    /// let global = global.mask.to_vec2::<f32>()?;
    /// // the second half of the global batch (stream 1 of 2)
    /// let half = BatchRows::new(vec![1], 2)?;
    /// let mine = m.masking(7, Stream::Image, &half, 2, 16)?.mask.to_vec2::<f32>()?;
    /// assert_eq!(mine, global[2..].to_vec());
    /// # Ok::<(), m3ae_data::Error>(())
    /// ```
    pub fn masking(
        &self,
        step: u64,
        stream: Stream,
        rows: &BatchRows,
        n: usize,
        len: usize,
    ) -> Result<Masking> {
        let blocks = rows.blocks.len();
        if !n.is_multiple_of(blocks) {
            return Err(Error::Streams(format!(
                "a batch of {n} rows cannot be {blocks} equal blocks of the global batch"
            )));
        }
        let sampler = &self.sampler;
        let noise = match sampler.kind {
            NoiseKind::Shared => sampler.noise(step, stream, n, len),
            NoiseKind::PerSample => {
                // the noise of the global batch, row by row; this batch's blocks of it
                let block = n / blocks;
                let Noise::PerSample { values, .. } =
                    sampler.noise(step, stream, block * rows.total, len)
                else {
                    unreachable!("per-sample noise")
                };
                let mut mine = Vec::with_capacity(n * len);
                for &s in &rows.blocks {
                    let at = s * block * len;
                    mine.extend_from_slice(&values[at..at + block * len]);
                }
                Noise::PerSample {
                    batch: n,
                    values: mine,
                }
            }
        };
        let keep = keep_len(len, self.config.ratio(stream));
        // on the host with the batch; the model moves the indices to its device
        Ok(Masking::new(&noise, n, keep, &Device::Cpu)?)
    }

    /// Draws every mask of `batch` for its step (image, text and unpaired text, those it has),
    /// the batch being the rows `rows` of the global batch.
    pub fn attach(&self, batch: &mut Batch, rows: &BatchRows) -> Result<()> {
        let step = batch.step;
        if let Some(p) = &batch.input.image_patches {
            let (n, len) = (p.dim(0)?, p.dim(1)?);
            batch.image_masking = Some(self.masking(step, Stream::Image, rows, n, len)?);
        }
        if let Some(t) = &batch.input.text_ids {
            let (n, len) = t.dims2()?;
            batch.text_masking = Some(self.masking(step, Stream::Text, rows, n, len)?);
        }
        if let Some(u) = &mut batch.unpaired {
            let (n, len) = u.ids.dims2()?;
            u.masking = Some(self.masking(step, Stream::UnpairedText, rows, n, len)?);
        }
        Ok(())
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

    #[test]
    fn batch_masks_of_a_whole_batch_are_the_samplers_and_blocks_are_its_rows() {
        let dev = Device::Cpu;
        for noise in [NoiseKind::Shared, NoiseKind::PerSample] {
            let cfg = MaskConfig {
                image_ratio: 0.6,
                text_ratio: 0.3,
                noise,
            };
            let m = BatchMasks::new(cfg, 11);
            for (stream, ratio) in [(Stream::Image, 0.6), (Stream::UnpairedText, 0.3)] {
                let whole = m.masking(4, stream, &BatchRows::whole(), 6, 10).unwrap();
                let direct = m.sampler.masking(4, stream, 6, 10, ratio, &dev).unwrap();
                let rows = |m: &Masking| m.mask.to_vec2::<f32>().unwrap();
                assert_eq!(rows(&whole), rows(&direct));
                assert_eq!(whole.keep, direct.keep);
                // blocks 2 and 0 of 3 are those rows of the global batch, in that order
                let parts = BatchRows::new(vec![2, 0], 3).unwrap();
                let mine = rows(&m.masking(4, stream, &parts, 4, 10).unwrap());
                let all = rows(&direct);
                assert_eq!(mine, [&all[4..6], &all[0..2]].concat());
            }
        }
        assert!(BatchRows::new(vec![3], 3).is_err());
        let m = BatchMasks::new(MaskConfig::default(), 0);
        let uneven = BatchRows::new(vec![0, 1], 2).unwrap();
        assert!(m.masking(0, Stream::Text, &uneven, 3, 8).is_err());
    }
}
