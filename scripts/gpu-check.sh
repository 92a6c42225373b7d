#!/usr/bin/env bash
# One-shot check on a GPU machine: builds the CUDA / NCCL features and runs what needs a GPU:
# the CUDA kernel tests and benchmarks (feature `cuda`), then the NCCL tests (feature `nccl`).
#   bash scripts/gpu-check.sh            (from the repository root; writes gpu-check.log)
#   SKIP_NCCL=1 bash scripts/gpu-check.sh   (kernels only, no NCCL / MPI needed)
# Needs: a CUDA toolkit (nvcc), libnccl, Open MPI (openmpi-bin libopenmpi-dev) and libclang.
set -uo pipefail
cd "$(dirname "$0")/.."
# candle's kernels are compiled for this compute capability; CUDA 11.x cannot target 9.0
# (`compute_90a`): set CUDA_COMPUTE_CAP=80 there (the PTX then runs on newer GPUs too).
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
{
  nvidia-smi
  echo "== CUDA kernels: tests (compute cap $CUDA_COMPUTE_CAP)"
  time cargo test --release -p m3ae-kernels --features cuda --test cuda --test cuda_emulated -- --include-ignored --nocapture
  echo "== the tiny model on the GPU vs the CPU"
  cargo test --release -p m3ae-model --features cuda --test cuda -- --include-ignored --nocapture
  echo "== CUDA kernels: benchmarks"
  cargo bench --features cuda --bench kernels_cuda -- --warm-up-time 1 --measurement-time 3
  [ "${SKIP_NCCL:-0}" = 1 ] && exit 0
  echo "== build --features nccl (compute cap $CUDA_COMPUTE_CAP)"
  time cargo build --release -p m3ae-train --features nccl --tests
  echo "== NCCL, world size 1"
  cargo test --release -p m3ae-train --features nccl --test nccl -- --nocapture
  gpus=$(nvidia-smi -L | wc -l)
  if [ "$gpus" -ge 2 ]; then
    echo "== NCCL, $gpus ranks"
    bin=$(ls -t target/release/deps/nccl-* | grep -v '\.d$' | head -1)
    mpirun -n "$gpus" "$bin" --nocapture
  fi
} 2>&1 | tee gpu-check.log
