"""Reference implementations for (flash) scaled dot-product attention.

Written from the math, in float64 NumPy, for the layout of longattn:
q (B, Sq, H, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv), H a multiple of Hkv;
query head h reads kv head h // (H // Hkv) (GQA; Hkv = 1 is MQA).

For query i and key j (per batch b and head h):

    u[i, j]   = scale * <q_i, k_j>                       scale defaults to 1/sqrt(D)
    c[i, j]   = softcap * tanh(u / softcap)              if softcap > 0, else u
    s[i, j]   = c[i, j] - slope[b, h] * |i + Sk - Sq - j|  (ALiBi, optional)
    visible   = i + Sk - Sq - left <= j <= i + Sk - Sq + right
                (left/right = -1: unbounded on that side; causal forces right = 0)
    lse[i]    = log sum_{visible j} exp(s[i, j])          (-inf when no key is visible)
    P[i, j]   = exp(s[i, j] - lse[i]) on visible keys, 0 elsewhere
    out[i]    = sum_j P[i, j] v_j                         (0 when no key is visible)

The diagonal is aligned bottom-right (the last query sees the last key), like
FlashAttention >= 2.1 and torch.nn.attention.bias.causal_lower_right.

Backward (attention_grad_reference), with dO the output gradient and dL the
(optional) LSE gradient:

    dV_j   = sum_i P[i, j] dO_i
    dP     = dO V^T
    Dlt_i  = rowsum(dO_i * O_i)            (= sum_j P[i, j] dP[i, j])
    dS     = P * (dP - Dlt) + P * dL       (the softmax Jacobian; dL from lse)
    dU     = dS * (1 - tanh(u / softcap)^2)   (softcap chain rule; dS without softcap)
    dQ_i   = scale * sum_j dU[i, j] k_j,   dK_j = scale * sum_i dU[i, j] q_i
    GQA: dK, dV of a kv head are the sums over its group of query heads.

`naive_attention_low_precision` is the textbook computation in a torch dtype,
the way eager PyTorch code (and FlashAttention's own test oracle with
upcast=False) does it: scores materialized in the dtype, softcap, bias and
mask in the dtype, softmax in the dtype, P rounded to the dtype before P @ V.
Its error against the float64 reference is the baseline of the tolerance rule
(FlashAttention's rule): longattn's error is at most twice the naive error plus
a small floor (`allowance`).
"""
from __future__ import annotations

import math

import numpy as np

from .rope import NP_BFLOAT16, numpy_to_torch, to_float64, to_numpy  # noqa: F401  (re-exported)


# ----------------------------------------------------------------------------
# masks and biases
# ----------------------------------------------------------------------------
def effective_window(causal: bool, window=(-1, -1)):
    """(left, right) with None meaning unbounded; causal forces right = 0."""
    left, right = (int(w) for w in window)
    assert left >= -1 and right >= -1, window
    left = None if left == -1 else left
    right = None if right == -1 else right
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def visible_mask(sq: int, sk: int, causal: bool = False, window=(-1, -1)) -> np.ndarray:
    """Boolean (Sq, Sk): key j is visible to query i."""
    left, right = effective_window(causal, window)
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    diag = i + sk - sq  # the key on query i's diagonal
    vis = np.ones((sq, sk), dtype=bool)
    if left is not None:
        vis &= j >= diag - left
    if right is not None:
        vis &= j <= diag + right
    return vis


def alibi_slopes_bh(alibi_slopes, batch: int, heads: int):
    """(B, H) float64 slopes from (H,) or (B, H) (float32 values kept exactly); None -> None."""
    if alibi_slopes is None:
        return None
    s = to_float64(alibi_slopes)
    if s.ndim == 1:
        assert s.shape == (heads,), s.shape
        s = np.broadcast_to(s, (batch, heads))
    assert s.shape == (batch, heads), s.shape
    return s


def alibi_bias(alibi_slopes, batch: int, heads: int, sq: int, sk: int):
    """(B, H, Sq, Sk) float64 bias -slope * |i + Sk - Sq - j|, or None."""
    s = alibi_slopes_bh(alibi_slopes, batch, heads)
    if s is None:
        return None
    dist = np.abs(np.arange(sq)[:, None] + sk - sq - np.arange(sk)[None, :]).astype(np.float64)
    return -s[:, :, None, None] * dist


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


