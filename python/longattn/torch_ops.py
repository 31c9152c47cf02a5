"""torch integration: PyTorch custom ops with fake (meta) implementations, so that
torch.compile(fullgraph=True) traces through longattn, plus autograd formulas.

Imported only when a torch tensor reaches a public op; longattn itself never requires torch.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import library as op_lib

from . import _C

custom_op, register_autograd = op_lib.custom_op, op_lib.register_autograd
# The compiled torch CPU entries (see _plain_cpu) recognize dtypes by these objects.
_C.set_torch_dtypes([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64])


def _eager() -> bool:
    """Eager mode: not compiling, tracing or profiling, no torch function or dispatch mode
    and no functorch transform active (see _direct)."""
    return not (torch.compiler.is_compiling() or torch._C._is_tracing() or torch._C._autograd._profiler_enabled()
                or torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack()
                or torch._C._are_functorch_transforms_active())


def _direct(*args) -> bool:
    """Whether a call may skip the torch dispatcher and run its op's body directly (the same
    function the op runs, so the same result): eager mode (_eager), plain CPU / CUDA
    tensors (no subclass: FakeTensor, FunctionalTensor, DTensor, ...) and nothing for
    autograd to record. The dispatcher and custom-op wrappers cost ~20 us per call on a
    2-core VM, more than a decoding step's kernel."""
    if not _eager():
        return False
    grad = torch.is_grad_enabled()
    T = torch.Tensor
    for t in args:
        tt = type(t)
        if tt is T:
            if (grad and t.requires_grad) or not (t.is_cpu or t.is_cuda):
                return False
        elif tt not in _SCALAR_TYPES and isinstance(t, T):  # a subclass
            return False
    return True


_SCALAR_TYPES = frozenset((type(None), bool, int, float))


def _call(op, body, *args):
    """op(*args) through the dispatcher, or body(*args), the function op runs, where
    _direct allows it."""
    return body(*args) if _direct(*args) else op(*args)


def _plain_cpu(*tensors) -> bool:
    """Whether every argument is None or a plain torch CPU tensor (no subclass), as the
    compiled `*_torch_cpu` entries take them: they describe the tensors in C++, which saves
    a decoding step ~10 us of Python (_arrays.wrap + TensorView for each)."""
    T = torch.Tensor
    for t in tensors:
        if t is not None and (type(t) is not T or not t.is_cpu):
            return False
    return True


from . import rope as _rope  # noqa: E402

# ---- RoPE ----------------------------------------------------------------------------


@custom_op("longattn::rope", mutates_args=(), device_types=("cpu", "cuda"))
def rope(q: torch.Tensor, k: Optional[torch.Tensor], positions: Optional[torch.Tensor], inv_freq: torch.Tensor,
         attention_factor: float, interleaved: bool, conjugate: bool) -> List[torch.Tensor]:
    """Out-of-place RoPE; returns [q_rot] or [q_rot, k_rot] (contiguous)."""
    return _rope_body(q, k, positions, inv_freq, attention_factor, interleaved, conjugate)


def _rope_cpu(q, k, positions, inv_freq) -> bool:
    """What _C.rope_torch_cpu takes: plain CPU tensors, q and k with 4 dims, int32 / int64
    positions, a float32 inv_freq (what apply_rope passes)."""
    return (_plain_cpu(q, k, positions, inv_freq) and q.dim() == 4 and (k is None or k.dim() == 4)
            and (positions is None or positions.dtype in (torch.int32, torch.int64)) and inv_freq.dtype == torch.float32)


def _rope_body(q, k, positions, inv_freq, attention_factor, interleaved, conjugate):
    if _rope_cpu(q, k, positions, inv_freq):
        q_out = q.new_empty(q.shape)
        k_out = None if k is None else k.new_empty(k.shape)
        _C.rope_torch_cpu(q, q_out, k, k_out, positions, inv_freq, attention_factor, interleaved, conjugate)
        return [q_out] if k is None else [q_out, k_out]
    freqs = _rope.inv_freq_values(inv_freq)
    q_out, k_out = _rope.rope_arrays(q, k, positions, freqs, attention_factor, interleaved, conjugate, False)
    return [q_out] if k is None else [q_out, k_out]


