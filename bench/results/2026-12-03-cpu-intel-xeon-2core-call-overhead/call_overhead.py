import time, torch, longattn
torch.set_num_threads(2)
q = torch.randn(1, 1, 8, 64); k = torch.randn(1, 16, 8, 64); v = torch.randn(1, 16, 8, 64)
qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
inv_freq, _ = longattn.rope_frequencies(64); pos = torch.tensor([[5]])
def us(f, n=5000):
    for _ in range(300): f()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n // 5): f()
        best = min(best, (time.perf_counter() - t) / (n // 5) * 1e6)
    return best
print(f"flash_attention 1 query x 16 keys: {us(lambda: longattn.flash_attention(q, k, v)):.1f} us")
print(f"apply_rope 1 token: {us(lambda: longattn.apply_rope(q, positions=pos, inv_freq=inv_freq)):.1f} us")
print(f"torch SDPA same shape: {us(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)):.1f} us")
