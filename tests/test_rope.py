"""Specification tests for the fused RoPE op ``longattn.apply_rope``.

apply_rope(q, k=None, positions=None, *, inv_freq, attention_factor=1.0,
           interleaved=False, inplace=False)

q (B, S, Hq, D), k (B, S, Hk, D). The first rotary_dim = 2*len(inv_freq)
channels of every head are rotated (NeoX pairs (i, i + rotary_dim/2) by
default, GPT-J pairs (2i, 2i+1) with interleaved=True); the rest pass through
unchanged. The angle is float32(float32(position) * inv_freq); cos/sin are
float32, scaled by attention_factor. See tests/reference/rope.py for the
float64 reference and the tolerance rules:

* float32 / float64: max error <= 1e-5 / 1e-6 * max|x|
* float16 / bfloat16: max error <= 2 * (error of the naive Hugging Face style
  low-precision computation) + max(1e-3 * max|x|, one rounding of max|out|)
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from torch import library as op_lib  # noqa: E402
from hypothesis import assume, example, given
from hypothesis import strategies as st

import longattn
from reference.rope import CPU_DTYPES, NP_DTYPES, TORCH_DTYPES
from reference.rope import (
    NP_BFLOAT16,
    assert_matches_reference,
    float32_angles,
    naive_rope_low_precision,
    numpy_to_torch,
    rope_reference,
    rope_reference_qk,
    to_float64,
)

CUDA_DTYPES = ["float16", "bfloat16", "float32"]
HALF = ("float16", "bfloat16")
INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
D_CHOICES = [2, 3, 5, 7, 8, 64, 80, 96, 128, 130]
S_CHOICES = [1, 2, 63, 113]
MAX_POSITION = 10**6


# ----------------------------------------------------------------------------
# test cases
# ----------------------------------------------------------------------------
def theta_inv_freq(rotary_dim: int, theta: float = 10000.0) -> np.ndarray:
    """Standard RoPE frequencies theta^(-2j/rotary_dim), float32."""
    j = np.arange(0, rotary_dim, 2, dtype=np.float64)
    return (1.0 / theta ** (j / rotary_dim)).astype(np.float32)


@dataclasses.dataclass
class Case:
    B: int
    S: int
    Hq: int
    Hk: int
    D: int
    inv_freq: np.ndarray
    positions: np.ndarray | None
    attention_factor: float
    interleaved: bool
    with_k: bool
    dtype: str
    seed: int

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.size

    def numpy_inputs(self):
        """(q, k) NumPy arrays of the case dtype (k None when with_k is False)."""
        rng = np.random.default_rng(self.seed)
        q = rng.standard_normal((self.B, self.S, self.Hq, self.D)).astype(NP_DTYPES[self.dtype])
        k = rng.standard_normal((self.B, self.S, self.Hk, self.D)).astype(NP_DTYPES[self.dtype])
        return q, (k if self.with_k else None)

    def torch_inputs(self, device="cpu"):
        q, k = self.numpy_inputs()
        q = numpy_to_torch(q).to(device)
        k = None if k is None else numpy_to_torch(k).to(device)
        return q, k

    def torch_positions(self, device="cpu"):
        if self.positions is None:
            return None
        return torch.from_numpy(self.positions.copy()).to(device)

    def kwargs(self):
        return dict(inv_freq=self.inv_freq, attention_factor=self.attention_factor,
                    interleaved=self.interleaved)

    def reference(self, q, k, conjugate=False):
        return rope_reference_qk(q, k, self.positions, self.inv_freq, self.attention_factor,
                                 self.interleaved, conjugate=conjugate)

    def naive(self, q, k):
        if self.dtype not in HALF:
            return None, None
        return naive_rope_low_precision(q, k, self.positions, self.inv_freq,
                                        self.attention_factor, self.interleaved,
                                        TORCH_DTYPES[self.dtype])


@st.composite
def positions_st(draw, B, S):
    """None, (S,) or (B, S) positions of any integer dtype, arange + offsets
    (up to 1e6) or arbitrary values."""
    kind = draw(st.sampled_from(["none", "1d", "2d"]))
    if kind == "none":
        return None
    dt = np.dtype(draw(st.sampled_from(INT_DTYPES)))
    maxval = int(min(MAX_POSITION, np.iinfo(dt).max))
    shape = (S,) if kind == "1d" else (B, S)
    pattern = draw(st.sampled_from(["arange", "random"]))
    if pattern == "arange" and S - 1 <= maxval:
        rows = shape[0] if kind == "2d" else 1
        offsets = [draw(st.integers(0, maxval - (S - 1))) for _ in range(rows)]
        pos = np.stack([off + np.arange(S, dtype=np.int64) for off in offsets])
    else:
        seed = draw(st.integers(0, 2**32 - 1))
        hi = draw(st.sampled_from([min(maxval, 127), maxval]))
        pos = np.random.default_rng(seed).integers(0, hi + 1, size=shape, dtype=np.int64)
    return pos.reshape(shape).astype(dt)


@st.composite
def inv_freq_st(draw, D):
    half = draw(st.one_of(st.just(D // 2), st.integers(1, D // 2)))
    kind = draw(st.sampled_from(["theta", "random"]))
    if kind == "theta":
        theta = draw(st.sampled_from([10.0, 1e4, 5e5, 1e6]))
        return theta_inv_freq(2 * half, theta)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    return np.exp(rng.uniform(np.log(1e-5), 0.0, size=half)).astype(np.float32)


@st.composite
def rope_cases(draw, dtypes=tuple(CPU_DTYPES), max_s=300, allow_no_k=True,
               d_choices=tuple(D_CHOICES), max_d=160, positions=True):
    B = draw(st.integers(1, 3))
    S = draw(st.one_of(st.sampled_from([s for s in S_CHOICES if s <= max_s]),
                       st.integers(1, max_s)))
    Hq = draw(st.integers(1, 5))
    Hk = draw(st.integers(1, 5))
    D = draw(st.one_of(st.sampled_from(list(d_choices)), st.integers(2, max_d)))
    inv_freq = draw(inv_freq_st(D))
    pos = draw(positions_st(B, S)) if positions else None
    af = draw(st.one_of(st.just(1.0), st.sampled_from([0.5, 1.2079441541679836, 1.75]),
                        st.floats(0.25, 2.0)))
    return Case(
        B=B, S=S, Hq=Hq, Hk=Hk, D=D, inv_freq=inv_freq, positions=pos, attention_factor=af,
        interleaved=draw(st.booleans()),
        with_k=draw(st.booleans()) if allow_no_k else True,
        dtype=draw(st.sampled_from(list(dtypes))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def apply(case, q, k, positions, **kw):
    """Call apply_rope and normalise the result to (q_rot, k_rot), checking
    that k=None returns q_rot alone (not a tuple)."""
    out = longattn.apply_rope(q, k, positions, **case.kwargs(), **kw)
    if k is None:
        assert not isinstance(out, tuple), "k=None must return q_rot alone"
        return out, None
    assert isinstance(out, tuple) and len(out) == 2
    return out


def check_against_reference(case, q, k, out_q, out_k, q_in=None, k_in=None):
    """out_q/out_k vs the float64 reference of the inputs q_in/k_in (default q/k)."""
    q_in = q if q_in is None else q_in
    k_in = k if k_in is None else k_in
    rq, rk = case.reference(q_in, k_in)
    nq, nk = case.naive(q_in, k_in)
    assert_matches_reference(out_q, rq, q_in, naive=nq, what="q_rot")
    if k_in is not None:
        assert_matches_reference(out_k, rk, k_in, naive=nk, what="k_rot")


def assert_same_tensor_meta(out, like):
    assert isinstance(out, torch.Tensor)
    assert out.dtype == like.dtype
    assert out.device == like.device
    assert out.shape == like.shape


# ----------------------------------------------------------------------------
# the reference itself (guards the oracle)
# ----------------------------------------------------------------------------
def test_reference_equals_transformers_llama_rotary_in_float64():
    """The float64 reference agrees with Hugging Face's apply_rotary_pos_emb fed
    float64 cos/sin of the same float32 angles (NeoX layout, full rotary)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rng = np.random.default_rng(0)
    B, S, H, D = 2, 7, 3, 16
    q = rng.standard_normal((B, S, H, D))
    k = rng.standard_normal((B, S, 2, D))
    inv = theta_inv_freq(D, 5e5)
    pos = rng.integers(0, 10**6, size=(B, S))
    ang = float32_angles(pos, inv).astype(np.float64)
    emb = np.concatenate([ang, ang], axis=-1)
    cos = torch.from_numpy(np.cos(emb) * 0.8)
    sin = torch.from_numpy(np.sin(emb) * 0.8)
    hq, hk = apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), cos, sin, unsqueeze_dim=2)
    rq, rk = rope_reference_qk(q, k, pos, inv, 0.8)
    np.testing.assert_allclose(hq.numpy(), rq, rtol=0, atol=1e-12)
    np.testing.assert_allclose(hk.numpy(), rk, rtol=0, atol=1e-12)


