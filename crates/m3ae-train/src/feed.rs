//! Batches copied to the device ahead of the step: [`DeviceFeed`] wraps any [`BatchSource`]
//! whose batches are built on the host (the loader's) and keeps up to `depth` batches already
//! on the training device, prepared by a worker thread while the current step computes.
//!
//! The wrapped source runs on the worker; the feed reports the position and the bad-sample
//! counts that go with the last batch it handed out (not with the batches prepared ahead), so
//! checkpoints and resume are exactly those of the source alone. On the CPU there is nothing to
//! copy and the pre-training job does not use it; it works there all the same (that is how it
//! is tested).
//!
//! ```
//! use m3ae_train::feed::DeviceFeed;
//! use m3ae_train::{BatchSource, Result, TrainBatch};
//! # use candle_core::{Device, Tensor};
//! # use m3ae_model::ModelInput;
//! /// Batches of one value each, counting up.
//! struct Count(u32);
//! impl BatchSource for Count {
//!     fn next_batch(&mut self) -> Result<TrainBatch> {
//!         self.0 += 1;
//!         let x = Tensor::new(&[self.0 as f32], &Device::Cpu)?;
//!         Ok(TrainBatch { input: ModelInput { image_patches: Some(x), ..Default::default() },
//!             image_masking: None, text_masking: None, unpaired: None, targets: None })
//!     }
//!     fn position(&self) -> serde_json::Value { self.0.into() }
//!     fn restore(&mut self, p: &serde_json::Value) -> Result<()> {
//!         self.0 = p.as_u64().unwrap() as u32;
//!         Ok(())
//!     }
//! }
//! let mut feed = DeviceFeed::new(Count(0), &Device::Cpu, 2)?;
//! let first = feed.next_batch()?.input.image_patches.unwrap().to_vec1::<f32>()?;
//! assert_eq!(first, vec![1.0]);
//! // the position is the first batch's, although more are prepared already
//! assert_eq!(feed.position(), serde_json::json!(1));
//! feed.restore(&serde_json::json!(10))?;
//! let next = feed.next_batch()?.input.image_patches.unwrap().to_vec1::<f32>()?;
//! assert_eq!(next, vec![11.0]);
//! assert_eq!(feed.into_inner()?.0 >= 11, true);
//! # Ok::<(), m3ae_train::Error>(())
//! ```

use crate::{BatchSource, Error, Result, TrainBatch};
use candle_core::Device;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// A batch on the device with the source's position and counts after it.
type Prepared = Result<(TrainBatch, Value, Option<Value>)>;

/// A [`BatchSource`] whose batches arrive already on `device` (see the [module docs](self)).
pub struct DeviceFeed<S: BatchSource + Send + 'static> {
    source: Arc<Mutex<S>>,
    device: Device,
    depth: usize,
    stop: Arc<AtomicBool>,
    rx: Option<Receiver<Prepared>>,
    worker: Option<JoinHandle<()>>,
    position: Value,
    stats: Option<Value>,
}

