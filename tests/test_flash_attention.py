"""Specification tests for the fused flash attention ops.

flash_attention(q, k, v, *, causal=False, window=(-1, -1), softmax_scale=None,
                softcap=0.0, alibi_slopes=None, return_lse=False, deterministic=False)
flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                       max_seqlen_k=None, **same options)
merge_states(outs, lses)

q (B, Sq, H, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv); query head h reads kv head
h // (H // Hkv). out (B, Sq, H, Dv); lse float32 (B, H, Sq) (varlen: (H, total_q)).
Query i sees key j iff i + Sk - Sq - left <= j <= i + Sk - Sq + right (bottom-right
aligned; -1 = unbounded; causal forces right = 0). Scores: s = scale q.k, capped
softcap*tanh(s/softcap), minus slope*|i + Sk - Sq - j| (ALiBi). A row with no visible
key gives out 0 and lse -inf. See tests/reference/attention.py for the float64
reference and the tolerance rule (FlashAttention's):

    max error <= 2 * (error of the textbook computation in the same dtype)
                 + FLOOR_RTOL[dtype] * scale
                 [+ RECOMPUTE_ULPS * u * recompute scale, for gradients]

FLOOR_RTOL: one rounding for float16/bfloat16, 1e-5 for float32, 1e-10 for float64.
scale: the same sums evaluated over |terms| (attention_error_scales), so that results
that cancel to ~0 are not held to an impossible absolute bound. Gradients add the
error of recomputing P from the saved lse (a few float32 roundings of each score,
weighted as the gradient weighs P), which the textbook computation does not make. The LSE (float32 for
every dtype) gets float32's floor relative to max(1, |lse|, |scores|); merges of
partial states of float64 inputs get float32's floor too, since the partial LSEs are
float32.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import library as op_lib  # noqa: E402
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st

import longattn
from reference.rope import CPU_DTYPES, NP_DTYPES, TORCH_DTYPES
from reference.attention import (
    NP_BFLOAT16,
    alibi_bias,
    assert_close_by_rule,
    assert_lse_matches,
    attention_grad_reference,
    attention_error_scales,
    attention_reference,
    attention_reference_varlen,
    attention_scores_reference,
    merge_reference,
    naive_attention_low_precision,
    numpy_to_torch,
    to_float64,
    to_numpy,
    visible_mask,
)

CUDA_DTYPES = ["float16", "bfloat16"]
D_CHOICES = [8, 16, 40, 64, 80, 128]
CUDA_D_CHOICES = [64, 128, 256]
S_CHOICES = [0, 1, 2, 63, 113]
BIG_S = 1023


# ----------------------------------------------------------------------------
# test cases
# ----------------------------------------------------------------------------
def standard_alibi_slopes(heads: int) -> np.ndarray:
    """Press et al.'s geometric slopes 2^(-8 (h+1) / H), float32."""
    return (2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)).astype(np.float32)


@dataclasses.dataclass
class Case:
    B: int
    Sq: int
    Sk: int
    H: int
    Hkv: int
    D: int
    Dv: int
    causal: bool
    window: tuple
    scale: float | None
    softcap: float
    alibi: str  # "none" | "h" | "bh"
    dtype: str
    amp: float  # amplitude of q and k: larger = peakier softmax
    seed: int

    def slopes(self):
        if self.alibi == "none":
            return None
        if self.alibi == "h":
            return standard_alibi_slopes(self.H)
        rng = np.random.default_rng(self.seed + 1)
        return rng.uniform(0.01, 1.0, size=(self.B, self.H)).astype(np.float32)

    def numpy_inputs(self):
        rng = np.random.default_rng(self.seed)
        dt = NP_DTYPES[self.dtype]
        q = (self.amp * rng.standard_normal((self.B, self.Sq, self.H, self.D))).astype(dt)
        k = (self.amp * rng.standard_normal((self.B, self.Sk, self.Hkv, self.D))).astype(dt)
        v = rng.standard_normal((self.B, self.Sk, self.Hkv, self.Dv)).astype(dt)
        return q, k, v

    def numpy_dout(self):
        rng = np.random.default_rng(self.seed + 2)
        return rng.standard_normal((self.B, self.Sq, self.H, self.Dv)).astype(NP_DTYPES[self.dtype])

    def torch_inputs(self, device="cpu", requires_grad=False):
        return tuple(fresh_torch(x, device).requires_grad_(requires_grad) for x in self.numpy_inputs())

    def torch_dout(self, device="cpu"):
        return fresh_torch(self.numpy_dout(), device)

    def kwargs(self, framework="torch", device="cpu"):
        slopes = self.slopes()
        if slopes is not None and framework == "torch":
            slopes = torch.from_numpy(slopes).to(device)
        return dict(causal=self.causal, window=self.window, softmax_scale=self.scale,
                    softcap=self.softcap, alibi_slopes=slopes)

    def ref_args(self):
        return dict(causal=self.causal, window=self.window, scale=self.scale, softcap=self.softcap,
                    alibi_slopes=self.slopes())

    def reference(self, q, k, v):
        return attention_reference(q, k, v, **self.ref_args())

    def grad_reference(self, q, k, v, dout, dlse=None):
        return attention_grad_reference(q, k, v, dout, **self.ref_args(), dlse=dlse)

    def naive(self, q, k, v):
        return naive_attention_low_precision(_detached(q), _detached(k), _detached(v), **self.ref_args(),
                                             dtype=TORCH_DTYPES[self.dtype])

    def naive_grads(self, q, k, v, dout, dlse=None):
        qn, kn, vn = (_detached(x).requires_grad_() for x in (q, k, v))
        out, lse = naive_attention_low_precision(qn, kn, vn, **self.ref_args(), dtype=TORCH_DTYPES[self.dtype])
        if dlse is None:
            out.backward(_detached(dout).to(out.dtype))
        else:
            torch.autograd.backward([out, lse], [_detached(dout).to(out.dtype), _detached(dlse).to(lse.dtype)])
        return qn.grad, kn.grad, vn.grad

    def error_scales(self, q, k, v, dout=None, dlse=None):
        return attention_error_scales(q, k, v, dout, **self.ref_args(), dlse=dlse)

    def max_abs_score(self, q, k):
        s, vis = attention_scores_reference(q, k, **self.ref_args())
        return float(np.max(np.abs(np.where(vis, s, 0.0)), initial=0.0))


def fresh_torch(x, device="cpu"):
    """NumPy array -> new contiguous torch tensor with torch's own strides (NumPy gives empty
    arrays all-zero strides; torch users do not have those)."""
    t = numpy_to_torch(np.asarray(x))
    return torch.empty(t.shape, dtype=t.dtype, device=device).copy_(t)


