"""The compiled torch CPU entries (`_C.*_torch_cpu`) describe plain torch CPU tensors in C++
rather than through _arrays.wrap. They must run the same checks and the same kernel as the
general array path: bit-identical results, the same errors naming the same argument, and
the general path for anything else (other devices, subclasses)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn
from longattn import attention, torch_ops
from longattn import rope as rope_module
from longattn.linear_attention import forward_arrays as linear_forward_arrays

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _strided(x, strided):
    """x itself, or the same values in a strided slice of a larger tensor (as of a packed qkv)."""
    if not strided:
        return x
    base = torch.zeros(x.shape[:-2] + (x.shape[-2] * 2, x.shape[-1] + 3), dtype=x.dtype)
    view = base[..., ::2, 3:]  # every other head, offset into each row
    view.copy_(x)
    return view


@st.composite
def flash_cases(draw):
    hkv = draw(st.sampled_from([1, 2]))
    return dict(B=draw(st.integers(1, 2)), Sq=draw(st.sampled_from([1, 3, 17])), Sk=draw(st.sampled_from([1, 40, 130])),
                H=hkv * draw(st.sampled_from([1, 2])), Hkv=hkv, D=draw(st.sampled_from([8, 24])),
                Dv=draw(st.sampled_from([8, 16])), dtype=draw(st.sampled_from(DTYPES)), causal=draw(st.booleans()),
                window=draw(st.sampled_from([(-1, -1), (5, 0), (3, 7)])), softcap=draw(st.sampled_from([0.0, 4.0])),
                alibi=draw(st.sampled_from([None, "1d", "2d"])), strided=draw(st.booleans()),
                seed=draw(st.integers(0, 99)))


@given(flash_cases())
def test_flash_entry_equals_the_array_path_bit_for_bit(c):
    B, Sq, Sk, H, Hkv, D, Dv, dt = c["B"], c["Sq"], c["Sk"], c["H"], c["Hkv"], c["D"], c["Dv"], c["dtype"]
    q = _strided(_rand((B, Sq, H, D), dt, c["seed"]), c["strided"])
    k = _strided(_rand((B, Sk, Hkv, D), dt, c["seed"] + 1), c["strided"])
    v = _rand((B, Sk, Hkv, Dv), dt, c["seed"] + 2)
    alibi = {None: None, "1d": torch.rand(H), "2d": torch.rand(B, H)}[c["alibi"]]
    opts = attention.attention_options(D, c["causal"], c["window"], None, c["softcap"], "flash_attention")
    args = (q, k, v, None, None, 0, 0, opts["scale"], opts["softcap"], alibi, opts["window_left"],
            opts["window_right"], opts["causal"])
    assert torch_ops._dense_cpu(q, k, v, alibi)
    out, lse = torch_ops._flash_attention_forward_body(*args, False)
    ref_out, ref_lse = attention.forward_arrays(*args)  # _arrays.wrap + TensorView
    assert out.dtype == dt and out.shape == (B, Sq, H, Dv) and out.is_contiguous()
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@st.composite
def linear_cases(draw):
    return dict(B=draw(st.integers(1, 2)), T=draw(st.sampled_from([1, 3, 8, 9, 70])), H=draw(st.integers(1, 2)),
                K=draw(st.sampled_from([8, 20])), V=draw(st.sampled_from([16, 21])),
                dtype=draw(st.sampled_from(DTYPES)), normalize=draw(st.booleans()), decay=draw(st.booleans()),
                state=draw(st.booleans()), varlen=draw(st.booleans()), causal=draw(st.booleans()),
                fmap=draw(st.sampled_from([0, 1, 2])), seed=draw(st.integers(0, 99)))


@given(linear_cases())
def test_linear_entry_equals_the_array_path_bit_for_bit(c):
    B, T, H, K, V, dt = c["B"], c["T"], c["H"], c["K"], c["V"], c["dtype"]
    causal = c["causal"] or c["decay"]
    cu = None
    if c["varlen"]:
        cu = torch.tensor([0, T // 2, T, T + 1], dtype=torch.int32)
        B, T = 1, T + 1
    n = B if cu is None else cu.numel() - 1
    cd = torch.float64 if dt == torch.float64 else torch.float32
    q, k = (_rand((B, T, H, K), dt, c["seed"] + i) for i in range(2))
    v = _rand((B, T, H, V), dt, c["seed"] + 2)
    g = -torch.rand(B, T, H, dtype=cd) * 3 if c["decay"] else None
    S0 = _rand((n, H, K, V), cd, c["seed"] + 3) if c["state"] else None
    z0 = torch.rand(n, H, K, dtype=cd) if c["state"] and c["normalize"] else None
    args = (q, k, v, g, S0, z0, cu, K ** -0.5, c["fmap"], causal, c["normalize"], 16)
    out, S, z = torch_ops._linear_arrays(*args)
    ref_out, ref_S, ref_z = linear_forward_arrays(*args)
    assert torch.equal(out, ref_out) and torch.equal(S, ref_S)
    assert (z is None) == (ref_z is None) and (z is None or torch.equal(z, ref_z))
    # In place (an inplace step): the final state overwrites the initial one.
    if S0 is not None:
        S1, z1 = S0.clone(), None if z0 is None else z0.clone()
        out2, S2, z2 = torch_ops._linear_arrays(q, k, v, g, S1, z1, cu, *args[7:], S1, z1)
        assert S2 is S1 and torch.equal(out2, ref_out) and torch.equal(S1, ref_S)
        assert z1 is None or torch.equal(z1, ref_z)


@st.composite
def rope_cases(draw):
    return dict(B=draw(st.integers(1, 2)), S=draw(st.sampled_from([1, 5])), Hq=draw(st.sampled_from([1, 4])),
                Hk=draw(st.sampled_from([None, 1, 2])), D=draw(st.sampled_from([8, 20, 64])),
                rot=draw(st.sampled_from([1.0, 0.5])), dtype=draw(st.sampled_from(DTYPES)),
                pos=draw(st.sampled_from([None, "1d32", "2d64"])), interleaved=draw(st.booleans()),
                conjugate=draw(st.booleans()), factor=draw(st.sampled_from([1.0, 1.3])), strided=draw(st.booleans()),
                inplace=draw(st.booleans()), seed=draw(st.integers(0, 99)))


@given(rope_cases())
def test_rope_entry_equals_the_array_path_bit_for_bit(c):
    B, S, D, dt = c["B"], c["S"], c["D"], c["dtype"]
    q = _strided(_rand((B, S, c["Hq"], D), dt, c["seed"]), c["strided"])
    k = None if c["Hk"] is None else _rand((B, S, c["Hk"], D), dt, c["seed"] + 1)
    half = max(1, int(D * c["rot"]) // 2)
    inv_freq = torch.rand(half, generator=torch.Generator().manual_seed(c["seed"]))
    pos = {None: None, "1d32": torch.arange(3, 3 + S, dtype=torch.int32),
           "2d64": torch.randint(0, 9000, (B, S), generator=torch.Generator().manual_seed(1))}[c["pos"]]
    opts = (c["factor"], c["interleaved"], c["conjugate"])
    assert torch_ops._rope_cpu(q, k, pos, inv_freq)
    ref_q, ref_k = rope_module.rope_arrays(q, k, pos, rope_module.inv_freq_values(inv_freq), *opts, False)
    if c["inplace"]:
        q2, k2 = q.clone(), None if k is None else k.clone()
        torch_ops._rope_inplace_body(q2, k2, pos, inv_freq, *opts)
        got = [q2] if k is None else [q2, k2]
    else:
        got = torch_ops._rope_body(q, k, pos, inv_freq, *opts)
    assert torch.equal(got[0], ref_q) and (k is None or torch.equal(got[1], ref_k))


def test_rope_entry_checks_inv_freq():
    q = torch.randn(1, 2, 2, 8)
    with pytest.raises(ValueError, match="apply_rope: inv_freq must be finite"):
        torch_ops._rope_body(q, None, None, torch.tensor([1.0, float("nan")]), 1.0, False, False)
    with pytest.raises(ValueError, match="inv_freq must be 1-D with 1 to 256 entries"):
        torch_ops._rope_body(q, None, None, torch.ones(2, 2), 1.0, False, False)
    with pytest.raises(ValueError, match="exceeds q's head_dim"):
        torch_ops._rope_body(q, None, None, torch.ones(5), 1.0, False, False)
    with pytest.raises(TypeError, match="apply_rope: k must be float16, bfloat16, float32 or float64, got int64"):
        longattn.apply_rope(q, q.long(), inv_freq=np.ones(4, np.float32))


def test_decoding_steps_in_place_equal_one_call():
    """Token-by-token in-place steps (the recurrence on the caller's buffers, up to 8 tokens
    a call) give the state and outputs of one chunked call, with decay and normalizer."""
    B, T, H, K, V = 2, 23, 3, 16, 24
    q, k = (_rand((B, T, H, K), torch.float64, i) for i in range(2))
    v = _rand((B, T, H, V), torch.float64, 2)
    g = -torch.rand(B, T, H, dtype=torch.float64) * 2
    out, (S, z) = longattn.linear_attention(q, k, v, normalize=True, log_decay=g, return_state=True,
                                            feature_map="elu1")
    state = (torch.zeros(B, H, K, V, dtype=torch.float64), torch.zeros(B, H, K, dtype=torch.float64))
    outs, t = [], 0
    for n in (1, 8, 3, 1, 7, 3):
        o, new = longattn.linear_attention_step(q[:, t:t + n], k[:, t:t + n], v[:, t:t + n], state, normalize=True,
                                                log_decay=g[:, t:t + n], feature_map="elu1", inplace=True)
        assert new[0] is state[0] and new[1] is state[1]
        outs.append(o)
        t += n
    assert t == T
    torch.testing.assert_close(torch.cat(outs, 1), out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state[0], S, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state[1], z, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bad", ["int32", "bool", "complex64"])
@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_non_float_inputs_name_the_argument(arg, bad):
    x = {a: torch.randn(1, 5, 2, 8) for a in "qkv"}
    x[arg] = x[arg].to(getattr(torch, bad))
    with pytest.raises(TypeError, match=f"flash_attention: {arg} must be float16, bfloat16, float32 or float64, "
                                        f"got {bad}"):
        longattn.flash_attention(x["q"], x["k"], x["v"])
    with pytest.raises(TypeError, match=f"linear_attention: {arg} must be float16, bfloat16, float32 or float64, "
                                        f"got {bad}"):
        longattn.linear_attention(x["q"], x["k"], x["v"])


def test_other_bad_arguments_get_the_array_paths_errors():
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(TypeError, match="alibi_slopes must be float32, got int8"):
        longattn.flash_attention(q, q, q, alibi_slopes=torch.ones(2, dtype=torch.int8))
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        longattn.flash_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="q must be contiguous in its last dim"):
        longattn.flash_attention(q.transpose(2, 3), q, q)
    with pytest.raises(ValueError, match="k must have 4 dims"):
        longattn.flash_attention(q, q[0], q)
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        longattn.linear_attention(q, q, q, cu_seqlens=torch.tensor([0, 5]))


def test_only_plain_cpu_tensors_take_the_entries():
    q = torch.randn(1, 5, 2, 8)
    assert torch_ops._plain_cpu(q, None, q)
    assert not torch_ops._plain_cpu(q, torch.nn.Parameter(q))
    assert not torch_ops._plain_cpu(q, q.to("meta"))
    assert not torch_ops._dense_cpu(q[0], q[0], q[0], None)  # 3-dim: the array path raises its error
