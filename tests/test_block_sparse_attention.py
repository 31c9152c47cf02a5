"""block_sparse_attention: attention restricted to a BlockMask equals dense attention with
the BlockMask's expanded element mask (float64 reference), forward and backward."""
import math

import numpy as np
import pytest
import torch
from torch import library as op_lib  # noqa: E402
from hypothesis import given, strategies as st

import longattn
from longattn import block_sparse, masks
from longattn import torch_ops  # noqa: E402,F401  (registers torch.ops.longattn.*)
from reference.attention import (assert_close_by_rule, assert_lse_matches, attention_reference,
                                 naive_attention_low_precision)


def _mask_reference_torch(q, k, v, elements, scale=None):
    """Differentiable float64 attention with a boolean (B|1, H|1, Sq, Sk) mask."""
    heads, hkv = q.shape[2], k.shape[2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    ke = k.repeat_interleave(heads // hkv, 2)
    ve = v.repeat_interleave(heads // hkv, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, ke) * scale
    vis = torch.as_tensor(np.asarray(elements, dtype=bool)).expand_as(s)
    s = s.masked_fill(~vis, -math.inf)
    empty = ~vis.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(~vis, 0.0)
    return torch.einsum("bhij,bjhd->bihd", p, ve)


def _builder(kind, sq, sk, block, heads, seed):
    if kind == "causal":
        return masks.causal(sq, sk, block_size=block)
    if kind == "sliding_window":
        return masks.sliding_window(sq, sk, max(1, sk // 3), block_size=block)
    if kind == "streaming":
        return masks.streaming(sq, sk, sink_tokens=3, window=max(1, sk // 4), block_size=block)
    if kind == "bigbird":
        return masks.bigbird(sq, sk, 1, 1, 1, seed=seed, block_size=block, heads=heads)
    # token-granular masks (bit tiles)
    if kind == "strided":
        return masks.strided(sq, sk, 7 + seed, block_size=block)
    if kind == "longformer_globals":
        return masks.longformer(sq, sk, 5, [0, sk // 2], block_size=block)
    if kind == "union_mixed":
        return masks.union(masks.dilated(sq, sk, 40, 3, block_size=block),
                           masks.streaming(sq, sk, 2, 9, block_size=block, heads=heads))
    if kind == "random_elements":
        rng = np.random.default_rng(seed)
        return longattn.BlockMask.from_dense_elements(rng.random((1, heads, sq, sk)) < 0.3, block)
    rng = np.random.default_rng(seed)  # random layout, no element mask
    nq, nk = -(-sq // block[0]), -(-sk // block[1])
    return longattn.BlockMask.from_dense(rng.random((1, heads, nq, nk)) < 0.4, block, sq, sk)


shapes = st.fixed_dictionaries(dict(
    kind=st.sampled_from(["causal", "sliding_window", "streaming", "bigbird", "random", "strided",
                          "longformer_globals", "union_mixed", "random_elements"]),
    sq=st.sampled_from([1, 17, 63, 130, 257]),
    sk_extra=st.sampled_from([0, 0, 5, 70]),
    block=st.sampled_from([(16, 16), (32, 64), (64, 64), (64, 128), (128, 32), (256, 256)]),
    gqa=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
    mask_heads=st.booleans(),
    d=st.sampled_from([8, 24, 64]),
    seed=st.integers(0, 3),
))


def _inputs(case, dtype=torch.float64):
    g = torch.Generator().manual_seed(case["seed"])
    heads, hkv = case["gqa"]
    sq, sk = case["sq"], case["sq"] + case["sk_extra"]
    q = torch.randn(2, sq, heads, case["d"], generator=g, dtype=torch.float64)
    k = torch.randn(2, sk, hkv, case["d"], generator=g, dtype=torch.float64)
    v = torch.randn(2, sk, hkv, case["d"], generator=g, dtype=torch.float64)
    bm = _builder(case["kind"], sq, sk, case["block"], heads if case["mask_heads"] else 1, case["seed"])
    return q.to(dtype), k.to(dtype), v.to(dtype), bm


@given(shapes)
def test_output_and_lse_equal_dense_attention_with_the_expanded_element_mask(case):
    q, k, v, bm = _inputs(case)
    out, lse = longattn.block_sparse_attention(q, k, v, bm, return_lse=True)
    ref, ref_lse = attention_reference(q.numpy(), k.numpy(), v.numpy(), extra_mask=bm.to_dense_elements())
    assert_close_by_rule(out, ref, None, what="out")
    assert_lse_matches(lse, ref_lse, None)


@given(shapes, st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_low_precision_output_within_twice_the_naive_error(case, dtype):
    q, k, v, bm = _inputs(case, dtype)
    out = longattn.block_sparse_attention(q, k, v, bm)
    elements = bm.to_dense_elements()
    ref, _ = attention_reference(q.double().numpy(), k.double().numpy(), v.double().numpy(), extra_mask=elements)
    # naive: the textbook computation in `dtype` with the same mask
    heads = q.shape[2]
    ke = k.repeat_interleave(heads // k.shape[2], 2)
    ve = v.repeat_interleave(heads // v.shape[2], 2)
    s = torch.einsum("bihd,bjhd->bhij", q * (1 / math.sqrt(q.shape[-1])), ke)
    vis = torch.as_tensor(np.asarray(elements, dtype=bool)).expand_as(s)
    s = s.masked_fill(~vis, -math.inf)
    p = torch.softmax(s.float().masked_fill(~vis.any(-1, keepdim=True), 0.0), -1).to(dtype).masked_fill(~vis, 0)
    naive = torch.einsum("bhij,bjhd->bihd", p, ve)
    assert_close_by_rule(out, ref, naive, what="out")


@given(shapes)
def test_gradients_equal_autograd_of_the_masked_reference(case):
    q, k, v, bm = _inputs(case)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = longattn.block_sparse_attention(q, k, v, bm)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = _mask_reference_torch(q, k, v, bm.to_dense_elements())
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"d{name}")


@pytest.mark.parametrize("block", [(64, 64), (128, 128), (32, 256)])
def test_dense_causal_block_mask_gives_the_flash_attention_result(block):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 300, 4, 32, generator=g) for _ in range(3))
    bm = masks.causal(300, 300, block_size=block)
    torch.testing.assert_close(longattn.block_sparse_attention(q, k, v, bm),
                               longattn.flash_attention(q, k, v, causal=True), rtol=1e-5, atol=1e-6)


def test_numpy_in_numpy_out():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 100, 2, 16)).astype(np.float32) for _ in range(3))
    bm = masks.sliding_window(100, 100, 40, block_size=32)
    out = longattn.block_sparse_attention(q, k, v, bm)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    ref, _ = attention_reference(q, k, v, extra_mask=bm.to_dense_elements())
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_opcheck_and_compile_fullgraph():
    q, k, v = (torch.randn(1, 70, 2, 16, requires_grad=True) for _ in range(3))
    bm = masks.streaming(70, 70, sink_tokens=2, window=20, block_size=16)
    lists = [torch.from_numpy(np.array(x)) for x in block_sparse.schedule_lists(bm)]
    op_lib.opcheck(torch.ops.longattn.block_sparse_attention_forward.default,
                          (q, k, v, *lists, 16, 16, True, 19, 0, 2, 0.25, 0.0, False))
    f = torch.compile(lambda a, b, c: longattn.block_sparse_attention(a, b, c, bm), fullgraph=True,
                      backend="aot_eager")
    out = f(q, k, v)
    torch.testing.assert_close(out, longattn.block_sparse_attention(q, k, v, bm))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_mismatched_lengths_and_bad_masks_are_rejected_naming_the_argument():
    q, k, v = (torch.randn(1, 64, 2, 16) for _ in range(3))
    with pytest.raises(ValueError, match="block_mask"):
        longattn.block_sparse_attention(q, k, v, masks.causal(128, 128, block_size=64))
    with pytest.raises(TypeError, match="block_mask"):
        longattn.block_sparse_attention(q, k, v, np.ones((1, 1, 1, 1), bool))
    bm = masks.causal(64, 64, block_size=32, heads=3)  # 3 mask heads for 2 query heads
    with pytest.raises(ValueError, match="kv_num_blocks"):
        longattn.block_sparse_attention(q, k, v, bm)


def test_cuda_block_size_rule_does_not_apply_on_the_cpu():
    # CUDA takes block sizes 64 and 128 only; the CPU keeps every power of two 16..256.
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 90, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    for block in [(16, 16), (32, 256), (256, 32)]:
        bm = masks.sliding_window(90, 90, 30, block_size=block)
        out = longattn.block_sparse_attention(q, k, v, bm)
        ref, _ = attention_reference(q.numpy(), k.numpy(), v.numpy(), extra_mask=bm.to_dense_elements())
        assert_close_by_rule(out, ref, None, what="out")


def test_torch_cpu_and_numpy_masks_both_serve_cpu_inputs():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 80, 2, 16, generator=g) for _ in range(3))
    bm = masks.causal(80, 80, block_size=32)
    torch.testing.assert_close(longattn.block_sparse_attention(q, k, v, bm.to("cpu")),
                               longattn.block_sparse_attention(q, k, v, bm))


def test_deterministic_flag_is_checked_and_cpu_gradients_are_reproducible():
    q, k, v = (torch.randn(1, 70, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bm = masks.streaming(70, 70, sink_tokens=2, window=20, block_size=16)
    with pytest.raises(TypeError, match="deterministic"):
        longattn.block_sparse_attention(q, k, v, bm, deterministic=1)
    grads = [torch.autograd.grad(longattn.block_sparse_attention(q, k, v, bm, deterministic=d).sum(), (q, k, v))
             for d in (False, True)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_bit_tile_masks_equal_flash_attention_with_the_same_pattern():
    # a bit-tile mask holding the causal sliding window gives flash_attention's result
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 333, 4, 32, generator=g, dtype=torch.float64) for _ in range(3))
    bm = longattn.BlockMask.from_mask_mod(lambda b, h, i, j: (j <= i) & (j > i - 50), 333, 333, block_size=64)
    assert bm.partial_bits is not None and bm.mask is None
    torch.testing.assert_close(longattn.block_sparse_attention(q, k, v, bm),
                               longattn.flash_attention(q, k, v, causal=True, window=(49, 0)), rtol=1e-12,
                               atol=1e-12)


def test_opcheck_with_bit_tiles():
    q, k, v = (torch.randn(1, 90, 2, 16, requires_grad=True) for _ in range(3))
    bm = masks.strided(90, 90, 11, block_size=32)
    lists = [torch.from_numpy(np.array(x)) for x in block_sparse.schedule_lists(bm)]
    op_lib.opcheck(torch.ops.longattn.block_sparse_attention_forward.default,
                          (q, k, v, *lists, 32, 32, False, -1, -1, 0, 0.25, 0.0, False))


def test_the_kernel_binding_rejects_bit_indices_outside_the_pool():
    # BlockMask validates its arrays; the binding re-checks host lists handed to the op directly
    q, k, v = (torch.randn(1, 90, 2, 16) for _ in range(3))
    bm = masks.strided(90, 90, 11, block_size=32)
    lists = [torch.from_numpy(np.array(x)) for x in block_sparse.schedule_lists(bm)]
    bad = lists[9].clone()
    bad[0, 0, 0, 0] = len(lists[8])
    lists[9] = bad
    with pytest.raises(ValueError, match="kv_bits_index"):
        torch.ops.longattn.block_sparse_attention_forward(q, k, v, *lists, 32, 32, False, -1, -1, 0, 0.25, 0.0, False)
    lists[8] = lists[8][:, :, :0]  # wrong pool shape
    with pytest.raises(ValueError, match="partial_bits"):
        torch.ops.longattn.block_sparse_attention_forward(q, k, v, *lists, 32, 32, False, -1, -1, 0, 0.25, 0.0, False)
