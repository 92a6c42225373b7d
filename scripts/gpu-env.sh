# Sourced by scripts/gpu-build.sh (and by hand for `cargo check/clippy --features cuda`): the
# environment of a CUDA build on this machine for the lent GPU machine (docs/gpu.md).
#
# * nvcc: Debian's CUDA 11.8 toolkit (non-free `nvidia-cuda-toolkit`) compiles candle's kernels
#   to PTX for compute capability 8.0; the driver JIT-compiles that PTX for the GPU at hand
#   (Hopper included). Our own kernels are compiled at run time by NVRTC.
# * link: the GPU machine has CUDA 13 (libcublas.so.13, libcudart.so.13, libnvrtc.so.13 from its
#   Python packages), and NVIDIA's libraries version their symbols by soname
#   (`cublasSgemm_v2@libcublas.so.11`), so a binary linked against Debian's CUDA 11 libraries
#   cannot start there. We link against the CUDA 13.0 libraries of NVIDIA's PyPI wheels instead
#   (downloaded once into target/cuda13, only for linking) and select cudarc's CUDA 13.0
#   bindings (CUDARC_CUDA_VERSION). libcuda.so is the driver library of Debian's toolkit.
# * a target directory of its own (target/gpu), so the ordinary builds stay untouched.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cuda13="$root/target/cuda13"
export CARGO_TARGET_DIR="$root/target/gpu"
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export NVCC="${NVCC:-$(command -v nvcc || echo /usr/bin/nvcc)}"
export CUDA_HOME="$cuda13"

# The CUDA 13.0 libraries to link against (not carried: the GPU machine has its own).
m3ae_cuda13_libs() {
  [ -e "$cuda13/lib/libcublas.so" ] && return 0
  mkdir -p "$cuda13/wheels" "$cuda13/x" "$cuda13/lib"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$cuda13/wheels" \
    'nvidia-cublas==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-nvrtc==13.0.*' \
    'nvidia-curand>=10.4,<10.5' 'nvidia-nccl-cu13' || return 1
  for w in "$cuda13"/wheels/*.whl; do unzip -q -o "$w" 'nvidia/*' -d "$cuda13/x" || return 1; done
  local so base
  for so in "$cuda13"/x/nvidia/cu13/lib/lib*.so.* "$cuda13"/x/nvidia/nccl/lib/libnccl.so.2; do
    base="$(basename "$so")"
    ln -sf "$so" "$cuda13/lib/$base"
    ln -sf "$so" "$cuda13/lib/${base%%.so*}.so"
  done
  ln -sf "$(ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}')" "$cuda13/lib/libcuda.so"
  ln -sfn lib "$cuda13/lib64"
}