def test_reference_uses_float32_angle_semantics():
    """At positions ~1e6 the float32 angle differs from the float64 one enough
    that the float32 tolerance separates the two semantics."""
    inv = theta_inv_freq(8)
    pos = np.arange(10**6 - 50, 10**6)
    x = np.random.default_rng(1).standard_normal((1, 50, 1, 8))
    ref = rope_reference(x, pos, inv)
    theta64 = pos[:, None].astype(np.float64) * inv.astype(np.float64)
    z = (x[0, :, 0, :4] + 1j * x[0, :, 0, 4:]) * np.exp(1j * theta64)
    assert np.max(np.abs(z.real - ref[0, :, 0, :4])) > 100 * 1e-5 * np.max(np.abs(x))


# ----------------------------------------------------------------------------
# forward: values
# ----------------------------------------------------------------------------
def _case(**kw):
    base = dict(B=2, S=63, Hq=4, Hk=2, D=128, inv_freq=theta_inv_freq(128, 5e5), positions=None,
                attention_factor=1.0, interleaved=False, with_k=True, dtype="bfloat16", seed=0)
    base.update(kw)
    return Case(**base)


# Configurations the property must always cover, whatever hypothesis draws.
KEY_CASES = [
    _case(),  # Llama-like, bf16, default positions
    _case(dtype="float16", interleaved=True, positions=(np.arange(63) + MAX_POSITION - 62).astype(np.int32)),
    _case(dtype="float32", B=3, positions=np.random.default_rng(0).integers(0, MAX_POSITION + 1, (3, 63))),
    _case(dtype="float64", D=130, inv_freq=theta_inv_freq(96), attention_factor=1.2079441541679836),
    _case(dtype="float32", D=2, inv_freq=np.array([1.0], np.float32), S=113, Hq=5, Hk=1),
    _case(dtype="bfloat16", D=80, inv_freq=theta_inv_freq(40), interleaved=True, with_k=False,
          positions=np.arange(63, dtype=np.int8)),
    _case(dtype="float16", D=96, Hq=1, Hk=5, inv_freq=theta_inv_freq(96, 1e6), S=1,
          positions=np.array([[123456], [7]], dtype=np.uint32)),
    _case(dtype="float32", D=5, inv_freq=theta_inv_freq(4), S=2, attention_factor=0.5,
          positions=np.array([255, 0], dtype=np.uint8)),
]


def with_key_cases(test):
    for c in KEY_CASES:
        test = example(case=c)(test)
    return test


@with_key_cases
@given(case=rope_cases())
def test_output_matches_float64_reference_for_all_dtypes_layouts_and_positions(case):
    q, k = case.torch_inputs()
    q0, k0 = q.clone(), (None if k is None else k.clone())
    out_q, out_k = apply(case, q, k, case.torch_positions())
    assert_same_tensor_meta(out_q, q)
    if k is not None:
        assert_same_tensor_meta(out_k, k)
    # out-of-place: inputs untouched, outputs are new buffers
    assert torch.equal(q, q0)
    assert out_q.data_ptr() != q.data_ptr()
    if k is not None:
        assert torch.equal(k, k0)
        assert out_k.data_ptr() != k.data_ptr()
    check_against_reference(case, q, k, out_q, out_k)


