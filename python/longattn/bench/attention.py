"""Flash attention benchmark: ``longattn.flash_attention`` against torch's SDPA.

The peer is ``torch.nn.functional.scaled_dot_product_attention`` pinned to one backend
with ``torch.nn.attention.sdpa_kernel`` (entered once around the peer's timed calls, not
per call: entering it costs ~10 us), so that a silent fallback to the math path
raises instead of being timed: on CPU its flash kernel, on CUDA the flash backend and
the cuDNN backend, one row each (variants ``fwd/flash``, ``fwd/cudnn``, ...; our side
is timed again on each row).

Layout: ours reads (B, S, H, D); SDPA's natural layout is (B, H, S, D). The peer gets
its own contiguous (B, H, S, D) copies of q, k, v (and of the upstream gradient), made
once in setup, so neither side pays for a layout change per call. The peer's outputs
(and gradients) are transposed back, a view, for the comparison only.

FLOPs (for TFLOP/s) are those of the two matmuls of the forward, 4 * B * H * Sq * Sk * D,
halved when causal; the backward counts 2.5 times the forward (five matmuls instead of
two), so forward+backward is 3.5 times the forward. Both sides are divided by the same
figure.

A second entry, ``decode``, times one decoding step: one query per sequence against a long
K/V (MHA and GQA), forward only, the same SDPA backends as the peer. It is bound by reading
K and V, so it reports GB/s of that traffic (K, V, q and out, read or written once).
"""
from __future__ import annotations

from .harness import Case, Entry, Settings, Workload, compare_outputs, register

# (B, H, D). The targets: B=1 H=8 D=64 S=4096 fp32 on CPU, B=2 H=16 D=128 S=8192
# bf16 on CUDA (an H100), causal and not.
_TARGET = {"cpu": (1, 8, 64), "cuda": (2, 16, 128)}
# The other head dim, added by --full.
_FULL_EXTRA_D = {"cpu": 128, "cuda": 64}
_SEQLENS = {
    ("cpu", "default"): (1024, 2048, 4096),
    ("cpu", "full"): (1024, 2048, 4096, 8192),
    ("cuda", "default"): (1024, 2048, 4096, 8192),
    ("cuda", "full"): (1024, 2048, 4096, 8192, 16384),
}


def _shapes(settings: Settings) -> list[tuple]:
    """(B, S, H, D, causal) of every case, in order."""
    if settings.size == "quick":
        bhd = [(1, 2, 32)]
        seqlens = (64, 128)
    else:
        b, h, d = _TARGET[settings.device]
        bhd = [(b, h, d)]
        if settings.size == "full":
            bhd.append((b, h, _FULL_EXTRA_D[settings.device]))
        seqlens = _SEQLENS[(settings.device, settings.size)]
    return [(b, s, h, d, causal) for b, h, d in bhd for s in seqlens for causal in (False, True)]


def _peers(device: str) -> list[tuple]:
    """(variant suffix, SDPA backend) of each peer on ``device``."""
    from torch.nn.attention import SDPBackend

    if device == "cuda":
        return [("/flash", SDPBackend.FLASH_ATTENTION), ("/cudnn", SDPBackend.CUDNN_ATTENTION)]
    return [("", SDPBackend.FLASH_ATTENTION)]


def forward_flops(B: int, S_q: int, S_k: int, H: int, D: int, causal: bool) -> float:
    """FLOPs of the forward: q @ k^T and p @ v, 2 * Sq * Sk * D each, per (batch, head)."""
    return 4.0 * B * H * S_q * S_k * D * (0.5 if causal else 1.0)


def _setup(settings: Settings, B: int, S: int, H: int, D: int, causal: bool) -> list[Workload]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    import longattn

    dev, dtype = settings.device, settings.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(S)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=dtype)

    # Ours: (B, S, H, D). Peer: contiguous (B, H, S, D) copies of the same values.
    q, k, v, d_out = (randn(B, S, H, D) for _ in range(4))
    q_t, k_t, v_t, d_out_t = (x.transpose(1, 2).contiguous() for x in (q, k, v, d_out))

    q_leaf, k_leaf, v_leaf = (x.detach().requires_grad_() for x in (q, k, v))
    q_t_leaf, k_t_leaf, v_t_leaf = (x.detach().requires_grad_() for x in (q_t, k_t, v_t))

    def ours_fwd():
        return longattn.flash_attention(q, k, v, causal=causal)

    def ours_fwd_bwd():
        out = longattn.flash_attention(q_leaf, k_leaf, v_leaf, causal=causal)
        dq, dk, dv = torch.autograd.grad(out, (q_leaf, k_leaf, v_leaf), d_out)
        return out.detach(), dq, dk, dv

    def peer_fwd():  # run in sdpa_kernel(backend) (Workload.peer_context)
        return F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=causal)

    def peer_fwd_bwd():
        out = F.scaled_dot_product_attention(q_t_leaf, k_t_leaf, v_t_leaf, is_causal=causal)
        dq, dk, dv = torch.autograd.grad(out, (q_t_leaf, k_t_leaf, v_t_leaf), d_out_t)
        return out.detach(), dq, dk, dv

    def compare(ours_out, peer_out):
        if isinstance(peer_out, torch.Tensor):
            peer_out = (peer_out,)
            ours_out = (ours_out,)
        return compare_outputs(ours_out, tuple(x.transpose(1, 2) for x in peer_out), settings.dtype)

    flops = forward_flops(B, S, S, H, D, causal)
    workloads = []
    for suffix, backend in _peers(dev):
        workloads.append(Workload("fwd" + suffix, ours_fwd, peer_fwd, flops=flops, compare=compare,
                                  peer_context=lambda b=backend: sdpa_kernel(b)))
    for suffix, backend in _peers(dev):
        workloads.append(Workload("fwd+bwd" + suffix, ours_fwd_bwd, peer_fwd_bwd, flops=3.5 * flops,
                                  compare=compare, peer_context=lambda b=backend: sdpa_kernel(b)))
    return workloads


