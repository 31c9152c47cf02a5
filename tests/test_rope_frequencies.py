"""Specification of ``longattn.rope_frequencies``: RoPE frequencies as transformers computes them.

Three kinds of evidence:

1. Bit-for-bit equality with transformers' own code (``ROPE_INIT_FUNCTIONS`` and a model's
   ``compute_default_rope_parameters``).  transformers runs in a helper process with
   ``ATEN_CPU_CAPABILITY=default``: torch evaluates ``theta ** exponent`` with SLEEF in
   its SIMD kernels and with the C library's ``powf`` in its scalar kernel, and the two
   differ by one ulp now and then; longattn reproduces the scalar kernel.  The
   SIMD-kernel difference is pinned separately (a few ulps, real checkpoint configs).
2. Agreement with the float64 formulas of the papers (tests/reference/rope_frequencies.py),
   to float32 accuracy times the condition number of the formula.
3. Properties and argument checking.
"""
from __future__ import annotations

import copy
import doctest
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from longattn import rope_scaling
from longattn.rope_scaling import ROPE_TYPES, rope_frequencies
from reference import rope_frequencies as ref

# float32 has a 2**-24 unit roundoff; the implementation's error against the float64
# formulas stays below 1e-6 for theta up to 1e8 (exponent rounding times ln(theta),
# plus a few roundings), so 2e-6 leaves a margin.
RTOL = 2e-6

# ------------------------------------------------------------------------------------------
# Strategies


