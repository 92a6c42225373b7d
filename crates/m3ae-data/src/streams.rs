//! The training data of a pre-training run as `S` independent streams, for one process or a
//! data-parallel job.
//!
//! The global batch of a step is the concatenation, in stream order, of the next `B / S` samples
//! of every stream; stream `s` is partition `s` of `S` of the source (its own shards or samples,
//! its own shuffle and augmentation seeds). Rank `r` of `W` reads the streams `s` with
//! `s % W == r`. The masks are drawn for the global batch from (seed, step) and each rank keeps
//! its rows ([`BatchMasks`]): with batch-shared noise (official) every rank uses the same noise
//! vector, exactly as one process holding the whole global batch would.
//!
//! So with `S` fixed, the run does not depend on the number of processes: 1, 2 or any `W`
//! dividing `S` see the same samples with the same augmentations and masks at every step, and a
//! checkpoint (whose data position holds every stream's position) resumes under any such `W`.
//! (The training crate makes [`Streams`] a batch source of its trainer.)

use crate::loader::{BatchIter, TextBatch};
use crate::masks::{BatchMasks, BatchRows};
use crate::{BadStats, Batch, Error, Loader, LoaderConfig, Position, Result, Source, Tokenizer};
use candle_core::Tensor;
use m3ae_model::ModelInput;
use serde_json::{json, Value};
use std::sync::Arc;

fn fail(msg: impl Into<String>) -> Error {
    Error::Streams(msg.into())
}

/// One stream read by this process.
struct Part {
    index: usize,
    loader: Loader,
    iter: Option<BatchIter>,
    position: Position,
}

/// The streams of one rank: its share of every step's global batch.
pub struct Streams {
    parts: Vec<Part>,
    total: usize,
    rows: BatchRows,
    masks: Option<BatchMasks>,
    text: bool,
}

/// The streams rank `rank` of `world` reads when the data is split into `total` streams.
///
/// ```
/// assert_eq!(m3ae_data::streams::streams_of(1, 2, 4), vec![1, 3]);
/// assert_eq!(m3ae_data::streams::streams_of(0, 1, 2), vec![0, 1]);
/// ```
pub fn streams_of(rank: usize, world: usize, total: usize) -> Vec<usize> {
    (0..total).filter(|s| s % world == rank).collect()
}