def _cases(settings: Settings) -> list[Case]:
    return [
        Case({"B": b, "S": s, "H": h, "D": d, "causal": causal},
             lambda b=b, s=s, h=h, d=d, causal=causal: _setup(settings, b, s, h, d, causal))
        for b, s, h, d, causal in _shapes(settings)
    ]


def _versions() -> dict:
    import torch

    versions = {"torch": torch.__version__}
    if torch.cuda.is_available():
        versions["cudnn"] = torch.backends.cudnn.version()
    return versions


register(Entry(
    name="attention",
    description="flash attention (B, S, H, D), causal and not, forward and forward+backward; TFLOP/s",
    peer="torch scaled_dot_product_attention on (B, H, S, D) copies: CPU flash kernel; "
         "on CUDA the flash and cuDNN backends, one row each",
    sweep="S",
    cases=_cases,
    versions=_versions,
))


# Decoding: (B, H, Hkv, D) and the key lengths.
_DECODE_TARGET = {"cpu": ((1, 8, 8, 64), (1, 8, 2, 64)), "cuda": ((8, 32, 32, 128), (8, 32, 8, 128))}
# Sk = 64: a step whose kernel is tiny, so the row shows the per-call cost of the Python
# layer and the launch.
_DECODE_SEQLENS = {
    ("cpu", "default"): (64, 4096, 16384),
    ("cpu", "full"): (64, 1024, 4096, 16384, 65536),
    ("cuda", "default"): (64, 4096, 16384, 65536),
    ("cuda", "full"): (64, 1024, 4096, 16384, 65536, 131072),
}


def _decode_setup(settings: Settings, B: int, Sk: int, H: int, Hkv: int, D: int) -> list[Workload]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    import longattn

    dev, dtype = settings.device, settings.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(Sk)
    q = torch.randn(B, 1, H, D, generator=gen, device=dev, dtype=dtype)
    k, v = (torch.randn(B, Sk, Hkv, D, generator=gen, device=dev, dtype=dtype) for _ in range(2))
    q_t, k_t, v_t = (x.transpose(1, 2).contiguous() for x in (q, k, v))

    def ours():
        return longattn.flash_attention(q, k, v)

    def peer():  # run in sdpa_kernel(backend) (Workload.peer_context)
        return F.scaled_dot_product_attention(q_t, k_t, v_t, enable_gqa=H != Hkv)

    def compare(ours_out, peer_out):
        return compare_outputs((ours_out,), (peer_out.transpose(1, 2),), settings.dtype)

    nbytes = (2 * B * Sk * Hkv * D + 2 * B * H * D) * q.element_size()
    return [Workload("fwd" + suffix, ours, peer, bytes=nbytes, flops=forward_flops(B, 1, Sk, H, D, False),
                     compare=compare, peer_context=lambda b=backend: sdpa_kernel(b)) for suffix, backend in _peers(dev)]


def _decode_cases(settings: Settings) -> list[Case]:
    if settings.size == "quick":
        shapes = [(1, 256, 2, 2, 32), (1, 256, 4, 2, 32)]
    else:
        shapes = [(b, s, h, hkv, d) for b, h, hkv, d in _DECODE_TARGET[settings.device]
                  for s in _DECODE_SEQLENS[(settings.device, settings.size)]]
    return [
        Case({"B": b, "Sk": s, "H": h, "Hkv": hkv, "D": d},
             lambda b=b, s=s, h=h, hkv=hkv, d=d: _decode_setup(settings, b, s, h, hkv, d))
        for b, s, h, hkv, d in shapes
    ]


register(Entry(
    name="decode",
    description="one decoding step: flash attention of one query per sequence over Sk keys (MHA and GQA), "
                "forward; GB/s of the K/V traffic",
    peer="torch scaled_dot_product_attention on (B, H, S, D) copies (enable_gqa for GQA): CPU flash kernel; "
         "on CUDA the flash and cuDNN backends, one row each",
    sweep="Sk",
    cases=_decode_cases,
    versions=_versions,
))