@given(case=rope_cases(d_choices=(3, 5, 7, 80, 96, 130), max_s=64))
def test_pass_through_channels_are_bit_identical(case):
    assume(case.rotary_dim < case.D)
    q, k = case.torch_inputs()
    out_q, out_k = apply(case, q, k, case.torch_positions())
    rd = case.rotary_dim
    assert torch.equal(out_q[..., rd:], q[..., rd:])
    if k is not None:
        assert torch.equal(out_k[..., rd:], k[..., rd:])


@given(case=rope_cases(max_s=64))
def test_k_none_returns_q_rot_equal_to_the_q_part_of_a_qk_call(case):
    case = dataclasses.replace(case, with_k=True)
    q, k = case.torch_inputs()
    pos = case.torch_positions()
    alone, _ = apply(case, q, None, pos)
    both_q, _ = apply(case, q, k, pos)
    assert torch.equal(alone, both_q)


@given(case=rope_cases(max_s=128, positions=False))
def test_positions_none_means_arange_and_1d_positions_broadcast_over_batch(case):
    q, k = case.torch_inputs()
    default = apply(case, q, k, None)
    ar = torch.arange(case.S)
    as_1d = apply(case, q, k, ar)
    as_2d = apply(case, q, k, ar.expand(case.B, case.S).contiguous())
    for a, b, c in zip(default, as_1d, as_2d):
        if a is None:
            continue
        assert torch.equal(a, b)
        assert torch.equal(a, c)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("pos_dtype", INT_DTYPES)
def test_every_integer_positions_dtype_gives_the_int64_result(framework, pos_dtype):
    rng = np.random.default_rng(3)
    B, S = 2, 9
    hi = min(np.iinfo(pos_dtype).max, MAX_POSITION)
    pos64 = rng.integers(0, hi + 1, size=(B, S))
    pos64[0, :3] = [0, 1, hi]
    q = rng.standard_normal((B, S, 2, 16)).astype(np.float32)
    k = rng.standard_normal((B, S, 3, 16)).astype(np.float32)
    inv = theta_inv_freq(12, 1e4)
    pos = pos64.astype(pos_dtype)
    if framework == "torch":
        q, k = torch.from_numpy(q), torch.from_numpy(k)
        pos, pos64 = torch.from_numpy(pos), torch.from_numpy(pos64)
    want_q, want_k = longattn.apply_rope(q, k, pos64, inv_freq=inv)
    got_q, got_k = longattn.apply_rope(q, k, pos, inv_freq=inv)
    assert to_float64(got_q).tobytes() == to_float64(want_q).tobytes()
    assert to_float64(got_k).tobytes() == to_float64(want_k).tobytes()
    rq, rk = rope_reference_qk(q, k, pos64, inv)
    assert_matches_reference(got_q, rq, q)
    assert_matches_reference(got_k, rk, k)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("pos_dtype", ["int32", "int64"])
def test_float32_angle_semantics_hold_at_positions_near_one_million(interleaved, pos_dtype):
    B, S, D = 1, 64, 128
    rng = np.random.default_rng(4)
    q = torch.from_numpy(rng.standard_normal((B, S, 4, D)).astype(np.float32))
    k = torch.from_numpy(rng.standard_normal((B, S, 2, D)).astype(np.float32))
    pos = torch.arange(MAX_POSITION - S + 1, MAX_POSITION + 1, dtype=getattr(torch, pos_dtype))
    inv = theta_inv_freq(D, 5e5)
    out_q, out_k = longattn.apply_rope(q, k, pos, inv_freq=inv, interleaved=interleaved)
    rq, rk = rope_reference_qk(q, k, pos, inv, interleaved=interleaved)
    assert_matches_reference(out_q, rq, q)
    assert_matches_reference(out_k, rk, k)


@given(case=rope_cases(dtypes=("float64",), max_s=40, positions=False))
def test_scores_depend_only_on_relative_position(case):
    """<rope(q)_m, rope(k)_n> is invariant under a common shift of m and n
    (the defining property of RoPE); inv_freq = 2^-j makes the angles exact."""
    inv = (2.0 ** -np.arange(case.inv_freq.size)).astype(np.float32)
    shift = 1000 + case.seed % 50000
    q, k = case.torch_inputs()
    if k is None:
        k = q.clone()
    kw = dict(inv_freq=inv, attention_factor=case.attention_factor, interleaved=case.interleaved)
    base = torch.arange(case.S)
    q0, k0 = longattn.apply_rope(q, k, base, **kw)
    q1, k1 = longattn.apply_rope(q, k, base + shift, **kw)
    s0 = torch.einsum("bshd,btgd->bstgh", q0, k0)
    s1 = torch.einsum("bshd,btgd->bstgh", q1, k1)
    scale = float(q.abs().max() * k.abs().max()) * case.D * case.attention_factor**2
    assert float((s0 - s1).abs().max()) <= 1e-5 * scale


@given(case=rope_cases(dtypes=("float32", "float64"), max_s=64))
def test_interleaved_layout_is_neox_layout_on_permuted_channels(case):
    """GPT-J pair (2j, 2j+1) == NeoX pair (j, j + rotary_dim/2) after permuting channels."""
    q, k = case.torch_inputs()
    rd = case.rotary_dim
    perm = torch.cat([torch.arange(0, rd, 2), torch.arange(1, rd, 2), torch.arange(rd, case.D)])
    inv_perm = torch.argsort(perm)
    pos = case.torch_positions()
    kw = dict(inv_freq=case.inv_freq, attention_factor=case.attention_factor)
    got = longattn.apply_rope(q, k, pos, interleaved=True, **kw)
    via = longattn.apply_rope(q[..., perm].contiguous(),
                              None if k is None else k[..., perm].contiguous(),
                              pos, interleaved=False, **kw)
    got = got if isinstance(got, tuple) else (got,)
    via = via if isinstance(via, tuple) else (via,)
    for a, b in zip(got, via):
        atol = 2e-6 * float(q.abs().max()) * max(1.0, case.attention_factor)
        torch.testing.assert_close(a, b[..., inv_perm], rtol=0, atol=atol)


def test_inv_freq_of_256_entries_is_accepted():
    rng = np.random.default_rng(5)
    q = torch.from_numpy(rng.standard_normal((1, 3, 1, 514)).astype(np.float32))
    inv = theta_inv_freq(512)
    assert inv.size == 256
    out = longattn.apply_rope(q, positions=torch.tensor([0, 7, 4095]), inv_freq=inv)
    assert_matches_reference(out, rope_reference(q, np.array([0, 7, 4095]), inv), q)
    assert torch.equal(out[..., 512:], q[..., 512:])


