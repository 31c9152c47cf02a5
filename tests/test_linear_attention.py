"""Specification tests for ``longattn.linear_attention`` and ``linear_attention_step``.

linear_attention(q, k, v, *, causal=True, scale=None, feature_map=None, normalize=False,
                 log_decay=None, initial_state=None, return_state=False, cu_seqlens=None,
                 chunk_size=64)

Semantics (tests/reference/linear_attention.py, a float64 token-by-token recurrence):
q~ = scale * phi(q), k~ = phi(k); causal S_t = exp(g_t) S_{t-1} + k~_t v_t^T, o_t = S_t^T q~_t;
non-causal o_t = S_T^T q~_t; normalize divides by q~_t . z_t + 1e-10.

Tolerances scale with the magnitude of the sums behind each output (the reference run on
absolute values, `absolute=True`): float64 1e-10, float32 1e-4 of it; float16 / bfloat16
add one rounding of the output (the reference reads the same rounded inputs).
"""
from __future__ import annotations

import dataclasses
import re
import time

import numpy as np
import pytest
import torch
from torch import library as op_lib  # noqa: E402
from hypothesis import given
from hypothesis import strategies as st

import longattn
from reference.linear_attention import linear_attention_reference, retnet_log_decay
from reference.rope import NP_BFLOAT16, numpy_to_torch, to_float64

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16}
CPU_DTYPES = list(TORCH_DTYPES)
RTOL = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-4, "bfloat16": 1e-4}
OUT_EPS = {"float64": 0.0, "float32": 0.0, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


# ----------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    q: np.ndarray  # float64 values, exactly representable in `dtype`
    k: np.ndarray
    v: np.ndarray
    dtype: str
    causal: bool = True
    feature_map: str | None = None
    normalize: bool = False
    log_decay: np.ndarray | None = None
    initial_state: object = None  # S or (S, z), float64 values
    chunk_size: int = 64
    scale: float | None = None

    def kwargs(self):
        return dict(causal=self.causal, feature_map=self.feature_map, normalize=self.normalize,
                    scale=self.scale, chunk_size=self.chunk_size)


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    return to_float64(torch.from_numpy(x).to(TORCH_DTYPES[dtype]))


def make_case(rng, B, T, H, K, V, dtype="float64", causal=True, feature_map=None, normalize=False, decay=None,
              decay_strength=1.0, state=False, chunk_size=64, scale=None) -> Case:
    q = _round_to(rng.standard_normal((B, T, H, K)), dtype)
    k = _round_to(rng.standard_normal((B, T, H, K)), dtype)
    v = _round_to(rng.standard_normal((B, T, H, V)), dtype)
    g = None
    if decay == "head":
        g = retnet_log_decay(H).astype(np.float64) * decay_strength
    elif decay == "token":
        g = -rng.uniform(0.0, decay_strength, (B, T, H))
    g = None if g is None else g.astype(np.float64 if dtype == "float64" else np.float32)
    S0 = None
    if state:
        S0 = rng.standard_normal((B, H, K, V))
        if normalize:
            S0 = (S0, np.abs(rng.standard_normal((B, H, K))))
        cd = np.float64 if dtype == "float64" else np.float32
        S0 = tuple(x.astype(cd) for x in S0) if normalize else S0.astype(cd)
    return Case(q, k, v, dtype, causal, feature_map, normalize, g, S0, chunk_size, scale)


def torch_inputs(case: Case, requires_grad=False):
    dt = TORCH_DTYPES[case.dtype]
    q, k, v = (torch.from_numpy(x).to(dt).requires_grad_(requires_grad) for x in (case.q, case.k, case.v))
    g = None if case.log_decay is None else torch.from_numpy(case.log_decay)
    s = case.initial_state
    if s is not None:
        s = tuple(torch.from_numpy(x) for x in s) if isinstance(s, tuple) else torch.from_numpy(s)
    return q, k, v, g, s


def reference(case: Case, absolute=False, cu_seqlens=None):
    return linear_attention_reference(case.q, case.k, case.v, causal=case.causal, scale=case.scale,
                                      feature_map=case.feature_map, normalize=case.normalize,
                                      log_decay=case.log_decay, initial_state=case.initial_state,
                                      cu_seqlens=cu_seqlens, absolute=absolute)


def assert_close_scaled(got, want, magnitude, dtype, what):
    got = to_float64(got)
    mag = float(np.max(magnitude)) if np.size(magnitude) else 0.0
    ref_max = float(np.max(np.abs(want))) if np.size(want) else 0.0
    tol = RTOL[dtype] * mag + OUT_EPS[dtype] * ref_max + 1e-300
    err = float(np.max(np.abs(got - want))) if np.size(want) else 0.0
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g} ({dtype}, magnitude {mag:.3g})"


