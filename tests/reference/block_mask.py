"""Token-level references for block-sparse masks (tests/test_block_mask.py).

Everything here is written from the definitions, row by row, without the block geometry
shortcuts of longattn.block_mask: query i sits at position d = i + kv_len - q_len
(bottom-right alignment, as flash_attention) and each function returns the boolean
(q_len, kv_len) matrix of visible (query, key) pairs.
"""
from __future__ import annotations

import numpy as np


def _rows(q_len, kv_len, visible_keys):
    """Stacks visible_keys(d, j) -> bool row for every query i (d = its position)."""
    out = np.zeros((q_len, kv_len), bool)
    j = np.arange(kv_len)
    for i in range(q_len):
        out[i] = visible_keys(i + kv_len - q_len, j)
    return out


def element_mask(q_len, kv_len, causal=False, window_left=-1, window_right=-1, sink_tokens=0):
    """ElementMask semantics: causal AND (window OR sink)."""
    def row(d, j):
        ok_causal = (j <= d) if causal else np.ones_like(j, bool)
        in_window = np.ones_like(j, bool)
        if window_left >= 0:
            in_window &= j >= d - window_left
        if window_right >= 0:
            in_window &= j <= d + window_right
        return ok_causal & (in_window | (j < sink_tokens))
    return _rows(q_len, kv_len, row)


def causal(q_len, kv_len):
    return _rows(q_len, kv_len, lambda d, j: j <= d)


def sliding_window(q_len, kv_len, window):
    return _rows(q_len, kv_len, lambda d, j: (d - window < j) & (j <= d))


def streaming(q_len, kv_len, sink_tokens, window):
    return _rows(q_len, kv_len, lambda d, j: (j <= d) & ((j < sink_tokens) | (d - window < j)))


def strided(q_len, kv_len, stride):
    return _rows(q_len, kv_len, lambda d, j: (j <= d) & ((d - stride < j) | (j % stride == stride - 1)))


