"""CUDA block_sparse_attention against float64 attention with the BlockMask's expanded
element mask, forward and backward.

Tolerance rule of the FlashAttention test suite (tests/reference/attention.py): the CUDA
error against the float64 reference is at most twice the error of a naive masked attention
computed in the same low precision on the GPU, plus a small floor. Every test needs a GPU
(pytest.mark.cuda) and is skipped without one; tests/cuda_emulation runs the same kernels
(Sparse = true) on the host without a GPU.
LONGATTN_TEST_DEVICE=cpu python -m pytest tests/test_*_cuda.py checks the test logic on the CPU
(tests marked cuda_only are skipped); it verifies nothing about the CUDA kernels.
"""
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import library as op_lib  # noqa: E402

import longattn  # noqa: E402
from longattn import block_sparse, masks  # noqa: E402
from longattn import torch_ops  # noqa: E402,F401  (registers torch.ops.longattn.*)
from reference.attention import assert_close_by_rule, assert_lse_matches  # noqa: E402

pytestmark = pytest.mark.cuda
# The device under test: "cuda", or "cpu" for a dry run of the test logic (tests/conftest.py).
DEV = os.environ.get("LONGATTN_TEST_DEVICE", "cuda")

DTYPES = [torch.float16, torch.bfloat16]
BLOCKS = [(64, 64), (64, 128), (128, 64), (128, 128)]