@rope.register_fake
def _rope_fake(q, k, positions, inv_freq, attention_factor, interleaved, conjugate):
    outs = [torch.empty(q.shape, dtype=q.dtype, device=q.device)]
    if k is not None:
        outs.append(torch.empty(k.shape, dtype=k.dtype, device=k.device))
    return outs


def _rope_setup_context(ctx, inputs, output):
    _, k, positions, inv_freq, attention_factor, interleaved, conjugate = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.args = (attention_factor, interleaved, conjugate)
    ctx.has_k = k is not None
    ctx.q_meta = (inputs[0].shape, inputs[0].dtype, inputs[0].device)
    ctx.k_meta = None if k is None else (k.shape, k.dtype, k.device)


def _grad(g: Optional[torch.Tensor], meta) -> torch.Tensor:
    # Incoming gradients may be None (output unused) or have any strides (e.g. the
    # stride-0 expansion from .sum()); the kernels want a contiguous last dim.
    if g is None:
        shape, dtype, device = meta
        return torch.zeros(shape, dtype=dtype, device=device)
    return g if g.stride(-1) == 1 else g.contiguous()


def _rope_backward(ctx, grads):
    # y = attention_factor * R(p) x, so dL/dx = attention_factor * R(p)^T dL/dy: the same op
    # with the conjugate rotation.
    positions, inv_freq = ctx.saved_tensors
    attention_factor, interleaved, conjugate = ctx.args
    gq = _grad(grads[0], ctx.q_meta)
    gk = _grad(grads[1], ctx.k_meta) if ctx.has_k else None
    outs = torch.ops.longattn.rope(gq, gk, positions, inv_freq, attention_factor, interleaved, not conjugate)
    return outs[0], (outs[1] if ctx.has_k else None), None, None, None, None, None


register_autograd("longattn::rope", _rope_backward, setup_context=_rope_setup_context)


@custom_op("longattn::rope_", mutates_args=("q", "k"), device_types=("cpu", "cuda"))
def rope_(q: torch.Tensor, k: Optional[torch.Tensor], positions: Optional[torch.Tensor], inv_freq: torch.Tensor,
          attention_factor: float, interleaved: bool, conjugate: bool) -> None:
    """In-place RoPE: rotates q (and k) in their own memory."""
    _rope_inplace_body(q, k, positions, inv_freq, attention_factor, interleaved, conjugate)


def _rope_inplace_body(q, k, positions, inv_freq, attention_factor, interleaved, conjugate):
    if _rope_cpu(q, k, positions, inv_freq):
        _C.rope_torch_cpu(q, q, k, k, positions, inv_freq, attention_factor, interleaved, conjugate)
        return
    freqs = _rope.inv_freq_values(inv_freq)
    _rope.rope_arrays(q, k, positions, freqs, attention_factor, interleaved, conjugate, True)


@rope_.register_fake
def _rope_inplace_fake(q, k, positions, inv_freq, attention_factor, interleaved, conjugate):
    return None


ROPE_OPS = [torch.ops.longattn.rope.default, torch.ops.longattn.rope_.default]


def _positions_tensor(q: torch.Tensor, positions) -> Optional[torch.Tensor]:
    if positions is None or isinstance(positions, torch.Tensor):
        return positions
    if isinstance(positions, (list, tuple, range)):
        return torch.as_tensor(list(positions), dtype=torch.int64, device=q.device)
    raise TypeError(f"apply_rope: positions is a {type(positions).__module__}.{type(positions).__name__} but q is "
                    f"a torch tensor; pass arrays of one framework")