def _detached(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()
    return numpy_to_torch(np.asarray(x))


WINDOW_SIDE = st.one_of(st.sampled_from([-1, -1, 0, 1, 3, 17, 64]), st.integers(-1, 150))


@st.composite
def attention_cases(draw, dtypes=tuple(CPU_DTYPES), max_s=130, d_choices=tuple(D_CHOICES), max_d=130,
                    big=True, max_b=2):
    if big and draw(st.integers(0, 15)) == 0:
        # a long sequence, kept cheap with one small head
        B, H, Hkv = 1, 1, 1
        D = draw(st.sampled_from([8, 16]))
        Dv = draw(st.sampled_from([D, 8]))
        Sq = draw(st.sampled_from([BIG_S, 1, 113]))
        Sk = draw(st.sampled_from([BIG_S, 113])) if Sq != BIG_S else draw(st.sampled_from([BIG_S, 63]))
    else:
        B = draw(st.integers(1, max_b))
        Sq = draw(st.one_of(st.sampled_from([s for s in S_CHOICES if s <= max_s]), st.integers(0, max_s)))
        Sk = draw(st.one_of(st.just(Sq), st.sampled_from([s for s in S_CHOICES if s <= max_s]),
                            st.integers(0, max_s)))
        kind = draw(st.sampled_from(["mha", "gqa", "mqa"]))
        if kind == "mha":
            Hkv = draw(st.integers(1, 3))
            H = Hkv
        elif kind == "gqa":
            Hkv = draw(st.integers(1, 2))
            H = Hkv * draw(st.sampled_from([2, 4]))
        else:
            Hkv, H = 1, draw(st.sampled_from([2, 3, 4, 8]))
        D = draw(st.one_of(st.sampled_from(list(d_choices)), st.integers(1, max_d)))
        Dv = draw(st.one_of(st.just(D), st.sampled_from(list(d_choices))))
    causal = draw(st.booleans())
    window = (draw(WINDOW_SIDE), draw(WINDOW_SIDE))
    scale = draw(st.one_of(st.none(), st.sampled_from([0.125, 0.5, 1.0]), st.floats(0.02, 1.5)))
    softcap = draw(st.sampled_from([0.0, 0.0, 1.0, 5.0, 30.0]))
    alibi = draw(st.sampled_from(["none", "none", "h", "bh"]))
    return Case(B=B, Sq=Sq, Sk=Sk, H=H, Hkv=Hkv, D=D, Dv=Dv, causal=causal, window=window, scale=scale,
                softcap=softcap, alibi=alibi, dtype=draw(st.sampled_from(list(dtypes))),
                amp=draw(st.sampled_from([0.5, 1.0, 1.0, 3.0])), seed=draw(st.integers(0, 2**32 - 1)))


def _case(**kw):
    base = dict(B=2, Sq=113, Sk=113, H=8, Hkv=2, D=128, Dv=128, causal=True, window=(-1, -1), scale=None,
                softcap=0.0, alibi="none", dtype="bfloat16", amp=1.0, seed=0)
    base.update(kw)
    return Case(**base)


# Configurations the properties must always cover, whatever hypothesis draws.
KEY_CASES = [
    _case(),  # Llama-like: bf16, causal, GQA 4:1
    _case(dtype="float16", Sq=1, Sk=113, H=4, Hkv=4, D=64, Dv=64, alibi="bh"),  # decode step
    _case(dtype="float32", Sq=113, Sk=63, D=40, Dv=40, window=(3, -1), softcap=5.0, amp=3.0),  # empty top rows
    _case(dtype="float64", H=4, Hkv=1, D=80, Dv=40, causal=False, window=(17, 17), scale=0.3, alibi="h"),
    _case(dtype="float32", B=1, Sq=BIG_S, Sk=BIG_S, H=1, Hkv=1, D=16, Dv=8, window=(64, -1), softcap=30.0),
    _case(dtype="bfloat16", B=1, Sq=BIG_S, Sk=BIG_S, H=1, Hkv=1, D=8, Dv=8, causal=False, amp=3.0),
    _case(dtype="float32", Sq=63, Sk=0, H=2, Hkv=1, D=16, Dv=8),  # no keys at all
    _case(dtype="float16", Sq=0, Sk=63, H=2, Hkv=1, D=16, Dv=8),  # no queries
    _case(dtype="float32", Sq=63, Sk=2, H=4, Hkv=2, D=8, Dv=16, causal=False, window=(0, 0)),  # diagonal only
    _case(dtype="bfloat16", Sq=1, Sk=1, H=3, Hkv=1, D=5, Dv=3, causal=False, softcap=1.0, alibi="h"),
    # a last query tile of 2 rows (read in place, no GEMM) with Dv a single AVX2 column block
    _case(dtype="float32", B=1, Sq=130, Sk=130, H=2, Hkv=2, D=8, Dv=16, causal=False),
]


def with_examples(cases, **other_args):
    """Adds example(case=c, **other_args) for every c in cases."""
    def deco(test):
        for c in cases:
            test = example(case=c, **other_args)(test)
        return test
    return deco


with_key_cases = with_examples(KEY_CASES)


def call(case, q, k, v, framework="torch", device="cpu", **extra):
    """flash_attention(..., return_lse=True), checking the result is an (out, lse) pair."""
    res = longattn.flash_attention(q, k, v, **case.kwargs(framework, device), return_lse=True, **extra)
    assert isinstance(res, tuple) and len(res) == 2, type(res)
    return res


def check_forward(case, out, lse, q, k, v):
    """out/lse (any device/framework) vs the float64 reference of the inputs q, k, v."""
    ref_out, ref_lse = case.reference(q, k, v)
    n_out, n_lse = case.naive(q, k, v)
    assert tuple(out.shape) == (case.B, case.Sq, case.H, case.Dv)
    assert tuple(lse.shape) == (case.B, case.H, case.Sq)
    assert str(lse.dtype).endswith("float32"), lse.dtype
    out64 = to_float64(out)
    empty = np.isneginf(ref_lse)  # (B, H, Sq)
    empty_rows = empty.transpose(0, 2, 1)  # (B, Sq, H)
    assert np.all(out64[empty_rows] == 0), "rows without a visible key must be exactly 0"
    assert_close_by_rule(out, ref_out, n_out, what="out", magnitude=case.error_scales(q, k, v)["out"])
    assert_lse_matches(lse, ref_lse, n_lse, magnitude=case.max_abs_score(q, k))


def check_grads(case, grads, q, k, v, dout, dlse=None):
    """grads (dq, dk, dv) vs the analytic float64 gradients of the inputs."""
    refs = case.grad_reference(q, k, v, dout, dlse)
    naive = case.naive_grads(q, k, v, dout, dlse)
    scales = case.error_scales(q, k, v, dout, dlse)
    for name, g, r, n, x in zip(("dq", "dk", "dv"), grads, refs, naive, (q, k, v)):
        assert g is not None, f"{name} is None"
        assert tuple(g.shape) == tuple(x.shape) and g.dtype == x.dtype, (name, g.shape, g.dtype)
        assert_close_by_rule(g, r, n, what=name, magnitude=scales[name], recompute=scales[name + "_recompute"])


# ----------------------------------------------------------------------------
# the reference itself (guards the oracle)
# ----------------------------------------------------------------------------
def _torch_visible(sq, sk, causal, window):
    """The mask from torch's own definitions: causal_lower_right and tril/triu diagonals."""
    from torch.nn.attention.bias import causal_lower_right

    vis = torch.ones(sq, sk, dtype=torch.bool)
    if causal and sq and sk:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vis &= causal_lower_right(sq, sk)._materialize("cpu")
    left, right = window
    if right != -1:
        vis &= torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq + right)
    if left != -1:
        vis &= torch.ones(sq, sk, dtype=torch.bool).triu(sk - sq - left)
    return vis


