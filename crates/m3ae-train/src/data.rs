//! The trainer's side of the data crate: the data streams of a run ([`Streams`]) as a
//! [`BatchSource`], and a loader's [`Batch`] as a [`TrainBatch`].

use crate::{BatchSource, Error, Result, TrainBatch};
use m3ae_data::{Batch, Streams};
use m3ae_model::ModelInput;
use serde_json::Value;

/// A data-loader batch as the trainer's batch (`text`: keep the captions, for M3AE; the
/// unpaired text, when there is one, is kept either way).
pub fn to_train_batch(b: Batch, text: bool) -> TrainBatch {
    let mut input = b.input;
    let text_masking = if text { b.text_masking } else { None };
    if !text {
        input.text_ids = None;
        input.text_padding = None;
    }
    TrainBatch {
        input,
        image_masking: b.image_masking,
        text_masking,
        unpaired: b.unpaired.and_then(|u| {
            let m = u.masking?;
            Some((
                ModelInput {
                    image_patches: None,
                    text_ids: Some(u.ids),
                    text_padding: Some(u.padding),
                },
                m,
            ))
        }),
        targets: None,
    }
}

/// This rank's share of every step's global batch; its position is this rank's streams'
/// ([`Streams::local_position`]), which rank 0 merges ([`Streams::merge`]) into a checkpoint's.
impl BatchSource for Streams {
    fn next_batch(&mut self) -> Result<TrainBatch> {
        let b = self
            .next_local()
            .map_err(|e| Error::State(format!("data: {e}")))?;
        Ok(to_train_batch(b, self.text()))
    }

    fn position(&self) -> Value {
        self.local_position()
    }

    fn restore(&mut self, position: &Value) -> Result<()> {
        self.restore_all(position)
            .map_err(|e| Error::State(e.to_string()))
    }

    fn merge_positions(&self, positions: &[Value]) -> Result<Value> {
        Streams::merge(positions).map_err(|e| Error::State(e.to_string()))
    }

    fn stats(&self) -> Option<Value> {
        serde_json::to_value(Streams::stats(self)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use m3ae_data::{CaptionedScenes, LoaderConfig, ScenesConfig};
    use std::sync::Arc;

    fn streams(text: bool) -> Streams {
        let scenes = CaptionedScenes::new(ScenesConfig {
            len: 32,
            image_size: 32,
            ..Default::default()
        })
        .unwrap();
        let tok = scenes.train_tokenizer(50, 100).unwrap();
        let mut lc = LoaderConfig::pretrain(4, 32, 8);
        lc.num_threads = 1;
        lc.text_len = Some(8);
        Streams::from_source(2, 0, 1, text, Arc::new(scenes), Some(Arc::new(tok)), &lc).unwrap()
    }

    #[test]
    fn streams_give_the_trainer_its_batches_with_or_without_captions() {
        let mut m3ae = streams(true);
        let b = m3ae.next_batch().unwrap();
        assert_eq!(b.input.text_ids.as_ref().unwrap().dims(), &[8, 8]);
        assert_eq!(b.image_masking.as_ref().unwrap().keep, 4);
        assert!(b.text_masking.is_some() && b.unpaired.is_none());
        let mut mae = streams(false);
        let b2 = mae.next_batch().unwrap();
        assert!(b2.input.text_ids.is_none() && b2.text_masking.is_none());
        // the same images and image masks either way
        let v = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (p1, p2) = (
            b.input.image_patches.unwrap(),
            b2.input.image_patches.unwrap(),
        );
        assert_eq!(v(&p1), v(&p2));
        assert_eq!(
            v(&b.image_masking.unwrap().mask),
            v(&b2.image_masking.unwrap().mask)
        );
        // positions: this rank's streams, restorable
        let pos = mae.position();
        assert_eq!(pos["streams"], 2);
        let merged = Streams::merge(&[pos]).unwrap();
        m3ae.restore(&merged).unwrap();
        let e = m3ae.restore(&serde_json::json!({"streams": 3, "positions": []}));
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("distributed.streams = 3"));
    }
}