@st.composite
def head_dims(draw, min_rotary_dim=2):
    """(head_dim, partial_rotary_factor) with an even rotary_dim >= min_rotary_dim and <= 512."""
    prf = draw(st.sampled_from([1.0, 0.5, 0.25]))
    step = int(2 / prf)  # head_dim multiple of step => int(head_dim * prf) is even
    lowest = max(1, math.ceil(min_rotary_dim / prf / step))
    head_dim = draw(st.integers(lowest, 512 // step)) * step
    return head_dim, prf


thetas = st.one_of(
    st.sampled_from([10000.0, 500000.0, 1000000.0, 123456.789]),
    st.integers(2, 10**7),
    st.floats(1.5, 1e8, allow_nan=False, allow_infinity=False),
)
factors = st.one_of(
    st.sampled_from([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 40.0]),
    st.sampled_from([1.1, 10 / 3, 7.7, 31.4159]),  # not representable in float32
    st.integers(1, 64),
    st.floats(1.0, 64.0, allow_nan=False, allow_infinity=False),
)
context_lengths = st.one_of(st.sampled_from([2048, 4096, 8192, 32768]), st.integers(16, 1 << 20))
seq_lens = st.one_of(st.none(), st.integers(1, 1 << 21))


def rotary_dim_of(head_dim, prf):
    return int(head_dim * prf)


# ------------------------------------------------------------------------------------------
# transformers, in a helper process with torch's scalar CPU kernels

_WORKER = r"""
import copy, json, sys
import numpy as np
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.utils import logging

logging.set_verbosity_error()
torch.set_num_threads(1)


def compute(req):
    rope = copy.deepcopy(req["rope"])
    head_dim = req["head_dim"]
    kwargs = dict(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim, rope_theta=req["theta"],
                  partial_rotary_factor=req["partial_rotary_factor"])
    if req["max_position_embeddings"] is not None:
        kwargs["max_position_embeddings"] = req["max_position_embeddings"]
    if rope is not None and "rope_type" not in rope:
        config = LlamaConfig(rope_scaling=rope, **kwargs)
    else:
        config = LlamaConfig(rope_parameters=rope, **kwargs)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return GPTNeoXRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=req["seq_len"])


print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability()}), flush=True)
for line in sys.stdin:
    try:
        freqs, attention_factor = compute(json.loads(line))
        out = {"bits": freqs.numpy().astype(np.float32).view(np.uint32).tolist(),
               "attention_factor": float(attention_factor).hex()}
    except Exception as exc:
        out = {"error": type(exc).__name__ + ": " + str(exc)}
    print(json.dumps(out), flush=True)
"""


class TransformersOracle:
    """transformers' RoPE init functions, evaluated by a long-lived child process."""

    def __init__(self):
        env = dict(os.environ, ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True, env=env,
        )
        hello = self._read()
        assert hello.get("capability") == "DEFAULT", hello

    def _read(self):
        line = self._proc.stdout.readline()
        if not line:
            self._stderr.seek(0)
            raise RuntimeError("transformers helper process died:\n" + self._stderr.read()[-4000:])
        return json.loads(line)

    def __call__(self, head_dim, rope, *, theta=10000.0, partial_rotary_factor=1.0,
                 max_position_embeddings=None, seq_len=None):
        request = dict(head_dim=head_dim, rope=rope, theta=theta, partial_rotary_factor=partial_rotary_factor,
                       max_position_embeddings=max_position_embeddings, seq_len=seq_len)
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise AssertionError(f"transformers rejected {request}: {out['error']}")
        return np.array(out["bits"], dtype=np.uint32).view(np.float32), float.fromhex(out["attention_factor"])

    def close(self):
        self._proc.stdin.close()
        self._proc.wait(timeout=30)
        self._stderr.close()


@pytest.fixture(scope="module")
def transformers_rope():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    oracle = TransformersOracle()
    yield oracle
    oracle.close()


def assert_equals_transformers(oracle, head_dim, rope, **kwargs):
    """longattn and transformers give identical float32 bits and the same attention factor."""
    expected, expected_attention = oracle(head_dim, copy.deepcopy(rope), **kwargs)
    got, got_attention = rope_frequencies(head_dim, copy.deepcopy(rope), **kwargs)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert got_attention == expected_attention
    return got, got_attention


# ------------------------------------------------------------------------------------------
# 1. Bit-for-bit equality with transformers


@given(head_dims(), thetas)
def test_default_equals_transformers_bit_for_bit(transformers_rope, hd, theta):
    head_dim, prf = hd
    assert_equals_transformers(transformers_rope, head_dim, {"rope_type": "default", "rope_theta": theta},
                               partial_rotary_factor=prf)


@given(head_dims(), thetas, factors)
def test_linear_equals_transformers_bit_for_bit(transformers_rope, hd, theta, factor):
    head_dim, prf = hd
    rope = {"rope_type": "linear", "rope_theta": theta, "factor": factor, "partial_rotary_factor": prf}
    assert_equals_transformers(transformers_rope, head_dim, rope)


@given(head_dims(min_rotary_dim=4), thetas, factors, context_lengths, seq_lens)
def test_dynamic_equals_transformers_bit_for_bit_for_any_seq_len(transformers_rope, hd, theta, factor, max_pos,
                                                                seq_len):
    head_dim, prf = hd
    rope = {"rope_type": "dynamic", "rope_theta": theta, "factor": factor, "partial_rotary_factor": prf}
    assert_equals_transformers(transformers_rope, head_dim, rope, max_position_embeddings=max_pos, seq_len=seq_len)


@st.composite
def yarn_extras(draw):
    """Optional YaRN keys, each present or absent."""
    extras = {}
    if draw(st.booleans()):
        extras["beta_fast"] = draw(st.one_of(st.sampled_from([32, 32.0, 64]), st.floats(8.0, 128.0)))
    if draw(st.booleans()):
        extras["beta_slow"] = draw(st.one_of(st.sampled_from([1, 1.0, 2]), st.floats(0.25, 4.0)))
    if draw(st.booleans()):
        extras["truncate"] = draw(st.booleans())
    if draw(st.booleans()):
        extras["mscale"] = draw(st.sampled_from([1.0, 0.707, 1.5, 0]))
        extras["mscale_all_dim"] = draw(st.sampled_from([1.0, 0.707, 0.5, 0]))
    if draw(st.integers(0, 4)) == 0:
        extras["attention_factor"] = draw(st.floats(0.5, 2.0))
    return extras


@given(head_dims(), thetas, factors, context_lengths, yarn_extras())
def test_yarn_equals_transformers_bit_for_bit(transformers_rope, hd, theta, factor, original, extras):
    head_dim, prf = hd
    rope = {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "original_max_position_embeddings": original,
            "partial_rotary_factor": prf, **extras}
    assume(rope.get("beta_fast", 32) >= rope.get("beta_slow", 1))
    assert_equals_transformers(transformers_rope, head_dim, rope, max_position_embeddings=int(original * factor))


@given(head_dims(), thetas, context_lengths, context_lengths)
def test_yarn_without_factor_uses_context_ratio_like_transformers(transformers_rope, hd, theta, original, max_pos):
    head_dim, prf = hd
    rope = {"rope_type": "yarn", "rope_theta": theta, "factor": None, "original_max_position_embeddings": original,
            "partial_rotary_factor": prf}
    assert_equals_transformers(transformers_rope, head_dim, rope, max_position_embeddings=max_pos)


@st.composite
def longrope_cases(draw):
    head_dim, prf = draw(head_dims())
    half = rotary_dim_of(head_dim, prf) // 2
    entries = st.one_of(st.floats(1.0, 80.0), st.integers(1, 80))
    rope = {
        "rope_type": "longrope",
        "rope_theta": draw(thetas),
        "short_factor": draw(st.lists(entries, min_size=half, max_size=half)),
        "long_factor": draw(st.lists(entries, min_size=half, max_size=half)),
        "original_max_position_embeddings": draw(context_lengths),
        "partial_rotary_factor": prf,
    }
    choice = draw(st.sampled_from(["factor", "ratio", "attention_factor"]))
    if choice == "factor":
        rope["factor"] = draw(factors)
    elif choice == "attention_factor":
        rope["attention_factor"] = draw(st.floats(0.5, 2.0))
    max_pos = draw(context_lengths)
    return head_dim, rope, max_pos


@given(longrope_cases(), seq_lens)
def test_longrope_equals_transformers_bit_for_bit_for_short_and_long_seq_len(transformers_rope, case, seq_len):
    head_dim, rope, max_pos = case
    assert_equals_transformers(transformers_rope, head_dim, rope, max_position_embeddings=max_pos, seq_len=seq_len)


@st.composite
def llama3_parameters(draw):
    low = draw(st.one_of(st.just(1.0), st.floats(0.25, 4.0)))
    high = draw(st.one_of(st.just(4.0), st.floats(0.1, 8.0).map(lambda gap: low + gap)))
    assume(high > low)
    return {"rope_type": "llama3", "factor": draw(factors), "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": draw(context_lengths)}


@given(head_dims(), thetas, llama3_parameters())
def test_llama3_equals_transformers_bit_for_bit(transformers_rope, hd, theta, params):
    head_dim, prf = hd
    rope = {**params, "rope_theta": theta, "partial_rotary_factor": prf}
    assert_equals_transformers(transformers_rope, head_dim, rope,
                               max_position_embeddings=params["original_max_position_embeddings"] * 16)


@given(st.integers(1, 256).map(lambda n: 2 * n), thetas, st.floats(0.01, 1.0), st.one_of(st.none(), factors))
def test_proportional_equals_transformers_bit_for_bit(transformers_rope, head_dim, theta, prf, factor):
    rope = {"rope_type": "proportional", "rope_theta": theta, "partial_rotary_factor": prf}
    if factor is not None:
        rope["factor"] = factor
    got, _ = assert_equals_transformers(transformers_rope, head_dim, rope)
    assert got.shape == (head_dim // 2,)


@given(st.sampled_from(["default", "linear", "dynamic", "yarn", "llama3"]), head_dims(min_rotary_dim=4), thetas,
       factors, st.sampled_from([2048, 4096, 8192]))
def test_legacy_rope_scaling_form_equals_transformers_bit_for_bit(transformers_rope, rope_type, hd, theta, factor,
                                                                  original):
    """The pre-v5 ``rope_scaling`` dict: ``type`` key, theta and partial factor from the config."""
    head_dim, prf = hd
    legacy = {"type": rope_type, "factor": factor}
    if rope_type in ("yarn", "llama3"):
        legacy["original_max_position_embeddings"] = original
    if rope_type == "llama3":
        legacy.update(low_freq_factor=1.0, high_freq_factor=4.0)
    assert_equals_transformers(transformers_rope, head_dim, legacy, theta=theta, partial_rotary_factor=prf,
                               max_position_embeddings=original * 4, seq_len=original * 8)


def _ramp(n, lo, hi):
    return [round(lo + (hi - lo) * i / max(n - 1, 1), 6) for i in range(n)]


# Published configs (head_dim, rope dict, max_position_embeddings); longrope lists are stand-ins.
REAL_CONFIGS = {
    "llama-2-7b": (128, {"rope_type": "default", "rope_theta": 10000.0}, 4096),
    "codellama": (128, {"rope_type": "default", "rope_theta": 1000000}, 16384),
    "pythia-1b (rotary_pct 0.25)": (256, {"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.25},
                                     2048),
    "phi-2 (partial 0.4)": (80, {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4}, 2048),
    "longchat-16k (linear 8)": (128, {"type": "linear", "factor": 8.0}, 16384),
    "dynamic 2x": (128, {"type": "dynamic", "factor": 2.0}, 4096),
    "llama-3.1-8b": (128, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 131072),
    "llama-3.2-1b": (64, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 131072),
    "qwen2.5 yarn 4x": (128, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                              "rope_theta": 1000000.0}, 32768),
    "deepseek-v3": (64, {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000}, 163840),
    "gpt-oss": (64, {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 4096, "rope_theta": 150000}, 131072),
    "phi-3-mini-128k": (96, {"type": "longrope", "short_factor": _ramp(48, 1.0, 1.3),
                             "long_factor": _ramp(48, 1.0, 60.0), "original_max_position_embeddings": 4096,
                             "rope_theta": 10000.0}, 131072),
}


@pytest.mark.parametrize("seq_len", [None, 1 << 20])
@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_published_model_configs_equal_transformers_bit_for_bit(transformers_rope, name, seq_len):
    head_dim, rope, max_pos = REAL_CONFIGS[name]
    assert_equals_transformers(transformers_rope, head_dim, rope, max_position_embeddings=max_pos, seq_len=seq_len)


def _in_process_transformers(head_dim, rope, max_pos, seq_len):
    import torch  # noqa: F401
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

    from transformers.utils import logging

    rope = copy.deepcopy(rope)
    key = "rope_parameters" if "rope_type" in rope else "rope_scaling"
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # Phi-3 style configs draw an advisory warning
    try:
        config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                             max_position_embeddings=max_pos, **{key: rope})
    finally:
        logging.set_verbosity(verbosity)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        freqs, attention_factor = GPTNeoXRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        freqs, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=seq_len)
    return freqs.numpy(), attention_factor


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_in_process_transformers_differs_by_at_most_a_few_ulps_whatever_the_simd_kernel(name):
    """torch's SIMD powf (SLEEF) and the C library's powf differ by <= 1 ulp; after the
    reciprocal and the scaling formulas that is at most a few ulps of the result."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    head_dim, rope, max_pos = REAL_CONFIGS[name]
    expected, expected_attention = _in_process_transformers(head_dim, rope, max_pos, None)
    got, got_attention = rope_frequencies(head_dim, rope, max_position_embeddings=max_pos)
    np.testing.assert_array_max_ulp(got, expected, maxulp=4)
    assert got_attention == expected_attention


# ------------------------------------------------------------------------------------------
# 2. The float64 formulas of the papers


def assert_close_to(got, expected, rtol=RTOL):
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=rtol, atol=0)


@given(head_dims(), thetas)
def test_default_is_theta_to_the_minus_2i_over_d(hd, theta):
    head_dim, prf = hd
    got, attention = rope_frequencies(head_dim, theta=theta, partial_rotary_factor=prf)
    assert_close_to(got, ref.default(rotary_dim_of(head_dim, prf), theta))
    assert attention == 1.0


@given(head_dims(), thetas, factors)
def test_linear_divides_every_frequency_by_factor(hd, theta, factor):
    head_dim, prf = hd
    got, attention = rope_frequencies(head_dim, {"type": "linear", "factor": factor}, theta=theta,
                                      partial_rotary_factor=prf)
    assert_close_to(got, ref.linear(rotary_dim_of(head_dim, prf), theta, factor))
    assert attention == 1.0


@given(head_dims(min_rotary_dim=4), thetas, factors)
def test_ntk_raises_theta_to_theta_times_factor_to_the_d_over_d_minus_2(hd, theta, factor):
    head_dim, prf = hd
    dim = rotary_dim_of(head_dim, prf)
    got, attention = rope_frequencies(head_dim, {"rope_type": "ntk", "factor": factor, "rope_theta": theta},
                                      partial_rotary_factor=prf)
    assert_close_to(got, ref.ntk(dim, theta, factor))
    assert attention == 1.0
    # The defining property of NTK-aware scaling: the highest frequency stays 1 and the
    # lowest is interpolated by exactly `factor`.
    assert got[0] == 1.0
    np.testing.assert_allclose(got[-1], ref.default(dim, theta)[-1] / factor, rtol=RTOL)


@given(head_dims(min_rotary_dim=4), thetas, factors)
def test_ntk_uses_the_same_scaled_base_as_dynamic_at_its_full_factor(hd, theta, factor):
    """dynamic's effective factor s * n / L - (s - 1) equals s when n = L * (2 s - 1) / s."""
    head_dim, prf = hd
    ntk, _ = rope_frequencies(head_dim, {"rope_type": "ntk", "factor": factor, "rope_theta": theta},
                              partial_rotary_factor=prf)
    dim = rotary_dim_of(head_dim, prf)
    np.testing.assert_allclose(ntk.astype(np.float64), ref.dynamic(dim, theta, factor, 1000, 1000 * (2 * factor - 1) / factor),
                               rtol=RTOL)


@given(head_dims(min_rotary_dim=4), thetas, factors, context_lengths, seq_lens)
def test_dynamic_follows_the_dynamic_ntk_formula(hd, theta, factor, max_pos, seq_len):
    head_dim, prf = hd
    got, attention = rope_frequencies(head_dim, {"rope_type": "dynamic", "factor": factor, "rope_theta": theta},
                                      partial_rotary_factor=prf, max_position_embeddings=max_pos, seq_len=seq_len)
    assert_close_to(got, ref.dynamic(rotary_dim_of(head_dim, prf), theta, factor, max_pos, seq_len))
    assert attention == 1.0


@given(head_dims(min_rotary_dim=4), thetas, factors, context_lengths, st.data())
def test_dynamic_is_the_unscaled_rope_up_to_max_position_embeddings(hd, theta, factor, max_pos, data):
    head_dim, prf = hd
    seq_len = data.draw(st.one_of(st.none(), st.integers(1, max_pos)))
    got, _ = rope_frequencies(head_dim, {"rope_type": "dynamic", "factor": factor}, theta=theta,
                              partial_rotary_factor=prf, max_position_embeddings=max_pos, seq_len=seq_len)
    unscaled, _ = rope_frequencies(head_dim, theta=theta, partial_rotary_factor=prf)
    np.testing.assert_array_equal(got, unscaled)


@given(head_dims(), thetas, factors, context_lengths, yarn_extras())
def test_yarn_follows_ntk_by_parts_and_its_attention_temperature(hd, theta, factor, original, extras):
    head_dim, prf = hd
    extras.pop("attention_factor", None)
    beta_fast, beta_slow = extras.get("beta_fast") or 32, extras.get("beta_slow") or 1
    assume(beta_fast >= beta_slow)
    rope = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "rope_theta": theta, **extras}
    got, attention = rope_frequencies(head_dim, rope, partial_rotary_factor=prf)
    dim = rotary_dim_of(head_dim, prf)
    expected = ref.yarn(dim, theta, factor, original, beta_fast, beta_slow, extras.get("truncate", True))
    # The mix's weights carry an absolute float32 error; relative to the result it is
    # amplified by up to (factor - 1).
    assert_close_to(got, expected, rtol=RTOL * factor)
    expected_attention = ref.yarn_attention_factor(factor, extras.get("mscale"), extras.get("mscale_all_dim"))
    assert attention == pytest.approx(expected_attention, rel=1e-12)