def _torch_sdpa(case, q, k, v):
    """torch SDPA (float64, math) with the softcap correction, ALiBi and the mask as an
    explicit float mask; differentiable in q, k, v. Returns (out (B,Sq,H,Dv), mask, vis)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    g = H // k.shape[2]
    sc = 1 / math.sqrt(D) if case.scale is None else case.scale
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    vis = _torch_visible(Sq, Sk, case.causal, case.window)
    bias = torch.zeros(B, H, Sq, Sk, dtype=torch.float64)
    if case.softcap:
        raw = sc * qt @ kt.repeat_interleave(g, 1).transpose(-1, -2)
        bias = bias + (case.softcap * torch.tanh(raw / case.softcap) - raw)
    slopes = case.slopes()
    if slopes is not None:
        s = torch.from_numpy(slopes).double().expand(B, H)
        rel = (torch.arange(Sk)[None, :] - torch.arange(Sq)[:, None] - (Sk - Sq)).abs().double()
        bias = bias - s[:, :, None, None] * rel
    mask = bias.masked_fill(~vis, float("-inf"))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=sc, enable_gqa=True)
    return out.transpose(1, 2), mask, vis


SMALL_F64 = dict(dtypes=("float64",), max_s=24, d_choices=(1, 4, 8), max_d=8, big=False)


@given(case=attention_cases(**SMALL_F64))
def test_reference_equals_torch_sdpa_with_an_explicit_mask_in_float64(case):
    q, k, v = (numpy_to_torch(x) for x in case.numpy_inputs())
    want, mask, vis = _torch_sdpa(case, q, k, v)
    out, lse = case.reference(q, k, v)
    rows = vis.any(-1).numpy()  # (Sq,) rows with a visible key
    assert np.all(out[:, ~rows] == 0) and np.all(np.isneginf(lse[..., ~rows]))
    assert not np.any(np.isneginf(lse[..., rows]))
    np.testing.assert_allclose(out[:, rows], want.numpy()[:, rows], rtol=0, atol=1e-12)
    if rows.any() and case.Dv <= case.D:
        # torch's CPU flash kernel returns the LSE; pad v to D (it wants equal head sizes)
        g = case.H // case.Hkv
        sc = 1 / math.sqrt(case.D) if case.scale is None else case.scale
        _, lse_t = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2),
            F.pad(v, (0, case.D - case.Dv)).repeat_interleave(g, 2).transpose(1, 2),
            attn_mask=mask, scale=sc)[:2]
        np.testing.assert_allclose(lse[..., rows], lse_t.numpy()[..., rows], rtol=0, atol=1e-12)


@given(case=attention_cases(**SMALL_F64), with_dlse=st.booleans())
def test_reference_gradients_equal_torch_autograd_in_float64(case, with_dlse):
    q, k, v = (numpy_to_torch(x).requires_grad_() for x in case.numpy_inputs())
    dout = case.numpy_dout()
    out, mask, vis = _torch_sdpa(case, q, k, v)
    rows = vis.any(-1)
    out = torch.where(rows[None, :, None, None], out, torch.zeros_like(out))  # SDPA: NaN on empty rows
    dlse = np.random.default_rng(case.seed + 3).standard_normal((case.B, case.H, case.Sq)) if with_dlse else None
    outputs, grads_in = [out], [torch.from_numpy(dout)]
    if with_dlse and rows.any():  # mask holds the softcap correction, ALiBi and -inf
        outputs.append(torch.logsumexp((_scores_torch(case, q, k) + mask)[..., rows, :], dim=-1))
        grads_in.append(torch.from_numpy(dlse)[..., rows])
    got = torch.autograd.grad(outputs, (q, k, v), grads_in, allow_unused=True)
    want = attention_grad_reference(q.detach(), k.detach(), v.detach(), dout, **case.ref_args(),
                                    dlse=dlse)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        g = np.zeros_like(w) if g is None else g.numpy()
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-11, err_msg=name)


def _scores_torch(case, q, k):
    """Scaled (unbiased, uncapped) scores; the softcap/ALiBi/mask corrections live in the mask."""
    sc = 1 / math.sqrt(case.D) if case.scale is None else case.scale
    g = case.H // case.Hkv
    return sc * q.transpose(1, 2) @ k.repeat_interleave(g, 2).transpose(1, 2).transpose(-1, -2)


@pytest.mark.parametrize("sq,sk", [(1, 1), (3, 7), (7, 3), (5, 5), (1, 9), (9, 1), (4, 0), (0, 4)])
@pytest.mark.parametrize("window", [(-1, -1), (2, -1), (-1, 1), (0, 0), (3, 5)])
def test_reference_mask_is_bottom_right_aligned_like_torchs_causal_lower_right(sq, sk, window):
    for causal in (False, True):
        want = _torch_visible(sq, sk, causal, window).numpy()
        assert np.array_equal(visible_mask(sq, sk, causal, window), want)


def test_reference_alibi_is_minus_slope_times_distance_to_the_diagonal():
    bias = alibi_bias(np.array([0.5, 0.25], np.float32), 1, 2, 2, 4)
    # query 0 sits on key 2, query 1 on key 3
    np.testing.assert_array_equal(bias[0, 0], -0.5 * np.array([[2, 1, 0, 1], [3, 2, 1, 0]]))
    np.testing.assert_array_equal(bias[0, 1], -0.25 * np.array([[2, 1, 0, 1], [3, 2, 1, 0]]))


@given(case=attention_cases(**SMALL_F64))
def test_naive_baseline_in_float64_computes_the_reference_function(case):
    q, k, v = case.numpy_inputs()
    out, lse = case.reference(q, k, v)
    n_out, n_lse = case.naive(q, k, v)
    np.testing.assert_allclose(n_out.numpy(), out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(n_lse.numpy(), lse, rtol=0, atol=1e-12)
    dout = case.numpy_dout()
    for g, w in zip(case.naive_grads(q, k, v, dout), case.grad_reference(q, k, v, dout)):
        np.testing.assert_allclose(g.numpy(), w, rtol=0, atol=1e-11)


@given(case=attention_cases(**SMALL_F64), parts=st.integers(1, 4), data=st.data())
def test_merge_reference_of_a_key_partition_equals_the_reference_over_all_keys(case, parts, data):
    q, k, v = case.numpy_inputs()
    assign = np.array(data.draw(st.lists(st.integers(0, parts - 1), min_size=case.Sk, max_size=case.Sk)), int)
    states = [attention_reference(q, k, v, **case.ref_args(), extra_mask=(assign == n)) for n in range(parts)]
    out, lse = merge_reference([s[0] for s in states], [s[1] for s in states])
    want_out, want_lse = case.reference(q, k, v)
    np.testing.assert_allclose(out, want_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=1e-12)  # equal -infs compare equal


# ----------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------
@with_key_cases
@given(case=attention_cases())
def test_output_and_lse_match_the_float64_reference(case):
    q, k, v = case.torch_inputs()
    before = [x.clone() for x in (q, k, v)]
    out, lse = call(case, q, k, v)
    assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
    assert out.dtype == q.dtype and out.device == q.device
    for x, x0 in zip((q, k, v), before):
        assert torch.equal(x, x0), "inputs must not be modified"
    check_forward(case, out, lse, q, k, v)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("profile", ["rising", "falling", "spikes", "first_block_low"])
@pytest.mark.parametrize("causal", [False, True])
def test_scores_that_jump_past_the_running_maximum_match_the_reference(dtype, profile, causal):
    """The CPU forward exponentiates a tile's scores against a stale row maximum while they
    stay within a margin of it, and switches to the full online-softmax step per column
    block once one jumps past. Drive every switch: scores rising by 3 per 16 keys (each
    column block of each tile passes the margin), falling, isolated spikes of +20 and +120
    inside tiles (+120 would overflow float32's exp against a stale maximum), and a first
    column block far below the rest of its tile."""
    rng = np.random.default_rng(7)
    B, S, H, D = 1, 300, 2, 16
    q = np.zeros((B, S, H, D))
    q[..., 0] = 1.0
    q[..., 1:] = 0.1 * rng.standard_normal((B, S, H, D - 1))
    k = 0.1 * rng.standard_normal((B, S, H, D))
    j = np.arange(S)
    if profile == "rising":
        lead = 3.0 * (j // 16)
    elif profile == "falling":
        lead = 3.0 * ((S - j) // 16)
    elif profile == "spikes":
        lead = np.where(j % 128 == 77, 20.0, 0.0) + np.where(j % 128 == 200 % 128, 120.0, 0.0)
    else:
        lead = np.where(j % 128 < 16, -40.0, 0.0)
    k[..., 0] = (lead * math.sqrt(D))[None, :, None]  # score = lead + noise after the 1/sqrt(D) scale
    v = rng.standard_normal((B, S, H, D))
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    out, lse = longattn.flash_attention(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = attention_reference(q, k, v, causal=causal)
    tol = 2e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=tol * max(1.0, np.abs(ref_out).max()))
    np.testing.assert_allclose(lse, ref_lse, rtol=5e-7, atol=2e-6)  # lse is float32 for every dtype


@given(case=attention_cases(max_s=64, big=False))
def test_return_lse_false_returns_the_same_output_alone(case):
    q, k, v = case.torch_inputs()
    out, _ = call(case, q, k, v)
    alone = longattn.flash_attention(q, k, v, **case.kwargs())
    assert isinstance(alone, torch.Tensor)
    assert torch.equal(alone, out)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("sq,sk,causal,window", [
    (9, 4, True, (-1, -1)),  # queries 0..4 are above the diagonal
    (9, 4, False, (0, 0)),  # diagonal only: the same rows
    (5, 5, False, (-1, -1)),  # control: nothing empty
    (5, 0, False, (-1, -1)),  # no keys
    (1, 0, True, (-1, -1)),
])
def test_rows_without_a_visible_key_are_exactly_zero_with_lse_minus_inf(dtype, sq, sk, causal, window):
    case = _case(B=2, Sq=sq, Sk=sk, H=2, Hkv=1, D=8, Dv=8, causal=causal, window=window, dtype=dtype, seed=4)
    q, k, v = case.torch_inputs()
    out, lse = call(case, q, k, v)
    empty = np.arange(sq) + sk - sq < 0 if (causal or window[1] == 0) else np.zeros(sq, bool)
    if sk == 0:
        empty[:] = True
    assert torch.all(torch.isneginf(lse[..., torch.from_numpy(empty)]))
    assert torch.all(torch.isfinite(lse[..., torch.from_numpy(~empty)]))
    assert torch.all(out[:, torch.from_numpy(empty)] == 0)
    check_forward(case, out, lse, q, k, v)


@given(case=attention_cases(max_s=64, big=False, dtypes=("float32",)))
def test_window_wider_than_the_sequences_equals_no_window(case):
    q, k, v = case.torch_inputs()
    wide = max(case.Sq, case.Sk) + 5
    a, la = call(dataclasses.replace(case, window=(-1, -1)), q, k, v)
    b, lb = call(dataclasses.replace(case, window=(wide, wide)), q, k, v)
    assert torch.equal(a, b) and torch.equal(la, lb)


@given(case=attention_cases(max_s=64, big=False, dtypes=("float32", "bfloat16")))
def test_causal_equals_a_window_with_right_zero_and_combines_by_taking_the_minimum(case):
    q, k, v = case.torch_inputs()
    left = case.window[0]
    a = call(dataclasses.replace(case, causal=True, window=(left, case.window[1])), q, k, v)
    b = call(dataclasses.replace(case, causal=False, window=(left, 0)), q, k, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------
GRAD_KEY_CASES = [
    _case(dtype="float32", Sq=63, Sk=113, softcap=5.0, alibi="bh", window=(17, -1), amp=3.0),
    _case(dtype="bfloat16", H=4, Hkv=1, D=64, Dv=80),
    _case(dtype="float16", Sq=113, Sk=63, H=4, Hkv=2, D=40, Dv=40, window=(3, 2), alibi="h"),
    _case(dtype="float64", Sq=33, Sk=17, H=2, Hkv=1, D=8, Dv=5, causal=False, softcap=1.0, scale=0.7),
    _case(dtype="float32", B=1, Sq=BIG_S, Sk=BIG_S, H=1, Hkv=1, D=16, Dv=16, window=(100, 0)),
    _case(dtype="float32", Sq=20, Sk=0, H=2, Hkv=1, D=8, Dv=8),
    _case(dtype="bfloat16", Sq=9, Sk=4, H=2, Hkv=1, D=16, Dv=8),  # empty rows
]


@with_examples([c for c in KEY_CASES + GRAD_KEY_CASES if c.dtype != "float64"], use_lse=False)
@given(case=attention_cases(dtypes=("float32", "float16", "bfloat16"), max_s=100), use_lse=st.booleans())
def test_gradients_match_the_analytic_float64_reference(case, use_lse):
    _check_backward(case, use_lse)


@with_examples([c for c in KEY_CASES + GRAD_KEY_CASES if c.dtype == "float64"], use_lse=False)
@given(case=attention_cases(dtypes=("float64",), max_s=100), use_lse=st.booleans())
def test_float64_gradients_are_float64_accurate(case, use_lse):
    """The float64 path is the one gradcheck relies on: its gradients must be float64
    accurate (1e-10 of the term scale), not merely float32 accurate."""
    _check_backward(case, use_lse)


def _check_backward(case, use_lse):
    q, k, v = case.torch_inputs(requires_grad=True)
    dout = case.torch_dout()
    if use_lse:  # returning the LSE does not change the gradient of out
        out, _ = call(case, q, k, v)
    else:
        out = longattn.flash_attention(q, k, v, **case.kwargs())
    out.backward(dout)
    check_grads(case, (q.grad, k.grad, v.grad), q.detach(), k.detach(), v.detach(), dout)


@example(case=_case(dtype="float32", Sq=40, Sk=17, H=4, Hkv=2, D=16, Dv=8, softcap=5.0, alibi="bh"))
@given(case=attention_cases(dtypes=("float32", "float16", "bfloat16"), max_s=64, big=False))
def test_lse_is_differentiable_and_its_gradient_matches_the_reference(case):
    """d lse_i / d s_ij = P_ij: a gradient on the LSE adds P * dlse to dS (rows without a
    visible key take none)."""
    q, k, v = case.torch_inputs(requires_grad=True)
    out, lse = call(case, q, k, v)
    dout = case.torch_dout()
    dlse = torch.from_numpy(np.random.default_rng(case.seed + 3).standard_normal(lse.shape).astype(np.float32))
    torch.autograd.backward([out, lse], [dout, dlse])
    check_grads(case, (q.grad, k.grad, v.grad), q.detach(), k.detach(), v.detach(), dout, dlse)


GRADCHECK_OPTIONS = {
    "plain": dict(),
    "causal_gqa": dict(causal=True),
    "causal_sq_gt_sk": dict(causal=True, sq=6),  # rows without keys: zero gradient
    "window": dict(window=(1, 2)),
    "window_causal": dict(window=(2, -1), causal=True),
    "softcap": dict(softcap=0.8, scale=1.3),
    "alibi_h": dict(alibi=np.array([0.5, 0.125], np.float32), causal=True),
    "alibi_bh_softcap": dict(alibi=np.array([[0.3, 0.9], [0.05, 0.6]], np.float32), softcap=2.0),
}


@pytest.mark.parametrize("name", list(GRADCHECK_OPTIONS))
def test_gradcheck_float64(name):
    opt = dict(GRADCHECK_OPTIONS[name])
    sq = opt.pop("sq", 3)
    alibi = opt.pop("alibi", None)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, sq, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 4, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 4, 1, 3, dtype=torch.float64, generator=g, requires_grad=True)
    kw = dict(causal=opt.get("causal", False), window=opt.get("window", (-1, -1)),
              softmax_scale=opt.get("scale"), softcap=opt.get("softcap", 0.0),
              alibi_slopes=None if alibi is None else torch.from_numpy(alibi))

    def f(q_, k_, v_):
        return longattn.flash_attention(q_, k_, v_, **kw)

    assert torch.autograd.gradcheck(f, (q, k, v))


DETERMINISTIC_CASES = [
    _case(dtype="float32", B=2, Sq=200, Sk=300, H=4, Hkv=1, D=64, Dv=64, causal=False, seed=6),
    _case(dtype="bfloat16", B=1, Sq=300, Sk=300, H=4, Hkv=2, D=80, Dv=40, window=(64, -1), softcap=5.0,
          alibi="h", seed=7),
]


@pytest.mark.parametrize("case", DETERMINISTIC_CASES, ids=["float32_mqa", "bf16_gqa_window_softcap_alibi"])
def test_deterministic_backward_is_bitwise_reproducible(case):
    q, k, v = case.torch_inputs()
    dout = case.torch_dout()
    runs = []
    for _ in range(3):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = longattn.flash_attention(qq, kk, vv, **case.kwargs(), deterministic=True)
        out.backward(dout)
        runs.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for other in runs[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), runs[0], other):
            assert torch.equal(_bits(a), _bits(b)), f"{name} differs between deterministic runs"
    check_grads(case, runs[0][1:], q, k, v, dout)


def _bits(x):
    return x.detach().contiguous().view(torch.uint8)


def _strided_views(case, layout):
    """q, k, v as views with a contiguous last dim but other strides, holding case's values."""
    q, k, v = case.torch_inputs()
    g = torch.Generator().manual_seed(case.seed % 2**31)

    def noise(*shape):
        return torch.randn(*shape, generator=g).to(q.dtype)

    if layout == "packed_qkv" and case.Sq == case.Sk and case.D == case.Dv:
        buf = noise(case.B, case.Sq, case.H + 2 * case.Hkv, case.D)
        views = buf[:, :, :case.H], buf[:, :, case.H:case.H + case.Hkv], buf[:, :, case.H + case.Hkv:]
    elif layout in ("packed_qkv", "bhsd_transposed"):  # (B, H, S, D) storage seen as (B, S, H, D)
        views = (noise(case.B, case.H, case.Sq, case.D).transpose(1, 2),
                 noise(case.B, case.Hkv, case.Sk, case.D).transpose(1, 2),
                 noise(case.B, case.Hkv, case.Sk, case.Dv).transpose(1, 2))
    else:  # a slice of a wider last dim
        views = (noise(case.B, case.Sq, case.H, case.D + 3)[..., 1:1 + case.D],
                 noise(case.B, case.Sk, case.Hkv, case.D + 5)[..., 2:2 + case.D],
                 noise(case.B, case.Sk, case.Hkv, case.Dv + 1)[..., 1:])
    for view, x in zip(views, (q, k, v)):
        view.copy_(x)
        assert view.stride(-1) == 1
    return views, (q, k, v)


@pytest.mark.parametrize("layout", ["packed_qkv", "bhsd_transposed", "padded_last_dim"])
@given(case=attention_cases(max_s=64, big=False))
def test_strided_views_with_a_contiguous_last_dim_give_the_contiguous_result(layout, case):
    views, contiguous = _strided_views(case, layout)
    dout = case.torch_dout()
    results = []
    for xs in (views, contiguous):
        xs = [x.detach().requires_grad_() for x in xs]
        out, lse = call(case, *xs)
        out.backward(dout)
        results.append([out.detach(), lse] + [x.grad for x in xs])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(_bits(a), _bits(b)), f"{name} differs between the strided and the contiguous inputs"


# ----------------------------------------------------------------------------
# variable length (packed)
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class VarlenCase:
    case: Case  # options, heads, dims, dtype (B, Sq, Sk unused)
    lens_q: list
    lens_k: list

    @property
    def cu_q(self):
        return np.concatenate([[0], np.cumsum(self.lens_q)]).astype(np.int32)

    @property
    def cu_k(self):
        return np.concatenate([[0], np.cumsum(self.lens_k)]).astype(np.int32)

    def numpy_inputs(self):
        c = self.case
        rng = np.random.default_rng(c.seed)
        dt = NP_DTYPES[c.dtype]
        tq, tk = int(sum(self.lens_q)), int(sum(self.lens_k))
        q = (c.amp * rng.standard_normal((tq, c.H, c.D))).astype(dt)
        k = (c.amp * rng.standard_normal((tk, c.Hkv, c.D))).astype(dt)
        v = rng.standard_normal((tk, c.Hkv, c.Dv)).astype(dt)
        return q, k, v

    def torch_inputs(self, device="cpu", requires_grad=False):
        return tuple(fresh_torch(x, device).requires_grad_(requires_grad) for x in self.numpy_inputs())

    def slopes(self):
        return self.case.slopes()

    def seq_slopes(self, b, slopes):
        """slopes for a per-sequence call of sequence b: (H,) or row b of (batch, H)."""
        if slopes is None or slopes.ndim == 1:
            return slopes
        return slopes[b]


@st.composite
def varlen_cases(draw, dtypes=tuple(CPU_DTYPES), max_len=70, d_choices=tuple(D_CHOICES)):
    batch = draw(st.integers(1, 4))
    lens = st.one_of(st.sampled_from([0, 1, 2, 63]), st.integers(0, max_len))
    lens_q = draw(st.lists(lens, min_size=batch, max_size=batch))
    lens_k = draw(st.one_of(st.just(list(lens_q)), st.lists(lens, min_size=batch, max_size=batch)))
    case = draw(attention_cases(dtypes=dtypes, max_s=8, d_choices=d_choices, max_d=130, big=False))
    case = dataclasses.replace(case, B=batch)  # (batch, H) ALiBi slopes
    return VarlenCase(case, lens_q, lens_k)


def call_varlen(vc, q, k, v, cu_q, cu_k, framework="torch", device="cpu", **extra):
    res = longattn.flash_attention_varlen(q, k, v, cu_q, cu_k, **vc.case.kwargs(framework, device),
                                          return_lse=True, **extra)
    assert isinstance(res, tuple) and len(res) == 2
    return res


@example(vc=VarlenCase(_case(dtype="bfloat16", H=4, Hkv=2, D=64, Dv=64, B=3, alibi="bh"), [63, 1, 40], [63, 70, 0]),
         give_max=False)
@example(vc=VarlenCase(_case(dtype="float32", H=2, Hkv=1, D=16, Dv=8, B=3, window=(2, 0), causal=False),
                       [5, 0, 9], [3, 4, 9]), give_max=True)
@given(vc=varlen_cases(), give_max=st.booleans())
def test_varlen_equals_per_sequence_calls_and_the_reference(vc, give_max):
    q, k, v = vc.torch_inputs()
    cu_q, cu_k = torch.from_numpy(vc.cu_q), torch.from_numpy(vc.cu_k)
    extra = {}
    if give_max:
        extra = dict(max_seqlen_q=max(vc.lens_q), max_seqlen_k=max(vc.lens_k))
    out, lse = call_varlen(vc, q, k, v, cu_q, cu_k, **extra)
    c = vc.case
    assert tuple(out.shape) == (q.shape[0], c.H, c.Dv) and out.dtype == q.dtype
    assert tuple(lse.shape) == (c.H, q.shape[0]) and lse.dtype == torch.float32
    slopes = vc.slopes()
    for b in range(len(vc.lens_q)):
        qs = slice(int(vc.cu_q[b]), int(vc.cu_q[b + 1]))
        ks = slice(int(vc.cu_k[b]), int(vc.cu_k[b + 1]))
        s = vc.seq_slopes(b, slopes)
        kw = dict(c.kwargs(), alibi_slopes=None if s is None else torch.from_numpy(np.ascontiguousarray(s)))
        o_b, l_b = longattn.flash_attention(q[None, qs], k[None, ks], v[None, ks], **kw, return_lse=True)
        assert torch.equal(out[qs], o_b[0]), f"sequence {b}: out differs from the per-sequence call"
        assert torch.equal(lse[:, qs], l_b[0]), f"sequence {b}: lse differs from the per-sequence call"
    ref_out, ref_lse = attention_reference_varlen(q, k, v, vc.cu_q, vc.cu_k, **c.ref_args())
    n_out, n_lse = _naive_varlen(vc, q, k, v)
    assert_close_by_rule(out, ref_out, n_out, what="out")
    assert_lse_matches(lse, ref_lse, n_lse, magnitude=_varlen_max_abs_score(vc, q, k))


def _varlen_max_abs_score(vc, q, k):
    slopes = vc.slopes()
    best = 0.0
    for b in range(len(vc.lens_q)):
        qs = slice(int(vc.cu_q[b]), int(vc.cu_q[b + 1]))
        ks = slice(int(vc.cu_k[b]), int(vc.cu_k[b + 1]))
        args = dict(vc.case.ref_args(), alibi_slopes=vc.seq_slopes(b, slopes))
        s, vis = attention_scores_reference(to_float64(q)[None, qs], to_float64(k)[None, ks], **args)
        best = max(best, float(np.max(np.abs(np.where(vis, s, 0.0)), initial=0.0)))
    return best


def _naive_varlen(vc, q, k, v, dout=None):
    """The textbook low-precision computation per sequence, packed again; with dout, its gradients."""
    c = vc.case
    qn, kn, vn = (_detached(x).requires_grad_(dout is not None) for x in (q, k, v))
    slopes = vc.slopes()
    outs, lses = [], []
    for b in range(len(vc.lens_q)):
        qs = slice(int(vc.cu_q[b]), int(vc.cu_q[b + 1]))
        ks = slice(int(vc.cu_k[b]), int(vc.cu_k[b + 1]))
        args = dict(c.ref_args(), alibi_slopes=vc.seq_slopes(b, slopes))
        o, l_ = naive_attention_low_precision(qn[None, qs], kn[None, ks], vn[None, ks], **args,
                                              dtype=TORCH_DTYPES[c.dtype])
        outs.append(o[0])
        lses.append(l_[0])
    out = torch.cat(outs) if outs else None
    lse = torch.cat(lses, dim=1)
    if dout is None:
        return out.detach(), lse.detach()
    out.backward(_detached(dout).to(out.dtype))
    return qn.grad, kn.grad, vn.grad


def _varlen_grad_reference(vc, q, k, v, dout):
    """(dq, dk, dv) float64 per sequence, packed, and the error scales (max over sequences)."""
    c = vc.case
    q64, k64, v64, do64 = (to_float64(x) for x in (q, k, v, dout))
    dq, dk, dv = np.zeros_like(q64), np.zeros_like(k64), np.zeros_like(v64)
    scales = {n: 0.0 for n in ("dq", "dk", "dv", "dq_recompute", "dk_recompute", "dv_recompute")}
    slopes = vc.slopes()
    for b in range(len(vc.lens_q)):
        qs = slice(int(vc.cu_q[b]), int(vc.cu_q[b + 1]))
        ks = slice(int(vc.cu_k[b]), int(vc.cu_k[b + 1]))
        args = dict(c.ref_args(), alibi_slopes=vc.seq_slopes(b, slopes))
        seq = (q64[None, qs], k64[None, ks], v64[None, ks], do64[None, qs])
        g = attention_grad_reference(*seq, **args)
        dq[qs], dk[ks], dv[ks] = g[0][0], g[1][0], g[2][0]
        sc = attention_error_scales(*seq, **args)
        scales = {n: max(scales[n], sc[n]) for n in scales}
    return (dq, dk, dv), scales


# float32, a peaked softmax over scores of ~76: P ~ 1 recomputed from lse (see
# attention_error_scales' recompute term).
@example(vc=VarlenCase(_case(dtype="float32", H=1, Hkv=1, D=80, Dv=80, B=4, causal=False, scale=0.5, amp=3.0,
                             seed=1), [0, 0, 2, 2], [0, 0, 2, 2]))
@given(vc=varlen_cases(dtypes=("float32", "bfloat16", "float16"), max_len=50))
def test_varlen_gradients_match_the_per_sequence_reference(vc):
    q, k, v = vc.torch_inputs(requires_grad=True)
    out = longattn.flash_attention_varlen(q, k, v, torch.from_numpy(vc.cu_q), torch.from_numpy(vc.cu_k),
                                          **vc.case.kwargs())
    dout = torch.from_numpy(np.random.default_rng(vc.case.seed + 2).standard_normal(out.shape)).to(out.dtype)
    out.backward(dout)
    refs, scales = _varlen_grad_reference(vc, q.detach(), k.detach(), v.detach(), dout)
    naive = _naive_varlen(vc, q.detach(), k.detach(), v.detach(), dout)
    for name, g, r, n in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), refs, naive):
        assert g is not None and g.dtype == q.dtype
        assert_close_by_rule(g, r, n, what=name, magnitude=scales[name], recompute=scales[name + "_recompute"])


