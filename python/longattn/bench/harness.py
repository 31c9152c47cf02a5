"""Benchmark harness shared by every op family.

An op family plugs in by registering an :class:`Entry`. The entry turns a
:class:`Settings` (device, dtype, sweep size) into a list of :class:`Case` s; each
case allocates its inputs lazily in ``setup()`` and returns one :class:`Workload` per
variant (for example ``fwd`` and ``fwd+bwd``). A workload pairs our callable with the
peer's callable on the same inputs and declares the bytes it moves or the FLOPs it
does, so the harness can report GB/s or TFLOP/s.

The harness owns everything else: it checks once per workload that our output matches
the peer's, times both sides with :func:`measure` (the only timing code in the
package), measures device copy bandwidth on CUDA for memory-bound workloads, prints
the table and writes the JSON, Markdown and PNG reports.

Timing: on CPU each call is timed with ``time.perf_counter``; on CUDA each call is
bracketed by a pair of ``torch.cuda.Event`` s recorded on the current stream, with a
synchronize after the batch. Warmup calls come first; the median (and min) over the
timed calls is reported. The L2 cache is not flushed between calls.
"""
from __future__ import annotations

import datetime
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

SIZES = ("quick", "default", "full")
DTYPES = ("float64", "float32", "float16", "bfloat16")

# Largest elementwise difference accepted between our output and the peer's, as a
# fraction of the larger of 1 and the peer output's magnitude: a few units in the last
# place of the storage dtype. Half-precision peers round every intermediate, so they
# drift further from an fp32-accumulating kernel than the storage precision alone says.
CHECK_TOLERANCE = {
    "float64": 1e-10,
    "float32": 2e-5,
    "float16": 4 * 2.0**-10,
    "bfloat16": 4 * 2.0**-7,
}


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Settings:
    """What one entry is asked to run."""

    device: str  # "cpu" or "cuda"
    dtype: str  # one of DTYPES
    size: str = "default"  # one of SIZES
    warmup: int = 1
    repeat: int = 10
    max_time_s: float = 2.0  # cap on the timed calls of one measurement (0: no cap)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


@dataclass
class Match:
    """Outcome of comparing our output with the peer's."""

    ok: bool
    max_abs_err: float
    tolerance: float
    note: str = ""


@dataclass
class Workload:
    """One variant of one case: our callable and the peer's, on the same inputs.

    ``bytes`` is the DRAM traffic of the ideal kernel (reads plus writes) and gives
    GB/s; ``flops`` gives TFLOP/s (``peer_flops`` when the peer does different work,
    e.g. dense attention against a sparse one). Declare whichever describes the op. ``compare``
    receives the two return values and returns a :class:`Match`; leave it ``None``
    when the outputs are not comparable.
    """

    variant: str
    ours: Callable[[], Any]
    peer: Callable[[], Any]
    bytes: int | None = None
    flops: float | None = None
    compare: Callable[[Any, Any], Match] | None = None
    peer_flops: float | None = None
    # A context the peer's calls run in, entered once around its check call and once around
    # its timed calls (e.g. torch's sdpa_kernel pinning a backend: entered per call it
    # costs ~10 us, as much as a decoding step).
    peer_context: Callable[[], Any] | None = None


@dataclass(frozen=True)
class Case:
    """One point of a sweep. ``params`` become table columns, in their order."""

    params: dict
    setup: Callable[[], Sequence[Workload]]


@dataclass(frozen=True)
class Entry:
    """A benchmark suite for one op family."""

    name: str
    description: str
    peer: str  # what the peer is, in words
    sweep: str  # the param on the x axis of the plot
    cases: Callable[[Settings], Sequence[Case]]
    default_dtype: dict = field(default_factory=lambda: {"cpu": "float32", "cuda": "bfloat16"})
    versions: Callable[[], dict] = dict  # versions of the peer's packages, for the report


_REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    """Add ``entry`` to the registry under ``entry.name`` (replacing any previous one)."""
    _REGISTRY[entry.name] = entry
    return entry


def registered() -> dict[str, Entry]:
    """The registered entries, by name, in registration order."""
    return dict(_REGISTRY)


