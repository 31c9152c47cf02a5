"""Builders of `BlockMask` for common sparse-attention patterns.

Every builder takes q_len and kv_len (tokens), the pattern's parameters, and keywords
block_size (an int or (block_q, block_k); default 128), batch and heads (default 1: the
mask broadcasts over them) and device (None: NumPy arrays; else torch tensors on that
device, e.g. "cuda"). Positions are bottom-right aligned as in `flash_attention`: query i
sits at position d(i) = i + kv_len - q_len, its diagonal.

Every builder is exact: the visible elements (`BlockMask.to_dense_elements()`) are exactly
the pattern (bigbird's pattern is block-granular by definition). Tiles visited are exactly
the tiles holding at least one visible element; tiles whose elements are all visible are
full. causal, sliding_window, streaming and longformer without global tokens express
their partial tiles with an `ElementMask`; strided, dilated and longformer with global
tokens store bit tiles (`BlockMask.partial_bits`, one per distinct tile), as do unions,
intersections and stacks of masks whose element masks differ. Any other pattern:
`BlockMask.from_mask_mod`.
"""
from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

import numpy as np

from . import _arrays
from .block_mask import (BlockMask, ElementMask, _from_layouts, _is_int, _num_blocks, band_any, block_grid,
                         check_block_size, classify, from_tile_elements, place)

__all__ = ["causal", "sliding_window", "strided", "dilated", "bigbird", "longformer", "streaming", "union",
           "intersection", "stack_heads", "topk_blocks"]

DEFAULT_BLOCK_SIZE = 128


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _int(v: Any, name: str, op: str, lo: int = 0) -> int:
    if not _is_int(v):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{op}: {name} must be >= {lo}, got {v}")
    return int(v)


def _geometry(q_len, kv_len, block_size, batch, heads, device, op):
    q_len = _int(q_len, "q_len", op)
    kv_len = _int(kv_len, "kv_len", op)
    batch = _int(batch, "batch", op, 1)
    heads = _int(heads, "heads", op, 1)
    fw, dev, dev_type = place(device, op)
    bs = check_block_size(block_size, dev_type, op)
    return q_len, kv_len, bs, batch, heads, fw, dev


def _finish(visited: np.ndarray, mask: Optional[ElementMask], q_len, kv_len, bs, batch, heads, fw, dev) -> BlockMask:
    """visited: boolean (nQb, nKb) or (B|1, H|1, nQb, nKb) tiles; full = visited tiles
    that `mask` leaves entirely visible, partial = the rest."""
    _, all_ = classify(mask, q_len, kv_len, bs)
    if visited.ndim == 2:
        visited = visited[None, None]
    shape = (batch, heads) + visited.shape[2:]
    visited = np.broadcast_to(visited, shape)
    full = visited & all_
    return _from_layouts(full, visited & ~full, bs, q_len, kv_len, mask, fw, dev)


def _exact_pattern(touched: np.ndarray, visible, q_len, kv_len, bs, batch, heads, fw, dev,
                   by_column: Optional[np.ndarray] = None) -> BlockMask:
    """A token-exact mask of a pattern that does not depend on batch and head: touched
    (nQb, nKb) holds every tile with an element of it, visible(i, j) -> bool decides
    elements (i, j int arrays that broadcast). by_column (nQb, nKb), optional: tiles whose
    elements depend on the key only, so that uncut ones of one key block are evaluated once."""
    bq, bk = bs

    def elements(b, h, qb, kb):
        i = qb[:, None, None] * bq + np.arange(bq)[None, :, None]
        j = kb[:, None, None] * bk + np.arange(bk)[None, None, :]
        return np.broadcast_to(visible(i, j), (len(qb), bq, bk))

    tile_class = None
    if by_column is not None:
        i0, i1, j0, j1 = block_grid(q_len, kv_len, bs)
        same = by_column & ((i1 - i0) == bq) & ((j1 - j0) == bk)
        tile_class = lambda b, h, qb, kb: np.where(same[qb, kb], kb, -1)  # noqa: E731
    return from_tile_elements(touched[None, None], elements, bs, q_len, kv_len, fw, dev, lead=(batch, heads),
                              tile_class=tile_class)


def _exact(mask: ElementMask, q_len, kv_len, bs, batch, heads, fw, dev) -> BlockMask:
    any_, _ = classify(mask, q_len, kv_len, bs)
    return _finish(any_, mask, q_len, kv_len, bs, batch, heads, fw, dev)


