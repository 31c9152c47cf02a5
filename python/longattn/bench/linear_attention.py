"""Linear attention benchmark: ``longattn.linear_attention`` against flash-linear-attention
(CUDA, when ``import fla`` works) or a chunked torch implementation.

On CUDA the workload of the linear-attention issue runs: bfloat16, B=4, H=16, K=V=128,
T=16384, causal, without and with RetNet per-head decay. Its GB/s count the ideal DRAM
traffic (q, k, v read, out written; the backward adds dout read and dq, dk, dv written),
and the harness prints the device copy bandwidth beside them as the bound. The peer there
is flash-linear-attention's Triton chunk kernel (``fla.ops.simple_gla.chunk_simple_gla``,
per-token gates holding the per-head decay); without fla the torch chunked form stands in
and a "peer unavailable" note is printed.

The peer is the chunked form written with torch matmuls (what a user without a fused
kernel would write, as in flash-linear-attention's reference `chunk` code): per chunk of
64 tokens the masked quadratic product, and the inter-chunk state as one matmul over
chunks (a cumulative sum without decay; a decay-power matrix with RetNet's per-head
decays). It runs under torch autograd for the backward. Rows: no decay and per-head
decay, causal, forward and forward+backward.

FLOPs (for TFLOP/s) are those of the chunked form's four products per token,
2 * (C*K + C*V + 2*K*V) with C = 64; forward+backward counts 3.5 times the forward.

``linear_step`` times one decoding step (``linear_attention_step(inplace=True)``) against
the same in-place step written with torch ops.

Another entry, ``linear_vs_flash``, answers when linear attention pays off against our own
causal ``flash_attention`` on the same q, k, v (the issue asks for the crossover to lie at
T <= 2048): the peer column is flash attention, the ratio flash ms / linear ms, and each
side's TFLOP/s counts its own FLOPs. The outputs differ by definition and are not compared.
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


def fla_chunk():
    """flash-linear-attention's chunk kernel as f(q, k, v, log_decay_or_None), or None."""
    try:
        import inspect

        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # not installed, or no Triton / GPU
        return None
    extra = {"head_first": False} if "head_first" in inspect.signature(chunk_simple_gla).parameters else {}

    def run(q, k, v, log_decay):
        import torch

        g = None
        if log_decay is not None:
            g = log_decay.view(1, 1, -1).expand(q.shape[0], q.shape[1], -1).to(torch.float32).contiguous()
        o, _ = chunk_simple_gla(q=q, k=k, v=v, g=g, scale=q.shape[-1] ** -0.5, **extra)
        return o

    return run


_PEER_NOTE_SHOWN = []


def _forward_backward(fn, leaves, d_out):
    """A callable running fn(*leaves) and its gradients with respect to the leaves."""
    import torch

    def run():
        out = fn(*leaves)
        return (out.detach(),) + torch.autograd.grad(out, leaves, d_out)

    return run


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

    peer = torch_chunked
    if dev == "cuda":
        peer = fla_chunk()
        if peer is None:
            peer = torch_chunked
            if not _PEER_NOTE_SHOWN:
                _PEER_NOTE_SHOWN.append(True)
                print("linear_attention: peer unavailable: flash-linear-attention (fla) is not importable here; "
                      "the peer column is the chunked torch implementation")

    def peer_fwd():
        return peer(q, k, v, g)

    def fwd_bwd(fn):
        return _forward_backward(lambda *x: fn(*x, g), leaves, d_out)

    def compare(ours_out, peer_out):
        if isinstance(peer_out, torch.Tensor):
            ours_out, peer_out = (ours_out,), (peer_out,)
        return compare_outputs(ours_out, peer_out, settings.dtype)

    flops = forward_flops(B, S, H, D, D)
    tensor_bytes = B * S * H * D * q.element_size()
    ours_fb = fwd_bwd(lambda q_, k_, v_, g_: longattn.linear_attention(q_, k_, v_, log_decay=g_))
    # Bandwidth bound on CUDA: q, k, v read and out written (+ dout read, dq, dk, dv written).
    fwd_bytes, fb_bytes = (4 * tensor_bytes, 11 * tensor_bytes) if dev == "cuda" else (None, None)
    return [Workload("fwd", ours_fwd, peer_fwd, bytes=fwd_bytes, flops=flops, compare=compare),
            Workload("fwd+bwd", ours_fb, fwd_bwd(peer), bytes=fb_bytes, flops=3.5 * flops, compare=compare)]


def _cases(settings: Settings) -> list[Case]:
    if settings.device == "cuda" and settings.size != "quick":  # the H100 workload
        b, h, d, s = 4, 16, 128, 16384
        return [Case({"B": b, "S": s, "H": h, "D": d, "decay": decay},
                     lambda decay=decay: _setup(settings, b, s, h, d, decay))
                for decay in ("none", "per-head")]
    b, h, d = (1, 2, 32) if settings.size == "quick" else (1, 8, 64)
    return [Case({"B": b, "S": s, "H": h, "D": d, "decay": decay},
                 lambda s=s, decay=decay: _setup(settings, b, s, h, d, decay))
            for s in _SEQLENS[settings.size] for decay in ("none", "per-head")]


_CROSS_SEQLENS = {"quick": (128, 256), "default": (128, 256, 512, 1024, 2048, 4096),
                  "full": (128, 256, 512, 1024, 2048, 4096, 8192, 16384)}


