"""Arrays from any framework, described for the compiled module.

Every public op accepts torch tensors, NumPy arrays, CuPy arrays, Numba CUDA arrays and JAX
arrays. `wrap` describes one argument (pointer, shape, strides in elements, dtype, device)
without copying; `check_same_place` enforces one framework and one device per call;
`empty` allocates outputs in the caller's framework on the caller's device; `stream_of`
finds the caller's current CUDA stream. Nothing here imports a framework that the caller
did not already import.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from . import _C

# Codes shared with csrc/include/longattn/tensor.h (DType).
DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3, "int32": 4, "int64": 5}
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
CPU, CUDA = "cpu", "cuda"


@dataclass
class Array:
    """One caller array: the original object plus what the kernels need to read it."""

    obj: Any
    framework: str  # "torch", "numpy", "cupy", "numba", "jax"
    device: str  # "cpu" or "cuda"
    device_id: int
    dtype: str
    shape: tuple
    strides: tuple  # in elements
    ptr: int
    writable: bool = True
    name: str = "array"  # the argument, for errors
    op: str = "longattn"

    def view(self) -> "_C.TensorView":
        code = DTYPE_CODES.get(self.dtype)
        if code is None:  # an argument whose op never checked its dtype (e.g. int8 alibi_slopes)
            raise TypeError(f"{self.op}: {self.name} has an unsupported dtype {self.dtype}")
        return _C.TensorView(self.ptr, code, 0 if self.device == CPU else 1, self.device_id, list(self.shape),
                             list(self.strides))

    @property
    def where(self) -> str:
        return f"{self.framework} on {self.device}" + (f":{self.device_id}" if self.device == CUDA else "")


def framework_of(x: Any) -> Optional[str]:
    module = type(x).__module__.split(".")[0]
    if module == "torch" and "torch" in sys.modules and isinstance(x, sys.modules["torch"].Tensor):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    if module == "cupy":
        return "cupy"
    if module == "numba" and hasattr(x, "__cuda_array_interface__"):
        return "numba"
    if module in ("jax", "jaxlib"):
        return "jax"
    return None


def _element_strides(byte_strides: Sequence[int], itemsize: int, name: str, op: str) -> tuple:
    out = []
    for s in byte_strides:
        if s % itemsize:
            raise ValueError(f"{op}: {name} has a stride of {s} bytes, not a multiple of its item size {itemsize}")
        out.append(s // itemsize)
    return tuple(out)


_NUMPY_DTYPE_NAMES: dict = {}  # np.dtype -> name, filled as dtypes are seen (dtype.name takes ~1.7 us)


def _numpy_dtype_name(dt: np.dtype) -> str:
    name = _NUMPY_DTYPE_NAMES.get(dt)
    if name is None:
        # A non-native byte order gets a name no op accepts (the kernels would misread it).
        name = _NUMPY_DTYPE_NAMES.setdefault(dt, dt.name if dt.isnative else f"{dt.name} (non-native byte order)")
    return name


def _contiguous_strides(shape: Sequence[int]) -> tuple:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(strides))


_TORCH_DTYPE_NAMES: dict = {}  # torch.float32 -> "float32", filled as dtypes are seen


def wrap(x: Any, name: str, op: str) -> Array:
    """Describes `x` (argument `name` of `op`) without copying it."""
    torch = sys.modules.get("torch")
    fw = "torch" if torch is not None and type(x) is torch.Tensor else framework_of(x)  # the common case first
    if fw == "torch":
        dev = x.device
        kind = dev.type
        if kind not in (CPU, CUDA):
            raise ValueError(f"{op}: {name} is on device {dev}; only cpu and cuda are supported")
        dtype = _TORCH_DTYPE_NAMES.get(x.dtype)
        if dtype is None:
            dtype = _TORCH_DTYPE_NAMES.setdefault(x.dtype, str(x.dtype).replace("torch.", ""))
        device_id = (dev.index or 0) if kind == CUDA else 0
        return Array(x, fw, kind, device_id, dtype, tuple(x.shape), tuple(x.stride()), x.data_ptr(), True, name, op)
    if fw == "numpy":
        dtype = _numpy_dtype_name(x.dtype)
        return Array(x, fw, CPU, 0, dtype, tuple(x.shape), _element_strides(x.strides, x.itemsize, name, op),
                     x.ctypes.data, bool(x.flags.writeable), name, op)
    if fw == "cupy":
        dtype = _numpy_dtype_name(x.dtype)
        return Array(x, fw, CUDA, int(x.device.id), dtype, tuple(x.shape),
                     _element_strides(x.strides, x.itemsize, name, op), int(x.data.ptr), True, name, op)
    if fw == "numba":
        cai = x.__cuda_array_interface__
        dt = np.dtype(cai["typestr"])
        shape = tuple(cai["shape"])
        strides = (_element_strides(cai["strides"], dt.itemsize, name, op) if cai.get("strides")
                   else _contiguous_strides(shape))
        from numba import cuda as numba_cuda

        return Array(x, fw, CUDA, int(numba_cuda.get_current_device().id), _numpy_dtype_name(dt), shape, strides,
                     int(cai["data"][0]), not cai["data"][1], name, op)
    if fw == "jax":
        devices = list(x.devices())
        if len(devices) != 1:
            raise ValueError(f"{op}: {name} is sharded over {len(devices)} devices; pass a single-device array")
        dev = devices[0]
        if dev.platform == CPU:
            host = np.asarray(x)  # zero-copy view of the CPU buffer
            return Array(x, fw, CPU, 0, _numpy_dtype_name(host.dtype), tuple(host.shape),
                         _element_strides(host.strides, host.itemsize, name, op), host.ctypes.data, False, name, op)
        if dev.platform in ("gpu", CUDA):
            x.block_until_ready()
            dt = np.dtype(x.dtype)
            return Array(x, fw, CUDA, int(dev.id), _numpy_dtype_name(dt), tuple(x.shape),
                         _contiguous_strides(x.shape), int(x.unsafe_buffer_pointer()), False, name, op)
        raise ValueError(f"{op}: {name} is a JAX array on {dev.platform}; only cpu and cuda are supported")
    raise TypeError(f"{op}: {name} must be a torch tensor or a NumPy, CuPy, Numba CUDA or JAX array, "
                    f"got {type(x).__module__}.{type(x).__name__}")


def check_same_place(op: str, first_name: str, first: Array, **others: Optional[Array]) -> None:
    """One framework and one device per call: TypeError / ValueError naming the argument."""
    for name, a in others.items():
        if a is None:
            continue
        if a.framework != first.framework:
            raise TypeError(f"{op}: {name} is a {a.framework} array but {first_name} is a {first.framework} "
                            f"array; pass arrays of one framework")
        if (a.device, a.device_id) != (first.device, first.device_id):
            raise ValueError(f"{op}: {name} is on {a.where} but {first_name} is on {first.where}")


FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_float(op: str, **arrays: Optional[Array]) -> None:
    """TypeError naming the first argument (None ones skipped) that does not hold floats."""
    for name, a in arrays.items():
        if a is not None and a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {a.dtype}")


def empty(like: Array, shape: Sequence[int], dtype: Optional[str] = None) -> Any:
    """A new contiguous array in the framework and on the device of `like`."""
    dtype = dtype or like.dtype
    shape = tuple(int(s) for s in shape)
    fw = like.framework
    if fw == "torch":
        torch = sys.modules["torch"]
        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.obj.device)
    if fw == "numpy" or (fw == "jax" and like.device == CPU):
        return np.empty(shape, dtype=_numpy_dtype(dtype))
    if fw == "cupy":
        import cupy

        with cupy.cuda.Device(like.device_id):
            return cupy.empty(shape, dtype=_numpy_dtype(dtype))
    if fw == "numba":
        from numba import cuda as numba_cuda

        return numba_cuda.device_array(shape, dtype=_numpy_dtype(dtype))
    raise NotImplementedError(f"allocating outputs for {like.where} arrays is not supported; "
                              f"pass torch, CuPy or Numba arrays on CUDA")


def to_caller(like: Array, out: Any) -> Any:
    """Converts an output allocated by `empty` into the caller's array type (JAX only)."""
    if like.framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(out)
    return out


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def astype(a: Array, dtype: str, name: str, op: str) -> Array:
    """`a` converted to `dtype` in its own framework (a small copy, e.g. of positions)."""
    fw = a.framework
    if fw == "torch":
        torch = sys.modules["torch"]
        return wrap(a.obj.to(getattr(torch, dtype)), name, op)
    if fw in ("numpy", "cupy") or (fw == "jax" and a.device == CPU):
        base = np.asarray(a.obj) if fw == "jax" else a.obj
        return wrap(base.astype(dtype), name, op)
    if fw == "numba":
        from numba import cuda as numba_cuda

        return wrap(numba_cuda.to_device(a.obj.copy_to_host().astype(dtype)), name, op)
    raise NotImplementedError(f"{op}: converting {name} on {a.where} is not supported; pass int32 or int64")