impl Streams {
    /// Opens this rank's streams; `make(s)` builds the loader of stream `s` (partition `s` of
    /// `total`, with `B / S` samples per batch). The loaders' masks (the same for every stream:
    /// one configuration and seed) are taken out of them ([`Loader::take_masks`]) and drawn
    /// here for the global batch. `text`: keep the captions in the batches (M3AE); without, they
    /// are still read, so the samples and the bad-sample counts do not depend on it, but left
    /// out of the batches (MAE).
    pub fn new(
        total: usize,
        rank: usize,
        world: usize,
        text: bool,
        mut make: impl FnMut(usize) -> Result<Loader>,
    ) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(fail(format!("rank {rank} of world size {world}")));
        }
        if total < world || !total.is_multiple_of(world) {
            return Err(fail(format!(
                "distributed.streams = {total} cannot be shared by {world} ranks: it must be a multiple of the world size"
            )));
        }
        let mut masks = None;
        let mut parts = Vec::new();
        for index in streams_of(rank, world, total) {
            let mut loader = make(index)?;
            let m = loader.take_masks();
            if parts.is_empty() {
                masks = m;
            } else if m != masks {
                return Err(fail(format!(
                    "the loaders of data streams {} and {index} draw different masks",
                    streams_of(rank, world, total)[0]
                )));
            }
            parts.push(Part {
                index,
                loader,
                iter: None,
                position: Position::default(),
            });
        }
        let rows = BatchRows::new(parts.iter().map(|p| p.index).collect(), total)?;
        Ok(Self {
            parts,
            total,
            rows,
            masks,
            text,
        })
    }

    /// Opens this rank's streams over one source: stream `s` is a [`Loader`] of `source` with
    /// `lc` as partition `s` of `total` (`rank: s, world_size: total`; `lc.batch_size` is the
    /// stream's `B / S`). See [`Streams::new`] for the rest; build the loaders there to change
    /// more than the partition (an unpaired text stream, say).
    ///
    /// ```
    /// use m3ae_data::{CaptionedScenes, LoaderConfig, ScenesConfig, Streams};
    /// let scenes = CaptionedScenes::new(ScenesConfig { len: 16, image_size: 32, ..Default::default() })?;
    /// let mut lc = LoaderConfig::pretrain(2, 32, 16); // 2 of a global batch of 4 per stream
    /// lc.text_len = None;
    /// // rank 1 of 2 reads stream 1 of 2
    /// let mut streams = Streams::from_source(2, 1, 2, false, std::sync::Arc::new(scenes), None, &lc)?;
    /// assert_eq!(streams.loader().config().world_size, 2);
    /// assert_eq!(streams.next_local()?.keys.len(), 2);
    /// # Ok::<(), m3ae_data::Error>(())
    /// ```
    pub fn from_source(
        total: usize,
        rank: usize,
        world: usize,
        text: bool,
        source: Arc<dyn Source>,
        tokenizer: Option<Arc<Tokenizer>>,
        lc: &LoaderConfig,
    ) -> Result<Self> {
        Self::new(total, rank, world, text, |s| {
            let stream = LoaderConfig {
                rank: s,
                world_size: total,
                ..lc.clone()
            };
            Loader::new(source.clone(), tokenizer.clone(), stream)
        })
    }

    /// The loader of this rank's first stream (its configuration is every stream's, masks
    /// aside).
    pub fn loader(&self) -> &Loader {
        &self.parts[0].loader
    }

    /// The masks drawn for the global batch (`None`: the batches have none).
    pub fn masks(&self) -> Option<&BatchMasks> {
        self.masks.as_ref()
    }

    /// Whether the batches keep their captions.
    pub fn text(&self) -> bool {
        self.text
    }

    /// Good and bad samples of this rank's streams so far.
    pub fn stats(&self) -> BadStats {
        let mut s = BadStats::default();
        for p in &self.parts {
            s.merge(&p.position.stats);
        }
        s
    }

    /// The positions of this rank's streams: `{"streams": S, "positions": {"<s>": position}}`
    /// (what [`Streams::merge`] takes from every rank).
    pub fn local_position(&self) -> Value {
        let positions: serde_json::Map<String, Value> = self
            .parts
            .iter()
            .map(|p| {
                (
                    p.index.to_string(),
                    serde_json::to_value(&p.position).unwrap_or(Value::Null),
                )
            })
            .collect();
        json!({ "streams": self.total, "positions": positions })
    }

    /// Merges the local positions of every rank (as gathered at rank 0) into the position a
    /// checkpoint stores: `{"streams": S, "positions": [p_0, ..., p_{S-1}]}`.
    pub fn merge(locals: &[Value]) -> Result<Value> {
        let mut total = None;
        let mut all: Vec<Option<Value>> = Vec::new();
        for (rank, v) in locals.iter().enumerate() {
            let s = v["streams"]
                .as_u64()
                .ok_or_else(|| fail(format!("data position of rank {rank} has no stream count")))?
                as usize;
            if *total.get_or_insert(s) != s {
                return Err(fail(format!(
                    "ranks disagree on the number of data streams ({s} at rank {rank})"
                )));
            }
            all.resize(s, None);
            let map = v["positions"]
                .as_object()
                .ok_or_else(|| fail(format!("data position of rank {rank} has no positions")))?;
            for (k, p) in map {
                let i: usize = k.parse().map_err(|e| fail(format!("stream index: {e}")))?;
                if i >= s {
                    return Err(fail(format!("stream {i} of {s} at rank {rank}")));
                }
                if all[i].is_some() {
                    return Err(fail(format!("stream {i} is read by two ranks")));
                }
                all[i] = Some(p.clone());
            }
        }
        let positions: Vec<Value> = all
            .into_iter()
            .enumerate()
            .map(|(i, p)| p.ok_or_else(|| fail(format!("no rank reported stream {i}"))))
            .collect::<Result<_>>()?;
        Ok(json!({ "streams": total.unwrap_or(0), "positions": positions }))
    }

    /// Moves every stream of this rank to the position a checkpoint stored (see [`merge`]);
    /// `null` starts every stream afresh, and a single position object is a one-stream
    /// checkpoint's, or (when it has consumed nothing) the start position of every stream, as a
    /// checkpoint converted from an official run stores it.
    ///
    /// [`merge`]: Streams::merge
    pub fn restore_all(&mut self, v: &Value) -> Result<()> {
        let positions: Vec<Value> = match v {
            Value::Null => vec![Value::Null; self.total],
            Value::Object(o) if o.contains_key("positions") => {
                let s = v["streams"].as_u64().unwrap_or(0) as usize;
                if s != self.total {
                    return Err(fail(format!(
                        "the checkpoint's data position is for {s} data streams but this run reads {} \
                         (distributed.streams = 0 means one per rank): set distributed.streams = {s} \
                         and use a number of ranks that divides it",
                        self.total
                    )));
                }
                v["positions"]
                    .as_array()
                    .ok_or_else(|| fail("data position: `positions` is not a list"))?
                    .clone()
            }
            _ => {
                // one position: a one-stream checkpoint, or one converted from an official run
                // (fresh data at the official step, so the mask noise follows the step)
                let p: Position = serde_json::from_value(v.clone())
                    .map_err(|e| fail(format!("the checkpoint's data position: {e}")))?;
                if self.total != 1 && (p.consumed > 0 || p.epoch > 0) {
                    return Err(fail(format!(
                        "the checkpoint holds one data stream's position but this run reads {}: set distributed.streams = 1",
                        self.total
                    )));
                }
                vec![v.clone(); self.total]
            }
        };
        for p in &mut self.parts {
            let pv = positions
                .get(p.index)
                .ok_or_else(|| fail(format!("data position: no stream {}", p.index)))?;
            p.position = if pv.is_null() {
                Position::default()
            } else {
                serde_json::from_value(pv.clone())
                    .map_err(|e| fail(format!("data position of stream {}: {e}", p.index)))?
            };
            p.iter = None;
        }
        Ok(())
    }

    /// The next local batch: one batch of every stream, concatenated, with the global masks.
    pub fn next_local(&mut self) -> Result<Batch> {
        let mut batches = Vec::with_capacity(self.parts.len());
        for p in &mut self.parts {
            if p.iter.is_none() {
                p.iter = Some(p.loader.iter(p.position.clone()));
            }
            let it = p.iter.as_mut().expect("iterator set above");
            let b = it
                .next()
                .ok_or_else(|| fail(format!("data stream {} ended", p.index)))?
                .map_err(|e| Error::Stream {
                    index: p.index,
                    source: Box::new(e),
                })?;
            p.position = b.position.clone();
            batches.push(b);
        }
        let mut b = concat(batches)?;
        if !self.text {
            b.input.text_ids = None;
            b.input.text_padding = None;
        }
        if let Some(m) = &self.masks {
            m.attach(&mut b, &self.rows)?;
        }
        Ok(b)
    }
}

