"""Fused flash attention (FlashAttention-2, Dao 2023) on CPU, forward and backward.

Scores s = softmax_scale * q.k, optionally soft-capped (cap * tanh(s / cap), Gemma 2) and
biased by ALiBi (-slope * |i + Sk - Sq - j|, Press et al. 2022), then masked: causal masks
and windows are aligned to the bottom-right corner (query i sees key j iff
j <= i + Sk - Sq), as FlashAttention 2.1+. The forward returns the log-sum-exp of the
final scores (natural log, float32), from which the backward recomputes the scores, and
which `merge_states` uses to combine partial results over disjoint key sets.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from . import _arrays, _C

_INF = float("inf")


def _window(window: Any, op: str) -> Tuple[int, int]:
    try:
        left, right = window
    except (TypeError, ValueError):
        raise TypeError(f"{op}: window must be a pair (left, right), got {window!r}") from None
    for name, w in (("left", left), ("right", right)):
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)):
            raise TypeError(f"{op}: window {name} must be an int, got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"{op}: window {name} must be >= -1 (-1: unbounded), got {w}")
    return int(left), int(right)


def _float(value: Any, name: str, op: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return float(value)


def attention_options(head_dim: int, causal: Any, window: Any, softmax_scale: Any, softcap: Any, op: str) -> dict:
    """Validated scalar options shared by every attention entry point."""
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    left, right = _window(window, op)
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else _float(softmax_scale, "softmax_scale", op)
    cap = _float(softcap, "softcap", op)
    if cap < 0:
        raise ValueError(f"{op}: softcap must be >= 0 (0: off), got {cap}")
    return dict(scale=scale, softcap=cap, window_left=left, window_right=right, causal=bool(causal))


def _view(a: Optional[_arrays.Array]):
    return None if a is None else a.view()


def _check_cu_seqlens_on_host(cu: _arrays.Array, name: str, total: int, op: str) -> Optional[int]:
    # CPU values are checked by the compiled module; device values are checked here on a
    # host copy, before any kernel reads them. Returns the longest sequence for device
    # arrays (the CUDA grids are sized by it), None on the CPU.
    if cu.device == _arrays.CPU:
        return None
    obj = cu.obj
    host = obj.cpu().numpy() if hasattr(obj, "cpu") else (obj.get() if hasattr(obj, "get") else obj.copy_to_host())
    if host.size == 0 or host[0] != 0 or np.any(np.diff(host) < 0) or host[-1] != total:
        raise ValueError(f"{op}: {name} must start at 0, be non-decreasing and end at {total}, got {host.tolist()}")
    return int(np.max(np.diff(host))) if host.size > 1 else 0


def forward_arrays(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, softcap, alibi_slopes,
                   window_left, window_right, causal, stream=None, op="flash_attention", block_sparse=None):
    """Forward on arrays of any framework, no autograd. Returns (out, lse)."""
    qa, ka, va = (_arrays.wrap(x, n, op) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    _arrays.check_same_place(op, "q", qa, k=ka, v=va)
    cu_q = None if cu_seqlens_q is None else _arrays.wrap(cu_seqlens_q, "cu_seqlens_q", op)
    cu_k = None if cu_seqlens_k is None else _arrays.wrap(cu_seqlens_k, "cu_seqlens_k", op)
    alibi = None if alibi_slopes is None else _arrays.wrap(alibi_slopes, "alibi_slopes", op)
    _arrays.check_same_place(op, "q", qa, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, alibi_slopes=alibi)
    _arrays.check_float(op, q=qa, k=ka, v=va)
    varlen = cu_q is not None
    if varlen:
        if len(qa.shape) != 3 or len(ka.shape) != 3:
            raise ValueError(f"{op}: q and k must be packed (total_tokens, heads, head_dim), got {qa.shape}, {ka.shape}")
        mq = _check_cu_seqlens_on_host(cu_q, "cu_seqlens_q", qa.shape[0], op)
        mk = _check_cu_seqlens_on_host(cu_k, "cu_seqlens_k", ka.shape[0], op)
        if mq is not None:  # device: the true maxima size the grids (a too small hint would skip rows)
            max_seqlen_q, max_seqlen_k = mq, mk
        lse_shape = (qa.shape[1], qa.shape[0])
    else:
        if len(qa.shape) != 4 or len(va.shape) != 4:
            raise ValueError(f"{op}: q, k, v must have 4 dims (batch, seqlen, heads, head_dim), got q {qa.shape}, "
                             f"v {va.shape}")
        lse_shape = (qa.shape[0], qa.shape[2], qa.shape[1])
    out = _arrays.empty(qa, qa.shape[:-1] + (va.shape[-1],))
    lse = _arrays.empty(qa, lse_shape, "float32")
    _C.attention_forward(qa.view(), ka.view(), va.view(), _arrays.wrap(out, "out", op).view(),
                         _arrays.wrap(lse, "lse", op).view(), _view(cu_q), _view(cu_k), int(max_seqlen_q or 0),
                         int(max_seqlen_k or 0), scale, softcap, _view(alibi), window_left, window_right, causal,
                         _arrays.stream_of(qa, stream), block_sparse)
    return _arrays.to_caller(qa, out), _arrays.to_caller(qa, lse)


def backward_arrays(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, softcap,
                    alibi_slopes, window_left, window_right, causal, stream=None, op="flash_attention backward",
                    block_sparse=None, deterministic=False):
    """Gradients (dq, dk, dv) on arrays of any framework. The CPU backward is always
    deterministic; on CUDA `deterministic` computes dQ without atomics (slower)."""
    names = ("dout", "q", "k", "v", "out", "lse")
    arrs = [_arrays.wrap(x, n, op) for x, n in zip((dout, q, k, v, out, lse), names)]
    da, qa, ka, va, oa, la = arrs
    _arrays.check_same_place(op, "q", qa, **dict(zip(names, arrs)))
    cu_q = None if cu_seqlens_q is None else _arrays.wrap(cu_seqlens_q, "cu_seqlens_q", op)
    cu_k = None if cu_seqlens_k is None else _arrays.wrap(cu_seqlens_k, "cu_seqlens_k", op)
    alibi = None if alibi_slopes is None else _arrays.wrap(alibi_slopes, "alibi_slopes", op)
    dla = None if dlse is None else _arrays.wrap(dlse, "dlse", op)
    if cu_q is not None:
        mq = _check_cu_seqlens_on_host(cu_q, "cu_seqlens_q", qa.shape[0], op)
        mk = _check_cu_seqlens_on_host(cu_k, "cu_seqlens_k", ka.shape[0], op)
        if mq is not None:
            max_seqlen_q, max_seqlen_k = mq, mk
    dq, dk, dv = (_arrays.empty(a, a.shape) for a in (qa, ka, va))
    # CUDA workspaces (float32): dq_accum like q, delta like lse; the kernels initialize both.
    dq_accum = delta = None
    if qa.device == _arrays.CUDA:
        delta = _arrays.wrap(_arrays.empty(qa, la.shape, "float32"), "delta", op)
        if not deterministic:
            dq_accum = _arrays.wrap(_arrays.empty(qa, qa.shape, "float32"), "dq_accum", op)
    _C.attention_backward(qa.view(), ka.view(), va.view(), oa.view(), la.view(), da.view(), _view(dla),
                          _arrays.wrap(dq, "dq", op).view(), _arrays.wrap(dk, "dk", op).view(),
                          _arrays.wrap(dv, "dv", op).view(), _view(cu_q), _view(cu_k), int(max_seqlen_q or 0),
                          int(max_seqlen_k or 0), scale, softcap, _view(alibi), window_left, window_right, causal,
                          _arrays.stream_of(qa, stream), block_sparse, _view(dq_accum), _view(delta),
                          bool(deterministic))
    return tuple(_arrays.to_caller(qa, x) for x in (dq, dk, dv))


def flash_attention(q, k, v, *, causal: bool = False, window: Tuple[int, int] = (-1, -1),
                    softmax_scale: Optional[float] = None, softcap: float = 0.0, alibi_slopes=None,
                    return_lse: bool = False, deterministic: bool = False, stream: Optional[int] = None):
    """Exact attention without materializing the Sq x Sk score matrix.

    Args:
        q: (batch, seqlen_q, heads, head_dim); k: (batch, seqlen_k, heads_kv, head_dim);
            v: (batch, seqlen_k, heads_kv, head_dim_v). heads must be a multiple of heads_kv
            (GQA / MQA: query head h reads kv head h // (heads // heads_kv)). Any strides
            with a contiguous last dim. CPU dtypes float32, float64, float16, bfloat16
            (accumulation in float32, float64 for float64). Torch, NumPy (bfloat16 via
            ml_dtypes), JAX arrays on the CPU.
        causal: mask keys right of the diagonal, aligned to the bottom-right corner: query
            i sees key j iff j <= i + seqlen_k - seqlen_q.
        window: (left, right) sliding window measured from that diagonal; -1 is unbounded.
            Key j is visible iff i + Sk - Sq - left <= j <= i + Sk - Sq + right; combines
            with causal (which caps right at 0).
        softmax_scale: default 1 / sqrt(head_dim).
        softcap: > 0 replaces each scaled score s by softcap * tanh(s / softcap).
        alibi_slopes: float32 (heads,) or (batch, heads); adds -slope * |i + Sk - Sq - j|.
        return_lse: also return the log-sum-exp of the scores, float32 (batch, heads, seqlen_q).
        deterministic: bitwise-reproducible gradients (the CPU backward always is; on CUDA
            dQ is then computed without atomics, at some cost in speed).
        stream: CUDA stream (default: the framework's current stream). CUDA takes float16
            and bfloat16 with head dims up to 256 (sm80+).

    Returns:
        out (batch, seqlen_q, heads, head_dim_v), or (out, lse) with return_lse. A query row
        that sees no key gets out = 0 and lse = -inf. seqlen 0 and 1 work.

    With torch tensors the op is differentiable in q, k and v (torch.ops.longattn custom
    ops with fake implementations: torch.compile(fullgraph=True) traces it).

    Example:
        >>> out = longattn.flash_attention(q, k, v, causal=True, window=(4096, 0))
    """
    op = "flash_attention"
    opts = attention_options(_head_dim(q, op), causal, window, softmax_scale, softcap, op)
    return _dispatch(op, q, k, v, None, None, None, None, opts, alibi_slopes, return_lse, deterministic, stream)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: Optional[int] = None,
                           max_seqlen_k: Optional[int] = None, *, causal: bool = False,
                           window: Tuple[int, int] = (-1, -1), softmax_scale: Optional[float] = None,
                           softcap: float = 0.0, alibi_slopes=None, return_lse: bool = False,
                           deterministic: bool = False, stream: Optional[int] = None):
    """`flash_attention` on a packed batch of variable-length sequences.

    q: (total_q, heads, head_dim), k: (total_k, heads_kv, head_dim), v: (total_k, heads_kv,
    head_dim_v); sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and
    cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v. cu_seqlens_* are int32 (batch + 1,),
    starting at 0, non-decreasing, ending at the token count (a ValueError names the one
    that is not). max_seqlen_* are optional hints (computed when omitted). Each sequence is
    aligned on its own bottom-right corner. Returns out (total_q, heads, head_dim_v) and,
    with return_lse, lse float32 (heads, total_q). alibi_slopes may be (heads,) or
    (batch, heads).
    """
    op = "flash_attention_varlen"
    opts = attention_options(_head_dim(q, op), causal, window, softmax_scale, softcap, op)
    return _dispatch(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, opts, alibi_slopes,
                     return_lse, deterministic, stream)


def _head_dim(q, op: str) -> int:
    shape = getattr(q, "shape", None)
    if shape is None or len(shape) == 0:
        _arrays.wrap(q, "q", op)  # raises the TypeError naming q
        raise ValueError(f"{op}: q must have a head dim")
    return int(shape[-1])


def _dispatch(op, q, k, v, cu_q, cu_k, max_q, max_k, opts, alibi, return_lse, deterministic, stream):
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"{op}: deterministic must be a bool, got {type(deterministic).__name__}")
    if _arrays.framework_of(q) == "torch" and stream is None:
        from . import torch_ops

        out, lse = torch_ops.flash_attention(q, k, v, cu_q, cu_k, max_q, max_k, opts, alibi, bool(deterministic),
                                             return_lse)
    else:
        out, lse = forward_arrays(q, k, v, cu_q, cu_k, max_q, max_k, opts["scale"], opts["softcap"], alibi,
                                  opts["window_left"], opts["window_right"], opts["causal"], stream, op)
    return (out, lse) if return_lse else out


def _namespace(x):
    fw = _arrays.framework_of(x)
    if fw == "torch":
        import torch

        return torch, fw
    if fw == "cupy":
        import cupy

        return cupy, fw
    if fw == "jax":
        import jax.numpy as jnp

        return jnp, fw
    if fw == "numpy":
        return np, fw
    raise TypeError(f"merge_states: outs must be torch, NumPy, CuPy or JAX arrays, got {type(x).__name__}")


def merge_states(outs: Sequence[Any], lses: Sequence[Any]):
    """Combines attention results over disjoint key sets into the result over their union.

    Args:
        outs: N partial outputs (batch, seqlen, heads, head_dim_v), or one stacked array
            (N, batch, seqlen, heads, head_dim_v).
        lses: the matching float32 log-sum-exps (batch, heads, seqlen), or stacked
            (N, batch, heads, seqlen).

    Returns:
        (out, lse): out = sum_n exp(lse_n - lse) * out_n with lse = log(sum_n exp(lse_n)),
        computed in float32 (float64 for float64 outs), out in the dtype of outs. Parts with
        lse = -inf contribute nothing; rows where every part is -inf give out = 0 and
        lse = -inf. This is what split-KV decoding and ring attention build on. With torch
        tensors it is differentiable (it is built from torch ops).
    """
    stacked_outs = not isinstance(outs, (list, tuple))
    stacked_lses = not isinstance(lses, (list, tuple))
    first = outs if stacked_outs else (outs[0] if len(outs) else None)
    if first is None:
        raise ValueError("merge_states: outs is empty")
    xp, fw = _namespace(first)
    for name, seq, stacked in (("outs", outs, stacked_outs), ("lses", lses, stacked_lses)):
        items = [seq] if stacked else list(seq)
        for x in items:
            if _arrays.framework_of(x) != fw:
                raise TypeError(f"merge_states: {name} mixes {fw} with {type(x).__module__}.{type(x).__name__}")
    O = outs if stacked_outs else xp.stack(list(outs))
    L = lses if stacked_lses else xp.stack(list(lses))
    if O.ndim != 5 or L.ndim != 4:
        raise ValueError(f"merge_states: outs must be N x (batch, seqlen, heads, dim) and lses N x (batch, heads, "
                         f"seqlen), got {tuple(O.shape)} and {tuple(L.shape)}")
    n, b, s, h, _ = O.shape
    if tuple(L.shape) != (n, b, h, s):
        raise ValueError(f"merge_states: lses must have shape {(n, b, h, s)} to match outs {tuple(O.shape)}, "
                         f"got {tuple(L.shape)}")
    wide = xp.float64 if O.dtype == xp.float64 else xp.float32
    L = L.astype(wide) if fw != "torch" else L.to(wide)
    m = L.max(0) if fw != "torch" else L.amax(0)
    finite = m > -_INF
    m_safe = xp.where(finite, m, xp.zeros_like(m))
    w = xp.exp(L - m_safe[None])  # parts with lse = -inf get weight 0
    total = w.sum(0)
    lse = xp.where(finite, m_safe + xp.log(xp.where(finite, total, xp.ones_like(total))), m)
    w = xp.where(finite[None], w / xp.where(finite, total, xp.ones_like(total))[None], xp.zeros_like(w))
    # (N, B, H, S) -> (N, B, S, H, 1)
    w = (xp.transpose(w, (0, 1, 3, 2)) if fw != "torch" else w.permute(0, 1, 3, 2))[..., None]
    Ow = O.astype(wide) if fw != "torch" else O.to(wide)
    out = (w * Ow).sum(0)
    out = out.astype(O.dtype) if fw != "torch" else out.to(O.dtype)
    lse = lse.astype(xp.float32) if fw != "torch" else lse.to(xp.float32)
    return out, lse
