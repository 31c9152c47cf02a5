"""One flash attention forward and backward at the issue's H100 shape, for Nsight Compute.

    ncu --set full --import-source yes -k regex:flash_ --launch-skip 4 -c 4 -o flash \
        python3 tools/gpu_profile_flash.py

B=2 H=16 S=8192 D=128 bfloat16, causal (--no-causal for the full square). The first call
warms up (its 4 kernels: forward, backward preprocess, backward, dQ conversion, are what
--launch-skip 4 passes over); the second is the one profiled.
"""
import argparse

import torch

import longattn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--seqlen", type=int, default=8192)
    args = ap.parse_args()
    B, H, S, D = 2, 16, args.seqlen, 128
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    causal = not args.no_causal
    for _ in range(2):
        out = longattn.flash_attention(q, k, v, causal=causal)
        out.backward(dout)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
