"""CUDA linear attention against the float64 references.

Forward outputs and states are compared with the float64 token recurrence
(tests/reference/linear_attention.py) on the same low-precision inputs; gradients with
torch autograd through the float64 CPU op (itself gradchecked in test_linear_attention.py).
Tolerances are relative to the largest reference magnitude: the kernels round the chunk
products' operands (q~, k~, v, the decayed keys, the state's copy for Q S, the masked
scores) to the input dtype and accumulate in float32, so errors scale like a few units
of the dtype's rounding times the magnitudes involved.

Every test here needs a GPU (pytest.mark.cuda); without one they are skipped. These tests
have not run on a GPU yet; tests/cuda_emulation/run.sh linear runs the same kernels on the
host.
LONGATTN_TEST_DEVICE=cpu python -m pytest tests/test_*_cuda.py checks the test logic on the CPU
(tests marked cuda_only are skipped); it verifies nothing about the CUDA kernels.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import library as op_lib  # noqa: E402

import longattn  # noqa: E402
from reference.linear_attention import linear_attention_reference, retnet_log_decay  # noqa: E402

pytestmark = pytest.mark.cuda
# The device under test: "cuda", or "cpu" for a dry run of the test logic (tests/conftest.py).
DEV = os.environ.get("LONGATTN_TEST_DEVICE", "cuda")

DTYPES = [torch.float16, torch.bfloat16]
# Max error as a fraction of the reference's largest magnitude.
REL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _inputs(B, T, H, K, V, dtype, *, normalize=False, feature_map=None, decay=None, state=False, seed=0,
            strength=1.0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen).to(dtype) for _ in range(2))
    if normalize and feature_map is None:
        q, k = q.abs() + 0.1, k.abs() + 0.1
    v = torch.randn(B, T, H, V, generator=gen).to(dtype)
    g = None
    if decay == "head":
        g = torch.from_numpy(retnet_log_decay(H).astype(np.float32))
    elif decay == "token":
        g = -strength * torch.rand(B, T, H, generator=gen)
    s = None
    if state:
        S0 = torch.randn(B, H, K, V, generator=gen)
        s = (S0, torch.rand(B, H, K, generator=gen)) if normalize else S0
    return q, k, v, g, s


def _dev(x):
    """x (a tensor, a tuple of tensors or None) on the device under test."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(t.to(DEV) for t in x)
    return x.to(DEV)


def _np(x):
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(_np(t) for t in x)
    return x.detach().double().cpu().numpy()


def _assert_rel(got, want, dtype, what, scale=None):
    """max |got - want| <= REL[dtype] * scale; scale defaults to max |want| (at least 1e-6)."""
    got = got.detach().double().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    if scale is None:
        scale = max(float(np.max(np.abs(want))) if np.size(want) else 0.0, 1e-6)
    err = float(np.max(np.abs(got - want))) if np.size(want) else 0.0
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    assert err <= REL[dtype] * scale, f"{what}: max error {err:.3g} > {REL[dtype]} x {scale:.3g}"