def check_against_reference(case: Case, out, state=None, cu_seqlens=None):
    o_ref, S_ref, z_ref = reference(case, cu_seqlens=cu_seqlens)
    o_mag, S_mag, z_mag = reference(case, absolute=True, cu_seqlens=cu_seqlens)
    assert_close_scaled(out, o_ref, o_mag, case.dtype, "out")
    if state is not None:
        S, z = state if case.normalize else (state, None)
        sdt = "float64" if case.dtype == "float64" else "float32"
        assert_close_scaled(S, S_ref, S_mag, sdt, "state S")
        if case.normalize:
            assert_close_scaled(z, z_ref, z_mag, sdt, "state z")


@st.composite
def cases(draw, dtypes=tuple(CPU_DTYPES), max_t=80, causal=None):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    B = draw(st.integers(1, 2))
    T = draw(st.sampled_from([1, 2, 5, 17, 63, 64, 65, max_t]))
    H = draw(st.integers(1, 3))
    K = draw(st.sampled_from([1, 3, 8, 16, 33]))
    V = draw(st.sampled_from([1, 4, 16, 17]))
    c = draw(st.booleans()) if causal is None else causal
    fmap = draw(st.sampled_from([None, "elu1", "relu"]))
    normalize = draw(st.booleans())
    if normalize and fmap is None:
        fmap = "elu1"  # a normalizer needs positive features
    decay = draw(st.sampled_from([None, "head", "token"])) if c else None
    strength = draw(st.sampled_from([0.1, 1.0, 5.0]))
    state = draw(st.booleans())
    chunk = draw(st.sampled_from([1, 3, 8, 16, 64]))
    dtype = draw(st.sampled_from(dtypes))
    scale = draw(st.sampled_from([None, 0.5]))
    return make_case(rng, B, T, H, K, V, dtype, c, fmap, normalize, decay, strength, state, chunk, scale)


# ----------------------------------------------------------------------------
# the reference itself
# ----------------------------------------------------------------------------
def test_reference_causal_without_decay_equals_masked_quadratic_attention():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 9, 2, 4)), rng.standard_normal((1, 9, 2, 4)), rng.standard_normal((1, 9, 2, 3))
    out, _, _ = linear_attention_reference(q, k, v)
    A = np.einsum("bihk,bjhk->bhij", q * 0.5, k) * np.tril(np.ones((9, 9)))
    np.testing.assert_allclose(out, np.einsum("bhij,bjhv->bihv", A, v), rtol=1e-12, atol=1e-12)


