"""Benchmarks of longattn's ops against peers, run by ``python -m longattn bench``.

Each op family has a module here that registers a :class:`~longattn.bench.harness.Entry`
when imported; :func:`load_entries` imports them all. See ``bench/README.md``.
"""
import importlib

from .harness import Case, Entry, Match, Settings, Workload, compare_outputs, measure, register, registered

# Modules that register the built-in entries, in the order they are run and listed.
BUILTIN_ENTRIES = ("rope", "attention", "block_sparse", "linear_attention")


def load_entries() -> dict:
    """Import every built-in entry module and return the registry, by name."""
    for name in BUILTIN_ENTRIES:
        importlib.import_module(f"{__name__}.{name}")
    return registered()


__all__ = ["BUILTIN_ENTRIES", "Case", "Entry", "Match", "Settings", "Workload", "compare_outputs",
           "load_entries", "measure", "register", "registered"]