impl<S: BatchSource + Send + 'static> DeviceFeed<S> {
    /// Starts preparing batches of `source` on `device`, up to `depth` (at least 1) ahead of
    /// the one being used.
    pub fn new(source: S, device: &Device, depth: usize) -> Result<Self> {
        let position = source.position();
        let stats = source.stats();
        let mut feed = Self {
            source: Arc::new(Mutex::new(source)),
            device: device.clone(),
            depth: depth.max(1),
            stop: Arc::new(AtomicBool::new(false)),
            rx: None,
            worker: None,
            position,
            stats,
        };
        feed.start()?;
        Ok(feed)
    }

    /// The device batches are copied to.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Stops the worker and returns the wrapped source. It stands after the batches prepared
    /// ahead, not after the last one handed out: [`BatchSource::position`] of the feed is the
    /// position to save.
    pub fn into_inner(mut self) -> Result<S> {
        self.halt();
        let source = self.source.clone();
        drop(self);
        let mutex = Arc::try_unwrap(source)
            .map_err(|_| Error::State("the batch feed's worker still holds the source".into()))?;
        Ok(mutex.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    fn lock(&self) -> MutexGuard<'_, S> {
        // a panic on the worker poisons the lock; the source itself is still usable
        self.source.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(&mut self) -> Result<()> {
        let (tx, rx) = sync_channel::<Prepared>(self.depth);
        let source = self.source.clone();
        let device = self.device.clone();
        let stop = Arc::new(AtomicBool::new(false));
        self.stop = stop.clone();
        let worker = std::thread::Builder::new()
            .name("m3ae-device-feed".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let prepared = {
                        let mut s = source.lock().unwrap_or_else(|p| p.into_inner());
                        s.next_batch().map(|b| (b, s.position(), s.stats()))
                    };
                    // the copy runs outside the lock and while the trainer computes
                    let prepared =
                        prepared.and_then(|(b, p, st)| Ok((b.to_device(&device)?, p, st)));
                    let failed = prepared.is_err();
                    if tx.send(prepared).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| Error::State(format!("starting the batch feed's thread: {e}")))?;
        self.rx = Some(rx);
        self.worker = Some(worker);
        Ok(())
    }

    /// Stops the worker and discards the batches prepared ahead.
    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // dropping the receiver ends a worker blocked on a full channel
        self.rx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl<S: BatchSource + Send + 'static> Drop for DeviceFeed<S> {
    fn drop(&mut self) {
        self.halt();
    }
}

impl<S: BatchSource + Send + 'static> BatchSource for DeviceFeed<S> {
    fn next_batch(&mut self) -> Result<TrainBatch> {
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| Error::State("the batch feed has stopped".into()))?;
        let (batch, position, stats) = rx
            .recv()
            .map_err(|_| Error::State("the batch feed's thread ended".into()))??;
        self.position = position;
        self.stats = stats;
        Ok(batch)
    }

    fn position(&self) -> Value {
        self.position.clone()
    }

    fn restore(&mut self, position: &Value) -> Result<()> {
        self.halt();
        let (p, st) = {
            let mut s = self.lock();
            s.restore(position)?;
            (s.position(), s.stats())
        };
        self.position = p;
        self.stats = st;
        self.start()
    }

    fn merge_positions(&self, positions: &[Value]) -> Result<Value> {
        self.lock().merge_positions(positions)
    }

    fn stats(&self) -> Option<Value> {
        self.stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use m3ae_model::ModelInput;

    /// Counts batches; fails at `fail_at`.
    struct Count {
        n: u32,
        fail_at: Option<u32>,
    }

    impl BatchSource for Count {
        fn next_batch(&mut self) -> Result<TrainBatch> {
            self.n += 1;
            if Some(self.n) == self.fail_at {
                return Err(Error::State(format!("bad batch {}", self.n)));
            }
            Ok(TrainBatch {
                input: ModelInput {
                    image_patches: Some(Tensor::new(&[self.n as f32], &Device::Cpu)?),
                    ..Default::default()
                },
                image_masking: None,
                text_masking: None,
                unpaired: None,
                targets: None,
            })
        }
        fn position(&self) -> Value {
            self.n.into()
        }
        fn restore(&mut self, p: &Value) -> Result<()> {
            self.n = p.as_u64().unwrap_or(0) as u32;
            Ok(())
        }
        fn stats(&self) -> Option<Value> {
            Some(serde_json::json!({ "seen": self.n }))
        }
    }

    fn value(b: &TrainBatch) -> f32 {
        b.input
            .image_patches
            .as_ref()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    }

    #[test]
    fn batches_positions_and_stats_are_those_of_the_source_alone() -> Result<()> {
        for depth in [1, 3] {
            let mut feed = DeviceFeed::new(
                Count {
                    n: 0,
                    fail_at: None,
                },
                &Device::Cpu,
                depth,
            )?;
            assert_eq!(feed.position(), serde_json::json!(0));
            for i in 1..=5u32 {
                assert_eq!(value(&feed.next_batch()?), i as f32);
                assert_eq!(feed.position(), serde_json::json!(i));
                assert_eq!(feed.stats(), Some(serde_json::json!({ "seen": i })));
            }
            // restore discards what was prepared ahead
            feed.restore(&serde_json::json!(2))?;
            assert_eq!(feed.position(), serde_json::json!(2));
            assert_eq!(value(&feed.next_batch()?), 3.0);
            let inner = feed.into_inner()?;
            assert!(inner.n >= 3);
        }
        Ok(())
    }

    #[test]
    fn a_source_error_reaches_the_trainer_in_order() -> Result<()> {
        let mut feed = DeviceFeed::new(
            Count {
                n: 0,
                fail_at: Some(3),
            },
            &Device::Cpu,
            2,
        )?;
        assert_eq!(value(&feed.next_batch()?), 1.0);
        assert_eq!(value(&feed.next_batch()?), 2.0);
        let e = feed.next_batch().unwrap_err().to_string();
        assert!(e.contains("bad batch 3"), "{e}");
        let e = feed.next_batch().unwrap_err().to_string();
        assert!(e.contains("ended"), "{e}");
        // a restore starts it again
        feed.restore(&serde_json::json!(5))?;
        assert_eq!(value(&feed.next_batch()?), 6.0);
        Ok(())
    }
}