def from_sequence(like: Array, values: Any, name: str, op: str) -> Array:
    """A Python sequence of integers turned into an int64 array beside `like`."""
    host = np.asarray(values)
    if host.dtype.kind not in "iu":
        raise TypeError(f"{op}: {name} must hold integers, got {host.dtype}")
    host = host.astype(np.int64)
    fw = like.framework
    if fw == "torch":
        torch = sys.modules["torch"]
        return wrap(torch.from_numpy(host).to(like.obj.device), name, op)
    if fw == "numpy" or (fw == "jax" and like.device == CPU):
        return wrap(host, name, op)
    if fw == "cupy":
        import cupy

        with cupy.cuda.Device(like.device_id):
            return wrap(cupy.asarray(host), name, op)
    if fw == "numba":
        from numba import cuda as numba_cuda

        return wrap(numba_cuda.to_device(host), name, op)
    raise NotImplementedError(f"{op}: pass {name} as an array of the same framework as the inputs")


def stream_of(a: Array, stream: Optional[int]) -> int:
    """The CUDA stream to launch on: `stream` if given, else the caller's current stream."""
    if stream is not None:
        if isinstance(stream, bool) or not isinstance(stream, int):
            stream = getattr(stream, "cuda_stream", getattr(stream, "ptr", stream))
        if not isinstance(stream, int):
            raise TypeError(f"stream must be an int (a cudaStream_t) or a torch/CuPy stream, got {type(stream)}")
        return stream
    if a.device != CUDA:
        return 0
    if a.framework == "torch":
        torch = sys.modules["torch"]
        return int(torch.cuda.current_stream(a.obj.device).cuda_stream)
    if a.framework == "cupy":
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)
    return 0  # Numba and JAX: the legacy default stream, which orders after their work
