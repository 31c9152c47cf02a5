"""Linear attention on CPU and CUDA, chunked form, forward and backward, plus the recurrent step.

Linear attention (Katharopoulos et al. 2020) replaces softmax(q k^T) v by a running
state S = sum_t k_t v_t^T, optionally decayed per head (RetNet, Sun et al. 2023) or per
token (scalar-gated linear attention, Yang et al. 2023). The semantics follow
flash-linear-attention's naive references:

    q~ = scale * phi(q),  k~ = phi(k)          phi: None (identity), "elu1", "relu"
    causal:      S_t = exp(g_t) S_{t-1} + k~_t v_t^T,     o_t = S_t^T q~_t
    non-causal:  S   = S_0 + sum_t k~_t v_t^T,             o_t = S^T q~_t
    normalize:   z_t = exp(g_t) z_{t-1} + k~_t,            out_t = o_t / (q~_t . z_t + 1e-10)

The kernels use the chunked form of Yang et al. ("Gated Linear Attention", 2023): a
masked quadratic product inside each chunk of `chunk_size` tokens and the state carried
across chunks, in float32 (float64 for float64 inputs). Decays enter only through
differences of cumulative log-decays inside a chunk, so every exponent is <= 0 and
nothing overflows at any sequence length.

On CUDA (float16 / bfloat16, head_dim <= 256, head_dim_v <= 256, or <= 255 with
normalize) the chunk products run on tensor cores with operands rounded to the input
dtype and float32 accumulation, in fixed chunks of 64 tokens (`chunk_size` only affects
the CPU kernels); decoding-sized calls run a recurrent step kernel. The CUDA kernels have
been checked in host emulation (tests/cuda_emulation) but have not run on a GPU yet.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from . import _arrays, _C
from .attention import _head_dim

FEATURE_MAPS = {None: 0, "identity": 0, "elu1": 1, "relu": 2}


def compute_dtype(dtype: str) -> str:
    """The state / decay dtype for inputs of `dtype`: float64 for float64, else float32."""
    return "float64" if dtype == "float64" else "float32"


def options(head_dim: int, causal: Any, scale: Any, feature_map: Any, normalize: Any, log_decay: Any,
            chunk_size: Any, op: str) -> dict:
    """Validated scalar options (TypeError / ValueError naming the argument)."""
    for name, val in (("causal", causal), ("normalize", normalize)):
        if not isinstance(val, (bool, np.bool_)):
            raise TypeError(f"{op}: {name} must be a bool, got {type(val).__name__}")
    if scale is None:
        scale = head_dim ** -0.5 if head_dim > 0 else 1.0
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
            raise TypeError(f"{op}: scale must be a float, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"{op}: scale must be finite, got {scale}")
    if not isinstance(feature_map, (str, type(None))) or feature_map not in FEATURE_MAPS:
        raise ValueError(f"{op}: feature_map must be None, 'elu1' or 'relu', got {feature_map!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"{op}: chunk_size must be an int, got {type(chunk_size).__name__}")
    if not 1 <= chunk_size <= 1024:
        raise ValueError(f"{op}: chunk_size must be in [1, 1024], got {chunk_size}")
    if log_decay is not None and not causal:
        raise ValueError(f"{op}: log_decay needs causal=True (a decay orders the tokens)")
    return dict(scale=float(scale), feature_map=FEATURE_MAPS[feature_map], causal=bool(causal),
                normalize=bool(normalize), chunk_size=int(chunk_size))


def _view(a):
    return None if a is None else a.view()


def _host(x, dtype: str, name: str, op: str) -> Optional[_arrays.Array]:
    """A contiguous copy (or the array itself) of `x` in `dtype` on its own device, for
    non-torch callers."""
    if x is None:
        return None
    a = _arrays.wrap(x, name, op)
    if a.dtype not in _arrays.FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must hold floats, got {a.dtype}")
    if a.device != _arrays.CPU:
        if a.dtype == dtype and a.strides == _arrays._contiguous_strides(a.shape):
            return a
        if a.framework == "cupy":
            import cupy

            return _arrays.wrap(cupy.ascontiguousarray(x, dtype=dtype), name, op)
        return _arrays.astype(a, dtype, name, op)
    host = np.ascontiguousarray(np.asarray(x), dtype=dtype)
    return _arrays.wrap(host, name, op)


def _check_cu_device(cu, total: int, op: str) -> int:
    """Device cu_seqlens are validated on a host copy before any kernel reads them (the CPU
    ones by the compiled module). Returns the longest sequence for device arrays (the CUDA
    forward picks its step kernel by it), 0 otherwise."""
    if cu is None or cu.device == _arrays.CPU:
        return 0
    from .attention import _check_cu_seqlens_on_host

    return _check_cu_seqlens_on_host(cu, "cu_seqlens", total, op)


def split_state(state, normalize: bool, name: str, op: str):
    """(S, z) from `state`: S alone, or the pair (S, z) with normalize=True."""
    if state is None:
        return None, None
    if isinstance(state, (tuple, list)):
        if len(state) != 2:
            raise ValueError(f"{op}: {name} must be S or the pair (S, z), got a sequence of {len(state)}")
        if not normalize:
            raise ValueError(f"{op}: {name} is a pair (S, z) but normalize=False; pass S alone")
        return state[0], state[1]
    if normalize:
        raise ValueError(f"{op}: with normalize=True, {name} must be the pair (S, z)")
    return state, None


def _cu(cu_seqlens, op):
    if cu_seqlens is None:
        return None
    cu = _arrays.wrap(cu_seqlens, "cu_seqlens", op)
    if cu.dtype != "int32":
        raise TypeError(f"{op}: cu_seqlens must be int32, got {cu.dtype}")
    return cu


def forward_arrays(q, k, v, log_decay, S0, z0, cu_seqlens, scale, feature_map, causal, normalize, chunk_size,
                   final_S=None, final_z=None, op="linear_attention"):
    """Forward on arrays of one framework (no autograd). log_decay, S0 and z0 must already
    be contiguous arrays in the compute dtype. Returns (out, S, z) with z None unless
    normalize; final_S / final_z (optional) receive the final state instead of new arrays."""
    qa, ka, va = (_arrays.wrap(x, n, op) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    ga = None if log_decay is None else _arrays.wrap(log_decay, "log_decay", op)
    sa = None if S0 is None else _arrays.wrap(S0, "initial_state", op)
    za = None if z0 is None else _arrays.wrap(z0, "initial_state", op)
    cu = _cu(cu_seqlens, op)
    _arrays.check_same_place(op, "q", qa, k=ka, v=va, log_decay=ga, initial_state=sa, cu_seqlens=cu)
    _arrays.check_float(op, q=qa, k=ka, v=va)
    if len(qa.shape) != 4 or len(va.shape) != 4:
        raise ValueError(f"{op}: q, k, v must have 4 dims (batch, seqlen, heads, head_dim), got q {qa.shape}, "
                         f"v {va.shape}")
    n = qa.shape[0] if cu is None else cu.shape[0] - 1
    max_seqlen = _check_cu_device(cu, qa.shape[1], op)
    cd = compute_dtype(qa.dtype)
    out = _arrays.empty(qa, va.shape)
    S = final_S if final_S is not None else _arrays.empty(qa, (n, qa.shape[2], qa.shape[3], va.shape[3]), cd)
    z = None
    if normalize:
        z = final_z if final_z is not None else _arrays.empty(qa, (n, qa.shape[2], qa.shape[3]), cd)
    # On CUDA every value tile of a (sequence, head) reads z, so an in-place update of z
    # goes through a fresh buffer.
    z_alias = (z is not None and z0 is not None and qa.device != _arrays.CPU and final_z is not None
               and za.ptr == _arrays.wrap(z, "final_state", op).ptr)
    zk = _arrays.empty(qa, (n, qa.shape[2], qa.shape[3]), cd) if z_alias else z
    _C.linear_attention_forward(qa.view(), ka.view(), va.view(), _arrays.wrap(out, "out", op).view(), _view(sa),
                                _view(za), _arrays.wrap(S, "final_state", op).view(),
                                None if zk is None else _arrays.wrap(zk, "final_state", op).view(), _view(ga),
                                _view(cu), scale, feature_map, causal, normalize, chunk_size,
                                _arrays.stream_of(qa, None), max_seqlen)
    if z_alias:
        z[...] = zk
    return out, S, z


def backward_arrays(dout, dS, dz, q, k, v, log_decay, S0, z0, cu_seqlens, scale, feature_map, causal, normalize,
                    chunk_size, op="linear_attention backward"):
    """Gradients (dq, dk, dv, dS0, dz0, dg): dS0 (N, H, K, V) and dz0 (N, H, K) of the
    initial state (dz0 zeros unless normalize), dg per token (B, T, H) in the compute dtype
    (None without log_decay; a per-head log_decay's gradient is its sum over batch and time)."""
    names = ("dout", "q", "k", "v")
    da, qa, ka, va = (_arrays.wrap(x, n_, op) for x, n_ in zip((dout, q, k, v), names))
    wrap = lambda x, name: None if x is None else _arrays.wrap(x, name, op)  # noqa: E731
    ga, sa, za, dsa, dza = (wrap(x, n_) for x, n_ in ((log_decay, "log_decay"), (S0, "initial_state"),
                                                      (z0, "initial_state"), (dS, "d_final_state"),
                                                      (dz, "d_final_z")))
    cu = _cu(cu_seqlens, op)
    n = qa.shape[0] if cu is None else cu.shape[0] - 1
    _check_cu_device(cu, qa.shape[1], op)
    cd = compute_dtype(qa.dtype)
    dq, dk, dv = (_arrays.empty(a, a.shape) for a in (qa, ka, va))
    H, K, V = qa.shape[2], qa.shape[3], va.shape[3]
    dS0 = _arrays.empty(qa, (n, H, K, V), cd)
    dz0 = _arrays.empty(qa, (n, H, K), cd)
    if not normalize:
        dz0[...] = 0
    dg = None if log_decay is None else _arrays.empty(qa, (qa.shape[0], qa.shape[1], H), cd)
    ws = None
    if qa.device != _arrays.CPU:
        needs_final = dg is not None and (dsa is not None or (normalize and dza is not None))
        nbytes = _C.linear_attention_backward_workspace(qa.view(), va.view(), _view(cu), normalize, needs_final)
        ws = _arrays.wrap(_arrays.empty(qa, (max(nbytes, 4) // 4,), "float32"), "workspace", op)
    _C.linear_attention_backward(qa.view(), ka.view(), va.view(), da.view(), _view(dsa),
                                 _view(dza) if normalize else None, _arrays.wrap(dq, "dq", op).view(),
                                 _arrays.wrap(dk, "dk", op).view(), _arrays.wrap(dv, "dv", op).view(),
                                 _arrays.wrap(dS0, "d_initial_state", op).view(),
                                 _arrays.wrap(dz0, "d_initial_z", op).view() if normalize else None,
                                 None if dg is None else _arrays.wrap(dg, "d_log_decay", op).view(), _view(sa),
                                 _view(za) if normalize else None, _view(ga), _view(cu), scale, feature_map, causal,
                                 normalize, chunk_size, _view(ws), _arrays.stream_of(qa, None))
    return dq, dk, dv, dS0, dz0, dg


def _numpy_call(q, k, v, opts, log_decay, initial_state, cu_seqlens, op, final=None):
    qa = _arrays.wrap(q, "q", op)
    cd = compute_dtype(qa.dtype)
    S0, z0 = split_state(initial_state, opts["normalize"], "initial_state", op)
    others = {name: _arrays.wrap(x, name, op) for name, x in (("k", k), ("v", v), ("log_decay", log_decay),
                                                              ("initial_state", S0), ("cu_seqlens", cu_seqlens))
              if x is not None}
    _arrays.check_same_place(op, "q", qa, **others)
    if qa.framework == "jax":  # CPU JAX arrays: zero-copy NumPy views in, JAX arrays out
        q, k, v = (np.asarray(x) for x in (q, k, v))
        cu_seqlens = None if cu_seqlens is None else np.asarray(cu_seqlens)
    g = None if log_decay is None else _host(log_decay, cd, "log_decay", op).obj
    S0 = None if S0 is None else _host(S0, cd, "initial_state", op).obj
    z0 = None if z0 is None else _host(z0, cd, "initial_state", op).obj
    fS, fz = final if final is not None else (None, None)
    out, S, z = forward_arrays(q, k, v, g, S0, z0, cu_seqlens, opts["scale"], opts["feature_map"], opts["causal"],
                               opts["normalize"], opts["chunk_size"], fS, fz, op)
    conv = lambda x: None if x is None else _arrays.to_caller(qa, x)  # noqa: E731
    return conv(out), conv(S), conv(z)


def linear_attention(q, k, v, *, causal: bool = True, scale: Optional[float] = None, feature_map: Optional[str] = None,
                     normalize: bool = False, log_decay=None, initial_state=None, return_state: bool = False,
                     cu_seqlens=None, chunk_size: int = 64):
    """Linear attention, optionally decayed, in the chunked form.

    Args:
        q, k: (batch, seqlen, heads, head_dim); v: (batch, seqlen, heads, head_dim_v).
            Any strides with a contiguous last dim. CPU dtypes float32, float64, float16,
            bfloat16; the state, normalizer and decay arithmetic is float32 (float64 for
            float64 inputs). Torch tensors, NumPy arrays (bfloat16 via ml_dtypes) or JAX
            CPU arrays; on CUDA (torch, CuPy or Numba arrays, launched on the current
            stream) float16 or bfloat16 with head_dim <= 256 and head_dim_v <= 256
            (<= 255 with normalize). The CUDA kernels have not run on a GPU yet: they are
            checked in host emulation only.
        causal: o_t = S_t^T q~_t with S_t = exp(g_t) S_{t-1} + k~_t v_t^T (default). False:
            every token reads the state summed over the whole sequence (plus initial_state).
        scale: multiplies q after the feature map; default head_dim ** -0.5.
        feature_map: None (identity), "elu1" (elu(x) + 1) or "relu", applied to q and k.
        normalize: divide o_t by q~_t . z_t + 1e-10, z_t = exp(g_t) z_{t-1} + k~_t the
            running (decayed) sum of the feature-mapped keys.
        log_decay: None; a per-head constant (heads,) (RetNet: log(1 - 2^(-5-h))); or
            per-token gates (batch, seqlen, heads). Values must be finite and <= 0
            (ValueError otherwise on CPU; on CUDA they are not checked, which would
            need a device synchronization); needs causal=True.
        initial_state: the state of a previous call, S float32 (batch, heads, head_dim,
            head_dim_v) (float64 for float64 inputs), or the pair (S, z) with normalize,
            z (batch, heads, head_dim). Running tokens [0:T1] and then [T1:T] with the
            returned state equals one call on [0:T].
        return_state: also return the final state (S, or (S, z) with normalize).
        cu_seqlens: int32 (num_sequences + 1,) offsets of a packed batch q, k, v
            (1, total_tokens, heads, ·); validated (start 0, non-decreasing, end at the token
            count). States are then per sequence (num_sequences, heads, ...), and per-token
            log_decay is (1, total_tokens, heads).
        chunk_size: tokens per chunk of the chunked form, 1..1024 (default 64). The result
            does not depend on it beyond rounding. CUDA always uses chunks of 64 tokens.

    Returns:
        out (batch, seqlen, heads, head_dim_v) in q's dtype; with return_state, (out, state).

    With torch tensors the op is a PyTorch custom op (torch.ops.longattn.
    linear_attention_forward) with a fake implementation, so torch.compile(fullgraph=True)
    traces it, and differentiable in q, k, v, initial_state and log_decay (a per-head
    log_decay's gradient is summed over batch and time).

    Example:
        >>> g = torch.log1p(-2.0 ** (-5.0 - torch.arange(8)))      # RetNet decays
        >>> out, S = longattn.linear_attention(q, k, v, log_decay=g, return_state=True)
    """
    op = "linear_attention"
    head_dim = _head_dim(q, op)
    opts = options(head_dim, causal, scale, feature_map, normalize, log_decay, chunk_size, op)
    if not isinstance(return_state, (bool, np.bool_)):
        raise TypeError(f"{op}: return_state must be a bool, got {type(return_state).__name__}")
    if _arrays.framework_of(q) == "torch":
        from . import torch_ops

        out, S, z = torch_ops.linear_attention(q, k, v, opts, log_decay, initial_state, cu_seqlens, op)
    else:
        out, S, z = _numpy_call(q, k, v, opts, log_decay, initial_state, cu_seqlens, op)
    if not return_state:
        return out
    return out, ((S, z) if opts["normalize"] else S)


def linear_attention_step(q, k, v, state, *, scale: Optional[float] = None, feature_map: Optional[str] = None,
                          normalize: bool = False, log_decay=None, cu_seqlens=None, inplace: bool = False):
    """The recurrent update for one or a few new tokens (decoding), O(1) memory per token.

    Args:
        q, k: (batch, new_tokens, heads, head_dim); v: (batch, new_tokens, heads, head_dim_v).
        state: S float32 (batch, heads, head_dim, head_dim_v) (float64 for float64 inputs),
            or (S, z) with normalize; None starts from zeros.
        scale, feature_map, normalize, log_decay, cu_seqlens: as in `linear_attention`
            (always causal; per-token log_decay is (batch, new_tokens, heads)).
        inplace: write the new state into `state`'s buffers (which must then be contiguous
            arrays of the state dtype) and return them.

    Returns:
        (out (batch, new_tokens, heads, head_dim_v), new_state), new_state shaped like state.
        Stepping token by token gives the result of `linear_attention` on the whole
        sequence, up to rounding.
    """
    op = "linear_attention_step"
    head_dim = _head_dim(q, op)
    opts = options(head_dim, True, scale, feature_map, normalize, log_decay, 64, op)
    if not isinstance(inplace, (bool, np.bool_)):
        raise TypeError(f"{op}: inplace must be a bool, got {type(inplace).__name__}")
    if inplace and state is None:
        raise ValueError(f"{op}: inplace=True needs a state to update")
    if _arrays.framework_of(q) == "torch":
        from . import torch_ops

        out, S, z = torch_ops.linear_attention_step(q, k, v, state, opts, log_decay, cu_seqlens, bool(inplace), op)
    else:
        final = None
        if inplace:
            S_in, z_in = split_state(state, opts["normalize"], "state", op)
            cd = compute_dtype(_arrays.wrap(q, "q", op).dtype)
            for x in (S_in, z_in):
                if x is None:
                    continue
                a = _arrays.wrap(x, "state", op)
                if not a.writable:
                    raise ValueError(f"{op}: state is read-only; inplace=True writes it")
                if a.dtype != cd:
                    raise TypeError(f"{op}: with inplace=True, state must be {cd}, got {a.dtype}")
                if a.strides != _arrays._contiguous_strides(a.shape):
                    raise ValueError(f"{op}: with inplace=True, state must be contiguous")
            final = (S_in, z_in)
        out, S, z = _numpy_call(q, k, v, opts, log_decay, state, cu_seqlens, op, final)
    return out, ((S, z) if opts["normalize"] else S)
