#!/bin/sh
# Builds and runs the host emulation of the CUDA kernels (no GPU needed).
# Usage: tests/cuda_emulation/run.sh [case-name-substring | no-sparse | fuzz [n [seed]] | sparse-fuzz [n [seed]]]
#                                                                   flash attention
#        tests/cuda_emulation/run.sh linear [case-name-substring]   linear attention
#        tests/cuda_emulation/run.sh rope [case-name-substring]     RoPE
# EMU_CXXFLAGS adds compiler flags, e.g. EMU_CXXFLAGS=-DLONGATTN_FWD_STRIPS=1 for the other
# flash forward layout.
set -e
root=$(cd "$(dirname "$0")/../.." && pwd)
cuda_inc=""
nvcc_root=$(command -v nvcc >/dev/null 2>&1 && cd "$(dirname "$(command -v nvcc)")/.." && pwd)
for d in "${CUDA_HOME:-}" "$nvcc_root" /usr/local/cuda /usr/local/cuda-*; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_bf16.h" ]; then cuda_inc=$d/include; break; fi
done
[ -n "$cuda_inc" ] || { echo "CUDA headers not found; set CUDA_HOME" >&2; exit 1; }
test=flash
case "${1:-}" in linear | rope) test=$1; shift ;; esac
out=${TMPDIR:-/tmp}/longattn_${test}_emulate
g++ -std=c++20 -O2 -pthread ${EMU_CXXFLAGS:-} -I"$cuda_inc" -I"$root/csrc/include" -I"$root/csrc/cuda" \
  -Wno-attributes "$root/tests/cuda_emulation/${test}_emulate_test.cpp" -o "$out"
exec "$out" "$@"
