"""Block-sparse attention benchmark: ``longattn.block_sparse_attention`` with a BlockMask
against our own dense ``flash_attention`` on the same inputs (the issue's yardstick: at
10% density the sparse call should be at least 0.8 / density times faster; at 100%
density no more than 10% slower).

Patterns: a causal sliding window and BigBird, both near 10% density, packed documents
(causal attention inside each of ~8 documents of random lengths, built with
``BlockMask.from_mask_mod``: the token-granular bit-tile path), and an all-full BlockMask
(100% density, which must match dense attention). TFLOP/s count the visited
blocks only: 4 * B * H * Sq * Sk * D * density for the forward, 3.5 times that for
forward+backward; the dense peer is charged the full 4 * B * H * Sq * Sk * D.

On CUDA a second peer runs in the same sweep: torch's flex_attention (torch.compile'd),
given the same BlockMask converted with torch's ``BlockMask.from_kv_blocks`` (the index
layout is the same) and a ``mask_mod`` equal to the element mask of partial blocks; its
rows are labelled "vs flex". They are left out, with a note on stderr, when
flex_attention is not available. The BlockMask is moved to the device once, outside the
timed calls.
"""
from __future__ import annotations

import sys

from .harness import Case, Entry, Settings, Workload, compare_outputs, register

_TARGET = {"cpu": (1, 8, 64), "cuda": (1, 16, 128)}
_SEQLENS = {
    ("cpu", "default"): (4096,),
    ("cpu", "full"): (4096, 16384),
    ("cuda", "default"): (32768,),
    ("cuda", "full"): (8192, 32768, 65536),
}
_PATTERNS = ("sliding_window", "bigbird", "documents", "dense")


def _shapes(settings: Settings) -> list[tuple]:
    if settings.size == "quick":
        return [(1, 256, 2, 32, p) for p in _PATTERNS]
    b, h, d = _TARGET[settings.device]
    return [(b, s, h, d, p) for s in _SEQLENS[(settings.device, settings.size)] for p in _PATTERNS]


