"""Reference implementations for rotary position embedding (RoPE).

Written from the math of RoFormer (Su et al., 2021, "RoFormer: Enhanced
Transformer with Rotary Position Embedding"): every pair of channels
(x_a, x_b) of a head vector at position p is read as the complex number
z = x_a + i*x_b and multiplied by attention_factor * exp(i * theta_j), with
theta_j = p * inv_freq[j]. Which channels form pair j is the only difference
between the two layouts:

* NeoX / "rotate_half" (default): pair j = (j, j + rotary_dim/2)
* GPT-J / interleaved:            pair j = (2j, 2j + 1)

Channels >= rotary_dim = 2*len(inv_freq) pass through unchanged.

The angle is part of longattn's *defined* semantics: it is the float32 product
float32(p) * float32(inv_freq[j]). The reference therefore rounds the angle
exactly like that and only then evaluates cos/sin and the rotation in float64,
so the reference is the exact value of the defined function up to float64
rounding. Do NOT compute the angle in float64: at p ~ 1e6 the float32 angle
differs from the float64 one by up to 1/16 rad.

The backward of out = af * R(theta) x is x_grad = af * R(-theta) out_grad, the
"conjugate" rotation (``conjugate=True``).

`naive_rope_low_precision` mirrors what Hugging Face's eager path
(transformers LlamaRotaryEmbedding + apply_rotary_pos_emb) does in a low
precision dtype: cos/sin computed in float32, multiplied by the attention
factor, cast to the dtype, then q*cos + rotate_half(q)*sin evaluated in the
dtype. Its error against the float64 reference is the baseline for the
half-precision tolerance rule (`half_precision_allowance`).
"""
from __future__ import annotations

import numpy as np

try:  # ml_dtypes provides NumPy's bfloat16
    import ml_dtypes

    NP_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a test dependency
    ml_dtypes = None
    NP_BFLOAT16 = None


# ----------------------------------------------------------------------------
# conversions
# ----------------------------------------------------------------------------
def to_numpy(x):
    """Any array (NumPy, torch CPU/CUDA, JAX, CuPy, ...) -> NumPy array, same dtype
    where NumPy has it (torch bfloat16 -> ml_dtypes bfloat16)."""
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(NP_BFLOAT16)
        return x.numpy()
    if hasattr(x, "get") and mod.startswith("cupy"):
        return x.get()
    if hasattr(x, "copy_to_host"):  # numba device array
        return x.copy_to_host()
    return np.asarray(x)


def to_float64(x) -> np.ndarray:
    return np.asarray(to_numpy(x)).astype(np.float64)


def numpy_to_torch(x):
    """NumPy array (incl. ml_dtypes bfloat16) -> torch CPU tensor, same dtype."""
    import torch

    x = np.ascontiguousarray(x)
    if NP_BFLOAT16 is not None and x.dtype == NP_BFLOAT16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


# ----------------------------------------------------------------------------
# the defined angle
# ----------------------------------------------------------------------------
def default_positions(batch: int, seq: int) -> np.ndarray:
    return np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq))


def float32_angles(positions, inv_freq) -> np.ndarray:
    """theta[b, s, j] = float32(float32(positions[b, s]) * float32(inv_freq[j]))."""
    pos = np.asarray(to_numpy(positions))
    assert pos.dtype.kind in "iu", pos.dtype
    inv = np.asarray(to_numpy(inv_freq), dtype=np.float32)
    # NumPy float32 * float32 is the correctly rounded float32 product.
    return pos.astype(np.float32)[..., None] * inv


def _broadcast_positions(positions, batch, seq):
    if positions is None:
        return default_positions(batch, seq)
    pos = np.asarray(to_numpy(positions))
    return np.broadcast_to(pos, (batch, seq))


# ----------------------------------------------------------------------------
# float64 reference
# ----------------------------------------------------------------------------
def pair_indices(rotary_dim: int, interleaved: bool):
    """(a, b) channel indices of each rotated pair j (z_j = x_a + i x_b)."""
    half = rotary_dim // 2
    j = np.arange(half)
    if interleaved:
        return 2 * j, 2 * j + 1
    return j, j + half


def rope_reference(x, positions=None, inv_freq=None, attention_factor=1.0,
                   interleaved=False, conjugate=False) -> np.ndarray:
    """float64 RoPE of x (B, S, H, D); positions (B, S), (S,) or None (= arange(S)).

    conjugate=True rotates by -theta (the backward / inverse rotation).
    """
    x = to_float64(x)
    assert x.ndim == 4, x.shape
    batch, seq, _, dim = x.shape
    inv = np.asarray(to_numpy(inv_freq), dtype=np.float32).reshape(-1)
    rotary_dim = 2 * inv.size
    assert rotary_dim <= dim
    pos = _broadcast_positions(positions, batch, seq)
    theta = float32_angles(pos, inv).astype(np.float64)  # (B, S, half), exact
    if conjugate:
        theta = -theta
    # af * e^{i theta}, broadcast over heads
    rot = float(attention_factor) * np.exp(1j * theta)[:, :, None, :]
    a, b = pair_indices(rotary_dim, interleaved)
    z = (x[..., a] + 1j * x[..., b]) * rot
    out = x.copy()
    out[..., a] = z.real
    out[..., b] = z.imag
    return out