def expand_kv(x: np.ndarray, heads: int) -> np.ndarray:
    """(B, S, Hkv, X) -> (B, S, H, X), query head h reading kv head h // (H // Hkv)."""
    hkv = x.shape[2]
    assert heads % hkv == 0, (heads, hkv)
    return np.repeat(x, heads // hkv, axis=2)


def reduce_kv(g: np.ndarray, hkv: int) -> np.ndarray:
    """(B, S, H, X) -> (B, S, Hkv, X): sums the gradient over each kv head's group."""
    b, s, h, x = g.shape
    return g.reshape(b, s, hkv, h // hkv, x).sum(axis=3)


# ----------------------------------------------------------------------------
# float64 reference
# ----------------------------------------------------------------------------
def _bhsd(x: np.ndarray) -> np.ndarray:
    """(B, S, H, X) -> (B, H, S, X)."""
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3))


def _forward_parts(q, k, causal, window, scale, softcap, alibi_slopes, extra_mask):
    q = to_float64(q)
    k = to_float64(k)
    assert q.ndim == 4 and k.ndim == 4, (q.shape, k.shape)
    batch, sq, heads, d = q.shape
    sk = k.shape[1]
    assert k.shape[0] == batch and k.shape[3] == d
    scale = default_scale(d) if scale is None else float(scale)
    ke = _bhsd(expand_kv(k, heads))  # (B, H, Sk, D)
    u = scale * (_bhsd(q) @ ke.transpose(0, 1, 3, 2))  # (B, H, Sq, Sk)
    if softcap and softcap > 0:
        t = np.tanh(u / softcap)
        c = softcap * t
    else:
        t = None
        c = u
    bias = alibi_bias(alibi_slopes, batch, heads, sq, sk)
    s = c if bias is None else c + bias
    vis = np.broadcast_to(visible_mask(sq, sk, causal, window), (batch, heads, sq, sk))
    if extra_mask is not None:
        vis = vis & np.broadcast_to(np.asarray(extra_mask, dtype=bool), vis.shape)
    s_masked = np.where(vis, s, -np.inf)
    m = s_masked.max(axis=-1, keepdims=True, initial=-np.inf)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    e = np.where(vis, np.exp(s_masked - m_safe), 0.0)
    denom = e.sum(axis=-1, keepdims=True)
    nonempty = denom > 0
    safe = np.where(nonempty, denom, 1.0)
    lse = np.where(nonempty, np.log(safe) + m_safe, -np.inf)[..., 0]
    p = np.where(nonempty, e / safe, 0.0)
    return dict(scale=scale, t=t, s=s, vis=vis, p=p, lse=lse, ke=ke)


def _pv(p, v, heads):
    """P (B, H, Sq, Sk) @ V (B, Sk, Hkv, Dv) -> (B, Sq, H, Dv)."""
    ve = _bhsd(expand_kv(to_float64(v), heads))
    return (p @ ve).transpose(0, 2, 1, 3)


def attention_reference(q, k, v, causal=False, window=(-1, -1), scale=None, softcap=0.0,
                        alibi_slopes=None, extra_mask=None):
    """float64 attention. Returns (out (B, Sq, H, Dv), lse (B, H, Sq)).

    extra_mask: optional boolean broadcastable to (B, H, Sq, Sk), AND-ed with the
    causal/window mask (used to build partial states over key subsets).
    """
    parts = _forward_parts(q, k, causal, window, scale, softcap, alibi_slopes, extra_mask)
    out = _pv(parts["p"], v, parts["p"].shape[1])
    return np.ascontiguousarray(out), parts["lse"]


def attention_scores_reference(q, k, causal=False, window=(-1, -1), scale=None, softcap=0.0,
                               alibi_slopes=None):
    """(scores s (B, H, Sq, Sk) before masking, visible mask (B, H, Sq, Sk))."""
    parts = _forward_parts(q, k, causal, window, scale, softcap, alibi_slopes, None)
    return parts["s"], parts["vis"]


