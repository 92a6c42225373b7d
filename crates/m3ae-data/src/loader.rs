//! The loader: reads a [`Source`] partition, shuffles it through a seeded buffer, decodes,
//! augments and tokenizes in parallel (rayon), collates into [`m3ae_model::ModelInput`] with the
//! masks of the step ([`BatchMasks`]), and hands batches over through a bounded prefetch queue.
//!
//! Determinism: the record stream, the shuffle buffer and every per-sample random draw are keyed
//! by (seed, epoch, rank, index in the epoch), and batches are assembled in stream order, so a
//! seed gives the same batches whatever the number of threads. A [`Position`] (epoch, records
//! consumed in the epoch, global step, unpaired-text stream position, bad-sample counts) is
//! attached to every batch: restarting from it replays the record stream up to that point
//! without decoding anything and continues with exactly the batches an uninterrupted run would
//! have produced.
//!
//! Bad samples (undecodable image, missing or empty caption, ...) are skipped, counted and
//! replaced by the next records of the stream. Only the parts the batches need count: without
//! `text_len` (image-only evaluation) a sample whose caption is missing, empty or not UTF-8 is
//! kept, and without `image` (text only) one whose image is missing, oversized or corrupt is
//! kept ([`crate::PartFault`] carries a reader's verdict on a part to the loader).
//!
//! The bad-sample rule: the loader stops with [`Error::TooManyBad`] as soon as
//! `bad > max_bad_fraction * max(seen, bad_window)`, where `seen` counts the good and bad
//! samples so far (see [`BadStats::check`]): small data gets a fixed allowance of
//! `max_bad_fraction * bad_window` bad samples (10 with the defaults 0.1 and 100, so one bad
//! sample in a 7-sample shard is fine), large data the fraction. `max_bad_fraction = 1` never
//! stops. Separately, a whole pass over the data (an epoch read from its start) that gives no
//! batch at all, because it has no usable sample or, with `drop_last`, fewer than one batch, is
//! [`Error::NotEnoughData`] instead of an endless loop; a source whose
//! [`Source::len_hint`] is already too small fails in [`Loader::new`].

use crate::batch::batch_buffer;
use crate::image::{ImageConfig, Layout, RgbImage};
use crate::masks::{BatchMasks, BatchRows};
use crate::sample::{Partition, Record, RecordIter, Sample, Source};
use crate::seed::{self, purpose};
use crate::tokenize::{Tokenized, Tokenizer};
use crate::{BadReason, BadSample, BadStats, Error, Result};
use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

pub use crate::batch::{collate, Batch, Item, TextBatch};
pub use crate::masks::MaskConfig;

/// Loader settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Samples per batch (per process).
    pub batch_size: usize,
    /// Base seed of shuffling, augmentation and masks.
    pub seed: u64,
    /// Number of epochs (`None`: endless).
    pub epochs: Option<u64>,
    /// Drop the last incomplete batch of an epoch.
    pub drop_last: bool,
    /// Shuffle-buffer size in records (0 or 1: stream order).
    pub shuffle_buffer: usize,
    /// Decode threads (0: one per core).
    pub num_threads: usize,
    /// Batches prepared ahead.
    pub prefetch: usize,
    /// This process's rank.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Image processing (`None`: no images in the batches).
    pub image: Option<ImageConfig>,
    /// Patch size for patchify.
    pub patch_size: usize,
    /// Text length (`None`: no text in the batches).
    pub text_len: Option<usize>,
    /// Skip samples whose caption is empty (the rule) instead of giving them an
    /// all-padding text (the official code's rule).
    pub skip_empty_text: bool,
    /// Masks to attach (`None`: no masks).
    pub masks: Option<MaskConfig>,
    /// Largest tolerated fraction of bad samples: the loader fails when
    /// `bad > max_bad_fraction * max(seen, bad_window)` (1: never).
    pub max_bad_fraction: f64,
    /// The sample count below which the bad-sample allowance is fixed at
    /// `max_bad_fraction * bad_window` (formerly `min_samples_for_bad_check`).
    #[serde(alias = "min_samples_for_bad_check")]
    pub bad_window: u64,
    /// Text length of the unpaired text stream (when one is attached).
    pub unpaired_text_len: usize,
}

