"""Specification tests for longattn.block_mask.BlockMask and the builders of longattn.masks.

A BlockMask lists, per query block, the key blocks to visit, split into full tiles (no
element mask) and partial tiles (ElementMask applied, bottom-right aligned), plus the
transposed lists. The references in tests/reference/block_mask.py build every pattern
token by token from its definition; exact builders must expand to exactly that matrix,
and visit exactly the tiles that hold some element of it. Bit tiles (token-granular masks)
are decoded bit by bit by the reference.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from longattn import masks
from longattn.block_mask import BlockMask, ElementMask
from reference import block_mask as ref

BLOCKS = [16, 32, 64, 128, 256]


@st.composite
def geometry(draw, max_len=520):
    """q_len, kv_len (often unequal, rarely block multiples), block_size, batch, heads."""
    q_len = draw(st.integers(1, max_len))
    kv_len = draw(st.one_of(st.integers(1, max_len), st.just(q_len)))
    bs = (draw(st.sampled_from(BLOCKS)), draw(st.sampled_from(BLOCKS)))
    return dict(q_len=q_len, kv_len=kv_len, block_size=bs, batch=draw(st.sampled_from([1, 2])),
                heads=draw(st.sampled_from([1, 3])))


def assert_well_formed(bm):
    """Index arrays int32, sorted within the count, pads 0, q side = transpose."""
    nq, nk = bm.num_blocks
    for prefix in ("", "full_"):
        for side, n in (("kv", nk), ("q", nq)):
            c = np.asarray(getattr(bm, f"{prefix}{side}_num_blocks"))
            i = np.asarray(getattr(bm, f"{prefix}{side}_indices"))
            assert c.dtype == np.int32 and i.dtype == np.int32
            for pos in np.ndindex(c.shape):
                row = i[pos]
                assert list(row[:c[pos]]) == sorted(set(row[:c[pos]].tolist()))
                assert not row[c[pos]:].any(), "pad slots hold 0"
    for prefix in ("", "full_"):
        lists = {side: ref.decode(np.asarray(getattr(bm, f"{prefix}{side}_num_blocks")),
                                  np.asarray(getattr(bm, f"{prefix}{side}_indices"))) for side in ("kv", "q")}
        kv, q = lists["kv"], lists["q"]
        assert np.array_equal(np.swapaxes(kv, -1, -2), q)
    if bm.partial_bits is not None:
        pool = np.asarray(bm.partial_bits)
        assert pool.dtype == np.int32 and pool.shape[1:] == (bm.block_size[0], -(-bm.block_size[1] // 32))
        assert len(np.unique(pool.reshape(len(pool), -1), axis=0)) == len(pool), "pool entries are distinct"
        # q_bits_index names, for every (key block, query block) slot, the tile kv_bits_index names
        kv_c, kv_i, kv_b = (np.asarray(getattr(bm, n)) for n in ("kv_num_blocks", "kv_indices", "kv_bits_index"))
        q_c, q_i, q_b = (np.asarray(getattr(bm, n)) for n in ("q_num_blocks", "q_indices", "q_bits_index"))
        tile_of = {}
        for pos in np.ndindex(kv_c.shape):
            for s in range(kv_c[pos]):
                tile_of[pos + (int(kv_i[pos + (s,)]),)] = int(kv_b[pos + (s,)])
        for pos in np.ndindex(q_c.shape):
            for s in range(q_c[pos]):
                b, h, kb = pos
                assert q_b[pos + (s,)] == tile_of[(b, h, int(q_i[pos + (s,)]), kb)]
        assert len(tile_of) == int(kv_c.sum())


def check_builder(bm, want, geo, exact):
    """bm against the token-level reference `want` (q_len, kv_len)."""
    B, H = geo["batch"], geo["heads"]
    assert bm.shape == (B, H, geo["q_len"], geo["kv_len"])
    assert bm.block_size == tuple(geo["block_size"])
    assert_well_formed(bm)
    got = bm.to_dense_elements()
    assert np.array_equal(got, ref.expand(bm))
    touched = ref.tiles_any(want, bm.block_size)
    layout = bm.to_dense()
    assert np.array_equal(layout, np.broadcast_to(touched, layout.shape)), "visits exactly the touched tiles"
    if exact:
        assert np.array_equal(got, np.broadcast_to(want, got.shape))
        # full exactly where the tile is entirely visible
        full = ref.tiles_all(want, bm.block_size)
        assert np.array_equal(bm.to_dense("full"), np.broadcast_to(full, layout.shape))
    else:
        assert not np.any(np.broadcast_to(want, got.shape) & ~got), "covers the pattern"
        assert np.all(ref.tiles_all(got[0, 0], bm.block_size) >= bm.to_dense("full")[0, 0])


def kw(geo):
    return dict(block_size=geo["block_size"], batch=geo["batch"], heads=geo["heads"])


# ----------------------------------------------------------------------------
# element mask
# ----------------------------------------------------------------------------
# tiles whose corner lies exactly on the causal diagonal / a window edge
@example(geo=dict(q_len=64, kv_len=79, block_size=(16, 16), batch=1, heads=1), causal=True, left=-1, right=-1, sink=0)
@example(geo=dict(q_len=70, kv_len=64, block_size=(16, 32), batch=1, heads=1), causal=False, left=17, right=25, sink=0)
@example(geo=dict(q_len=100, kv_len=90, block_size=(32, 16), batch=1, heads=1), causal=True, left=47, right=-1, sink=16)
@given(geo=geometry(max_len=200), causal=st.booleans(), left=st.integers(-1, 80), right=st.integers(-1, 80),
       sink=st.sampled_from([0, 0, 1, 5, 40]))
def test_element_mask_dense_and_tile_classification_match_the_definition(geo, causal, left, right, sink):
    em = ElementMask(causal, left, right, sink)
    want = ref.element_mask(geo["q_len"], geo["kv_len"], causal, left, right, sink)
    assert np.array_equal(em.to_dense(geo["q_len"], geo["kv_len"]), want)
    layout = np.ones((1, 1) + ref.tiles_any(want, geo["block_size"]).shape, bool)
    bm = BlockMask.from_dense(layout, geo["block_size"], geo["q_len"], geo["kv_len"], mask=em)
    assert np.array_equal(bm.to_dense_elements()[0, 0], want)
    assert np.array_equal(bm.to_dense("full")[0, 0], ref.tiles_all(want, geo["block_size"]))


# ----------------------------------------------------------------------------
# exact builders
# ----------------------------------------------------------------------------
@given(geo=geometry())
def test_causal_expands_to_the_bottom_right_causal_matrix(geo):
    bm = masks.causal(geo["q_len"], geo["kv_len"], **kw(geo))
    check_builder(bm, ref.causal(geo["q_len"], geo["kv_len"]), geo, exact=True)
    assert bm.mask == ElementMask(causal=True)


@given(geo=geometry(), window=st.integers(1, 300))
def test_sliding_window_sees_exactly_the_last_window_keys_up_to_the_diagonal(geo, window):
    bm = masks.sliding_window(geo["q_len"], geo["kv_len"], window, **kw(geo))
    check_builder(bm, ref.sliding_window(geo["q_len"], geo["kv_len"], window), geo, exact=True)


@given(geo=geometry(), sink=st.integers(0, 100), window=st.integers(1, 300))
def test_streaming_sees_exactly_the_sinks_and_the_recent_window(geo, sink, window):
    bm = masks.streaming(geo["q_len"], geo["kv_len"], sink, window, **kw(geo))
    check_builder(bm, ref.streaming(geo["q_len"], geo["kv_len"], sink, window), geo, exact=True)


@given(geo=geometry(), window=st.integers(0, 300))
def test_longformer_without_globals_is_an_exact_symmetric_window(geo, window):
    bm = masks.longformer(geo["q_len"], geo["kv_len"], window, **kw(geo))
    check_builder(bm, ref.longformer(geo["q_len"], geo["kv_len"], window, []), geo, exact=True)


# ----------------------------------------------------------------------------
# token-granular builders (bit tiles)
# ----------------------------------------------------------------------------
@given(geo=geometry(), stride=st.integers(1, 200))
def test_strided_sees_exactly_the_local_band_and_the_summary_columns(geo, stride):
    bm = masks.strided(geo["q_len"], geo["kv_len"], stride, **kw(geo))
    check_builder(bm, ref.strided(geo["q_len"], geo["kv_len"], stride), geo, exact=True)


@given(geo=geometry(), segment=st.integers(1, 300), dilation=st.integers(1, 40))
def test_dilated_sees_exactly_the_dilated_keys_of_its_segment(geo, segment, dilation):
    bm = masks.dilated(geo["q_len"], geo["kv_len"], segment, dilation, **kw(geo))
    check_builder(bm, ref.dilated(geo["q_len"], geo["kv_len"], segment, dilation), geo, exact=True)


@given(geo=geometry(), window=st.integers(0, 200), data=st.data())
def test_longformer_with_globals_sees_exactly_the_window_and_the_global_rows_and_columns(geo, window, data):
    g = data.draw(st.lists(st.integers(0, geo["kv_len"] - 1), min_size=1, max_size=4))
    bm = masks.longformer(geo["q_len"], geo["kv_len"], window, g, **kw(geo))
    check_builder(bm, ref.longformer(geo["q_len"], geo["kv_len"], window, g), geo, exact=True)
    assert bm.mask is None


def test_bit_tiles_are_shared_by_tiles_with_the_same_pattern():
    # a stride of one block: every off-band tile holds the same single summary column
    bm = masks.strided(1024, 1024, 64, block_size=64)
    assert bm.partial_bits is not None and len(bm.partial_bits) <= 4
    assert np.array_equal(bm.to_dense_elements()[0, 0], ref.strided(1024, 1024, 64))


# ----------------------------------------------------------------------------
# any pattern: from_mask_mod, from_dense_elements
# ----------------------------------------------------------------------------
def _document_mask_mod(doc_ids):
    """Packed documents: causal within the same document (doc_ids per token, per batch)."""
    return lambda b, h, q, kv: (doc_ids[b, q] == doc_ids[b, kv]) & (kv <= q)


MASK_MODS = {
    "prefix_lm": lambda b, h, q, kv: (kv <= q) | (kv < 37),
    "per_head_window": lambda b, h, q, kv: np.abs(q - kv) <= 8 + 20 * h,
    "checker": lambda b, h, q, kv: ((q // 7 + kv // 5 + b) % 3) == 0,
    "nothing": lambda b, h, q, kv: np.zeros(np.broadcast_shapes(np.shape(q), np.shape(kv)), bool),
    "everything": lambda b, h, q, kv: np.ones((), bool),
}


@given(geo=geometry(max_len=300), name=st.sampled_from(sorted(MASK_MODS) + ["document"]),
       framework=st.sampled_from(["numpy", "torch"]), seed=st.integers(0, 2**31 - 1))
def test_from_mask_mod_is_exactly_the_predicate(geo, name, framework, seed):
    q_len, kv_len, B, H = geo["q_len"], geo["kv_len"], geo["batch"], geo["heads"]
    if name == "document":
        n = max(q_len, kv_len)
        doc_ids = np.cumsum(np.random.default_rng(seed).random((B, n)) < 0.02, axis=1)
        fn = _document_mask_mod(doc_ids)
    else:
        fn = MASK_MODS[name]
    bm = BlockMask.from_mask_mod(fn, q_len, kv_len, batch=B, heads=H, block_size=geo["block_size"],
                                 device=None if framework == "numpy" else "cpu")
    assert bm.framework == framework and bm.shape == (B, H, q_len, kv_len)
    want = np.zeros((B, H, q_len, kv_len), bool)
    for b in range(B):  # the predicate, element by element over rows
        for h in range(H):
            for i in range(q_len):
                want[b, h, i] = np.broadcast_to(fn(b, h, i, np.arange(kv_len)), (kv_len,))
    assert_well_formed(bm)
    assert np.array_equal(bm.to_dense_elements(), want)
    assert np.array_equal(ref.expand(bm), want)
    assert np.array_equal(bm.to_dense(), ref.tiles_any(want, bm.block_size))
    assert np.array_equal(bm.to_dense("full"), ref.tiles_all(want, bm.block_size))


@given(geo=geometry(max_len=200), p=st.sampled_from([0.0, 0.05, 0.5, 0.97, 1.0]), seed=st.integers(0, 2**31 - 1),
       framework=st.sampled_from(["numpy", "torch"]))
def test_from_dense_elements_round_trips(geo, p, seed, framework):
    el = np.random.default_rng(seed).random((geo["batch"], geo["heads"], geo["q_len"], geo["kv_len"])) < p
    bm = BlockMask.from_dense_elements(torch.from_numpy(el) if framework == "torch" else el, geo["block_size"])
    assert bm.framework == framework
    assert_well_formed(bm)
    assert np.array_equal(bm.to_dense_elements(), el)
    assert np.array_equal(ref.expand(bm), el)
    assert np.array_equal(bm.to_dense("full"), ref.tiles_all(el, bm.block_size))
    again = bm.to("cpu").numpy()
    assert np.array_equal(again.to_dense_elements(), el)
    assert "bit_tiles" in repr(bm)


def test_from_mask_mod_rejects_non_boolean_results_and_non_callables():
    with pytest.raises(TypeError, match="mask_mod"):
        BlockMask.from_mask_mod(lambda b, h, q, kv: q - kv, 64, 64, block_size=16)
    with pytest.raises(TypeError, match="mask_mod"):
        BlockMask.from_mask_mod("causal", 64, 64, block_size=16)
    with pytest.raises(TypeError, match="elements"):
        BlockMask.from_dense_elements(np.ones((4, 4), np.int8), 16)


@given(geo=geometry(), w=st.integers(0, 3), g=st.integers(0, 2), r=st.integers(0, 4), seed=st.integers(0, 99))
def test_bigbird_has_window_global_and_the_requested_random_blocks_deterministically(geo, w, g, r, seed):
    q_len, kv_len, (bq, bk) = geo["q_len"], geo["kv_len"], geo["block_size"]
    bm = masks.bigbird(q_len, kv_len, w, g, r, seed, **kw(geo))
    again = masks.bigbird(q_len, kv_len, w, g, r, seed, **kw(geo))
    assert_well_formed(bm)
    layout = bm.to_dense()
    assert np.array_equal(layout, again.to_dense())
    assert np.array_equal(layout[0], layout[-1]), "same pattern for every batch element"
    nq, nk = bm.num_blocks
    base = np.zeros((nq, nk), bool)
    for a in range(nq):
        pos = [min(max(i + kv_len - q_len, 0), kv_len - 1) for i in range(a * bq, min((a + 1) * bq, q_len))]
        lo, hi = pos[0] // bk, pos[-1] // bk
        base[a, max(lo - w, 0):hi + w + 1] = True
    base[:, :g] = True
    base[:g, :] = True
    for h in range(geo["heads"]):
        lay = layout[0, h]
        assert np.all(lay >= base)
        extra = (lay & ~base).sum(axis=-1)
        assert np.array_equal(extra, np.minimum(r, (~base).sum(axis=-1)) * (np.arange(nq) >= g))
    # block granular, exact: visited tiles fully visible up to the padding
    assert np.array_equal(bm.to_dense_elements(), ref.expand(bm))
    assert bm.mask is None


def test_bigbird_seeds_and_heads_differ():
    a = masks.bigbird(2048, 2048, 1, 1, 3, seed=0, block_size=64, heads=2).to_dense()
    b = masks.bigbird(2048, 2048, 1, 1, 3, seed=1, block_size=64, heads=2).to_dense()
    assert not np.array_equal(a, b)
    assert not np.array_equal(a[0, 0], a[0, 1])


# ----------------------------------------------------------------------------
# from_dense, lists, density
# ----------------------------------------------------------------------------
@given(geo=geometry(max_len=300), seed=st.integers(0, 2**32 - 1), p=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
       mask=st.sampled_from([None, ElementMask(True), ElementMask(False, 20, 5), ElementMask(True, 60, -1, 7)]),
       framework=st.sampled_from(["numpy", "torch"]))
def test_from_dense_round_trips_and_classifies_full_tiles_as_provably_visible(geo, seed, p, mask, framework):
    q_len, kv_len, bs = geo["q_len"], geo["kv_len"], geo["block_size"]
    nq, nk = -(-q_len // bs[0]), -(-kv_len // bs[1])
    layout = np.random.default_rng(seed).random((geo["batch"], geo["heads"], nq, nk)) < p
    arg = torch.from_numpy(layout) if framework == "torch" else layout
    bm = BlockMask.from_dense(arg, bs, q_len, kv_len, mask=mask)
    assert bm.framework == framework
    assert isinstance(bm.kv_indices, torch.Tensor if framework == "torch" else np.ndarray)
    assert np.array_equal(bm.to_dense(), layout)
    assert_well_formed(bm)
    em = np.ones((q_len, kv_len), bool) if mask is None else ref.element_mask(
        q_len, kv_len, mask.causal, mask.window_left, mask.window_right, mask.sink_tokens)
    assert np.array_equal(bm.to_dense("full"), layout & ref.tiles_all(em, bs))
    assert not np.any(bm.to_dense("full") & bm.to_dense("partial"))
    assert np.array_equal(bm.to_dense_elements(), ref.expand(bm))
    assert bm.density() == pytest.approx(layout.mean())


def test_density_counts_tile_pairs_averaged_over_batch_and_heads():
    layout = np.zeros((2, 1, 3, 4), bool)
    layout[0, 0, :, 0] = True  # 3 of 12
    layout[1, 0] = True  # 12 of 12
    bm = BlockMask.from_dense(layout, 16, 40, 50)
    assert bm.density() == pytest.approx((3 + 12) / 24)
    assert bm.sparsity() == pytest.approx(1 - 15 / 24)
    assert masks.causal(256, 256, block_size=128).density() == pytest.approx(3 / 4)


def test_constructor_computes_the_query_side_when_omitted_and_accepts_given_ones():
    bm = masks.sliding_window(300, 400, 70, block_size=(32, 64), heads=2)
    fields = [bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices]
    again = BlockMask(*fields, block_size=(32, 64), q_len=300, kv_len=400, mask=bm.mask)
    for name in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert np.array_equal(getattr(again, name), getattr(bm, name))
    assert not bm.kv_indices.flags.writeable


def test_shape_repr_to_and_numpy():
    bm = masks.causal(100, 130, block_size=(16, 32), batch=2)
    assert bm.shape == (2, 1, 100, 130)
    text = repr(bm)
    assert "BlockMask" in text and "(16, 32)" in text and "causal=True" in text
    t = bm.to("cpu")
    assert t.framework == "torch" and t.kv_indices.dtype == torch.int32
    assert np.array_equal(t.to_dense_elements(), bm.to_dense_elements())
    back = t.numpy()
    assert back.framework == "numpy" and np.array_equal(back.to_dense(), bm.to_dense())
    on_torch = masks.causal(100, 130, block_size=16, device="cpu")
    assert isinstance(on_torch.kv_indices, torch.Tensor)


def test_empty_lengths_give_empty_masks():
    bm = masks.causal(0, 50, block_size=16)
    assert bm.to_dense().shape == (1, 1, 0, 4) and bm.density() == 0.0
    assert masks.causal(10, 0, block_size=16).to_dense_elements().shape == (1, 1, 10, 0)


# ----------------------------------------------------------------------------
# combinations
# ----------------------------------------------------------------------------
@given(geo=geometry(max_len=300), w1=st.integers(1, 200), w2=st.integers(1, 200), s=st.integers(1, 100))
def test_union_and_intersection_are_elementwise_or_and(geo, w1, w2, s):
    a = masks.sliding_window(geo["q_len"], geo["kv_len"], w1, block_size=geo["block_size"], heads=geo["heads"])
    b = masks.strided(geo["q_len"], geo["kv_len"], s, block_size=geo["block_size"], batch=geo["batch"])
    c = masks.causal(geo["q_len"], geo["kv_len"], block_size=geo["block_size"], batch=geo["batch"])
    b2 = masks.streaming(geo["q_len"], geo["kv_len"], 3, w2, block_size=geo["block_size"])
    u, n = masks.union(b, c), masks.intersection(b, c)
    assert np.array_equal(u.to_dense_elements(), b.to_dense_elements() | c.to_dense_elements())
    assert np.array_equal(n.to_dense_elements(), b.to_dense_elements() & c.to_dense_elements())
    for m in (u, n):
        assert_well_formed(m)
        assert np.array_equal(m.to_dense_elements(), ref.expand(m))
    # different element masks, and bit tiles: token-exact
    for x, y in ((a, b2), (a, c), (b, b2)):
        for combine, op in ((masks.union, np.logical_or), (masks.intersection, np.logical_and)):
            m = combine(x, y)
            want = op(x.to_dense_elements(), y.to_dense_elements())
            assert np.array_equal(m.to_dense_elements(), want)
            assert np.array_equal(ref.expand(m), want)
            assert_well_formed(m)
            assert np.array_equal(m.to_dense("full"), ref.tiles_all(want, m.block_size))
    # same element mask, different batch / heads: broadcast
    a2 = masks.sliding_window(geo["q_len"], geo["kv_len"], w1, block_size=geo["block_size"], batch=geo["batch"])
    u2 = masks.union(a, a2)
    assert u2.shape[:2] == (geo["batch"], geo["heads"])
    assert np.array_equal(u2.to_dense_elements(), np.broadcast_to(a.to_dense_elements(), u2.shape))


def test_union_rejects_different_geometry():
    with pytest.raises(ValueError, match="kv_len"):
        masks.union(masks.causal(64, 64, block_size=16), masks.causal(64, 80, block_size=16))
    with pytest.raises(ValueError, match="block_size"):
        masks.union(masks.causal(64, 64, block_size=16), masks.causal(64, 64, block_size=32))


def test_stack_heads_puts_each_pattern_on_its_heads():
    kw_ = dict(block_size=32)
    ms = [masks.causal(200, 260, **kw_), masks.strided(200, 260, 48, heads=2, **kw_),
          masks.dilated(200, 260, 96, 4, **kw_)]
    st_ = masks.stack_heads(ms)
    assert st_.shape == (1, 4, 200, 260)
    want = np.concatenate([m.to_dense_elements() for m in ms], axis=1)
    assert np.array_equal(st_.to_dense_elements(), want)
    assert_well_formed(st_)
    mixed = masks.stack_heads([masks.causal(200, 260, **kw_), masks.sliding_window(200, 260, 8, heads=2, **kw_)])
    assert np.array_equal(mixed.to_dense_elements()[0, 0], ref.causal(200, 260))
    assert np.array_equal(mixed.to_dense_elements()[0, 2], ref.sliding_window(200, 260, 8))
    assert_well_formed(mixed)
    with pytest.raises(ValueError, match=r"masks\[1\].*q_len"):
        masks.stack_heads([masks.causal(200, 260, **kw_), masks.causal(100, 260, **kw_)])


# ----------------------------------------------------------------------------
# top-k
# ----------------------------------------------------------------------------
@given(geo=geometry(max_len=400), hkv=st.sampled_from([1, 2]), rep=st.sampled_from([1, 2]),
       num_blocks=st.integers(0, 6), causal=st.booleans(), framework=st.sampled_from(["numpy", "torch"]),
       seed=st.integers(0, 2**32 - 1))
def test_topk_blocks_keeps_the_diagonal_and_the_best_scoring_allowed_blocks(geo, hkv, rep, num_blocks, causal,
                                                                            framework, seed):
    q_len, kv_len, bs = geo["q_len"], geo["kv_len"], geo["block_size"]
    B, H = geo["batch"], hkv * rep
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, q_len, H, 8)).astype(np.float32)
    k = rng.standard_normal((B, kv_len, hkv, 8)).astype(np.float32)
    args = (torch.from_numpy(q), torch.from_numpy(k)) if framework == "torch" else (q, k)
    bm = masks.topk_blocks(*args, bs, num_blocks, causal=causal)
    assert bm.framework == framework and bm.shape == (B, H, q_len, kv_len)
    assert bm.mask == (ElementMask(causal=True) if causal else None)
    assert_well_formed(bm)
    layout = bm.to_dense()
    scores = ref.pooled_scores(q, k, bs)
    diag = ref.diagonal_tiles(q_len, kv_len, bs)
    allowed = ref.tiles_any(ref.causal(q_len, kv_len), bs) if causal else np.ones_like(diag)
    assert np.all(layout >= diag)
    assert not np.any(layout & ~allowed)
    cand = allowed & ~diag
    for pos in np.ndindex(B, H, diag.shape[0]):
        row, c = layout[pos], cand[pos[-1]]
        n_extra = min(max(num_blocks - int(diag[pos[-1]].sum()), 0), int(c.sum()))
        chosen = row & c
        assert chosen.sum() == n_extra
        if 0 < n_extra < c.sum():  # chosen scores dominate the rejected ones (float32 slack)
            assert scores[pos][chosen].min() >= scores[pos][c & ~chosen].max() - 1e-4
    if causal:
        assert np.array_equal(bm.to_dense_elements(), ref.expand(bm))


def test_topk_blocks_picks_the_planted_block():
    q = np.zeros((1, 256, 1, 4), np.float32)
    k = np.zeros((1, 256, 1, 4), np.float32)
    q[0, 192:, 0, 0] = 1.0
    k[0, 64:128, 0, 0] = 5.0
    k[0, 0:64, 0, 0] = -5.0
    bm = masks.topk_blocks(q, k, 64, 2)
    assert bm.to_dense()[0, 0, 3].tolist() == [False, True, False, True]


# ----------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------
def _good():
    return masks.causal(100, 100, block_size=32)  # 4 x 4 blocks, last row / column cut


def _fields(**change):
    bm = _good()
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
             "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
    f = {n: np.array(getattr(bm, n)) for n in names}
    for n, fn in change.items():
        f[n] = fn(f[n])
    return f


def _set(pos, value):
    def fn(a):
        a = a.copy()
        a[pos] = value
        return a
    return fn


def _build(kv_only=False, block_size=32, q_len=100, kv_len=100, mask=ElementMask(causal=True), **change):
    f = _fields(**change)
    args = [f["kv_num_blocks"], f["kv_indices"], f["full_kv_num_blocks"], f["full_kv_indices"]]
    if not kv_only:
        args += [f["q_num_blocks"], f["q_indices"], f["full_q_num_blocks"], f["full_q_indices"]]
    return lambda: BlockMask(*args, block_size=block_size, q_len=q_len, kv_len=kv_len, mask=mask)


# The fixture: causal 100 x 100 in 32 x 32 tiles (4 x 4). Rows 0..2 have full tiles left of
# the diagonal and a partial diagonal tile; row 3 and column 3 are cut, so row 3 is all partial.
INVALID = {
    "index_out_of_range": (_build(kv_only=True, kv_indices=_set((0, 0, 0, 0), 4)), ValueError, "kv_indices"),
    "negative_index": (_build(kv_only=True, full_kv_indices=_set((0, 0, 1, 0), -1)), ValueError, "full_kv_indices"),
    "pad_out_of_range": (_build(kv_only=True, kv_indices=_set((0, 0, 0, 3), 7)), ValueError, "kv_indices"),
    "count_too_big": (_build(kv_only=True, kv_num_blocks=_set((0, 0, 0), 5)), ValueError, "kv_num_blocks"),
    "count_negative": (_build(kv_only=True, full_kv_num_blocks=_set((0, 0, 0), -1)), ValueError, "full_kv_num_blocks"),
    "unsorted": (_build(kv_only=True, kv_indices=_set((0, 0, 3, slice(0, 4)), [1, 0, 2, 3])), ValueError, "kv_indices"),
    "duplicated": (_build(kv_only=True, kv_indices=_set((0, 0, 3, slice(0, 4)), [0, 1, 1, 3])), ValueError,
                   "kv_indices"),
    "overlap_full_partial": (_build(kv_only=True, kv_indices=_set((0, 0, 1, slice(0, 2)), [0, 1]),
                                    kv_num_blocks=_set((0, 0, 1), 2)), ValueError, "full_kv_indices"),
    "full_tile_cut_by_kv_len": (_build(kv_only=True, full_kv_num_blocks=_set((0, 0, 3), 4),
                                       full_kv_indices=_set((0, 0, 3, slice(0, 4)), [0, 1, 2, 3]),
                                       kv_num_blocks=_set((0, 0, 3), 0)), ValueError, "full_kv_indices"),
    "q_side_not_transpose": (_build(q_indices=_set((0, 0, 0, 0), 1)), ValueError, "q_indices"),
    "q_side_partial": (_build(q_indices=lambda a: None), ValueError, "q_indices"),
    "int64": (_build(kv_only=True, kv_indices=lambda a: a.astype(np.int64)), TypeError, "kv_indices"),
    "float_counts": (_build(kv_only=True, full_kv_num_blocks=lambda a: a.astype(np.float32)), TypeError,
                     "full_kv_num_blocks"),
    "wrong_shape": (_build(kv_only=True, kv_indices=lambda a: a[..., :3]), ValueError, "kv_indices"),
    "wrong_kv_len": (_build(kv_only=True, kv_len=200), ValueError, "kv_indices"),
    "block_size_not_power_of_two": (_build(block_size=48), ValueError, "block_size"),
    "block_size_too_small": (_build(block_size=(8, 32)), ValueError, "block_size"),
    "block_size_too_big": (_build(block_size=512), ValueError, "block_size"),
    "list_not_array": (_build(kv_only=True, kv_num_blocks=lambda a: a.tolist()), TypeError, "kv_num_blocks"),
    "mixed_frameworks": (_build(kv_only=True, kv_indices=lambda a: torch.from_numpy(a)), TypeError, "kv_indices"),
    "mask_type": (_build(mask="causal"), TypeError, "mask"),
    "from_dense_not_bool": (lambda: BlockMask.from_dense(np.ones((4, 4), np.int32), 32, 100, 100), TypeError, "layout"),
    "from_dense_shape": (lambda: BlockMask.from_dense(np.ones((4, 5), bool), 32, 100, 100), ValueError, "layout"),
    "from_dense_block_size": (lambda: BlockMask.from_dense(np.ones((4, 4), bool), 24, 100, 100), ValueError,
                              "block_size"),
    "element_mask_window": (lambda: ElementMask(True, -2), ValueError, "window_left"),
    "element_mask_sink": (lambda: ElementMask(True, sink_tokens=-1), ValueError, "sink_tokens"),
    "builder_window": (lambda: masks.sliding_window(10, 10, 0, block_size=16), ValueError, "window"),
    "builder_block_size": (lambda: masks.causal(10, 10, block_size=100), ValueError, "block_size"),
    "longformer_global": (lambda: masks.longformer(10, 10, 2, [10], block_size=16), ValueError, "global_tokens"),
    "topk_heads": (lambda: masks.topk_blocks(np.zeros((1, 8, 3, 4)), np.zeros((1, 8, 2, 4)), 16, 1), ValueError,
                   "heads"),
    "topk_frameworks": (lambda: masks.topk_blocks(np.zeros((1, 8, 2, 4)), torch.zeros(1, 8, 2, 4), 16, 1),
                        TypeError, "k"),
}


def _one_full_tile(q_len, kv_len, row, col):
    """Lists for a single full tile (row, col) on a 32 x 32 grid of q_len x kv_len."""
    nq, nk = -(-q_len // 32), -(-kv_len // 32)
    zc = lambda n: np.zeros((1, 1, n), np.int32)  # noqa: E731
    fc, fi = zc(nq), np.zeros((1, 1, nq, nk), np.int32)
    fc[0, 0, row], fi[0, 0, row, 0] = 1, col
    return lambda: BlockMask(zc(nq), np.zeros((1, 1, nq, nk), np.int32), fc, fi, block_size=32, q_len=q_len,
                             kv_len=kv_len)


INVALID["full_tile_cut_by_kv_len_only"] = (_one_full_tile(64, 40, 0, 1), ValueError, "full_kv_indices")
INVALID["full_tile_cut_by_q_len_only"] = (_one_full_tile(40, 64, 1, 0), ValueError, "full_kv_indices")


_ALL = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
        "full_q_num_blocks", "full_q_indices", "partial_bits", "kv_bits_index", "q_bits_index")


def _build_bits(**change):
    """A bit-tile mask (strided, 100 x 100 in 32 x 32 tiles) with fields changed."""
    bm = masks.strided(100, 100, 10, block_size=32)
    f = {n: np.array(getattr(bm, n)) for n in _ALL}
    for n, fn in change.items():
        f[n] = fn(f[n])
    bits = {n: f[n] for n in _ALL[8:]}
    return lambda: BlockMask(*(f[n] for n in _ALL[:8]), block_size=32, q_len=100, kv_len=100, **bits)


def _other_tile(a):
    a = a.copy()
    a[0, 0, 0, 0] = (a[0, 0, 0, 0] + 1) % 2  # the pool holds at least two tiles
    return a


INVALID.update({
    "bits_without_index": (_build_bits(kv_bits_index=lambda a: None), ValueError, "kv_bits_index"),
    "index_without_bits": (_build_bits(partial_bits=lambda a: None, q_bits_index=lambda a: None), ValueError,
                           "partial_bits"),
    "bits_wrong_words": (_build_bits(partial_bits=lambda a: np.concatenate([a, a], axis=-1)), ValueError,
                         "partial_bits"),
    "bits_int64": (_build_bits(partial_bits=lambda a: a.astype(np.int64)), TypeError, "partial_bits"),
    "bits_index_out_of_range": (_build_bits(kv_bits_index=lambda a: np.where(a == a.max(), a.max() + 1, a)),
                                ValueError, "kv_bits_index"),
    "bits_index_negative_pad": (_build_bits(kv_bits_index=_set((0, 0, 0, 3), -1)), ValueError, "kv_bits_index"),
    "bits_index_shape": (_build_bits(kv_bits_index=lambda a: a[..., :2]), ValueError, "kv_bits_index"),
    "q_bits_not_transpose": (_build_bits(q_bits_index=_other_tile), ValueError, "q_bits_index"),
})


def test_the_valid_fixture_constructs():
    bm = _build_bits()()
    assert len(bm.partial_bits) >= 2 and bm.kv_num_blocks[0, 0, 0] >= 1
    _build_bits(q_bits_index=lambda a: None)()
    _one_full_tile(64, 40, 0, 0)()
    _one_full_tile(40, 64, 0, 1)()
    _build()()
    _build(kv_only=True)()


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_masks_are_rejected_with_an_error_naming_the_field(name):
    call, exc, field = INVALID[name]
    with pytest.raises(exc) as info:
        call()
    assert re.search(rf"\b{field}\b", str(info.value)), f"message does not name {field!r}: {info.value}"


def test_cpu_accepts_every_power_of_two_block_size_from_16_to_256():
    for bq in BLOCKS:
        for bk in BLOCKS:
            assert masks.causal(300, 300, block_size=(bq, bk)).block_size == (bq, bk)


# ----------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_to_moves_every_array_and_checks_the_block_size():
    bm = masks.sliding_window(1000, 1200, 300, block_size=(64, 128))
    on = bm.to("cuda")
    assert on.kv_indices.is_cuda and on.full_q_indices.is_cuda and on.kv_indices.dtype == torch.int32
    assert np.array_equal(on.to_dense_elements(), bm.to_dense_elements())
    with pytest.raises(ValueError, match="block_size"):
        masks.causal(100, 100, block_size=32).to("cuda")
    q = torch.randn(1, 500, 2, 16, device="cuda")
    t = masks.topk_blocks(q, q, 64, 3)
    assert t.kv_indices.is_cuda
