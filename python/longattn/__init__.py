"""longattn: attention kernels for long-context language models.

Ops accept torch, NumPy, CuPy, Numba CUDA and JAX arrays and return the caller's type on the
caller's device. See README.md for the status of each op on CPU and CUDA.
"""
from __future__ import annotations

from . import _C, masks
from .block_mask import BlockMask, ElementMask
from .block_sparse import block_sparse_attention
from .attention import flash_attention, flash_attention_varlen, merge_states
from .linear_attention import linear_attention, linear_attention_step
from .rope import apply_rope
from .rope_scaling import ROPE_TYPES, rope_frequencies

__version__ = "0.1.0"

__all__ = [
    "flash_attention",
    "flash_attention_varlen",
    "merge_states",
    "block_sparse_attention",
    "BlockMask",
    "ElementMask",
    "masks",
    "linear_attention",
    "linear_attention_step",
    "apply_rope",
    "rope_frequencies",
    "ROPE_TYPES",
    "build_info",
    "cuda_available",
    "num_threads",
    "set_num_threads",
    "empty_cache",
    "cpu_cache_bytes",
    "set_cpu_cache_limit",
]


def cuda_available() -> bool:
    """True when the CUDA backend was compiled and a GPU with a working driver is visible."""
    info = _C.build_info()
    return bool(info["cuda_compiled"]) and info["cuda_device_count"] > 0


def build_info() -> dict:
    """What this build contains and what it sees: version, CPU ISA level the CPU kernels
    dispatch to, thread count, CUDA compiled or not, archs, runtime version, visible GPUs."""
    info = dict(_C.build_info())
    archs = info.pop("cuda_archs")
    info["cuda_archs"] = [a for a in archs.split(",") if a]
    info["cuda_available"] = bool(info["cuda_compiled"]) and info["cuda_device_count"] > 0
    info["version"] = __version__
    return info


def num_threads() -> int:
    """Threads used by the CPU kernels (LONGATTN_NUM_THREADS, default: CPUs available)."""
    return _C.num_threads()


def set_num_threads(n: int) -> None:
    """Sets the number of threads the CPU kernels use."""
    _C.set_num_threads(int(n))


def empty_cache() -> None:
    """Frees the CPU scratch buffers kept between calls (see set_cpu_cache_limit)."""
    _C.empty_cache()


def cpu_cache_bytes() -> int:
    """Bytes currently held by released CPU scratch buffers, kept for the next call."""
    return int(_C.cpu_cache_bytes())


def set_cpu_cache_limit(nbytes: int) -> None:
    """Caps the bytes of CPU scratch buffers kept between calls (default 256 MiB, or
    LONGATTN_CPU_CACHE_MB; 0 keeps none). Reusing them spares a call the first-touch page
    faults of its packing buffers, which on a 2-core VM cost 28 ms for the 64 MiB of packed
    K/V at S=16384, H=8, D=64: more than a decoding step's arithmetic. Lowering the limit
    frees cached buffers at once.
    """
    _C.set_cpu_cache_limit(int(nbytes))