@given(head_dims(), thetas, factors, context_lengths)
def test_yarn_keeps_fast_pairs_and_interpolates_slow_pairs(hd, theta, factor, original):
    head_dim, prf = hd
    dim = rotary_dim_of(head_dim, prf)
    got, _ = rope_frequencies(head_dim, {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings":
                                         original, "rope_theta": theta}, partial_rotary_factor=prf)
    weight = ref.yarn_ramp(dim, theta, original)
    unscaled = ref.default(dim, theta)
    np.testing.assert_allclose(got[weight == 0], unscaled[weight == 0], rtol=RTOL)
    np.testing.assert_allclose(got[weight == 1], unscaled[weight == 1] / factor, rtol=RTOL)


@given(head_dims(), thetas, context_lengths, st.data())
def test_explicit_yarn_attention_factor_is_returned_unchanged(hd, theta, original, data):
    head_dim, prf = hd
    attention_factor = data.draw(st.floats(0.01, 10.0))
    _, got = rope_frequencies(head_dim, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings":
                                         original, "attention_factor": attention_factor, "mscale": 1.0,
                                         "mscale_all_dim": 0.5}, theta=theta, partial_rotary_factor=prf)
    assert got == attention_factor


@given(longrope_cases(), seq_lens)
def test_longrope_divides_by_long_factors_past_the_original_context_and_short_ones_before(case, seq_len):
    head_dim, rope, max_pos = case
    got, attention = rope_frequencies(head_dim, rope, max_position_embeddings=max_pos, seq_len=seq_len)
    original = rope["original_max_position_embeddings"]
    lists = rope["long_factor"] if seq_len is not None and seq_len > original else rope["short_factor"]
    dim = rotary_dim_of(head_dim, rope["partial_rotary_factor"])
    assert_close_to(got, ref.longrope(dim, rope["rope_theta"], lists))
    if "attention_factor" in rope:
        assert attention == rope["attention_factor"]
    else:
        factor = rope.get("factor", max_pos / original)
        assert attention == pytest.approx(ref.longrope_attention_factor(factor, original), rel=1e-12)


