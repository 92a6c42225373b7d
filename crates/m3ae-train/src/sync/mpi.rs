//! [`GradSync`] over MPI (feature `mpi`, the `mpi` crate over the system's Open MPI / MPICH).
//!
//! One `MPI_Iallreduce` (sum) over a flat `f32` buffer per step, then a division by the world
//! size. Every collective is non-blocking and polled against a deadline
//! ([`MpiSync::with_timeout`]): a rank that died or hangs cannot make the others wait forever.
//! Before each gradient all-reduce, every rank sends rank 0 a small "arrived" message (step and
//! gradient layout); on a timeout, rank 0 names the ranks that never arrived, checks that the
//! layouts agree, and aborts the whole job (`MPI_Abort`) with a one-line error.
//!
//! Launch with `mpirun -n N m3ae pretrain ...`; rank and world size come from the MPI
//! environment ([`launched_by_mpi`] tells whether a launcher set one up).

use super::{flatten, layout_digest, unflatten, GradSync};
use crate::optim::NamedGrads;
use crate::Result;
use mpi::collective::SystemOperation;
use mpi::point_to_point::{Destination, Source};
use mpi::request::{Request, Scope};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use std::time::{Duration, Instant};

/// Tag of the "arrived at the all-reduce" messages.
const ARRIVE_TAG: i32 = 0x3ae;

/// Exit code of a job aborted by a collective timeout.
pub const TIMEOUT_EXIT_CODE: i32 = 75;

/// Whether this process was started by an MPI launcher (`mpirun`, `srun`, `mpiexec`): Open MPI,
/// PMIx or PMI (MPICH, Slurm) environment variables.
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK"]
        .iter()
        .any(|k| std::env::var_os(k).is_some())
}

/// Data-parallel gradient averaging over `MPI_COMM_WORLD`.
pub struct MpiSync {
    // `world` is used only through `&mut self`, i.e. by one thread at a time; MPI is
    // initialised with `Threading::Serialized`, which allows that thread to change.
    world: SimpleCommunicator,
    timeout: Duration,
    step: u64,
    buf: Vec<f32>,
    out: Vec<f32>,
    // declared last: finalises MPI after the communicator is dropped
    _universe: mpi::environment::Universe,
}

// SAFETY: the communicator handle is only used through `&mut self` (one thread at a time), and
// MPI was initialised with at least `Threading::Serialized`, which permits calls from any thread
// as long as they do not overlap.
unsafe impl Send for MpiSync {}

