"""Eager torch calls that need no autograd skip the torch dispatcher and run the custom op's
body directly (torch_ops._direct); everything else goes through the registered ops. These
tests pin both sides: same results, and the ops stay visible where torch needs to see them
(dispatch modes, the profiler, autograd, meta tensors)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import longattn
from longattn import torch_ops
from longattn.block_sparse import mask_fields, schedule_lists


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _inputs(seed=0, S=37, H=2, D=16):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, S, H, D, generator=g) for _ in range(3))


def _flash():
    q, k, v = _inputs()
    return (lambda: longattn.flash_attention(q, k, v, causal=True, return_lse=True),
            lambda: torch.ops.longattn.flash_attention_forward(q, k, v, None, None, 0, 0, 16 ** -0.5, 0.0, None,
                                                               -1, -1, True, False),
            "longattn.flash_attention_forward")


def _block_sparse():
    q, k, v = _inputs(S=256)
    bm = longattn.masks.streaming(256, 256, sink_tokens=4, window=64, block_size=64)

    def via_op():
        lists = [x if isinstance(x, torch.Tensor) else torch.from_numpy(x.copy()) for x in schedule_lists(bm)]
        return torch.ops.longattn.block_sparse_attention_forward(q, k, v, *lists, *bm.block_size, *mask_fields(bm),
                                                                 16 ** -0.5, 0.0, False)
    return (lambda: longattn.block_sparse_attention(q, k, v, bm, return_lse=True), via_op,
            "longattn.block_sparse_attention_forward")


def _linear():
    q, k, v = _inputs()
    return (lambda: longattn.linear_attention(q, k, v, return_state=True),
            lambda: torch.ops.longattn.linear_attention_forward(q, k, v, None, None, None, None, 16 ** -0.5, 0,
                                                                True, False, 64)[:2],
            "longattn.linear_attention_forward")


def _rope():
    q, _, _ = _inputs()
    inv_freq, _ = longattn.rope_frequencies(16)
    pos = torch.arange(q.shape[1])[None]
    return (lambda: longattn.apply_rope(q, positions=pos, inv_freq=inv_freq),
            lambda: torch.ops.longattn.rope(q, None, pos, torch.from_numpy(inv_freq), 1.0, False, False)[0],
            "longattn.rope")


CASES = {"flash": _flash, "block_sparse": _block_sparse, "linear": _linear, "rope": _rope}


def _flat(x):
    return [t for t in (x if isinstance(x, (tuple, list)) else (x,)) if t is not None]


@pytest.mark.parametrize("name", sorted(CASES))
def test_direct_call_equals_the_registered_op_bit_for_bit(name):
    public, via_op, _ = CASES[name]()
    got, want = _flat(public()), _flat(via_op())
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dispatch_modes_and_the_profiler_still_see_the_op(name):
    public, _, op_name = CASES[name]()
    with RecordOps() as mode:
        public()
    assert any(n.startswith(op_name) for n in mode.names), mode.names
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        public()
    assert any(e.name.startswith(op_name.replace(".", "::")) for e in prof.events())


def test_direct_is_taken_only_for_plain_eager_tensors_without_autograd():
    q, k, v = _inputs()
    assert torch_ops._direct(q, k, None, v)
    assert not torch_ops._direct(q, k.requires_grad_(), v)
    with torch.no_grad():
        assert torch_ops._direct(q, k, v)  # nothing to record
    assert not torch_ops._direct(q, torch.nn.Parameter(v))  # a subclass
    assert not torch_ops._direct(q.to("meta"))
    with RecordOps():
        assert not torch_ops._direct(q)
    with torch.device("cpu"):  # a torch function mode
        assert not torch_ops._direct(q)


def test_grad_inputs_go_through_autograd_and_meta_inputs_through_the_fake_kernel():
    q, k, v = _inputs()
    out = longattn.flash_attention(q.requires_grad_(), k, v)
    assert out.grad_fn is not None
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape
    qm, km, vm = (x.detach().to("meta") for x in (q, k, v))
    out, lse = longattn.flash_attention(qm, km, vm, return_lse=True)
    assert out.device.type == "meta" and out.shape == q.shape and lse.shape == (1, 2, 37)
