//! NCCL gradient averaging on a GPU (feature `nccl`; needs a CUDA GPU and libnccl): every rank
//! holds gradients equal to `rank + 1`, and after the all-reduce every rank holds their mean
//! `(world + 1) / 2`, on the GPU, with the shapes kept. Run alone it is a world of one (MPI's
//! singleton start); `mpirun -n 2` on a 2-GPU machine checks a real reduction.
//! Run it on a GPU machine with cargo (`cargo test --release -p m3ae-train --features nccl --test
//! nccl`); CI does not (no GPU there).
#![cfg(feature = "nccl")]

use candle_core::Tensor;
use m3ae_train::optim::NamedGrads;
use m3ae_train::sync::mpi::MpiSync;
use m3ae_train::sync::nccl::{local_device, NcclSync};
use m3ae_train::GradSync;

#[test]
fn nccl_all_reduce_gives_every_rank_the_mean() {
    let dev = local_device(None).expect("a CUDA device");
    let mut sync = NcclSync::init(MpiSync::init().unwrap(), &dev).unwrap();
    let (rank, world) = (sync.rank(), sync.world_size());
    let v = (rank + 1) as f32;
    let mut g = NamedGrads::from([
        ("a".to_string(), Tensor::full(v, (2, 3), &dev).unwrap()),
        ("b".to_string(), Tensor::full(v, 5, &dev).unwrap()),
    ]);
    sync.all_reduce_mean(&mut g).unwrap();
    let want = (world + 1) as f32 / 2.0;
    assert!(g["a"].device().is_cuda());
    assert_eq!(g["a"].dims(), &[2, 3]);
    assert_eq!(g["a"].to_vec2::<f32>().unwrap(), vec![vec![want; 3]; 2]);
    assert_eq!(g["b"].to_vec1::<f32>().unwrap(), vec![want; 5]);
    let mut s = [v as f64];
    sync.all_reduce_sum(&mut s).unwrap();
    assert_eq!(s[0], (world * (world + 1) / 2) as f64);
    eprintln!("rank {rank} of {world}: NCCL mean {want} on {:?}", dev);
}