@given(head_dims(), thetas, llama3_parameters())
def test_llama3_blends_unscaled_and_interpolated_by_wavelength(hd, theta, params):
    head_dim, prf = hd
    got, attention = rope_frequencies(head_dim, {**params, "rope_theta": theta}, partial_rotary_factor=prf)
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    expected = ref.llama3(rotary_dim_of(head_dim, prf), theta, factor, low, high,
                          params["original_max_position_embeddings"])
    assert_close_to(got, expected, rtol=RTOL * ref.llama3_condition(factor, low, high))
    assert attention == 1.0


@given(head_dims(), thetas, llama3_parameters())
def test_llama3_keeps_short_wavelengths_and_divides_long_ones_bit_for_bit(hd, theta, params):
    head_dim, prf = hd
    got, _ = rope_frequencies(head_dim, {**params, "rope_theta": theta}, partial_rotary_factor=prf)
    unscaled, _ = rope_frequencies(head_dim, theta=theta, partial_rotary_factor=prf)
    linear, _ = rope_frequencies(head_dim, {"rope_type": "linear", "factor": params["factor"]}, theta=theta,
                                 partial_rotary_factor=prf)
    wavelength = 2 * math.pi / ref.default(rotary_dim_of(head_dim, prf), theta)
    original = params["original_max_position_embeddings"]
    short = wavelength < 0.999 * original / params["high_freq_factor"]
    long = wavelength > 1.001 * original / params["low_freq_factor"]
    np.testing.assert_array_equal(got[short], unscaled[short])
    np.testing.assert_array_equal(got[long], linear[long])