impl LoaderConfig {
    /// The official pretraining data recipe: RRC + flip, CC12M normalisation, text length 64,
    /// shared-noise masks at 0.75 / 0.75, drop-last, a 1,000-record shuffle buffer.
    pub fn pretrain(batch_size: usize, image_size: usize, patch_size: usize) -> Self {
        Self {
            batch_size,
            seed: 0,
            epochs: None,
            drop_last: true,
            shuffle_buffer: 1000,
            num_threads: 0,
            prefetch: 2,
            rank: 0,
            world_size: 1,
            image: Some(ImageConfig {
                size: image_size,
                ..Default::default()
            }),
            patch_size,
            text_len: Some(64),
            skip_empty_text: true,
            masks: Some(MaskConfig::default()),
            max_bad_fraction: 0.1,
            bad_window: 100,
            unpaired_text_len: 256,
        }
    }

    /// Evaluation: the test transform, no shuffling, no masks, no text, every sample kept.
    pub fn eval(batch_size: usize, image_size: usize, patch_size: usize) -> Self {
        Self {
            shuffle_buffer: 0,
            drop_last: false,
            epochs: Some(1),
            text_len: None,
            masks: None,
            image: Some(ImageConfig {
                size: image_size,
                transform: crate::Transform::test(),
                ..Default::default()
            }),
            ..Self::pretrain(batch_size, image_size, patch_size)
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |field, msg: String| Err(Error::Config { field, msg });
        if self.batch_size == 0 {
            return bad("batch_size", "must be positive".into());
        }
        if self.rank >= self.world_size.max(1) {
            return bad(
                "rank",
                format!("{} >= world size {}", self.rank, self.world_size),
            );
        }
        if let Some(im) = &self.image {
            if self.patch_size == 0 || im.size % self.patch_size != 0 {
                return bad(
                    "patch_size",
                    format!(
                        "image size {} is not divisible by {}",
                        im.size, self.patch_size
                    ),
                );
            }
        }
        if !(0.0..=1.0).contains(&self.max_bad_fraction) {
            return bad(
                "max_bad_fraction",
                format!("{} is not in [0, 1]", self.max_bad_fraction),
            );
        }
        if let Some(m) = &self.masks {
            for (f, r) in [
                ("masks.image_ratio", m.image_ratio),
                ("masks.text_ratio", m.text_ratio),
            ] {
                if !(0.0..1.0).contains(&r) {
                    return bad(f, format!("{r} is not in [0, 1)"));
                }
            }
        }
        Ok(())
    }
}

/// Where a loader is: saved with checkpoints, given back to [`Loader::iter`] to resume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Current epoch.
    pub epoch: u64,
    /// Records consumed from the epoch's shuffled stream.
    pub consumed: u64,
    /// Batches produced so far (the step the next batch's masks are drawn for).
    pub step: u64,
    /// Epoch of the unpaired text stream.
    pub unpaired_epoch: u64,
    /// Records consumed from the unpaired text stream's epoch.
    pub unpaired_consumed: u64,
    /// Good and bad samples so far.
    pub stats: BadStats,
}

/// The seeded shuffle buffer over a record stream, counting what it hands out.
struct Shuffled {
    it: RecordIter,
    buf: Vec<Record>,
    cap: usize,
    rng: ChaCha8Rng,
    done: bool,
    consumed: u64,
}

impl Shuffled {
    fn new(it: RecordIter, cap: usize, rng: ChaCha8Rng) -> Self {
        Self {
            it,
            buf: Vec::with_capacity(cap.min(1 << 16)),
            cap,
            rng,
            done: false,
            consumed: 0,
        }
    }

