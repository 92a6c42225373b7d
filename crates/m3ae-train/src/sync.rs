//! Gradient synchronisation across processes (`GradSync`): averages the gradients of a step over
//! all ranks before clipping, as the official code's `pmean` does, and the few small collectives
//! a data-parallel run needs besides (a sum of scalars, a gather of bytes to rank 0).
//! [`SingleProcess`] is the identity; [`threads::ThreadSync`] runs the ranks as threads of one
//! process; the MPI implementation is in `mpi` (feature `mpi`), the NCCL one for CUDA tensors in
//! `nccl` (feature `nccl`).
//!
//! Gradients travel as one flat `f32` buffer per step, in the sorted order of their names
//! ([`flatten`] / [`unflatten`]), so every rank lays them out identically; [`layout_digest`]
//! lets an implementation check that it does.

use crate::optim::NamedGrads;
use crate::{Error, Result};
use candle_core::Tensor;

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod threads;

/// Averages gradients across the processes of a data-parallel job.
///
/// Every rank must make the same sequence of calls (they are collectives).
pub trait GradSync {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world_size(&self) -> usize;
    /// Replaces every gradient by its mean over all ranks (same names on every rank).
    fn all_reduce_mean(&mut self, grads: &mut NamedGrads) -> Result<()>;
    /// Replaces each value by its sum over all ranks (small vectors: flags, loss scalars).
    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<()>;
    /// Gathers one byte string from every rank at rank 0: `Some` (indexed by rank) on rank 0,
    /// `None` elsewhere.
    fn gather(&mut self, bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>>;
}

/// One process: nothing to synchronise.
///
/// ```
/// use m3ae_train::sync::{GradSync, SingleProcess};
/// let mut s = SingleProcess;
/// let mut g = m3ae_train::optim::NamedGrads::new();
/// s.all_reduce_mean(&mut g).unwrap();
/// let mut v = [1.5, 2.0];
/// s.all_reduce_sum(&mut v).unwrap();
/// assert_eq!(v, [1.5, 2.0]);
/// assert_eq!(s.gather(b"x").unwrap(), Some(vec![b"x".to_vec()]));
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
    fn all_reduce_sum(&mut self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn gather(&mut self, bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        Ok(Some(vec![bytes.to_vec()]))
    }
}

/// Copies every gradient, in name order, into one flat buffer (reusing `buf`'s allocation).
pub fn flatten(grads: &NamedGrads, buf: &mut Vec<f32>) -> Result<()> {
    buf.clear();
    for g in grads.values() {
        m3ae_kernels::with_f32_slice(g, |s| buf.extend_from_slice(s))?;
    }
    Ok(())
}

/// Writes a flat buffer made by [`flatten`] back into the gradients, multiplied by `scale`.
pub fn unflatten(grads: &mut NamedGrads, buf: &[f32], scale: f32) -> Result<()> {
    let total: usize = grads.values().map(|g| g.elem_count()).sum();
    if total != buf.len() {
        return Err(Error::State(format!(
            "gradient buffer has {} values, the gradients {total}",
            buf.len()
        )));
    }
    let mut off = 0;
    for g in grads.values_mut() {
        let n = g.elem_count();
        let v: Vec<f32> = buf[off..off + n].iter().map(|x| x * scale).collect();
        *g = Tensor::from_vec(v, g.dims(), g.device())?;
        off += n;
    }
    Ok(())
}

/// A 64-bit digest of the gradients' names and shapes (FNV-1a): equal on two ranks exactly when
/// their flat buffers line up.
pub fn layout_digest(grads: &NamedGrads) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (name, g) in grads {
        eat(name.as_bytes());
        for d in g.dims() {
            eat(&(*d as u64).to_le_bytes());
        }
        eat(b";");
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn grads() -> NamedGrads {
        let d = Device::Cpu;
        NamedGrads::from([
            (
                "b".to_string(),
                Tensor::new(&[[1f32, 2.], [3., 4.]], &d).unwrap(),
            ),
            ("a".to_string(), Tensor::new(&[5f32], &d).unwrap()),
        ])
    }

    #[test]
    fn flatten_follows_name_order_and_unflatten_scales_back() {
        let mut g = grads();
        let mut buf = Vec::new();
        flatten(&g, &mut buf).unwrap();
        assert_eq!(buf, [5., 1., 2., 3., 4.]);
        unflatten(&mut g, &buf, 0.5).unwrap();
        assert_eq!(g["b"].to_vec2::<f32>().unwrap(), [[0.5, 1.], [1.5, 2.]]);
        assert_eq!(g["a"].dims(), &[1]);
        let err = unflatten(&mut g, &buf[..4], 1.0).unwrap_err().to_string();
        assert!(err.contains("4 values") && err.contains("5"), "{err}");
    }

    #[test]
    fn layout_digest_sees_names_and_shapes() {
        let g = grads();
        let mut renamed = g.clone();
        let t = renamed.remove("a").unwrap();
        renamed.insert("c".into(), t);
        let mut reshaped = g.clone();
        reshaped.insert("b".into(), g["b"].reshape(4).unwrap());
        assert_eq!(layout_digest(&g), layout_digest(&grads()));
        assert_ne!(layout_digest(&g), layout_digest(&renamed));
        assert_ne!(layout_digest(&g), layout_digest(&reshaped));
    }
}
