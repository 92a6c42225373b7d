//! Data-parallel ranks as threads of one process ([`ThreadSync`]): the MPI path's semantics
//! (every rank trains its share of the global batch, gradients are averaged before clipping)
//! without MPI, over shared memory.
//!
//! Why: a small model does not keep two cores busy through one step, because its GEMMs are too
//! small to split well and the work between them is serial. Two single-threaded ranks, each
//! running the whole step on half of the batch, keep both busy. The ranks meet at a barrier in
//! every collective; a rank that returns (an error, a panic) or does not arrive within the
//! timeout makes the others' next collective fail with a message naming it, so no rank waits
//! forever.
//!
//! Gradients are summed in rank order, each rank summing one slice of the flat buffer, so every
//! rank gets the same bits and a run is deterministic.

use super::{flatten, unflatten, GradSync};
use crate::optim::NamedGrads;
use crate::{Error, Result};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// One rank of a group of threads that train together (see the module docs).
///
/// ```
/// use m3ae_train::sync::{threads::ThreadSync, GradSync};
/// let ranks = ThreadSync::group(2);
/// let sums: Vec<f64> = std::thread::scope(|s| {
///     let hs: Vec<_> = ranks
///         .into_iter()
///         .map(|mut r| {
///             s.spawn(move || {
///                 let mut v = [r.rank() as f64 + 1.0];
///                 r.all_reduce_sum(&mut v).unwrap();
///                 v[0]
///             })
///         })
///         .collect();
///     hs.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert_eq!(sums, [3.0, 3.0]);
/// ```
pub struct ThreadSync {
    rank: usize,
    shared: Arc<Shared>,
    timeout: Duration,
    buf: Vec<f32>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
    /// Each rank's flat gradients.
    grads: Vec<RwLock<Vec<f32>>>,
    /// The summed gradients, slice `r` written by rank `r`.
    sums: Vec<RwLock<Vec<f32>>>,
    /// Each rank's scalars (all_reduce_sum) or bytes (gather).
    scalars: Vec<Mutex<Vec<f64>>>,
    bytes: Vec<Mutex<Vec<u8>>>,
}

struct State {
    arrived: usize,
    generation: u64,
    /// The first rank whose handle was dropped (it returned, failed or panicked).
    gone: Option<usize>,
}

impl ThreadSync {
    /// The `world` ranks of a new group, rank `r` at index `r`; move each into its own thread.
    /// Collectives time out after 600 s ([`ThreadSync::with_timeout`]).
    ///
    /// # Panics
    /// If `world` is 0.
    pub fn group(world: usize) -> Vec<ThreadSync> {
        assert!(world > 0, "a group of threads needs at least one rank");
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                arrived: 0,
                generation: 0,
                gone: None,
            }),
            cv: Condvar::new(),
            grads: (0..world).map(|_| RwLock::new(Vec::new())).collect(),
            sums: (0..world).map(|_| RwLock::new(Vec::new())).collect(),
            scalars: (0..world).map(|_| Mutex::new(Vec::new())).collect(),
            bytes: (0..world).map(|_| Mutex::new(Vec::new())).collect(),
        });
        (0..world)
            .map(|rank| ThreadSync {
                rank,
                shared: shared.clone(),
                timeout: Duration::from_secs(600),
                buf: Vec::new(),
            })
            .collect()
    }

    /// Sets the longest wait in one collective (another rank being slower by this much fails
    /// the collective).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // a rank that panicked while holding the lock leaves the state consistent (every update
        // under it is a single field write), so poisoning is ignored
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every rank has arrived; `what` names the collective in errors.
    fn barrier(&self, what: &str) -> Result<()> {
        let world = self.shared.world;
        let mut st = self.lock_state();
        if let Some(r) = st.gone {
            return Err(self.gone_error(r, what));
        }
        st.arrived += 1;
        if st.arrived == world {
            st.arrived = 0;
            st.generation = st.generation.wrapping_add(1);
            self.shared.cv.notify_all();
            return Ok(());
        }
        let gen = st.generation;
        let start = Instant::now();
        loop {
            let left = self.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                // leave the group: the ranks still to come fail instead of waiting for us
                st.gone.get_or_insert(self.rank);
                self.shared.cv.notify_all();
                return Err(Error::State(format!(
                    "rank {} of {world} (threads): the other ranks did not reach the {what} \
                     within {:.1} s (failed or hanging)",
                    self.rank,
                    self.timeout.as_secs_f64()
                )));
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            // the generation first: a rank that passed this barrier and then left must not
            // fail the ones it released
            if st.generation != gen {
                return Ok(());
            }
            if let Some(r) = st.gone {
                return Err(self.gone_error(r, what));
            }
        }
    }

    fn gone_error(&self, gone: usize, what: &str) -> Error {
        Error::PeerStopped {
            rank: self.rank,
            world: self.shared.world,
            gone,
            what: what.to_string(),
        }
    }
}