def _varlen_inputs():
    rng = np.random.default_rng(8)
    q = torch.from_numpy(rng.standard_normal((10, 2, 8)).astype(np.float32))
    k = torch.from_numpy(rng.standard_normal((12, 1, 8)).astype(np.float32))
    v = torch.from_numpy(rng.standard_normal((12, 1, 8)).astype(np.float32))
    return q, k, v


GOOD_CU_Q = [0, 4, 10]
GOOD_CU_K = [0, 5, 12]
BAD_CU_SEQLENS = {
    "does_not_start_at_zero": [1, 4, 10],
    "decreasing": [0, 6, 4, 10],
    "last_short_of_total": [0, 4, 9],
    "last_past_total": [0, 4, 11],
    "negative": [0, -1, 10],
    "two_dimensional": [[0, 4, 10]],
    "empty": [],
}


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
@pytest.mark.parametrize("bad", list(BAD_CU_SEQLENS))
def test_varlen_rejects_bad_cu_seqlens_with_a_value_error_naming_it(which, bad):
    q, k, v = _varlen_inputs()
    cu = {"cu_seqlens_q": torch.tensor(GOOD_CU_Q, dtype=torch.int32),
          "cu_seqlens_k": torch.tensor(GOOD_CU_K, dtype=torch.int32)}
    bad_vals = list(BAD_CU_SEQLENS[bad])
    if which == "cu_seqlens_k" and bad in ("last_short_of_total", "last_past_total"):
        bad_vals = [0, 5, 11] if bad == "last_short_of_total" else [0, 5, 13]
    other = cu["cu_seqlens_k" if which == "cu_seqlens_q" else "cu_seqlens_q"]
    if bad == "decreasing":  # keep the batch sizes equal so only the order is wrong
        other = torch.tensor([0, 1, 2, other[-1].item()], dtype=torch.int32)
    cu[which] = torch.tensor(bad_vals, dtype=torch.int32)
    cu["cu_seqlens_k" if which == "cu_seqlens_q" else "cu_seqlens_q"] = other
    before = [x.clone() for x in (q, k, v)]
    with pytest.raises(ValueError) as info:
        longattn.flash_attention_varlen(q, k, v, cu["cu_seqlens_q"], cu["cu_seqlens_k"])
    assert re.search(rf"\b{which}\b", str(info.value)), f"message does not name {which}: {info.value}"
    for x, x0 in zip((q, k, v), before):
        assert torch.equal(x, x0)


