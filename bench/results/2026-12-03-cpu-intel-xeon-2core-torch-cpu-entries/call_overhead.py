"""Per-call time of the decoding-path entry points on torch CPU tensors (B = 1, H = 8,
D = 64, float32), best of 5 batches, against torch equivalents in the same process."""
import time

import torch
import torch.nn.functional as F

import longattn

torch.set_num_threads(2)


def us(f, n=5000):
    for _ in range(300):
        f()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n // 5):
            f()
        best = min(best, (time.perf_counter() - t) / (n // 5) * 1e6)
    return best


H, D = 8, 64
q = torch.randn(1, 1, H, D)
inv_freq, _ = longattn.rope_frequencies(D)
pos = torch.tensor([[5]])
with torch.no_grad():
    for sk in (64, 512):
        k, v = torch.randn(1, sk, H, D), torch.randn(1, sk, H, D)
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        print(f"flash_attention 1 query x {sk} keys: {us(lambda: longattn.flash_attention(q, k, v)):.1f} us; "
              f"torch SDPA: {us(lambda: F.scaled_dot_product_attention(qt, kt, vt)):.1f} us")
    kq = torch.randn(1, 1, H, D)
    print(f"apply_rope q and k, 1 token: {us(lambda: longattn.apply_rope(q, kq, positions=pos, inv_freq=inv_freq)):.1f}"
          f" us; in place: {us(lambda: longattn.apply_rope(q, kq, positions=pos, inv_freq=inv_freq, inplace=True)):.1f}"
          " us")
    S = torch.zeros(1, H, D, D)
    g = -torch.rand(1, 1, H)
    print(f"linear_attention_step in place: {us(lambda: longattn.linear_attention_step(q, kq, q, S, inplace=True)):.1f}"
          f" us; with decay: "
          f"{us(lambda: longattn.linear_attention_step(q, kq, q, S, log_decay=g, inplace=True)):.1f} us")