impl Drop for ThreadSync {
    fn drop(&mut self) {
        let mut st = self.lock_state();
        st.gone.get_or_insert(self.rank);
        self.shared.cv.notify_all();
    }
}

/// The slice of a flat buffer of `n` values that rank `r` of `world` sums.
fn slice_of(n: usize, r: usize, world: usize) -> std::ops::Range<usize> {
    (n * r / world)..(n * (r + 1) / world)
}

impl GradSync for ThreadSync {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_mean(&mut self, grads: &mut NamedGrads) -> Result<()> {
        let world = self.shared.world;
        if world == 1 {
            return Ok(());
        }
        flatten(grads, &mut self.buf)?;
        let n = self.buf.len();
        std::mem::swap(
            &mut *self.shared.grads[self.rank]
                .write()
                .unwrap_or_else(|e| e.into_inner()),
            &mut self.buf,
        );
        self.barrier("gradient all-reduce")?;
        let lens: Vec<usize> = (0..world)
            .map(|r| self.shared.grads[r].read().map(|g| g.len()).unwrap_or(0))
            .collect();
        if let Some(r) = lens.iter().position(|&l| l != n) {
            // every rank sees the same lengths, so every rank fails here together
            return Err(Error::State(format!(
                "rank {} of {world} (threads): rank {r} sent {} gradient values, this rank {n} \
                 (a different model or configuration)",
                self.rank, lens[r]
            )));
        }
        {
            let part = slice_of(n, self.rank, world);
            let mut sum = self.shared.sums[self.rank]
                .write()
                .unwrap_or_else(|e| e.into_inner());
            sum.clear();
            sum.resize(part.len(), 0.0);
            // rank order, the same on every rank and run
            for r in 0..world {
                let g = self.shared.grads[r]
                    .read()
                    .unwrap_or_else(|e| e.into_inner());
                for (s, v) in sum.iter_mut().zip(&g[part.clone()]) {
                    *s += v;
                }
            }
        }
        self.barrier("gradient all-reduce")?;
        self.buf.clear();
        for r in 0..world {
            let s = self.shared.sums[r]
                .read()
                .unwrap_or_else(|e| e.into_inner());
            self.buf.extend_from_slice(&s);
        }
        unflatten(grads, &self.buf, 1.0 / world as f32)
    }

    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<()> {
        let world = self.shared.world;
        if world == 1 {
            return Ok(());
        }
        *self.shared.scalars[self.rank]
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = values.to_vec();
        self.barrier("scalar all-reduce")?;
        let mut out = vec![0f64; values.len()];
        for r in 0..world {
            let v = self.shared.scalars[r]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if v.len() != out.len() {
                return Err(Error::State(format!(
                    "rank {} of {world} (threads): rank {r} sent {} scalars, this rank {}",
                    self.rank,
                    v.len(),
                    out.len()
                )));
            }
            for (o, x) in out.iter_mut().zip(v.iter()) {
                *o += x;
            }
        }
        // nobody may overwrite its slot before every rank has read them all
        self.barrier("scalar all-reduce")?;
        values.copy_from_slice(&out);
        Ok(())
    }