def test_reference_decay_weights_each_key_by_the_product_of_later_gates():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((1, 6, 1, 2)), rng.standard_normal((1, 6, 1, 2)), rng.standard_normal((1, 6, 1, 2))
    g = -rng.uniform(0, 2, (1, 6, 1))
    out, _, _ = linear_attention_reference(q, k, v, log_decay=g, scale=1.0)
    b = np.cumsum(g[0, :, 0])
    want = np.zeros((6, 2))
    for i in range(6):
        for j in range(i + 1):
            want[i] += np.exp(b[i] - b[j]) * (q[0, i, 0] @ k[0, j, 0]) * v[0, j, 0]
    np.testing.assert_allclose(out[0, :, 0], want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------
# forward against the reference
# ----------------------------------------------------------------------------
ALL_COMBOS = [(c, f, n, d, s) for c in (True, False) for f in (None, "elu1", "relu") for n in (False, True)
              for d in ((None, "head", "token") if c else (None,)) for s in (False, True)]


@pytest.mark.parametrize("causal, feature_map, normalize, decay, state", ALL_COMBOS)
def test_every_option_combination_matches_the_float64_recurrence(causal, feature_map, normalize, decay, state):
    if normalize and feature_map is None:
        feature_map = "elu1"
    case = make_case(np.random.default_rng(7), 2, 37, 3, 5, 7, "float64", causal, feature_map, normalize, decay,
                     2.0, state, chunk_size=8)
    q, k, v, g, s = torch_inputs(case)
    out, st_ = longattn.linear_attention(q, k, v, log_decay=g, initial_state=s, return_state=True, **case.kwargs())
    check_against_reference(case, out, st_)


@pytest.mark.parametrize("causal, feature_map, normalize, decay, state", ALL_COMBOS)
def test_short_sequences_taking_the_token_recurrence_path_match_the_reference(causal, feature_map, normalize, decay,
                                                                               state):
    # Causal sequences of at most 8 tokens (decoding) run the token recurrence, not chunks.
    if normalize and feature_map is None:
        feature_map = "elu1"
    case = make_case(np.random.default_rng(9), 2, 6, 3, 5, 7, "float32", causal, feature_map, normalize, decay,
                     5.0, state)
    q, k, v, g, s = torch_inputs(case)
    out, st_ = longattn.linear_attention(q, k, v, log_decay=g, initial_state=s, return_state=True, **case.kwargs())
    check_against_reference(case, out, st_)


@given(case=cases())
def test_output_and_final_state_match_reference_for_all_dtypes_shapes_and_chunk_sizes(case):
    q, k, v, g, s = torch_inputs(case)
    out, st_ = longattn.linear_attention(q, k, v, log_decay=g, initial_state=s, return_state=True, **case.kwargs())
    assert out.dtype == q.dtype and tuple(out.shape) == case.v.shape
    check_against_reference(case, out, st_)


@given(case=cases(dtypes=("float64",)), chunk=st.sampled_from([1, 2, 7, 64, 1024]))
def test_result_does_not_depend_on_chunk_size(case, chunk):
    q, k, v, g, s = torch_inputs(case)
    a = longattn.linear_attention(q, k, v, log_decay=g, initial_state=s, **case.kwargs())
    kw = case.kwargs()
    kw["chunk_size"] = chunk
    b = longattn.linear_attention(q, k, v, log_decay=g, initial_state=s, **kw)
    mag = reference(case, absolute=True)[0]
    assert_close_scaled(b, to_float64(a), mag, "float64", "out")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_strong_gates_over_long_sequences_stay_finite_and_exact(dtype):
    # exp(cumulative log-decay) underflows after ~20 tokens of -5 gates; the kernels only
    # exponentiate within-chunk differences, so nothing overflows or turns NaN.
    case = make_case(np.random.default_rng(3), 1, 3000, 2, 8, 8, dtype, decay="token", decay_strength=5.0,
                     normalize=True, feature_map="elu1", state=True)
    case.log_decay[:, ::7] = -5.0
    q, k, v, g, s = torch_inputs(case, requires_grad=True)
    g = g.clone().requires_grad_()
    out, _ = longattn.linear_attention(q, k, v, log_decay=g, initial_state=s, return_state=True, **case.kwargs())
    check_against_reference(case, out.detach())
    out.sum().backward()
    for t in (q.grad, k.grad, v.grad, g.grad):
        assert torch.isfinite(t).all()


def test_retnet_per_head_decay_over_a_long_sequence_matches_reference():
    case = make_case(np.random.default_rng(4), 1, 2000, 4, 8, 8, "float32", decay="head")
    q, k, v, g, _ = torch_inputs(case)
    out = longattn.linear_attention(q, k, v, log_decay=g, **case.kwargs())
    check_against_reference(case, out)


def test_default_scale_is_head_dim_to_the_minus_half_applied_to_q():
    case = make_case(np.random.default_rng(5), 1, 10, 2, 9, 3, "float64")
    q, k, v, _, _ = torch_inputs(case)
    a = longattn.linear_attention(q, k, v)
    b = longattn.linear_attention(q / 3.0, k, v, scale=1.0)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------
# states: split / resume and the recurrent step
# ----------------------------------------------------------------------------
@given(case=cases(dtypes=("float64", "float32"), causal=True), split=st.floats(0.0, 1.0))
def test_running_two_halves_with_the_state_passed_equals_one_call(case, split):
    q, k, v, g, s = torch_inputs(case)
    T = q.shape[1]
    t1 = int(round(split * T))
    kw = case.kwargs()
    full, S_full = longattn.linear_attention(q, k, v, log_decay=g, initial_state=s, return_state=True, **kw)
    gsl = (lambda a, b: g if g is None or g.dim() == 1 else g[:, a:b])
    o1, s1 = longattn.linear_attention(q[:, :t1], k[:, :t1], v[:, :t1], log_decay=gsl(0, t1), initial_state=s,
                                       return_state=True, **kw)
    o2, s2 = longattn.linear_attention(q[:, t1:], k[:, t1:], v[:, t1:], log_decay=gsl(t1, T), initial_state=s1,
                                       return_state=True, **kw)
    mag = reference(case, absolute=True)
    assert_close_scaled(torch.cat([o1, o2], 1), to_float64(full), mag[0], case.dtype, "split output")
    S2, S_full = (s2[0], S_full[0]) if case.normalize else (s2, S_full)
    sdt = "float64" if case.dtype == "float64" else "float32"
    assert_close_scaled(S2, to_float64(S_full), mag[1], sdt, "split state")


@given(case=cases(dtypes=("float64", "float32"), causal=True, max_t=40), inplace=st.booleans())
def test_step_token_by_token_equals_the_chunked_result(case, inplace):
    q, k, v, g, s = torch_inputs(case)
    kw = case.kwargs()
    full = longattn.linear_attention(q, k, v, log_decay=g, initial_state=s, **kw)
    B, T, H, K = q.shape
    V = v.shape[-1]
    cd = torch.float64 if case.dtype == "float64" else torch.float32
    if s is None:
        s = torch.zeros(B, H, K, V, dtype=cd)
        if case.normalize:
            s = (s, torch.zeros(B, H, K, dtype=cd))
    else:
        s = tuple(x.clone() for x in s) if case.normalize else s.clone()
    outs = []
    for t in range(T):
        gt = g if g is None or g.dim() == 1 else g[:, t:t + 1]
        o, new = longattn.linear_attention_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], s, log_decay=gt,
                                                scale=case.scale, feature_map=case.feature_map,
                                                normalize=case.normalize, inplace=inplace)
        if inplace:
            assert (new[0] is s[0]) if case.normalize else (new is s)
        s = new
        outs.append(o)
    mag = reference(case, absolute=True)[0]
    assert_close_scaled(torch.cat(outs, 1), to_float64(full), mag, case.dtype, "stepped output")