# ---- references -------------------------------------------------------------------------
def masked_attention(q, k, v, elements, *, softcap=0.0):
    """Differentiable attention in q's dtype and device with a boolean (B|1, H|1, Sq, Sk)
    mask. Returns (out, lse, empty): rows without a visible key (empty) give out 0 and a
    finite placeholder lse that the losses below ignore."""
    heads, hkv = q.shape[2], k.shape[2]
    ke = k.repeat_interleave(heads // hkv, 2)
    ve = v.repeat_interleave(heads // hkv, 2)
    s = torch.einsum("bihd,bjhd->bhij", q * (1 / math.sqrt(q.shape[-1])), ke)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    vis = torch.as_tensor(np.asarray(elements, dtype=bool), device=q.device).expand(s.shape)
    empty = ~vis.any(-1)
    s = s.masked_fill(~vis, -math.inf).masked_fill(empty[..., None], 0.0)
    lse = torch.logsumexp(s.float(), -1)
    p = torch.softmax(s.float(), -1).masked_fill(~vis, 0.0)
    return torch.einsum("bhij,bjhd->bihd", p.to(v.dtype), ve), lse, empty


def loss_of(out, lse, empty, dout, dlse):
    """sum(out * dout) + sum(lse * dlse) over rows that see a key."""
    loss = (out.double() * dout.double()).sum()
    if dlse is not None:
        loss = loss + (torch.where(empty, 0.0, lse.double()) * dlse.double()).sum()
    return loss


def run(fn, q, k, v, dout, dlse):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse, empty = fn(q, k, v)
    grads = torch.autograd.grad(loss_of(out, lse, empty, dout.to(q.device), None if dlse is None else
                                        dlse.to(q.device)), (q, k, v))
    return out.detach(), lse.detach(), grads


def build_mask(kind, sq, sk, block, heads=1, seed=0, q=None, k=None):
    if kind == "causal":
        return masks.causal(sq, sk, block_size=block)
    if kind == "sliding_window":
        return masks.sliding_window(sq, sk, max(1, sk // 3), block_size=block)
    if kind == "streaming":
        return masks.streaming(sq, sk, sink_tokens=4, window=max(1, sk // 4), block_size=block)
    if kind == "bigbird":
        return masks.bigbird(sq, sk, 1, 1, 1, seed=seed, block_size=block, heads=heads)
    if kind == "topk_blocks":
        return masks.topk_blocks(q, k, block, 2)
    if kind == "strided":  # token-granular masks: bit tiles
        return masks.strided(sq, sk, 37, block_size=block)
    if kind == "longformer_globals":
        return masks.longformer(sq, sk, 20, [0, 1, sk // 2], block_size=block)
    if kind == "mask_mod":  # bit tiles AND-ed with nothing else; random per head
        rng = np.random.default_rng(seed)
        return longattn.BlockMask.from_dense_elements(rng.random((1, heads, sq, sk)) < 0.2, block)
    if kind == "dense":
        nq, nk = -(-sq // block[0]), -(-sk // block[1])
        return longattn.BlockMask.from_dense(np.ones((1, heads, nq, nk), bool), block, sq, sk)
    raise ValueError(kind)


def compare(q, k, v, bm, *, softcap=0.0, deterministic=False, dlse=False):
    """CUDA out, lse, dq, dk, dv against float64 on the CPU, with the error of a naive masked
    attention in q's dtype on the GPU as the yardstick (tests/reference/attention.py)."""
    name = str(q.dtype).replace("torch.", "")
    elements = bm.to_dense_elements()
    bmc = bm.to(q.device)
    g = torch.Generator(device=q.device).manual_seed(7)
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype, generator=g)
    dl = torch.randn(q.shape[0], q.shape[2], q.shape[1], device=q.device, generator=g) if dlse else None

    def ours(a, b, c):
        out, lse = longattn.block_sparse_attention(a, b, c, bmc, softcap=softcap, return_lse=True,
                                                   deterministic=deterministic)
        return out, lse, torch.isneginf(lse)

    def reference(a, b, c):
        return masked_attention(a, b, c, elements, softcap=softcap)

    out, lse, got = run(ours, q, k, v, dout, dl)
    ref_out, ref_lse, ref_g = run(reference, *(x.double().cpu() for x in (q, k, v)), dout, dl)
    nv_out, _, nv_g = run(reference, q, k, v, dout, dl)
    ref_lse = torch.where(torch.as_tensor(~np.asarray(elements).any(-1)).expand(ref_lse.shape), -math.inf, ref_lse)
    assert_close_by_rule(out.cpu(), ref_out.numpy(), nv_out.cpu(), what="out", name=name)
    assert_lse_matches(lse.cpu(), ref_lse.numpy(), None)
    for what, a, r, n in zip(("dq", "dk", "dv"), got, ref_g, nv_g):
        assert_close_by_rule(a.cpu(), r.numpy(), n.cpu(), what=what, name=name)
    return out, lse, got


def rand(*shape, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, device=DEV, dtype=dtype, generator=g)


# ---- correctness ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("kind", ["sliding_window", "bigbird", "streaming", "causal", "topk_blocks", "dense",
                                  "strided", "longformer_globals", "mask_mod"])
def test_patterns_and_block_sizes_match_the_masked_float64_reference(kind, block, dtype):
    sq = sk = 300  # not a multiple of any block size: cut edge blocks
    q, k, v = rand(2, sq, 4, 64, dtype=dtype), rand(2, sk, 2, 64, dtype=dtype, seed=1), rand(2, sk, 2, 64,
                                                                                             dtype=dtype, seed=2)
    compare(q, k, v, build_mask(kind, sq, sk, block, heads=4 if kind in ("bigbird", "mask_mod") else 1, q=q, k=k))


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_bit_tiles_with_gqa_deterministic_and_element_masks(head_dim):
    sq, sk = 333, 290
    q, k, v = rand(1, sq, 4, head_dim, dtype=torch.bfloat16), rand(1, sk, 2, head_dim, dtype=torch.bfloat16,
                                                                   seed=1), rand(1, sk, 2, head_dim,
                                                                                 dtype=torch.bfloat16, seed=2)
    # a union of different element masks, so bit tiles of both kinds of partial block
    bm = masks.union(masks.dilated(sq, sk, 64, 3, block_size=(64, 128)),
                     masks.sliding_window(sq, sk, 40, block_size=(64, 128), heads=4))
    assert bm.partial_bits is not None
    compare(q, k, v, bm)
    compare(q, k, v, bm, deterministic=True, dlse=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk", [(1, 1), (63, 200), (200, 63), (129, 257), (257, 129), (511, 300)])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 192, 256])
def test_lengths_and_head_dims(sq, sk, head_dim, dtype):
    q, k, v = (rand(1, s, 2, head_dim, dtype=dtype, seed=i) for i, s in enumerate((sq, sk, sk)))
    compare(q, k, v, build_mask("streaming", sq, sk, (64, 128)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa_per_head_masks_softcap_and_dlse(dtype):
    q, k, v = rand(2, 260, 8, 128, dtype=dtype), rand(2, 190, 2, 128, dtype=dtype, seed=1), rand(
        2, 190, 2, 128, dtype=dtype, seed=2)
    bm = masks.bigbird(260, 190, 1, 1, 1, seed=3, block_size=(128, 64), heads=8)
    compare(q, k, v, bm, softcap=5.0)
    compare(q, k, v, bm, dlse=True)


def test_rows_that_see_nothing_get_zero_and_minus_inf():
    layout = np.zeros((1, 1, 4, 4), bool)
    layout[0, 0, 0, :2] = True  # only the first query block sees anything
    bm = longattn.BlockMask.from_dense(layout, 64, 256, 256).to(DEV)
    q, k, v = (rand(1, 256, 2, 64, dtype=torch.bfloat16, seed=i).requires_grad_() for i in range(3))
    out, lse = longattn.block_sparse_attention(q, k, v, bm, return_lse=True)
    assert (out[:, 64:] == 0).all() and torch.isneginf(lse[:, :, 64:]).all()
    out.sum().backward()
    assert (q.grad[:, 64:] == 0).all() and (k.grad[:, 128:] == 0).all() and torch.isfinite(q.grad).all()


def test_full_density_mask_matches_flash_attention():
    q, k, v = (rand(1, 512, 4, 128, dtype=torch.bfloat16, seed=i) for i in range(3))
    bm = build_mask("dense", 512, 512, (128, 128)).to(DEV)
    out = longattn.block_sparse_attention(q, k, v, bm)
    torch.testing.assert_close(out, longattn.flash_attention(q, k, v), rtol=0, atol=2e-2)
    causal = masks.causal(512, 512, block_size=128).to(DEV)
    torch.testing.assert_close(longattn.block_sparse_attention(q, k, v, causal),
                               longattn.flash_attention(q, k, v, causal=True), rtol=0, atol=2e-2)


@pytest.mark.parametrize("block", [(64, 64), (128, 64)])
def test_deterministic_gradients_are_bitwise_stable_and_close_to_atomic_ones(block):
    q, k, v = (rand(1, 700, 4, 64, dtype=torch.float16, seed=i) for i in range(3))
    bm = build_mask("bigbird", 700, 700, block, heads=4).to(DEV)
    dout = rand(1, 700, 4, 64, dtype=torch.float16, seed=9)

    def grads(det):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = longattn.block_sparse_attention(*leaves, bm, deterministic=det)
        return torch.autograd.grad(out, leaves, dout)

    first, second = grads(True), grads(True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for a, b in zip(first, grads(False)):  # the same sums, in another order
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    compare(q, k, v, build_mask("streaming", 700, 700, block), deterministic=True)


# ---- torch integration -------------------------------------------------------------------
def test_opcheck_and_compile_fullgraph_on_cuda():
    q, k, v = (rand(1, 200, 2, 64, dtype=torch.bfloat16, seed=i).requires_grad_() for i in range(3))
    bm = masks.streaming(200, 200, sink_tokens=2, window=50, block_size=64).to(DEV)
    lists = list(block_sparse.schedule_lists(bm))
    op_lib.opcheck(torch.ops.longattn.block_sparse_attention_forward.default,
                          (q, k, v, *lists, 64, 64, True, 49, 0, 2, 0.125, 0.0, False))
    f = torch.compile(lambda a, b, c: longattn.block_sparse_attention(a, b, c, bm), fullgraph=True,
                      backend="aot_eager")
    out = f(q, k, v)
    torch.testing.assert_close(out, longattn.block_sparse_attention(q, k, v, bm))
    out.float().sum().backward()
    assert torch.isfinite(q.grad).all()


# ---- bad inputs -----------------------------------------------------------------------------
@pytest.mark.cuda_only
def test_unsupported_block_size_on_cuda_is_a_value_error_naming_block_size():
    q, k, v = (rand(1, 128, 2, 64, dtype=torch.bfloat16, seed=i) for i in range(3))
    cpu_mask = masks.causal(128, 128, block_size=32)  # fine on the CPU
    with pytest.raises(ValueError, match="block_size"):
        cpu_mask.to("cuda")
    lists = [torch.from_numpy(np.array(x)).cuda() for x in block_sparse.schedule_lists(cpu_mask)]
    with pytest.raises(ValueError, match="block_mask.block_size"):
        torch.ops.longattn.block_sparse_attention_forward(q, k, v, *lists, 32, 32, True, -1, 0, 0, 0.125, 0.0, False)


@pytest.mark.cuda_only
def test_mask_on_another_device_is_a_value_error():
    q, k, v = (rand(1, 128, 2, 64, dtype=torch.bfloat16, seed=i) for i in range(3))
    bm = masks.causal(128, 128, block_size=64)
    with pytest.raises(ValueError, match="block_mask.to"):
        longattn.block_sparse_attention(q, k, v, bm)  # NumPy mask, CUDA q
    with pytest.raises(ValueError, match="block_mask.to"):
        longattn.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), bm.to("cuda"))
    lists = [torch.from_numpy(np.array(x)) for x in block_sparse.schedule_lists(bm)]  # CPU lists, CUDA q
    with pytest.raises(ValueError, match="device"):
        torch.ops.longattn.block_sparse_attention_forward(q, k, v, *lists, 64, 64, True, -1, 0, 0, 0.125, 0.0, False)
