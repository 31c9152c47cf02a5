"""Runs the CUDA kernels on the host through tests/cuda_emulation (every CUDA thread a host
thread, mma / ldmatrix / cp.async / shuffles emulated per the PTX ISA) and compares them
with float64 references. It checks the kernels' indexing, masking and pipelines without a
GPU; it is not a substitute for the GPU tests (timing, memory model, the real compiler).
Needs g++ and the CUDA headers; skipped without them.

The sanitizer suites build the same emulation under ThreadSanitizer (shared-memory hazards
between emulated threads: a missing barrier, a tile refilled while other warps read it,
what compute-sanitizer racecheck looks for; a subset of cases, as TSan is slow) and under
AddressSanitizer + UBSan (out-of-bounds global or shared-memory accesses, memcheck's class;
a subset with the edge cases). Every emulated CTA starts with its shared memory filled with 0xff (NaNs), so
a read of shared memory the kernel never wrote shows in the results (initcheck's class)."""
import os
import re
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "cuda_emulation" / "run.sh"
# run.sh arguments and extra environment of each suite; the flash forward is also checked in
# its other build layouts: LONGATTN_FWD_STRIPS=1 (one 16-row strip per warp, dense and
# block-sparse, at every head dim) and LONGATTN_SPARSE_FWD_2STRIP_DP=128 (the block-sparse
# forward with two strips and 32-key tiles at head dims 96 and 128).
SUITES = {
    "flash": ([], {}),
    "flash-strips1": ([], {"EMU_CXXFLAGS": "-DLONGATTN_FWD_STRIPS=1"}),
    "flash-sparse-2strip128": (["sparse"], {"EMU_CXXFLAGS": "-DLONGATTN_SPARSE_FWD_2STRIP_DP=128"}),
    "linear": (["linear"], {}),
    "rope": (["rope"], {}),
    # Sanitizer builds. The TSan subsets cover each kernel and pipeline: the forward over
    # three key tiles, the atomic-dQ and the deterministic-dQ backward, the Dp 96 / 256
    # buckets, varlen, block-sparse with bit tiles, split-KV with its merge, GQA packing;
    # linear: both chunk walks with cp.async and several chunks, the normalizer's dK walk,
    # the step kernel, varlen.
    "flash-tsan": (["bf16 d64 window long|f16 d64 window softcap alibi dlse|bf16 d80/72 gqa causal det|"
                    "f16 d256 window det|bf16 d32 varlen window alibi det|"
                    "sparse bits bf16 d128 b128/64 batch window sink dlse det|"
                    "sparse bits f16 d64 b64/128 gqa causal pool3 det|split f16 d64 decode gqa|"
                    "split f16 d32 varlen window softcap|pack f16 d40/72 varlen causal gqa2"], {"EMU_SAN": "thread"}),
    "linear-tsan": (["linear", "pipeline T=300 normalize relu per-head decay|pipeline non-causal T=200 normalize V=64|"
                     "step K=130|pipeline varlen"], {"EMU_SAN": "thread"}),
    "rope-tsan": (["rope"], {"EMU_SAN": "thread"}),
    # The ASan subsets add the cases at the edges of the buffers: odd head dims (scalar
    # loads), no keys / no queries, out-of-range bit-tile pool indices, unaligned rows.
    "flash-asan": (["bf16 d64 window long|bf16 d80/72 gqa causal det|f16 d256 window det|f16 d33 odd|"
                    "bf16 d32 varlen window alibi det|f16 d64 no keys|f16 d64 no queries|bad-ids|"
                    "sparse f16 d64 nothing listed|split f16 d32 varlen|split bf16 d256/200|"
                    "pack split f16 d40/72"], {"EMU_SAN": "address"}),
    "linear-asan": (["linear", "pipeline varlen|step K=130|no final-state gradient|fallback T=300|"
                     "K=200 (bucket 256)|T=1 chunk"], {"EMU_SAN": "address"}),
    "rope-asan": (["rope"], {"EMU_SAN": "address"}),
}


def _cuda_headers() -> bool:
    dirs = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"] + [str(p) for p in pathlib.Path("/usr/local").glob("cuda-*")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        dirs.append(str(pathlib.Path(nvcc).resolve().parents[1]))
    return any(d and (pathlib.Path(d) / "include" / "cuda_bf16.h").exists() for d in dirs)


@pytest.mark.skipif(shutil.which("g++") is None or not _cuda_headers(), reason="needs g++ and the CUDA headers")
@pytest.mark.parametrize("suite", sorted(SUITES))
def test_cuda_kernels_under_host_emulation(suite, tmp_path):
    args, extra_env = SUITES[suite]
    env = dict(os.environ, TMPDIR=str(tmp_path), **extra_env)
    r = subprocess.run(["sh", str(SCRIPT)] + args, capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    assert re.search(r"^0 failure\(s\)", r.stdout, re.M), r.stdout[-6000:]
