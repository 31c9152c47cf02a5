"""Fused rotary position embedding (RoPE) for q and k, with long-context scaling.

RoFormer (Su et al., 2021) rotates each pair of channels of q and k by an angle
proportional to the token position. longattn computes cos/sin in the kernel from the
float32 angle float32(position) * inv_freq (the frequencies come from
`rope_frequencies`, which implements the Hugging Face transformers scalings), multiplies
them by `attention_factor`, and rotates q and k in one pass.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from . import _arrays, _C

_OP = "apply_rope"


def inv_freq_values(inv_freq: Any) -> Tuple[float, ...]:
    """`inv_freq` (any array or sequence) as a tuple of float32-exact Python floats."""
    if hasattr(inv_freq, "detach"):  # torch tensor, possibly on a GPU
        inv_freq = inv_freq.detach().cpu().numpy()
    elif _arrays.framework_of(inv_freq) == "cupy":
        inv_freq = inv_freq.get()
    try:
        host = np.asarray(inv_freq, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{_OP}: inv_freq must be a 1-D array of floats, got {type(inv_freq).__name__}") from e
    if host.ndim != 1 or not 1 <= host.size <= 256:
        raise ValueError(f"{_OP}: inv_freq must be 1-D with 1 to 256 entries, got shape {host.shape}")
    if not np.all(np.isfinite(host)):
        raise ValueError(f"{_OP}: inv_freq must be finite")
    return tuple(float(v) for v in host)


def attention_factor_value(attention_factor: Any) -> float:
    if isinstance(attention_factor, bool) or not isinstance(attention_factor, (int, float, np.floating, np.integer)):
        raise TypeError(f"{_OP}: attention_factor must be a float, got {type(attention_factor).__name__}")
    if not math.isfinite(attention_factor):
        raise ValueError(f"{_OP}: attention_factor must be finite, got {attention_factor}")
    return float(attention_factor)


def _positions(q: _arrays.Array, positions: Any) -> Optional[_arrays.Array]:
    if positions is None:
        return None
    if _arrays.framework_of(positions) is None and isinstance(positions, (list, tuple, range)):
        pos = _arrays.from_sequence(q, positions, "positions", _OP)
    else:
        pos = _arrays.wrap(positions, "positions", _OP)
    _arrays.check_same_place(_OP, "q", q, positions=pos)
    if pos.dtype not in _arrays.INTEGER_DTYPES:
        raise TypeError(f"{_OP}: positions must have an integer dtype, got {pos.dtype}")
    if pos.dtype not in ("int32", "int64"):
        pos = _arrays.astype(pos, "int64", "positions", _OP)
    return pos


def rope_arrays(q: Any, k: Any, positions: Any, inv_freq: Sequence[float], attention_factor: float,
                interleaved: bool, conjugate: bool, inplace: bool, stream: Optional[int] = None):
    """The RoPE call for arrays of any framework, with no autograd. Returns (q_out, k_out)."""
    qa = _arrays.wrap(q, "q", _OP)
    ka = None if k is None else _arrays.wrap(k, "k", _OP)
    _arrays.check_same_place(_OP, "q", qa, k=ka)
    _arrays.check_float(_OP, q=qa, k=ka)
    pos = _positions(qa, positions)
    if inplace:
        for name, a in (("q", qa), ("k", ka)):
            if a is not None and not a.writable:
                raise ValueError(f"{_OP}: inplace=True needs a writable {name}, but {name} ({a.where}) is read-only"
                                 + (" (JAX arrays are immutable)" if a.framework == "jax" else ""))
        q_out, k_out = q, k
        qo, ko = qa, ka
    else:
        q_out = _arrays.empty(qa, qa.shape)
        k_out = None if ka is None else _arrays.empty(ka, ka.shape)
        qo = _arrays.wrap(q_out, "q_out", _OP)
        ko = None if k_out is None else _arrays.wrap(k_out, "k_out", _OP)
    _C.rope(qa.view(), qo.view(), None if ka is None else ka.view(), None if ko is None else ko.view(),
            None if pos is None else pos.view(), list(inv_freq), float(attention_factor), bool(interleaved),
            bool(conjugate), _arrays.stream_of(qa, stream))
    if inplace:
        return q, k
    return _arrays.to_caller(qa, q_out), (None if ka is None else _arrays.to_caller(ka, k_out))


def apply_rope(q, k=None, positions=None, *, inv_freq, attention_factor: float = 1.0, interleaved: bool = False,
               inplace: bool = False, stream: Optional[int] = None):
    """Rotates q (and k) by their positions: fused RoPE, forward and backward.

    Args:
        q: (batch, seq, heads_q, head_dim) array: torch, NumPy, CuPy, Numba CUDA or JAX. Any
            strides with a contiguous last dim (e.g. slices of a packed qkv tensor).
            CPU dtypes float32, float64, float16, bfloat16; CUDA float32, float16, bfloat16.
        k: optional (batch, seq, heads_k, head_dim) array of q's dtype, framework and
            device; heads_k may differ from heads_q (GQA).
        positions: integer array (batch, seq) or (seq,), any integer dtype, or a Python
            sequence; default arange(seq). Packed variable-length batches use
            (1, total, heads, head_dim) input with each sequence's positions.
        inv_freq: 1-D float32 frequencies, length rotary_dim / 2 <= 256 (see
            `rope_frequencies`); the first rotary_dim channels are rotated, the rest are
            passed through unchanged (partial rotary).
        attention_factor: multiplies cos and sin (YaRN / LongRoPE magnitude scaling).
        interleaved: False rotates NeoX halves (i, i + rotary_dim/2), as transformers'
            rotate_half; True rotates GPT-J adjacent pairs (2i, 2i + 1).
        inplace: write the result into q and k (which must be writable) and return them.
        stream: CUDA stream to launch on; default the caller's current torch / CuPy stream.

    Returns:
        q_rot, or (q_rot, k_rot) when k is given: new contiguous arrays of the caller's
        type on the caller's device (q and k themselves when inplace=True).

    Per position p and frequency index i, with a = float32(p) * inv_freq[i] in float32 and
    c = cos(a) * attention_factor, s = sin(a) * attention_factor (computed in float32):
    y_i = x_i c - x_j s, y_j = x_j c + x_i s for each rotated pair (i, j). With torch
    tensors the op is differentiable (the backward is the conjugate rotation), is a
    PyTorch custom op (torch.compile traces it without graph breaks), and
    inplace=True works under autograd on non-leaf tensors.

    Example:
        >>> inv_freq, af = longattn.rope_frequencies(128, {"rope_type": "yarn", "factor": 4.0,
        ...     "original_max_position_embeddings": 8192}, theta=5e5)
        >>> q_rot, k_rot = longattn.apply_rope(q, k, inv_freq=inv_freq, attention_factor=af)
    """
    attention_factor = attention_factor_value(attention_factor)
    if _arrays.framework_of(q) == "torch":
        from . import torch_ops

        return torch_ops.apply_rope(q, k, positions, inv_freq, attention_factor, bool(interleaved), bool(inplace),
                                    stream)
    freqs = inv_freq_values(inv_freq)
    q_out, k_out = rope_arrays(q, k, positions, freqs, attention_factor, interleaved, False, inplace, stream)
    return q_out if k is None else (q_out, k_out)