@given(st.integers(1, 256).map(lambda n: 2 * n), thetas, st.floats(0.01, 1.0), factors)
def test_proportional_rotates_the_leading_share_of_the_head_and_zeroes_the_rest(head_dim, theta, prf, factor):
    got, attention = rope_frequencies(head_dim, {"rope_type": "proportional", "factor": factor,
                                                 "partial_rotary_factor": prf}, theta=theta)
    assert_close_to(got, ref.proportional(head_dim, theta, prf, factor))
    assert attention == 1.0


# ------------------------------------------------------------------------------------------
# 3. Dict forms, aliases, overrides, output contract


@st.composite
def any_rope_case(draw):
    """(head_dim, v5 rope_parameters with rope_theta inside, keyword arguments) for every type."""
    rope_type = draw(st.sampled_from([t for t in ROPE_TYPES if t != "su"]))
    head_dim, prf = draw(head_dims(min_rotary_dim=4))
    original = draw(st.sampled_from([2048, 4096, 8192]))
    rope = {"rope_type": rope_type, "rope_theta": draw(thetas), "factor": draw(factors),
            "partial_rotary_factor": prf}
    if rope_type in ("yarn", "longrope", "llama3"):
        rope["original_max_position_embeddings"] = original
    if rope_type == "llama3":
        rope.update(low_freq_factor=1.0, high_freq_factor=4.0)
    if rope_type == "longrope":
        half = rotary_dim_of(head_dim, prf) // 2
        rope.update(short_factor=_ramp(half, 1.0, 2.0), long_factor=_ramp(half, 1.0, 40.0))
    kwargs = {"max_position_embeddings": original * 4, "seq_len": draw(st.sampled_from([None, original, original * 8]))}
    return head_dim, rope, kwargs


@given(any_rope_case())
def test_v5_rope_parameters_and_legacy_rope_scaling_forms_agree(case):
    head_dim, rope, kwargs = case
    legacy = {("type" if k == "rope_type" else k): v for k, v in rope.items()
              if k not in ("rope_theta", "partial_rotary_factor")}
    v5, v5_attention = rope_frequencies(head_dim, rope, **kwargs)
    old, old_attention = rope_frequencies(head_dim, legacy, theta=rope["rope_theta"],
                                          partial_rotary_factor=rope["partial_rotary_factor"], **kwargs)
    np.testing.assert_array_equal(v5, old)
    assert v5_attention == old_attention


