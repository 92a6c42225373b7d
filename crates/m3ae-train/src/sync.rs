//! Gradient synchronisation across processes (`GradSync`): averages the gradients of a step over
//! all ranks before clipping, as the official code's `pmean` does. [`SingleProcess`] is the
//! identity; implementations on MPI / NCCL plug in here.

use crate::optim::NamedGrads;
use crate::Result;

/// Averages gradients across the processes of a data-parallel job.
pub trait GradSync {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world_size(&self) -> usize;
    /// Replaces every gradient by its mean over all ranks (same names on every rank).
    fn all_reduce_mean(&mut self, grads: &mut NamedGrads) -> Result<()>;
}

/// One process: nothing to synchronise.
///
/// ```
/// use m3ae_train::sync::{GradSync, SingleProcess};
/// let mut s = SingleProcess;
/// let mut g = m3ae_train::optim::NamedGrads::new();
/// s.all_reduce_mean(&mut g).unwrap();
/// assert_eq!((s.rank(), s.world_size()), (0, 1));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl GradSync for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&mut self, _grads: &mut NamedGrads) -> Result<()> {
        Ok(())
    }
}