def attention_grad_reference(q, k, v, dout, causal=False, window=(-1, -1), scale=None, softcap=0.0,
                             alibi_slopes=None, dlse=None):
    """Analytic float64 gradients (dq, dk, dv) of attention_reference.

    dout: (B, Sq, H, Dv) gradient of out; dlse: optional (B, H, Sq) gradient of lse
    (ignored on rows where no key is visible).
    """
    q64 = to_float64(q)
    k64 = to_float64(k)
    v64 = to_float64(v)
    do = to_float64(dout)
    heads = q64.shape[2]
    hkv = k64.shape[2]
    parts = _forward_parts(q64, k64, causal, window, scale, softcap, alibi_slopes, None)
    p = parts["p"]  # (B, H, Sq, Sk)
    ve = _bhsd(expand_kv(v64, heads))  # (B, H, Sk, Dv)
    do_h = _bhsd(do)  # (B, H, Sq, Dv)
    out_h = p @ ve
    dv_full = p.transpose(0, 1, 3, 2) @ do_h  # (B, H, Sk, Dv)
    dp = do_h @ ve.transpose(0, 1, 3, 2)  # (B, H, Sq, Sk)
    delta = np.sum(do_h * out_h, axis=-1, keepdims=True)  # rowsum(dO * O)
    ds = p * (dp - delta)
    if dlse is not None:
        ds = ds + p * to_float64(dlse)[..., None]  # p is 0 on empty rows
    if parts["t"] is not None:
        ds = ds * (1.0 - parts["t"] ** 2)
    sc = parts["scale"]
    dq = sc * (ds @ parts["ke"])  # (B, H, Sq, D)
    dk_full = sc * (ds.transpose(0, 1, 3, 2) @ _bhsd(q64))  # (B, H, Sk, D)
    back = (0, 2, 1, 3)
    return (np.ascontiguousarray(dq.transpose(back)),
            reduce_kv(dk_full.transpose(back), hkv),
            reduce_kv(dv_full.transpose(back), hkv))


def attention_error_scales(q, k, v, dout=None, causal=False, window=(-1, -1), scale=None, softcap=0.0,
                           alibi_slopes=None, dlse=None):
    """Scales for the floor of the tolerance rule, immune to cancellation.

    Every result is a sum of products; this evaluates the same sums over the absolute values
    of the terms (|V|, |dO|, |dP| <= |dO| |V|^T, |Dlt| <= |dO| . P|V|, |dL|, |K|, |Q|) and
    returns the largest entry of each: {"out", and with dout "dq", "dk", "dv"}. A result can be ~0 while
    its terms are not (e.g. a window of one key gives dS = P(dP - Dlt) = 0 exactly); a
    correctly rounded computation still errs by ~eps times these sums.
    """
    q64, k64, v64 = to_float64(q), to_float64(k), to_float64(v)
    heads, hkv = q64.shape[2], k64.shape[2]
    parts = _forward_parts(q64, k64, causal, window, scale, softcap, alibi_slopes, None)
    p = parts["p"]
    va = np.abs(_bhsd(expand_kv(v64, heads)))
    out_a = p @ va

    def mx(x):
        return float(np.max(x, initial=0.0))

    res = {"out": mx(out_a)}
    if dout is None:
        return res
    do_a = np.abs(_bhsd(to_float64(dout)))
    ds_a = p * (do_a @ va.transpose(0, 1, 3, 2) + np.sum(do_a * out_a, axis=-1, keepdims=True))
    if dlse is not None:
        ds_a = ds_a + p * np.abs(to_float64(dlse))[..., None]
    if parts["t"] is not None:
        ds_a = ds_a * (1.0 - parts["t"] ** 2)
    sc = abs(parts["scale"])
    back = (0, 2, 1, 3)

    def grads(pw, dsw):  # the gradient sums with weights pw (for P) and dsw (for dS)
        return (mx(sc * (dsw @ np.abs(parts["ke"]))),
                mx(reduce_kv((sc * (dsw.transpose(0, 1, 3, 2) @ np.abs(_bhsd(q64)))).transpose(back), hkv)),
                mx(reduce_kv((pw.transpose(0, 1, 3, 2) @ do_a).transpose(back), hkv)))

    res["dq"], res["dk"], res["dv"] = grads(p, ds_a)
    # A backward that recomputes P = exp(s - lse) (every flash backward) gets each P_ij with
    # a relative error of a few roundings of the score, whatever the softmax: u * |s|_abs,
    # where |s|_abs is the score evaluated over |terms| (scale * |q|.|k|, |ALiBi bias|). The
    # textbook computation, which normalizes the P it exponentiated, does not, so for
    # peaked float32 softmaxes over large scores (P ~ 1 held to 1e-5) this term exceeds 2x
    # its error plus the floor. "<name>_recompute": the gradient sums with P_ij weighted by
    # |s_ij|_abs (see recompute_allowance).
    s_abs = sc * (np.abs(_bhsd(q64)) @ np.abs(parts["ke"]).transpose(0, 1, 3, 2))  # (softcap: tanh' <= 1)
    bias = alibi_bias(alibi_slopes, q64.shape[0], heads, q64.shape[1], k64.shape[1])
    if bias is not None:
        s_abs = s_abs + np.abs(bias)
    pe = p * s_abs
    ds_e = pe * (ds_a / np.where(p > 0, p, 1.0))
    res["dq_recompute"], res["dk_recompute"], res["dv_recompute"] = grads(pe, ds_e)
    return res