# ---------------------------------------------------------------------------------------
# patterns
# ---------------------------------------------------------------------------------------
def causal(q_len: int, kv_len: int, *, block_size=DEFAULT_BLOCK_SIZE, batch: int = 1, heads: int = 1,
           device=None) -> BlockMask:
    """Causal attention: query i sees key j iff j <= d(i) = i + kv_len - q_len. Exact:
    tiles strictly below the diagonal are full, tiles it crosses partial
    (ElementMask(causal=True)), tiles above it skipped."""
    geo = _geometry(q_len, kv_len, block_size, batch, heads, device, "masks.causal")
    return _exact(ElementMask(causal=True), *geo)


def sliding_window(q_len: int, kv_len: int, window: int, *, block_size=DEFAULT_BLOCK_SIZE, batch: int = 1,
                   heads: int = 1, device=None) -> BlockMask:
    """Causal sliding window of `window` keys (tokens) ending at the diagonal: query i sees
    key j iff d(i) - window < j <= d(i) (the diagonal included; window >= 1). Exact:
    ElementMask(causal=True, window_left=window - 1, window_right=0). Equals
    flash_attention(causal=True, window=(window - 1, 0))."""
    op = "masks.sliding_window"
    window = _int(window, "window", op, 1)
    geo = _geometry(q_len, kv_len, block_size, batch, heads, device, op)
    return _exact(ElementMask(causal=True, window_left=window - 1, window_right=0), *geo)


def streaming(q_len: int, kv_len: int, sink_tokens: int, window: int, *, block_size=DEFAULT_BLOCK_SIZE,
              batch: int = 1, heads: int = 1, device=None) -> BlockMask:
    """StreamingLLM (Xiao et al. 2023): causal attention to the first `sink_tokens` keys
    (attention sinks) plus the last `window` keys (tokens) up to the diagonal: query i sees
    key j iff j <= d(i) and (j < sink_tokens or d(i) - window < j). Exact:
    ElementMask(causal=True, window_left=window - 1, window_right=0, sink_tokens=sink_tokens)."""
    op = "masks.streaming"
    sink_tokens = _int(sink_tokens, "sink_tokens", op)
    window = _int(window, "window", op, 1)
    geo = _geometry(q_len, kv_len, block_size, batch, heads, device, op)
    return _exact(ElementMask(causal=True, window_left=window - 1, window_right=0, sink_tokens=sink_tokens), *geo)


def strided(q_len: int, kv_len: int, stride: int, *, block_size=DEFAULT_BLOCK_SIZE, batch: int = 1,
            heads: int = 1, device=None) -> BlockMask:
    """Sparse Transformer strided pattern (Child et al. 2019), causal, in tokens: query i
    sees key j iff j <= d(i) and (d(i) - stride < j, the local band, or
    j mod stride == stride - 1, the summary columns). Exact (bit tiles)."""
    op = "masks.strided"
    stride = _int(stride, "stride", op, 1)
    q_len, kv_len, bs, batch, heads, fw, dev = _geometry(q_len, kv_len, block_size, batch, heads, device, op)
    off = kv_len - q_len
    i0, i1, j0, j1 = block_grid(q_len, kv_len, bs)
    band = band_any(i0, i1, j0, j1, off - stride + 1, off)
    # first summary column >= j0, visible to the last row of the tile if <= its diagonal
    first = j0 + np.mod(stride - 1 - j0, stride)
    cols = (first < j1) & (first <= (i1 - 1) + off)

    def visible(i, j):
        d = i + off
        return (j <= d) & ((d - stride < j) | (j % stride == stride - 1))

    # Tiles wholly left of the band (every key j <= d - stride) hold the summary columns only.
    left_of_band = (j1 - 1) <= (i0 + off) - stride
    return _exact_pattern(band | cols, visible, q_len, kv_len, bs, batch, heads, fw, dev, by_column=left_of_band)