def test_realistic_frequencies_from_rope_frequencies():
    inv, af = longattn.rope_frequencies(128, theta=5e5)
    rng = np.random.default_rng(6)
    q = torch.from_numpy(rng.standard_normal((2, 33, 8, 128)).astype(np.float32)).to(torch.bfloat16)
    k = torch.from_numpy(rng.standard_normal((2, 33, 2, 128)).astype(np.float32)).to(torch.bfloat16)
    pos = torch.from_numpy(rng.integers(0, 131072, size=(2, 33)))
    out_q, out_k = longattn.apply_rope(q, k, pos, inv_freq=inv, attention_factor=af)
    rq, rk = rope_reference_qk(q, k, pos, inv, af)
    nq, nk = naive_rope_low_precision(q, k, pos, inv, af, False, torch.bfloat16)
    assert_matches_reference(out_q, rq, q, naive=nq)
    assert_matches_reference(out_k, rk, k, naive=nk)


# ----------------------------------------------------------------------------
# inplace, strides, packed variable length
# ----------------------------------------------------------------------------
@given(case=rope_cases(max_s=128))
def test_inplace_returns_the_same_objects_holding_the_out_of_place_result(case):
    q, k = case.torch_inputs()
    pos = case.torch_positions()
    want_q, want_k = apply(case, q, k, pos)
    ptr_q = q.data_ptr()
    got_q, got_k = apply(case, q, k, pos, inplace=True)
    assert got_q is q and q.data_ptr() == ptr_q
    assert torch.equal(q, want_q)
    if k is not None:
        assert got_k is k
        assert torch.equal(k, want_k)


LAYOUTS = ["packed_qkv", "bhsd_transposed", "padded_last_dim"]


def strided_inputs(case, layout, device="cpu"):
    """q, k as non-contiguous views (last dim contiguous) of a bigger buffer,
    their contiguous copies and the buffer."""
    q, k = case.torch_inputs(device)
    Hk = k.shape[2] if k is not None else 1
    g = torch.Generator().manual_seed(case.seed % 2**31)

    def noise(*shape):
        return torch.randn(*shape, generator=g).to(q.dtype).to(device)

    if layout == "packed_qkv":  # (B, S, Hq + 2 Hk, D), v after k
        buf = noise(case.B, case.S, case.Hq + 2 * Hk, case.D)
        qv = buf[:, :, : case.Hq]
        kv = buf[:, :, case.Hq: case.Hq + Hk]
    elif layout == "bhsd_transposed":  # (B, H, S, D) storage seen as (B, S, H, D)
        buf = noise(case.B, case.Hq + Hk, case.S, case.D)
        qv = buf[:, : case.Hq].transpose(1, 2)
        kv = buf[:, case.Hq:].transpose(1, 2)
    else:  # last dim is a slice of a wider, padded one
        buf = noise(case.B, case.S, case.Hq + Hk, case.D + 6)
        qv = buf[:, :, : case.Hq, 3: 3 + case.D]
        kv = buf[:, :, case.Hq:, 3: 3 + case.D]
    qv.copy_(q)
    if k is not None:
        kv.copy_(k)
    else:
        kv = None
    assert qv.stride(-1) == 1
    return qv, kv, q, k, buf


@pytest.mark.parametrize("layout", LAYOUTS)
@given(case=rope_cases(max_s=64))
def test_strided_views_give_the_contiguous_result_and_inplace_writes_only_them(layout, case):
    qv, kv, q, k, buf = strided_inputs(case, layout)
    pos = case.torch_positions()
    out_q, out_k = apply(case, qv, kv, pos)
    check_against_reference(case, qv, kv, out_q, out_k, q_in=q, k_in=k)
    before = buf.clone()
    got_q, got_k = apply(case, qv, kv, pos, inplace=True)
    assert got_q is qv
    check_against_reference(case, qv, kv, qv, kv, q_in=q, k_in=k)
    # everything in the buffer outside q and k is untouched
    mask = torch.ones_like(buf, dtype=torch.bool)
    if layout == "packed_qkv":
        mask[:, :, : case.Hq + (0 if kv is None else kv.shape[2])] = False
    elif layout == "bhsd_transposed":
        mask[:, : case.Hq] = False
        if kv is not None:
            mask[:, case.Hq:] = False
    else:
        mask[:, :, : case.Hq, 3: 3 + case.D] = False
        if kv is not None:
            mask[:, :, case.Hq:, 3: 3 + case.D] = False
    assert torch.equal(buf[mask], before[mask])


@st.composite
def varlen_cases(draw, dtypes=tuple(CPU_DTYPES)):
    lengths = draw(st.lists(st.integers(1, 80), min_size=1, max_size=5))
    case = draw(rope_cases(dtypes=dtypes, max_s=8, positions=False))
    total = sum(lengths)
    case = dataclasses.replace(case, B=1, S=total)
    return case, lengths


@given(spec=varlen_cases(), pos_dtype=st.sampled_from(["int32", "int64"]))
def test_packed_varlen_with_concatenated_aranges_equals_per_sequence_calls(spec, pos_dtype):
    case, lengths = spec
    q, k = case.torch_inputs()
    pos = torch.cat([torch.arange(n) for n in lengths]).to(getattr(torch, pos_dtype))
    out_q, out_k = apply(case, q, k, pos)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        seg_q, seg_k = apply(case, q[:, sl].contiguous(),
                             None if k is None else k[:, sl].contiguous(), None)
        assert torch.equal(out_q[:, sl], seg_q)
        if k is not None:
            assert torch.equal(out_k[:, sl], seg_k)
        start += n
    case.positions = pos.numpy()
    check_against_reference(case, q, k, out_q, out_k)


# ----------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------
def _expected_grads(case, wq, wk):
    return case.reference(wq, wk, conjugate=True)


