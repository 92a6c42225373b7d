//! [`GradSync`] over NCCL for CUDA tensors (feature `nccl`): one process per GPU, the ranks
//! meeting through MPI (rank 0 creates the NCCL id and broadcasts it with `MPI_Bcast`).
//!
//! The gradients are concatenated on the GPU into one flat f32 buffer, summed across the ranks by
//! one `ncclAllReduce` (run as a candle custom op on the device's stream, so it is ordered with
//! the backward pass that produced them), divided by the world size and split back. The small
//! collectives (loss scalars, the gather of data positions) and the "arrived" check that names a
//! missing rank before each all-reduce go through [`MpiSync`], with its timeout; a failure inside
//! NCCL itself is left to NCCL (set `NCCL_ASYNC_ERROR_HANDLING=1`).
//!
//! Built and type-checked here (`cargo check --features nccl` with CUDA 11.8); not yet run on a
//! GPU (none was available): see `docs/distributed.md`.

use super::mpi::MpiSync;
use super::{layout_digest, GradSync};
use crate::optim::NamedGrads;
use crate::{Error, Result};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use cudarc::nccl::{Comm, Id, ReduceOp};
use mpi::traits::*;

/// Data-parallel gradient averaging over NCCL, one process per GPU.
pub struct NcclSync {
    comm: Comm,
    mpi: MpiSync,
    device: Device,
}

// SAFETY: the NCCL communicator is only used through `&mut self` (one thread at a time); NCCL
// permits a communicator to be used from another thread as long as calls do not overlap.
unsafe impl Send for NcclSync {}

/// The rank of this process among the ranks of its node, from the launcher's environment
/// (`OMPI_COMM_WORLD_LOCAL_RANK` of Open MPI, `SLURM_LOCALID` of Slurm, `MPI_LOCALRANKID` of
/// MPICH), or `None` when none is set.
pub fn local_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "SLURM_LOCALID",
        "MPI_LOCALRANKID",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// The GPU of this process: `ordinal`, or the [`local_rank`], or 0.
pub fn local_device(ordinal: Option<usize>) -> Result<Device> {
    let local = ordinal.or_else(local_rank);
    Ok(Device::new_cuda(local.unwrap_or(0))?)
}

impl NcclSync {
    /// Sets up NCCL on `device` (a CUDA device) among the ranks of `mpi`.
    pub fn init(mpi: MpiSync, device: &Device) -> Result<Self> {
        let cuda = device.as_cuda_device()?;
        let mut id: [std::ffi::c_char; 128] = [0; 128];
        if mpi.rank() == 0 {
            id = *Id::new()
                .map_err(|e| Error::State(format!("creating the NCCL id: {e:?}")))?
                .internal();
        }
        mpi.world().process_at_rank(0).broadcast_into(&mut id[..]);
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            mpi.rank(),
            mpi.world_size(),
            Id::uninit(id),
        )
        .map_err(|e| {
            Error::State(format!(
                "rank {}: joining the NCCL communicator: {e:?}",
                mpi.rank()
            ))
        })?;
        Ok(Self {
            comm,
            mpi,
            device: device.clone(),
        })
    }

    /// The CUDA device of this rank.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// `ncclAllReduce` (sum) of a contiguous f32 CUDA tensor, as a candle op on the device's stream.
struct AllReduceSum<'a> {
    comm: &'a Comm,
}

impl CustomOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce needs CUDA tensors (use MpiSync on the CPU)")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::msg("nccl all-reduce: input not contiguous"))?;
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = s.device.clone();
        // SAFETY: every element is written by the all-reduce before it is read.
        let mut dst = unsafe { dev.alloc::<f32>(end - start) }?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::msg(format!("ncclAllReduce: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}

impl GradSync for NcclSync {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }

    fn world_size(&self) -> usize {
        self.mpi.world_size()
    }

    fn all_reduce_mean(&mut self, grads: &mut NamedGrads) -> Result<()> {
        let flat = grads
            .values()
            .map(|g| g.to_dtype(DType::F32)?.flatten_all())
            .collect::<candle_core::Result<Vec<Tensor>>>()?;
        let flat = Tensor::cat(&flat, 0)?;
        self.mpi
            .arrive("gradient", layout_digest(grads), flat.elem_count() as u64);
        let sum = flat.apply_op1_no_bwd(&AllReduceSum { comm: &self.comm })?;
        let mean = (sum / self.world_size() as f64)?;
        let mut off = 0;
        for g in grads.values_mut() {
            let n = g.elem_count();
            *g = mean.narrow(0, off, n)?.reshape(g.dims())?;
            off += n;
        }
        self.mpi.next_step();
        Ok(())
    }

    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<()> {
        self.mpi.all_reduce_sum(values)
    }

    fn gather(&mut self, bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        self.mpi.gather(bytes)
    }
}