def test_inplace_step_on_numpy_updates_the_state_buffer():
    case = make_case(np.random.default_rng(8), 1, 3, 2, 4, 5, "float32", decay="head", state=True)
    q, k, v = (x.astype(np.float32) for x in (case.q, case.k, case.v))
    S = case.initial_state.copy()
    want, S_want = longattn.linear_attention(q, k, v, log_decay=case.log_decay, initial_state=S, return_state=True)
    out, S_new = longattn.linear_attention_step(q, k, v, S, log_decay=case.log_decay, inplace=True)
    assert S_new is S and isinstance(out, np.ndarray)
    np.testing.assert_allclose(S, S_want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_step_memory_does_not_grow_with_the_number_of_decoded_tokens():
    # Each step reads and writes only the (H, K, V) state: the per-token cost is flat.
    S = torch.zeros(1, 4, 32, 32)
    q = torch.randn(1, 1, 4, 32)
    times = []
    for n in (50, 400):
        t0 = time.perf_counter()
        for _ in range(n):
            longattn.linear_attention_step(q, q, q, S, inplace=True)
        times.append((time.perf_counter() - t0) / n)
    assert times[1] < 3 * times[0] + 1e-4


# ----------------------------------------------------------------------------
# variable length
# ----------------------------------------------------------------------------
@st.composite
def varlen_cases(draw):
    lens = draw(st.lists(st.sampled_from([0, 1, 5, 17, 40]), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**31 - 1))
    normalize = draw(st.booleans())
    decay = draw(st.sampled_from([None, "head", "token"]))
    causal = draw(st.booleans()) if decay is None else True
    state = draw(st.booleans())
    chunk = draw(st.sampled_from([1, 4, 16]))
    dtype = draw(st.sampled_from(["float64", "float32"]))
    return lens, seed, normalize, decay, causal, state, chunk, dtype


@given(spec=varlen_cases())
def test_packed_varlen_equals_per_sequence_calls_with_per_sequence_states(spec):
    lens, seed, normalize, decay, causal, state, chunk, dtype = spec
    rng = np.random.default_rng(seed)
    total, N, H, K, V = sum(lens), len(lens), 2, 4, 3
    case = make_case(rng, 1, total, H, K, V, dtype, causal, "elu1" if normalize else None, normalize, decay, 3.0,
                     False, chunk)
    if state:
        S0 = rng.standard_normal((N, H, K, V)).astype(np.float64 if dtype == "float64" else np.float32)
        case.initial_state = (S0, np.abs(S0[..., 0])) if normalize else S0
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q, k, v, g, s = torch_inputs(case)
    out, st_ = longattn.linear_attention(q, k, v, log_decay=g, initial_state=s, return_state=True,
                                         cu_seqlens=torch.from_numpy(cu), **case.kwargs())
    check_against_reference(case, out, st_, cu_seqlens=cu)
    S = st_[0] if normalize else st_
    assert tuple(S.shape) == (N, H, K, V)


@pytest.mark.parametrize("cu, msg", [([1, 3, 5], r"cu_seqlens\[0\]"), ([0, 4, 2, 5], "non-decreasing"),
                                     ([0, 2, 4], r"cu_seqlens\[-1\]")])
def test_invalid_cu_seqlens_raise_value_error_naming_cu_seqlens(cu, msg):
    q = torch.randn(1, 5, 2, 4)
    with pytest.raises(ValueError, match=msg):
        longattn.linear_attention(q, q, q, cu_seqlens=torch.tensor(cu, dtype=torch.int32))


# ----------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------
GRAD_COMBOS = [(c, f, n, d, s) for c in (True, False) for f, n in ((None, False), ("elu1", False), ("relu", True),
                                                                      ("elu1", True))
               for d in ((None, "head", "token") if c else (None,)) for s in (False, True)]


def _away_from_kink(x):
    return x + 0.3 * np.sign(x)


@pytest.mark.parametrize("causal, feature_map, normalize, decay, state", GRAD_COMBOS)
def test_gradcheck_float64(causal, feature_map, normalize, decay, state):
    case = make_case(np.random.default_rng(11), 2, 9, 2, 3, 4, "float64", causal, feature_map, normalize, decay, 2.0,
                     state, chunk_size=4)
    if feature_map == "relu":
        case.q, case.k = _away_from_kink(case.q), _away_from_kink(case.k)
    q, k, v, g, s = torch_inputs(case, requires_grad=True)
    ins = [q, k, v]
    if g is not None:
        ins.append(g.requires_grad_())
    if s is not None:
        ins.extend(x.requires_grad_() for x in (s if normalize else (s,)))

    def f(q, k, v, *rest):
        rest = list(rest)
        gg = rest.pop(0) if g is not None else None
        ss = None
        if s is not None:
            ss = (rest[0], rest[1]) if normalize else rest[0]
        out, fs = longattn.linear_attention(q, k, v, log_decay=gg, initial_state=ss, return_state=True,
                                            **case.kwargs())
        return (out, *fs) if normalize else (out, fs)

    assert torch.autograd.gradcheck(f, ins, atol=1e-7, rtol=1e-6)


def test_gradcheck_float64_packed_varlen_with_states_and_gates():
    rng = np.random.default_rng(12)
    case = make_case(rng, 1, 12, 2, 3, 2, "float64", decay="token", normalize=True, feature_map="elu1", chunk_size=4)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    q, k, v, g, _ = torch_inputs(case, requires_grad=True)
    g = g.requires_grad_()
    S0 = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    z0 = (torch.rand(3, 2, 3, dtype=torch.float64) + 0.5).requires_grad_()

    def f(q, k, v, g, S0, z0):
        out, (S, z) = longattn.linear_attention(q, k, v, log_decay=g, initial_state=(S0, z0), return_state=True,
                                                cu_seqlens=cu, normalize=True, feature_map="elu1", chunk_size=4)
        return out, S, z

    assert torch.autograd.gradcheck(f, (q, k, v, g, S0, z0), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_low_precision_gradients_match_float64_gradients(dtype):
    case = make_case(np.random.default_rng(13), 1, 70, 2, 16, 16, dtype, decay="token", normalize=True,
                     feature_map="elu1", state=True, chunk_size=16)
    grads = {}
    for dt in (dtype, "float64"):
        q, k, v, g, s = torch_inputs(dataclasses.replace(case, dtype=dt), requires_grad=True)
        g = g.double().requires_grad_() if dt == "float64" else g.clone().requires_grad_()
        s = tuple(x.double() if dt == "float64" else x for x in s)
        out, (S, z) = longattn.linear_attention(q, k, v, log_decay=g, initial_state=s, return_state=True,
                                                **case.kwargs())
        w = torch.from_numpy(np.random.default_rng(0).standard_normal(out.shape))
        ((out.double() * w).sum() + S.double().sum()).backward()
        grads[dt] = [to_float64(t.grad) for t in (q, k, v, g)]
    tol = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}[dtype]
    for name, a, b in zip("qkvg", grads[dtype], grads["float64"]):
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
        assert err < tol, f"d{name}: relative error {err:.3g}"


def test_per_head_decay_gradient_is_the_per_token_gradient_summed_over_batch_and_time():
    case = make_case(np.random.default_rng(14), 2, 20, 3, 4, 4, "float64", decay="head", chunk_size=8)
    q, k, v, g, _ = torch_inputs(case)
    gh = g.clone().requires_grad_()
    longattn.linear_attention(q, k, v, log_decay=gh).square().sum().backward()
    gt = g.expand(2, 20, 3).clone().requires_grad_()
    longattn.linear_attention(q, k, v, log_decay=gt).square().sum().backward()
    torch.testing.assert_close(gh.grad, gt.grad.sum((0, 1)), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------
# frameworks, layouts, torch integration
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_numpy_in_numpy_out_equals_torch(dtype):
    case = make_case(np.random.default_rng(15), 1, 20, 2, 4, 4, dtype, decay="token", state=True)
    q, k, v, g, s = torch_inputs(case)
    want, S_want = longattn.linear_attention(q, k, v, log_decay=g, initial_state=s, return_state=True)
    npdt = NP_BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    qn, kn, vn = (x.astype(npdt) for x in (case.q, case.k, case.v))
    out, S = longattn.linear_attention(qn, kn, vn, log_decay=case.log_decay, initial_state=case.initial_state,
                                       return_state=True)
    assert isinstance(out, np.ndarray) and out.dtype == npdt and isinstance(S, np.ndarray)
    np.testing.assert_array_equal(to_float64(out), to_float64(want))
    np.testing.assert_array_equal(S, S_want.numpy())


def test_jax_cpu_arrays_in_jax_arrays_out_equal_numpy():
    jnp = pytest.importorskip("jax.numpy")
    case = make_case(np.random.default_rng(17), 1, 20, 2, 4, 4, "float32", decay="token", state=True)
    args = [x.astype(np.float32) for x in (case.q, case.k, case.v)]
    want, S_want = longattn.linear_attention(*args, log_decay=case.log_decay, initial_state=case.initial_state,
                                             return_state=True)
    out, S = longattn.linear_attention(*(jnp.asarray(x) for x in args), log_decay=jnp.asarray(case.log_decay),
                                       initial_state=jnp.asarray(case.initial_state), return_state=True)
    assert "jax" in type(out).__module__ and "jax" in type(S).__module__
    np.testing.assert_array_equal(np.asarray(out), want)
    np.testing.assert_array_equal(np.asarray(S), S_want)
    with pytest.raises(ValueError, match="state"):
        longattn.linear_attention_step(*(jnp.asarray(x) for x in args), jnp.asarray(case.initial_state), inplace=True)


def test_strided_slices_of_a_packed_qkv_give_the_contiguous_result():
    qkv = torch.randn(2, 30, 3, 4, 8)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    g = -torch.rand(2, 30, 4)
    a = longattn.linear_attention(q, k, v, log_decay=g[:, :, :], chunk_size=8)
    b = longattn.linear_attention(q.contiguous(), k.contiguous(), v.contiguous(), log_decay=g, chunk_size=8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ops_are_registered_and_pass_opcheck():
    from longattn import torch_ops

    f, b, step = torch_ops.LINEAR_ATTENTION_OPS
    gen = torch.Generator().manual_seed(16)
    q, k = torch.randn(2, 9, 2, 4, generator=gen), torch.randn(2, 9, 2, 4, generator=gen)
    v = torch.randn(2, 9, 2, 3, generator=gen)
    g = -torch.rand(2, 9, 2, generator=gen)
    S0, z0 = torch.randn(2, 2, 4, 3, generator=gen), torch.rand(2, 2, 4, generator=gen)
    for args in [(q, k, v, g, S0, z0, None, 0.5, 1, True, True, 4), (q, k, v, None, None, None, None, 0.5, 0, False,
                                                                        False, 64)]:
        qq, kk, vv = (x.clone().requires_grad_() for x in args[:3])
        op_lib.opcheck(f, (qq, kk, vv) + args[3:])
        op_lib.opcheck(b, (torch.randn_like(v), torch.randn_like(S0), None) + args)
    op_lib.opcheck(step, (q[:, :1], k[:, :1], v[:, :1], g[:, :1], S0.clone(), z0.clone(), None, 0.5, 1, True))


def _compile_model(q, k, v, g, S0):
    out, S = longattn.linear_attention(q, k, v, log_decay=g, initial_state=S0, return_state=True, feature_map="elu1",
                                       chunk_size=8)
    return (out * out).sum() + S.sum()


def test_torch_compile_fullgraph_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    compiled = torch.compile(_compile_model, backend="aot_eager", fullgraph=True)
    for T in (11, 20):
        gen = torch.Generator().manual_seed(T)
        base = [torch.randn(2, T, 2, 8, generator=gen), torch.randn(2, T, 2, 8, generator=gen),
                torch.randn(2, T, 2, 4, generator=gen), -torch.rand(2, T, 2, generator=gen),
                torch.randn(2, 2, 8, 4, generator=gen)]
        res = []
        for fn in (_compile_model, compiled):
            ins = [x.clone().requires_grad_() for x in base]
            loss = fn(*ins)
            loss.backward()
            res.append([loss.detach()] + [x.grad for x in ins])
        for a, b in zip(*res):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_inplace_step_under_autograd_backpropagates_and_updates_the_state():
    S = torch.zeros(1, 2, 4, 4)
    q = torch.randn(1, 1, 2, 4, requires_grad=True)
    out, S_new = longattn.linear_attention_step(q, q, q, S, inplace=True)
    assert S_new is S and S.abs().sum() > 0
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------
def _bad_calls():
    q = torch.randn(2, 5, 3, 4)
    v = torch.randn(2, 5, 3, 6)
    S = torch.zeros(2, 3, 4, 6)
    la = longattn.linear_attention
    return {
        "log_decay_noncausal": (ValueError, "log_decay", lambda: la(q, q, v, causal=False, log_decay=-torch.ones(3))),
        "log_decay_positive": (ValueError, "log_decay", lambda: la(q, q, v, log_decay=torch.full((3,), 0.1))),
        "log_decay_shape": (ValueError, "log_decay", lambda: la(q, q, v, log_decay=-torch.ones(4))),
        "log_decay_nan": (ValueError, "log_decay", lambda: la(q, q, v, log_decay=torch.full((3,), float("nan")))),
        "k_shape": (ValueError, r"\bk\b", lambda: la(q, q[:, :4], v)),
        "v_shape": (ValueError, r"\bv\b", lambda: la(q, q, v[:, :, :2])),
        "v_dtype": (TypeError, r"\bv\b", lambda: la(q, q, v.double())),
        "q_ndim": (ValueError, r"\bq\b", lambda: la(q[0], q[0], v[0])),
        "q_int": (TypeError, r"\bq\b", lambda: la(q.int(), q.int(), v.int())),
        "state_shape": (ValueError, "initial_state", lambda: la(q, q, v, initial_state=S[:, :2])),
        "state_pair_without_normalize": (ValueError, "initial_state", lambda: la(q, q, v, initial_state=(S, S[..., 0]))),
        "state_single_with_normalize": (ValueError, "initial_state",
                                        lambda: la(q, q, v, normalize=True, feature_map="elu1", initial_state=S)),
        "feature_map": (ValueError, "feature_map", lambda: la(q, q, v, feature_map="softmax")),
        "chunk_size": (ValueError, "chunk_size", lambda: la(q, q, v, chunk_size=0)),
        "chunk_size_type": (TypeError, "chunk_size", lambda: la(q, q, v, chunk_size=8.0)),
        "scale": (ValueError, "scale", lambda: la(q, q, v, scale=float("inf"))),
        "causal_type": (TypeError, "causal", lambda: la(q, q, v, causal=1)),
        "cu_seqlens_dtype": (TypeError, "cu_seqlens", lambda: la(q[:1], q[:1], v[:1], cu_seqlens=torch.tensor([0, 5]))),
        "cu_seqlens_batch": (ValueError, "cu_seqlens",
                             lambda: la(q, q, v, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))),
        "mixed_frameworks": (TypeError, r"\bk\b", lambda: la(q, q.numpy(), v)),
        "step_inplace_dtype": (ValueError, "state",
                               lambda: longattn.linear_attention_step(q, q, v, S.double(), inplace=True)),
        "step_inplace_strided": (ValueError, "state", lambda: longattn.linear_attention_step(
            q.numpy(), q.numpy(), v.numpy(), S.numpy().transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2),
            inplace=True)),
        "step_inplace_none": (ValueError, "state", lambda: longattn.linear_attention_step(q, q, v, None, inplace=True)),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_invalid_arguments_raise_an_error_naming_the_argument(name):
    exc, pattern, call = _bad_calls()[name]
    with pytest.raises(exc) as info:
        call()
    assert re.search(pattern, str(info.value)), str(info.value)


def test_a_rejected_inplace_step_writes_nothing():
    S = torch.randn(1, 2, 4, 4)
    before = S.clone()
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError):
        longattn.linear_attention_step(q, q, q, S, log_decay=torch.ones(2), inplace=True)
    torch.testing.assert_close(S, before, rtol=0, atol=0)