def test_varlen_rejects_cu_seqlens_of_different_batch_sizes():
    q, k, v = _varlen_inputs()
    with pytest.raises(ValueError, match=r"cu_seqlens_(q|k)"):
        longattn.flash_attention_varlen(q, k, v, torch.tensor([0, 10], dtype=torch.int32),
                                        torch.tensor(GOOD_CU_K, dtype=torch.int32))


def test_varlen_rejects_alibi_slopes_of_the_wrong_batch():
    q, k, v = _varlen_inputs()
    with pytest.raises(ValueError, match=r"\balibi_slopes\b"):
        longattn.flash_attention_varlen(q, k, v, torch.tensor(GOOD_CU_Q, dtype=torch.int32),
                                        torch.tensor(GOOD_CU_K, dtype=torch.int32),
                                        alibi_slopes=torch.ones(3, 2))


# ----------------------------------------------------------------------------
# merge_states
# ----------------------------------------------------------------------------
def _merge_tolerance_check(out, lse, ref_out, ref_lse, outs, lses, what):
    """Merged states are convex combinations: the error is a few float32 roundings of the
    weights exp(lse_n - lse) plus one rounding of the output dtype."""
    fin = [to_float64(x)[np.isfinite(to_float64(x))] for x in lses]
    lmax = max([float(np.max(np.abs(f))) for f in fin if f.size] + [0.0])
    mag = max([float(np.max(np.abs(to_float64(o)), initial=0.0)) for o in outs] + [0.0])
    name = str(out.dtype).replace("torch.", "")
    ulp = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}.get(name, 0.0)
    rtol = ulp + 4e-6 * (1.0 + lmax)
    mag = mag if mag > 0 else 1.0
    ro = np.asarray(ref_out)
    err = float(np.max(np.abs(to_float64(out) - ro), initial=0.0))
    assert err <= rtol * mag, f"{what} out: error {err:.3g} > {rtol * mag:.3g}"
    g = to_float64(lse)
    assert str(lse.dtype).endswith("float32"), lse.dtype
    assert np.array_equal(np.isneginf(g), np.isneginf(ref_lse)), f"{what}: -inf rows differ"
    f = np.isfinite(ref_lse)
    lerr = float(np.max(np.abs(g[f] - ref_lse[f]), initial=0.0))
    assert lerr <= 4e-6 * (1.0 + lmax), f"{what} lse: error {lerr:.3g}"
    empty = np.isneginf(ref_lse).transpose(0, 2, 1)  # (B, S, H)
    assert np.all(to_float64(out)[empty] == 0), f"{what}: rows with all lse = -inf must be 0"


@given(case=attention_cases(max_s=64, big=False), parts=st.integers(1, 4), data=st.data())
def test_merge_states_of_partial_states_over_a_key_partition_equals_attention_over_all_keys(case, parts, data):
    """Partial states from the reference over a random partition of the keys (empty parts and
    rows without keys in a part included); merge_states must equal merge_reference of the same
    (rounded) inputs, and hence attention over the union."""
    q, k, v = case.numpy_inputs()
    assign = np.array(data.draw(st.lists(st.integers(0, parts - 1), min_size=case.Sk, max_size=case.Sk)), int)
    outs, lses = [], []
    for n in range(parts):
        o, l_ = attention_reference(q, k, v, **case.ref_args(), extra_mask=(assign == n))
        outs.append(numpy_to_torch(o.astype(NP_DTYPES[case.dtype])))
        lses.append(torch.from_numpy(l_.astype(np.float32)))
    res = longattn.merge_states(outs, lses)
    assert isinstance(res, tuple) and len(res) == 2
    out, lse = res
    assert out.dtype == outs[0].dtype and tuple(out.shape) == tuple(outs[0].shape)
    assert tuple(lse.shape) == tuple(lses[0].shape)
    ref_out, ref_lse = merge_reference(outs, lses)
    _merge_tolerance_check(out, lse, ref_out, ref_lse, outs, lses, "merge_states")
    stacked = longattn.merge_states(torch.stack(outs), torch.stack(lses))
    assert torch.equal(stacked[0], out) and torch.equal(stacked[1], lse), "stacked input must give the same result"


def test_merge_states_ignores_entries_with_lse_minus_inf_and_gives_zero_when_all_are():
    g = torch.Generator().manual_seed(9)
    o1 = torch.randn(1, 3, 2, 4, generator=g)
    o2 = torch.full((1, 3, 2, 4), 123.0)  # garbage behind -inf LSEs must not leak
    l1 = torch.tensor([[[0.5, -torch.inf, 2.0], [-1.0, -torch.inf, 0.0]]])
    l2 = torch.full((1, 2, 3), -torch.inf)
    out, lse = longattn.merge_states([o1, o2], [l1, l2])
    fin = torch.isfinite(l1)  # (B, H, S)
    assert torch.equal(lse, l1)
    sel = fin.transpose(1, 2)  # (B, S, H)
    torch.testing.assert_close(out[sel], o1[sel], rtol=2e-6, atol=0)
    assert torch.all(out[~sel] == 0)
    # a single state is returned as it is (up to rounding)
    out1, lse1 = longattn.merge_states([o1], [l1])
    torch.testing.assert_close(out1[sel], o1[sel], rtol=2e-6, atol=0)
    assert torch.equal(lse1, l1)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("split", [1, 17, 40, 63])
def test_merge_states_of_a_causal_key_split_equals_the_full_call_including_empty_rows(dtype, split):
    """Causal attention over keys [0, S) = merge of the states over [0, m) and [m, S).
    The suffix state is flash_attention(q, k[m:], v[m:], causal) (bottom-right alignment
    keeps the diagonal; queries < m see none of it: empty rows); the prefix state is causal
    for queries < m and full for queries >= m."""
    case = _case(B=2, Sq=63, Sk=63, H=4, Hkv=2, D=40, Dv=24, softcap=5.0, alibi="none", dtype=dtype, seed=10)
    q, k, v = case.torch_inputs()
    m = split
    pre_a = call(case, q[:, :m], k[:, :m], v[:, :m])
    pre_b = call(dataclasses.replace(case, causal=False), q[:, m:], k[:, :m], v[:, :m])
    pre_out = torch.cat([pre_a[0], pre_b[0]], dim=1)
    pre_lse = torch.cat([pre_a[1], pre_b[1]], dim=2)
    suf_out, suf_lse = call(case, q, k[:, m:], v[:, m:])
    assert torch.all(torch.isneginf(suf_lse[..., :m]))
    out, lse = longattn.merge_states([pre_out, suf_out], [pre_lse, suf_lse])
    _check_merged(case, out, lse, q, k, v)


