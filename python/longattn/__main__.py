"""Command line: ``python -m longattn info`` and ``python -m longattn bench``."""
from __future__ import annotations

import argparse
import sys
import time


def _info(args: argparse.Namespace) -> int:
    import longattn

    try:
        info = longattn.build_info()
    except Exception as exc:
        print(f"longattn: the compiled module is not usable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"longattn {info.get('version', '?')}")
    cache = info.get("cpu_cache_limit")
    cache = f", scratch cache {cache >> 20} MiB" if isinstance(cache, int) else ""
    isa = str(info.get("cpu_isa", "?")) + (" + bf16 dot product" if info.get("cpu_bf16_dot") else "")
    print(f"  CPU backend   {isa}, {info.get('num_threads', '?')} threads{cache}")
    if info.get("cuda_compiled"):
        archs = ", ".join(info.get("cuda_archs") or []) or "?"
        runtime = info.get("cuda_runtime_version")
        print(f"  CUDA backend  compiled for {archs}" + (f", CUDA runtime {runtime}" if runtime else ""))
        if info.get("flash_fwd_strips") not in (None, 2):
            print(f"  tuning        LONGATTN_FWD_STRIPS={info['flash_fwd_strips']} (flash forward, head dims <= 128)")
        if info.get("sparse_fwd_2strip_dp") not in (None, 64):
            print(f"  tuning        LONGATTN_SPARSE_FWD_2STRIP_DP={info['sparse_fwd_2strip_dp']} (block-sparse forward)")
    else:
        print("  CUDA backend  not compiled")
    devices = info.get("cuda_devices") or []
    if info.get("cuda_available") and devices:
        for i, name in enumerate(devices):
            print(f"  GPU {i}         {name}")
    elif info.get("cuda_compiled"):
        print("  GPU           none usable (no GPU or no driver)")
    return 0


def _resolve_device(requested: str) -> str:
    def usable() -> bool:
        try:
            import torch

            import longattn

            return bool(longattn.cuda_available()) and torch.cuda.is_available()
        except Exception:
            return False

    if requested == "auto":
        return "cuda" if usable() else "cpu"
    if requested == "cuda" and not usable():
        raise SystemExit("longattn bench: --device cuda, but no GPU usable by both longattn and torch")
    return requested


def _bench(args: argparse.Namespace) -> int:
    from . import bench
    from .bench import harness

    entries = bench.load_entries()
    names = [n.strip() for n in args.ops.split(",") if n.strip()] if args.ops else list(entries)
    unknown = [n for n in names if n not in entries]
    if unknown:
        print(f"longattn bench: unknown --ops {', '.join(unknown)}; registered: {', '.join(entries)}",
              file=sys.stderr)
        return 2
    if args.list:
        for name, e in entries.items():
            print(f"{name:10s} {e.description}\n{'':10s} peer: {e.peer}")
        return 0
    chosen = [entries[n] for n in names]

    device = _resolve_device(args.device)
    size = "quick" if args.quick else "full" if args.full else "default"
    repeat = args.repeat if args.repeat is not None else (50 if device == "cuda" else 10)

    def settings_for(entry):
        return harness.Settings(device=device, dtype=args.dtype or entry.default_dtype[device], size=size,
                                warmup=args.warmup, repeat=repeat, max_time_s=args.max_time)

    argv = sys.argv[1:]
    env = harness.environment(device, argv)
    print(f"longattn bench: {', '.join(names)} on {env['device_name']} ({device}), {size} sweep", flush=True)
    t0 = time.perf_counter()
    rows = harness.run(chosen, settings_for, progress=not args.no_progress)
    wall = time.perf_counter() - t0

    for e in chosen:
        erows = [r for r in rows if r.op == e.name]
        if erows:
            print()
            print(harness.table_text(e, erows, env))
    settings = {"ops": names, "size": size, "warmup": args.warmup, "repeat": repeat,
                "max_time_s": args.max_time, "dtype": args.dtype, "wall_s": round(wall, 1)}
    paths = harness.write_reports(chosen, rows, env, settings, args.out)
    print(f"\nwall time {wall:.1f} s; wrote " + ", ".join([paths["json"], paths["markdown"], *paths["plots"]])
          + ("" if paths["plots"] else " (no plots: matplotlib is not installed)"))

    bad = [r for r in rows if r.error or (r.match is not None and not r.match.ok)]
    if bad:
        print(f"longattn bench: {len(bad)} row(s) failed the output check or raised; see the check column",
              file=sys.stderr)
        return 1
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m longattn", description="longattn command line")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print the version and the backends that were built and can run")
    info.set_defaults(func=_info)

    b = sub.add_parser(
        "bench", help="benchmark ops against their peers",
        description="Time each op against its peer in the same run; print a table (ratio = peer time / "
                    "our time, >1 means longattn is faster) and write JSON, Markdown and PNG reports.")
    b.add_argument("--ops", help="comma-separated entries to run (default: all; see --list)")
    b.add_argument("--list", action="store_true", help="list the registered entries and exit")
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when a GPU is usable, else cpu (default: auto)")
    b.add_argument("--dtype", choices=("float64", "float32", "float16", "bfloat16"),
                   help="element type (default: per entry; float32 on cpu, bfloat16 on cuda)")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a tiny sweep, for tests")
    size.add_argument("--full", action="store_true", help="the long sweep (larger sizes, more shapes)")
    b.add_argument("--warmup", type=_positive_int, default=1,
                   help="untimed calls before timing, after the untimed call that checks the output (default: 1)")
    b.add_argument("--repeat", type=_positive_int,
                   help="timed calls; the median is reported (default: 10 on cpu, 50 on cuda)")
    b.add_argument("--max-time", type=float, default=2.0, metavar="SECONDS",
                   help="cap the timed calls of one measurement at about this long, never fewer than 3 "
                        "(0: always --repeat; default: 2)")
    b.add_argument("--out", default="bench/out", help="folder for the JSON, Markdown and PNG (default: bench/out)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
