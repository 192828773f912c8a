#!/usr/bin/env bash
# CI for the hand-written CUDA kernels, on a machine with nvcc and g++ but no GPU:
#  1. nvcc compiles every kernel in kernels/*.cu to PTX for sm_80 (A100) and sm_90 (H100),
#     and ptxas (nvcc -Xptxas -v) reports each kernel's registers and shared memory;
#  2. the kernel suite runs on the CPU emulator built with AddressSanitizer and UBSan.
# (The plain emulator suite runs with the rest of pytest.) Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

ARCHS=(sm_80 sm_90)
NVCC=${NVCC:-nvcc}
CXX=${CXX:-g++}

if ! command -v "$NVCC" >/dev/null; then
  echo "kernels.sh: nvcc not found (set NVCC); it is needed to compile the kernels to PTX" >&2
  exit 1
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== nvcc: kernels/*.cu to PTX, with register and shared-memory use"
printf '%-40s %-6s %5s %10s %8s\n' kernel arch regs smem_bytes spill
for src in kernels/*.cu; do
  name=$(basename "$src" .cu)
  for arch in "${ARCHS[@]}"; do
    "$NVCC" -ptx -arch="$arch" -Werror all-warnings "$src" -o "$out/$name.$arch.ptx"
    # -cubin runs ptxas, which is what reports the resources; no GPU is needed for it.
    if ! "$NVCC" -cubin -arch="$arch" -Werror all-warnings -Xptxas -v "$src" -o "$out/$name.$arch.cubin" \
      2>"$out/$name.$arch.log"; then
      cat "$out/$name.$arch.log" >&2
      exit 1
    fi
    awk -v arch="$arch" '
      /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); kernel = substr($0, RSTART + 1, RLENGTH - 2) }
      /bytes stack frame/ { spill = $0; sub(/.*frame, /, "", spill); sub(/ bytes spill stores.*/, "", spill) }
      /Used [0-9]+ registers/ {
        regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
        smem = 0; if ($0 ~ /bytes smem/) { smem = $0; sub(/ bytes smem.*/, "", smem); sub(/.*, /, "", smem) }
        printf "%-40s %-6s %5s %10s %8s\n", kernel, arch, regs, smem, spill
      }' "$out/$name.$arch.log"
  done
done
echo "(smem is static shared memory; the flash-attention kernels add up to 48 KiB of dynamic shared memory at launch)"

echo "== the exact text the CuPy path hands to NVRTC (headers inlined) compiles too"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python - "$out" <<'PY'
import sys
from pathlib import Path
from minisd.backends import cuda_build
for name in cuda_build.KERNEL_FILES:
    Path(sys.argv[1], "nvrtc_" + name).write_text(cuda_build.inline_includes(cuda_build.source_dir() / name))
PY
for name in "$out"/nvrtc_*.cu; do
  "$NVCC" -ptx -arch=sm_80 -Werror all-warnings "$name" -o "$name.ptx"
done
echo "ok"

echo "== the kernel suite on the emulator under AddressSanitizer + UBSan"
libasan=$("$CXX" -print-file-name=libasan.so)
if [ ! -e "$libasan" ]; then
  echo "kernels.sh: $CXX has no AddressSanitizer runtime (libasan.so)" >&2
  exit 1
fi
start=$SECONDS
LD_PRELOAD="$libasan" ASAN_OPTIONS=detect_leaks=0 MINISD_EMU_SANITIZE=1 \
  python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_emulator.py
echo "sanitizer suite: $((SECONDS - start)) s"