# ---------------------------------------------------------------------------- timing


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    samples_ms: list

    @classmethod
    def of(cls, samples_ms: list) -> "Timing":
        return cls(statistics.median(samples_ms), min(samples_ms), samples_ms)


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], device: str, *, warmup: int = 1, repeat: int = 10,
            max_time_s: float = 0.0, min_repeat: int = 3) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then up to ``repeat`` timed calls.

    When ``max_time_s`` > 0 the number of timed calls is cut so that they take about
    that long (estimated from the warmup), but never below ``min_repeat``.
    """
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _synchronize(device)
    n = repeat
    if warmup and max_time_s > 0:
        per_call = (time.perf_counter() - t0) / warmup
        if per_call > 0:
            n = max(min_repeat, min(repeat, int(max_time_s / per_call)))
    n = max(n, 1)

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if device == "cuda":
            import torch

            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            for start, end in zip(starts, ends):
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        else:
            samples = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing.of(samples)


_COPY_CACHE: dict = {}


def copy_bandwidth_gbps(nbytes: int, settings: Settings) -> float:
    """GB/s of a device-to-device torch copy that reads and writes ``nbytes`` in all."""
    key = (settings.device, nbytes)
    if key not in _COPY_CACHE:
        import torch

        n = max(1, nbytes // 2 // 4)
        src = torch.empty(n, dtype=torch.float32, device=settings.device).uniform_()
        dst = torch.empty_like(src)
        t = measure(lambda: dst.copy_(src), settings.device, warmup=settings.warmup,
                    repeat=settings.repeat, max_time_s=settings.max_time_s)
        _COPY_CACHE[key] = 2 * n * 4 / (t.median_ms * 1e-3) / 1e9
        del src, dst
    return _COPY_CACHE[key]


# ------------------------------------------------------------------------ comparison


def _flatten(x) -> list:
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _flatten(item)]
    return [] if x is None else [x]


def compare_outputs(ours, peer, dtype: str, tolerance: float | None = None) -> Match:
    """Elementwise check of (nested tuples of) tensors with a tolerance for ``dtype``.

    Accepts |ours - peer| <= tol * max(1, max|peer|) per element, with ``tol`` from
    CHECK_TOLERANCE unless ``tolerance`` is given: an error that scales with the data,
    as rounding does. ``Match.max_abs_err`` is reported on the same relative scale.
    """
    import torch

    a_list, b_list = _flatten(ours), _flatten(peer)
    tol = CHECK_TOLERANCE[dtype] if tolerance is None else tolerance
    if len(a_list) != len(b_list):
        return Match(False, math.inf, tol, f"{len(a_list)} outputs vs {len(b_list)}")
    worst = 0.0
    ok = True
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        a = torch.as_tensor(a).detach()
        b = torch.as_tensor(b).detach()
        if a.shape != b.shape:
            return Match(False, math.inf, tol, f"output {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        scale = max(1.0, b64.abs().max().item()) if b64.numel() else 1.0
        err = (a64 - b64).abs().max().item() if b64.numel() else 0.0
        if not math.isfinite(err) or err > tol * scale:
            ok = False
        worst = max(worst, err / scale) if math.isfinite(err) else math.inf
    return Match(ok, worst, tol)


# ------------------------------------------------------------------------------ runs


@dataclass
class Row:
    op: str
    variant: str
    params: dict
    dtype: str
    ours: Timing | None = None
    peer: Timing | None = None
    bytes: int | None = None
    flops: float | None = None
    peer_flops: float | None = None
    match: Match | None = None
    copy_gbps: float | None = None
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        """peer time / our time: above 1 means we are faster."""
        if self.ours and self.peer and self.ours.median_ms > 0:
            return self.peer.median_ms / self.ours.median_ms
        return None

    def rate(self, side: str) -> tuple[float | None, float | None]:
        """(GB/s, TFLOP/s) of ``side`` ("ours" or "peer") from its median time."""
        t = getattr(self, side)
        if t is None or t.median_ms <= 0:
            return None, None
        s = t.median_ms * 1e-3
        gbps = self.bytes / s / 1e9 if self.bytes else None
        flops = self.peer_flops if side == "peer" and self.peer_flops else self.flops
        tflops = flops / s / 1e12 if flops else None
        return gbps, tflops

    def to_json(self) -> dict:
        ours_gbps, ours_tflops = self.rate("ours")
        peer_gbps, peer_tflops = self.rate("peer")
        return {
            "op": self.op,
            "variant": self.variant,
            "dtype": self.dtype,
            "params": self.params,
            "ours_median_ms": self.ours.median_ms if self.ours else None,
            "ours_min_ms": self.ours.min_ms if self.ours else None,
            "ours_samples_ms": self.ours.samples_ms if self.ours else None,
            "peer_median_ms": self.peer.median_ms if self.peer else None,
            "peer_min_ms": self.peer.min_ms if self.peer else None,
            "peer_samples_ms": self.peer.samples_ms if self.peer else None,
            "ratio": self.ratio,
            "bytes": self.bytes,
            "flops": self.flops,
            "ours_gbps": ours_gbps,
            "peer_gbps": peer_gbps,
            "ours_tflops": ours_tflops,
            "peer_tflops": peer_tflops,
            "copy_gbps": self.copy_gbps,
            "ours_fraction_of_copy": ours_gbps / self.copy_gbps if ours_gbps and self.copy_gbps else None,
            "match": asdict(self.match) if self.match else None,
            "error": self.error,
        }


def _run_workload(entry: Entry, case: Case, w: Workload, settings: Settings) -> Row:
    row = Row(entry.name, w.variant, dict(case.params), settings.dtype, bytes=w.bytes, flops=w.flops,
              peer_flops=w.peer_flops)
    try:
        peer_context = w.peer_context or contextlib.nullcontext
        ours_out = w.ours()
        with peer_context():
            peer_out = w.peer()
        _synchronize(settings.device)
        if w.compare is not None:
            row.match = w.compare(ours_out, peer_out)
        del ours_out, peer_out
        kw = dict(warmup=settings.warmup, repeat=settings.repeat, max_time_s=settings.max_time_s)
        row.ours = measure(w.ours, settings.device, **kw)
        with peer_context():
            row.peer = measure(w.peer, settings.device, **kw)
        if settings.device == "cuda" and w.bytes:
            row.copy_gbps = copy_bandwidth_gbps(w.bytes, settings)
    except Exception as exc:  # one failing case must not lose the rest of the sweep
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return row


def run(entries: Sequence[Entry], settings_for: Callable[[Entry], Settings],
        progress: bool = True) -> list[Row]:
    """Run every case of every entry; return one :class:`Row` per workload."""
    from tqdm.auto import tqdm

    plan = [(e, settings_for(e)) for e in entries]
    plan = [(e, s, list(e.cases(s))) for e, s in plan]
    rows: list[Row] = []
    with tqdm(total=sum(len(c) for _, _, c in plan), unit="case", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for entry, settings, cases in plan:
            for case in cases:
                bar.set_description(f"{entry.name} " + " ".join(f"{k}={v}" for k, v in case.params.items()))
                try:
                    workloads = case.setup()
                except Exception as exc:
                    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                    rows.append(Row(entry.name, "setup", dict(case.params), settings.dtype, error=msg))
                    bar.update()
                    continue
                for w in workloads:
                    rows.append(_run_workload(entry, case, w, settings))
                del workloads
                _release_memory(settings.device)
                bar.update()
    return rows


def _release_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# ------------------------------------------------------------------------- reporting


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if x == 0 or not math.isfinite(x):
        return str(x)
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:.{decimals}f}"


def format_table(rows: Sequence[Row]) -> str:
    """A fixed-width table of ``rows`` (all from one entry)."""
    param_keys: list = []
    for r in rows:
        for k in r.params:
            if k not in param_keys:
                param_keys.append(k)
    any_bytes = any(r.bytes for r in rows)
    any_flops = any(r.flops for r in rows)
    any_copy = any(r.copy_gbps for r in rows)

    header = ["variant", *param_keys, "ours ms", "peer ms", "ratio"]
    if any_bytes:
        header += ["ours GB/s", "peer GB/s"]
    if any_flops:
        header += ["ours TFLOP/s", "peer TFLOP/s"]
    if any_copy:
        header += ["copy GB/s", "% copy"]
    header.append("check")

    body = []
    for r in rows:
        (og, ot), (pg, pt) = r.rate("ours"), r.rate("peer")
        line = [r.variant, *[str(r.params.get(k, "")) for k in param_keys],
                _fmt(r.ours.median_ms if r.ours else None), _fmt(r.peer.median_ms if r.peer else None),
                f"{r.ratio:.2f}" if r.ratio is not None else "-"]
        if any_bytes:
            line += [_fmt(og, 3), _fmt(pg, 3)]
        if any_flops:
            line += [_fmt(ot, 3), _fmt(pt, 3)]
        if any_copy:
            line += [_fmt(r.copy_gbps, 4), f"{100 * og / r.copy_gbps:.0f}%" if og and r.copy_gbps else "-"]
        if r.error:
            line.append("ERROR " + r.error)
        elif r.match is None:
            line.append("-")
        elif r.match.ok:
            line.append("ok")
        else:
            line.append(f"MISMATCH err={r.match.max_abs_err:.2e} tol={r.match.tolerance:.0e}"
                        + (f" {r.match.note}" if r.match.note else ""))
        body.append(line)

    ncols = len(header) - 1  # the last column is free text
    widths = [max(len(header[i]), *(len(b[i]) for b in body)) for i in range(ncols)]
    left = {0}  # variant is left-aligned, numbers right-aligned

    def render(cells):
        out = [c.ljust(widths[i]) if i in left else c.rjust(widths[i]) for i, c in enumerate(cells[:ncols])]
        return "  ".join(out + [cells[ncols]]).rstrip()

    lines = [render(header), "  ".join("-" * w for w in widths) + "  -----"]
    lines += [render(b) for b in body]
    return "\n".join(lines)


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (platform fallbacks elsewhere)."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the source tree, if it is a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    info = {"commit": None, "dirty": None}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode == 0:
            info["commit"] = sha.stdout.strip()
            # Tracked files only: untracked ones (the report folder being written) do not
            # change what was built.
            st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10)
            info["dirty"] = bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def environment(device: str, argv: Sequence[str]) -> dict:
    """Where and how a run happened: recorded at the top of every report."""
    import torch

    import longattn

    try:
        build = longattn.build_info()
    except Exception as exc:
        build = {"error": f"{type(exc).__name__}: {exc}"}
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "longattn", *argv]),
        "device": device,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        **git_commit(),
        "longattn": build,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device == "cuda":
        env["torch_cuda"] = torch.version.cuda
    return env


def _plot(entry: Entry, rows: Sequence[Row], env: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    # One line per (variant, params other than the swept one).
    groups: dict = {}
    for r in rows:
        if r.ours is None or r.peer is None or entry.sweep not in r.params:
            continue
        rest = ", ".join(f"{k}={v}" for k, v in r.params.items() if k != entry.sweep)
        groups.setdefault(f"{r.variant} ({rest})" if rest else r.variant, []).append(r)

    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (label, grp) in enumerate(groups.items()):
        grp = sorted(grp, key=lambda r: r.params[entry.sweep])
        xs = [r.params[entry.sweep] for r in grp]
        color = f"C{i % 10}"
        ax_t.plot(xs, [r.ours.median_ms for r in grp], "o-", color=color, label=f"ours {label}")
        ax_t.plot(xs, [r.peer.median_ms for r in grp], "s--", color=color, label=f"peer {label}")
        ax_r.plot(xs, [r.ratio for r in grp], "o-", color=color, label=label)
    for ax in (ax_t, ax_r):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(entry.sweep)
        ax.grid(True, which="both", alpha=0.3)
    xticks = sorted({r.params[entry.sweep] for grp in groups.values() for r in grp})
    for ax in (ax_t, ax_r):
        ax.set_xticks(xticks, [str(x) for x in xticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax_t.set_yscale("log")
    ax_t.set_ylabel("median time (ms)")
    ax_t.legend(fontsize=7)
    ax_r.axhline(1.0, color="k", lw=0.8)
    ax_r.set_ylabel("peer time / our time (>1: ours faster)")
    ax_r.legend(fontsize=7)
    dtype = rows[0].dtype if rows else ""
    fig.suptitle(f"{entry.name}: ours vs {entry.peer}\n{env['device_name']} ({env['device']}, {dtype}), "
                 f"{env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_text(entry: Entry, rows: Sequence[Row], env: dict) -> str:
    dtypes = sorted({r.dtype for r in rows})
    title = (f"{entry.name}: {entry.description}\n"
             f"peer: {entry.peer}\n"
             f"{env['device_name']} ({env['device']}, {'/'.join(dtypes)}); ratio = peer ms / ours ms")
    return title + "\n" + format_table(rows)


def write_reports(entries: Sequence[Entry], rows: Sequence[Row], env: dict, settings: dict,
                  out_dir: str) -> dict:
    """Write ``bench-<device>-<dtype>.json`` and ``.md`` and one PNG per entry to ``out_dir``.

    Returns {"json": path, "markdown": path, "plots": [paths]}.
    """
    os.makedirs(out_dir, exist_ok=True)
    dtypes = "-".join(sorted({r.dtype for r in rows})) or "none"
    stem = os.path.join(out_dir, f"bench-{env['device']}-{dtypes}")
    report = {
        "schema": 1,
        **env,
        "settings": settings,
        "entries": {e.name: {"description": e.description, "peer": e.peer, "peer_versions": e.versions()}
                    for e in entries},
        "results": [r.to_json() for r in rows],
    }
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")

    plots = []
    try:
        import matplotlib  # noqa: F401  (the bench extra; without it the tables are still written)

        can_plot = True
    except ImportError:
        can_plot = False
    md = [f"# longattn benchmark: {env['device_name']} ({env['device']})", "",
          f"- date: {env['date']}", f"- commit: {env['commit'] or 'unknown'}"
          + (" (with local changes)" if env.get("dirty") else ""),
          f"- command: `{env['command']}`",
          f"- longattn {env['longattn'].get('version', '?')}, torch {env['torch']}"
          f" ({env['torch_threads']} threads)", ""]
    for e in entries:
        erows = [r for r in rows if r.op == e.name]
        if not erows:
            continue
        md += ["```", table_text(e, erows, env), "```", ""]
        if not can_plot:
            continue
        png = os.path.join(out_dir, f"{e.name}-{env['device']}-{'-'.join(sorted({r.dtype for r in erows}))}.png")
        _plot(e, erows, env, png)
        plots.append(png)
    if not can_plot:
        md += ["(no plots: matplotlib is not installed; `pip install \".[bench]\"` adds it)", ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md))
    return {"json": stem + ".json", "markdown": stem + ".md", "plots": plots}