def _naive_grads(case, q, k, wq, wk):
    if case.dtype not in HALF:
        return None, None
    qn = q.detach().clone().requires_grad_()
    kn = None if k is None else k.detach().clone().requires_grad_()
    oq, ok = naive_rope_low_precision(qn, kn, case.positions, case.inv_freq,
                                      case.attention_factor, case.interleaved,
                                      TORCH_DTYPES[case.dtype])
    torch.autograd.backward([oq] + ([ok] if ok is not None else []),
                            [wq] + ([wk] if ok is not None else []))
    return qn.grad, (None if kn is None else kn.grad)


def check_grads(case, gq, gk, wq, wk, q, k):
    eq, ek = _expected_grads(case, wq, wk)
    nq, nk = _naive_grads(case, q, k, wq, wk)
    assert_matches_reference(gq, eq, wq, naive=nq, what="q.grad")
    rd = case.rotary_dim
    assert torch.equal(gq[..., rd:], wq[..., rd:]), "pass-through gradient must be the output gradient"
    if k is not None:
        assert_matches_reference(gk, ek, wk, naive=nk, what="k.grad")
        assert torch.equal(gk[..., rd:], wk[..., rd:])


@example(case=_case(dtype="float32", D=130, inv_freq=theta_inv_freq(96), attention_factor=1.3))
@example(case=_case(dtype="bfloat16", interleaved=True, positions=np.arange(63) * 1000))
@given(case=rope_cases(dtypes=("float32", "bfloat16", "float16"), max_s=64))
def test_gradient_is_the_conjugate_rotation_times_attention_factor(case):
    q, k = case.torch_inputs()
    q.requires_grad_()
    if k is not None:
        k.requires_grad_()
    out_q, out_k = apply(case, q, k, case.torch_positions())
    wq = torch.randn_like(out_q)
    wk = None if k is None else torch.randn_like(out_k)
    torch.autograd.backward([out_q] + ([out_k] if k is not None else []),
                            [wq] + ([wk] if k is not None else []))
    assert q.grad.dtype == q.dtype
    check_grads(case, q.grad, None if k is None else k.grad, wq, wk, q, k)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("with_k", [False, True])
@pytest.mark.parametrize("D,rotary_dim", [(6, 6), (7, 4)])
def test_gradcheck_float64(interleaved, with_k, D, rotary_dim):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 2, D, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 3, 1, D, dtype=torch.float64, generator=g, requires_grad=True)
    pos = torch.tensor([[0, 5, 2], [100, 101, 7]])
    inv = theta_inv_freq(rotary_dim, 100.0)

    def f(q_, k_=None):
        return longattn.apply_rope(q_, k_, pos, inv_freq=inv, attention_factor=0.7,
                                   interleaved=interleaved)

    assert torch.autograd.gradcheck(f, (q, k) if with_k else (q,))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["separate", "packed_qkv", "packed_qkv_q_only"])
def test_inplace_on_non_leaf_tensors_backpropagates_to_the_leaf(dtype, layout):
    """y = 2*x (non-leaf; q and k either own tensors or views of a packed qkv y);
    apply_rope(q, k, inplace=True); then grad_x = 2 * conj-rotation(w) on q/k, 2*w elsewhere."""
    with_k = layout != "packed_qkv_q_only"
    case = Case(B=2, S=5, Hq=3, Hk=2, D=10, inv_freq=theta_inv_freq(8), positions=np.array([3, 1, 4, 1, 5]),
                attention_factor=1.3, interleaved=False, with_k=with_k, dtype=dtype, seed=8)
    tdt = TORCH_DTYPES[dtype]
    g = torch.Generator().manual_seed(8)
    if layout == "separate":
        leaf_q = torch.randn(2, 5, 3, 10, generator=g).to(tdt).requires_grad_()
        leaf_k = torch.randn(2, 5, 2, 10, generator=g).to(tdt).requires_grad_()
        q, k = leaf_q * 2, leaf_k * 2
    else:
        leaf = torch.randn(2, 5, 3 + 2 + 2, 10, generator=g).to(tdt).requires_grad_()
        y = leaf * 2
        q, k = y[:, :, :3], (y[:, :, 3:5] if with_k else None)
    q_in = q.detach().clone()
    k_in = None if k is None else k.detach().clone()
    got_q, got_k = apply(case, q, k, torch.from_numpy(case.positions), inplace=True)
    assert got_q is q and got_k is k
    check_against_reference(case, q_in, k_in, q.detach(), None if k is None else k.detach())
    wq = torch.randn(q.shape, generator=g).to(tdt)
    wk = torch.randn(2, 5, 2, 10, generator=g).to(tdt)
    wv = torch.randn(2, 5, 2, 10, generator=g).to(tdt)
    if layout == "separate":
        torch.autograd.backward([q, k], [wq, wk])
        gq, gk = leaf_q.grad, leaf_k.grad
    else:
        rest = y[:, :, 5:] if with_k else y[:, :, 3:]
        w_rest = wv if with_k else torch.cat([wk, wv], dim=2)
        torch.autograd.backward(([q, k] if with_k else [q]) + [rest], ([wq, wk] if with_k else [wq]) + [w_rest])
        gq, gk = leaf.grad[:, :, :3], (leaf.grad[:, :, 3:5] if with_k else None)
        assert torch.equal(leaf.grad[:, :, 5 if with_k else 3:], (2 * w_rest).to(tdt)), "only q/k are rotated"
    # the gradient wrt y is conj-rotation(w); the factor 2 is exact
    check_grads(case, gq / 2, None if gk is None else gk / 2, wq, wk if with_k else None, q_in, k_in)


# ----------------------------------------------------------------------------
# custom ops registered with torch: opcheck
# ----------------------------------------------------------------------------
def _rope_ops():
    from longattn import torch_ops

    return list(torch_ops.ROPE_OPS)


def test_rope_ops_are_registered_under_torch_ops_longattn():
    ops = _rope_ops()
    assert ops, "longattn.torch_ops.ROPE_OPS is empty"
    for op in ops:
        assert isinstance(op, torch._ops.OpOverload)
        assert op.namespace == "longattn"
        assert getattr(getattr(torch.ops.longattn, op._schema.name.split("::")[1]),
                       op._overloadname) is op