def dilated(q_len: int, kv_len: int, segment: int, dilation: int, *, block_size=DEFAULT_BLOCK_SIZE,
            batch: int = 1, heads: int = 1, device=None) -> BlockMask:
    """LongNet dilated attention (Ding et al. 2023), one (segment, dilation) pair, causal,
    in tokens: positions are cut into segments of `segment` tokens; query i sees key j iff
    j <= d(i), j lies in the segment of d(i) (j // segment == d(i) // segment) and
    (j mod segment) mod dilation == 0. Mix several pairs with `union`. Exact (bit tiles)."""
    op = "masks.dilated"
    segment = _int(segment, "segment", op, 1)
    dilation = _int(dilation, "dilation", op, 1)
    q_len, kv_len, bs, batch, heads, fw, dev = _geometry(q_len, kv_len, block_size, batch, heads, device, op)
    off = kv_len - q_len
    i0, i1, j0, j1 = block_grid(q_len, kv_len, bs)
    p0, p1 = i0 + off, (i1 - 1) + off
    # key j pairs with some p in [p0, p1] iff j <= p1 and j >= start of p0's segment
    a = np.maximum(j0, np.floor_divide(p0, segment) * segment)
    b = np.minimum(j1 - 1, p1)
    a = np.maximum(a, 0)
    r = a % segment
    r_next = -(-r // dilation) * dilation
    first = np.where(r_next < segment, a - r + r_next, a - r + segment)

    def visible(i, j):
        d = i + off
        return (j <= d) & (j // segment == d // segment) & ((j % segment) % dilation == 0)

    return _exact_pattern(first <= b, visible, q_len, kv_len, bs, batch, heads, fw, dev)


def bigbird(q_len: int, kv_len: int, window_blocks: int, global_blocks: int, random_blocks: int, seed: int = 0, *,
            block_size=DEFAULT_BLOCK_SIZE, batch: int = 1, heads: int = 1, device=None) -> BlockMask:
    """BigBird (Zaheer et al. 2020) block-sparse attention, non-causal, in blocks.

    * window: query block qb visits the key blocks of its diagonal (the key blocks holding
      positions d(i) of its rows, clipped to [0, nKb)) and `window_blocks` key blocks on
      each side of them (BigBird's 3-block window is window_blocks=1);
    * global: the first `global_blocks` key blocks are visited by every query block and
      the first `global_blocks` query blocks visit every key block;
    * random: every other query block visits `random_blocks` more key blocks drawn
      uniformly without replacement among those it does not visit yet (all of them if
      fewer remain), independently per head, the same for every batch element.
      Deterministic for a seed (NumPy's default_rng(seed)).

    Exact at block granularity: visited tiles are full except those cut by q_len / kv_len,
    which are partial with no element mask."""
    op = "masks.bigbird"
    window_blocks = _int(window_blocks, "window_blocks", op)
    global_blocks = _int(global_blocks, "global_blocks", op)
    random_blocks = _int(random_blocks, "random_blocks", op)
    seed = _int(seed, "seed", op)
    q_len, kv_len, bs, batch, heads, fw, dev = _geometry(q_len, kv_len, block_size, batch, heads, device, op)
    nq, nk = _num_blocks(q_len, bs[0]), _num_blocks(kv_len, bs[1])
    off = kv_len - q_len
    i0, i1, _, _ = block_grid(q_len, kv_len, bs)
    kb = np.arange(nk)[None, :]
    lo = np.clip(np.floor_divide(i0 + off, bs[1]), 0, max(nk - 1, 0))
    hi = np.clip(np.floor_divide(i1 - 1 + off, bs[1]), 0, max(nk - 1, 0))
    base = (kb >= lo - window_blocks) & (kb <= hi + window_blocks)
    base[:, :global_blocks] = True
    base[:global_blocks, :] = True
    layout = np.broadcast_to(base, (heads, nq, nk)).copy()
    if random_blocks and nq and nk:
        keys = np.random.default_rng(seed).random((heads, nq, nk))
        keys[layout] = 2.0  # already visited: drawn last, a no-op if drawn
        order = np.argsort(keys, axis=-1, kind="stable")[..., :random_blocks]
        pick = np.zeros_like(layout)
        np.put_along_axis(pick, order, True, axis=-1)
        pick[:, :global_blocks, :] = False
        layout |= pick
    return _finish(layout[None], None, q_len, kv_len, bs, batch, heads, fw, dev)


def longformer(q_len: int, kv_len: int, window: int, global_tokens: Sequence[int] = (), *,
               block_size=DEFAULT_BLOCK_SIZE, batch: int = 1, heads: int = 1, device=None) -> BlockMask:
    """Longformer (Beltagy et al. 2020), non-causal, in tokens: query i sees key j iff
    |j - d(i)| <= window, or j is a global token, or d(i) is a global token (global tokens
    attend and are attended everywhere). global_tokens: positions in [0, kv_len); the
    global query of position t is row t - (kv_len - q_len) when that row exists.

    Exact: without global tokens an ElementMask(window_left=window, window_right=window),
    with them bit tiles."""
    op = "masks.longformer"
    window = _int(window, "window", op)
    try:
        g = np.asarray(list(global_tokens), dtype=object)
    except TypeError:
        raise TypeError(f"{op}: global_tokens must be a sequence of ints, got {global_tokens!r}") from None
    if any(not _is_int(t) for t in g):
        raise TypeError(f"{op}: global_tokens must hold ints, got {list(global_tokens)!r}")
    g = np.unique(g.astype(np.int64))
    q_len, kv_len, bs, batch, heads, fw, dev = _geometry(q_len, kv_len, block_size, batch, heads, device, op)
    if g.size and (g.min() < 0 or g.max() >= kv_len):
        raise ValueError(f"{op}: global_tokens must lie in [0, kv_len={kv_len}), got {g.tolist()}")
    mask = ElementMask(window_left=window, window_right=window)
    if not g.size:
        return _exact(mask, q_len, kv_len, bs, batch, heads, fw, dev)
    any_, _ = classify(mask, q_len, kv_len, bs)
    nq, nk = any_.shape
    off = kv_len - q_len
    cols = np.zeros(nk, bool)
    cols[g // bs[1]] = True
    rows_i = g - off
    rows_i = rows_i[(rows_i >= 0) & (rows_i < q_len)]
    rows = np.zeros(nq, bool)
    rows[rows_i // bs[0]] = True
    visited = any_ | cols[None, :] | rows[:, None]

    def visible(i, j):
        d = i + off
        return (np.abs(j - d) <= window) | np.isin(j, g) | np.isin(d, g)

    return _exact_pattern(visited, visible, q_len, kv_len, bs, batch, heads, fw, dev)


# ---------------------------------------------------------------------------------------
# combinations
# ---------------------------------------------------------------------------------------
def _check_pair(a: BlockMask, b: BlockMask, op: str):
    for name, m in (("a", a), ("b", b)):
        if not isinstance(m, BlockMask):
            raise TypeError(f"{op}: {name} must be a BlockMask, got {type(m).__name__}")
    for field in ("q_len", "kv_len", "block_size"):
        if getattr(a, field) != getattr(b, field):
            raise ValueError(f"{op}: a and b differ in {field}: {getattr(a, field)} vs {getattr(b, field)}")
    if (a.framework, a.device) != (b.framework, b.device):
        raise ValueError(f"{op}: a is {a.framework} on {a.device} but b is {b.framework} on {b.device}")
    try:
        lead = np.broadcast_shapes(a.shape[:2], b.shape[:2])
    except ValueError:
        raise ValueError(f"{op}: batch / heads dims {a.shape[:2]} and {b.shape[:2]} do not broadcast") from None
    return lead


def _layouts(m: BlockMask, lead):
    full, part = m.to_dense("full"), m.to_dense("partial")
    shape = tuple(lead) + full.shape[2:]
    return np.broadcast_to(full, shape), np.broadcast_to(part, shape)


def _tile_level(*ms: BlockMask) -> bool:
    """Masks combine tile by tile (keeping their one element mask) iff they share the
    element mask and none has bit tiles; otherwise the result is built from elements."""
    return all(m.mask == ms[0].mask and m.partial_bits is None for m in ms)


def _combine(a: BlockMask, b: BlockMask, op: str, both: bool) -> BlockMask:
    lead = _check_pair(a, b, op)
    fa, pa = _layouts(a, lead)
    fb, pb = _layouts(b, lead)
    visited = ((fa | pa) & (fb | pb)) if both else (fa | pa | fb | pb)
    if _tile_level(a, b):
        full = (fa & fb) if both else (fa | fb)
        return _from_layouts(full, visited & ~full, a.block_size, a.q_len, a.kv_len, a.mask, a.framework, a.device)

    def elements(bi, hi, qb, kb):
        ea, eb = a.tile_elements(bi, hi, qb, kb), b.tile_elements(bi, hi, qb, kb)
        return (ea & eb) if both else (ea | eb)

    return from_tile_elements(visited, elements, a.block_size, a.q_len, a.kv_len, a.framework, a.device)


def union(a: BlockMask, b: BlockMask) -> BlockMask:
    """Elements visible in a or in b. a and b must have the same q_len, kv_len, block_size
    and place (ValueError otherwise); batch / heads broadcast. With equal element masks and
    no bit tiles the result keeps that element mask (a tile is full if full in either,
    partial if visited by either and full in neither); otherwise it is token-exact with bit
    tiles (see `longattn.block_mask`)."""
    return _combine(a, b, "masks.union", both=False)


def intersection(a: BlockMask, b: BlockMask) -> BlockMask:
    """Elements visible in a and in b; same requirements and representation as `union` (at
    tile level: full if full in both, partial if visited by both and not full in both)."""
    return _combine(a, b, "masks.intersection", both=True)


def stack_heads(masks: Sequence[BlockMask]) -> BlockMask:
    """Per-head patterns: concatenates the masks along the head dim (a mask with H heads
    contributes H heads; batch dims broadcast). All masks must have the same q_len,
    kv_len, block_size and place (ValueError otherwise); representation as `union`."""
    op = "masks.stack_heads"
    masks = list(masks)
    if not masks:
        raise ValueError(f"{op}: masks must not be empty")
    first = masks[0]
    for n, m in enumerate(masks):
        if not isinstance(m, BlockMask):
            raise TypeError(f"{op}: masks[{n}] must be a BlockMask, got {type(m).__name__}")
        for field in ("q_len", "kv_len", "block_size"):
            if getattr(m, field) != getattr(first, field):
                raise ValueError(f"{op}: masks[{n}] has {field}={getattr(m, field)} but masks[0] has "
                                 f"{getattr(first, field)}")
        if (m.framework, m.device) != (first.framework, first.device):
            raise ValueError(f"{op}: masks[{n}] is {m.framework} on {m.device} but masks[0] is "
                             f"{first.framework} on {first.device}")
    batch = max(m.shape[0] for m in masks)
    for n, m in enumerate(masks):
        if m.shape[0] not in (1, batch):
            raise ValueError(f"{op}: masks[{n}] has batch {m.shape[0]}, which does not broadcast to {batch}")
    fulls, parts = [], []
    for m in masks:
        f, p = _layouts(m, (batch, m.shape[1]))
        fulls.append(f)
        parts.append(p)
    full, part = np.concatenate(fulls, axis=1), np.concatenate(parts, axis=1)
    if _tile_level(*masks):
        return _from_layouts(full, part, first.block_size, first.q_len, first.kv_len, first.mask, first.framework,
                             first.device)
    starts = np.cumsum([0] + [m.shape[1] for m in masks])

    def elements(bi, hi, qb, kb):
        out = np.zeros((len(bi),) + first.block_size, bool)
        owner = np.searchsorted(starts, hi, side="right") - 1
        for n, m in enumerate(masks):
            sel = owner == n
            if sel.any():
                out[sel] = m.tile_elements(bi[sel], hi[sel] - starts[n], qb[sel], kb[sel])
        return out

    return from_tile_elements(full | part, elements, first.block_size, first.q_len, first.kv_len, first.framework,
                              first.device)


# ---------------------------------------------------------------------------------------
# content-based selection
# ---------------------------------------------------------------------------------------
def _pool(x, block: int, n_blocks: int, fw: str):
    """Mean over the tokens of each block: (B, S, H, D) -> (B, n_blocks, H, D), float32
    (float64 for float64 inputs)."""
    b, s, h, d = x.shape
    pad = n_blocks * block - s
    counts = np.minimum(block, s - np.arange(n_blocks) * block)
    if fw == "torch":
        torch = sys.modules["torch"]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.detach().to(acc)
        if pad:
            xf = torch.cat([xf, xf.new_zeros(b, pad, h, d)], dim=1)
        sums = xf.reshape(b, n_blocks, block, h, d).sum(dim=2)
        return sums / torch.as_tensor(counts, dtype=acc, device=x.device)[None, :, None, None]
    acc = np.float64 if x.dtype == np.float64 else np.float32
    xf = np.asarray(x).astype(acc)
    if pad:
        xf = np.concatenate([xf, np.zeros((b, pad, h, d), acc)], axis=1)
    sums = xf.reshape(b, n_blocks, block, h, d).sum(axis=2)
    return sums / counts.astype(acc)[None, :, None, None]


def diagonal_blocks(q_len: int, kv_len: int, block_size) -> np.ndarray:
    """Boolean (nQb, nKb): tile (qb, kb) holds some diagonal element (i, d(i)),
    d(i) = i + kv_len - q_len, with 0 <= d(i) < kv_len."""
    off = kv_len - q_len
    i0, i1, j0, j1 = block_grid(q_len, kv_len, block_size)
    lo = np.maximum(i0 + off, 0)
    hi = np.minimum(i1 - 1 + off, kv_len - 1)
    return (lo <= hi) & (j0 <= hi) & (j1 - 1 >= lo)


def topk_blocks(q, k, block_size, num_blocks: int, causal: bool = True) -> BlockMask:
    """Content-selected key blocks (MoBA, Lu et al. 2025; MInference block-sparse).

    q: (B, Sq, H, D), k: (B, Sk, Hkv, D), torch or NumPy, H a multiple of Hkv (query head h
    reads kv head h // (H // Hkv)). Each query block and each key block is mean-pooled over
    its tokens (the last block over the tokens it has), per head, in float32 (float64 for
    float64 inputs); score[b, h, qb, kb] = pooled_q . pooled_k.

    For every (b, h, qb) the result visits the diagonal tiles (those holding an element
    (i, d(i)), d(i) = i + Sk - Sq) plus the highest-scoring other allowed key blocks, so
    that num_blocks blocks are visited in all (the diagonal counts, as in MoBA; fewer when
    fewer are allowed, more when the diagonal alone spans more). Allowed: with causal,
    tiles holding some causally visible element; otherwise all. Ties go to the lower key
    block index; NaN scores rank last. The element mask is ElementMask(causal=True) with
    causal, None otherwise. The result is torch on q's device for torch inputs, NumPy
    otherwise.
    """
    op = "masks.topk_blocks"
    fw_q, fw_k = _arrays.framework_of(q), _arrays.framework_of(k)
    for name, fw, x in (("q", fw_q, q), ("k", fw_k, k)):
        if fw not in ("numpy", "torch"):
            raise TypeError(f"{op}: {name} must be a NumPy array or a torch tensor, got {type(x).__name__}")
        if len(x.shape) != 4:
            raise ValueError(f"{op}: {name} must have 4 dims (batch, seqlen, heads, head_dim), got {tuple(x.shape)}")
    if fw_q != fw_k:
        raise TypeError(f"{op}: k is a {fw_k} array but q is a {fw_q} array")
    if fw_q == "torch" and q.device != k.device:
        raise ValueError(f"{op}: k is on {k.device} but q is on {q.device}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    num_blocks = _int(num_blocks, "num_blocks", op)
    B, Sq, H, D = (int(s) for s in q.shape)
    Bk, Sk, Hkv, Dk = (int(s) for s in k.shape)
    if Bk != B or Dk != D:
        raise ValueError(f"{op}: k must have the batch and head_dim of q {(B, D)}, got {(Bk, Dk)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{op}: k heads ({Hkv}) must divide q heads ({H})")
    if fw_q == "torch":
        dev = str(q.device) if q.device.type != "cuda" else f"cuda:{q.device.index or 0}"
        dev_type = q.device.type
    else:
        dev, dev_type = "cpu", "cpu"
    bs = check_block_size(block_size, dev_type, op)
    nq, nk = _num_blocks(Sq, bs[0]), _num_blocks(Sk, bs[1])
    mask = ElementMask(causal=True) if causal else None
    allowed, _ = classify(mask, Sq, Sk, bs)
    diag = diagonal_blocks(Sq, Sk, bs)
    if nq and nk:
        pq = _pool(q, bs[0], nq, fw_q)  # (B, nq, H, D)
        pk = _pool(k, bs[1], nk, fw_q)  # (B, nk, Hkv, D)
        rep = H // Hkv
        if fw_q == "torch":
            torch = sys.modules["torch"]
            pk = pk.repeat_interleave(rep, dim=2)
            scores = torch.einsum("bqhd,bkhd->bhqk", pq, pk).double().cpu().numpy()
        else:
            pk = np.repeat(pk, rep, axis=2)
            scores = np.einsum("bqhd,bkhd->bhqk", pq, pk).astype(np.float64)
        cand = allowed & ~diag
        scores = np.where(np.isnan(scores), -np.finfo(np.float64).max, scores)
        scores = np.where(cand, scores, -np.inf)
        order = np.argsort(-scores, axis=-1, kind="stable")
        rank = np.argsort(order, axis=-1, kind="stable")
        extra = np.maximum(num_blocks - diag.sum(axis=-1), 0)  # (nq,)
        chosen = (rank < extra[:, None]) & cand
        visited = chosen | diag
    else:
        visited = np.zeros((B, H, nq, nk), bool)
    return _finish(visited, mask, Sq, Sk, bs, B, H, fw_q, dev)
