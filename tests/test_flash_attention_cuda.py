"""CUDA flash attention against the CPU op in float32.

Tolerance rule of the FlashAttention test suite: the CUDA result's max error against the
float32 reference must be at most twice the error of a naive attention computed in the
same low precision on the GPU (scores, softmax, P and products rounded to float16 /
bfloat16), plus a small floor. Every test here needs a GPU (pytest.mark.cuda); without one
they are skipped. tests/cuda_emulation runs the same kernels on the host without a GPU.
LONGATTN_TEST_DEVICE=cpu python -m pytest tests/test_*_cuda.py checks the test logic on the CPU
(tests marked cuda_only are skipped); it verifies nothing about the CUDA kernels.
"""
import itertools
import math
import os

import pytest

torch = pytest.importorskip("torch")

import longattn  # noqa: E402

pytestmark = pytest.mark.cuda
# The device under test: "cuda", or "cpu" for a dry run of the test logic (tests/conftest.py).
DEV = os.environ.get("LONGATTN_TEST_DEVICE", "cuda")

DTYPES = [torch.float16, torch.bfloat16]
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


# ---- references -------------------------------------------------------------------------
def naive_attention(q, k, v, *, causal=False, window=(-1, -1), scale=None, softcap=0.0, alibi=None):
    """Dense attention in q's dtype (no upcast): (B, Sq, H, D) x (B, Sk, Hkv, D) -> out, lse."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q * scale, k)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    diag = i + Sk - Sq
    if alibi is not None:
        slopes = alibi if alibi.dim() == 2 else alibi[None].expand(B, H)
        s = s - (slopes[:, :, None, None] * (diag - j).abs()[None, None]).to(s.dtype)
    left, right = window
    if causal:
        right = 0
    visible = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= j >= diag - left
    if right >= 0:
        visible &= j <= diag + right
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s.float(), dim=-1)
    # Rows without a visible key get P = 0 (and finite gradients): softmax of zeros, masked.
    has_key = visible.any(-1, keepdim=True)
    p = torch.softmax(torch.where(has_key, s, torch.zeros_like(s)), dim=-1) * has_key
    out = torch.einsum("bhij,bjhd->bihd", p.to(v.dtype), v)
    return out, lse


def run(q, k, v, grad=None, **kw):
    """out, lse and (when grad is given) dq, dk, dv of longattn.flash_attention."""
    q, k, v = (x.detach().requires_grad_(grad is not None) for x in (q, k, v))
    out, lse = longattn.flash_attention(q, k, v, return_lse=True, **kw)
    if grad is None:
        return out.detach(), lse.detach(), None
    out.backward(grad)
    return out.detach(), lse.detach(), (q.grad, k.grad, v.grad)


def run_naive(q, k, v, grad=None, **kw):
    kw = dict(kw)
    kw.pop("deterministic", None)
    kw["alibi"] = kw.pop("alibi_slopes", None)
    kw["scale"] = kw.pop("softmax_scale", None)
    q, k, v = (x.detach().requires_grad_(grad is not None) for x in (q, k, v))
    out, lse = naive_attention(q, k, v, **kw)
    if grad is None:
        return out.detach(), lse.detach(), None
    out.backward(grad)
    return out.detach(), lse.detach(), (q.grad, k.grad, v.grad)


def cpu32(x):
    return None if x is None else x.detach().cpu().float()


def check(name, got, ref, naive, dtype):
    got, ref, naive = got.float().cpu(), ref.float().cpu(), naive.float().cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref).abs().max().item()
    err_naive = (naive - ref).abs().max().item()
    bound = 2 * err_naive + FLOOR[dtype] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (naive {dtype} error {err_naive:.3e})"


def check_lse(got, ref):
    got, ref = got.cpu(), ref.cpu()
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), inf) and (got[inf] == ref[inf]).all()
    if (~inf).any():
        assert (got[~inf] - ref[~inf]).abs().max().item() <= 1e-3


def compare(q, k, v, dtype, grads=True, **kw):
    """Runs CUDA, CPU float32 and naive low precision; checks out, lse and gradients."""
    grad = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=dtype) if grads else None
    out, lse, g = run(q, k, v, grad, **kw)
    cpu_kw = {key: (cpu32(val) if torch.is_tensor(val) else val) for key, val in kw.items()}
    cpu_kw.pop("deterministic", None)
    ref_out, ref_lse, ref_g = run(cpu32(q), cpu32(k), cpu32(v), cpu32(grad), **cpu_kw)
    nv_out, _, nv_g = run_naive(q, k, v, grad, **kw)
    check("out", out, ref_out, nv_out, dtype)
    check_lse(lse, ref_lse)
    if grads:
        for name, a, r, n in zip(("dq", "dk", "dv"), g, ref_g, nv_g):
            check(name, a, r, n, dtype)
    return out, lse, g


def rand(*shape, dtype):
    return torch.randn(*shape, device=DEV, dtype=dtype)


# ---- forward and backward ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 192, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(dtype, d, causal):
    torch.manual_seed(0)
    q, k, v = rand(2, 113, 4, d, dtype=dtype), rand(2, 97, 4, d, dtype=dtype), rand(2, 97, 4, d, dtype=dtype)
    compare(q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 300), (300, 1), (64, 64), (128, 200), (257, 129), (1000, 1000)])
@pytest.mark.parametrize("causal", [False, True])
def test_sequence_lengths(dtype, sq, sk, causal):
    torch.manual_seed(1)
    q, k, v = rand(1, sq, 2, 64, dtype=dtype), rand(1, sk, 2, 64, dtype=dtype), rand(1, sk, 2, 64, dtype=dtype)
    compare(q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_without_keys_give_zero_and_minus_inf(dtype):
    q, k, v = rand(1, 50, 2, 64, dtype=dtype), rand(1, 20, 2, 64, dtype=dtype), rand(1, 20, 2, 64, dtype=dtype)
    out, lse, _ = compare(q, k, v, dtype, causal=True)  # rows i < 30 see no key
    assert (out[:, :30] == 0).all() and torch.isneginf(lse[:, :, :30]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [(0, 0), (16, 0), (7, 33), (-1, 5), (100, -1), (300, 300)])
@pytest.mark.parametrize("causal", [False, True])
def test_windows(dtype, window, causal):
    torch.manual_seed(2)
    q, k, v = rand(2, 150, 3, 64, dtype=dtype), rand(2, 170, 3, 64, dtype=dtype), rand(2, 170, 3, 64, dtype=dtype)
    compare(q, k, v, dtype, causal=causal, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [0.0, 5.0, 30.0])
@pytest.mark.parametrize("alibi_shape", [None, "h", "bh"])
def test_softcap_alibi(dtype, softcap, alibi_shape):
    torch.manual_seed(3)
    B, H = 2, 4
    q, k, v = rand(B, 90, H, 128, dtype=dtype), rand(B, 120, H, 128, dtype=dtype), rand(B, 120, H, 128, dtype=dtype)
    alibi = None
    if alibi_shape == "h":
        alibi = torch.rand(H, device=DEV) * 0.5
    elif alibi_shape == "bh":
        alibi = torch.rand(B, H, device=DEV) * 0.5
    compare(q, k, v, dtype, causal=True, softcap=softcap, alibi_slopes=alibi)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hkv", [(6, 2), (8, 1), (4, 4)])
def test_gqa(dtype, h, hkv):
    torch.manual_seed(4)
    q, k, v = rand(2, 77, h, 64, dtype=dtype), rand(2, 133, hkv, 64, dtype=dtype), rand(2, 133, hkv, 64, dtype=dtype)
    compare(q, k, v, dtype, causal=True)


# Short query runs of a GQA group share query tiles on CUDA (GQA packing: row u of a tile
# is query u / pack of head h0 + u % pack; fwd_pack): one query of 8 heads, 16 queries of 8
# heads filling a 128-row tile, 45 queries of 2 of a group of 4 heads, and a group of 3.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,h,hkv,causal,window", [
    (1, 32, 4, False, (-1, -1)),
    (16, 32, 4, True, (-1, -1)),
    (45, 8, 2, True, (50, 0)),
    (33, 6, 3, False, (20, 20)),
])
def test_gqa_packed_query_tiles(dtype, sq, h, hkv, causal, window):
    torch.manual_seed(13)
    q, k, v = rand(2, sq, h, 64, dtype=dtype), rand(2, 300, hkv, 64, dtype=dtype), rand(2, 300, hkv, 64, dtype=dtype)
    compare(q, k, v, dtype, causal=causal, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,dv", [(64, 128), (128, 64), (40, 24), (192, 128), (256, 200)])
def test_different_value_head_dim(dtype, d, dv):
    torch.manual_seed(5)
    q, k, v = rand(1, 70, 2, d, dtype=dtype), rand(1, 90, 2, d, dtype=dtype), rand(1, 90, 2, dv, dtype=dtype)
    compare(q, k, v, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views_of_packed_qkv(dtype):
    torch.manual_seed(6)
    qkv = rand(2, 100, 3, 4, 64, dtype=dtype)
    q, k, v = qkv.unbind(2)  # token stride 3 * 4 * 64
    compare(q, k, v, dtype, causal=True)
    odd = rand(2, 100, 4, 67, dtype=dtype)[..., :66]  # odd strides: the element-wise load path
    compare(odd, odd, odd, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_scale(dtype):
    q, k, v = rand(1, 64, 2, 64, dtype=dtype), rand(1, 64, 2, 64, dtype=dtype), rand(1, 64, 2, 64, dtype=dtype)
    compare(q, k, v, dtype, softmax_scale=0.3)


# ---- varlen -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 96, 128])
def test_varlen_matches_cpu(dtype, causal, d):
    torch.manual_seed(7)
    lens_q, lens_k = [5, 0, 130, 64, 1], [17, 9, 70, 64, 200]
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32)
    H, Hkv = 4, 2
    q, k, v = rand(sum(lens_q), H, d, dtype=dtype), rand(sum(lens_k), Hkv, d, dtype=dtype), rand(sum(lens_k), Hkv, d, dtype=dtype)
    grad = rand(sum(lens_q), H, d, dtype=dtype)
    alibi = torch.rand(len(lens_q), H) * 0.3

    def go(x_q, x_k, x_v, g, cq, ck, al):
        x_q, x_k, x_v = (x.detach().requires_grad_() for x in (x_q, x_k, x_v))
        out, lse = longattn.flash_attention_varlen(x_q, x_k, x_v, cq, ck, causal=causal, window=(50, -1),
                                                   alibi_slopes=al, return_lse=True)
        out.backward(g)
        return out.detach(), lse.detach(), (x_q.grad, x_k.grad, x_v.grad)

    out, lse, g = go(q, k, v, grad, cu_q.to(DEV), cu_k.to(DEV), alibi.to(DEV))
    ref_out, ref_lse, ref_g = go(cpu32(q), cpu32(k), cpu32(v), cpu32(grad), cu_q, cu_k, alibi)
    # naive low precision, one sequence at a time (the bound's scale)
    nv_out = torch.zeros_like(out)
    nv_g = [torch.zeros_like(x) for x in (q, k, v)]
    for b in range(len(lens_q)):
        sq = slice(int(cu_q[b]), int(cu_q[b + 1]))
        sk = slice(int(cu_k[b]), int(cu_k[b + 1]))
        if lens_q[b] == 0:
            continue
        o, _, gg = run_naive(q[sq][None], k[sk][None], v[sk][None], grad[sq][None], causal=causal, window=(50, -1),
                             alibi_slopes=alibi[b:b + 1].to(DEV))
        nv_out[sq] = o[0]
        nv_g[0][sq] = gg[0][0]
        nv_g[1][sk] = gg[1][0]
        nv_g[2][sk] = gg[2][0]
    check("out", out, ref_out, nv_out, dtype)
    check_lse(lse, ref_lse)
    for name, a, r, n in zip(("dq", "dk", "dv"), g, ref_g, nv_g):
        check(name, a, r, n, dtype)


# ---- decoding: few CTAs, so the CUDA forward splits the keys (split-KV) ----------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk,h,hkv,causal,window", [
    (1, 4096, 8, 8, False, (-1, -1)),
    (4, 16391, 8, 2, True, (-1, -1)),  # odd key count: a partial last tile
    (1, 5000, 4, 1, False, (1000, 0)),  # sliding window: the ranges cover the window only
    (2, 700, 2, 2, True, (-1, -1)),
])
def test_decoding_over_many_keys(dtype, sq, sk, h, hkv, causal, window):
    torch.manual_seed(11)
    d = 128
    q, k, v = rand(1, sq, h, d, dtype=dtype), rand(1, sk, hkv, d, dtype=dtype), rand(1, sk, hkv, d, dtype=dtype)
    compare(q, k, v, dtype, grads=False, causal=causal, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_decoding_over_many_keys(dtype):
    torch.manual_seed(12)
    lens_k = [5000, 17, 3000, 0]
    lens_q = [1, 1, 1, 1]
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32)
    q, k, v = rand(4, 8, 64, dtype=dtype), rand(sum(lens_k), 2, 64, dtype=dtype), rand(sum(lens_k), 2, 64, dtype=dtype)
    out, lse = longattn.flash_attention_varlen(q, k, v, cu_q.to(DEV), cu_k.to(DEV), return_lse=True)
    ref_out, ref_lse = longattn.flash_attention_varlen(cpu32(q), cpu32(k), cpu32(v), cu_q, cu_k, return_lse=True)
    for b in range(4):
        sk = slice(int(cu_k[b]), int(cu_k[b + 1]))
        if lens_k[b] == 0:  # no keys: exactly 0 and -inf
            assert (out[b].float() == 0).all() and torch.isinf(lse[:, b]).all()
            continue
        nv, _, _ = run_naive(q[b:b + 1][None], k[sk][None], v[sk][None])
        check(f"out[{b}]", out[b:b + 1], ref_out[b:b + 1], nv[0], dtype)
    check_lse(lse, ref_lse)


# ---- lse gradient -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_lse_gradient(dtype):
    torch.manual_seed(8)
    q, k, v = rand(2, 80, 2, 64, dtype=dtype), rand(2, 100, 2, 64, dtype=dtype), rand(2, 100, 2, 64, dtype=dtype)
    w = torch.randn(2, 2, 80)

    def go(fn, x_q, x_k, x_v, ww):
        x_q, x_k, x_v = (x.detach().requires_grad_() for x in (x_q, x_k, x_v))
        out, lse = fn(x_q, x_k, x_v)
        (out.float().sum() + (lse * ww).sum()).backward()
        return x_q.grad, x_k.grad, x_v.grad

    def flash(x_q, x_k, x_v):
        return longattn.flash_attention(x_q, x_k, x_v, causal=True, return_lse=True)

    got = go(flash, q, k, v, w.to(DEV))
    ref = go(flash, cpu32(q), cpu32(k), cpu32(v), w)
    nv = go(lambda a, b, c: naive_attention(a, b, c, causal=True), q, k, v, w.to(DEV))
    for name, a, r, n in zip(("dq", "dk", "dv"), got, ref, nv):
        check(name, a, r, n, dtype)


# ---- determinism --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_deterministic_backward_is_bitwise_repeatable_and_accurate(dtype, d):
    torch.manual_seed(9)
    q, k, v = rand(2, 300, 4, d, dtype=dtype), rand(2, 260, 2, d, dtype=dtype), rand(2, 260, 2, d, dtype=dtype)
    grad = rand(2, 300, 4, d, dtype=dtype)
    _, _, g1 = run(q, k, v, grad, causal=True, deterministic=True)
    for _ in range(3):
        _, _, g2 = run(q, k, v, grad, causal=True, deterministic=True)
        for a, b in zip(g1, g2):
            assert torch.equal(a, b)
    compare(q, k, v, dtype, causal=True, deterministic=True)


# ---- errors and streams ---------------------------------------------------------------------
@pytest.mark.cuda_only
def test_float32_on_cuda_is_a_type_error():
    q = torch.randn(1, 8, 2, 64, device="cuda")
    with pytest.raises(TypeError, match="float16 and bfloat16"):
        longattn.flash_attention(q, q, q)


@pytest.mark.cuda_only
def test_head_dim_above_256_is_a_value_error():
    q = torch.randn(1, 8, 2, 320, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="256"):
        longattn.flash_attention(q, q, q)


@pytest.mark.cuda_only
def test_runs_on_a_side_stream():
    q = rand(1, 64, 2, 64, dtype=torch.float16)
    want = longattn.flash_attention(q, q, q)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = longattn.flash_attention(q, q, q)
    s.synchronize()
    assert torch.equal(got, want)