def attention_reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, window=(-1, -1),
                               scale=None, softcap=0.0, alibi_slopes=None):
    """Packed (total, H, D) layout; returns (out (total_q, H, Dv), lse (H, total_q))."""
    q64, k64, v64 = to_float64(q), to_float64(k), to_float64(v)
    cq = np.asarray(to_numpy(cu_seqlens_q)).astype(np.int64)
    ck = np.asarray(to_numpy(cu_seqlens_k)).astype(np.int64)
    batch = cq.size - 1
    heads = q64.shape[1]
    slopes = alibi_slopes_bh(alibi_slopes, batch, heads)
    out = np.zeros(q64.shape[:2] + (v64.shape[-1],))
    lse = np.full((heads, q64.shape[0]), -np.inf)
    for b in range(batch):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        o, l_ = attention_reference(q64[None, qs], k64[None, ks], v64[None, ks], causal, window, scale,
                                    softcap, None if slopes is None else slopes[b:b + 1])
        out[qs] = o[0]
        lse[:, qs] = l_[0]
    return out, lse


def merge_reference(outs, lses):
    """Merge partial attention states over disjoint key sets, float64.

    outs: N x (B, S, H, Dv); lses: N x (B, H, S). Returns (out, lse); rows whose
    partial LSEs are all -inf give out 0 and lse -inf.
    """
    o = np.stack([to_float64(x) for x in outs])  # (N, B, S, H, Dv)
    lse_n = np.stack([to_float64(x) for x in lses])  # (N, B, H, S)
    m = lse_n.max(axis=0, initial=-np.inf)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    w = np.where(np.isneginf(lse_n), 0.0, np.exp(lse_n - m_safe))
    tot = w.sum(axis=0)
    with np.errstate(divide="ignore"):
        lse = np.where(tot > 0, np.log(np.where(tot > 0, tot, 1.0)) + m_safe, -np.inf)
    wn = np.where(tot > 0, w / np.where(tot > 0, tot, 1.0), 0.0)  # (N, B, H, S)
    out = np.einsum("nbhs,nbshe->bshe", wn, o)
    return out, lse