def _mask(pattern: str, S: int, block: int):
    import numpy as np

    import longattn
    from longattn import masks

    n = -(-S // block)
    if pattern == "sliding_window":  # ~10% of the (q block, k block) grid
        return masks.sliding_window(S, S, window=max(block, S // 10), block_size=block)
    if pattern == "bigbird":
        w = max(1, n // 40)
        return masks.bigbird(S, S, window_blocks=w, global_blocks=1, random_blocks=max(1, n // 20), seed=0,
                             block_size=block)
    if pattern == "documents":  # sample packing: ~8 documents, causal within each
        cuts = np.sort(np.random.default_rng(S).choice(np.arange(1, S), size=7, replace=False))
        doc = np.searchsorted(cuts, np.arange(S), side="right")
        return longattn.BlockMask.from_mask_mod(lambda b, h, i, j: (doc[i] == doc[j]) & (j <= i), S, S,
                                                block_size=block)
    return longattn.BlockMask.from_dense(np.ones((1, 1, n, n), bool), (block, block), S, S)


_FLEX: dict = {}  # the compiled flex_attention, or the reason it is unavailable


def _flex_attention():
    """torch.compile'd flex_attention, or None (after one note on stderr) when unavailable."""
    if "fn" not in _FLEX:
        try:
            import torch
            from torch.nn.attention.flex_attention import flex_attention

            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        except Exception as exc:  # old torch, no triton, ...
            _FLEX["fn"] = None
            print(f"block_sparse bench: torch flex_attention unavailable ({type(exc).__name__}: {exc}); "
                  f"the 'vs flex' rows are skipped", file=sys.stderr)
    return _FLEX["fn"]


def flex_block_mask(bm, device):
    """torch's flex BlockMask for a longattn BlockMask: the same lists, and a mask_mod that
    applies the element mask (causal / window / sink tokens, bottom-right aligned) and the
    bit tiles inside partial blocks. The compiled flex_attention skips unlisted blocks and calls mask_mod
    in partial blocks only; eager flex_attention applies mask_mod alone and so ignores the
    lists (checked on the CPU: compiled flex matches the float64 reference)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    import numpy as np

    lists = [getattr(bm, n) for n in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")]
    lists = [(x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))).to(device) for x in lists]
    m, off = bm.mask, bm.kv_len - bm.q_len
    mask_mod = None
    bq, bk = bm.block_size
    if bm.partial_bits is not None:  # bit tiles: look each element's bit up in the pool
        pool = (bm.partial_bits if isinstance(bm.partial_bits, torch.Tensor) else
                torch.from_numpy(np.array(bm.partial_bits))).to(device)
        tile = torch.from_numpy(np.maximum(bm.tile_index_map(), 0)).to(device)  # (B|1, H|1, nQb, nKb)
    if m is not None or bm.partial_bits is not None:
        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx + off
            vis = kv_idx == kv_idx  # all True, as a tensor
            if bm.partial_bits is not None:
                t = tile[b if tile.shape[0] > 1 else 0, h if tile.shape[1] > 1 else 0, q_idx // bq, kv_idx // bk]
                word = pool[t, q_idx % bq, (kv_idx % bk) // 32]
                vis = vis & (((word >> ((kv_idx % bk) % 32)) & 1) == 1)
            if m is None:
                return vis
            if m.window_left >= 0:
                vis = vis & (kv_idx >= d - m.window_left)
            if m.window_right >= 0:
                vis = vis & (kv_idx <= d + m.window_right)
            if m.sink_tokens:
                vis = vis | (kv_idx < m.sink_tokens)
            if m.causal:
                vis = vis & (kv_idx <= d)
            return vis
    return FlexBlockMask.from_kv_blocks(*lists, BLOCK_SIZE=bm.block_size, mask_mod=mask_mod,
                                        seq_lengths=(bm.q_len, bm.kv_len))


def _setup(settings: Settings, B: int, S: int, H: int, D: int, pattern: str) -> list[Workload]:
    import torch

    import longattn

    dev, dtype = settings.device, settings.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(S)
    q, k, v, d_out = (torch.randn(B, S, H, D, generator=gen, device=dev, dtype=dtype) for _ in range(4))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    bm = _mask(pattern, S, 64 if S <= 512 else 128)
    density = bm.density()
    if dev == "cuda":
        bm = bm.to(dev)

    def ours_fwd():
        return longattn.block_sparse_attention(q, k, v, bm)

    def ours_fwd_bwd():
        out = longattn.block_sparse_attention(*leaves, bm)
        return (out.detach(),) + torch.autograd.grad(out, leaves, d_out)

    def dense_fwd():
        return longattn.flash_attention(q, k, v)

    def dense_fwd_bwd():
        out = longattn.flash_attention(*leaves)
        return (out.detach(),) + torch.autograd.grad(out, leaves, d_out)

    def compare(ours_out, peer_out):
        if pattern != "dense":  # different masks: nothing to compare but shapes
            return None
        if isinstance(ours_out, torch.Tensor):
            ours_out, peer_out = (ours_out,), (peer_out,)
        return compare_outputs(ours_out, peer_out, settings.dtype)

    flops = 4.0 * B * H * S * S * D
    workloads = [
        Workload("fwd", ours_fwd, dense_fwd, flops=flops * density, peer_flops=flops, compare=compare),
        Workload("fwd+bwd", ours_fwd_bwd, dense_fwd_bwd, flops=3.5 * flops * density, peer_flops=3.5 * flops,
                 compare=compare),
    ]
    flex = _flex_attention() if dev == "cuda" else None
    if flex is not None:
        # flex takes (B, H, S, D): transposed copies of the same values; same mask, same work.
        fbm = flex_block_mask(bm, dev)
        q_t, k_t, v_t, d_out_t = (x.transpose(1, 2).contiguous() for x in (q, k, v, d_out))
        t_leaves = [x.detach().requires_grad_() for x in (q_t, k_t, v_t)]

        def flex_fwd():
            return flex(q_t, k_t, v_t, block_mask=fbm).transpose(1, 2)

        def flex_fwd_bwd():
            out = flex(*t_leaves, block_mask=fbm)
            grads = torch.autograd.grad(out, t_leaves, d_out_t)
            return (out.detach().transpose(1, 2),) + tuple(g.transpose(1, 2) for g in grads)

        def compare_flex(ours_out, peer_out):
            if isinstance(ours_out, torch.Tensor):
                ours_out, peer_out = (ours_out,), (peer_out,)
            return compare_outputs(ours_out, peer_out, settings.dtype)

        workloads += [
            Workload("fwd vs flex", ours_fwd, flex_fwd, flops=flops * density, compare=compare_flex),
            Workload("fwd+bwd vs flex", ours_fwd_bwd, flex_fwd_bwd, flops=3.5 * flops * density,
                     compare=compare_flex),
        ]
    return workloads


def _cases(settings: Settings) -> list[Case]:
    return [
        Case({"B": b, "S": s, "H": h, "D": d, "pattern": p},
             lambda b=b, s=s, h=h, d=d, p=p: _setup(settings, b, s, h, d, p))
        for b, s, h, d, p in _shapes(settings)
    ]


def _versions() -> dict:
    import torch

    return {"torch": torch.__version__}


register(Entry(
    name="block_sparse",
    description="block-sparse attention with a BlockMask (sliding window, BigBird, packed documents, all-full) vs "
                "dense; TFLOP/s of visited blocks",
    peer="longattn.flash_attention (dense, non-causal) on the same inputs; on CUDA also torch flex_attention "
         "(compiled) with the same mask ('vs flex' rows)",
    sweep="S",
    cases=_cases,
    versions=_versions,
))