impl MpiSync {
    /// Initialises MPI (once per process) with the default 600 s collective timeout.
    pub fn init() -> Result<Self> {
        let (universe, level) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| crate::Error::State("MPI was already initialised".into()))?;
        if level < mpi::Threading::Serialized {
            return Err(crate::Error::State(format!(
                "the MPI library offers thread level {level:?}; m3ae needs Serialized"
            )));
        }
        let world = universe.world();
        Ok(Self {
            world,
            timeout: Duration::from_secs(600),
            step: 0,
            buf: Vec::new(),
            out: Vec::new(),
            _universe: universe,
        })
    }

    /// Sets the longest wait in one collective before the job is aborted.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The world communicator.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn world(&self) -> &SimpleCommunicator {
        &self.world
    }

    /// Counts a gradient all-reduce made by another engine (NCCL) for the messages.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn next_step(&mut self) {
        self.step += 1;
    }

    /// Prints `msg` (prefixed by this rank) and aborts every process of the job.
    fn abort(&self, msg: &str) -> ! {
        eprintln!(
            "error: rank {} of {}: {msg}",
            self.world.rank(),
            self.world.size()
        );
        self.world.abort(TIMEOUT_EXIT_CODE)
    }

    /// Polls `req` until it completes or the deadline passes (then aborts with `what`).
    fn wait<'a, D: ?Sized, S: Scope<'a>>(
        &self,
        mut req: Request<'a, D, S>,
        start: Instant,
        what: &dyn Fn() -> String,
    ) {
        let mut spins = 0u32;
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            if start.elapsed() > self.timeout {
                self.abort(&what());
            }
            spins += 1;
            if spins > 1000 {
                std::thread::sleep(Duration::from_micros(100));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Every rank reports (step, layout) to rank 0, which waits for all of them; on a timeout it
    /// names the ranks that did not arrive, on a layout mismatch the ranks that differ.
    pub(crate) fn arrive(&self, what: &str, digest: u64, len: u64) {
        let rank = self.world.rank();
        let size = self.world.size() as usize;
        let start = Instant::now();
        let step = self.step;
        let mine = [step, digest, len];
        if rank != 0 {
            mpi::request::scope(|scope| {
                let req = self.world.process_at_rank(0).immediate_send_with_tag(
                    scope,
                    &mine[..],
                    ARRIVE_TAG,
                );
                self.wait(req, start, &|| {
                    format!(
                        "rank 0 did not take this rank's {what} of step {step} within {:.0} s (rank 0 failed or hangs)",
                        self.timeout.as_secs_f64()
                    )
                });
            });
            return;
        }
        let mut got = vec![[0u64; 3]; size];
        got[0] = mine;
        let mut arrived = vec![false; size];
        arrived[0] = true;
        mpi::request::scope(|scope| {
            let mut pending: Vec<(usize, Request<'_, [u64; 3], _>)> = got
                .iter_mut()
                .enumerate()
                .skip(1)
                .map(|(r, b)| {
                    let req = self
                        .world
                        .process_at_rank(r as i32)
                        .immediate_receive_into_with_tag(scope, b, ARRIVE_TAG);
                    (r, req)
                })
                .collect();
            let mut spins = 0u32;
            while !pending.is_empty() {
                let mut still = Vec::with_capacity(pending.len());
                for (r, req) in pending {
                    match req.test() {
                        Ok(_) => arrived[r] = true,
                        Err(req) => still.push((r, req)),
                    }
                }
                pending = still;
                if pending.is_empty() {
                    break;
                }
                if start.elapsed() > self.timeout {
                    let missing: Vec<String> = pending.iter().map(|(r, _)| r.to_string()).collect();
                    self.abort(&format!(
                        "rank{} {} did not reach the {what} all-reduce of step {step} within {:.0} s (failed or hanging)",
                        if missing.len() > 1 { "s" } else { "" },
                        missing.join(", "),
                        self.timeout.as_secs_f64()
                    ));
                }
                spins += 1;
                if spins > 1000 {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        });
        let bad: Vec<String> = got
            .iter()
            .enumerate()
            .filter(|(_, g)| **g != mine)
            .map(|(r, g)| format!("rank {r} at step {} with {} values", g[0], g[2]))
            .collect();
        if !bad.is_empty() {
            self.abort(&format!(
                "the ranks disagree on the {what} (rank 0: step {step}, {len} values): {}",
                bad.join("; ")
            ));
        }
    }
}

impl GradSync for MpiSync {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world_size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_mean(&mut self, grads: &mut NamedGrads) -> Result<()> {
        let size = self.world.size();
        let mut buf = std::mem::take(&mut self.buf);
        flatten(grads, &mut buf)?;
        self.arrive("gradient", layout_digest(grads), buf.len() as u64);
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        out.resize(buf.len(), 0.0);
        let start = Instant::now();
        let step = self.step;
        mpi::request::scope(|scope| {
            let req = self.world.immediate_all_reduce_into(
                scope,
                &buf[..],
                &mut out[..],
                SystemOperation::sum(),
            );
            self.wait(req, start, &|| {
                format!(
                    "the gradient all-reduce of step {step} did not complete within {:.0} s (a rank failed or hangs)",
                    self.timeout.as_secs_f64()
                )
            });
        });
        unflatten(grads, &out, 1.0 / size as f32)?;
        self.buf = buf;
        self.out = out;
        self.step += 1;
        Ok(())
    }

    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<()> {
        self.arrive("scalar", 0, values.len() as u64);
        let send = values.to_vec();
        let start = Instant::now();
        let step = self.step;
        mpi::request::scope(|scope| {
            let req = self.world.immediate_all_reduce_into(
                scope,
                &send[..],
                values,
                SystemOperation::sum(),
            );
            self.wait(req, start, &|| {
                format!(
                    "the scalar all-reduce of step {step} did not complete within {:.0} s (a rank failed or hangs)",
                    self.timeout.as_secs_f64()
                )
            });
        });
        Ok(())
    }

    fn gather(&mut self, bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        let size = self.world.size() as usize;
        let root = self.world.process_at_rank(0);
        // lengths first, then the bytes (both blocking: small, and only at checkpoints; the
        // all-reduces around them carry the timeout)
        let len = bytes.len() as u64;
        if self.world.rank() != 0 {
            root.gather_into(&len);
            root.gather_varcount_into(bytes);
            return Ok(None);
        }
        let mut lens = vec![0u64; size];
        root.gather_into_root(&len, &mut lens[..]);
        let counts: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let displs: Vec<i32> = counts
            .iter()
            .scan(0i32, |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect();
        let total: usize = lens.iter().map(|&l| l as usize).sum();
        let mut all = vec![0u8; total];
        {
            let mut part = mpi::datatype::PartitionMut::new(&mut all[..], counts, &displs[..]);
            root.gather_varcount_into_root(bytes, &mut part);
        }
        let mut out = Vec::with_capacity(size);
        let mut off = 0;
        for l in lens {
            out.push(all[off..off + l as usize].to_vec());
            off += l as usize;
        }
        Ok(Some(out))
    }
}