def _arg_value(arg, values):
    """Pick the sample value for a schema argument by its name."""
    name = arg.name.lower()
    typ = str(arg.type)
    if name in ("q", "query") or name.startswith("q_") or name == "x":
        return values["q"]
    if name in ("k", "key") or name.startswith("k_"):
        return values["k"]
    if "pos" in name:
        return values["positions"]
    if "freq" in name:
        if typ.startswith("float[]") or typ.startswith("List[float]") or "[]" in typ:
            return [float(v) for v in values["inv_freq"]]
        return torch.from_numpy(values["inv_freq"].copy())
    if "factor" in name or "scal" in name:
        return values["attention_factor"]
    if "interleav" in name:
        return values["interleaved"]
    if "conj" in name or "inverse" in name or "backward" in name:
        return values["conjugate"]
    if arg.has_default_value():
        return arg.default_value
    raise AssertionError(f"cannot build a sample for argument {arg.name}: {typ} of {arg}")


def _is_mutating(op):
    return any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)


def _sample_inputs(op):
    """(args, kwargs) sample lists: dtypes x with/without k x positions x layouts x
    conjugate, requires_grad for functional ops."""
    samples = []
    arg_names = [a.name for a in op._schema.arguments]
    k_optional = any(a.name in ("k", "key") and "?" in str(a.type) for a in op._schema.arguments)
    pos_optional = any("pos" in a.name and "?" in str(a.type) for a in op._schema.arguments)
    g = torch.Generator().manual_seed(9)
    for dtype, with_k, positions_kind, interleaved, conjugate, rg in [
        (torch.float32, True, "2d", False, False, True),
        (torch.float32, True, "1d", True, True, True),
        (torch.bfloat16, False, None, False, False, True),
        (torch.float64, True, "2d", True, False, False),
        (torch.float16, False, "1d", False, True, False),
    ]:
        if not with_k and not k_optional:
            with_k = True
        if positions_kind is None and not pos_optional:
            positions_kind = "1d"
        requires_grad = rg and not _is_mutating(op) and dtype != torch.float16
        q = torch.randn(2, 5, 3, 10, generator=g).to(dtype)
        k = torch.randn(2, 5, 2, 10, generator=g).to(dtype) if with_k else None
        pos = {None: None, "1d": torch.tensor([4, 0, 9, 1, 1000]),
               "2d": torch.tensor([[4, 0, 9, 1, 1000], [0, 1, 2, 3, 4]], dtype=torch.int32)}[positions_kind]
        if requires_grad:
            q.requires_grad_()
            if k is not None:
                k.requires_grad_()
        values = dict(q=q, k=k, positions=pos, inv_freq=theta_inv_freq(8), attention_factor=1.25,
                      interleaved=interleaved, conjugate=conjugate)
        args, kwargs = [], {}
        for a in op._schema.arguments:
            v = _arg_value(a, values)
            if a.kwarg_only:
                kwargs[a.name] = v
            else:
                args.append(v)
        samples.append((tuple(args), kwargs))
    assert arg_names
    return samples


def _op_ids():
    try:
        return [str(op) for op in _rope_ops()]
    except Exception as e:  # surfaced by test_rope_ops_are_registered...
        return [f"unavailable:{type(e).__name__}"]


@pytest.mark.parametrize("op_name", _op_ids())
def test_opcheck_passes_on_every_rope_op(op_name):
    ops = {str(op): op for op in _rope_ops()}
    op = ops[op_name]
    for args, kwargs in _sample_inputs(op):
        op_lib.opcheck(op, args, kwargs)


# ----------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


INV_LIST = [float(v) for v in theta_inv_freq(12, 5e5)]


def _model(q, k, pos, interleaved):
    q = q * 1.5
    out_q, out_k = longattn.apply_rope(q, k, pos, inv_freq=INV_LIST, attention_factor=1.1,
                                       interleaved=interleaved)
    return (out_q.float() ** 2).sum(-1), out_k - 1


def _model_inplace(qkv, pos):
    qkv = qkv * 1.0
    q, k = qkv[:, :, :2], qkv[:, :, 2:3]
    longattn.apply_rope(q, k, pos, inv_freq=INV_LIST, attention_factor=1.1, inplace=True)
    return qkv * 2


def _compile_inputs(S, dtype=torch.float32, seed=10):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, S, 2, 16, generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, S, 1, 16, generator=g).to(dtype).requires_grad_()
    pos = torch.arange(S, dtype=torch.int32) + 17
    return q, k, pos


def _grads_of(fn, q, k, *rest):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    a, b = fn(q, k, *rest)
    (a.sum() + (b * b).sum()).backward()
    return a.detach(), b.detach(), q.grad, k.grad


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_torch_compile_fullgraph_matches_eager_forward_and_backward(fresh_dynamo, backend, interleaved):
    compiled = torch.compile(_model, backend=backend, fullgraph=True)
    for S in (7, 12):  # a second shape exercises recompilation / dynamic shapes
        q, k, pos = _compile_inputs(S)
        want = _grads_of(_model, q, k, pos, interleaved)
        got = _grads_of(compiled, q, k, pos, interleaved)
        for w, g_ in zip(want, got):
            torch.testing.assert_close(g_, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("inv_kind", ["list", "numpy", "torch"])
def test_torch_compile_fullgraph_with_positions_none_and_k_none(fresh_dynamo, inv_kind):
    inv = {"list": INV_LIST, "numpy": np.array(INV_LIST, np.float32),
           "torch": torch.tensor(INV_LIST, dtype=torch.float32)}[inv_kind]

    def f(q):
        return longattn.apply_rope(q, inv_freq=inv) * 2

    q, _, _ = _compile_inputs(9)
    q = q.detach()
    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(q), f(q),
                               rtol=0, atol=0)


def test_torch_compile_fullgraph_inplace_on_packed_qkv(fresh_dynamo):
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(2, 6, 4, 16, generator=g)
    pos = torch.tensor([5, 4, 3, 2, 1, 0])
    want = _model_inplace(qkv, pos)
    got = torch.compile(_model_inplace, backend="aot_eager", fullgraph=True)(qkv, pos)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    qkv_l = qkv.clone().requires_grad_()
    w = torch.randn_like(qkv)
    (torch.compile(_model_inplace, backend="aot_eager", fullgraph=True)(qkv_l, pos) * w).sum().backward()
    qkv_e = qkv.clone().requires_grad_()
    (_model_inplace(qkv_e, pos) * w).sum().backward()
    torch.testing.assert_close(qkv_l.grad, qkv_e.grad, rtol=0, atol=0)


