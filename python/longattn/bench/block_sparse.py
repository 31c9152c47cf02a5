"""Block-sparse attention benchmark: ``longattn.block_sparse_attention`` with a BlockMask
against our own dense ``flash_attention`` on the same inputs (the issue's yardstick: at
10% density the sparse call should be at least 0.8 / density times faster; at 100%
density no more than 10% slower).

Patterns: a causal sliding window and BigBird, both near 10% density, and an all-full
BlockMask (100% density, which must match dense attention). TFLOP/s count the visited
blocks only: 4 * B * H * Sq * Sk * D * density for the forward, 3.5 times that for
forward+backward; the dense peer is charged the full 4 * B * H * Sq * Sk * D.

On CUDA the issue's second peer is torch's flex_attention (compiled) with the same mask;
longattn's CUDA block-sparse kernel does not exist yet, so CUDA rows report that error.
"""
from __future__ import annotations

from .harness import Case, Entry, Settings, Workload, compare_outputs, register

_TARGET = {"cpu": (1, 8, 64), "cuda": (1, 16, 128)}
_SEQLENS = {
    ("cpu", "default"): (4096,),
    ("cpu", "full"): (4096, 16384),
    ("cuda", "default"): (8192,),
    ("cuda", "full"): (8192, 32768),
}
_PATTERNS = ("sliding_window", "bigbird", "dense")


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
    return longattn.BlockMask.from_dense(np.ones((1, 1, n, n), bool), (block, block), S, S)


def _setup(settings: Settings, B: int, S: int, H: int, D: int, pattern: str) -> list[Workload]:
    import torch

    import longattn

    dev, dtype = settings.device, settings.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(S)
    q, k, v, d_out = (torch.randn(B, S, H, D, generator=gen, device=dev, dtype=dtype) for _ in range(4))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    bm = _mask(pattern, S, 64 if S <= 512 else 128)
    density = bm.density()

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
    return [
        Workload("fwd", ours_fwd, dense_fwd, flops=flops * density, peer_flops=flops, compare=compare),
        Workload("fwd+bwd", ours_fwd_bwd, dense_fwd_bwd, flops=3.5 * flops * density, peer_flops=3.5 * flops,
                 compare=compare),
    ]


def _cases(settings: Settings) -> list[Case]:
    return [
        Case({"B": b, "S": s, "H": h, "D": d, "pattern": p},
             lambda b=b, s=s, h=h, d=d, p=p: _setup(settings, b, s, h, d, p))
        for b, s, h, d, p in _shapes(settings)
    ]


register(Entry(
    name="block_sparse",
    description="block-sparse attention with a BlockMask (sliding window, BigBird, all-full) vs dense; TFLOP/s of "
                "visited blocks",
    peer="longattn.flash_attention (dense, non-causal) on the same inputs",
    sweep="S",
    cases=_cases,
))
