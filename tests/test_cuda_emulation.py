"""Runs the CUDA kernels on the host through tests/cuda_emulation (every CUDA thread a host
thread, mma / ldmatrix / cp.async / shuffles emulated per the PTX ISA) and compares them
with float64 references. It checks the kernels' indexing, masking and pipelines without a
GPU; it is not a substitute for the GPU tests (timing, memory model, the real compiler).
Needs g++ and the CUDA headers; skipped without them."""
import os
import re
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "cuda_emulation" / "run.sh"
# run.sh arguments and extra environment of each suite; the flash forward is also checked in
# its other build layout (LONGATTN_FWD_STRIPS=1: one 16-row strip per warp).
SUITES = {
    "flash": ([], {}),
    "flash-strips1": (["no-sparse"], {"EMU_CXXFLAGS": "-DLONGATTN_FWD_STRIPS=1"}),
    "linear": (["linear"], {}),
    "rope": (["rope"], {}),
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