def _inv_freq_tensor(inv_freq) -> torch.Tensor:
    # A tensor rather than a list of floats, so that torch.compile can trace a NumPy
    # inv_freq (dynamo turns NumPy arrays into tensors). Host-side values are read in the
    # op, which needs them on the CPU; a GPU inv_freq costs one small copy.
    t = inv_freq if isinstance(inv_freq, torch.Tensor) else torch.as_tensor(inv_freq)
    if t.dim() != 1 or not 1 <= t.numel() <= 256:
        raise ValueError(f"apply_rope: inv_freq must be 1-D with 1 to 256 entries, got shape {tuple(t.shape)}")
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"apply_rope: inv_freq must hold floats, got {t.dtype}")
    if t.requires_grad:
        t = t.detach()
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def apply_rope(q: torch.Tensor, k: Optional[torch.Tensor], positions, inv_freq,
               attention_factor: float, interleaved: bool, inplace: bool, stream: Optional[int]):
    if k is not None and not isinstance(k, torch.Tensor):
        raise TypeError(f"apply_rope: k is a {type(k).__module__}.{type(k).__name__} but q is a torch tensor; "
                        f"pass arrays of one framework")
    positions = _positions_tensor(q, positions)
    if positions is not None and positions.dtype not in (torch.int32, torch.int64):
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
            raise TypeError(f"apply_rope: positions must have an integer dtype, got {positions.dtype}")
        positions = positions.to(torch.int64)
    if stream is not None:
        # An explicit stream bypasses torch's stream bookkeeping: call the kernels directly.
        if torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad)):
            raise ValueError("apply_rope: stream= is for inference; under autograd use torch.cuda.stream(...)")
        q_out, k_out = _rope.rope_arrays(q, k, positions, _rope.inv_freq_values(inv_freq), attention_factor,
                                         interleaved, False, inplace, stream)
        return q_out if k is None else (q_out, k_out)
    freqs = _inv_freq_tensor(inv_freq)
    if inplace:
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad))
        if needs_grad:
            # custom-op autograd covers functional ops only, and q/k are often views
            # (slices of a packed qkv): compute out of place and copy_, which autograd
            # records correctly on views and leaves.
            outs = torch.ops.longattn.rope(q, k, positions, freqs, attention_factor, interleaved, False)
            q.copy_(outs[0])
            if k is not None:
                k.copy_(outs[1])
        else:
            _call(torch.ops.longattn.rope_, _rope_inplace_body, q, k, positions, freqs, attention_factor, interleaved,
                  False)
        return q if k is None else (q, k)
    outs = _call(torch.ops.longattn.rope, _rope_body, q, k, positions, freqs, attention_factor, interleaved, False)
    return outs[0] if k is None else (outs[0], outs[1])


# ---- flash attention -----------------------------------------------------------------

from . import attention as _attention  # noqa: E402


@custom_op("longattn::flash_attention_forward", mutates_args=(), device_types=("cpu", "cuda"))
def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                            cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float,
                            softcap: float, alibi_slopes: Optional[torch.Tensor], window_left: int, window_right: int,
                            causal: bool, deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse): out contiguous like q with v's head dim; lse float32
    (batch, heads, seqlen_q), or (heads, total_q) for packed input. `deterministic` only
    selects the backward (it is saved for autograd)."""
    return _flash_attention_forward_body(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                         softcap, alibi_slopes, window_left, window_right, causal, deterministic)


def _dense_cpu(q, k, v, alibi) -> bool:
    """What _C.attention_forward_torch_cpu takes: plain CPU tensors, q and v with 4 dims."""
    return _plain_cpu(q, k, v, alibi) and q.dim() == 4 and v.dim() == 4


def _flash_outputs(q, v, varlen: bool, need_lse: bool = True):
    """Empty (out, lse) for a forward: out like q with v's head dim, lse float32
    (batch, heads, seqlen_q), or (heads, total_q) for packed input (None if not need_lse)."""
    if varlen:
        T, H, _ = q.shape
        return q.new_empty((T, H, v.shape[-1])), q.new_empty((H, T), dtype=torch.float32)
    B, S, H, _ = q.shape
    return q.new_empty((B, S, H, v.shape[-1])), q.new_empty((B, H, S), dtype=torch.float32) if need_lse else None


def _flash_cpu(q, k, v, alibi, scale, softcap, window_left, window_right, causal, need_lse=True):
    """The forward through _C.attention_forward_torch_cpu (inputs as _dense_cpu takes)."""
    out, lse = _flash_outputs(q, v, False, need_lse)
    _C.attention_forward_torch_cpu(q, k, v, out, lse, alibi, scale, softcap, window_left, window_right, causal)
    return out, lse


def _flash_attention_forward_body(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, softcap,
                                  alibi_slopes, window_left, window_right, causal, deterministic):
    if cu_seqlens_q is None and cu_seqlens_k is None and _dense_cpu(q, k, v, alibi_slopes):
        return _flash_cpu(q, k, v, alibi_slopes, scale, softcap, window_left, window_right, causal)
    return _attention.forward_arrays(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, softcap,
                                     alibi_slopes, window_left, window_right, causal)


@flash_attention_forward.register_fake
def _flash_attention_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, softcap,
                                  alibi_slopes, window_left, window_right, causal, deterministic):
    return _flash_outputs(q, v, cu_seqlens_q is not None)


@custom_op("longattn::flash_attention_backward", mutates_args=(), device_types=("cpu", "cuda"))
def flash_attention_backward(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                             max_seqlen_q: int, max_seqlen_k: int, scale: float, softcap: float,
                             alibi_slopes: Optional[torch.Tensor], window_left: int, window_right: int, causal: bool,
                             deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv), contiguous. The CPU backward is always deterministic."""
    return _attention.backward_arrays(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, scale, softcap, alibi_slopes, window_left, window_right, causal,
                                      deterministic=deterministic)