def _check_merged(case, out, lse, q, k, v):
    """A merge of partial states vs the reference of the full call: the same rule with the floor
    doubled (one more rounding), and float32's floor for float64 (the partial LSEs are float32)."""
    ref_out, ref_lse = case.reference(q, k, v)
    n_out, n_lse = case.naive(q, k, v)
    name = "float32" if case.dtype == "float64" else case.dtype
    assert_close_by_rule(out, ref_out, n_out, what="merged out", name=name,
                         magnitude=2 * case.error_scales(q, k, v)["out"])
    assert_lse_matches(lse, ref_lse, n_lse, magnitude=case.max_abs_score(q, k))


@given(case=attention_cases(max_s=64, big=False), cuts=st.lists(st.floats(0, 1), max_size=3),
       empty_piece=st.booleans())
def test_merge_states_of_a_non_causal_key_split_equals_the_full_call(case, cuts, empty_piece):
    """Without causal/window/ALiBi the keys can be cut anywhere; an empty key block (all
    lse = -inf) may be among the pieces."""
    case = dataclasses.replace(case, causal=False, window=(-1, -1), alibi="none")
    q, k, v = case.torch_inputs()
    bounds = sorted({0, case.Sk, *(int(c * case.Sk) for c in cuts)})
    spans = list(zip(bounds[:-1], bounds[1:])) + ([(0, 0)] if empty_piece or case.Sk == 0 else [])
    pieces = [call(case, q, k[:, a:b], v[:, a:b]) for a, b in spans]
    out, lse = longattn.merge_states([p[0] for p in pieces], [p[1] for p in pieces])
    _check_merged(case, out, lse, q, k, v)


# ----------------------------------------------------------------------------
# NumPy
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_numpy_inputs_give_numpy_outputs_equal_to_the_torch_call(dtype):
    case = _case(B=2, Sq=33, Sk=40, H=4, Hkv=2, D=16, Dv=8, softcap=5.0, alibi="bh", window=(9, -1),
                 dtype=dtype, seed=11)
    qn, kn, vn = case.numpy_inputs()
    out, lse = call(case, qn, kn, vn, framework="numpy")
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    assert out.dtype == NP_DTYPES[dtype] and lse.dtype == np.float32
    t_out, t_lse = call(case, *case.torch_inputs())
    assert out.tobytes() == to_numpy(t_out).tobytes()
    assert lse.tobytes() == to_numpy(t_lse).tobytes()
    check_forward(case, out, lse, qn, kn, vn)
    alone = longattn.flash_attention(qn, kn, vn, **case.kwargs("numpy"))
    assert isinstance(alone, np.ndarray) and alone.tobytes() == out.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_numpy_varlen_and_merge_states_return_numpy(dtype):
    vc = VarlenCase(_case(dtype=dtype, H=2, Hkv=1, D=16, Dv=8, B=2, alibi="h"), [5, 9], [7, 9])
    q, k, v = vc.numpy_inputs()
    out, lse = call_varlen(vc, q, k, v, vc.cu_q, vc.cu_k, framework="numpy")
    assert isinstance(out, np.ndarray) and out.dtype == NP_DTYPES[dtype]
    assert isinstance(lse, np.ndarray) and lse.dtype == np.float32 and lse.shape == (2, 14)
    t_out, t_lse = call_varlen(vc, *vc.torch_inputs(), torch.from_numpy(vc.cu_q), torch.from_numpy(vc.cu_k))
    assert out.tobytes() == to_numpy(t_out).tobytes() and lse.tobytes() == to_numpy(t_lse).tobytes()
    outs = np.stack([out[None, :7], out[None, 7:]]).astype(out.dtype)  # (2, 1, 7, H, Dv) of any values
    lses = np.stack([lse[None, :, :7], lse[None, :, 7:]])
    m_out, m_lse = longattn.merge_states(outs, lses)
    assert isinstance(m_out, np.ndarray) and m_out.dtype == out.dtype and isinstance(m_lse, np.ndarray)
    ref_out, ref_lse = merge_reference(list(outs), list(lses))
    _merge_tolerance_check(m_out, m_lse, ref_out, ref_lse, list(outs), list(lses), "numpy merge_states")


