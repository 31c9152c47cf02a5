#!/bin/sh
# Builds and runs the host emulation of the CUDA kernels (no GPU needed).
# Usage: tests/cuda_emulation/run.sh [case-name-substring[|substring...] | no-sparse | fuzz [n [seed]] | sparse-fuzz [n [seed]]]
#                                                                   flash attention
#        tests/cuda_emulation/run.sh linear [case-name-substring[|...]]   linear attention
#        tests/cuda_emulation/run.sh rope [case-name-substring[|...]]     RoPE
# EMU_CXXFLAGS adds compiler flags, e.g. EMU_CXXFLAGS=-DLONGATTN_FWD_STRIPS=1 for the other
# flash forward layout.
# EMU_SAN=thread builds under ThreadSanitizer: a shared-memory access that two emulated CUDA
# threads make without a barrier or warp primitive between them is reported as a data race
# (the hazards compute-sanitizer racecheck looks for). EMU_SAN=address builds under
# AddressSanitizer + UBSan: out-of-bounds reads or writes of the global buffers, or of shared
# memory past the launch's dynamic size, are reported (memcheck's class). Either exits
# non-zero at the first report; expect 10-30x the plain run time.
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
san_flags=""
case "${EMU_SAN:-}" in
  "") ;;
  thread) san_flags="-fsanitize=thread -g -O1"
    export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1 exitcode=66 report_signal_unsafe=0}" ;;
  address) san_flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"
    export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0}" ;;
  *) echo "EMU_SAN must be thread or address" >&2; exit 2 ;;
esac
out=${TMPDIR:-/tmp}/longattn_${test}_emulate${EMU_SAN:+_$EMU_SAN}
g++ -std=c++20 -O2 -pthread $san_flags ${EMU_CXXFLAGS:-} -I"$cuda_inc" -I"$root/csrc/include" -I"$root/csrc/cuda" \
  -Wno-attributes "$root/tests/cuda_emulation/${test}_emulate_test.cpp" -o "$out"
exec "$out" "$@"