# ----------------------------------------------------------------------------
# the textbook low-precision computation (torch), the baseline of the tolerance rule
# ----------------------------------------------------------------------------
def _as_torch(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x
    return numpy_to_torch(np.asarray(x))


def naive_attention_low_precision(q, k, v, causal=False, window=(-1, -1), scale=None, softcap=0.0,
                                  alibi_slopes=None, dtype=None):
    """Eager textbook attention evaluated in `dtype` (default: q's dtype). Differentiable.

    Returns (out (B, Sq, H, Dv), lse (B, H, Sq)) torch tensors of `dtype`; rows
    without a visible key give out 0 and lse -inf.
    """
    import torch

    qt, kt, vt = _as_torch(q), _as_torch(k), _as_torch(v)
    dtype = qt.dtype if dtype is None else dtype
    qt, kt, vt = qt.to(dtype), kt.to(dtype), vt.to(dtype)
    batch, sq, heads, d = qt.shape
    sk, hkv = kt.shape[1], kt.shape[2]
    scale = default_scale(d) if scale is None else float(scale)
    g = heads // hkv
    ke = kt.repeat_interleave(g, dim=2)
    ve = vt.repeat_interleave(g, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", qt * scale, ke)  # materialized in dtype
    if softcap and softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        bias = torch.from_numpy(alibi_bias(alibi_slopes, batch, heads, sq, sk))
        scores = scores + bias.to(dtype).to(scores.device)
    vis = torch.from_numpy(np.ascontiguousarray(visible_mask(sq, sk, causal, window))).to(scores.device)
    scores = scores.masked_fill(~vis, float("-inf"))
    empty = ~vis.any(dim=-1)  # (Sq,)
    # logsumexp of an all -inf row is -inf but its backward is NaN: fill those rows first
    lse = torch.logsumexp(scores.masked_fill(empty[:, None], 0.0), dim=-1).masked_fill(empty, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p = p.masked_fill(empty[:, None], 0.0)
    out = torch.einsum("bhij,bjhe->bihe", p.to(dtype), ve)
    return out, lse


# ----------------------------------------------------------------------------
# tolerance rule
# ----------------------------------------------------------------------------
#: relative size of the floor, per dtype of the checked values: one rounding for the
#: half formats, a few thousand float32/float64 ulps for the full-precision ones
FLOOR_RTOL = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 1e-5, "float64": 1e-10}


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def max_abs_err(out, ref, where=None) -> float:
    out64 = to_float64(out)
    ref64 = np.asarray(ref, dtype=np.float64)
    assert out64.shape == ref64.shape, (out64.shape, ref64.shape)
    if where is not None:
        out64, ref64 = out64[where], ref64[where]
    if out64.size == 0:
        return 0.0
    with np.errstate(invalid="ignore"):
        d = np.abs(out64 - ref64)
    return float(np.max(np.where(np.isnan(d), np.inf, d)))


def allowance(naive_err: float, magnitude: float, name: str) -> float:
    """FlashAttention's rule: 2 x the naive error + a floor of FLOOR_RTOL * magnitude."""
    return 2.0 * naive_err + FLOOR_RTOL[name] * magnitude


#: roundings of the score allowed in a recomputed P (attention_error_scales), in units of
#: the accumulation dtype (float32 for the half formats)
RECOMPUTE_ULPS = 4
ACC_EPS = {"float16": 2.0 ** -24, "bfloat16": 2.0 ** -24, "float32": 2.0 ** -24, "float64": 2.0 ** -53}


def recompute_allowance(recompute_scale: float, name: str) -> float:
    """The part of a flash backward's error that comes from recomputing P from the saved
    lse: RECOMPUTE_ULPS roundings (accumulation dtype) of each score, weighted as the
    gradient weighs P (attention_error_scales' "<grad>_recompute")."""
    return RECOMPUTE_ULPS * ACC_EPS[name] * recompute_scale


def assert_close_by_rule(got, ref, naive, *, what, name=None, magnitude=None, where=None, recompute=0.0):
    """max|got - ref| <= 2 max|naive - ref| + FLOOR_RTOL[name] * magnitude
                        + recompute_allowance(recompute, name).

    name: dtype whose floor applies (default: got's dtype); magnitude default max|ref|.
    naive may be None (then only the floor applies). recompute: for gradients of a flash
    backward, attention_error_scales' "<grad>_recompute".
    """
    name = name or dtype_name(getattr(got, "dtype", None))
    ref64 = np.asarray(ref, dtype=np.float64)
    sel = ref64 if where is None else ref64[where]
    if magnitude is None:
        magnitude = float(np.max(np.abs(sel))) if sel.size else 0.0
    err = max_abs_err(got, ref64, where)
    nerr = 0.0 if naive is None else max_abs_err(naive, ref64, where)
    tol = allowance(nerr, magnitude, name) + recompute_allowance(recompute, name)
    assert err <= tol, (f"{what}: max abs error {err:.4g} > allowance {tol:.4g} "
                        f"(naive error {nerr:.4g}, magnitude {magnitude:.4g}, {name})")
    return err, tol


def assert_lse_matches(got, ref, naive, *, what="lse", magnitude=None):
    """LSE (float32 for every input dtype): -inf exactly where the reference is -inf,
    elsewhere the rule with the float32 floor relative to max(1, max|lse|, magnitude)
    (magnitude: e.g. the largest |score|, which bounds the float32 error of exp/log)."""
    g = to_float64(got)
    r = np.asarray(ref, dtype=np.float64)
    assert g.shape == r.shape, (g.shape, r.shape)
    ref_empty = np.isneginf(r)
    got_empty = np.isneginf(g)
    assert np.array_equal(ref_empty, got_empty), (
        f"{what}: -inf rows differ: expected {np.argwhere(ref_empty)[:8].tolist()}, "
        f"got {np.argwhere(got_empty)[:8].tolist()}")
    fin = ~ref_empty
    mag = max(1.0, float(np.max(np.abs(r[fin]))) if fin.any() else 0.0, magnitude or 0.0)
    return assert_close_by_rule(g, r, naive, what=what, name="float32", magnitude=mag, where=fin)