def _cross_setup(settings: Settings, B: int, S: int, H: int, D: int) -> list[Workload]:
    import torch

    import longattn

    from .attention import forward_flops as attention_flops

    dev, dtype = settings.device, settings.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(S)
    q, k, v, d_out = (torch.randn(B, S, H, D, generator=gen, device=dev, dtype=dtype) for _ in range(4))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def fwd_bwd(fn):
        return _forward_backward(fn, leaves, d_out)

    def linear(q_, k_, v_):
        return longattn.linear_attention(q_, k_, v_)

    def flash(q_, k_, v_):
        return longattn.flash_attention(q_, k_, v_, causal=True)

    flops, flash_flops = forward_flops(B, S, H, D, D), attention_flops(B, S, S, H, D, True)
    return [Workload("fwd", lambda: linear(q, k, v), lambda: flash(q, k, v), flops=flops, peer_flops=flash_flops),
            Workload("fwd+bwd", fwd_bwd(linear), fwd_bwd(flash), flops=3.5 * flops, peer_flops=3.5 * flash_flops)]


def _cross_cases(settings: Settings) -> list[Case]:
    if settings.device == "cuda":
        b, h, d = (1, 2, 32) if settings.size == "quick" else (1, 16, 128)
    else:
        b, h, d = (1, 2, 32) if settings.size == "quick" else (1, 8, 64)
    return [Case({"B": b, "S": s, "H": h, "D": d}, lambda s=s: _cross_setup(settings, b, s, h, d))
            for s in _CROSS_SEQLENS[settings.size]]


def _versions() -> dict:
    import torch

    versions = {"torch": torch.__version__}
    try:
        import fla

        versions["fla"] = getattr(fla, "__version__", "unknown")
    except Exception:
        versions["fla"] = "unavailable"
    return versions


register(Entry(
    name="linear_attention",
    description="causal linear attention (B, S, H, D), no decay and RetNet per-head decay, forward and "
                "forward+backward; TFLOP/s of the chunked form, and on CUDA GB/s against the copy bandwidth",
    peer="CUDA: flash-linear-attention chunk_simple_gla when `import fla` works; otherwise (and on CPU) "
         "chunked linear attention written with torch matmuls (64-token chunks), torch autograd backward",
    sweep="S",
    cases=_cases,
    default_dtype={"cpu": "float32", "cuda": "bfloat16"},
    versions=_versions,
))

def torch_step(q, k, v, S, log_decay=None):
    """One in-place decoding step with torch ops: S = exp(g) S + k v^T, o = S^T (q K^-0.5);
    q, k (B, 1, H, K), v (B, 1, H, V), S float32 (B, H, K, V), log_decay None or (B, 1, H)."""
    import torch

    if log_decay is not None:
        S.mul_(torch.exp(log_decay[:, 0])[..., None, None])
    S.add_(k[:, 0, :, :, None].to(S.dtype) * v[:, 0, :, None, :].to(S.dtype))
    q = q[:, 0].to(S.dtype) * q.shape[-1] ** -0.5
    return torch.einsum("bhk,bhkv->bhv", q, S)[:, None].to(v.dtype)


def _step_setup(settings: Settings, B: int, H: int, D: int, decay: str) -> list[Workload]:
    import torch

    import longattn

    dev, dtype = settings.device, settings.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(B * H * D)
    q, k, v = (torch.randn(B, 1, H, D, generator=gen, device=dev, dtype=dtype) for _ in range(3))
    S0 = torch.randn(B, H, D, D, generator=gen, device=dev, dtype=torch.float32)
    ours_S, peer_S = S0.clone(), S0.clone()
    g = -torch.rand(B, 1, H, generator=gen, device=dev) if decay == "per-token" else None

    def ours():
        return longattn.linear_attention_step(q, k, v, ours_S, log_decay=g, inplace=True)[0]

    def peer():
        return torch_step(q, k, v, peer_S, g)

    def compare(ours_out, peer_out):
        return compare_outputs((ours_out,), (peer_out,), settings.dtype)

    state_bytes = 2 * B * H * D * D * 4  # read and write the float32 state
    return [Workload("step", ours, peer, bytes=state_bytes + 4 * B * H * D * q.element_size(),
                     flops=4.0 * B * H * D * D, compare=compare)]


_STEP_SHAPES = {"quick": ((1, 2, 32),), "cpu": ((1, 8, 64), (8, 8, 64), (1, 16, 128)),
                "cuda": ((8, 16, 128), (64, 16, 128))}


def _step_cases(settings: Settings) -> list[Case]:
    shapes = _STEP_SHAPES["quick" if settings.size == "quick" else settings.device]
    return [Case({"B": b, "H": h, "D": d, "decay": decay}, lambda b=b, h=h, d=d, decay=decay:
                 _step_setup(settings, b, h, d, decay))
            for b, h, d in shapes for decay in ("none", "per-token")]


register(Entry(
    name="linear_step",
    description="one decoding step of causal linear attention, in place on a float32 state (B, H, D, D): "
                "linear_attention_step(inplace=True), without and with a per-token decay; GB/s of the state "
                "read and written",
    peer="the same step written with torch ops (S.mul_, S.add_ of k v^T, einsum for S^T q), in place",
    sweep="B",
    cases=_step_cases,
    default_dtype={"cpu": "float32", "cuda": "bfloat16"},
    versions=_versions,
))

register(Entry(
    name="linear_vs_flash",
    description="where causal linear attention overtakes causal softmax attention: longattn.linear_attention "
                "(no decay, 64-token chunks) against longattn.flash_attention(causal=True) on the same (B, S, H, D) "
                "inputs, forward and forward+backward; each side's TFLOP/s counts its own FLOPs",
    peer="longattn.flash_attention, causal (our own kernel); ratio = flash ms / linear ms, > 1 where linear "
         "attention is faster",
    sweep="S",
    cases=_cross_cases,
    default_dtype={"cpu": "float32", "cuda": "bfloat16"},
))
