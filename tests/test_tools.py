"""The GPU check driver (tools/gpu_sanitize_cases.py) runs its cases on the CPU too, so a
change of the public API that would break it shows up here rather than on a GPU machine."""
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sanitize_cases_run_on_cpu():
    script = ROOT / "tools" / "gpu_sanitize_cases.py"
    if not script.exists():
        pytest.skip("tools/ is not part of this checkout")
    r = subprocess.run([sys.executable, str(script), "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "0 failed" in r.stdout
