#!/usr/bin/env bash
# Build, test, sanitize, benchmark and profile longattn on a CUDA machine, in one command.
#
#   tools/gpu_check.sh [STAGE...]     stages: build test sanitize bench profile (default: all)
#                                     and, on request only, layout
#
# Environment: OUT (folder for logs and reports, default gpu_check_out), ARCHS (default the
# device's own compute capability, e.g. 90a on H100), PYTHON (default python3), JOBS.
# Every stage appends to $OUT/gpu_check.log and prints a one-line verdict; the script goes
# on after a failing stage and exits non-zero at the end if any failed. Files written:
#   gpu_check.log          everything, in order
#   pytest_cuda.xml        junit report of `pytest -m cuda`
#   sanitize.log           compute-sanitizer memcheck / racecheck / synccheck of
#                          tools/gpu_sanitize_cases.py (torch's caching allocator off)
#   bench.tar.gz           `python -m longattn bench --device cuda` JSON, Markdown, PNG
#   bench_nopack.tar.gz    the decode entry again with LONGATTN_CUDA_GQA_PACK=0 (no GQA
#                          packing), to compare with bench.tar.gz
#   flash.ncu-rep, flash_ncu.txt   Nsight Compute --set full of the flash forward/backward
#   bench_strips1.tar.gz   (layout) the attention and block-sparse benchmarks built with
#                          LONGATTN_FWD_STRIPS=1 (one 16-row strip per warp, dense and
#                          sparse forward), to compare with bench.tar.gz
#   bench_sparse2s128.tar.gz  (layout) the block-sparse benchmark built with
#                          LONGATTN_SPARSE_FWD_2STRIP_DP=128 (two strips, 32-key tiles at
#                          head dim 128); the stage then rebuilds the default layout
# Peers missing on the machine (flash-linear-attention: fla-core and its pure-Python deps)
# travel as wheels in .whl/ (git-ignored), fetched beforehand where pip can reach an index:
#   pip download --no-deps --only-binary=:all: -d .whl fla-core==0.6.0
# and are installed into /tmp/site at the start of every run.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize bench profile)
failed=()
export PYTHONUNBUFFERED=1

say() { echo "== $*" | tee -a "$LOG"; }
run_stage() {  # name, command...
  local name=$1; shift
  local t0=$(date +%s)
  say "$name: $*"
  if "$@" 2>&1 | tee -a "$LOG"; then
    say "$name: ok ($(( $(date +%s) - t0 )) s)"
  else
    say "$name: FAILED ($(( $(date +%s) - t0 )) s)"
    failed+=("$name")
  fi
}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
say "gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
nvcc --version 2>&1 | tail -2 | tee -a "$LOG"
$PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)" 2>&1 | tee -a "$LOG"

if [ -z "${ARCHS:-}" ]; then
  cc=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null || echo 90)
  case $cc in 90) ARCHS=90a ;; *) ARCHS=$cc ;; esac
fi

build() {
  LONGATTN_CUDA=1 LONGATTN_CUDA_ARCHS=$ARCHS LONGATTN_BUILD_JOBS=$JOBS LONGATTN_BUILD_TYPE=Release \
    $PY -m pip install --no-build-isolation --no-deps --no-cache-dir -e . &&
    $PY -m longattn info
}
tests() {
  $PY -m pytest tests -m cuda -q -rfE -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml"
}
sanitize() {
  local rc=0 tool
  for tool in memcheck racecheck synccheck; do
    echo "-- compute-sanitizer --tool $tool" | tee -a "$OUT/sanitize.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      $PY tools/gpu_sanitize_cases.py 2>&1 | tee -a "$OUT/sanitize.log" | tail -5 || rc=1
  done
  return $rc
}
bench() {
  $PY -m longattn bench --device cuda --no-progress --out "$OUT/bench" &&
    tar -C "$OUT" -czf "$OUT/bench.tar.gz" bench && rm -rf "$OUT/bench" &&
    LONGATTN_CUDA_GQA_PACK=0 $PY -m longattn bench --ops decode --device cuda --no-progress --out "$OUT/bench_nopack" &&
    tar -C "$OUT" -czf "$OUT/bench_nopack.tar.gz" bench_nopack && rm -rf "$OUT/bench_nopack"
}
layout_bench() {  # name, ops, build knob assignments...
  local name=$1 ops=$2; shift 2
  if (export "$@"; build); then
    $PY -m longattn bench --ops "$ops" --device cuda --no-progress --out "$OUT/$name" &&
      tar -C "$OUT" -czf "$OUT/$name.tar.gz" "$name" && rm -rf "$OUT/$name"
  else
    return 1
  fi
}
layout() {
  local rc=0
  layout_bench bench_strips1 attention,block_sparse LONGATTN_FWD_STRIPS=1 || rc=1
  layout_bench bench_sparse2s128 block_sparse LONGATTN_SPARSE_FWD_2STRIP_DP=128 || rc=1
  build || rc=1  # back to the default layout
  return $rc
}
profile() {
  ncu --set full --import-source yes -k regex:flash_ --launch-skip 4 -c 4 -f -o "$OUT/flash" \
    $PY tools/gpu_profile_flash.py &&
    ncu --import "$OUT/flash.ncu-rep" --page details > "$OUT/flash_ncu.txt"
}

for s in "${stages[@]}"; do
  case $s in
    build) run_stage build build ;;
    test) run_stage test tests ;;
    sanitize) run_stage sanitize sanitize ;;
    bench) run_stage bench bench ;;
    profile) run_stage profile profile ;;
    layout) run_stage layout layout ;;
    *) say "unknown stage $s"; failed+=("$s") ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then say "FAILED stages: ${failed[*]}"; exit 1; fi
say "all stages ok: ${stages[*]}"