OPTIONS = [
    dict(),
    dict(decay="head", state=True),
    dict(decay="token", strength=5.0),
    dict(normalize=True, feature_map="elu1", decay="token", state=True),
    dict(normalize=True, feature_map="relu"),
    dict(causal=False, state=True),
    dict(causal=False, normalize=True, feature_map="elu1"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("T,K,V", [(1, 16, 16), (70, 32, 48), (200, 128, 128), (130, 256, 80)])
def test_forward_and_final_state_match_the_float64_recurrence(dtype, opts, T, K, V):
    opts = dict(opts)
    causal = opts.pop("causal", True)
    q, k, v, g, s = _inputs(2, T, 3, K, V, dtype, **opts)
    normalize, fmap = opts.get("normalize", False), opts.get("feature_map")
    out, state = longattn.linear_attention(_dev(q), _dev(k), _dev(v), causal=causal, normalize=normalize,
                                           feature_map=fmap, log_decay=_dev(g), initial_state=_dev(s),
                                           return_state=True)
    o_ref, S_ref, z_ref = linear_attention_reference(_np(q), _np(k), _np(v), causal=causal, feature_map=fmap,
                                                     normalize=normalize, log_decay=_np(g), initial_state=_np(s))
    assert out.device.type == DEV and out.dtype == dtype
    _assert_rel(out, o_ref, dtype, "out")
    S, z = state if normalize else (state, None)
    _assert_rel(S, S_ref, dtype, "final S")
    if normalize:
        _assert_rel(z, z_ref, dtype, "final z")


def _grads(q, k, v, g, s, device, dtype, **kw):
    """Gradients of sum(out * w) + sum(S * wS) (+ sum(z * wz)) on `device` in `dtype`."""
    leaves = [x.to(device=device, dtype=dtype).detach().requires_grad_() for x in (q, k, v)]
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    gg = None if g is None else g.to(device=device, dtype=cd).detach().requires_grad_()
    ss = None
    if s is not None:
        ss = tuple(x.to(device=device, dtype=cd).detach().requires_grad_() for x in s) if isinstance(s, tuple) \
            else s.to(device=device, dtype=cd).detach().requires_grad_()
    out, state = longattn.linear_attention(*leaves, log_decay=gg, initial_state=ss, return_state=True, **kw)
    gen = torch.Generator().manual_seed(1)
    loss = (out.double() * torch.randn(out.shape, generator=gen).to(device, torch.float64)).sum()
    for t in state if isinstance(state, tuple) else (state,):
        loss = loss + (t.double() * torch.randn(t.shape, generator=gen).to(device, torch.float64)).sum()
    wrt = leaves + ([gg] if gg is not None else []) + (list(ss) if isinstance(ss, tuple) else [ss] if ss is not None
                                                        else [])
    return [x.double().cpu() for x in torch.autograd.grad(loss, wrt)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("T,K,V", [(1, 16, 16), (90, 32, 40), (150, 128, 128)])
def test_gradients_match_float64_autograd(dtype, opts, T, K, V):
    opts = dict(opts)
    causal = opts.pop("causal", True)
    q, k, v, g, s = _inputs(2, T, 2, K, V, dtype, **opts)
    kw = dict(causal=causal, normalize=opts.get("normalize", False), feature_map=opts.get("feature_map"))
    got = _grads(q, k, v, g, s, DEV, dtype, **kw)
    want = _grads(q, k, v, g, s, "cpu", torch.float64, **kw)
    names = ["dq", "dk", "dv"] + (["dlog_decay"] if g is not None else []) + ["dS0", "dz0"][: (2 if kw["normalize"]
                                                                                                else 1)]
    # Some gradients vanish in exact arithmetic, e.g. with T = 1: dq when normalize makes the
    # output v whatever q is, d log_decay without an earlier state to decay. The kernels still
    # form them as differences of terms as large as dq, dk, dv (dq~ = (dO S^T - (o.dO) z) / n,
    # d log_decay = q~.dq~ - k~.dk~ reverse-cumulated), so their rounding error scales with
    # those; max |reference| (~1e-10) is no scale for it.
    terms = max(float(b.abs().max()) for b in want[:3])
    for name, a, b in zip(names, got, want):
        vanishes = float(b.abs().max()) <= 1e-6 * terms
        _assert_rel(a, b.numpy(), dtype, name, scale=terms if vanishes else None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_varlen_matches_per_sequence_calls(dtype):
    lens = [5, 0, 130, 1, 64]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    q, k, v, g, _ = _inputs(1, int(cu[-1]), 2, 32, 32, dtype, decay="token")
    out = longattn.linear_attention(_dev(q), _dev(k), _dev(v), log_decay=_dev(g), cu_seqlens=cu.to(DEV))
    for i in range(len(lens)):
        a, b = int(cu[i]), int(cu[i + 1])
        ref, _, _ = linear_attention_reference(_np(q[:, a:b]), _np(k[:, a:b]), _np(v[:, a:b]),
                                               log_decay=_np(g[:, a:b]))
        _assert_rel(out[:, a:b], ref, dtype, f"sequence {i}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_two_halves_with_the_state_passed_equals_one_call(dtype):
    q, k, v, g, _ = _inputs(1, 300, 2, 64, 64, dtype, decay="token")
    q, k, v, g = (_dev(x) for x in (q, k, v, g))
    full, S = longattn.linear_attention(q, k, v, log_decay=g, return_state=True)
    o1, S1 = longattn.linear_attention(q[:, :137], k[:, :137], v[:, :137], log_decay=g[:, :137], return_state=True)
    o2, S2 = longattn.linear_attention(q[:, 137:], k[:, 137:], v[:, 137:], log_decay=g[:, 137:], initial_state=S1,
                                       return_state=True)
    ref = full.double().abs().max().item()
    assert (torch.cat([o1, o2], 1).double() - full.double()).abs().max().item() <= REL[dtype] * ref
    assert (S2 - S).abs().max().item() <= REL[dtype] * S.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_step_token_by_token_equals_the_chunked_result(dtype, normalize, inplace):
    fmap = "elu1" if normalize else None
    q, k, v, g, _ = _inputs(2, 40, 2, 64, 96, dtype, decay="token", normalize=normalize, feature_map=fmap)
    q, k, v, g = (_dev(x) for x in (q, k, v, g))
    full = longattn.linear_attention(q, k, v, log_decay=g, normalize=normalize, feature_map=fmap)
    state = None
    if inplace:
        S = torch.zeros(2, 2, 64, 96, device=DEV)
        state = (S, torch.zeros(2, 2, 64, device=DEV)) if normalize else S
    outs = []
    for t in range(0, 40, 3):  # 3-token steps run the step kernel
        sl = slice(t, t + 3)
        o, new = longattn.linear_attention_step(q[:, sl], k[:, sl], v[:, sl], state, log_decay=g[:, sl],
                                                normalize=normalize, feature_map=fmap, inplace=inplace)
        if inplace:
            assert (new[0] if normalize else new).data_ptr() == (state[0] if normalize else state).data_ptr()
        state = new
        outs.append(o)
    ref = full.double().abs().max().item()
    assert (torch.cat(outs, 1).double() - full.double()).abs().max().item() <= REL[dtype] * ref


def test_torch_ops_pass_opcheck_on_cuda():
    from longattn import torch_ops

    f, b, step = torch_ops.LINEAR_ATTENTION_OPS
    gen = torch.Generator().manual_seed(16)
    q, k = (torch.randn(2, 9, 2, 16, generator=gen).half().to(DEV) for _ in range(2))
    v = torch.randn(2, 9, 2, 8, generator=gen).half().to(DEV)
    g = -torch.rand(2, 9, 2, generator=gen).to(DEV)
    S0, z0 = torch.randn(2, 2, 16, 8, generator=gen).to(DEV), torch.rand(2, 2, 16, generator=gen).to(DEV)
    for args in [(q, k, v, g, S0, z0, None, 0.5, 1, True, True, 64),
                 (q, k, v, None, None, None, None, 0.5, 0, False, False, 64)]:
        qq, kk, vv = (x.clone().requires_grad_() for x in args[:3])
        op_lib.opcheck(f, (qq, kk, vv) + args[3:])
        op_lib.opcheck(b, (torch.randn_like(v), torch.randn_like(S0), None) + args)
    op_lib.opcheck(step, (q[:, :1], k[:, :1], v[:, :1], g[:, :1], S0.clone(), z0.clone(), None, 0.5, 1, True))


@pytest.mark.cuda_only
def test_launches_on_the_current_stream():
    q, k, v, g, _ = _inputs(1, 256, 2, 64, 64, torch.bfloat16, decay="head")
    q, k, v, g = (_dev(x) for x in (q, k, v, g))
    ref = longattn.linear_attention(q, k, v, log_decay=g)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = longattn.linear_attention(q, k, v, log_decay=g)
    s.synchronize()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("call,exc,msg", [
    pytest.param(lambda q, k, v: longattn.linear_attention(q.float(), k.float(), v.float()), TypeError,
                 "float16 and bfloat16", marks=pytest.mark.cuda_only, id="float32"),
    pytest.param(lambda q, k, v: longattn.linear_attention(torch.randn(1, 4, 1, 264, device=DEV, dtype=torch.half),
                                                           torch.randn(1, 4, 1, 264, device=DEV, dtype=torch.half), v),
                 ValueError, "head_dim", marks=pytest.mark.cuda_only, id="head_dim"),
    pytest.param(lambda q, k, v: longattn.linear_attention(q, k, torch.randn(1, 4, 1, 256, device=DEV,
                                                                             dtype=torch.half),
                                                           normalize=True, feature_map="elu1"),
                 ValueError, "head_dim_v", marks=pytest.mark.cuda_only, id="head_dim_v"),
    pytest.param(lambda q, k, v: longattn.linear_attention(q, k.cpu(), v), ValueError, "k",
                 marks=pytest.mark.cuda_only, id="k_on_cpu"),
    pytest.param(lambda q, k, v: longattn.linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32,
                                                                                             device=DEV)),
                 ValueError, "cu_seqlens", id="cu_seqlens"),
])
def test_invalid_cuda_arguments_raise_an_error_naming_the_argument(call, exc, msg):
    q, k, v = (torch.randn(1, 4, 1, 8, device=DEV, dtype=torch.half) for _ in range(3))
    with pytest.raises(exc, match=msg):
        call(q, k, v)
