"""The command line: `python -m longattn info` and a tiny `python -m longattn bench`."""
import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "longattn", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_info_prints_version_and_backends_and_exits_zero():
    import longattn

    res = run_cli("info")
    assert res.returncode == 0, res.stderr
    assert longattn.build_info()["version"] in res.stdout
    assert "CPU backend" in res.stdout
    assert "CUDA backend" in res.stdout


def test_bench_quick_rope_writes_json_png_and_prints_ratio(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    res = run_cli("bench", "--ops", "rope", "--quick", "--device", "cpu", "--repeat", "3",
                  "--no-progress", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr

    header = next(line for line in res.stdout.splitlines() if line.startswith("variant"))
    assert {"ours ms", "peer ms", "ratio", "ours GB/s", "peer GB/s", "check"} <= {
        c.strip() for c in header.split("  ") if c.strip()}

    (json_path,) = out.glob("*.json")
    assert list(out.glob("rope*.png"))
    report = json.loads(json_path.read_text())
    for key in ("date", "command", "device", "device_name", "commit", "longattn", "torch", "results"):
        assert key in report
    assert report["device"] == "cpu"
    rows = report["results"]
    assert {r["variant"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert r["op"] == "rope" and r["error"] is None
        assert r["match"]["ok"]
        assert r["ours_median_ms"] > 0 and r["peer_median_ms"] > 0
        assert r["ratio"] == pytest.approx(r["peer_median_ms"] / r["ours_median_ms"])
        assert r["ours_gbps"] > 0 and r["peer_gbps"] > 0


def test_bench_rejects_unknown_op(tmp_path):
    res = run_cli("bench", "--ops", "no_such_op", "--out", str(tmp_path))
    assert res.returncode == 2
    assert "no_such_op" in res.stderr and "rope" in res.stderr
    assert not os.listdir(tmp_path)


def test_bench_without_matplotlib_still_writes_json_and_markdown(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    code = ("import sys; sys.modules['matplotlib'] = None; from longattn.__main__ import main; "
            f"sys.exit(main(['bench', '--ops', 'rope', '--quick', '--device', 'cpu', '--repeat', '3', "
            f"'--no-progress', '--out', {str(out)!r}]))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no plots: matplotlib is not installed" in res.stdout
    assert len(list(out.glob("*.json"))) == 1 and not list(out.glob("*.png"))
    (md,) = out.glob("*.md")
    text = md.read_text()
    assert "variant" in text and "matplotlib is not installed" in text