/// Concatenates the batches of several streams (same step, same fields, no masks).
fn concat(mut batches: Vec<Batch>) -> Result<Batch> {
    if batches.len() == 1 {
        return Ok(batches.pop().expect("one batch"));
    }
    let first = &batches[0];
    let n = first.keys.len();
    for b in &batches {
        if b.step != first.step || b.keys.len() != n {
            return Err(fail(format!(
                "data streams out of step: step {} with {} samples vs step {} with {n}",
                b.step,
                b.keys.len(),
                first.step
            )));
        }
    }
    let cat = |f: &dyn Fn(&Batch) -> Option<&Tensor>| -> Result<Option<Tensor>> {
        let parts: Option<Vec<&Tensor>> = batches.iter().map(f).collect();
        Ok(match parts {
            Some(p) => Some(Tensor::cat(&p, 0)?),
            None => None,
        })
    };
    let input = ModelInput {
        image_patches: cat(&|b| b.input.image_patches.as_ref())?,
        text_ids: cat(&|b| b.input.text_ids.as_ref())?,
        text_padding: cat(&|b| b.input.text_padding.as_ref())?,
    };
    let unpaired = match (
        cat(&|b| b.unpaired.as_ref().map(|u| &u.ids))?,
        cat(&|b| b.unpaired.as_ref().map(|u| &u.padding))?,
    ) {
        (Some(ids), Some(padding)) => Some(TextBatch {
            ids,
            padding,
            masking: None,
        }),
        _ => None,
    };
    let mut out = batches.swap_remove(0);
    for b in &batches {
        out.keys.extend(b.keys.iter().cloned());
        out.labels.extend(b.labels.iter().copied());
    }
    out.input = input;
    out.unpaired = unpaired;
    out.image_masking = None;
    out.text_masking = None;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CaptionedScenes, MaskConfig, NoiseKind, ScenesConfig};
    use m3ae_model::Masking;

    /// Streams of `total` over 32-px scenes for rank `rank` of `world`, global batch 8.
    fn streams(total: usize, rank: usize, world: usize, noise: NoiseKind) -> Streams {
        let scenes = CaptionedScenes::new(ScenesConfig {
            len: 200,
            image_size: 32,
            ..Default::default()
        })
        .unwrap();
        let tok = Arc::new(scenes.train_tokenizer(200, 200).unwrap());
        let mut lc = LoaderConfig::pretrain(8 / total, 32, 8);
        lc.seed = 5;
        lc.num_threads = 1;
        lc.text_len = Some(16);
        lc.shuffle_buffer = 16;
        let masks = MaskConfig {
            noise,
            ..MaskConfig::default()
        };
        lc.masks = Some(masks);
        Streams::from_source(total, rank, world, true, Arc::new(scenes), Some(tok), &lc).unwrap()
    }

    fn rows(t: &Option<Tensor>) -> Vec<Vec<f32>> {
        t.as_ref()
            .unwrap()
            .flatten_from(1)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec2()
            .unwrap()
    }

    fn mask_rows(m: &Option<Masking>) -> Vec<Vec<f32>> {
        m.as_ref().unwrap().mask.to_vec2().unwrap()
    }

    #[test]
    fn two_ranks_read_exactly_the_global_batch_of_one_process() {
        for noise in [NoiseKind::Shared, NoiseKind::PerSample] {
            let mut one = streams(2, 0, 1, noise);
            let mut r0 = streams(2, 0, 2, noise);
            let mut r1 = streams(2, 1, 2, noise);
            for _ in 0..3 {
                let g = one.next_local().unwrap();
                let (a, b) = (r0.next_local().unwrap(), r1.next_local().unwrap());
                assert_eq!(g.keys.len(), 8);
                let keys: Vec<String> = a.keys.iter().chain(&b.keys).cloned().collect();
                assert_eq!(g.keys, keys);
                let cat = |f: &dyn Fn(&Batch) -> Vec<Vec<f32>>| {
                    let mut v = f(&a);
                    v.extend(f(&b));
                    v
                };
                assert_eq!(
                    rows(&g.input.image_patches),
                    cat(&|x| rows(&x.input.image_patches))
                );
                assert_eq!(rows(&g.input.text_ids), cat(&|x| rows(&x.input.text_ids)));
                assert_eq!(
                    mask_rows(&g.image_masking),
                    cat(&|x| mask_rows(&x.image_masking))
                );
                assert_eq!(
                    mask_rows(&g.text_masking),
                    cat(&|x| mask_rows(&x.text_masking))
                );
                let m = mask_rows(&g.image_masking);
                match noise {
                    NoiseKind::Shared => assert!(m.iter().all(|r| *r == m[0])),
                    NoiseKind::PerSample => assert_ne!(m[0], m[4]),
                }
            }
            // the positions merge into the single process's
            let merged = Streams::merge(&[r0.local_position(), r1.local_position()]).unwrap();
            let single = Streams::merge(&[one.local_position()]).unwrap();
            assert_eq!(merged, single);
            // and the two ranks' streams read disjoint samples
            assert_eq!(single["positions"].as_array().unwrap().len(), 2);
        }
    }

    #[test]
    fn a_checkpoint_resumes_under_any_world_size_dividing_its_streams() {
        let mut one = streams(2, 0, 1, NoiseKind::Shared);
        one.next_local().unwrap();
        let saved = Streams::merge(&[one.local_position()]).unwrap();
        let next = one.next_local().unwrap();
        let mut r1 = streams(2, 1, 2, NoiseKind::Shared);
        r1.restore_all(&saved).unwrap();
        assert_eq!(r1.next_local().unwrap().keys, next.keys[4..].to_vec());
        // a different stream count is refused, naming both and the setting
        let mut four = streams(4, 0, 1, NoiseKind::Shared);
        let err = four.restore_all(&saved).unwrap_err().to_string();
        assert!(
            err.contains("2 data streams")
                && err.contains("reads 4")
                && err.contains("distributed.streams = 2"),
            "{err}"
        );
        // a checkpoint without a data position (converted from an official run) starts afresh
        four.restore_all(&Value::Null).unwrap();
    }

    #[test]
    fn merging_rejects_overlaps_gaps_and_disagreements() {
        let p = |s: usize, idx: &[usize]| {
            let m: serde_json::Map<String, Value> =
                idx.iter().map(|i| (i.to_string(), json!({}))).collect();
            json!({"streams": s, "positions": m})
        };
        assert!(Streams::merge(&[p(2, &[0]), p(2, &[1])]).is_ok());
        let e = |v: &[Value]| Streams::merge(v).unwrap_err().to_string();
        assert!(e(&[p(2, &[0]), p(2, &[0])]).contains("read by two ranks"));
        assert!(e(&[p(2, &[0])]).contains("no rank reported stream 1"));
        assert!(e(&[p(2, &[0]), p(4, &[1])]).contains("disagree"));
        assert!(Streams::new(3, 0, 2, true, |_| unreachable!())
            .err()
            .unwrap()
            .to_string()
            .contains("multiple of the world size"));
    }
}
