"""RoPE benchmark: ``longattn.apply_rope`` against Hugging Face transformers' eager path.

The peer is what a Llama layer runs in eager mode: ``LlamaRotaryEmbedding.forward``
turns ``position_ids`` into cos/sin, then ``apply_rotary_pos_emb`` rotates q and k.
Our fused op computes cos/sin in-kernel from ``inv_freq`` and the positions, so the
peer is charged for its cos/sin computation too, on every call.

Layout: both sides get the same (B, S, H, D) buffers. The peer receives them the way
``LlamaAttention`` hands them over, as ``.transpose(1, 2)`` views in (B, H, S, D) with
the default ``unsqueeze_dim=1``; its outputs are transposed back (a free view) for the
comparison. Positions are an explicit (B, S) int64 tensor ``0..S-1`` for both.

Bytes (for GB/s) are those of an ideal kernel: the forward reads q and k and writes
them once, ``2 * (numel(q) + numel(k)) * itemsize``; the backward moves the same again.
"""
from __future__ import annotations

from .harness import CHECK_TOLERANCE, Case, Entry, Settings, Workload, compare_outputs, register

THETA = 10000.0

# (B, S, Hq, Hk, D). The targets: B=4 S=4096 fp32 on CPU, B=8 S=4096 bf16 on CUDA.
_TARGET = {"cpu": (4, 32, 8, 128), "cuda": (8, 32, 8, 128)}
_SEQLENS = {
    ("cpu", "default"): (512, 1024, 2048, 4096),
    ("cpu", "full"): (256, 512, 1024, 2048, 4096, 8192, 16384),
    ("cuda", "default"): (1024, 2048, 4096, 8192, 16384),
    ("cuda", "full"): (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
}


def _shapes(settings: Settings) -> list[tuple]:
    if settings.size == "quick":
        return [(1, s, 4, 2, 64) for s in (32, 64)]
    b, hq, hk, d = _TARGET[settings.device]
    shapes = [(b, s, hq, hk, d) for s in _SEQLENS[(settings.device, settings.size)]]
    if settings.size == "full":
        shapes += [(b, s, hq, hk, 64) for s in _SEQLENS[(settings.device, "full")]]
    return shapes


def _setup(settings: Settings, B: int, S: int, Hq: int, Hk: int, D: int) -> list[Workload]:
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    import longattn

    dev, dtype = settings.device, settings.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(S)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=dtype)

    q, k = randn(B, S, Hq, D), randn(B, S, Hk, D)
    dq_out, dk_out = randn(B, S, Hq, D), randn(B, S, Hk, D)
    positions = torch.arange(S, device=dev).repeat(B, 1)

    # Host float32 array, as rope_frequencies returns it: the op reads it on the host,
    # so a device copy would only add a device-to-host transfer per call.
    inv_freq, attention_factor = longattn.rope_frequencies(D, theta=THETA)

    config = LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hk, head_dim=D,
                         max_position_embeddings=max(S, 2048),
                         rope_parameters={"rope_type": "default", "rope_theta": THETA})
    rotary = LlamaRotaryEmbedding(config).to(dev)

    def ours(q_in, k_in):
        return longattn.apply_rope(q_in, k_in, positions, inv_freq=inv_freq, attention_factor=attention_factor)

    def peer(q_in, k_in):
        cos, sin = rotary(q_in, positions)
        q_rot, k_rot = apply_rotary_pos_emb(q_in.transpose(1, 2), k_in.transpose(1, 2), cos, sin)
        return q_rot.transpose(1, 2), k_rot.transpose(1, 2)

    q_leaf = q.detach().requires_grad_()
    k_leaf = k.detach().requires_grad_()

    def with_backward(fn):
        def run():
            q_rot, k_rot = fn(q_leaf, k_leaf)
            dq, dk = torch.autograd.grad((q_rot, k_rot), (q_leaf, k_leaf), (dq_out, dk_out))
            return q_rot.detach(), k_rot.detach(), dq, dk

        return run

    # Both sides form the angle position * inv_freq in float32; an ulp of difference
    # there (an FMA, another sincos) moves the output by about |x| * S * 2**-24.
    tolerance = CHECK_TOLERANCE[settings.dtype] + 4 * S * 2.0**-24

    def compare(a, b):
        return compare_outputs(a, b, settings.dtype, tolerance)

    moved = 2 * (q.numel() + k.numel()) * q.element_size()
    return [
        Workload("fwd", lambda: ours(q, k), lambda: peer(q, k), bytes=moved, compare=compare),
        Workload("fwd+bwd", with_backward(ours), with_backward(peer), bytes=2 * moved, compare=compare),
    ]


def _cases(settings: Settings) -> list[Case]:
    return [
        Case({"B": b, "S": s, "Hq": hq, "Hk": hk, "D": d},
             lambda b=b, s=s, hq=hq, hk=hk, d=d: _setup(settings, b, s, hq, hk, d))
        for b, s, hq, hk, d in _shapes(settings)
    ]


def _versions() -> dict:
    import transformers

    return {"transformers": transformers.__version__}


register(Entry(
    name="rope",
    description="fused RoPE on q and k (NeoX rotation, cos/sin from positions), forward and forward+backward",
    peer="transformers eager LlamaRotaryEmbedding.forward + apply_rotary_pos_emb",
    sweep="S",
    cases=_cases,
    versions=_versions,
))
