"""Float64 reference for RoPE inverse frequencies, written from the published formulas.

Independent of ``longattn.rope_scaling``: nothing here imitates float32 evaluation
order; every quantity is computed in float64 straight from its definition, so that the
implementation can be checked to about float32 precision (relative 1e-6 .. 1e-5,
depending on how well conditioned the formula is).  Each function takes the resolved
parameters (no dict parsing, no defaults beyond those named in the signature) and
returns float64 arrays indexed by the rotation pair ``i = 0 .. rotary_dim/2 - 1``.

Notation: ``d`` rotary dimension, ``b`` base (theta), ``s`` scaling factor,
``L0`` pre-training context length, ``L`` context length after scaling.

* RoPE (Su et al., arXiv:2104.09864): pair ``i`` rotates with angular frequency
  ``theta_i = b^(-2i/d)`` radians per position, i.e. wavelength ``lambda_i = 2 pi / theta_i``.
* Position interpolation (Chen et al., arXiv:2306.15595): positions ``m -> m / s``,
  equivalently ``theta_i -> theta_i / s``.
* NTK-aware scaling (bloc97, 2023; YaRN paper Sec. 3.1): base ``b -> b s^(d/(d-2))``,
  chosen so that the lowest frequency ``theta_{d/2-1}`` is divided by exactly ``s``
  and ``theta_0 = 1`` stays.
* Dynamic NTK (emozilla, 2023; YaRN paper Sec. 3.3): the NTK base change with the
  effective factor ``s' = s n / L - (s - 1)`` for the current length ``n >= L``.
* YaRN (Peng et al., arXiv:2309.00071): "NTK-by-parts".  Pair ``i`` makes
  ``r_i = L0 / lambda_i`` turns over the original context.  Pairs that turn more than
  ``beta_fast`` times keep ``theta_i``; pairs that turn fewer than ``beta_slow`` times
  are interpolated to ``theta_i / s``; in between the two are mixed linearly.  As in
  the authors' released code (which transformers follows), the mixing ramp is linear in
  the pair index between the (real-valued) indices where ``r = beta_fast`` and
  ``r = beta_slow``, optionally widened to integers (floor / ceil) and clipped to
  ``[0, d - 1]``.  Solving ``L0 / (2 pi b^(2x/d)) = r`` gives that index:
  ``x(r) = d ln(L0 / (2 pi r)) / (2 ln b)``.  Attention temperature:
  ``sqrt(1/t) = 0.1 ln s + 1`` (Eq. 22); DeepSeek-V2 (arXiv:2405.04434) uses the ratio
  ``(0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1)``.
* LongRoPE (Ding et al., arXiv:2402.13753): per-pair rescale factors ``lambda_i`` found
  by search, ``theta_i -> theta_i / lambda_i``; attention scale
  ``sqrt(1 + ln s / ln L0)``.
* Llama 3.1 (arXiv:2407.21783, reference code in meta-llama/llama-models): wavelengths
  shorter than ``L0 / high_freq_factor`` keep ``theta_i``, longer than
  ``L0 / low_freq_factor`` get ``theta_i / s``, in between the mix weight for the
  unscaled frequency is ``(L0 / lambda_i - low_freq_factor) / (high_freq_factor -
  low_freq_factor)``.
"""
from __future__ import annotations

import math

import numpy as np


def default(rotary_dim: int, theta: float) -> np.ndarray:
    """theta_i = theta^(-2i/d)."""
    i = np.arange(rotary_dim // 2, dtype=np.float64)
    return np.exp(-(2.0 * i / rotary_dim) * math.log(theta))


def linear(rotary_dim: int, theta: float, factor: float) -> np.ndarray:
    return default(rotary_dim, theta) / factor


def ntk(rotary_dim: int, theta: float, factor: float) -> np.ndarray:
    d = rotary_dim
    return default(d, theta * factor ** (d / (d - 2.0)))


def dynamic(rotary_dim: int, theta: float, factor: float, max_position_embeddings: int, seq_len=None) -> np.ndarray:
    n = max_position_embeddings if seq_len is None else max(seq_len, max_position_embeddings)
    effective = factor * n / max_position_embeddings - (factor - 1.0)
    return ntk(rotary_dim, theta, effective)


def yarn_ramp(rotary_dim: int, theta: float, original_max_position_embeddings: int,
              beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True) -> np.ndarray:
    """Share of the interpolated frequency theta_i / s in YaRN's mix, per pair (0 .. 1)."""
    d, L0 = rotary_dim, original_max_position_embeddings

    def index_with_turns(turns):
        return d * math.log(L0 / (2.0 * math.pi * turns)) / (2.0 * math.log(theta))

    lo, hi = index_with_turns(beta_fast), index_with_turns(beta_slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    i = np.arange(d // 2, dtype=np.float64)
    if hi == lo:  # beta_fast == beta_slow: a step between extrapolation and interpolation
        return (i > lo).astype(np.float64)
    return np.clip((i - lo) / (hi - lo), 0.0, 1.0)


def yarn(rotary_dim: int, theta: float, factor: float, original_max_position_embeddings: int,
         beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True) -> np.ndarray:
    base = default(rotary_dim, theta)
    w = yarn_ramp(rotary_dim, theta, original_max_position_embeddings, beta_fast, beta_slow, truncate)
    return w * (base / factor) + (1.0 - w) * base


def yarn_attention_factor(factor: float, mscale=None, mscale_all_dim=None) -> float:
    def m(k):
        return 1.0 if factor <= 1 else 0.1 * k * math.log(factor) + 1.0

    if mscale and mscale_all_dim:
        return m(mscale) / m(mscale_all_dim)
    return m(1.0)


def longrope(rotary_dim: int, theta: float, rescale_factors) -> np.ndarray:
    return default(rotary_dim, theta) / np.asarray(rescale_factors, dtype=np.float64)


def longrope_attention_factor(factor: float, original_max_position_embeddings: int) -> float:
    if factor <= 1:
        return 1.0
    return math.sqrt(1.0 + math.log(factor) / math.log(original_max_position_embeddings))


def llama3(rotary_dim: int, theta: float, factor: float, low_freq_factor: float, high_freq_factor: float,
           original_max_position_embeddings: int) -> np.ndarray:
    base = default(rotary_dim, theta)
    L0 = original_max_position_embeddings
    wavelength = 2.0 * math.pi / base
    keep = (L0 / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    keep = np.clip(keep, 0.0, 1.0)  # 1 for short wavelengths, 0 for long ones
    return keep * base + (1.0 - keep) * base / factor


def llama3_condition(factor: float, low_freq_factor: float, high_freq_factor: float) -> float:
    """Worst-case relative sensitivity of llama3's output to a relative error in theta_i.

    In the mixed band, out = theta ((1 - a)/s + a) with a linear in theta, so
    d ln(out) / d ln(theta) = 1 + theta a'(theta) (1 - 1/s) / ((1 - a)/s + a), largest at
    a = 0 where it is 1 + low / (high - low) * (s - 1).
    """
    return 1.0 + low_freq_factor / (high_freq_factor - low_freq_factor) * (factor - 1.0)


def proportional(head_dim: int, theta: float, partial_rotary_factor: float, factor: float = 1.0) -> np.ndarray:
    """The first floor(p * head_dim / 2) pairs rotate with theta^(-2i/head_dim) / s; the rest do not."""
    rotating = int(partial_rotary_factor * head_dim // 2)
    out = np.zeros(head_dim // 2, dtype=np.float64)
    i = np.arange(rotating, dtype=np.float64)
    out[:rotating] = np.exp(-(2.0 * i / head_dim) * math.log(theta)) / factor
    return out
