"""Linear attention benchmark: ``longattn.linear_attention`` against a chunked torch
implementation.

The peer is the chunked form written with torch matmuls (what a user without a fused
kernel would write, as in flash-linear-attention's reference `chunk` code): per chunk of
64 tokens the masked quadratic product, and the inter-chunk state as one matmul over
chunks (a cumulative sum without decay; a decay-power matrix with RetNet's per-head
decays). It runs under torch autograd for the backward. Rows: no decay and per-head
decay, causal, forward and forward+backward.

FLOPs (for TFLOP/s) are those of the chunked form's four products per token,
2 * (C*K + C*V + 2*K*V) with C = 64; forward+backward counts 3.5 times the forward.
"""
from __future__ import annotations

from .harness import Case, Settings, Workload, compare_outputs, register, Entry

CHUNK = 64
_SEQLENS = {"quick": (128, 256), "default": (4096, 16384), "full": (4096, 16384, 65536)}


def torch_chunked(q, k, v, log_decay=None, chunk: int = CHUNK):
    """Causal linear attention (scale K^-0.5, identity feature map) in the chunked form with
    torch ops; q, k, v (B, T, H, ·) with T a multiple of `chunk`; log_decay None or (H,)."""
    import torch

    B, T, H, K = q.shape
    V = v.shape[-1]
    n, C = T // chunk, chunk
    q = (q * K ** -0.5).permute(0, 2, 1, 3).reshape(B, H, n, C, K)
    k = k.permute(0, 2, 1, 3).reshape(B, H, n, C, K)
    v = v.permute(0, 2, 1, 3).reshape(B, H, n, C, V)
    mask = torch.tril(torch.ones(C, C, dtype=torch.bool, device=q.device))
    if log_decay is None:
        o = (q @ k.transpose(-1, -2)).masked_fill(~mask, 0) @ v
        kv = k.transpose(-1, -2) @ v
        S = torch.cumsum(kv, 2) - kv  # state entering each chunk
        return (o + q @ S).reshape(B, H, T, V).permute(0, 2, 1, 3)
    g = log_decay.to(q.dtype)
    b = g.view(1, H, 1, 1) * torch.arange(1, C + 1, dtype=q.dtype, device=q.device).view(1, 1, 1, C)
    D = torch.exp((b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~mask, -float("inf")))
    o = ((q @ k.transpose(-1, -2)) * D) @ v
    kv = (k * torch.exp(b[..., -1:] - b).unsqueeze(-1)).transpose(-1, -2) @ v
    ci = torch.arange(n, dtype=q.dtype, device=q.device)
    diff = ci.view(n, 1) - 1 - ci.view(1, n)  # chunks between c' and c
    W = torch.exp((g.view(H, 1, 1) * C * diff.clamp(min=0)).masked_fill(diff < 0, -float("inf")))
    S = torch.einsum("hcd,bhdkv->bhckv", W, kv)
    return (o + (q * torch.exp(b).unsqueeze(-1)) @ S).reshape(B, H, T, V).permute(0, 2, 1, 3)


def forward_flops(B: int, S: int, H: int, K: int, V: int) -> float:
    return 2.0 * B * H * S * (CHUNK * K + CHUNK * V + 2 * K * V)


def _setup(settings: Settings, B: int, S: int, H: int, D: int, decay: str) -> list[Workload]:
    import torch

    import longattn

    dev, dtype = settings.device, settings.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(S)
    q, k, v, d_out = (torch.randn(B, S, H, D, generator=gen, device=dev, dtype=dtype) for _ in range(4))
    g = None
    if decay == "per-head":
        g = torch.log1p(-2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32, device=dev)))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def ours_fwd():
        return longattn.linear_attention(q, k, v, log_decay=g)

    def peer_fwd():
        return torch_chunked(q, k, v, g)

    def fwd_bwd(fn):
        def run():
            out = fn(*leaves, g)
            return (out.detach(),) + torch.autograd.grad(out, leaves, d_out)

        return run

    def compare(ours_out, peer_out):
        if isinstance(peer_out, torch.Tensor):
            ours_out, peer_out = (ours_out,), (peer_out,)
        return compare_outputs(ours_out, peer_out, settings.dtype)

    flops = forward_flops(B, S, H, D, D)
    ours_fb = fwd_bwd(lambda q_, k_, v_, g_: longattn.linear_attention(q_, k_, v_, log_decay=g_))
    return [Workload("fwd", ours_fwd, peer_fwd, flops=flops, compare=compare),
            Workload("fwd+bwd", ours_fb, fwd_bwd(torch_chunked), flops=3.5 * flops, compare=compare)]


def _cases(settings: Settings) -> list[Case]:
    b, h, d = (1, 2, 32) if settings.size == "quick" else (1, 8, 64)
    return [Case({"B": b, "S": s, "H": h, "D": d, "decay": decay},
                 lambda s=s, decay=decay: _setup(settings, b, s, h, d, decay))
            for s in _SEQLENS[settings.size] for decay in ("none", "per-head")]


def _versions() -> dict:
    import torch

    return {"torch": torch.__version__}


register(Entry(
    name="linear_attention",
    description="causal linear attention (B, S, H, D), no decay and RetNet per-head decay, forward and "
                "forward+backward; TFLOP/s of the chunked form",
    peer="chunked linear attention written with torch matmuls (64-token chunks), torch autograd backward",
    sweep="S",
    cases=_cases,
    default_dtype={"cpu": "float32", "cuda": "float32"},
    versions=_versions,
))