def dilated(q_len, kv_len, segment, dilation):
    def row(d, j):
        same_segment = (j // segment) == (d // segment) if d >= 0 else np.zeros_like(j, bool)
        return (j <= d) & same_segment & ((j % segment) % dilation == 0)
    return _rows(q_len, kv_len, row)


def longformer(q_len, kv_len, window, global_tokens):
    g = set(int(t) for t in global_tokens)
    is_global_key = np.isin(np.arange(kv_len), sorted(g))
    return _rows(q_len, kv_len, lambda d, j: (np.abs(j - d) <= window) | is_global_key | (d in g))


# ---------------------------------------------------------------------------------------
# tiles
# ---------------------------------------------------------------------------------------
def tiles_any(elements, block_size):
    """(nQb, nKb): tiles holding at least one True element (loops over tiles)."""
    bq, bk = block_size
    q_len, kv_len = elements.shape[-2:]
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    out = np.zeros(elements.shape[:-2] + (nq, nk), bool)
    for a in range(nq):
        for b in range(nk):
            out[..., a, b] = elements[..., a * bq:(a + 1) * bq, b * bk:(b + 1) * bk].any(axis=(-1, -2))
    return out


def tiles_all(elements, block_size):
    """(nQb, nKb): uncut tiles (inside q_len x kv_len) whose elements are all True."""
    bq, bk = block_size
    q_len, kv_len = elements.shape[-2:]
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    out = np.zeros(elements.shape[:-2] + (nq, nk), bool)
    for a in range(nq):
        for b in range(nk):
            tile = elements[..., a * bq:(a + 1) * bq, b * bk:(b + 1) * bk]
            out[..., a, b] = tile.all(axis=(-1, -2)) & (tile.shape[-2:] == (bq, bk))
    return out


def decode(counts, indices):
    """Boolean layout from count / index lists, by explicit loops."""
    counts, indices = np.asarray(counts), np.asarray(indices)
    out = np.zeros(indices.shape, bool)
    for pos in np.ndindex(counts.shape):
        for s in range(int(counts[pos])):
            out[pos + (int(indices[pos + (s,)]),)] = True
    return out


def bit_tile(words, block_k):
    """Boolean (block_q, block_k) of one bit tile (block_q, W) int32: column c is bit c % 32
    of word c // 32 (arithmetic shifts of negative words still expose bit 31)."""
    words = np.asarray(words, np.int64)
    return np.stack([(words[:, c // 32] >> (c % 32)) & 1 for c in range(block_k)], axis=1).astype(bool)


def partial_bits(bm):
    """(B, H, q_len, kv_len) of the bit tiles of a BlockMask's partial blocks, placed by the
    kv-side lists and kv_bits_index (True everywhere when the mask has no bit tiles)."""
    to_np = lambda x: x if isinstance(x, np.ndarray) else x.cpu().numpy()  # noqa: E731
    counts = to_np(bm.kv_num_blocks)
    bq, bk = bm.block_size
    nq, nk = -(-bm.q_len // bq), -(-bm.kv_len // bk)
    out = np.ones(counts.shape[:2] + (nq * bq, nk * bk), bool)
    if bm.partial_bits is not None:
        idx, ids, pool = to_np(bm.kv_indices), to_np(bm.kv_bits_index), to_np(bm.partial_bits)
        for pos in np.ndindex(counts.shape):
            qb = pos[2]
            for s in range(int(counts[pos])):
                kb = int(idx[pos + (s,)])
                out[pos[0], pos[1], qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk] = \
                    bit_tile(pool[int(ids[pos + (s,)])], bk)
    return out[:, :, :bm.q_len, :bm.kv_len]


def expand(bm):
    """(B, H, q_len, kv_len) visible elements of a BlockMask from its kv-side lists:
    full tiles entirely, partial tiles through the reference element mask and bit tiles."""
    to_np = lambda x: x if isinstance(x, np.ndarray) else x.cpu().numpy()  # noqa: E731
    full = decode(to_np(bm.full_kv_num_blocks), to_np(bm.full_kv_indices))
    part = decode(to_np(bm.kv_num_blocks), to_np(bm.kv_indices))
    bq, bk = bm.block_size
    q_len, kv_len = bm.q_len, bm.kv_len
    em = np.ones((q_len, kv_len), bool)
    if bm.mask is not None:
        m = bm.mask
        em = element_mask(q_len, kv_len, m.causal, m.window_left, m.window_right, m.sink_tokens)
    grow = lambda t: t.repeat(bq, axis=-2).repeat(bk, axis=-1)[..., :q_len, :kv_len]  # noqa: E731
    return grow(full) | (grow(part) & em & partial_bits(bm))


# ---------------------------------------------------------------------------------------
# top-k selection
# ---------------------------------------------------------------------------------------
def pooled_scores(q, k, block_size):
    """float64 (B, H, nQb, nKb) scores of mean-pooled query / key blocks (GQA repeat)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    bq, bk = block_size
    B, Sq, H, D = q.shape
    Hkv = k.shape[2]
    nq, nk = -(-Sq // bq), -(-k.shape[1] // bk)
    pq = np.stack([q[:, a * bq:(a + 1) * bq].mean(axis=1) for a in range(nq)], axis=1)
    pk = np.stack([k[:, b * bk:(b + 1) * bk].mean(axis=1) for b in range(nk)], axis=1)
    s = np.zeros((B, H, nq, nk))
    for h in range(H):
        s[:, h] = np.einsum("bqd,bkd->bqk", pq[:, :, h], pk[:, :, h // (H // Hkv)])
    return s


def diagonal_tiles(q_len, kv_len, block_size):
    diag = np.zeros((q_len, kv_len), bool)
    for i in range(q_len):
        d = i + kv_len - q_len
        if 0 <= d < kv_len:
            diag[i, d] = True
    return tiles_any(diag, block_size)