@flash_attention_backward.register_fake
def _flash_attention_backward_fake(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, scale, softcap, alibi_slopes, window_left, window_right, causal,
                                   deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, softcap, alibi, wl, wr, causal, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi)
    ctx.args = (max_q, max_k, scale, softcap, wl, wr, causal)
    ctx.deterministic = bool(deterministic)


def _attention_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
    max_q, max_k, scale, softcap, wl, wr, causal = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.stride(-1) != 1:
        dout = dout.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()  # the kernel reads it with lse's (contiguous) strides
    dq, dk, dv = torch.ops.longattn.flash_attention_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                                             scale, softcap, alibi, wl, wr, causal,
                                                             ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


register_autograd("longattn::flash_attention_forward", _attention_backward,
                                setup_context=_attention_setup_context)

ATTENTION_OPS = [torch.ops.longattn.flash_attention_forward.default,
                 torch.ops.longattn.flash_attention_backward.default]


def flash_attention(q, k, v, cu_q, cu_k, max_q, max_k, opts, alibi, deterministic, need_lse=True):
    """(out, lse); lse may be None when need_lse is False."""
    if cu_q is None and cu_k is None and _dense_cpu(q, k, v, alibi) and _direct(q, k, v, alibi):
        # The op body's own path (_flash_attention_forward_body), without the lse when the
        # caller does not want it: nothing is recorded for a backward.
        return _flash_cpu(q, k, v, alibi, opts["scale"], opts["softcap"], opts["window_left"], opts["window_right"],
                          opts["causal"], need_lse)
    for name, x in (("k", k), ("v", v), ("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k), ("alibi_slopes", alibi)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"flash_attention: {name} is a {type(x).__module__}.{type(x).__name__} but q is a torch "
                            f"tensor; pass arrays of one framework")
    # `deterministic` rides along in the forward op so autograd can hand it to the backward
    # (the CPU backward is deterministic by construction; CUDA then avoids atomics).
    return _call(torch.ops.longattn.flash_attention_forward, _flash_attention_forward_body, q, k, v, cu_q, cu_k,
                 int(max_q or 0), int(max_k or 0), opts["scale"], opts["softcap"], alibi, opts["window_left"],
                 opts["window_right"], opts["causal"], bool(deterministic))


# ---- block-sparse attention ----------------------------------------------------------

from . import block_sparse as _block_sparse  # noqa: E402


# The BlockMask travels as its eight int32 lists: key side (kv_num, kv_idx, full_num,
# full_idx) for the forward, plus the query side (q_num, q_idx, full_q_num, full_q_idx) that
# the CUDA backward walks, then its bit tiles (bits, kv_bits, q_bits: empty tensors for masks
# without). `deterministic` rides along in the forward for the backward.
@custom_op("longattn::block_sparse_attention_forward", mutates_args=(), device_types=("cpu", "cuda"))
def block_sparse_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num: torch.Tensor,
                                   kv_idx: torch.Tensor, full_num: torch.Tensor, full_idx: torch.Tensor,
                                   q_num: torch.Tensor, q_idx: torch.Tensor, full_q_num: torch.Tensor,
                                   full_q_idx: torch.Tensor, bits: torch.Tensor, kv_bits: torch.Tensor,
                                   q_bits: torch.Tensor, block_q: int, block_k: int, causal: bool,
                                   window_left: int, window_right: int, sink_tokens: int, scale: float,
                                   softcap: float, deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return _block_sparse_forward_body(q, k, v, kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num,
                                      full_q_idx, bits, kv_bits, q_bits, block_q, block_k, causal, window_left,
                                      window_right, sink_tokens, scale, softcap, deterministic)


def _block_sparse_forward_body(q, k, v, kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx,
                               bits, kv_bits, q_bits, block_q, block_k, causal, window_left, window_right,
                               sink_tokens, scale, softcap, deterministic):
    sched = _block_sparse.make_schedule((kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx,
                                         bits, kv_bits, q_bits),
                                        block_q, block_k, (causal, window_left, window_right, sink_tokens))
    return _attention.forward_arrays(q, k, v, None, None, None, None, scale, softcap, None, -1, -1, False, None,
                                     "block_sparse_attention", sched)


@block_sparse_attention_forward.register_fake
def _block_sparse_forward_fake(q, k, v, kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx,
                               bits, kv_bits, q_bits, block_q, block_k, causal, window_left, window_right,
                               sink_tokens, scale, softcap, deterministic):
    return (q.new_empty(tuple(q.shape[:-1]) + (v.shape[-1],)),
            q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32))