def rope_reference_qk(q, k, positions=None, inv_freq=None, attention_factor=1.0,
                      interleaved=False, conjugate=False):
    kw = dict(positions=positions, inv_freq=inv_freq, attention_factor=attention_factor,
              interleaved=interleaved, conjugate=conjugate)
    rq = rope_reference(q, **kw)
    rk = None if k is None else rope_reference(k, **kw)
    return rq, rk


# ----------------------------------------------------------------------------
# Hugging Face style low-precision baseline (torch)
# ----------------------------------------------------------------------------
def _as_torch(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x
    return numpy_to_torch(np.asarray(x))


def _rotate_half(x):
    import torch

    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _naive_one(x, cos, sin, rotary_dim, interleaved):
    import torch

    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        # GPT-J: cos/sin repeated per adjacent pair, rotate_every_two
        c = cos.repeat_interleave(2, dim=-1)
        s = sin.repeat_interleave(2, dim=-1)
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rot = torch.stack((-x2, x1), dim=-1).flatten(-2)
        y = x_rot * c + rot * s
    else:
        c = torch.cat((cos, cos), dim=-1)
        s = torch.cat((sin, sin), dim=-1)
        y = x_rot * c + _rotate_half(x_rot) * s
    return torch.cat((y, x_pass), dim=-1)


def naive_rope_low_precision(q, k, positions, inv_freq, attention_factor, interleaved, dtype):
    """HF-eager-style RoPE evaluated in `dtype` (a torch dtype). Differentiable.

    q, k: torch tensors or NumPy arrays (B, S, H, D); k may be None.
    Returns (q_out, k_out) torch tensors of dtype `dtype` (k_out None if k is None).
    """
    import torch

    qt = _as_torch(q).to(dtype)
    batch, seq, _, dim = qt.shape
    inv = torch.from_numpy(np.asarray(to_numpy(inv_freq), dtype=np.float32).reshape(-1).copy())
    rotary_dim = 2 * inv.numel()
    pos = np.asarray(_broadcast_positions(positions, batch, seq), dtype=np.int64)
    pos_t = torch.from_numpy(pos.copy()).to(qt.device)
    freqs = pos_t[..., None].float() * inv.to(qt.device)  # float32, like HF
    cos = (freqs.cos() * attention_factor).to(dtype)[:, :, None, :]
    sin = (freqs.sin() * attention_factor).to(dtype)[:, :, None, :]
    out_q = _naive_one(qt, cos, sin, rotary_dim, interleaved)
    out_k = None
    if k is not None:
        kt = _as_torch(k).to(dtype)
        out_k = _naive_one(kt, cos, sin, rotary_dim, interleaved)
    return out_q, out_k


# ----------------------------------------------------------------------------
# tolerance rules
# ----------------------------------------------------------------------------
#: one unit of relative rounding of each half-precision format at 1.0
HALF_EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}

#: tolerance relative to max|x| for the full-precision formats
FULL_PRECISION_RTOL = {"float32": 1e-5, "float64": 1e-6}


def dtype_name(dtype) -> str:
    """'float16' | 'bfloat16' | 'float32' | 'float64' for NumPy/ml_dtypes/torch dtypes."""
    s = str(dtype)
    return s.replace("torch.", "")


def max_abs_err(out, ref) -> float:
    out64 = to_float64(out)
    ref64 = np.asarray(ref, dtype=np.float64)
    assert out64.shape == ref64.shape, (out64.shape, ref64.shape)
    if out64.size == 0:
        return 0.0
    return float(np.max(np.abs(out64 - ref64)))


def half_precision_allowance(naive_err: float, scale: float, ref_max: float, name: str) -> float:
    """Allowed max error of longattn in fp16/bf16.

    At most twice the error of the naive HF-style low-precision computation,
    plus a floor: max(1e-3 * max|x|, one rounding of the largest output
    (HALF_EPS * max|ref|)); the floor covers tiny inputs where the naive
    computation happens to be exact while a correctly rounded result is not.
    """
    floor = max(1e-3 * scale, HALF_EPS[name] * ref_max)
    return 2.0 * naive_err + floor


def assert_matches_reference(out, ref, x, *, naive=None, what="output"):
    """Check `out` (any framework, any supported dtype) against float64 `ref`.

    x: the input (for the max|x| scale). naive: the HF-style low-precision
    output (required for float16/bfloat16).
    """
    name = dtype_name(getattr(out, "dtype", None))
    err = max_abs_err(out, ref)
    x64 = to_float64(x)
    scale = float(np.max(np.abs(x64))) if x64.size else 0.0
    ref_max = float(np.max(np.abs(ref))) if np.size(ref) else 0.0
    if name in FULL_PRECISION_RTOL:
        tol = FULL_PRECISION_RTOL[name] * max(scale, ref_max) + 1e-30
        assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g} ({name})"
    elif name in HALF_EPS:
        assert naive is not None, "half precision needs the naive baseline"
        naive_err = max_abs_err(naive, ref)
        tol = half_precision_allowance(naive_err, max(scale, ref_max), ref_max, name)
        assert err <= tol, (
            f"{what}: max abs error {err:.3g} > allowance {tol:.3g} "
            f"(naive {name} error {naive_err:.3g})")
    else:  # pragma: no cover
        raise AssertionError(f"unexpected dtype {name}")


# dtype tables shared by the test modules: name -> torch dtype / NumPy dtype
def _torch_dtypes():
    import torch

    return {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
            "bfloat16": torch.bfloat16}


TORCH_DTYPES = _torch_dtypes()
NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": NP_BFLOAT16,
}
CPU_DTYPES = ["float32", "float64", "float16", "bfloat16"]
