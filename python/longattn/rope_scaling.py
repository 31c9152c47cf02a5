"""Rotary position embedding (RoPE) frequencies, including long-context scaling.

RoPE (Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding",
arXiv:2104.09864) rotates the pair ``(x[i], x[i + rotary_dim/2])`` of every query and
key by the angle ``position * inv_freq[i]``, with ``inv_freq[i] = theta ** (-2 i / rotary_dim)``.
This module computes ``inv_freq`` and the scale applied to cos/sin (the "attention
factor") for the RoPE variants that Hugging Face transformers understands, so that a
``longattn`` kernel rotates exactly like the model it replaces.  It is pure NumPy: no
torch, no compiled extension.

Scaling methods and where they come from:

* ``linear``: position interpolation, Chen, Wong, Chen & Tian, "Extending Context Window
  of Large Language Models via Positional Interpolation", arXiv:2306.15595 (2023)
  (found concurrently by kaiokendev).  Positions are divided by ``factor``.
* ``ntk``: "NTK-aware" scaling, bloc97, "NTK-Aware Scaled RoPE allows LLaMA models to
  have extended (8k+) context size without any fine-tuning and minimal perplexity
  degradation", r/LocalLLaMA (June 2023); written up as "NTK-aware interpolation" in
  Sec. 3.1 of the YaRN paper below.  The base is raised so that the lowest frequency is
  interpolated by ``factor`` while the highest is left alone.  transformers has no
  static variant; it is offered here because some checkpoints are fine-tuned with it.
* ``dynamic``: dynamic NTK scaling, emozilla, "Dynamically Scaled RoPE further increases
  performance of long context LLaMA with zero fine-tuning", r/LocalLLaMA (2023); YaRN
  paper Sec. 3.3.  The NTK base change grows with the current sequence length.
* ``yarn``: Peng, Quesnelle, Fan & Shippole, "YaRN: Efficient Context Window Extension
  of Large Language Models", arXiv:2309.00071 (ICLR 2024).  The ``mscale`` /
  ``mscale_all_dim`` refinement of the attention factor is the one of DeepSeek-V2
  (arXiv:2405.04434).
* ``longrope`` (legacy name ``su``): Ding et al., "LongRoPE: Extending LLM Context Window
  Beyond 2 Million Tokens", arXiv:2402.13753 (ICML 2024), as used by Phi-3.
* ``llama3``: the frequency-dependent interpolation released with Llama 3.1 (Llama
  Team, AI @ Meta, "The Llama 3 Herd of Models", arXiv:2407.21783; reference code in
  meta-llama/llama-models).
* ``proportional``: transformers' "proportional" RoPE, where only the first
  ``partial_rotary_factor`` share of the head rotates, with exponents normalised by the
  full ``head_dim``, and the remaining frequencies are zero.

Numerics.  The values are meant to equal transformers' ``ROPE_INIT_FUNCTIONS`` (and the
models' ``compute_default_rope_parameters``) bit for bit.  Every float32 operation of
transformers is repeated in float32 here, in the same order, with Python scalars rounded
to float32 where torch rounds them, and the Python-float (float64) parts are evaluated
with the same Python expressions.  The single operation whose result torch does not pin
down is ``base ** exponent``: torch's CPU kernel sends full SIMD blocks (32 values with
AVX-512, 16 with AVX2) to SLEEF's ``powf`` and the remaining values to the C library's
``powf``; the two disagree by one ulp on about 2 % of the values.  This module uses the
C library's ``powf`` for every element, i.e. it reproduces torch's scalar kernel
exactly (``ATEN_CPU_CAPABILITY=default``, and every run shorter than a SIMD block).  The
SIMD kernel may differ from it by one float32 ulp in ``theta ** exponent``; in the
returned frequencies that is at most 1 ulp for published checkpoint configs and up to
3 ulps (``llama3``, whose blend amplifies errors: 8) over random parameters.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional, Tuple

import numpy as np

__all__ = ["rope_frequencies", "ROPE_TYPES"]

#: Every value accepted for ``rope_parameters["rope_type"]`` (or the legacy ``"type"``).
ROPE_TYPES = ("default", "linear", "dynamic", "ntk", "yarn", "longrope", "su", "llama3", "proportional")

#: Largest number of frequencies (rotary_dim / 2) a longattn kernel accepts.
MAX_ROTARY_PAIRS = 256

_F32 = np.float32
_ONE = np.float32(1.0)

# Keys that are read from ``rope_parameters``; anything else in the dict is ignored.
_KNOWN_KEYS = frozenset(
    {
        "rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
        "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate",
        "short_factor", "long_factor", "low_freq_factor", "high_freq_factor",
        "partial_rotary_factor",
    }
)


def rope_frequencies(
    head_dim: int,
    rope_parameters: Optional[Mapping[str, Any]] = None,
    *,
    theta: float = 10000.0,
    partial_rotary_factor: float = 1.0,
    max_position_embeddings: Optional[int] = None,
    seq_len: Optional[int] = None,
) -> Tuple[np.ndarray, float]:
    """Inverse RoPE frequencies and attention factor, as Hugging Face transformers computes them.

    Args:
        head_dim: size of one attention head (a positive even int).
        rope_parameters: a transformers RoPE dict, or None for plain RoPE.  Both spellings
            are accepted: the transformers-5 ``config.rope_parameters`` (``"rope_type"``,
            usually with ``"rope_theta"`` inside) and the older ``config.rope_scaling``
            (``"type"``; theta then comes from the ``theta`` argument).  If both
            ``rope_type`` and ``type`` are present, ``rope_type`` wins.  A key whose
            value is None counts as absent (except ``truncate``, which must be a bool).
            Keys not listed below are ignored.  Nested per-layer dicts are not accepted:
            pass the dict of one layer type.
        theta: RoPE base, used when the dict has no ``rope_theta``.  Must be > 1.
        partial_rotary_factor: share of ``head_dim`` that rotates, in (0, 1]; the dict's
            ``partial_rotary_factor`` overrides it.
        max_position_embeddings: the model's ``config.max_position_embeddings`` (context
            length after scaling).  Needed by ``dynamic``; and by ``yarn``, ``longrope``
            and ``llama3`` as the fallback for ``original_max_position_embeddings`` (as
            transformers does), by ``yarn`` and ``longrope`` to infer ``factor`` when
            it is absent.
        seq_len: current sequence length, read by ``dynamic`` (scaling grows past
            ``max_position_embeddings``) and ``longrope`` (``long_factor`` is used when
            ``seq_len > original_max_position_embeddings``, else ``short_factor``).
            Ignored by the other types.  A positive int or None.

    Returns:
        ``(inv_freq, attention_factor)``: ``inv_freq`` is a new C-contiguous float32
        ``np.ndarray`` of shape ``(rotary_dim // 2,)`` where
        ``rotary_dim = int(head_dim * partial_rotary_factor)`` (for ``proportional``:
        shape ``(head_dim // 2,)``); ``attention_factor`` is a Python float, the scale
        transformers multiplies cos and sin by (1.0 except for ``yarn`` and
        ``longrope``).

    Types (``d = rotary_dim``, ``i = 0 .. d/2 - 1``, ``b = rope_theta``, ``s = factor``,
    ``L0 = original_max_position_embeddings``, ``L = max_position_embeddings``):

    * ``default``: ``inv_freq[i] = b ** (-2i/d)``.  Needs nothing.
    * ``linear``: ``default / s``.  Needs ``factor``.
    * ``ntk``: ``default`` with ``b' = b * s ** (d / (d - 2))``.  Needs ``factor``; d >= 4.
    * ``dynamic``: ``default`` with ``b' = b * (s * n / L - (s - 1)) ** (d / (d - 2))``,
      ``n = max(seq_len, L)`` (``n = L`` when seq_len is None, which gives ``default``).
      Needs ``factor`` and ``max_position_embeddings``; d >= 4.
    * ``yarn``: ``inv = default / s * (1 - g) + default * g`` with ``g`` = 1 minus a
      linear ramp over the pair index ``i`` from ``lo`` to ``hi``, where
      ``dim(r) = d * ln(L0 / (2 pi r)) / (2 ln b)``, ``lo = max(floor(dim(beta_fast)), 0)``,
      ``hi = min(ceil(dim(beta_slow)), d - 1)`` (no floor/ceil when ``truncate`` is False);
      ``attention_factor`` = given value, else ``m(s, mscale) / m(s, mscale_all_dim)`` when
      both are given and nonzero, else ``m(s, 1)``, with ``m(s, k) = 0.1 k ln s + 1`` for
      s > 1 and 1 otherwise.  Needs ``factor`` (or L and L0, giving ``s = L / L0``) and
      ``original_max_position_embeddings`` (or L).  Optional ``beta_fast`` (32),
      ``beta_slow`` (1), ``mscale``, ``mscale_all_dim``, ``attention_factor``,
      ``truncate`` (True).
    * ``longrope`` / ``su``: ``inv_freq[i] = 1 / (f[i] * b ** (2i/d))``, ``f = long_factor``
      if ``seq_len > L0`` else ``short_factor`` (each of length d/2);
      ``attention_factor`` = given value, else ``sqrt(1 + ln s / ln L0)`` if s > 1 else 1,
      with ``s = factor`` or ``L / L0``.  Needs ``short_factor``, ``long_factor``,
      ``original_max_position_embeddings`` (or L); ``factor`` or L unless
      ``attention_factor`` is given.
    * ``llama3``: with ``w = 2 pi / default``: ``default`` where ``w < L0 / high_freq_factor``,
      ``default / s`` where ``w > L0 / low_freq_factor``, else
      ``(1 - a) default / s + a default`` with
      ``a = (L0 / w - low_freq_factor) / (high_freq_factor - low_freq_factor)``.  Needs
      ``factor``, ``low_freq_factor``, ``high_freq_factor`` and
      ``original_max_position_embeddings`` (or L).
    * ``proportional``: ``k = int(partial_rotary_factor * head_dim // 2)`` rotating pairs,
      ``inv_freq[i] = b ** (-2i/head_dim) / s`` for ``i < k`` and 0 up to ``head_dim/2``;
      ``factor`` is optional (1).

    Validation raises ValueError, naming the argument or key, the expectation and the
    value, for: an unknown rope type; a required key that is missing; a non-numeric,
    non-finite or out-of-range value (``factor < 1``, ``theta <= 1``, ``beta_fast <
    beta_slow``, ``high_freq_factor <= low_freq_factor``, ``attention_factor <= 0``,
    short/long factor lists of the wrong length or with non-positive entries, ...); an
    odd ``head_dim`` or ``rotary_dim``; ``rotary_dim < 2``; ``rotary_dim / 2 > 256``.
    transformers only logs a warning for several of these; here they are errors.

    Example:
        >>> inv_freq, attn = rope_frequencies(
        ...     128,
        ...     {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
        ...      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        ...      "original_max_position_embeddings": 8192},
        ... )
        >>> inv_freq.shape, inv_freq.dtype, attn
        ((64,), dtype('float32'), 1.0)
    """
    params = _clean_parameters(rope_parameters)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_parameters['rope_type'] must be one of {ROPE_TYPES}; got {rope_type!r}")
    if rope_type == "su":
        rope_type = "longrope"

    head_dim = _positive_int("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even; got {head_dim}")
    base = params.get("rope_theta", None)
    base = _real("rope_parameters['rope_theta']", base) if base is not None else _real("theta", theta)
    if not base > 1.0 or not _fits_float32(base):
        name = "rope_parameters['rope_theta']" if "rope_theta" in params else "theta"
        raise ValueError(f"{name} must be a finite number > 1 (and representable in float32); got {base!r}")
    if "partial_rotary_factor" in params:
        prf_name, prf = "rope_parameters['partial_rotary_factor']", params["partial_rotary_factor"]
    else:
        prf_name, prf = "partial_rotary_factor", partial_rotary_factor
    prf = _real(prf_name, prf)
    if not 0.0 < prf <= 1.0:
        raise ValueError(f"{prf_name} must be in (0, 1]; got {prf!r}")
    max_pos = _optional_positive_int("max_position_embeddings", max_position_embeddings)
    seq_len = _optional_positive_int("seq_len", seq_len)

    if rope_type == "proportional":
        return _proportional(params, head_dim, base, prf)

    dim = int(head_dim * prf)  # transformers' rotary_dim
    if dim < 2 or dim % 2:
        raise ValueError(
            f"rotary_dim = int(head_dim * partial_rotary_factor) must be an even number >= 2; "
            f"got int({head_dim} * {prf!r}) = {dim}"
        )
    if dim // 2 > MAX_ROTARY_PAIRS:
        raise ValueError(
            f"rotary_dim / 2 must be <= {MAX_ROTARY_PAIRS}; got rotary_dim = int({head_dim} * {prf!r}) = {dim}"
        )

    if rope_type == "default":
        return _plain_inv_freq(base, dim), 1.0
    if rope_type == "linear":
        factor = _factor(params, rope_type)
        return _plain_inv_freq(base, dim) / _F32(factor), 1.0
    if rope_type == "ntk":
        factor = _factor(params, rope_type)
        _need_dim_above_two(dim, rope_type)
        scaled = _scaled_base(lambda: base * factor ** (dim / (dim - 2)), "ntk-scaled theta (check factor)")
        return _plain_inv_freq(scaled, dim, what="ntk-scaled theta (check factor)"), 1.0
    if rope_type == "dynamic":
        return _dynamic(params, dim, base, max_pos, seq_len), 1.0
    if rope_type == "yarn":
        return _yarn(params, dim, base, max_pos)
    if rope_type == "longrope":
        return _longrope(params, dim, base, max_pos, seq_len)
    return _llama3(params, dim, base, max_pos), 1.0


# ----------------------------------------------------------------------------------------
# The float32 building blocks (each mirrors one torch expression of transformers).


def _exponents(numerator_stop: int, denominator: int) -> np.ndarray:
    # torch.arange(0, stop, 2).float() / denominator: exact integers, one float32 division.
    return np.arange(0, numerator_stop, 2, dtype=np.int64).astype(_F32) / _F32(denominator)


def _powf(base: float, exponents: np.ndarray) -> np.ndarray:
    # torch.pow(python_float, float32 tensor): base rounded to float32, then the C
    # library's powf per element (NumPy float32 scalars call powf; NumPy's array ufunc
    # may use a different SIMD routine, hence the scalar loop).
    b = _F32(base)
    return np.array([b ** e for e in exponents], dtype=_F32)


def _plain_inv_freq(base: float, dim: int, what: str = "theta") -> np.ndarray:
    if not _fits_float32(base):
        raise ValueError(f"the {what} overflows float32; got {base!r}")
    # 1.0 / t is t.reciprocal() * 1.0 in torch.
    return _ONE / _powf(base, _exponents(dim, dim))


# ----------------------------------------------------------------------------------------
# The scaling types.


def _dynamic(params, dim, base, max_pos, seq_len) -> np.ndarray:
    factor = _factor(params, "dynamic")
    _need_dim_above_two(dim, "dynamic")
    if max_pos is None:
        raise ValueError(
            "max_position_embeddings is required for rope_type 'dynamic' (scaling starts past it); got None"
        )
    n = max_pos if seq_len is None else max(seq_len, max_pos)
    what = "dynamic-NTK theta (check seq_len and factor)"
    scaled = _scaled_base(lambda: base * ((factor * n / max_pos) - (factor - 1)) ** (dim / (dim - 2)), what)
    return _plain_inv_freq(scaled, dim, what=what)


def _scaled_base(formula, what):
    try:
        return formula()
    except OverflowError:
        raise ValueError(f"the {what} overflows") from None


def _yarn(params, dim, base, max_pos) -> Tuple[np.ndarray, float]:
    original = _original_max(params, max_pos, "yarn")
    if params.get("factor") is None:
        if max_pos is None:
            raise ValueError(
                "rope_parameters['factor'] is required for rope_type 'yarn' unless max_position_embeddings is "
                "given (then factor = max_position_embeddings / original_max_position_embeddings); got neither"
            )
        factor = max_pos / original
    else:
        factor = _factor(params, "yarn")

    attention_factor = params.get("attention_factor")
    if attention_factor is not None:
        attention_factor = _positive_real("rope_parameters['attention_factor']", attention_factor)
    else:
        mscale = _optional_real(params, "mscale")
        mscale_all_dim = _optional_real(params, "mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
        if not (math.isfinite(attention_factor) and attention_factor > 0):
            raise ValueError(
                "rope_parameters['mscale'] / ['mscale_all_dim'] must give a finite positive attention factor; "
                f"got mscale={params.get('mscale')!r}, mscale_all_dim={params.get('mscale_all_dim')!r}"
            )

    beta_fast = _optional_real(params, "beta_fast") or 32
    beta_slow = _optional_real(params, "beta_slow") or 1
    if beta_fast < beta_slow:
        raise ValueError(
            f"rope_parameters['beta_fast'] must be >= rope_parameters['beta_slow']; got beta_fast={beta_fast!r}, "
            f"beta_slow={beta_slow!r}"
        )
    if not beta_slow > 0:
        raise ValueError(f"rope_parameters['beta_slow'] must be > 0; got {beta_slow!r}")
    truncate = params.get("truncate", True)
    if not isinstance(truncate, (bool, np.bool_)):
        raise ValueError(f"rope_parameters['truncate'] must be True or False; got {truncate!r}")

    # Correction range, in Python floats exactly as transformers evaluates it.
    low = _yarn_correction_dim(beta_fast, dim, base, original)
    high = _yarn_correction_dim(beta_slow, dim, base, original)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp

    pos_freqs = _powf(base, _exponents(dim, dim))
    extrapolation = _ONE / pos_freqs
    interpolation = _ONE / (_F32(factor) * pos_freqs)
    ramp = (np.arange(dim // 2, dtype=_F32) - _F32(low)) / _F32(high - low)
    ramp = np.clip(ramp, _F32(0.0), _F32(1.0))
    extrapolation_weight = _ONE - ramp
    inv_freq = interpolation * (_ONE - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def _yarn_mscale(scale, mscale=1) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations, dim, base, original):
    # The dimension whose wavelength fits num_rotations times into the original context.
    return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _longrope(params, dim, base, max_pos, seq_len) -> Tuple[np.ndarray, float]:
    original = _original_max(params, max_pos, "longrope")
    lists = {}
    for key in ("short_factor", "long_factor"):
        lists[key] = _factor_list(params, key, dim // 2)

    attention_factor = params.get("attention_factor")
    if attention_factor is not None:
        attention_factor = float(_positive_real("rope_parameters['attention_factor']", attention_factor))
    else:
        if params.get("factor") is not None:
            factor = _factor(params, "longrope")
        elif max_pos is not None:
            factor = max_pos / original
        else:
            raise ValueError(
                "rope_parameters['factor'] is required for rope_type 'longrope' unless attention_factor or "
                "max_position_embeddings is given (then factor = max_position_embeddings / "
                "original_max_position_embeddings); got none of them"
            )
        if factor <= 1.0:
            attention_factor = 1.0
        elif original < 2:
            raise ValueError(
                "rope_parameters['original_max_position_embeddings'] must be >= 2 for the longrope attention "
                f"factor sqrt(1 + ln(factor) / ln(original_max_position_embeddings)); got {original}"
            )
        else:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))

    chosen = lists["long_factor"] if seq_len and seq_len > original else lists["short_factor"]
    inv_freq = _ONE / (chosen * _powf(base, _exponents(dim, dim)))
    return inv_freq, attention_factor


def _llama3(params, dim, base, max_pos) -> np.ndarray:
    factor = _factor(params, "llama3")
    low_ff = _required_real(params, "low_freq_factor", "llama3")
    high_ff = _required_real(params, "high_freq_factor", "llama3")
    if not low_ff > 0:
        raise ValueError(f"rope_parameters['low_freq_factor'] must be > 0; got {low_ff!r}")
    if not high_ff > low_ff:
        raise ValueError(
            "rope_parameters['high_freq_factor'] must be greater than rope_parameters['low_freq_factor']; got "
            f"high_freq_factor={high_ff!r}, low_freq_factor={low_ff!r}"
        )
    old_context = _original_max(params, max_pos, "llama3")

    inv_freq = _plain_inv_freq(base, dim)
    f_factor = _F32(factor)
    low_freq_wavelen = _F32(old_context / low_ff)  # torch compares against the float32-rounded scalar
    high_freq_wavelen = _F32(old_context / high_ff)
    wavelen = (_ONE / inv_freq) * _F32(2 * math.pi)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f_factor, inv_freq)
    smooth = ((_ONE / wavelen) * _F32(old_context) - _F32(low_ff)) / _F32(high_ff - low_ff)
    smoothed = (_ONE - smooth) * scaled / f_factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(_F32, copy=False)


def _proportional(params, head_dim, base, prf) -> Tuple[np.ndarray, float]:
    if head_dim // 2 > MAX_ROTARY_PAIRS:
        raise ValueError(f"head_dim / 2 must be <= {MAX_ROTARY_PAIRS} for rope_type 'proportional'; got {head_dim}")
    factor = _factor(params, "proportional") if params.get("factor") is not None else 1.0
    rope_angles = int(prf * head_dim // 2)
    rotated = _ONE / _powf(base, _exponents(2 * rope_angles, head_dim))
    inv_freq = np.concatenate([rotated, np.zeros(head_dim // 2 - rope_angles, dtype=_F32)])
    return inv_freq / _F32(factor), 1.0


# ----------------------------------------------------------------------------------------
# Argument checking.


def _clean_parameters(rope_parameters) -> dict:
    if rope_parameters is None:
        return {}
    if not isinstance(rope_parameters, Mapping):
        raise ValueError(
            f"rope_parameters must be a dict (transformers' rope_parameters or rope_scaling) or None; "
            f"got {type(rope_parameters).__name__}"
        )
    params = {k: v for k, v in rope_parameters.items() if v is not None or k == "truncate"}
    if params and not (_KNOWN_KEYS & params.keys()) and all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(
            "rope_parameters looks nested per layer type (keys "
            f"{sorted(params)}); pass the dict of one layer type"
        )
    return params


def _real(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number; got {value!r}")
    value = int(value) if isinstance(value, numbers.Integral) else float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    return value


def _positive_real(name: str, value) -> float:
    value = _real(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value!r}")
    return value


def _optional_real(params, key):
    value = params.get(key)
    return None if value is None else _real(f"rope_parameters['{key}']", value)


def _required_real(params, key, rope_type):
    if params.get(key) is None:
        raise ValueError(f"rope_parameters['{key}'] is required for rope_type '{rope_type}'; it is missing")
    return _real(f"rope_parameters['{key}']", params[key])


def _factor(params, rope_type):
    factor = _required_real(params, "factor", rope_type)
    if not factor >= 1:
        raise ValueError(f"rope_parameters['factor'] must be >= 1 for rope_type '{rope_type}'; got {factor!r}")
    return factor


def _positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be a positive int; got {value}")
    return value


def _optional_positive_int(name: str, value):
    return None if value is None else _positive_int(name, value)


def _original_max(params, max_pos, rope_type) -> int:
    value = params.get("original_max_position_embeddings")
    if value is not None:
        return _positive_int("rope_parameters['original_max_position_embeddings']", value)
    if max_pos is None:
        raise ValueError(
            f"rope_parameters['original_max_position_embeddings'] is required for rope_type '{rope_type}' "
            "(or pass max_position_embeddings, which transformers uses in its place); got neither"
        )
    return max_pos


def _factor_list(params, key, length) -> np.ndarray:
    values = params.get(key)
    if values is None:
        raise ValueError(f"rope_parameters['{key}'] is required for rope_type 'longrope'; it is missing")
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
        raise ValueError(f"rope_parameters['{key}'] must be a list of {length} numbers; got {values!r}")
    values = list(values)
    if len(values) != length:
        raise ValueError(
            f"rope_parameters['{key}'] must have rotary_dim / 2 = {length} entries; got {len(values)}"
        )
    for v in values:
        if not (_real(f"rope_parameters['{key}'] entries", v) > 0):
            raise ValueError(f"rope_parameters['{key}'] entries must be > 0; got {v!r}")
    return np.asarray([float(v) for v in values], dtype=np.float64).astype(_F32)


def _fits_float32(value) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.isfinite(_F32(value)))


def _need_dim_above_two(dim, rope_type):
    if dim < 4:
        raise ValueError(
            f"rope_type '{rope_type}' needs rotary_dim >= 4 (its exponent is rotary_dim / (rotary_dim - 2)); "
            f"got rotary_dim = {dim}"
        )
