"""Small calls of every CUDA op, for compute-sanitizer (memcheck, racecheck, synccheck).

The pytest suite is too slow under the sanitizer, so this driver runs each kernel path once
on small, odd shapes that still touch every edge: partial tiles, GQA, masks, varlen, the
deterministic backward, head-dim buckets. Ops whose CUDA path raises NotImplementedError
are reported and skipped. Run it under the sanitizer with torch's caching allocator off:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 tools/gpu_sanitize_cases.py

Exit status 1 if any case raised (other than NotImplementedError).
"""
from __future__ import annotations

import argparse
import sys
import traceback

import torch

import longattn

DEV = "cuda"


def randn(*shape, dtype=torch.bfloat16, grad=True):
    return torch.randn(*shape, device=DEV, dtype=dtype).requires_grad_(grad)


def attention_cases():
    for dtype in (torch.float16, torch.bfloat16):
        for D, Dv in ((64, 64), (80, 80), (128, 128), (256, 256), (64, 128)):
            for causal, window, Sq, Sk in ((False, (-1, -1), 77, 131), (True, (-1, -1), 131, 77),
                                           (True, (33, -1), 200, 200), (False, (16, 8), 65, 129)):
                for det in (False, True):
                    name = f"flash {dtype} D={D}/{Dv} causal={causal} window={window} Sq={Sq} Sk={Sk} det={det}"

                    def run(dtype=dtype, D=D, Dv=Dv, causal=causal, window=window, Sq=Sq, Sk=Sk, det=det):
                        q, k, v = randn(2, Sq, 4, D, dtype=dtype), randn(2, Sk, 2, D, dtype=dtype), randn(
                            2, Sk, 2, Dv, dtype=dtype)
                        out, lse = longattn.flash_attention(q, k, v, causal=causal, window=window, return_lse=True,
                                                            softcap=10.0 if D == 80 else 0.0, deterministic=det)
                        (out.float().sum() + lse[lse.isfinite()].sum()).backward()

                    yield name, run

    def varlen():
        lens = [1, 63, 130, 0, 17]
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=DEV, dtype=torch.int32)
        total = int(cu[-1])
        q, k, v = randn(total, 4, 64), randn(total, 1, 64), randn(total, 1, 64)
        slopes = torch.rand(4, device=DEV)
        out = longattn.flash_attention_varlen(q, k, v, cu, cu, causal=True, alibi_slopes=slopes)
        out.float().sum().backward()

    yield "flash varlen causal alibi MQA", varlen

    def decode():  # few CTAs: the forward splits the keys and merges the partials
        q, k, v = randn(1, 1, 8, 128, grad=False), randn(1, 1000, 2, 128, grad=False), randn(1, 1000, 2, 128, grad=False)
        longattn.flash_attention(q, k, v, return_lse=True)
        lens = [700, 0, 33]
        cu_k = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=DEV, dtype=torch.int32)
        cu_q = torch.arange(4, device=DEV, dtype=torch.int32)
        kk, vv = randn(sum(lens), 2, 64, grad=False), randn(sum(lens), 2, 64, grad=False)
        longattn.flash_attention_varlen(randn(3, 4, 64, grad=False), kk, vv, cu_q, cu_k, window=(100, 0))
        # GQA packing: 45 queries x 2 heads (of a group of 4) per query tile
        longattn.flash_attention(randn(1, 45, 8, 64, grad=False), randn(1, 300, 2, 64, grad=False),
                                 randn(1, 300, 2, 64, grad=False), causal=True, window=(50, 0))

    yield "flash split-KV decoding and GQA packing (dense GQA, varlen with an empty sequence)", decode


def block_sparse_cases():
    for bq, bk in ((64, 64), (128, 64), (64, 128), (128, 128)):
        for pattern in ("sliding", "bigbird", "streaming", "strided_bits", "union_bits"):
            name = f"block_sparse {pattern} block=({bq},{bk})"

            def run(bq=bq, bk=bk, pattern=pattern):
                S = 333
                if pattern == "sliding":
                    bm = longattn.masks.sliding_window(S, S, window=100, block_size=(bq, bk))
                elif pattern == "bigbird":
                    bm = longattn.masks.bigbird(S, S, window_blocks=1, global_blocks=1, random_blocks=1, seed=0,
                                                block_size=(bq, bk))
                elif pattern == "streaming":
                    bm = longattn.masks.streaming(S, S, sink_tokens=4, window=90, block_size=(bq, bk))
                elif pattern == "strided_bits":  # bit tiles
                    bm = longattn.masks.strided(S, S, 37, block_size=(bq, bk))
                else:  # bit tiles from a union of different element masks
                    bm = longattn.masks.union(longattn.masks.dilated(S, S, 64, 3, block_size=(bq, bk)),
                                              longattn.masks.streaming(S, S, 4, 50, block_size=(bq, bk)))
                bm = bm.to(DEV)
                q, k, v = randn(1, S, 4, 64), randn(1, S, 2, 64), randn(1, S, 2, 64)
                out = longattn.block_sparse_attention(q, k, v, bm)
                out.float().sum().backward()

            yield name, run


def linear_cases():
    for decay in (None, "head", "token"):
        for normalize in (False, True):
            name = f"linear_attention decay={decay} normalize={normalize}"

            def run(decay=decay, normalize=normalize):
                B, T, H, K, V = 2, 150, 3, 64, 96
                q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
                g = None
                if decay == "head":
                    g = -torch.rand(H, device=DEV)
                elif decay == "token":
                    g = (-torch.rand(B, T, H, device=DEV) * 2).requires_grad_(True)
                out, state = longattn.linear_attention(q, k, v, log_decay=g, normalize=normalize,
                                                       feature_map="elu1" if normalize else None, return_state=True)
                s = out.float().sum() + (state[0] if isinstance(state, tuple) else state).sum()
                s.backward()
                q1, k1, v1 = (x[:, :1].detach() for x in (q, k, v))
                longattn.linear_attention_step(q1, k1, v1, state, normalize=normalize,
                                               feature_map="elu1" if normalize else None)

            yield name, run


def rope_cases():
    for interleaved in (False, True):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            name = f"rope interleaved={interleaved} {dtype}"

            def run(interleaved=interleaved, dtype=dtype):
                inv, factor = longattn.rope_frequencies(
                    96, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                    max_position_embeddings=256)
                q, k = randn(2, 77, 5, 96, dtype=dtype), randn(2, 77, 1, 96, dtype=dtype)
                pos = torch.randint(0, 4096, (2, 77), device=DEV)
                qo, ko = longattn.apply_rope(q, k, pos, inv_freq=inv, attention_factor=factor, interleaved=interleaved)
                (qo.float().sum() + ko.float().sum()).backward()

            yield name, run


GROUPS = {"attention": attention_cases, "block_sparse": block_sparse_cases, "linear": linear_cases, "rope": rope_cases}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu checks this script itself")
    ap.add_argument("--only", default=",".join(GROUPS), help="comma-separated groups: " + ", ".join(GROUPS))
    args = ap.parse_args(argv)
    global DEV
    DEV = args.device
    failed = skipped = passed = 0
    for group in args.only.split(","):
        for name, fn in GROUPS[group]():
            try:
                fn()
                if DEV == "cuda":
                    torch.cuda.synchronize()
                passed += 1
            except NotImplementedError as e:
                skipped += 1
                print(f"SKIP {name}: {e}", flush=True)
            except Exception:
                failed += 1
                print(f"FAIL {name}", flush=True)
                traceback.print_exc()
    print(f"sanitize cases: {passed} ran, {skipped} not implemented, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
