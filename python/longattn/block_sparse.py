"""Block-sparse attention: the flash attention kernel walking a BlockMask's explicit
schedule of key blocks (full blocks without an element mask, partial blocks with it),
instead of the implicit causal/window schedule. The CUDA backward walks the transposed
(query-side) lists: for each key block, the query blocks that visit it.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _arrays, _C
from .attention import attention_options, backward_arrays, forward_arrays
from .block_mask import BlockMask

_OP = "block_sparse_attention"


_LIST_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
                "partial_bits", "kv_bits_index", "q_bits_index")


def schedule_lists(block_mask: BlockMask):
    """The eight lists of a BlockMask (key side, then query side) and its three bit-tile
    arrays (empty int32 arrays when it has none), in its own framework and place."""
    lists = tuple(getattr(block_mask, n) for n in _LIST_FIELDS[:8])
    if block_mask.partial_bits is not None:
        return lists + tuple(getattr(block_mask, n) for n in _LIST_FIELDS[8:])
    if block_mask.framework == "torch":
        import torch

        empty = torch.zeros(0, dtype=torch.int32, device=block_mask.device)
    else:
        empty = np.zeros(0, np.int32)
    return lists + (empty, empty, empty)


def make_schedule(lists, block_q: int, block_k: int, mask_fields) -> "_C.BlockSparse":
    """The compiled module's view of a BlockMask's eight lists and bit tiles. It checks
    shapes, dtypes and devices against q/k, and every index of host-resident lists;
    device-resident lists were validated when the BlockMask was built (see BlockMask)."""
    views = [_arrays.wrap(x, "block_mask." + n, _OP).view() for x, n in zip(lists, _LIST_FIELDS)]
    causal, wl, wr, sink = mask_fields
    return _C.BlockSparse(*views, int(block_q), int(block_k), bool(causal), int(wl), int(wr), int(sink))


def check_mask_device(block_mask: BlockMask, q) -> None:
    """The kernels read the mask's lists where q lives: same device (and index) required."""
    qa = _arrays.wrap(q, "q", _OP)
    want = _arrays.CPU if qa.device == _arrays.CPU else f"{_arrays.CUDA}:{qa.device_id}"
    have = block_mask.device if ":" in block_mask.device or block_mask.device == "cpu" else block_mask.device + ":0"
    if have != want:
        raise ValueError(f"{_OP}: block_mask is on {block_mask.device} but q is on {want}; move it once with "
                         f"block_mask.to(q.device) (the kernels read its index lists on q's device)")


def mask_fields(block_mask: BlockMask):
    m = block_mask.mask
    if m is None:
        return (False, -1, -1, 0)
    return (bool(m.causal), int(m.window_left), int(m.window_right), int(m.sink_tokens))


def block_sparse_attention(q, k, v, block_mask: BlockMask, *, softmax_scale: Optional[float] = None,
                           softcap: float = 0.0, return_lse: bool = False, deterministic: bool = False):
    """Attention restricted to the blocks of `block_mask`, forward and backward.

    Args:
        q: (batch, seqlen_q, heads, head_dim); k: (batch, seqlen_k, heads_kv, head_dim);
            v: (batch, seqlen_k, heads_kv, head_dim_v); GQA as `flash_attention`. CPU dtypes
            float32, float64, float16, bfloat16; CUDA float16, bfloat16, head dims up to 256.
        block_mask: a `BlockMask` with q_len = seqlen_q and kv_len = seqlen_k, on q's
            device (NumPy or torch CPU masks for CPU inputs, `block_mask.to(q.device)` for
            CUDA; ValueError otherwise); its batch and head dims are 1 (broadcast) or equal
            to q's. Query i sees key j iff j's key block is listed for i's query block and,
            for partial blocks, the element mask (causal / window / sink tokens, aligned
            bottom-right) allows it.
        softmax_scale: default 1 / sqrt(head_dim). softcap: as `flash_attention`.
        return_lse: also return lse float32 (batch, heads, seqlen_q).
        deterministic: bitwise-reproducible gradients (the CPU backward always is; on CUDA
            dQ is then computed by a separate kernel without atomics, at some cost).

    Returns:
        out (batch, seqlen_q, heads, head_dim_v), or (out, lse). Rows that see no key get 0
        and lse = -inf. A dense BlockMask gives `flash_attention`'s result.

    Block sizes on the CPU: powers of two from 16 to 256; key tiles are computed 128 keys
    at a time, so blocks smaller than 128 keys cost as much as 128-key tiles they touch.
    CUDA: 64 or 128 in each dim (ValueError otherwise). The CUDA forward and backward are
    the flash attention kernels walking the mask's lists (no second attention kernel):
    the forward and the deterministic dQ merge the key lists of each CTA's query rows,
    the dK/dV backward walks the query-side lists of its key block; unlisted tiles are
    skipped, full ones unmasked, partial ones element-masked. The CUDA path is checked on
    the host by an emulation of the kernels (tests/cuda_emulation) and by
    tests/test_block_sparse_attention_cuda.py, which needs a GPU and has not yet run on
    one.

    Example:
        >>> bm = longattn.masks.sliding_window(S, S, window=1024, block_size=128)
        >>> out = longattn.block_sparse_attention(q, k, v, bm)
    """
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"{_OP}: block_mask must be a longattn.BlockMask, got {type(block_mask).__name__}")
    shape_q, shape_k = getattr(q, "shape", None), getattr(k, "shape", None)
    if shape_q is None or shape_k is None or len(shape_q) != 4 or len(shape_k) != 4:
        raise ValueError(f"{_OP}: q and k must have 4 dims (batch, seqlen, heads, head_dim)")
    if (block_mask.q_len, block_mask.kv_len) != (shape_q[1], shape_k[1]):
        raise ValueError(f"{_OP}: block_mask is for q_len={block_mask.q_len}, kv_len={block_mask.kv_len} but q has "
                         f"seqlen {shape_q[1]} and k {shape_k[1]}")
    opts = attention_options(int(shape_q[-1]), False, (-1, -1), softmax_scale, softcap, _OP)
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"{_OP}: deterministic must be a bool, got {type(deterministic).__name__}")
    check_mask_device(block_mask, q)
    bq, bk = block_mask.block_size
    fields = mask_fields(block_mask)
    if _arrays.framework_of(q) == "torch":
        from . import torch_ops

        out, lse = torch_ops.block_sparse_attention(q, k, v, schedule_lists(block_mask), bq, bk, fields, opts,
                                                    bool(deterministic))
    else:
        sched = make_schedule(schedule_lists(block_mask), bq, bk, fields)
        out, lse = forward_arrays(q, k, v, None, None, None, None, opts["scale"], opts["softcap"], None, -1, -1,
                                  False, None, _OP, sched)
    return (out, lse) if return_lse else out


def block_sparse_backward_arrays(dout: Any, dlse: Any, q, k, v, out, lse, lists, block_q, block_k, fields, scale,
                                 softcap, deterministic=False):
    sched = make_schedule(lists, block_q, block_k, fields)
    return backward_arrays(dout, dlse, q, k, v, out, lse, None, None, None, None, scale, softcap, None, -1, -1, False,
                           None, _OP + " backward", sched, deterministic=deterministic)