@custom_op("longattn::block_sparse_attention_backward", mutates_args=(), device_types=("cpu", "cuda"))
def block_sparse_attention_backward(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor,
                                    k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                    kv_num: torch.Tensor, kv_idx: torch.Tensor, full_num: torch.Tensor,
                                    full_idx: torch.Tensor, q_num: torch.Tensor, q_idx: torch.Tensor,
                                    full_q_num: torch.Tensor, full_q_idx: torch.Tensor, bits: torch.Tensor,
                                    kv_bits: torch.Tensor, q_bits: torch.Tensor, block_q: int, block_k: int,
                                    causal: bool, window_left: int, window_right: int, sink_tokens: int, scale: float,
                                    softcap: float, deterministic: bool
                                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lists = (kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx, bits, kv_bits, q_bits)
    return _block_sparse.block_sparse_backward_arrays(dout, dlse, q, k, v, out, lse, lists, block_q, block_k,
                                                      (causal, window_left, window_right, sink_tokens), scale, softcap,
                                                      deterministic)


@block_sparse_attention_backward.register_fake
def _block_sparse_backward_fake(dout, dlse, q, k, v, out, lse, kv_num, kv_idx, full_num, full_idx, q_num, q_idx,
                                full_q_num, full_q_idx, bits, kv_bits, q_bits, block_q, block_k, causal, window_left,
                                window_right, sink_tokens, scale, softcap, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _block_sparse_setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    ctx.save_for_backward(q, k, v, output[0], output[1], *inputs[3:14])
    ctx.args = inputs[14:]


def _block_sparse_backward(ctx, dout, dlse):
    q, k, v, out, lse, *lists = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else (dout if dout.stride(-1) == 1 else dout.contiguous())
    dlse = None if dlse is None else dlse.contiguous()
    dq, dk, dv = torch.ops.longattn.block_sparse_attention_backward(dout, dlse, q, k, v, out, lse, *lists, *ctx.args)
    return (dq, dk, dv) + (None,) * 20


register_autograd("longattn::block_sparse_attention_forward", _block_sparse_backward,
                                setup_context=_block_sparse_setup_context)

ATTENTION_OPS += [torch.ops.longattn.block_sparse_attention_forward.default,
                  torch.ops.longattn.block_sparse_attention_backward.default]


def block_sparse_attention(q, k, v, lists, block_q, block_k, fields, opts, deterministic=False):
    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"block_sparse_attention: {name} is a {type(x).__module__}.{type(x).__name__} but q is a "
                            f"torch tensor; pass arrays of one framework")
    tensors = [x if isinstance(x, torch.Tensor) else torch.from_numpy(x.copy()) for x in lists]  # masks keep read-only arrays
    causal, wl, wr, sink = fields
    return _call(torch.ops.longattn.block_sparse_attention_forward, _block_sparse_forward_body, q, k, v, *tensors,
                 int(block_q), int(block_k), causal, wl, wr, sink, opts["scale"], opts["softcap"], bool(deterministic))


# ---- linear attention ----------------------------------------------------------------

import numpy as np  # noqa: E402

from . import _arrays  # noqa: E402
# `longattn.linear_attention` is rebound to the function by __init__, so import the
# module's names rather than the module attribute.
from .linear_attention import backward_arrays as _linear_backward_arrays  # noqa: E402
from .linear_attention import forward_arrays as _linear_forward_arrays  # noqa: E402
from .linear_attention import split_state as _linear_split_state  # noqa: E402


@custom_op("longattn::linear_attention_forward", mutates_args=(), device_types=("cpu", "cuda"))
def linear_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                             initial_state: Optional[torch.Tensor], initial_z: Optional[torch.Tensor],
                             cu_seqlens: Optional[torch.Tensor], scale: float, feature_map: int, causal: bool,
                             normalize: bool, chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, S, z): out like v (contiguous), final state S (N, H, K, V) and
    normalizer z (N, H, K) in the compute dtype (z is zeros unless normalize)."""
    return _linear_attention_forward_body(q, k, v, log_decay, initial_state, initial_z, cu_seqlens, scale,
                                          feature_map, causal, normalize, chunk_size)


def _linear_state_shapes(q, v, cu_seqlens):
    n = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (n, q.shape[2], q.shape[3], v.shape[3]), (n, q.shape[2], q.shape[3]), cd


def _linear_arrays(q, k, v, log_decay, S0, z0, cu_seqlens, scale, feature_map, causal, normalize, chunk_size,
                   final_S=None, final_z=None, op="linear_attention"):
    """linear_attention.forward_arrays, through the compiled torch CPU entry where it applies
    (plain CPU tensors, q and v with 4 dims, cu_seqlens 1-D): the same checks and kernel."""
    if (_plain_cpu(q, k, v, log_decay, S0, z0, cu_seqlens, final_S, final_z) and q.dim() == 4 and v.dim() == 4
            and (cu_seqlens is None or cu_seqlens.dim() == 1)):
        s_shape, z_shape, cd = _linear_state_shapes(q, v, cu_seqlens)
        out = q.new_empty(v.shape)
        S = final_S if final_S is not None else q.new_empty(s_shape, dtype=cd)
        z = None
        if normalize:
            z = final_z if final_z is not None else q.new_empty(z_shape, dtype=cd)
        _C.linear_attention_forward_torch_cpu(q, k, v, out, S0, z0, S, z, log_decay, cu_seqlens, scale, feature_map,
                                              causal, normalize, chunk_size)
        return out, S, z
    return _linear_forward_arrays(q, k, v, log_decay, S0, z0, cu_seqlens, scale, feature_map, causal, normalize,
                                  chunk_size, final_S, final_z, op=op)


def _linear_attention_forward_body(q, k, v, log_decay, initial_state, initial_z, cu_seqlens, scale, feature_map,
                                   causal, normalize, chunk_size):
    out, S, z = _linear_arrays(q, k, v, log_decay, initial_state, initial_z, cu_seqlens, scale, feature_map, causal,
                               normalize, chunk_size)
    if z is None:
        z = torch.zeros(S.shape[:3], dtype=S.dtype, device=S.device)
    return out, S, z


@linear_attention_forward.register_fake
def _linear_attention_forward_fake(q, k, v, log_decay, initial_state, initial_z, cu_seqlens, scale, feature_map,
                                   causal, normalize, chunk_size):
    s_shape, z_shape, cd = _linear_state_shapes(q, v, cu_seqlens)
    return v.new_empty(v.shape), q.new_empty(s_shape, dtype=cd), q.new_empty(z_shape, dtype=cd)


@custom_op("longattn::linear_attention_backward", mutates_args=(), device_types=("cpu", "cuda"))
def linear_attention_backward(dout: torch.Tensor, d_state: Optional[torch.Tensor], d_z: Optional[torch.Tensor],
                              q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                              initial_state: Optional[torch.Tensor], initial_z: Optional[torch.Tensor],
                              cu_seqlens: Optional[torch.Tensor], scale: float, feature_map: int, causal: bool,
                              normalize: bool, chunk_size: int
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    """Returns (dq, dk, dv, d_initial_state, d_initial_z, d_log_decay_per_token); the last
    is empty (0,) without log_decay."""
    dq, dk, dv, dS0, dz0, dg = _linear_backward_arrays(dout, d_state, d_z, q, k, v, log_decay, initial_state,
                                                       initial_z, cu_seqlens, scale, feature_map, causal, normalize,
                                                       chunk_size)
    if dg is None:
        dg = q.new_empty((0,), dtype=dS0.dtype)
    return dq, dk, dv, dS0, dz0, dg


@linear_attention_backward.register_fake
def _linear_attention_backward_fake(dout, d_state, d_z, q, k, v, log_decay, initial_state, initial_z, cu_seqlens,
                                    scale, feature_map, causal, normalize, chunk_size):
    s_shape, z_shape, cd = _linear_state_shapes(q, v, cu_seqlens)
    dg_shape = (0,) if log_decay is None else (q.shape[0], q.shape[1], q.shape[2])
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty(s_shape, dtype=cd),
            q.new_empty(z_shape, dtype=cd), q.new_empty(dg_shape, dtype=cd))


def _linear_setup_context(ctx, inputs, output):
    q, k, v, log_decay, S0, z0, cu, scale, fmap, causal, normalize, chunk = inputs
    ctx.save_for_backward(q, k, v, log_decay, S0, z0, cu)
    ctx.args = (scale, fmap, causal, normalize, chunk)
    ctx.decay_per_head = log_decay is not None and log_decay.dim() == 1


def _linear_backward(ctx, dout, dS, dz):
    q, k, v, log_decay, S0, z0, cu = ctx.saved_tensors
    scale, fmap, causal, normalize, chunk = ctx.args
    if dout is None:
        dout = torch.zeros_like(v)
    elif dout.stride(-1) != 1:
        dout = dout.contiguous()
    dS = None if dS is None else dS.contiguous()
    dz = None if (dz is None or not normalize) else dz.contiguous()
    dq, dk, dv, dS0, dz0, dg = torch.ops.longattn.linear_attention_backward(
        dout, dS, dz, q, k, v, log_decay, S0, z0, cu, scale, fmap, causal, normalize, chunk)
    g_grad = None
    if log_decay is not None:
        g_grad = dg.sum((0, 1)) if ctx.decay_per_head else dg
    return (dq, dk, dv, g_grad, None if S0 is None else dS0, None if z0 is None else dz0, None, None, None, None,
            None, None)


register_autograd("longattn::linear_attention_forward", _linear_backward,
                                setup_context=_linear_setup_context)


@custom_op("longattn::linear_attention_step_", mutates_args=("state", "z"), device_types=("cpu", "cuda"))
def linear_attention_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                           state: torch.Tensor, z: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                           scale: float, feature_map: int, normalize: bool) -> torch.Tensor:
    """In-place recurrent step: reads and overwrites state (and z); returns out."""
    return _linear_attention_step_body(q, k, v, log_decay, state, z, cu_seqlens, scale, feature_map, normalize)


def _linear_attention_step_body(q, k, v, log_decay, state, z, cu_seqlens, scale, feature_map, normalize):
    out, _, _ = _linear_arrays(q, k, v, log_decay, state, z, cu_seqlens, scale, feature_map, True, normalize, 64,
                               state, z, op="linear_attention_step")
    return out


@linear_attention_step_.register_fake
def _linear_attention_step_fake(q, k, v, log_decay, state, z, cu_seqlens, scale, feature_map, normalize):
    return v.new_empty(v.shape)


LINEAR_ATTENTION_OPS = [torch.ops.longattn.linear_attention_forward.default,
                        torch.ops.longattn.linear_attention_backward.default,
                        torch.ops.longattn.linear_attention_step_.default]


def _linear_tensor(x, name: str, op: str, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        if isinstance(x, np.ndarray) or _arrays.framework_of(x) is not None:
            raise TypeError(f"{op}: {name} is a {type(x).__module__}.{type(x).__name__} but q is a torch tensor; "
                            f"pass arrays of one framework")
        raise TypeError(f"{op}: {name} must be a torch tensor, got {type(x).__name__}")
    if dtype is not None:
        if not (x.dtype.is_floating_point):
            raise TypeError(f"{op}: {name} must hold floats, got {x.dtype}")
        x = x.to(dtype).contiguous()
    return x


def _linear_inputs(q, k, v, opts, log_decay, state, cu_seqlens, op, state_name="initial_state"):
    for name, x in (("k", k), ("v", v)):
        _linear_tensor(x, name, op)
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    S0, z0 = _linear_split_state(state, opts["normalize"], state_name, op)
    g = _linear_tensor(log_decay, "log_decay", op, cd)
    S0 = _linear_tensor(S0, state_name, op, cd)
    z0 = _linear_tensor(z0, state_name, op, cd)
    cu = _linear_tensor(cu_seqlens, "cu_seqlens", op)
    return g, S0, z0, cu


def linear_attention(q, k, v, opts, log_decay, initial_state, cu_seqlens, op):
    g, S0, z0, cu = _linear_inputs(q, k, v, opts, log_decay, initial_state, cu_seqlens, op)
    out, S, z = _linear_forward(q, k, v, g, S0, z0, cu, opts["scale"], opts["feature_map"], opts["causal"],
                                opts["normalize"], opts["chunk_size"])
    return out, S, (z if opts["normalize"] else None)


def _linear_forward(*args):
    return _call(torch.ops.longattn.linear_attention_forward, _linear_attention_forward_body, *args)


def linear_attention_step(q, k, v, state, opts, log_decay, cu_seqlens, inplace, op):
    if not inplace:
        g, S0, z0, cu = _linear_inputs(q, k, v, opts, log_decay, state, cu_seqlens, op, "state")
        out, S, z = _linear_forward(q, k, v, g, S0, z0, cu, opts["scale"], opts["feature_map"], True,
                                    opts["normalize"], 64)
        return out, S, (z if opts["normalize"] else None)
    S_in, z_in = _linear_split_state(state, opts["normalize"], "state", op)
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    for x in (S_in, z_in):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: state must be torch tensors like q, got {type(x).__name__}")
        if x.dtype != cd or not x.is_contiguous():
            raise ValueError(f"{op}: with inplace=True, state must be a contiguous {cd} tensor, got {x.dtype}"
                             f"{'' if x.is_contiguous() else ' (not contiguous)'}")
    tensors = (q, k, v, log_decay, S_in, z_in)
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
    if needs_grad:
        # Autograd covers functional ops: compute out of place, then copy_ into the state.
        # The graph keeps a copy of the old state, which the copy_ below then overwrites.
        old = S_in.clone() if z_in is None else (S_in.clone(), z_in.clone())
        out, S, z = linear_attention_step(q, k, v, old, opts, log_decay, cu_seqlens, False, op)
        S_in.copy_(S)
        if z_in is not None:
            z_in.copy_(z)
        return out, S_in, z_in
    g = _linear_tensor(log_decay, "log_decay", op, cd)
    cu = _linear_tensor(cu_seqlens, "cu_seqlens", op)
    out = _call(torch.ops.longattn.linear_attention_step_, _linear_attention_step_body, q, k, v, g, S_in, z_in, cu,
                opts["scale"], opts["feature_map"], opts["normalize"])
    return out, S_in, z_in
