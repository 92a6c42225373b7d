#!/usr/bin/env bash
# Runs ON the lent GPU machine (no cargo there), from the repository root, with the folder that
# scripts/gpu-build.sh filled here carried along (gpu-carry/: the CUDA build of m3ae, xz).
#   bash scripts/gpu-check.sh                  # probe, then `m3ae doctor --device cuda`
#   bash scripts/gpu-check.sh --sections kernels,parity    # extra arguments go to the doctor
#   PROBE_ONLY=1 bash scripts/gpu-check.sh     # the probe alone (seconds)
# Writes $OUT/gpu-check.log (everything) and $OUT/gpu-check.md (the doctor's table, rewritten
# after every row). $OUT is the device tool's output folder (default: gpu-check-out/).
#
# 1. probe (seconds): the GPU and driver (nvidia-smi), glibc, the CUDA 13 libraries the binary
#    links (cuBLAS, cuBLASLt, cudart, NVRTC, cuRAND: from the Python packages' site-packages,
#    else a CUDA toolkit) put on LD_LIBRARY_PATH, and `ldd` of the binary: a missing library or
#    glibc version stops here, before any device time goes to the check;
# 2. the check: `m3ae doctor --device cuda` (kernels, official fixture, 200 tiny steps against
#    the CPU in f32 and bf16, small/base throughput), under a time limit;
# 3. with gpu-carry/m3ae-nccl.xz (NCCL=1 at build) and mpirun: 20 steps over NCCL, one rank.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
limit="${DOCTOR_TIMEOUT:-500}"
bindir="${TMPDIR:-/tmp}/m3ae-gpu"
mkdir -p "$bindir"

# gpu-carry/NAME.xz (scripts/gpu-build.sh) unpacked to $bindir/NAME; prints the path
unpack() {
  local name=$1 src="gpu-carry/$1.xz" dst="$bindir/$1"
  [ -f "$src" ] || { [ -x "gpu-carry/$name" ] && echo "$PWD/gpu-carry/$name"; return 0; }
  if command -v xz >/dev/null; then
    xz -dc "$src" > "$dst"
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$src" "$dst"
  fi && chmod +x "$dst" && echo "$dst"
}

probe() {
  echo "== probe: $(date -u +%FT%TZ), commit $(cat gpu-carry/COMMIT 2>/dev/null || echo '?')"
  nvidia-smi || { echo "PROBE FAIL: nvidia-smi"; return 1; }
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
  echo "host glibc: $(ldd --version | head -1)"
  echo "kernel: $(uname -r); cores: $(nproc)"
  [ -n "$bin" ] && [ -x "$bin" ] || { echo "PROBE FAIL: no gpu-carry/m3ae.xz (build it here with scripts/gpu-build.sh and carry gpu-carry)"; return 1; }
  if command -v objdump >/dev/null; then
    echo "binary needs glibc up to $(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)"
  fi
  # the CUDA libraries: NVIDIA's wheels (nvidia/cu13/lib, nvidia/<name>/lib), then toolkits
  local roots dirs=() want lib d found
  roots=$(python3 -c 'import site, sys, os
seen = set()
for p in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    d = os.path.join(p, "nvidia")
    if os.path.isdir(d) and d not in seen:
        seen.add(d); print(d)' 2>/dev/null)
  want="libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libnvrtc.so.13 libcurand.so.10 libnccl.so.2"
  for lib in $want; do
    found=""
    for d in $roots /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64; do
      [ -d "$d" ] || continue
      found=$(find -L "$d" -maxdepth 3 -name "$lib" 2>/dev/null | head -1)
      [ -n "$found" ] && break
    done
    if [ -n "$found" ]; then
      echo "found $lib: $found"
      dirs+=("$(dirname "$found")")
    else
      echo "missing $lib"
    fi
  done
  local path
  path=$(printf '%s\n' "${dirs[@]}" | awk '!seen[$0]++' | paste -sd: -)
  export LD_LIBRARY_PATH="$path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "ldconfig: $(ldconfig -p | grep -c 'libcuda\.so\.1') libcuda.so.1; mpirun: $(command -v mpirun || echo none)"
  local ldd_out
  ldd_out=$(ldd "$bin" 2>&1)
  echo "$ldd_out"
  if echo "$ldd_out" | grep -q "not found"; then
    echo "PROBE FAIL: $bin cannot start here (a library or glibc version is missing; docs/gpu.md)"
    return 1
  fi
  "$bin" --version || { echo "PROBE FAIL: $bin does not start"; return 1; }
  echo "PROBE OK"
}

nccl_smoke() {
  local nb="$nccl_bin" dir
  [ -n "$nb" ] && [ -x "$nb" ] || return 0
  echo "== NCCL: $nb, one rank"
  if ldd "$nb" | grep -q "not found"; then
    ldd "$nb" | grep "not found"
    echo "NCCL SKIP: $nb cannot start here (MPI or NCCL library missing)"
    return 0
  fi
  command -v mpirun >/dev/null || { echo "NCCL SKIP: no mpirun"; return 0; }
  dir=$(mktemp -d)
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 120 \
    mpirun -n 1 "$nb" pretrain --device cuda --steps 20 --no-probe --plain \
      --output-dir "$dir" --name nccl-smoke \
    && echo "NCCL OK" || echo "NCCL FAIL (rc $?)"
  rm -rf "$dir"
}

{
  bin="${M3AE_BIN:-$(unpack m3ae)}"
  nccl_bin="$(unpack m3ae-nccl)"
  if probe; then
    if [ "${PROBE_ONLY:-0}" != 1 ]; then
      echo "== m3ae doctor --device cuda $* (time limit ${limit} s)"
      timeout "$limit" "$bin" doctor --device cuda --out "$OUT/gpu-check.md" "$@"
      echo "doctor exit code: $?"
      nccl_smoke
    fi
  fi
} 2>&1 | tee "$OUT/gpu-check.log"