@given(longrope_cases(), seq_lens)
def test_su_is_an_alias_of_longrope(case, seq_len):
    head_dim, rope, max_pos = case
    longrope = rope_frequencies(head_dim, rope, max_position_embeddings=max_pos, seq_len=seq_len)
    su = rope_frequencies(head_dim, {**rope, "rope_type": "su"}, max_position_embeddings=max_pos, seq_len=seq_len)
    np.testing.assert_array_equal(su[0], longrope[0])
    assert su[1] == longrope[1]


@given(any_rope_case(), thetas, st.sampled_from([0.25, 0.5, 1.0]))
def test_dict_keys_override_the_keyword_arguments(case, other_theta, other_prf):
    head_dim, rope, kwargs = case
    inside, _ = rope_frequencies(head_dim, rope, **kwargs)
    overridden, _ = rope_frequencies(head_dim, rope, theta=other_theta, partial_rotary_factor=other_prf, **kwargs)
    np.testing.assert_array_equal(inside, overridden)


def test_rope_type_wins_over_type_when_both_are_given():
    both, _ = rope_frequencies(64, {"rope_type": "linear", "type": "dynamic", "factor": 4.0})
    linear, _ = rope_frequencies(64, {"rope_type": "linear", "factor": 4.0})
    np.testing.assert_array_equal(both, linear)


