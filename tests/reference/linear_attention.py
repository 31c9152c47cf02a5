"""Float64 reference for linear attention: the token-by-token recurrence.

Semantics (flash-linear-attention's naive references where they overlap):

    q~ = scale * phi(q), k~ = phi(k)     phi: identity, elu(x) + 1, relu
    causal:     S_t = exp(g_t) S_{t-1} + k~_t v_t^T        o_t = S_t^T q~_t
    non-causal: S   = S_0 + sum_t k~_t v_t^T                o_t = S^T q~_t
    normalize:  z_t = exp(g_t) z_{t-1} + k~_t (z = z_0 + sum_t k~_t non-causal)
                out_t = o_t / (q~_t . z_t + 1e-10)

g is the log-decay: None (0), per head (H,) or per token (B, T, H). The recurrence is
written literally (one token at a time, exp of each g_t), with nothing in common with the
chunked kernels. Packed variable-length input runs the recurrence per sequence.
"""
from __future__ import annotations

import numpy as np

from .rope import to_float64

EPS = 1e-10


def feature(x: np.ndarray, feature_map) -> np.ndarray:
    if feature_map is None:
        return x
    if feature_map == "elu1":
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    if feature_map == "relu":
        return np.maximum(x, 0.0)
    raise ValueError(feature_map)


def _recurrence(q, k, v, g, S0, z0, causal, normalize):
    """One sequence: q~, k~ (T, H, K), v (T, H, V), g (T, H) or None, S0 (H, K, V), z0 (H, K)."""
    T, H, K = q.shape
    V = v.shape[-1]
    S = np.zeros((H, K, V)) if S0 is None else np.array(S0, dtype=np.float64)
    z = np.zeros((H, K)) if z0 is None else np.array(z0, dtype=np.float64)
    out = np.zeros((T, H, V))
    if causal:
        for t in range(T):
            d = np.ones(H) if g is None else np.exp(g[t])
            S = d[:, None, None] * S + k[t][:, :, None] * v[t][:, None, :]
            z = d[:, None] * z + k[t]
            o = np.einsum("hk,hkv->hv", q[t], S)
            if normalize:
                o = o / (np.einsum("hk,hk->h", q[t], z) + EPS)[:, None]
            out[t] = o
    else:
        S = S + np.einsum("thk,thv->hkv", k, v)
        z = z + k.sum(0)
        out = np.einsum("thk,hkv->thv", q, S)
        if normalize:
            out = out / (np.einsum("thk,hk->th", q, z) + EPS)[:, :, None]
    return out, S, z


def linear_attention_reference(q, k, v, *, causal=True, scale=None, feature_map=None, normalize=False,
                               log_decay=None, initial_state=None, cu_seqlens=None, absolute=False):
    """Returns (out (B, T, H, V), S (N, H, K, V), z (N, H, K)), all float64.

    initial_state: None, S0, or (S0, z0). cu_seqlens: packed (1, total, ...) batch.
    absolute=True runs the recurrence on |q~|, |k~|, |v|, |S0|, |z0|: the magnitude of the
    sums behind each output, which scales the rounding error a correct kernel may make."""
    q, k, v = (to_float64(x) for x in (q, k, v))
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    qf = scale * feature(q, feature_map)
    kf = feature(k, feature_map)
    if absolute:
        qf, kf, v = np.abs(qf), np.abs(kf), np.abs(v)
    g = None
    if log_decay is not None:
        g = to_float64(log_decay)
        g = np.broadcast_to(g, (B, T, H)) if g.ndim == 1 else g
    S0 = z0 = None
    if initial_state is not None:
        if isinstance(initial_state, (tuple, list)):
            S0, z0 = (to_float64(x) for x in initial_state)
        else:
            S0 = to_float64(initial_state)
        if absolute:
            S0 = np.abs(S0)
            z0 = None if z0 is None else np.abs(z0)
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        cu = np.asarray(cu_seqlens)
        spans = [(0, int(cu[n]), int(cu[n + 1])) for n in range(len(cu) - 1)]
    out = np.zeros(v.shape[:3] + (v.shape[-1],))
    Ss, zs = [], []
    for n, (b, t0, t1) in enumerate(spans):
        o, S, z = _recurrence(qf[b, t0:t1], kf[b, t0:t1], v[b, t0:t1], None if g is None else g[b, t0:t1],
                              None if S0 is None else S0[n], None if z0 is None else z0[n], causal, normalize)
        out[b, t0:t1] = o
        Ss.append(S)
        zs.append(z)
    return out, np.stack(Ss), np.stack(zs)


def retnet_log_decay(H: int) -> np.ndarray:
    """RetNet's per-head decays: log(1 - 2^(-5 - h))."""
    return np.log1p(-(2.0 ** (-5.0 - np.arange(H)))).astype(np.float32)
