#!/usr/bin/env bash
# Builds HERE (a machine without a GPU) what the GPU check runs on the lent GPU machine, which has
# CUDA 13 and no Rust toolchain: a stripped, xz-compressed release `m3ae` with the feature `cuda`,
# into gpu-carry/ (ignored by git), then prints its size, the libraries it needs and the newest
# glibc symbol version it uses (compare with `ldd --version` there; scripts/gpu-check.sh does).
#
#   bash scripts/gpu-build.sh          # -> gpu-carry/m3ae.xz
#   NCCL=1 bash scripts/gpu-build.sh   # also gpu-carry/m3ae-nccl.xz (features cuda + nccl: MPI + NCCL)
#
# Needs: Debian's CUDA toolkit for nvcc (non-free: `nvidia-cuda-toolkit`, CUDA 11.8), python3
# with pip (downloads NVIDIA's CUDA 13.0 wheels once, to link against; see scripts/gpu-env.sh),
# and for NCCL=1 Open MPI and libclang (libopenmpi-dev openmpi-bin libclang-dev).
# A cold build takes 20-40 min on 2 cores (candle's CUDA kernels are compiled by nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/gpu-env.sh
source scripts/gpu-env.sh
command -v nvcc >/dev/null || {
  echo "gpu-build: no nvcc. Install Debian's CUDA toolkit: add 'Components: main contrib non-free'" \
    "for bookworm to /etc/apt/sources.list.d/, apt-get update, apt-get install -y" \
    "--no-install-recommends nvidia-cuda-toolkit (docs/gpu.md)" >&2
  exit 1
}
m3ae_cuda13_libs || { echo "gpu-build: could not fetch the CUDA 13 link libraries" >&2; exit 1; }

carry=gpu-carry
mkdir -p "$carry"
nice -n 19 cargo build --release --features cuda --bin m3ae
cp "$CARGO_TARGET_DIR/release/m3ae" "$carry/m3ae"
if [ "${NCCL:-0}" = 1 ]; then
  # the same target directory: candle's kernels are not compiled again
  nice -n 19 cargo build --release --features nccl --bin m3ae
  cp "$CARGO_TARGET_DIR/release/m3ae" "$carry/m3ae-nccl"
fi
git rev-parse HEAD > "$carry/COMMIT"

# stripped, then xz-compressed (candle's PTX and cubins make a 67 MiB binary; about 9 MiB in xz):
# scripts/gpu-check.sh unpacks it there (xz, or Python's lzma)
rm -f "$carry"/*.xz
for bin in "$carry"/m3ae "$carry"/m3ae-nccl; do
  [ -f "$bin" ] || continue
  strip "$bin"
  echo "== $bin: $(du -m "$bin" | cut -f1) MiB stripped"
  echo "   needs: $(readelf -d "$bin" | awk '/NEEDED/{gsub(/[\[\]]/,"",$5); printf "%s ", $5}')"
  echo "   newest glibc symbol: $(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)," \
    "libstdc++: $(objdump -T "$bin" | grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -1)" \
    "(this machine: glibc $(ldd --version | head -1 | grep -o '[0-9.]*$'))"
  nice -n 19 xz -6 -T2 -f "$bin"
  echo "   -> $bin.xz: $(du -k "$bin.xz" | cut -f1) KiB"
done
# what one device call carries: the tracked tree (it travels anyway, the fixture included) and
# gpu-carry/, at most 64 MiB together
tree_kb=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
carry_kb=$(du -sk "$carry" | cut -f1)
total_mb=$(( (tree_kb + carry_kb) / 1024 ))
echo "== to carry: tree ${tree_kb} KiB + $carry ${carry_kb} KiB = ${total_mb} MiB (limit 64 MiB)"
[ "$total_mb" -lt 64 ] || { echo "gpu-build: over the 64 MiB a device call carries" >&2; exit 1; }
echo "run there: bash scripts/gpu-check.sh   (with carry: [\"$carry\"]; docs/gpu.md)"
