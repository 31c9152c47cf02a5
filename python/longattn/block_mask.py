"""Block-sparse attention masks: which key blocks each query block visits.

A `BlockMask` cuts the q_len x kv_len score matrix into tiles of block_q x block_k
elements (the last row / column of tiles may be cut by q_len / kv_len) and lists, for
every query block, the key blocks an attention kernel must visit, split into

* full blocks: every element of the tile is visible; the kernel applies no mask;
* partial blocks: the kernel applies the element mask `mask` (an `ElementMask`, or None:
  only the tile's own padding, i.e. rows >= q_len and columns >= kv_len, is masked).

Key blocks not listed are skipped: their scores are -inf. The transposed lists (for each
key block, the query blocks that visit it) are kept for the backward pass (dK, dV).

Index layout (int32, C-contiguous, the same as torch FlexAttention's BlockMask):

    kv_num_blocks       (B|1, H|1, nQb)        number of partial key blocks of a query block
    kv_indices          (B|1, H|1, nQb, nKb)   their indices, strictly increasing, then pad
    full_kv_num_blocks  (B|1, H|1, nQb)        the same for full blocks
    full_kv_indices     (B|1, H|1, nQb, nKb)
    q_num_blocks        (B|1, H|1, nKb)        number of query blocks that visit a key block
    q_indices           (B|1, H|1, nKb, nQb)   as partial blocks, strictly increasing, then pad
    full_q_num_blocks   (B|1, H|1, nKb)        ... as full blocks
    full_q_indices      (B|1, H|1, nKb, nQb)

with nQb = ceil(q_len / block_q) and nKb = ceil(kv_len / block_k). Slots after the count
hold 0 in masks built here and are validated to lie in [0, n) in every mask, so reading
a whole row never goes out of bounds. The batch and head dims are the same for all eight
arrays and broadcast when 1. Full blocks never touch the q_len / kv_len edge.

Element mask (`ElementMask`) semantics, bottom-right aligned as `flash_attention`: with
d(i) = i + kv_len - q_len (the diagonal of query i), key j is visible to query i iff

    (not causal or j <= d(i))
    and (   (window_left  == -1 or j >= d(i) - window_left)
            and (window_right == -1 or j <= d(i) + window_right)
         or j < sink_tokens)

i.e. the attention sinks (StreamingLLM) are OR-ed with the window, and causality
applies to both.

Token-granular masks (any pattern: `BlockMask.from_mask_mod`, `from_dense_elements`, the
strided / dilated / Longformer-with-globals builders, unions of different patterns) add
per-tile bit masks for the partial blocks:

    partial_bits        (P, block_q, ceil(block_k / 32))  int32 pool of bit tiles: bit c % 32
                        of word c // 32 of row r set iff element (r, c) of the tile is visible
    kv_bits_index       (B|1, H|1, nQb, nKb)   pool index of each kv_indices slot's tile
    q_bits_index        (B|1, H|1, nKb, nQb)   pool index of each q_indices slot's tile

Tiles with the same bits share one pool entry. An element of a partial block is then
visible iff the element mask (if any) allows it and its bit is set.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from . import _arrays

__all__ = ["BlockMask", "ElementMask"]

_BIG = 1 << 62
_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
           "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
_BITS_FIELDS = ("partial_bits", "kv_bits_index", "q_bits_index")
# Elements evaluated at once when tiles are classified from a predicate (bounds memory).
_TILE_CHUNK_ELEMENTS = 1 << 23
CUDA_BLOCK_SIZES = (64, 128)
CPU_BLOCK_SIZES = (16, 32, 64, 128, 256)


def _is_int(x: Any) -> bool:
    return not isinstance(x, (bool, np.bool_)) and isinstance(x, (int, np.integer))


@dataclass(frozen=True)
class ElementMask:
    """Element-level mask applied inside partial blocks.

    causal: query i sees key j only if j <= i + kv_len - q_len (bottom-right aligned).
    window_left, window_right: keys at most this far left / right of that diagonal are
        visible; -1 is unbounded. (With causal, the right bound is also capped at 0.)
    sink_tokens: keys j < sink_tokens are visible whatever the window (StreamingLLM
        attention sinks), still subject to causal.
    """

    causal: bool = False
    window_left: int = -1
    window_right: int = -1
    sink_tokens: int = 0

    def __post_init__(self):
        if not isinstance(self.causal, (bool, np.bool_)):
            raise TypeError(f"ElementMask: causal must be a bool, got {type(self.causal).__name__}")
        object.__setattr__(self, "causal", bool(self.causal))
        for name in ("window_left", "window_right", "sink_tokens"):
            v = getattr(self, name)
            if not _is_int(v):
                raise TypeError(f"ElementMask: {name} must be an int, got {type(v).__name__}")
            lo = 0 if name == "sink_tokens" else -1
            if v < lo:
                raise ValueError(f"ElementMask: {name} must be >= {lo}, got {v}")
            object.__setattr__(self, name, int(v))

    def band(self, q_len: int, kv_len: int) -> Tuple[int, int]:
        """(lo, hi): the window part is lo <= j - i <= hi (causal included; +-2**62 unbounded)."""
        off = kv_len - q_len
        lo = off - self.window_left if self.window_left >= 0 else -_BIG
        hi = _BIG
        if self.causal:
            hi = off
        if self.window_right >= 0:
            hi = min(hi, off + self.window_right)
        return lo, hi

    def visible(self, i, j, q_len: int, kv_len: int) -> np.ndarray:
        """Boolean array (i and j broadcast): key j visible to query i."""
        i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
        d = i + (kv_len - q_len)
        vis = np.ones(np.broadcast_shapes(i.shape, j.shape), bool)
        if self.window_left >= 0:
            vis &= j >= d - self.window_left
        if self.window_right >= 0:
            vis &= j <= d + self.window_right
        if self.sink_tokens:
            vis |= j < self.sink_tokens
        if self.causal:
            vis &= j <= d
        return vis

    def to_dense(self, q_len: int, kv_len: int) -> np.ndarray:
        """Boolean (q_len, kv_len): which elements the mask leaves visible."""
        return self.visible(np.arange(q_len)[:, None], np.arange(kv_len)[None, :], q_len, kv_len)


# ---------------------------------------------------------------------------------------
# block geometry
# ---------------------------------------------------------------------------------------
def _num_blocks(n: int, b: int) -> int:
    return -(-n // b)


def block_grid(q_len: int, kv_len: int, block_size: Tuple[int, int]):
    """Row / column bounds of every tile: i0, i1 (nQb, 1) and j0, j1 (1, nKb), int64,
    end-exclusive and cut to q_len / kv_len."""
    bq, bk = block_size
    i0 = np.arange(_num_blocks(q_len, bq), dtype=np.int64)[:, None] * bq
    j0 = np.arange(_num_blocks(kv_len, bk), dtype=np.int64)[None, :] * bk
    return i0, np.minimum(i0 + bq, q_len), j0, np.minimum(j0 + bk, kv_len)


def band_any(i0, i1, j0, j1, lo, hi) -> np.ndarray:
    """Tiles holding some (i, j) with lo <= j - i <= hi (every j - i in range is attained)."""
    return np.maximum(j0 - (i1 - 1), lo) <= np.minimum((j1 - 1) - i0, hi)


def band_all(i0, i1, j0, j1, lo, hi) -> np.ndarray:
    """Tiles whose every (i, j) has lo <= j - i <= hi."""
    return (j0 - (i1 - 1) >= lo) & ((j1 - 1) - i0 <= hi)


def classify(mask: Optional[ElementMask], q_len: int, kv_len: int, block_size: Tuple[int, int]):
    """(any, all): boolean (nQb, nKb) arrays, exact: tiles where `mask` leaves some / every
    element visible. `all` is False for tiles cut by q_len / kv_len."""
    bq, bk = block_size
    i0, i1, j0, j1 = block_grid(q_len, kv_len, block_size)
    uncut = ((i1 - i0) == bq) & ((j1 - j0) == bk)
    shape = (i0.shape[0], j0.shape[1])
    if mask is None:
        return np.ones(shape, bool), np.broadcast_to(uncut, shape).copy()
    off = kv_len - q_len
    lo, hi = mask.band(q_len, kv_len)
    any_ = band_any(i0, i1, j0, j1, lo, hi)
    sink = mask.sink_tokens
    if sink:
        sink_any = j0 < sink
        if mask.causal:
            sink_any = sink_any & (j0 - (i1 - 1) <= off)
        any_ = any_ | sink_any
        causal_all = ((j1 - 1) - i0 <= off) if mask.causal else np.ones(shape, bool)
        js0 = np.maximum(j0, sink)
        rest_all = (js0 >= j1) | band_all(i0, i1, js0, j1, lo, hi)
        all_ = causal_all & rest_all
    else:
        all_ = band_all(i0, i1, j0, j1, lo, hi)
    all_ = np.broadcast_to(all_ & uncut, shape).copy()
    return np.broadcast_to(any_, shape).copy(), all_


def check_block_size(block_size: Any, device: str, op: str) -> Tuple[int, int]:
    """(block_q, block_k) from an int or a pair; CUDA: 64 or 128, CPU: power of two 16..256."""
    if _is_int(block_size):
        block_size = (block_size, block_size)
    try:
        bq, bk = block_size
    except (TypeError, ValueError):
        raise TypeError(f"{op}: block_size must be an int or a pair (block_q, block_k), got {block_size!r}") from None
    allowed = CUDA_BLOCK_SIZES if device == _arrays.CUDA else CPU_BLOCK_SIZES
    for name, b in (("block_q", bq), ("block_k", bk)):
        if not _is_int(b):
            raise TypeError(f"{op}: block_size {name} must be an int, got {type(b).__name__}")
        if int(b) not in allowed:
            raise ValueError(f"{op}: block_size {name} must be one of {allowed} on {device}, got {b}")
    return int(bq), int(bk)


def _check_len(v: Any, name: str, op: str) -> int:
    if not _is_int(v):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if v < 0:
        raise ValueError(f"{op}: {name} must be >= 0, got {v}")
    return int(v)


def bits_words(block_k: int) -> int:
    """int32 words per row of a bit tile."""
    return -(-block_k // 32)


def pack_bits(tiles: np.ndarray) -> np.ndarray:
    """Boolean (..., block_q, block_k) -> int32 (..., block_q, bits_words(block_k)): bit
    c % 32 of word c // 32 holds column c."""
    bk = tiles.shape[-1]
    w = bits_words(bk)
    if w * 32 != bk:
        tiles = np.concatenate([tiles, np.zeros(tiles.shape[:-1] + (w * 32 - bk,), bool)], axis=-1)
    packed = np.packbits(np.ascontiguousarray(tiles), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<i4").astype(np.int32)


def unpack_bits(words: np.ndarray, block_k: int) -> np.ndarray:
    """Inverse of `pack_bits`: int32 (..., W) -> boolean (..., block_k)."""
    raw = np.ascontiguousarray(np.asarray(words).astype("<i4")).view(np.uint8)
    return np.unpackbits(raw, axis=-1, bitorder="little")[..., :block_k].astype(bool)


def place(device: Any, op: str) -> Tuple[str, str, str]:
    """(framework, device string, device type) for a builder's `device` argument: None is
    NumPy on the CPU, anything else a torch device."""
    if device is None:
        return "numpy", "cpu", "cpu"
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: device must be cpu or cuda, got {device!r}")
    return "torch", str(dev), dev.type


# ---------------------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------------------
def _to_host(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy()


def _place_of(x: Any, name: str, op: str) -> Tuple[str, str]:
    """(framework, device string) of a numpy array or torch tensor."""
    fw = _arrays.framework_of(x)
    if fw == "numpy":
        return fw, "cpu"
    if fw == "torch":
        if x.device.type not in (_arrays.CPU, _arrays.CUDA):
            raise ValueError(f"{op}: {name} is on device {x.device}; only cpu and cuda are supported")
        return fw, str(x.device)
    raise TypeError(f"{op}: {name} must be a NumPy array or a torch tensor, got "
                    f"{type(x).__module__}.{type(x).__name__}")


def _dtype_name(x: Any) -> str:
    return x.dtype.name if isinstance(x, np.ndarray) else str(x.dtype).replace("torch.", "")


def _bool_4d(x: Any, name: str, tail: str, block_size, op: str):
    """(framework, device, host boolean (B|1, H|1, m, n), block size) of a boolean NumPy /
    torch array of 2 to 4 dims (leading dims of 1 added), with the block size checked for
    its device."""
    fw, device = _place_of(x, name, op)
    if _dtype_name(x) != "bool":
        raise TypeError(f"{op}: {name} must be a boolean array, got {_dtype_name(x)}")
    host = _to_host(x)
    if not 2 <= host.ndim <= 4:
        raise ValueError(f"{op}: {name} must have shape (B|1, H|1, {tail}), got {host.shape}")
    host = host.reshape((1,) * (4 - host.ndim) + host.shape)
    return fw, device, host, check_block_size(block_size, device.split(":")[0], op)


def _lists_from_layout(layout: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Boolean (..., n, m) -> counts int32 (..., n), indices int32 (..., n, m): the True
    columns of each row in increasing order, then 0."""
    counts = layout.sum(axis=-1, dtype=np.int64)
    order = np.argsort(~layout, axis=-1, kind="stable")
    used = np.arange(layout.shape[-1]) < counts[..., None]
    return counts.astype(np.int32), np.where(used, order, 0).astype(np.int32)


def _layout_from_lists(counts: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Inverse of `_lists_from_layout` for range-checked lists: boolean (..., n, m)."""
    m = indices.shape[-1]
    used = np.arange(m) < counts[..., None]
    idx = np.where(used, indices.astype(np.int64), m)  # pads go to a dummy column m
    ext = np.zeros(indices.shape[:-1] + (m + 1,), bool)
    np.put_along_axis(ext, idx, True, axis=-1)
    return ext[..., :m]


class BlockMask:
    """Per query block, the sorted key blocks an attention kernel visits (see the module
    docstring for the index layout and the element-mask semantics).

    Construct with the eight index arrays (NumPy or torch, int32, one framework and one
    device), or with `BlockMask.from_dense` or a builder of `longattn.masks`. The
    constructor validates everything the kernels rely on and raises a ValueError (or a
    TypeError for a wrong type or dtype) naming the field: counts in [0, n], every index
    slot (pads included) in [0, n), indices strictly increasing within the count, full and
    partial lists disjoint, the query-side lists the exact transposes of the key-side
    lists, full blocks inside the q_len x kv_len rectangle, consistent shapes and a block
    size the device supports (CUDA: 64 or 128; CPU: a power of two from 16 to 256).
    The query-side lists may be omitted (None): they are then computed.

    The arrays are stored as C-contiguous copies (NumPy copies are read-only); treat them
    as immutable: kernels trust a constructed mask (the CUDA binding checks shapes, dtypes
    and devices but cannot read device memory to re-check indices).

    Attributes: the eight arrays, block_size (block_q, block_k), q_len, kv_len, mask
    (ElementMask or None), shape (B|1, H|1, q_len, kv_len), framework ("numpy" or
    "torch"), device ("cpu", "cuda:0", ...).
    """

    def __init__(self, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                 q_num_blocks=None, q_indices=None, full_q_num_blocks=None, full_q_indices=None, *,
                 block_size, q_len: int, kv_len: int, mask: Optional[ElementMask] = None,
                 partial_bits=None, kv_bits_index=None, q_bits_index=None):
        op = "BlockMask"
        given = dict(zip(_FIELDS + _BITS_FIELDS,
                         (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices,
                          full_q_num_blocks, full_q_indices, partial_bits, kv_bits_index, q_bits_index)))
        q_side = _FIELDS[4:]
        missing_q = [n for n in q_side if given[n] is None]
        if missing_q and len(missing_q) != 4:
            raise ValueError(f"{op}: pass all four query-side lists or none; missing {', '.join(missing_q)}")
        if (partial_bits is None) != (kv_bits_index is None):
            raise ValueError(f"{op}: partial_bits and kv_bits_index go together (got only "
                             f"{'partial_bits' if kv_bits_index is None else 'kv_bits_index'})")
        if q_bits_index is not None and partial_bits is None:
            raise ValueError(f"{op}: q_bits_index needs partial_bits and kv_bits_index")
        place = None
        for name in _FIELDS + _BITS_FIELDS:
            x = given[name]
            if x is None:
                continue
            p = _place_of(x, name, op)
            if place is None:
                place, first = p, name
            elif p[0] != place[0]:
                raise TypeError(f"{op}: {name} is a {p[0]} array but {first} is a {place[0]} array")
            elif p[1] != place[1]:
                raise ValueError(f"{op}: {name} is on {p[1]} but {first} is on {place[1]}")
            if _dtype_name(x) != "int32":
                raise TypeError(f"{op}: {name} must be int32, got {_dtype_name(x)}")
        framework, device = place
        self.q_len = _check_len(q_len, "q_len", op)
        self.kv_len = _check_len(kv_len, "kv_len", op)
        self.block_size = check_block_size(block_size, device.split(":")[0], op)
        if mask is not None and not isinstance(mask, ElementMask):
            raise TypeError(f"{op}: mask must be an ElementMask or None, got {type(mask).__name__}")
        self.mask = mask
        nq = _num_blocks(self.q_len, self.block_size[0])
        nk = _num_blocks(self.kv_len, self.block_size[1])

        host = {n: (None if given[n] is None else _to_host(given[n])) for n in _FIELDS + _BITS_FIELDS}
        lead = host["kv_num_blocks"].shape[:2] if host["kv_num_blocks"].ndim == 3 else None
        if lead is None:
            raise ValueError(f"{op}: kv_num_blocks must have 3 dims (B|1, H|1, num_q_blocks), "
                             f"got shape {host['kv_num_blocks'].shape}")
        expect = {"kv_num_blocks": (nq,), "kv_indices": (nq, nk), "q_num_blocks": (nk,), "q_indices": (nk, nq)}
        for name in _FIELDS:
            a = host[name]
            if a is None:
                continue
            tail = expect[name.replace("full_", "")]
            want = tuple(lead) + tail
            if a.shape != want:
                raise ValueError(f"{op}: {name} must have shape {want} for kv_num_blocks leading dims "
                                 f"{tuple(lead)}, q_len={self.q_len}, kv_len={self.kv_len}, "
                                 f"block_size={self.block_size}; got {a.shape}")
        layouts = {}
        for kind, n_rows, n_cols in (("kv", nq, nk), ("q", nk, nq)):
            for full in ("", "full_"):
                cname, iname = f"{full}{kind}_num_blocks", f"{full}{kind}_indices"
                if host[cname] is None:
                    continue
                layouts[full + kind] = self._check_lists(host[cname], host[iname], cname, iname, n_cols, op)
        if layouts["kv"].size and np.any(layouts["kv"] & layouts["full_kv"]):
            b, h, r, c = np.argwhere(layouts["kv"] & layouts["full_kv"])[0]
            raise ValueError(f"{op}: kv_indices and full_kv_indices overlap: query block {r} of "
                             f"[{b}, {h}] lists key block {c} in both")
        if layouts["full_kv"].size:
            bq, bk = self.block_size
            cut_rows = self.q_len % bq != 0
            cut_cols = self.kv_len % bk != 0
            bad = np.zeros_like(layouts["full_kv"])
            if cut_rows:
                bad[..., -1, :] |= layouts["full_kv"][..., -1, :]
            if cut_cols:
                bad[..., :, -1] |= layouts["full_kv"][..., :, -1]
            if bad.any():
                b, h, r, c = np.argwhere(bad)[0]
                raise ValueError(f"{op}: full_kv_indices lists key block {c} for query block {r} of [{b}, {h}], "
                                 f"a tile cut by q_len={self.q_len} / kv_len={self.kv_len}; it must be partial")
        if missing_q:
            for full in ("", "full_"):
                c, i = _lists_from_layout(np.swapaxes(layouts[full + "kv"], -1, -2))
                host[f"{full}q_num_blocks"], host[f"{full}q_indices"] = c, i
        else:
            for full in ("", "full_"):
                if not np.array_equal(np.swapaxes(layouts[full + "kv"], -1, -2), layouts[full + "q"]):
                    raise ValueError(f"{op}: {full}q_num_blocks / {full}q_indices are not the transpose of "
                                     f"{full}kv_num_blocks / {full}kv_indices")
        self._bits_map = None
        if partial_bits is not None:
            self._bits_map, host["q_bits_index"] = self._check_bits(host, layouts["kv"], nq, nk, op)
        self._layout_full = layouts["full_kv"]
        self._layout_partial = layouts["kv"]
        self._bits_host = None if partial_bits is None else np.array(host["partial_bits"], np.int32)
        self.framework, self.device = framework, device
        for name in _FIELDS + _BITS_FIELDS:
            x = given[name]
            if name in _BITS_FIELDS and partial_bits is None:
                setattr(self, name, None)
                continue
            if x is None:
                x = host[name]
                if framework == "torch":
                    x = sys.modules["torch"].from_numpy(np.ascontiguousarray(x)).to(device)
            if framework == "numpy":
                x = np.array(x, dtype=np.int32, order="C", copy=True)
                x.flags.writeable = False
            elif given[name] is not None:
                # An own copy: what was validated above is what the kernels read, whatever
                # the caller later does to its tensors (the CUDA binding cannot re-check them).
                x = x.clone(memory_format=sys.modules["torch"].contiguous_format)
            else:
                x = x.contiguous()
            setattr(self, name, x)

    @staticmethod
    def _check_lists(counts: np.ndarray, indices: np.ndarray, cname: str, iname: str, n: int, op: str) -> np.ndarray:
        if counts.size and (counts.min() < 0 or counts.max() > n):
            pos = tuple(np.argwhere((counts < 0) | (counts > n))[0])
            raise ValueError(f"{op}: {cname}{list(pos)} = {counts[pos]} is outside [0, {n}]")
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            pos = tuple(np.argwhere((indices < 0) | (indices >= n))[0])
            raise ValueError(f"{op}: {iname}{list(pos)} = {indices[pos]} is outside [0, {n}) "
                             f"(pad slots after the count must hold a valid index too)")
        if n > 1:
            step_used = np.arange(1, n) < counts[..., None]
            bad = step_used & (np.diff(indices.astype(np.int64), axis=-1) <= 0)
            if bad.any():
                pos = tuple(np.argwhere(bad)[0])
                raise ValueError(f"{op}: {iname}{list(pos[:-1])} is not strictly increasing within its count "
                                 f"({cname} = {counts[pos[:-1]]}): entries {pos[-1]} and {pos[-1] + 1} are "
                                 f"{indices[pos]} and {indices[pos[:-1] + (pos[-1] + 1,)]} (unsorted or duplicated)")
        return _layout_from_lists(counts.astype(np.int64), indices)

    def _check_bits(self, host, partial, nq: int, nk: int, op: str):
        """Validates partial_bits / kv_bits_index / q_bits_index; returns the dense pool-index
        map (B|1, H|1, nQb, nKb), -1 off partial tiles, and the query-side index (computed
        when not given)."""
        bq, bk = self.block_size
        bits, kvb = host["partial_bits"], host["kv_bits_index"]
        want = (bits.shape[0] if bits.ndim == 3 else 0, bq, bits_words(bk))
        if bits.ndim != 3 or bits.shape[1:] != want[1:] or bits.shape[0] < 1:
            raise ValueError(f"{op}: partial_bits must have shape (num_tiles >= 1, block_q={bq}, "
                             f"ceil(block_k / 32)={want[2]}), got {bits.shape}")
        if kvb.shape != host["kv_indices"].shape:
            raise ValueError(f"{op}: kv_bits_index must have the shape of kv_indices {host['kv_indices'].shape}, "
                             f"got {kvb.shape}")
        n_tiles = bits.shape[0]
        if kvb.size and (kvb.min() < 0 or kvb.max() >= n_tiles):
            pos = tuple(np.argwhere((kvb < 0) | (kvb >= n_tiles))[0])
            raise ValueError(f"{op}: kv_bits_index{list(pos)} = {kvb[pos]} is outside [0, {n_tiles}) "
                             f"(pad slots after the count must hold a valid index too)")
        counts, idx = host["kv_num_blocks"].astype(np.int64), host["kv_indices"].astype(np.int64)
        used = np.arange(nk) < counts[..., None]
        bits_map = np.full(partial.shape, -1, np.int32)
        lead = np.indices(idx.shape[:-1])
        sel = tuple(np.broadcast_to(a[..., None], used.shape)[used] for a in lead) + (idx[used],)
        bits_map[sel] = kvb[used]
        swapped = np.swapaxes(bits_map, -1, -2)
        qc, qi = host["q_num_blocks"].astype(np.int64), host["q_indices"].astype(np.int64)
        q_used = np.arange(nq) < qc[..., None]
        expect = np.where(q_used, np.take_along_axis(swapped, qi, axis=-1), 0).astype(np.int32)
        qb = host["q_bits_index"]
        if qb is not None and (qb.shape != expect.shape or not np.array_equal(np.where(q_used, qb, 0), expect)):
            raise ValueError(f"{op}: q_bits_index is not kv_bits_index transposed along q_indices "
                             f"(shape {expect.shape} expected, got {qb.shape})")
        if qb is not None and qb.size and (qb.min() < 0 or qb.max() >= n_tiles):
            raise ValueError(f"{op}: q_bits_index holds entries outside [0, {n_tiles})")
        return bits_map, (expect if qb is None else qb)

    # -----------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, layout, block_size, q_len: int, kv_len: int, mask: Optional[ElementMask] = None) -> "BlockMask":
        """A BlockMask visiting the True tiles of a boolean layout (B|1, H|1, nQb, nKb)
        (2 or 3 dims are read as (nQb, nKb) / (H, nQb, nKb)), NumPy or torch; the result
        lives where `layout` does (torch on its device, NumPy otherwise).

        A visited tile is full when `mask` provably leaves all its elements visible and it
        is not cut by q_len / kv_len (with mask None: whenever it is not cut), partial
        otherwise. Tiles the mask leaves entirely invisible are kept (as partial), so
        `to_dense()` returns `layout`.
        """
        op = "BlockMask.from_dense"
        fw, device, host, bs = _bool_4d(layout, "layout", "num_q_blocks, num_kv_blocks", block_size, op)
        q_len, kv_len = _check_len(q_len, "q_len", op), _check_len(kv_len, "kv_len", op)
        want = (_num_blocks(q_len, bs[0]), _num_blocks(kv_len, bs[1]))
        if host.shape[2:] != want:
            raise ValueError(f"{op}: layout must end in (num_q_blocks, num_kv_blocks) = {want} for q_len={q_len}, "
                             f"kv_len={kv_len}, block_size={bs}; got {host.shape}")
        if mask is not None and not isinstance(mask, ElementMask):
            raise TypeError(f"{op}: mask must be an ElementMask or None, got {type(mask).__name__}")
        _, all_ = classify(mask, q_len, kv_len, bs)
        return _from_layouts(host & all_, host & ~all_, bs, q_len, kv_len, mask, fw, device)

    @classmethod
    def from_mask_mod(cls, mask_mod, q_len: int, kv_len: int, *, batch: int = 1, heads: int = 1, block_size=128,
                      device=None) -> "BlockMask":
        """A token-exact BlockMask from a predicate, like FlexAttention's create_block_mask.

        mask_mod(b, h, q_idx, kv_idx) receives NumPy int64 arrays that broadcast against each
        other (query and key indices from 0, not diagonal-aligned) and returns a boolean
        array: True where query q_idx of batch b, head h may see key kv_idx. It is evaluated
        on every element of the batch x heads x q_len x kv_len grid, a tile chunk at a
        time (for large masks prefer a builder of `longattn.masks`, which only evaluates the
        tiles its pattern can touch). Tiles with no visible element are skipped, tiles
        entirely visible (and not cut by q_len / kv_len) are full, the others are partial
        with their bits stored once per distinct tile (`partial_bits`). `device`: None for
        NumPy arrays, else a torch device ("cpu", "cuda").

        Example:
            >>> prefix_lm = lambda b, h, q, kv: (kv <= q) | (kv < 256)   # bidirectional prefix
            >>> bm = BlockMask.from_mask_mod(prefix_lm, 4096, 4096, block_size=128)
        """
        return _from_mask_mod(mask_mod, q_len, kv_len, batch=batch, heads=heads, block_size=block_size,
                              device=device)

    @classmethod
    def from_dense_elements(cls, elements, block_size) -> "BlockMask":
        """A token-exact BlockMask from a boolean (B|1, H|1, q_len, kv_len) array of visible
        elements (2 or 3 dims read as (q_len, kv_len) / (H, q_len, kv_len)), NumPy or torch;
        the result lives where `elements` does. `to_dense_elements()` gives `elements` back.
        Tiles are classified as in `from_mask_mod`."""
        return _from_dense_elements(elements, block_size)

    # -----------------------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int, int, int]:
        b, h = self.kv_num_blocks.shape[:2]
        return (int(b), int(h), self.q_len, self.kv_len)

    @property
    def num_blocks(self) -> Tuple[int, int]:
        """(num_q_blocks, num_kv_blocks)."""
        return (_num_blocks(self.q_len, self.block_size[0]), _num_blocks(self.kv_len, self.block_size[1]))

    def to_dense(self, kind: str = "all") -> np.ndarray:
        """Boolean NumPy layout (B|1, H|1, nQb, nKb) of the visited tiles; kind "full" or
        "partial" selects one class."""
        if kind == "all":
            return self._layout_full | self._layout_partial
        if kind == "full":
            return self._layout_full.copy()
        if kind == "partial":
            return self._layout_partial.copy()
        raise ValueError(f"to_dense: kind must be 'all', 'full' or 'partial', got {kind!r}")

    def to_dense_elements(self) -> np.ndarray:
        """Boolean NumPy (B|1, H|1, q_len, kv_len): element (i, j) is visible iff its tile
        is full, or partial and the element mask and bits leave it visible. For tests and
        small sizes (it materializes q_len x kv_len per batch and head)."""
        bq, bk = self.block_size
        full = self._layout_full.repeat(bq, axis=2).repeat(bk, axis=3)[:, :, :self.q_len, :self.kv_len]
        part = self._layout_partial.repeat(bq, axis=2).repeat(bk, axis=3)[:, :, :self.q_len, :self.kv_len]
        if self.mask is not None:
            part = part & self.mask.to_dense(self.q_len, self.kv_len)
        if self._bits_host is not None:
            tiles = unpack_bits(self._bits_host, bk)[np.maximum(self._bits_map, 0)]  # (B, H, nQb, nKb, bq, bk)
            b, h, nq, nk = self._bits_map.shape
            grid = tiles.transpose(0, 1, 2, 4, 3, 5).reshape(b, h, nq * bq, nk * bk)
            part = part & grid[:, :, :self.q_len, :self.kv_len]
        return full | part

    def tile_index_map(self) -> Optional[np.ndarray]:
        """int32 NumPy (B|1, H|1, nQb, nKb): the partial_bits entry of every partial tile, -1
        elsewhere; None for masks without bit tiles."""
        return None if self._bits_map is None else self._bits_map.copy()

    def tile_elements(self, b, h, qb, kb) -> np.ndarray:
        """Boolean (n, block_q, block_k): the visible elements of n tiles given by int arrays
        (n,) of batch, head (broadcast dims take any index), query block and key block.
        Elements outside q_len x kv_len are False."""
        bq, bk = self.block_size
        b = np.where(self._layout_full.shape[0] == 1, 0, b)
        h = np.where(self._layout_full.shape[1] == 1, 0, h)
        i = qb[:, None, None] * bq + np.arange(bq)[None, :, None]
        j = kb[:, None, None] * bk + np.arange(bk)[None, None, :]
        part = self._layout_partial[b, h, qb, kb][:, None, None]
        if self.mask is not None:
            part = part & self.mask.visible(i, j, self.q_len, self.kv_len)
        if self._bits_host is not None:
            part = part & unpack_bits(self._bits_host[np.maximum(self._bits_map[b, h, qb, kb], 0)], bk)
        return (self._layout_full[b, h, qb, kb][:, None, None] | part) & (i < self.q_len) & (j < self.kv_len)

    def density(self) -> float:
        """Fraction of the (query block, key block) tiles of the q_len x kv_len rectangle
        that are visited, averaged over batch and heads (0.0 for an empty rectangle)."""
        layout = self.to_dense()
        return float(layout.mean()) if layout.size else 0.0

    def sparsity(self) -> float:
        """1 - density()."""
        return 1.0 - self.density()

    def to(self, device) -> "BlockMask":
        """This mask with torch tensors on `device` ("cpu", "cuda", "cuda:1", torch.device).
        NumPy-backed masks are converted through torch (which must be installed). The block
        size is validated again for the new device."""
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a test dependency
            raise RuntimeError("BlockMask.to needs torch; use the NumPy arrays directly") from None
        arrays = [getattr(self, n) for n in _FIELDS + _BITS_FIELDS]
        if self.framework == "numpy":
            arrays = [None if a is None else torch.from_numpy(np.array(a)) for a in arrays]
        return self._rebuilt([None if a is None else a.to(device) for a in arrays])

    def numpy(self) -> "BlockMask":
        """This mask with NumPy arrays (a host copy of torch tensors)."""
        if self.framework == "numpy":
            return self
        return self._rebuilt([None if getattr(self, n) is None else np.ascontiguousarray(_to_host(getattr(self, n)))
                              for n in _FIELDS + _BITS_FIELDS])

    def _rebuilt(self, arrays) -> "BlockMask":
        bits = dict(zip(_BITS_FIELDS, arrays[len(_FIELDS):]))
        return BlockMask(*arrays[:len(_FIELDS)], block_size=self.block_size, q_len=self.q_len, kv_len=self.kv_len,
                         mask=self.mask, **bits)

    def __repr__(self) -> str:
        b, h, q, k = self.shape
        nq, nk = self.num_blocks
        where = "numpy" if self.framework == "numpy" else f"torch {self.device}"
        return (f"BlockMask(shape=({b}, {h}, {q}, {k}), block_size={self.block_size}, "
                f"num_blocks=({nq}, {nk}), full={int(self._layout_full.sum())}, "
                f"partial={int(self._layout_partial.sum())}, density={self.density():.4f}, "
                f"mask={self.mask!r}, bit_tiles={0 if self._bits_host is None else len(self._bits_host)}, {where})")


def _from_layouts(full: np.ndarray, partial: np.ndarray, block_size, q_len: int, kv_len: int,
                  mask: Optional[ElementMask], framework: str = "numpy", device: str = "cpu") -> BlockMask:
    """A BlockMask from disjoint boolean (B|1, H|1, nQb, nKb) layouts of full and partial tiles."""
    arrays = []
    for layout in (partial, full):
        arrays.extend(_lists_from_layout(layout))
    for layout in (partial, full):
        arrays.extend(_lists_from_layout(np.swapaxes(layout, -1, -2)))
    kv_c, kv_i, fkv_c, fkv_i, q_c, q_i, fq_c, fq_i = arrays
    arrays = [kv_c, kv_i, fkv_c, fkv_i, q_c, q_i, fq_c, fq_i]
    if framework == "torch":
        torch = sys.modules.get("torch")
        if torch is None:
            import torch
        arrays = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]
    return BlockMask(*arrays, block_size=block_size, q_len=q_len, kv_len=kv_len, mask=mask)


def from_tile_elements(candidates: np.ndarray, elements, block_size, q_len: int, kv_len: int,
                       framework: str = "numpy", device: str = "cpu", lead=None, tile_class=None) -> BlockMask:
    """A token-granular BlockMask: `candidates` boolean (B|1, H|1, nQb, nKb) holds every tile
    that may have a visible element; elements(b, h, qb, kb) -> boolean (n, block_q, block_k)
    gives the visible elements of n such tiles (int arrays (n,)). Tiles with no visible
    element are dropped, uncut tiles with all elements visible are full, the rest partial
    with their bits in a deduplicated pool. `lead` (batch, heads) broadcasts the result.
    `tile_class(b, h, qb, kb)` (optional) -> int (n,) names classes of uncut tiles known to
    hold the same elements (-1: no class), so that one tile per class is evaluated.

    The element function is called in chunks of tiles, so memory stays bounded whatever
    the size of the mask."""
    bq, bk = block_size
    shape = candidates.shape
    i0, i1, j0, j1 = block_grid(q_len, kv_len, block_size)
    uncut = ((i1 - i0) == bq) & ((j1 - j0) == bk)
    tiles = np.argwhere(candidates)
    if tile_class is not None and len(tiles):
        cls = np.asarray(tile_class(*tiles.T), np.int64)
        shared = cls >= 0
        _, first, rep_of = np.unique(cls[shared], return_index=True, return_inverse=True)
        tiles = np.concatenate([tiles[~shared], tiles[shared]])
        todo = np.concatenate([tiles[:int((~shared).sum())], tiles[len(tiles) - int(shared.sum()):][first]])
        # evaluated row of each tile: itself, or its class representative
        source = np.concatenate([np.arange((~shared).sum()), (~shared).sum() + rep_of.reshape(-1)])
    else:
        todo, source = tiles, np.arange(len(tiles))
    status = np.zeros(len(todo), np.int8)  # 0 nothing visible, 1 full, 2 partial
    piece_of = np.full(len(todo), -1, np.int64)  # row in `words` of a partial tile's bits
    pieces, n_pieces = [], 0
    step = max(1, _TILE_CHUNK_ELEMENTS // (bq * bk))
    for c in range(0, len(todo), step):
        t = todo[c:c + step]
        e = np.asarray(elements(t[:, 0], t[:, 1], t[:, 2], t[:, 3]), bool)
        inside = ((t[:, 2:3, None] * bq + np.arange(bq)[None, :, None]) < q_len) & \
                 ((t[:, 3:4, None] * bk + np.arange(bk)[None, None, :]) < kv_len)
        e = e & inside
        any_, all_ = e.any(axis=(1, 2)), e.all(axis=(1, 2)) & uncut[t[:, 2], t[:, 3]]
        p = any_ & ~all_
        status[c:c + step] = np.where(all_, 1, np.where(p, 2, 0))
        if p.any():
            pieces.append(pack_bits(e[p]))
            piece_of[c + np.flatnonzero(p)] = n_pieces + np.arange(int(p.sum()))
            n_pieces += int(p.sum())
    status, piece_of = status[source], piece_of[source]
    full = np.zeros(shape, bool)
    partial = np.zeros(shape, bool)
    full[tuple(tiles[status == 1].T)] = True
    partial[tuple(tiles[status == 2].T)] = True
    if lead is not None:
        shape = tuple(lead) + shape[2:]
        full, partial = np.broadcast_to(full, shape), np.broadcast_to(partial, shape)
    if not pieces:
        return _from_layouts(full, partial, block_size, q_len, kv_len, None, framework, device)
    words = np.concatenate(pieces)
    pool, inverse = np.unique(words.reshape(len(words), -1), axis=0, return_inverse=True)
    pool = pool.reshape((len(pool),) + words.shape[1:]).astype(np.int32)
    bits_map = np.zeros(candidates.shape, np.int32)
    bits_map[tuple(tiles[status == 2].T)] = inverse.reshape(-1)[piece_of[status == 2]]
    bits_map = np.broadcast_to(bits_map, shape)
    arrays = []
    for layout, ids in ((partial, bits_map), (np.swapaxes(partial, -1, -2), np.swapaxes(bits_map, -1, -2))):
        counts, idx = _lists_from_layout(layout)
        used = np.arange(layout.shape[-1]) < counts[..., None]
        arrays.append(np.where(used, np.take_along_axis(ids, idx.astype(np.int64), axis=-1), 0).astype(np.int32))
    base = _from_layouts(full, partial, block_size, q_len, kv_len, None, "numpy", "cpu")
    lists = [np.asarray(getattr(base, n)) for n in _FIELDS]
    bits = [pool] + arrays
    if framework == "torch":
        torch = sys.modules.get("torch")
        if torch is None:
            import torch
        lists = [torch.from_numpy(np.array(a)).to(device) for a in lists]
        bits = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in bits]
    return BlockMask(*lists, block_size=block_size, q_len=q_len, kv_len=kv_len, mask=None,
                     **dict(zip(_BITS_FIELDS, bits)))


def _from_mask_mod(mask_mod, q_len: int, kv_len: int, *, batch: int = 1, heads: int = 1, block_size=128,
                   device=None) -> BlockMask:
    """BlockMask.from_mask_mod (documented there)."""
    op = "BlockMask.from_mask_mod"
    if not callable(mask_mod):
        raise TypeError(f"{op}: mask_mod must be callable (b, h, q_idx, kv_idx) -> bool array, "
                        f"got {type(mask_mod).__name__}")
    q_len, kv_len = _check_len(q_len, "q_len", op), _check_len(kv_len, "kv_len", op)
    for name, v in (("batch", batch), ("heads", heads)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{op}: {name} must be an int >= 1, got {v!r}")
    fw, dev, dev_type = place(device, op)
    bs = check_block_size(block_size, dev_type, op)
    bq, bk = bs
    nq, nk = _num_blocks(q_len, bq), _num_blocks(kv_len, bk)

    def elements(b, h, qb, kb):
        i = qb[:, None, None] * bq + np.arange(bq)[None, :, None]
        j = kb[:, None, None] * bk + np.arange(bk)[None, None, :]
        # Padding rows / columns are evaluated at the last valid index, then discarded.
        out = mask_mod(b[:, None, None], h[:, None, None], np.minimum(i, max(q_len - 1, 0)),
                       np.minimum(j, max(kv_len - 1, 0)))
        out = np.asarray(out)
        if out.dtype != np.bool_:
            raise TypeError(f"{op}: mask_mod must return a boolean array, got dtype {out.dtype}")
        return np.broadcast_to(out, (len(b), bq, bk))

    return from_tile_elements(np.ones((int(batch), int(heads), nq, nk), bool), elements, bs, q_len, kv_len, fw, dev)


def _from_dense_elements(elements, block_size) -> BlockMask:
    """BlockMask.from_dense_elements (documented there)."""
    op = "BlockMask.from_dense_elements"
    fw, device, host, bs = _bool_4d(elements, "elements", "q_len, kv_len", block_size, op)
    q_len, kv_len = host.shape[2:]
    bq, bk = bs
    nq, nk = _num_blocks(q_len, bq), _num_blocks(kv_len, bk)
    padded = np.zeros(host.shape[:2] + (nq * bq, nk * bk), bool)
    padded[:, :, :q_len, :kv_len] = host

    def tiles(b, h, qb, kb):
        rows = (qb[:, None] * bq + np.arange(bq))[:, :, None]
        cols = (kb[:, None] * bk + np.arange(bk))[:, None, :]
        return padded[b[:, None, None], h[:, None, None], rows, cols]

    return from_tile_elements(np.ones(host.shape[:2] + (nq, nk), bool), tiles, bs, q_len, kv_len, fw, device)