    fn gather(&mut self, bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        let world = self.shared.world;
        if world == 1 {
            return Ok(Some(vec![bytes.to_vec()]));
        }
        *self.shared.bytes[self.rank]
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = bytes.to_vec();
        self.barrier("gather")?;
        let all = (self.rank == 0).then(|| {
            (0..world)
                .map(|r| {
                    self.shared.bytes[r]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone()
                })
                .collect()
        });
        self.barrier("gather")?;
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn run<T: Send>(
        world: usize,
        timeout: Duration,
        f: impl Fn(ThreadSync) -> T + Sync,
    ) -> Vec<std::thread::Result<T>> {
        let ranks = ThreadSync::group(world);
        std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .into_iter()
                .map(|r| {
                    let f = &f;
                    s.spawn(move || f(r.with_timeout(timeout)))
                })
                .collect();
            hs.into_iter().map(|h| h.join()).collect()
        })
    }

    #[test]
    fn gradients_are_averaged_identically_on_every_rank() {
        let out = run(3, Duration::from_secs(30), |mut s| {
            let r = s.rank() as f32;
            let d = Device::Cpu;
            // 7 values over 3 ranks: uneven slices
            let mut g = NamedGrads::from([
                ("a".to_string(), Tensor::new(&[r, 2. * r, 1.0], &d).unwrap()),
                (
                    "b".to_string(),
                    Tensor::new(&[[r, r], [0.5, 3. * r]], &d).unwrap(),
                ),
            ]);
            // twice: the buffers are reused
            for _ in 0..2 {
                s.all_reduce_mean(&mut g).unwrap();
            }
            let a = g["a"].to_vec1::<f32>().unwrap();
            let b = g["b"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (a, b)
        });
        // mean over ranks 0, 1, 2 of r is 1; the second round averages equal values
        for o in out {
            let (a, b) = o.unwrap();
            assert_eq!(a, [1.0, 2.0, 1.0]);
            assert_eq!(b, [1.0, 1.0, 0.5, 3.0]);
        }
    }

    #[test]
    fn scalars_are_summed_and_bytes_gathered_at_rank_zero() {
        let out = run(2, Duration::from_secs(30), |mut s| {
            let mut v = [s.rank() as f64, 1.0];
            s.all_reduce_sum(&mut v).unwrap();
            let g = s.gather(&[s.rank() as u8; 2]).unwrap();
            (v, g)
        });
        let (v0, g0) = out[0].as_ref().unwrap();
        let (v1, g1) = out[1].as_ref().unwrap();
        assert_eq!((v0, v1), (&[1.0, 2.0], &[1.0, 2.0]));
        assert_eq!(g0.as_deref(), Some(&[vec![0u8, 0], vec![1, 1]][..]));
        assert!(g1.is_none());
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others_naming_it() {
        let out = run(2, Duration::from_secs(30), |mut s| {
            if s.rank() == 1 {
                return Ok(()); // returns without the collective: its handle is dropped
            }
            let mut v = [1.0];
            s.all_reduce_sum(&mut v)
        });
        let err = out[0].as_ref().unwrap().as_ref().unwrap_err().to_string();
        assert!(err.contains("rank 1 stopped"), "{err}");
    }

    #[test]
    fn a_hanging_rank_times_the_collective_out() {
        let out = run(2, Duration::from_millis(200), |mut s| {
            if s.rank() == 1 {
                std::thread::sleep(Duration::from_secs(2));
                let mut v = [1.0];
                // the other rank gave up: this collective fails at once
                return s.all_reduce_sum(&mut v).map(|_| 0u64);
            }
            let t = Instant::now();
            let mut v = [1.0];
            s.all_reduce_sum(&mut v)
                .map(|_| t.elapsed().as_millis() as u64)
        });
        let err = out[0].as_ref().unwrap().as_ref().unwrap_err().to_string();
        assert!(
            err.contains("did not reach the scalar all-reduce within 0.2 s"),
            "{err}"
        );
        let err1 = out[1].as_ref().unwrap().as_ref().unwrap_err().to_string();
        assert!(err1.contains("rank 0 stopped"), "{err1}");
    }

    #[test]
    fn mismatched_gradients_are_named() {
        let out = run(2, Duration::from_secs(30), |mut s| {
            let n = 2 + s.rank();
            let mut g = NamedGrads::from([(
                "w".to_string(),
                Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap(),
            )]);
            s.all_reduce_mean(&mut g).map(|_| ())
        });
        for o in out {
            let e = o.unwrap().unwrap_err().to_string();
            assert!(e.contains("gradient values"), "{e}");
        }
    }
}