@given(head_dims(), thetas)
def test_no_rope_parameters_means_default_rope(hd, theta):
    head_dim, prf = hd
    plain = rope_frequencies(head_dim, None, theta=theta, partial_rotary_factor=prf)
    empty = rope_frequencies(head_dim, {}, theta=theta, partial_rotary_factor=prf)
    explicit = rope_frequencies(head_dim, {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": prf})
    for other in (empty, explicit):
        np.testing.assert_array_equal(plain[0], other[0])
        assert plain[1] == other[1] == 1.0


@given(any_rope_case())
def test_returns_a_float32_vector_of_rotary_dim_half_and_a_python_float(case):
    head_dim, rope, kwargs = case
    inv_freq, attention = rope_frequencies(head_dim, rope, **kwargs)
    length = head_dim // 2 if rope["rope_type"] == "proportional" else rotary_dim_of(head_dim, rope["partial_rotary_factor"]) // 2
    assert isinstance(inv_freq, np.ndarray) and inv_freq.dtype == np.float32
    assert inv_freq.shape == (length,) and inv_freq.flags.c_contiguous
    assert type(attention) is float and attention > 0
    assert np.all(np.isfinite(inv_freq)) and np.all(inv_freq >= 0)


@given(any_rope_case())
def test_the_rope_dict_is_left_untouched(case):
    head_dim, rope, kwargs = case
    before = copy.deepcopy(rope)
    rope_frequencies(head_dim, rope, **kwargs)
    assert rope == before


def test_numpy_scalars_are_accepted_like_python_numbers():
    got = rope_frequencies(np.int64(128), {"rope_type": "linear", "factor": np.float32(4.0), "rope_theta": np.int64(10000)},
                           max_position_embeddings=np.int32(4096))
    expected = rope_frequencies(128, {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000})
    np.testing.assert_array_equal(got[0], expected[0])


def test_rope_types_lists_every_supported_type():
    assert set(ROPE_TYPES) == {"default", "linear", "dynamic", "ntk", "yarn", "longrope", "su", "llama3", "proportional"}
    assert isinstance(ROPE_TYPES, tuple)


def test_docstring_example_runs():
    failures, _ = doctest.testmod(rope_scaling, raise_on_error=False, verbose=False)
    assert failures == 0


# ------------------------------------------------------------------------------------------
# Argument checking: ValueError naming the argument or key, what was expected and what was given

_LR = {"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [2.0] * 32,
       "original_max_position_embeddings": 4096, "factor": 8.0}
_L3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
       "original_max_position_embeddings": 8192}
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


BAD_ARGUMENTS = [
    # (id, head_dim, rope_parameters, keyword arguments, regex the message must match)
    ("unknown type", 64, {"rope_type": "xpos"}, {}, r"\['rope_type'\] must be one of .*'ntk'.*; got 'xpos'"),
    ("unknown legacy type", 64, {"type": "mrope"}, {}, r"\['rope_type'\] must be one of .*; got 'mrope'"),
    ("type not a string", 64, {"rope_type": 3}, {}, r"\['rope_type'\] must be one of .*; got 3"),
    ("linear without factor", 64, {"rope_type": "linear"}, {}, r"\['factor'\] is required for rope_type 'linear'"),
    ("ntk without factor", 64, {"rope_type": "ntk"}, {}, r"\['factor'\] is required for rope_type 'ntk'"),
    ("dynamic without factor", 64, {"rope_type": "dynamic"}, {"max_position_embeddings": 4096},
     r"\['factor'\] is required for rope_type 'dynamic'"),
    ("llama3 without factor", 64, _without(_L3, "factor"), {}, r"\['factor'\] is required for rope_type 'llama3'"),
    ("llama3 without low_freq_factor", 64, _without(_L3, "low_freq_factor"), {},
     r"\['low_freq_factor'\] is required for rope_type 'llama3'"),
    ("llama3 without high_freq_factor", 64, _without(_L3, "high_freq_factor"), {},
     r"\['high_freq_factor'\] is required for rope_type 'llama3'"),
    ("factor below 1", 64, {"rope_type": "linear", "factor": 0.5}, {},
     r"\['factor'\] must be >= 1 for rope_type 'linear'; got 0.5"),
    ("factor below 1 (yarn)", 64, {**_YARN, "factor": 0.25}, {}, r"\['factor'\] must be >= 1 .*'yarn'; got 0.25"),
    ("factor a string", 64, {"rope_type": "linear", "factor": "2"}, {}, r"\['factor'\] must be a real number; got '2'"),
    ("factor a bool", 64, {"rope_type": "linear", "factor": True}, {}, r"\['factor'\] must be a real number; got True"),
    ("factor infinite", 64, {"rope_type": "linear", "factor": math.inf}, {}, r"\['factor'\] must be finite; got inf"),
    ("factor nan", 64, {"rope_type": "ntk", "factor": math.nan}, {}, r"\['factor'\] must be finite; got nan"),
    ("yarn without factor or max_position_embeddings", 64, _without(_YARN, "factor"), {},
     r"\['factor'\] is required for rope_type 'yarn' unless max_position_embeddings"),
    ("yarn without any original length", 64, _without(_YARN, "original_max_position_embeddings"), {},
     r"\['original_max_position_embeddings'\] is required for rope_type 'yarn' \(or pass max_position_embeddings"),
    ("llama3 without any original length", 64, _without(_L3, "original_max_position_embeddings"), {},
     r"\['original_max_position_embeddings'\] is required for rope_type 'llama3'"),
    ("longrope without any original length", 64, _without(_LR, "original_max_position_embeddings"), {},
     r"\['original_max_position_embeddings'\] is required for rope_type 'longrope'"),
    ("original length zero", 64, {**_YARN, "original_max_position_embeddings": 0}, {},
     r"\['original_max_position_embeddings'\] must be a positive int; got 0"),
    ("original length a float", 64, {**_YARN, "original_max_position_embeddings": 4096.0}, {},
     r"\['original_max_position_embeddings'\] must be a positive int; got 4096.0"),
    ("longrope without short_factor", 64, _without(_LR, "short_factor"), {},
     r"\['short_factor'\] is required for rope_type 'longrope'"),
    ("longrope without long_factor", 64, _without(_LR, "long_factor"), {},
     r"\['long_factor'\] is required for rope_type 'longrope'"),
    ("short_factor too short", 64, {**_LR, "short_factor": [1.0] * 31}, {},
     r"\['short_factor'\] must have rotary_dim / 2 = 32 entries; got 31"),
    ("factor lists too long for partial rotary", 64, {**_LR, "partial_rotary_factor": 0.5}, {},
     r"\['short_factor'\] must have rotary_dim / 2 = 16 entries; got 32"),
    ("short_factor not a list", 64, {**_LR, "short_factor": 1.0}, {},
     r"\['short_factor'\] must be a list of 32 numbers; got 1.0"),
    ("long_factor with a zero", 64, {**_LR, "long_factor": [0.0] + [2.0] * 31}, {},
     r"\['long_factor'\] entries must be > 0; got 0.0"),
    ("long_factor with a string", 64, {**_LR, "long_factor": ["2"] * 32}, {},
     r"\['long_factor'\] entries must be a real number; got '2'"),
    ("longrope without factor, attention_factor or max_position_embeddings", 64, _without(_LR, "factor"), {},
     r"\['factor'\] is required for rope_type 'longrope' unless attention_factor or max_position_embeddings"),
    ("longrope attention factor with original length 1", 64, {**_LR, "original_max_position_embeddings": 1}, {},
     r"\['original_max_position_embeddings'\] must be >= 2 .*; got 1"),
    ("dynamic without max_position_embeddings", 64, {"rope_type": "dynamic", "factor": 2.0}, {},
     r"max_position_embeddings is required for rope_type 'dynamic'.*; got None"),
    ("ntk with rotary_dim 2", 2, {"rope_type": "ntk", "factor": 2.0}, {},
     r"rope_type 'ntk' needs rotary_dim >= 4 .*; got rotary_dim = 2"),
    ("dynamic with rotary_dim 2", 8, {"rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 0.25},
     {"max_position_embeddings": 4096}, r"rope_type 'dynamic' needs rotary_dim >= 4 .*; got rotary_dim = 2"),
    ("dynamic base overflow", 64, {"rope_type": "dynamic", "factor": 1e300}, {"max_position_embeddings": 16,
                                                                              "seq_len": 1 << 20}, r"overflows"),
    ("ntk base overflow", 64, {"rope_type": "ntk", "factor": 1e200}, {}, r"ntk-scaled theta .* overflows"),
    ("odd head_dim", 65, None, {}, r"head_dim must be even; got 65"),
    ("zero head_dim", 0, None, {}, r"head_dim must be a positive int; got 0"),
    ("float head_dim", 64.0, None, {}, r"head_dim must be a positive int; got 64.0"),
    ("bool head_dim", True, None, {}, r"head_dim must be a positive int; got True"),
    ("rotary_dim below 2", 4, None, {"partial_rotary_factor": 0.25},
     r"rotary_dim = int\(head_dim \* partial_rotary_factor\) must be an even number >= 2; got int\(4 \* 0.25\) = 1"),
    ("odd rotary_dim", 6, None, {"partial_rotary_factor": 0.5}, r"must be an even number >= 2; got int\(6 \* 0.5\) = 3"),
    ("rotary_dim above 512", 1024, None, {}, r"rotary_dim / 2 must be <= 256; got rotary_dim = int\(1024 \* 1.0\) = 1024"),
    ("proportional head_dim above 512", 1024, {"rope_type": "proportional", "partial_rotary_factor": 0.25}, {},
     r"head_dim / 2 must be <= 256 for rope_type 'proportional'; got 1024"),
    ("partial_rotary_factor zero", 64, None, {"partial_rotary_factor": 0.0},
     r"^partial_rotary_factor must be in \(0, 1\]; got 0.0"),
    ("partial_rotary_factor above 1 in dict", 64, {"partial_rotary_factor": 1.5}, {},
     r"rope_parameters\['partial_rotary_factor'\] must be in \(0, 1\]; got 1.5"),
    ("theta 1", 64, None, {"theta": 1.0}, r"^theta must be a finite number > 1 .*; got 1.0"),
    ("theta negative in dict", 64, {"rope_theta": -5.0}, {}, r"rope_parameters\['rope_theta'\] must be a finite number > 1.*; got -5.0"),
    ("theta infinite", 64, None, {"theta": math.inf}, r"^theta must be finite; got inf"),
    ("theta beyond float32", 64, None, {"theta": 1e39}, r"^theta must be a finite number > 1 \(and representable in float32\); got 1e\+39"),
    ("theta a string", 64, {"rope_theta": "10000"}, {}, r"rope_parameters\['rope_theta'\] must be a real number; got '10000'"),
    ("beta_fast below beta_slow", 64, {**_YARN, "beta_fast": 1, "beta_slow": 32}, {},
     r"\['beta_fast'\] must be >= rope_parameters\['beta_slow'\]; got beta_fast=1, beta_slow=32"),
    ("negative beta_slow", 64, {**_YARN, "beta_slow": -1}, {}, r"\['beta_slow'\] must be > 0; got -1"),
    ("truncate None", 64, {**_YARN, "truncate": None}, {}, r"\['truncate'\] must be True or False; got None"),
    ("truncate a string", 64, {**_YARN, "truncate": "yes"}, {}, r"\['truncate'\] must be True or False; got 'yes'"),
    ("yarn attention_factor negative", 64, {**_YARN, "attention_factor": -1.0}, {},
     r"\['attention_factor'\] must be > 0; got -1.0"),
    ("longrope attention_factor zero", 64, {**_LR, "attention_factor": 0.0}, {},
     r"\['attention_factor'\] must be > 0; got 0.0"),
    ("yarn mscale giving a negative attention factor", 64, {**_YARN, "mscale": 1.0, "mscale_all_dim": -100.0}, {},
     r"\['mscale'\] / \['mscale_all_dim'\] must give a finite positive attention factor; got mscale=1.0, "
     r"mscale_all_dim=-100.0"),
    ("llama3 high_freq_factor not above low", 64, {**_L3, "high_freq_factor": 1.0}, {},
     r"\['high_freq_factor'\] must be greater than rope_parameters\['low_freq_factor'\]; got high_freq_factor=1.0, "
     r"low_freq_factor=1.0"),
    ("llama3 low_freq_factor zero", 64, {**_L3, "low_freq_factor": 0.0}, {}, r"\['low_freq_factor'\] must be > 0; got 0.0"),
    ("seq_len zero", 64, None, {"seq_len": 0}, r"^seq_len must be a positive int; got 0"),
    ("seq_len float", 64, None, {"seq_len": 2.5}, r"^seq_len must be a positive int; got 2.5"),
    ("max_position_embeddings negative", 64, None, {"max_position_embeddings": -1},
     r"^max_position_embeddings must be a positive int; got -1"),
    ("rope_parameters not a dict", 64, [("rope_type", "linear")], {}, r"^rope_parameters must be a dict .*; got list"),
    ("rope_parameters nested per layer", 64, {"full_attention": {"rope_type": "default"},
                                              "sliding_attention": {"rope_type": "linear", "factor": 2.0}}, {},
     r"nested per layer type .*'full_attention'.*pass the dict of one layer type"),
]


@pytest.mark.parametrize("head_dim, rope, kwargs, message", [case[1:] for case in BAD_ARGUMENTS],
                         ids=[case[0] for case in BAD_ARGUMENTS])
def test_bad_arguments_raise_value_error_naming_the_key_the_expectation_and_the_value(head_dim, rope, kwargs,
                                                                                     message):
    with pytest.raises(ValueError, match=message):
        rope_frequencies(head_dim, rope, **kwargs)


def test_error_messages_start_with_the_offending_name():
    for _, head_dim, rope, kwargs, _ in BAD_ARGUMENTS:
        with pytest.raises(ValueError) as info:
            rope_frequencies(head_dim, rope, **kwargs)
        assert re.match(r"(rope_parameters|head_dim|rotary_dim|partial_rotary_factor|theta|seq_len|"
                        r"max_position_embeddings|rope_type|the )", str(info.value)), str(info.value)