# ----------------------------------------------------------------------------
# custom ops registered with torch: opcheck on the calls the public API makes
# ----------------------------------------------------------------------------
def _record_longattn_ops(workload):
    """Runs workload(backward) under a dispatch mode, where backward(tensor) runs a backward
    pass; returns [(op, args, kwargs)] of every torch.ops.longattn call, tensors cloned.
    Forward calls keep requires_grad (opcheck then checks the autograd registration); calls
    made by a backward pass get plain tensors (double backward is not specified)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def clone(x, grad):
        if isinstance(x, torch.Tensor):
            return x.detach().clone().requires_grad_(grad and x.requires_grad)
        if isinstance(x, (list, tuple)):
            return type(x)(clone(y, grad) for y in x)
        if isinstance(x, dict):
            return {n: clone(y, grad) for n, y in x.items()}
        return x

    calls = []
    in_backward = [False]

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "longattn":
                grad = not in_backward[0]
                calls.append((func, clone(args, grad), clone(kwargs, grad)))
            return func(*args, **kwargs)

    def backward(t):
        in_backward[0] = True
        try:
            t.backward()
        finally:
            in_backward[0] = False

    with Recorder():
        workload(backward)
    return calls


def _api_workload():
    """Forward + backward of every public op with a spread of options and dtypes."""
    g = torch.Generator().manual_seed(12)

    def t(*shape, dtype=torch.float32, rg=True):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(rg)

    def run(backward):
        for dtype, kw in [
            (torch.float32, dict()),
            (torch.float32, dict(causal=True, window=(2, -1), softcap=3.0,
                                 alibi_slopes=torch.tensor([0.5, 0.25, 0.1, 0.05]))),
            (torch.bfloat16, dict(causal=True, softmax_scale=0.3, alibi_slopes=torch.rand(2, 4, generator=g))),
            (torch.float64, dict(window=(1, 1), deterministic=True)),
        ]:
            q, k, v = t(2, 5, 4, 8, dtype=dtype), t(2, 7, 2, 8, dtype=dtype), t(2, 7, 2, 6, dtype=dtype)
            out, lse = longattn.flash_attention(q, k, v, return_lse=True, **kw)
            backward(out.sum())
        q, k, v = t(9, 4, 8), t(11, 2, 8), t(11, 2, 8)
        cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 6, 11], dtype=torch.int32)
        out, lse = longattn.flash_attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
        backward((out * 2).sum())
        longattn.merge_states([t(2, 5, 4, 6, rg=False), t(2, 5, 4, 6, rg=False)],
                              [t(2, 4, 5, rg=False), torch.full((2, 4, 5), -torch.inf)])
    return run


@pytest.fixture(scope="module")
def recorded_calls():
    return _record_longattn_ops(_api_workload())


def test_torch_inputs_go_through_custom_ops_under_torch_ops_longattn(recorded_calls):
    names = {op._schema.name for op, _, _ in recorded_calls}
    assert names, "no torch.ops.longattn op was called: torch.compile cannot trace the ops"
    assert any("back" in n for n in names), f"backward does not go through a custom op: {sorted(names)}"
    for op, _, _ in recorded_calls:
        assert isinstance(op, torch._ops.OpOverload) and op.namespace == "longattn"


def test_opcheck_passes_on_every_recorded_custom_op_call(recorded_calls):
    seen = set()
    for op, args, kwargs in recorded_calls:
        key = (str(op), tuple(str(getattr(a, "dtype", type(a).__name__)) for a in args),
               tuple(sorted((n, repr(x) if not isinstance(x, torch.Tensor) else "T") for n, x in kwargs.items())),
               tuple(repr(a) for a in args if not isinstance(a, (torch.Tensor, list, tuple))))
        if key in seen:
            continue
        seen.add(key)
        op_lib.opcheck(op, args, kwargs)
    assert seen


# ----------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


def _attn_model(q, k, v):
    out, lse = longattn.flash_attention(q * 1.5, k, v, causal=True, window=(5, -1), softcap=4.0,
                                        alibi_slopes=SLOPES, return_lse=True)
    return (out.float() ** 2).sum(-1), lse * 2


def _grads_of(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    a, b = fn(*xs)
    b_fin = torch.where(torch.isfinite(b), b, torch.zeros_like(b))
    (a.sum() + b_fin.detach().sum()).backward()
    return [a.detach(), b.detach()] + [x.grad for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_fullgraph_matches_eager_forward_and_backward(fresh_dynamo, dtype):
    compiled = torch.compile(_attn_model, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(13)
    for sq, sk in ((7, 12), (12, 7)):  # a second shape: recompilation / dynamic shapes
        q = torch.randn(2, sq, 4, 16, generator=g).to(dtype)
        k = torch.randn(2, sk, 2, 16, generator=g).to(dtype)
        v = torch.randn(2, sk, 2, 8, generator=g).to(dtype)
        want = _grads_of(_attn_model, q, k, v)
        got = _grads_of(compiled, q, k, v)
        for w, o in zip(want, got):
            torch.testing.assert_close(o, w, rtol=0, atol=0, equal_nan=True)


def test_torch_compile_fullgraph_merge_states(fresh_dynamo):
    def f(o1, o2, l1, l2):
        out, lse = longattn.merge_states([o1 * 1.0, o2], [l1, l2])
        return out + 1, lse

    g = torch.Generator().manual_seed(14)
    args = (torch.randn(2, 5, 3, 8, generator=g), torch.randn(2, 5, 3, 8, generator=g),
            torch.randn(2, 3, 5, generator=g), torch.full((2, 3, 5), -torch.inf))
    want = f(*args)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, rtol=0, atol=0)


def test_torch_compile_fullgraph_varlen_with_max_seqlen(fresh_dynamo):
    def f(q, k, v, cu_q, cu_k):
        out = longattn.flash_attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=5, max_seqlen_k=6, causal=True)
        return out * 2

    g = torch.Generator().manual_seed(15)
    q, k, v = torch.randn(9, 4, 8, generator=g), torch.randn(11, 2, 8, generator=g), torch.randn(11, 2, 8, generator=g)
    cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 6, 11], dtype=torch.int32)
    want = f(q, k, v, cu_q, cu_k)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------
def _np(shape, dtype=np.float32):
    return np.random.default_rng(16).standard_normal(shape).astype(dtype)


def _fa(q=None, k=None, v=None, **kw):
    q = _np((2, 5, 4, 8)) if q is None else q
    k = _np((2, 6, 2, 8)) if k is None else k
    v = _np((2, 6, 2, 8)) if v is None else v
    return (q, k, v), (lambda: longattn.flash_attention(q, k, v, **kw))


def _noncontig_last(shape):
    return _np(shape[:-1] + (shape[-1] * 2,))[..., ::2]


ERROR_CASES = {
    # name: ((inputs, callable), exception types, pattern the message must contain)
    "q_ndim_3": (_fa(q=_np((5, 4, 8))), (ValueError,), r"\bq\b"),
    "k_ndim_3": (_fa(k=_np((6, 2, 8))), (ValueError,), r"\bk\b"),
    "k_batch_mismatch": (_fa(k=_np((3, 6, 2, 8)), v=_np((3, 6, 2, 8))), (ValueError,), r"\bk\b"),
    "k_head_dim_mismatch": (_fa(k=_np((2, 6, 2, 16))), (ValueError,), r"\bk\b"),
    "v_seq_mismatch": (_fa(v=_np((2, 7, 2, 8))), (ValueError,), r"\bv\b"),
    "v_heads_mismatch": (_fa(v=_np((2, 6, 1, 8))), (ValueError,), r"\bv\b"),
    "v_batch_mismatch": (_fa(v=_np((1, 6, 2, 8))), (ValueError,), r"\bv\b"),
    "heads_not_a_multiple": (_fa(k=_np((2, 6, 3, 8)), v=_np((2, 6, 3, 8))), (ValueError,), r"\b(k|q)\b"),
    "k_dtype_mismatch": (_fa(k=_np((2, 6, 2, 8), np.float64)), (ValueError, TypeError), r"\bk\b"),
    "v_dtype_mismatch": (_fa(v=_np((2, 6, 2, 8), np.float16)), (ValueError, TypeError), r"\bv\b"),
    "q_int_dtype": (_fa(q=np.ones((2, 5, 4, 8), np.int32), k=np.ones((2, 6, 2, 8), np.int32),
                        v=np.ones((2, 6, 2, 8), np.int32)), (TypeError, ValueError), r"\bq\b"),
    "torch_q_complex": (_fa(q=torch.randn(2, 5, 4, 8, dtype=torch.complex64),
                            k=torch.randn(2, 6, 2, 8, dtype=torch.complex64),
                            v=torch.randn(2, 6, 2, 8, dtype=torch.complex64)), (TypeError, ValueError), r"\bq\b"),
    "q_last_dim_not_contiguous": (_fa(q=_noncontig_last((2, 5, 4, 8))), (ValueError,), r"\bq\b"),
    "k_last_dim_not_contiguous": (_fa(k=_noncontig_last((2, 6, 2, 8))), (ValueError,), r"\bk\b"),
    "v_last_dim_not_contiguous": (_fa(v=_noncontig_last((2, 6, 2, 8))), (ValueError,), r"\bv\b"),
    "torch_v_last_dim_not_contiguous": (_fa(q=torch.randn(2, 5, 4, 8), k=torch.randn(2, 6, 2, 8),
                                            v=torch.randn(2, 6, 2, 16)[..., ::2]), (ValueError,), r"\bv\b"),
    "window_left_below_minus_one": (_fa(window=(-2, 0)), (ValueError,), r"\bwindow\b"),
    "window_right_below_minus_one": (_fa(window=(0, -7)), (ValueError,), r"\bwindow\b"),
    "window_three_entries": (_fa(window=(1, 1, 1)), (ValueError, TypeError), r"\bwindow\b"),
    "softcap_negative": (_fa(softcap=-1.0), (ValueError,), r"\bsoftcap\b"),
    "alibi_wrong_heads": (_fa(alibi_slopes=np.ones(3, np.float32)), (ValueError,), r"\balibi_slopes\b"),
    "alibi_wrong_batch": (_fa(alibi_slopes=np.ones((3, 4), np.float32)), (ValueError,), r"\balibi_slopes\b"),
    "alibi_3d": (_fa(alibi_slopes=np.ones((2, 4, 1), np.float32)), (ValueError,), r"\balibi_slopes\b"),
    "alibi_kv_heads": (_fa(alibi_slopes=np.ones(2, np.float32)), (ValueError,), r"\balibi_slopes\b"),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_invalid_arguments_raise_an_error_naming_the_argument_and_write_nothing(name):
    (inputs, fn), exc_types, pattern = ERROR_CASES[name]
    before = [x.clone() if isinstance(x, torch.Tensor) else x.copy() for x in inputs]
    with pytest.raises(exc_types) as info:
        fn()
    assert re.search(pattern, str(info.value)), f"message does not match {pattern!r}: {info.value}"
    for x, x0 in zip(inputs, before):
        assert torch.equal(x, x0) if isinstance(x, torch.Tensor) else np.array_equal(x, x0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("D", [40, 64])
@pytest.mark.parametrize("rows", [1, 3, 5, 64])
def test_short_query_calls_equal_the_same_rows_of_a_long_call(dtype, D, rows):
    """The CPU forward reads K/V three ways: packed once per call (long queries), packed per
    visit when each key tile serves at most two (query head, query tile) visits, and read in
    place for query tiles of at most 4 rows (decoding; over 1024 keys or more also split
    into key ranges that are merged). The packed ways give the same bits; the in-place one
    sums each score in another order (and, for bfloat16 on CPUs with the AVX512_BF16 dot
    product, keeps P in float32 where the packed ways round it to bfloat16 for P V), so it
    agrees to rounding. Non-causal: the long call's rows see the same keys."""
    rng = np.random.default_rng(rows * D)
    q, k, v = (numpy_to_torch(rng.standard_normal(sh).astype(NP_DTYPES[dtype]))
               for sh in ((2, 300, 4, D), (2, 333, 2, D), (2, 333, 2, 24)))
    long_out, long_lse = longattn.flash_attention(q, k, v, return_lse=True, softcap=5.0)  # 5 query tiles
    for start in (0, 64, 300 - rows):
        out, lse = longattn.flash_attention(q[:, start:start + rows], k, v, return_lse=True, softcap=5.0)
        want_out, want_lse = long_out[:, start:start + rows], long_lse[:, :, start:start + rows]
        if rows > 4:
            assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
        else:
            tol = {"float32": 2e-6, "bfloat16": 8e-3}[dtype]  # float32 rounding; one bfloat16 ulp
            torch.testing.assert_close(out.float(), want_out.float(), rtol=tol, atol=tol)
            torch.testing.assert_close(lse, want_lse, rtol=2e-6, atol=2e-6)
            assert not torch.equal(out.float(), torch.zeros_like(out.float()))


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_bfloat16_dot_product_is_used_exactly_where_the_cpu_has_it_and_the_level_is_not_capped():
    """bfloat16 Q K^T and P V run on AVX512_BF16's vdpbf16ps when the kernels dispatch to
    AVX-512 and the CPU has it; LONGATTN_CPU_ISA=avx512 (or lower) turns it off. On a CPU
    that has it, this is what makes the bfloat16 cases of the other tests check that path."""
    info = longattn.build_info()
    capped = os.environ.get("LONGATTN_CPU_ISA") in ("avx512", "avx2", "baseline")
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    expected = info["cpu_isa"] == "avx512" and "avx512_bf16" in flags and not capped
    assert info["cpu_bf16_dot"] == expected


@pytest.mark.parametrize("sk", [3, 129, 1000])
@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_uniform_probabilities_that_bfloat16_cannot_represent_stay_within_the_rule(sk, causal):
    """Equal scores give P = 1/n, which bfloat16 rounds by up to 2^-9 relative, all in the
    same direction; the packed bfloat16 path rounds P so for P V (as GPU flash kernels do)
    while the row sum keeps float32 P. The bias this leaves in out stays within the rule."""
    rng = np.random.default_rng(sk)
    q = np.zeros((1, 70, 2, 64), np.float32).astype(NP_BFLOAT16)
    k = rng.standard_normal((1, sk, 2, 64)).astype(NP_BFLOAT16)
    v = (rng.standard_normal((1, sk, 2, 48)) + 3.0).astype(NP_BFLOAT16)  # a mean far from 0
    q, k, v = (numpy_to_torch(x) for x in (q, k, v))
    out, lse = longattn.flash_attention(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = attention_reference(to_float64(q), to_float64(k), to_float64(v), causal=causal)
    naive_out, naive_lse = naive_attention_low_precision(q, k, v, causal=causal)
    assert_close_by_rule(out, ref_out, naive_out, what="out")
    assert_lse_matches(lse, ref_lse, naive_lse)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("H,Hkv", [(8, 2), (16, 1), (6, 3)])
@pytest.mark.parametrize("sq", [1, 3])
def test_gqa_decoding_equals_mha_with_repeated_kv_bitwise(dtype, H, Hkv, sq):
    """Decoding with GQA stacks the query heads of a group as rows of one tile so K/V rows
    are read once per group; each row's arithmetic stays that of its head alone, so the
    result has the bits of MHA over K/V repeated per head (per-head ALiBi slopes, softcap,
    a window and the bottom-right causal diagonal included)."""
    rng = np.random.default_rng(H * sq)
    q, k, v = (numpy_to_torch(rng.standard_normal(sh).astype(NP_DTYPES[dtype]))
               for sh in ((2, sq, H, 64), (2, 301, Hkv, 64), (2, 301, Hkv, 40)))
    kw = dict(causal=True, window=(200, -1), softcap=8.0, return_lse=True,
              alibi_slopes=torch.from_numpy(standard_alibi_slopes(H)))
    out, lse = longattn.flash_attention(q, k, v, **kw)
    rep = H // Hkv
    ref_out, ref_lse = longattn.flash_attention(q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), **kw)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert torch.isfinite(out.float()).all() and out.float().abs().sum() > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sk", [1100, 1300, 5000])