    fn next(&mut self) -> Option<Result<Record>> {
        if self.cap <= 1 {
            let r = self.it.next()?;
            self.consumed += 1;
            return Some(r);
        }
        while !self.done && self.buf.len() < self.cap {
            match self.it.next() {
                None => self.done = true,
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok(r)) => self.buf.push(r),
            }
        }
        if self.buf.is_empty() {
            return None;
        }
        let j = self.rng.random_range(0..self.buf.len());
        self.consumed += 1;
        Some(Ok(self.buf.swap_remove(j)))
    }
}

/// A parallel deterministic loader over a paired (or image-only) source, optionally mixed
/// with an unpaired text stream.
pub struct Loader {
    source: Arc<dyn Source>,
    tokenizer: Option<Arc<Tokenizer>>,
    unpaired: Option<Arc<dyn Source>>,
    cfg: LoaderConfig,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("source", &self.source.describe())
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Loader {
    /// A loader; `tokenizer` is required when the config has a text length.
    pub fn new(
        source: Arc<dyn Source>,
        tokenizer: Option<Arc<Tokenizer>>,
        cfg: LoaderConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        if cfg.text_len.is_some() && tokenizer.is_none() {
            return Err(Error::Config {
                field: "text_len",
                msg: "text is configured but no tokenizer was given".into(),
            });
        }
        if let Some(n) = source.len_hint() {
            // the most samples one rank can get in a pass
            let per_rank = n.div_ceil(cfg.world_size.max(1)) as u64;
            let need = if cfg.drop_last {
                cfg.batch_size as u64
            } else {
                1
            };
            if per_rank < need {
                return Err(Error::NotEnoughData {
                    data: source.describe(),
                    usable: per_rank,
                    batch_size: cfg.batch_size,
                    drop_last: cfg.drop_last,
                    bad: Box::default(),
                });
            }
        }
        Ok(Self {
            source,
            tokenizer,
            unpaired: None,
            cfg,
        })
    }

    /// Attaches an unpaired text stream (same batch size, length `unpaired_text_len`, endless:
    /// it starts a new epoch of its own when it runs out).
    pub fn with_unpaired_text(mut self, text: Arc<dyn Source>) -> Result<Self> {
        if self.tokenizer.is_none() {
            return Err(Error::Config {
                field: "unpaired",
                msg: "unpaired text needs a tokenizer".into(),
            });
        }
        self.unpaired = Some(text);
        Ok(self)
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Takes the masks out of this loader: its batches come without masks from now on, and the
    /// [`BatchMasks`] returned (its `masks`, drawn from its seed) draws them instead, e.g. for
    /// the global batch of several loaders ([`crate::streams::Streams`]).
    pub fn take_masks(&mut self) -> Option<BatchMasks> {
        let seed = self.cfg.seed;
        self.cfg.masks.take().map(|m| BatchMasks::new(m, seed))
    }

    /// Batches from `start` on (use `Position::default()` for a fresh run, or the `position`
    /// of the last batch consumed to resume). Work happens on a producer thread and a rayon
    /// pool of `num_threads`; at most `prefetch` batches wait in the queue.
    pub fn iter(&self, start: Position) -> BatchIter {
        let (tx, rx) = sync_channel(self.cfg.prefetch.max(1));
        let stats = Arc::new(Mutex::new(start.stats.clone()));
        let final_stats = stats.clone();
        let w = Worker {
            source: self.source.clone(),
            tokenizer: self.tokenizer.clone(),
            unpaired: self.unpaired.clone(),
            cfg: self.cfg.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("m3ae-loader".into())
            .spawn(move || {
                let res = w.run(start, &tx, &final_stats);
                if let Err(e) = res {
                    let _ = tx.send(Err(e));
                }
            });
        match spawned {
            Ok(_) => BatchIter {
                rx: Some(rx),
                stats,
            },
            Err(e) => {
                let (tx, rx) = sync_channel(1);
                let _ = tx.send(Err(Error::Loader(e.to_string())));
                BatchIter {
                    rx: Some(rx),
                    stats,
                }
            }
        }
    }
}

/// The batches of a [`Loader`]; dropping it stops the producer.
pub struct BatchIter {
    rx: Option<Receiver<Result<Batch>>>,
    stats: Arc<Mutex<BadStats>>,
}

impl BatchIter {
    /// Good and bad samples of the whole run (per reason, with the first examples), complete
    /// once the iterator has returned `None` after the last epoch. Unlike the `position.stats`
    /// of the last batch, it also counts the bad samples read after that batch. Before the end
    /// it holds the counts of the starting position.
    pub fn stats(&self) -> BadStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Iterator for BatchIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        let r = self.rx.as_ref()?.recv().ok()?;
        if r.is_err() {
            self.rx = None;
        }
        Some(r)
    }
}

struct Worker {
    source: Arc<dyn Source>,
    tokenizer: Option<Arc<Tokenizer>>,
    unpaired: Option<Arc<dyn Source>>,
    cfg: LoaderConfig,
}

/// What a worker hands back for a good sample; its image is already in the batch buffer.
struct Meta {
    key: String,
    text: Option<Tokenized>,
    label: Option<i64>,
}

enum Processed {
    Good(Meta),
    Bad(BadSample),
}

impl Worker {
    fn partition(&self, epoch: u64) -> Partition {
        Partition {
            rank: self.cfg.rank,
            world_size: self.cfg.world_size.max(1),
            worker: 0,
            num_workers: 1,
            seed: self.cfg.seed,
            epoch,
        }
    }

    fn open(&self, src: &dyn Source, epoch: u64, skip: u64, p: u64) -> Result<Shuffled> {
        let it = src.open(&self.partition(epoch))?;
        let rng = seed::rng(self.cfg.seed, p, epoch, self.cfg.rank as u64);
        let mut s = Shuffled::new(it, self.cfg.shuffle_buffer, rng);
        while s.consumed < skip {
            match s.next() {
                None => break,
                Some(r) => {
                    r?;
                }
            }
        }
        Ok(s)
    }

    /// Processes one record; a good sample's image is written, normalised and patchified, into
    /// `image_out` (its slot of the batch buffer).
    fn process(
        &self,
        rec: Record,
        epoch: u64,
        index: u64,
        image_out: Option<&mut [f32]>,
    ) -> Result<Processed> {
        let s: Sample = match rec {
            Record::Bad(b) => return Ok(Processed::Bad(b)),
            Record::Sample(s) => s,
        };
        let bad = |reason, detail: String| Ok(Processed::Bad(s.bad(reason, detail)));
        let text = match (self.cfg.text_len, &self.tokenizer) {
            (Some(len), Some(tok)) => match &s.text {
                None => {
                    return match &s.text_fault {
                        Some(f) => bad(f.reason, f.detail.clone()),
                        None => bad(BadReason::MissingCaption, "no caption".into()),
                    }
                }
                Some(t) if t.trim().is_empty() && self.cfg.skip_empty_text => {
                    return bad(BadReason::EmptyCaption, "empty caption".into())
                }
                Some(t) => Some(tok.encode(t, len)?),
            },
            _ => None,
        };
        if let (Some(ic), Some(out)) = (&self.cfg.image, image_out) {
            let Some(data) = &s.image else {
                return match &s.image_fault {
                    Some(f) => bad(f.reason, f.detail.clone()),
                    None => bad(BadReason::MissingImage, "no image".into()),
                };
            };
            let img = match RgbImage::from_data(data) {
                Ok(i) => i,
                Err(e) => return bad(BadReason::CorruptImage, e),
            };
            let key = index | ((self.cfg.rank as u64) << 40);
            let mut rng = seed::rng(self.cfg.seed, purpose::AUGMENT, epoch, key);
            ic.apply_into(&img, &mut rng, Layout::Patches(self.cfg.patch_size), out);
        }
        Ok(Processed::Good(Meta {
            key: s.key,
            text,
            label: s.label,
        }))
    }

    fn run(
        &self,
        start: Position,
        tx: &std::sync::mpsc::SyncSender<Result<Batch>>,
        final_stats: &Mutex<BadStats>,
    ) -> Result<()> {
        let threads = if self.cfg.num_threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.cfg.num_threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("m3ae-decode-{i}"))
            .build()
            .map_err(|e| Error::Loader(e.to_string()))?;
        let masks = self.cfg.masks.map(|m| BatchMasks::new(m, self.cfg.seed));
        let mut pos = start;
        let mut text_stream = match &self.unpaired {
            Some(src) => Some(self.open(
                src.as_ref(),
                pos.unpaired_epoch,
                pos.unpaired_consumed,
                purpose::TEXT_SHUFFLE,
            )?),
            None => None,
        };
        let bs = self.cfg.batch_size;
        let img_len = self.cfg.image.map(|i| i.size * i.size * 3).unwrap_or(0);
        loop {
            if self.cfg.epochs.is_some_and(|e| pos.epoch >= e) {
                if let Ok(mut s) = final_stats.lock() {
                    *s = pos.stats.clone();
                }
                return Ok(());
            }
            let mut stream = self.open(
                self.source.as_ref(),
                pos.epoch,
                pos.consumed,
                purpose::SHUFFLE,
            )?;
            // only a pass read from its start can show that the data gives no batch
            let whole_pass = pos.consumed == 0;
            let good_before = pos.stats.good;
            let mut batches = 0u64;
            let mut end = false;
            while !end {
                // The batch's image buffer, in the final `[B, N, P*P*3]` layout: each worker
                // writes its sample's slot once (zeroed pages, touched first by the workers).
                let mut images = batch_buffer(bs * img_len);
                let mut items: Vec<Meta> = Vec::with_capacity(bs);
                while items.len() < bs && !end {
                    let mut recs = Vec::with_capacity(bs - items.len());
                    while recs.len() < bs - items.len() {
                        match stream.next() {
                            None => {
                                end = true;
                                break;
                            }
                            Some(r) => recs.push((r?, pos.consumed)),
                        }
                        pos.consumed += 1;
                    }
                    let epoch = pos.epoch;
                    let filled = items.len();
                    let done: Vec<Result<Processed>> = pool.install(|| {
                        if img_len == 0 {
                            recs.into_par_iter()
                                .map(|(r, i)| self.process(r, epoch, i, None))
                                .collect()
                        } else {
                            images[filled * img_len..]
                                .par_chunks_mut(img_len)
                                .zip(recs.into_par_iter())
                                .map(|(out, (r, i))| self.process(r, epoch, i, Some(out)))
                                .collect()
                        }
                    });
                    for (j, p) in done.into_iter().enumerate() {
                        match p? {
                            Processed::Good(it) => {
                                // close the gaps that bad samples left (rare)
                                let (from, to) = (filled + j, items.len());
                                if from != to {
                                    images.copy_within(
                                        from * img_len..(from + 1) * img_len,
                                        to * img_len,
                                    );
                                }
                                pos.stats.good += 1;
                                items.push(it);
                            }
                            Processed::Bad(b) => {
                                pos.stats.record(b);
                                pos.stats
                                    .check(self.cfg.max_bad_fraction, self.cfg.bad_window)?;
                            }
                        }
                    }
                }
                if items.is_empty() || (items.len() < bs && self.cfg.drop_last) {
                    if end && whole_pass && batches == 0 {
                        return Err(Error::NotEnoughData {
                            data: self.source.describe(),
                            usable: pos.stats.good - good_before,
                            batch_size: bs,
                            drop_last: self.cfg.drop_last,
                            bad: Box::new(pos.stats.clone()),
                        });
                    }
                    continue;
                }
                batches += 1;
                let unpaired = match &mut text_stream {
                    None => None,
                    Some(ts) => Some(self.unpaired_batch(ts, &mut pos, &pool)?),
                };
                images.truncate(items.len() * img_len);
                let batch = self.assemble(items, images, unpaired, &masks, &mut pos)?;
                if tx.send(Ok(batch)).is_err() {
                    return Ok(());
                }
            }
            pos.epoch += 1;
            pos.consumed = 0;
        }
    }

    fn unpaired_batch(
        &self,
        ts: &mut Shuffled,
        pos: &mut Position,
        pool: &rayon::ThreadPool,
    ) -> Result<Vec<Tokenized>> {
        let tok = self.tokenizer.as_ref().ok_or(Error::Config {
            field: "unpaired",
            msg: "no tokenizer".into(),
        })?;
        let src = self.unpaired.as_ref().ok_or(Error::Config {
            field: "unpaired",
            msg: "no source".into(),
        })?;
        let len = self.cfg.unpaired_text_len;
        let mut out = Vec::with_capacity(self.cfg.batch_size);
        let mut empty_epochs = 0;
        while out.len() < self.cfg.batch_size {
            let mut texts = Vec::new();
            while texts.len() < self.cfg.batch_size - out.len() {
                match ts.next() {
                    Some(r) => {
                        pos.unpaired_consumed += 1;
                        match r? {
                            Record::Sample(Sample { text: Some(t), .. })
                                if !t.trim().is_empty() =>
                            {
                                texts.push(t)
                            }
                            Record::Sample(s) => pos.stats.record(match &s.text_fault {
                                Some(f) => s.bad(f.reason, f.detail.clone()),
                                None => s.bad(BadReason::EmptyCaption, "unpaired text is empty"),
                            }),
                            Record::Bad(b) => pos.stats.record(b),
                        }
                    }
                    None => {
                        if out.is_empty() && texts.is_empty() {
                            empty_epochs += 1;
                            if empty_epochs > 1 {
                                return Err(Error::Config {
                                    field: "unpaired",
                                    msg: format!("{} yields no text", src.describe()),
                                });
                            }
                        }
                        pos.unpaired_epoch += 1;
                        pos.unpaired_consumed = 0;
                        *ts =
                            self.open(src.as_ref(), pos.unpaired_epoch, 0, purpose::TEXT_SHUFFLE)?;
                    }
                }
            }
            let enc: Vec<Result<Tokenized>> =
                pool.install(|| texts.par_iter().map(|t| tok.encode(t, len)).collect());
            for e in enc {
                out.push(e?);
            }
        }
        Ok(out)
    }

    fn assemble(
        &self,
        items: Vec<Meta>,
        images: Vec<f32>,
        unpaired: Option<Vec<Tokenized>>,
        masks: &Option<BatchMasks>,
        pos: &mut Position,
    ) -> Result<Batch> {
        // batches are built on the host; the trainer or the model copies them to its device
        let dev = Device::Cpu;
        let b = items.len();
        let image_patches = match self.cfg.image {
            Some(ic) => {
                let p = self.cfg.patch_size;
                let g = ic.size / p;
                Some(Tensor::from_vec(images, (b, g * g, p * p * 3), &dev)?)
            }
            None => None,
        };
        let texts: Vec<Item> = items
            .iter()
            .map(|m| Item {
                key: m.key.clone(),
                image: None,
                text: m.text.clone(),
                label: m.label,
            })
            .collect();
        let mut input = collate(&texts, 0, self.cfg.patch_size)?;
        input.image_patches = image_patches;
        let step = pos.step;
        let unpaired = match unpaired {
            None => None,
            Some(texts) => {
                let n = texts.len();
                let t = self.cfg.unpaired_text_len;
                let ids: Vec<u32> = texts.iter().flat_map(|x| x.ids.iter().copied()).collect();
                let pad: Vec<f32> = texts
                    .iter()
                    .flat_map(|x| x.padding.iter().map(|&p| p as f32))
                    .collect();
                Some(TextBatch {
                    ids: Tensor::from_vec(ids, (n, t), &dev)?,
                    padding: Tensor::from_vec(pad, (n, t), &dev)?,
                    masking: None,
                })
            }
        };
        pos.step += 1;
        let mut batch = Batch {
            input,
            image_masking: None,
            text_masking: None,
            labels: items.iter().map(|i| i.label).collect(),
            keys: items.into_iter().map(|i| i.key).collect(),
            unpaired,
            step,
            epoch: pos.epoch,
            position: pos.clone(),
        };
        if let Some(m) = masks {
            m.attach(&mut batch, &BatchRows::whole())?;
        }
        Ok(batch)
    }
}