def test_torch_compile_inductor_fullgraph_matches_eager(fresh_dynamo):
    compiled = torch.compile(_model, backend="inductor", fullgraph=True)
    q, k, pos = _compile_inputs(8, dtype=torch.bfloat16)
    want = _grads_of(_model, q, k, pos, False)
    got = _grads_of(compiled, q, k, pos, False)
    for w, g_ in zip(want, got):
        torch.testing.assert_close(g_.float(), w.float(), rtol=1.6e-2, atol=2e-2)


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------
def _np(shape, dtype=np.float32):
    return np.random.default_rng(12).standard_normal(shape).astype(dtype)


INV8 = theta_inv_freq(8)  # rotary_dim 8


def _call(q, k=None, positions=None, **kw):
    kw.setdefault("inv_freq", INV8)
    return lambda: longattn.apply_rope(q, k, positions, **kw)


def _noncontig_last(shape):
    return _np(shape[:-1] + (shape[-1] * 2,))[..., ::2]


ERROR_CASES = {
    # name: (callable, exception types, argument named in the message)
    "q_ndim_3": (_call(_np((2, 4, 8))), (ValueError,), "q"),
    "q_ndim_5": (_call(_np((1, 2, 4, 1, 8))), (ValueError,), "q"),
    "k_ndim_3": (_call(_np((2, 4, 3, 8)), _np((2, 4, 8))), (ValueError,), "k"),
    "k_batch_mismatch": (_call(_np((2, 4, 3, 8)), _np((3, 4, 1, 8))), (ValueError,), "k"),
    "k_seq_mismatch": (_call(_np((2, 4, 3, 8)), _np((2, 5, 1, 8))), (ValueError,), "k"),
    "k_head_dim_mismatch": (_call(_np((2, 4, 3, 8)), _np((2, 4, 1, 10))), (ValueError,), "k"),
    "k_dtype_mismatch": (_call(_np((2, 4, 3, 8)), _np((2, 4, 1, 8), np.float64)), (ValueError, TypeError), "k"),
    "q_int_dtype": (_call(np.ones((2, 4, 3, 8), np.int32)), (TypeError, ValueError), "q"),
    "q_bool_dtype": (_call(np.ones((2, 4, 3, 8), bool)), (TypeError, ValueError), "q"),
    "positions_float32": (_call(_np((2, 4, 3, 8)), None, np.arange(4, dtype=np.float32)), (TypeError,), "positions"),
    "positions_float64": (_call(_np((2, 4, 3, 8)), None, np.arange(4.0)), (TypeError,), "positions"),
    "positions_torch_float": (_call(torch.randn(2, 4, 3, 8), None, torch.arange(4.0)), (TypeError,), "positions"),
    "positions_len_mismatch": (_call(_np((2, 4, 3, 8)), None, np.arange(5)), (ValueError,), "positions"),
    "positions_batch_mismatch": (_call(_np((2, 4, 3, 8)), None, np.zeros((3, 4), np.int64)), (ValueError,), "positions"),
    "positions_seq_mismatch_2d": (_call(_np((2, 4, 3, 8)), None, np.zeros((2, 3), np.int64)), (ValueError,), "positions"),
    "positions_ndim_3": (_call(_np((2, 4, 3, 8)), None, np.zeros((2, 4, 1), np.int64)), (ValueError,), "positions"),
    "inv_freq_longer_than_half_d": (_call(_np((2, 4, 3, 8)), inv_freq=theta_inv_freq(10)), (ValueError,), "inv_freq"),
    "inv_freq_longer_than_half_odd_d": (_call(_np((2, 4, 3, 5)), inv_freq=theta_inv_freq(6)), (ValueError,), "inv_freq"),
    "inv_freq_longer_than_256": (_call(_np((1, 2, 1, 600)), inv_freq=theta_inv_freq(514)), (ValueError,), "inv_freq"),
    "inv_freq_2d": (_call(_np((2, 4, 3, 8)), inv_freq=INV8.reshape(2, 2)), (ValueError,), "inv_freq"),
    "q_last_dim_not_contiguous": (_call(_noncontig_last((2, 4, 3, 8))), (ValueError,), "q"),
    "k_last_dim_not_contiguous": (_call(_np((2, 4, 3, 8)), _noncontig_last((2, 4, 1, 8))), (ValueError,), "k"),
    "torch_q_last_dim_not_contiguous": (_call(torch.randn(2, 4, 3, 16)[..., ::2]), (ValueError,), "q"),
    "numpy_q_torch_k": (_call(_np((2, 4, 3, 8)), torch.randn(2, 4, 1, 8)), (TypeError,), "k"),
    "torch_q_numpy_k": (_call(torch.randn(2, 4, 3, 8), _np((2, 4, 1, 8))), (TypeError,), "k"),
    "attention_factor_str": (_call(_np((2, 4, 3, 8)), attention_factor="1.0"), (TypeError,), "attention_factor"),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_invalid_arguments_raise_an_error_naming_the_argument(name):
    call, exc_types, arg = ERROR_CASES[name]
    with pytest.raises(exc_types) as info:
        call()
    assert re.search(rf"\b{arg}\b", str(info.value)), f"message does not name {arg!r}: {info.value}"


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("bad", ["k_seq", "k_dtype", "positions_shape", "positions_float", "inv_freq_long"])
def test_a_failing_inplace_call_writes_nothing(framework, bad):
    q = _np((2, 4, 3, 8))
    k = _np((2, 4, 1, 8))
    pos = np.arange(4) + 3
    inv = INV8
    if bad == "k_seq":
        k = _np((2, 5, 1, 8))
    elif bad == "k_dtype":
        k = _np((2, 4, 1, 8), np.float64)
    elif bad == "positions_shape":
        pos = np.arange(5)
    elif bad == "positions_float":
        pos = pos.astype(np.float32)
    else:
        inv = theta_inv_freq(10)
    if framework == "torch":
        q, k, pos = torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(pos)
    q0, k0 = q.copy() if framework == "numpy" else q.clone(), k.copy() if framework == "numpy" else k.clone()
    with pytest.raises((ValueError, TypeError)):
        longattn.apply_rope(q, k, pos, inv_freq=inv, inplace=True)
    assert to_float64(q).tobytes() == to_float64(q0).tobytes()
    assert to_float64(k).tobytes() == to_float64(k0).tobytes()


# ----------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------
@pytest.mark.cuda
@with_key_cases
@given(case=rope_cases(dtypes=tuple(CUDA_DTYPES)))
def test_cuda_output_matches_float64_reference(case):
    q, k = case.torch_inputs("cuda")
    q0 = q.clone()
    out_q, out_k = apply(case, q, k, case.torch_positions("cuda"))
    assert_same_tensor_meta(out_q, q)
    if k is not None:
        assert_same_tensor_meta(out_k, k)
    assert torch.equal(q, q0)
    check_against_reference(case, q.cpu(), None if k is None else k.cpu(), out_q, out_k)
    rd = case.rotary_dim
    assert torch.equal(out_q[..., rd:], q[..., rd:])


@pytest.mark.cuda
@given(case=rope_cases(dtypes=tuple(CUDA_DTYPES), max_s=128))
def test_cuda_inplace_returns_the_same_objects_holding_the_out_of_place_result(case):
    q, k = case.torch_inputs("cuda")
    pos = case.torch_positions("cuda")
    want_q, want_k = apply(case, q, k, pos)
    got_q, got_k = apply(case, q, k, pos, inplace=True)
    assert got_q is q and torch.equal(q, want_q)
    if k is not None:
        assert got_k is k and torch.equal(k, want_k)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@given(case=rope_cases(dtypes=tuple(CUDA_DTYPES), max_s=64))
def test_cuda_strided_views_match_reference_inplace_and_out_of_place(layout, case):
    qv, kv, q, k, buf = strided_inputs(case, layout, "cuda")
    pos = case.torch_positions("cuda")
    out_q, out_k = apply(case, qv, kv, pos)
    check_against_reference(case, qv, kv, out_q, out_k, q_in=q.cpu(), k_in=None if k is None else k.cpu())
    got_q, _ = apply(case, qv, kv, pos, inplace=True)
    assert got_q is qv
    check_against_reference(case, qv, kv, qv, kv, q_in=q.cpu(), k_in=None if k is None else k.cpu())


@pytest.mark.cuda
@given(spec=varlen_cases(dtypes=tuple(CUDA_DTYPES)))
def test_cuda_packed_varlen_equals_per_sequence_calls(spec):
    case, lengths = spec
    q, k = case.torch_inputs("cuda")
    pos = torch.cat([torch.arange(n) for n in lengths]).to(torch.int32).cuda()
    out_q, out_k = apply(case, q, k, pos)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        seg_q, seg_k = apply(case, q[:, sl].contiguous(), None if k is None else k[:, sl].contiguous(), None)
        assert torch.equal(out_q[:, sl], seg_q)
        if k is not None:
            assert torch.equal(out_k[:, sl], seg_k)
        start += n


@pytest.mark.cuda
@given(case=rope_cases(dtypes=tuple(CUDA_DTYPES), max_s=64))
def test_cuda_gradient_is_the_conjugate_rotation_times_attention_factor(case):
    q, k = case.torch_inputs("cuda")
    q.requires_grad_()
    if k is not None:
        k.requires_grad_()
    out_q, out_k = apply(case, q, k, case.torch_positions("cuda"))
    wq = torch.randn_like(out_q)
    wk = None if k is None else torch.randn_like(out_k)
    torch.autograd.backward([out_q] + ([out_k] if k is not None else []),
                            [wq] + ([wk] if k is not None else []))
    check_grads(case, q.grad.cpu(), None if k is None else k.grad.cpu(), wq.cpu(),
                None if wk is None else wk.cpu(), q.detach().cpu(), None if k is None else k.detach().cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_runs_on_the_current_non_default_stream(inplace):
    """Work queued on a side stream before the call is seen by the kernel: the
    inputs are written on the stream after a long sleep, then rotated."""
    case = Case(B=2, S=256, Hq=8, Hk=2, D=128, inv_freq=theta_inv_freq(128, 5e5),
                positions=None, attention_factor=1.0, interleaved=False, with_k=True,
                dtype="bfloat16", seed=13)
    q_src, k_src = case.torch_inputs("cuda")
    q = torch.zeros_like(q_src)
    k = torch.zeros_like(k_src)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        q.copy_(q_src)
        k.copy_(k_src)
        out_q, out_k = apply(case, q, k, None, inplace=inplace)
        if inplace:
            assert out_q is q
        res_q, res_k = out_q.clone(), out_k.clone()
    side.synchronize()
    check_against_reference(case, q_src.cpu(), k_src.cpu(), res_q, res_k)


@pytest.mark.cuda
def test_cuda_q_and_k_on_different_devices_raise_value_error_naming_k():
    with pytest.raises(ValueError, match=r"\bk\b"):
        longattn.apply_rope(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8, device="cuda"), inv_freq=INV8)
    with pytest.raises(ValueError, match=r"\bk\b"):
        longattn.apply_rope(torch.randn(1, 2, 1, 8, device="cuda"), torch.randn(1, 2, 1, 8), inv_freq=INV8)


@pytest.mark.cuda
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_inplace_on_non_leaf_packed_qkv_backpropagates(inplace):
    case = Case(B=2, S=5, Hq=3, Hk=2, D=10, inv_freq=theta_inv_freq(8), positions=np.array([3, 1, 4, 1, 5]),
                attention_factor=1.3, interleaved=True, with_k=True, dtype="float32", seed=14)
    leaf = torch.randn(2, 5, 7, 10, device="cuda", requires_grad=True)
    y = leaf * 2
    q, k = y[:, :, :3], y[:, :, 3:5]
    q_in, k_in = q.detach().cpu(), k.detach().cpu()
    out_q, out_k = apply(case, q, k, torch.from_numpy(case.positions).cuda(), inplace=inplace)
    wq, wk = torch.randn_like(out_q), torch.randn_like(out_k)
    torch.autograd.backward([out_q, out_k], [wq, wk])
    check_grads(case, (leaf.grad[:, :, :3] / 2).cpu(), (leaf.grad[:, :, 3:5] / 2).cpu(),
                wq.cpu(), wk.cpu(), q_in, k_in)
    assert torch.equal(leaf.grad[:, :, 5:], torch.zeros_like(leaf.grad[:, :, 5:]))