def test_decoding_over_many_keys_merges_its_key_ranges_exactly(dtype, sk):
    """A decoding call over at least 1024 keys computes ranges of each sequence's keys as
    separate work items and merges their partial results (split-KV). Checked against the
    float64 reference, including a window that leaves whole ranges without a visible key.
    The ranges depend on the sequence's length alone, so its bits do not change with the
    batch around it or with the number of threads."""
    rng = np.random.default_rng(sk)
    H, Hkv, sq = 8, 2, 2
    q, k, v = (numpy_to_torch(rng.standard_normal(sh).astype(NP_DTYPES[dtype]))
               for sh in ((1, sq, H, 64), (1, sk, Hkv, 64), (1, sk, Hkv, 40)))
    slopes = torch.from_numpy(standard_alibi_slopes(H))
    for kw in (dict(), dict(causal=True, window=(100, -1)), dict(softcap=5.0, alibi_slopes=slopes)):
        out, lse = longattn.flash_attention(q, k, v, return_lse=True, **kw)
        ref_out, ref_lse = attention_reference(q, k, v, **kw)
        naive_out, naive_lse = naive_attention_low_precision(q, k, v, **kw)
        assert_close_by_rule(out, ref_out, naive_out, what=f"out {kw}")
        assert_lse_matches(lse, ref_lse, naive_lse)

        # The same sequence in a varlen batch beside a short and a long one, and on one thread.
        short, long_ = 37, 2 * sk - 1
        ks = [k[0, :short], k[0], torch.cat([k[0], k[0]])[:long_]]
        vs = [v[0, :short], v[0], torch.cat([v[0], v[0]])[:long_]]
        cu_k = torch.tensor([0, short, short + sk, short + sk + long_], dtype=torch.int32)
        cu_q = torch.tensor([0, sq, 2 * sq, 3 * sq], dtype=torch.int32)
        packed = longattn.flash_attention_varlen(torch.cat([q[0]] * 3), torch.cat(ks), torch.cat(vs), cu_q, cu_k,
                                                 return_lse=True, **kw)
        assert torch.equal(packed[0][sq:2 * sq], out[0]) and torch.equal(packed[1][:, sq:2 * sq], lse[0])
        threads = longattn.num_threads()
        longattn.set_num_threads(1)
        try:
            alone = longattn.flash_attention(q, k, v, return_lse=True, **kw)
        finally:
            longattn.set_num_threads(threads)
        assert torch.equal(alone[0], out) and torch.equal(alone[1], lse)


# ----------------------------------------------------------------------------
# memory: never an Sq x Sk matrix
# ----------------------------------------------------------------------------
_PEAK_MEMORY_SCRIPT = r"""
import os, sys
import numpy as np
import torch
import longattn

S, D, backward = int(sys.argv[1]), 64, sys.argv[2] == "backward"
MiB = 1 << 20


def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak():  # Linux >= 4.0: the high-water mark drops to the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024


tiny = torch.zeros(1, 70, 1, D)  # warm-up: thread pool, kernels' code and buffers
longattn.flash_attention(tiny, tiny, tiny, causal=True, return_lse=True)
rng = np.random.default_rng(0)
q, k, v = (torch.from_numpy(rng.standard_normal((1, S, 1, D), dtype=np.float32)) for _ in range(3))
nbytes = S * D * 4  # one of q, k, v, out
if backward:
    for x in (q, k, v):
        x.requires_grad_()
    dout = torch.from_numpy(rng.standard_normal((1, S, 1, D), dtype=np.float32))
    probe = torch.zeros(1, 70, 1, D, requires_grad=True)
    longattn.flash_attention(probe, probe, probe, causal=True).sum().backward()
base = rss()
reset_peak()
if backward:
    out = longattn.flash_attention(q, k, v, causal=True)
    out.backward(dout)
    results = 4 * nbytes  # out, dq, dk, dv
    checked = [out, q.grad, k.grad, v.grad]
else:
    out, lse = longattn.flash_attention(q, k, v, causal=True, return_lse=True)
    results = nbytes + S * 4  # out, lse
    checked = [out, lse]
rise = peak() - base  # before the checks' temporaries
assert all(torch.isfinite(x).all() for x in checked)
workspace = rise - results
print(f"S={S} rise {rise / MiB:.1f} MiB = results {results / MiB:.1f} MiB + workspace {workspace / MiB:.1f} MiB")
# O(S) workspace: at most two copies of q, k and v (packed tiles, float32 accumulators),
# plus a fixed 32 MiB; one float32 Sq x Sk matrix would be S * S * 4 bytes.
limit = 6 * nbytes + 32 * MiB
assert workspace <= limit, f"workspace {workspace / MiB:.1f} MiB > {limit / MiB:.1f} MiB"
"""


def test_cpu_scratch_buffers_are_kept_up_to_the_limit_and_freed_on_request():
    q = torch.randn(1, 4096, 2, 64)  # packed K/V: 2 heads x 32 tiles x 64 KiB = 4 MiB
    limit = longattn.build_info()["cpu_cache_limit"]
    try:
        longattn.empty_cache()
        assert longattn.cpu_cache_bytes() == 0
        longattn.flash_attention(q, q, q)
        assert longattn.cpu_cache_bytes() >= 4 << 20
        held = longattn.cpu_cache_bytes()
        longattn.flash_attention(q, q, q)  # reuses the kept buffer
        assert longattn.cpu_cache_bytes() == held
        longattn.empty_cache()
        assert longattn.cpu_cache_bytes() == 0
        longattn.set_cpu_cache_limit(0)
        assert longattn.build_info()["cpu_cache_limit"] == 0
        longattn.flash_attention(q, q, q)
        assert longattn.cpu_cache_bytes() == 0
        with pytest.raises(ValueError, match="nbytes"):
            longattn.set_cpu_cache_limit(-1)
    finally:
        longattn.set_cpu_cache_limit(limit)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
@pytest.mark.parametrize("S,which", [(131072, "forward"), (32768, "backward")])
def test_causal_attention_at_long_lengths_needs_only_o_of_s_memory_on_cpu(S, which):
    """The issue's check: B=1 H=1 D=64 S=131072 causal runs with peak memory within inputs,
    outputs and O(S) workspace (a float32 Sq x Sk matrix would be 64 GiB); the backward at
    S=32768 (4 GiB as a matrix) keeps O(S) too. Peak RSS of a fresh process, reset after
    the inputs exist."""
    r = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_SCRIPT, str(S), which],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    print(r.stdout)


# ----------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------
CUDA_KEY_CASES = [
    _case(dtype="bfloat16", D=128, Dv=128),
    _case(dtype="float16", D=256, Dv=256, H=4, Hkv=1, Sq=1, Sk=113, alibi="bh"),
    _case(dtype="bfloat16", D=64, Dv=64, Sq=113, Sk=63, window=(3, -1), softcap=30.0, amp=3.0),
    _case(dtype="float16", D=256, Dv=128, B=1, H=2, Hkv=2, Sq=BIG_S, Sk=BIG_S, causal=False, window=(128, 128)),
    _case(dtype="bfloat16", D=64, Dv=64, Sq=63, Sk=0, H=2, Hkv=1),
]


def cuda_cases(max_s=300):
    return attention_cases(dtypes=tuple(CUDA_DTYPES), max_s=max_s, d_choices=tuple(CUDA_D_CHOICES), max_d=256)


@pytest.mark.cuda
@with_examples(CUDA_KEY_CASES)
@given(case=cuda_cases())
def test_cuda_output_and_lse_match_the_float64_reference(case):
    q, k, v = case.torch_inputs("cuda")
    out, lse = call(case, q, k, v, device="cuda")
    assert out.device.type == "cuda" and lse.device.type == "cuda" and out.dtype == q.dtype
    check_forward(case, out.cpu(), lse.cpu(), q.cpu(), k.cpu(), v.cpu())


@pytest.mark.cuda
@with_examples(CUDA_KEY_CASES[:3])
@given(case=cuda_cases(max_s=200))
def test_cuda_gradients_match_the_analytic_float64_reference(case):
    q, k, v = case.torch_inputs("cuda", requires_grad=True)
    dout = case.torch_dout("cuda")
    out = longattn.flash_attention(q, k, v, **case.kwargs(device="cuda"))
    out.backward(dout)
    check_grads(case, (q.grad.cpu(), k.grad.cpu(), v.grad.cpu()), q.detach().cpu(), k.detach().cpu(),
                v.detach().cpu(), dout.cpu())


@pytest.mark.cuda
@given(vc=varlen_cases(dtypes=tuple(CUDA_DTYPES), max_len=200, d_choices=tuple(CUDA_D_CHOICES)))
def test_cuda_varlen_matches_the_per_sequence_reference(vc):
    assume(vc.case.D <= 256 and vc.case.Dv <= 256)
    q, k, v = vc.torch_inputs("cuda")
    cu_q, cu_k = torch.from_numpy(vc.cu_q).cuda(), torch.from_numpy(vc.cu_k).cuda()
    out, lse = call_varlen(vc, q, k, v, cu_q, cu_k, device="cuda")
    ref_out, ref_lse = attention_reference_varlen(q, k, v, vc.cu_q, vc.cu_k, **vc.case.ref_args())
    n_out, n_lse = _naive_varlen(vc, q, k, v)
    assert_close_by_rule(out.cpu(), ref_out, n_out, what="out")
    assert_lse_matches(lse.cpu(), ref_lse, n_lse, magnitude=_varlen_max_abs_score(vc, q.cpu(), k.cpu()))


@pytest.mark.cuda
@pytest.mark.parametrize("case", [dataclasses.replace(c, dtype=d) for c in DETERMINISTIC_CASES for d in CUDA_DTYPES])
def test_cuda_deterministic_backward_is_bitwise_reproducible(case):
    q, k, v = case.torch_inputs("cuda")
    dout = case.torch_dout("cuda")
    runs = []
    for _ in range(3):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = longattn.flash_attention(qq, kk, vv, **case.kwargs(device="cuda"), deterministic=True)
        out.backward(dout)
        runs.append([_bits(x) for x in (out, qq.grad, kk.grad, vv.grad)])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.cuda
@given(case=cuda_cases(max_s=128), parts=st.integers(1, 3), data=st.data())
def test_cuda_merge_states_matches_the_reference(case, parts, data):
    q, k, v = case.numpy_inputs()
    assign = np.array(data.draw(st.lists(st.integers(0, parts - 1), min_size=case.Sk, max_size=case.Sk)), int)
    outs, lses = [], []
    for n in range(parts):
        o, l_ = attention_reference(q, k, v, **case.ref_args(), extra_mask=(assign == n))
        outs.append(numpy_to_torch(o.astype(NP_DTYPES[case.dtype])).cuda())
        lses.append(torch.from_numpy(l_.astype(np.float32)).cuda())
    out, lse = longattn.merge_states(outs, lses)
    assert out.device.type == "cuda"
    ref_out, ref_lse = merge_reference(outs, lses)
    _merge_tolerance_check(out.cpu(), lse.cpu(), ref_out, ref_lse, [o.cpu() for o in outs],
                           [x.cpu() for x in lses], "cuda merge_states")


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["q", "v"])
def test_cuda_head_dim_over_256_raises_a_value_error(which):
    D = 264 if which == "q" else 64
    Dv = 264 if which == "v" else 64
    q = torch.randn(1, 4, 2, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, 2, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 4, 2, Dv, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=rf"\b{which}\b"):
        longattn.flash_attention(q, k, v)
