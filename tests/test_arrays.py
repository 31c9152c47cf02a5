"""The framework-neutral array layer, tested through ``longattn.apply_rope``.

Arrays of any supported framework go in and arrays of the same framework,
dtype and device come out: NumPy (incl. ml_dtypes bfloat16), torch, JAX,
CuPy and Numba CUDA. Mixing frameworks is a TypeError naming the argument;
inplace=True writes into the caller's memory (zero copy); read-only NumPy
input cannot be written in place; empty inputs give empty outputs.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn
from reference.rope import (
    NP_BFLOAT16,
    assert_matches_reference,
    naive_rope_low_precision,
    numpy_to_torch,
    rope_reference_qk,
    to_numpy,
)

NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": NP_BFLOAT16,
}
TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
HALF = ("float16", "bfloat16")


def theta_inv_freq(rotary_dim, theta=10000.0):
    j = np.arange(0, rotary_dim, 2, dtype=np.float64)
    return (1.0 / theta ** (j / rotary_dim)).astype(np.float32)


INV = theta_inv_freq(12, 5e5)  # rotary_dim 12 of D = 16: 4 pass-through channels
AF = 1.25


def make_inputs(dtype, B=2, S=11, Hq=3, Hk=2, D=16, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, S, Hq, D)).astype(NP_DTYPES[dtype])
    k = rng.standard_normal((B, S, Hk, D)).astype(NP_DTYPES[dtype])
    pos = (rng.integers(0, 100_000, size=(B, S))).astype(np.int64)
    return q, k, pos


def check_values(dtype, q_np, k_np, pos, out_q, out_k, interleaved=False):
    """Outputs vs the float64 reference of the NumPy inputs, with the tolerance rules."""
    rq, rk = rope_reference_qk(q_np, k_np, pos, INV, AF, interleaved)
    nq = nk = None
    if dtype in HALF:
        nq, nk = naive_rope_low_precision(q_np, k_np, pos, INV, AF, interleaved, TORCH_DTYPES[dtype])
    assert_matches_reference(to_numpy(out_q), rq, q_np, naive=nq, what="q_rot")
    assert_matches_reference(to_numpy(out_k), rk, k_np, naive=nk, what="k_rot")


def bits(x):
    """The exact bits of any array (for equality across frameworks)."""
    a = np.ascontiguousarray(to_numpy(x))
    return a.dtype.str if a.dtype != NP_BFLOAT16 else "bf16", a.shape, a.tobytes()


# ----------------------------------------------------------------------------
# NumPy and torch
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_numpy_in_numpy_out_with_the_input_dtype(dtype, interleaved):
    q, k, pos = make_inputs(dtype)
    out_q, out_k = longattn.apply_rope(q, k, pos, inv_freq=INV, attention_factor=AF, interleaved=interleaved)
    for out, x in ((out_q, q), (out_k, k)):
        assert type(out) is np.ndarray
        assert out.dtype == x.dtype
        assert out.shape == x.shape
        assert not np.shares_memory(out, x)
    check_values(dtype, q, k, pos, out_q, out_k, interleaved)
    assert bits(out_q[..., 12:]) == bits(q[..., 12:])


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_torch_in_torch_out_with_the_input_dtype(dtype):
    q, k, pos = make_inputs(dtype)
    tq, tk, tpos = numpy_to_torch(q), numpy_to_torch(k), torch.from_numpy(pos)
    out_q, out_k = longattn.apply_rope(tq, tk, tpos, inv_freq=INV, attention_factor=AF)
    for out, x in ((out_q, tq), (out_k, tk)):
        assert type(out) is torch.Tensor
        assert out.dtype == x.dtype and out.device == x.device and out.shape == x.shape
    check_values(dtype, q, k, pos, out_q, out_k)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_numpy_and_torch_results_are_bit_identical(dtype, interleaved):
    q, k, pos = make_inputs(dtype, seed=1)
    kw = dict(inv_freq=INV, attention_factor=AF, interleaved=interleaved)
    n_q, n_k = longattn.apply_rope(q, k, pos, **kw)
    t_q, t_k = longattn.apply_rope(numpy_to_torch(q), numpy_to_torch(k), torch.from_numpy(pos), **kw)
    assert bits(n_q) == bits(t_q)
    assert bits(n_k) == bits(t_k)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_inv_freq_as_numpy_list_or_torch_tensor_gives_the_same_result(framework):
    q, k, pos = make_inputs("float32", seed=2)
    if framework == "torch":
        q, k, pos = torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(pos)
    results = [
        longattn.apply_rope(q, k, pos, inv_freq=inv, attention_factor=AF)
        for inv in (INV, [float(v) for v in INV], torch.from_numpy(INV.copy()))
    ]
    for got in results[1:]:
        assert bits(got[0]) == bits(results[0][0])
        assert bits(got[1]) == bits(results[0][1])


@given(dtype=st.sampled_from(["float32", "float16", "bfloat16", "float64"]),
       with_k=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_numpy_inplace_writes_the_callers_buffer_zero_copy(dtype, with_k, seed):
    """q and k are views of one packed qkv buffer; inplace=True rotates them in
    that buffer, returns the very same view objects and leaves v alone."""
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((2, 7, 3 + 2 + 2, 16)).astype(NP_DTYPES[dtype])
    before = qkv.copy()
    q, k = qkv[:, :, :3], qkv[:, :, 3:5]
    pos = np.arange(7, dtype=np.int32) + 40
    want_q, want_k = longattn.apply_rope(q, k, pos, inv_freq=INV, attention_factor=AF)
    out = longattn.apply_rope(q, k if with_k else None, pos, inv_freq=INV, attention_factor=AF, inplace=True)
    if with_k:
        assert out[0] is q and out[1] is k
    else:
        assert out is q
    assert bits(qkv[:, :, :3]) == bits(want_q)
    if with_k:
        assert bits(qkv[:, :, 3:5]) == bits(want_k)
    else:
        assert bits(qkv[:, :, 3:5]) == bits(before[:, :, 3:5])
    assert bits(qkv[:, :, 5:]) == bits(before[:, :, 5:])


@given(dtype=st.sampled_from(["float32", "float16", "bfloat16", "float64"]),
       with_k=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_torch_inplace_writes_the_callers_buffer_zero_copy(dtype, with_k, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(2, 7, 7, 16, generator=g).to(TORCH_DTYPES[dtype])
    before = qkv.clone()
    q, k = qkv[:, :, :3], qkv[:, :, 3:5]
    ptr_q, ptr_k = q.data_ptr(), k.data_ptr()
    pos = torch.arange(7) + 40
    want_q, want_k = longattn.apply_rope(q, k, pos, inv_freq=INV, attention_factor=AF)
    out = longattn.apply_rope(q, k if with_k else None, pos, inv_freq=INV, attention_factor=AF, inplace=True)
    if with_k:
        assert out[0] is q and out[1] is k
    else:
        assert out is q
    assert q.data_ptr() == ptr_q and k.data_ptr() == ptr_k
    assert torch.equal(qkv[:, :, :3], want_q)
    assert torch.equal(qkv[:, :, 3:5], want_k if with_k else before[:, :, 3:5])
    assert torch.equal(qkv[:, :, 5:], before[:, :, 5:])


@pytest.mark.parametrize("which", ["q", "k"])
def test_read_only_numpy_input_with_inplace_raises_value_error_naming_it(which):
    q, k, pos = make_inputs("float32", seed=3)
    q0, k0 = q.copy(), k.copy()
    (q if which == "q" else k).setflags(write=False)
    with pytest.raises(ValueError) as info:
        longattn.apply_rope(q, k, pos, inv_freq=INV, inplace=True)
    assert re.search(rf"\b{which}\b", str(info.value)), str(info.value)
    assert bits(q) == bits(q0) and bits(k) == bits(k0)


def test_read_only_numpy_input_is_fine_out_of_place():
    q, k, pos = make_inputs("float32", seed=4)
    q.setflags(write=False)
    k.setflags(write=False)
    out_q, out_k = longattn.apply_rope(q, k, pos, inv_freq=INV, attention_factor=AF)
    check_values("float32", q, k, pos, out_q, out_k)


def test_read_only_numpy_view_of_a_broadcast_is_rejected_for_inplace():
    q = np.broadcast_to(np.ones((1, 1, 1, 16), np.float32), (2, 3, 4, 16))
    with pytest.raises(ValueError, match=r"\bq\b"):
        longattn.apply_rope(q, inv_freq=INV, inplace=True)


# ----------------------------------------------------------------------------
# mixed frameworks
# ----------------------------------------------------------------------------
def _numpy_k():
    return np.zeros((1, 3, 1, 16), np.float32)


def _torch_k():
    return torch.zeros(1, 3, 1, 16)


@pytest.mark.parametrize("q_fw,k_fw", [("numpy", "torch"), ("torch", "numpy")])
def test_q_and_k_from_different_frameworks_raise_type_error_naming_k(q_fw, k_fw):
    make = {"numpy": _numpy_k, "torch": _torch_k}
    with pytest.raises(TypeError) as info:
        longattn.apply_rope(make[q_fw](), make[k_fw](), inv_freq=INV)
    assert re.search(r"\bk\b", str(info.value)), str(info.value)


@pytest.mark.parametrize("q_fw,pos_fw", [("numpy", "torch"), ("torch", "numpy")])
def test_positions_from_another_framework_raise_type_error_naming_positions(q_fw, pos_fw):
    q = {"numpy": _numpy_k, "torch": _torch_k}[q_fw]()
    pos = np.arange(3) if pos_fw == "numpy" else torch.arange(3)
    with pytest.raises(TypeError) as info:
        longattn.apply_rope(q, None, pos, inv_freq=INV)
    assert re.search(r"\bpositions\b", str(info.value)), str(info.value)


# ----------------------------------------------------------------------------
# empty inputs
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("shape_q,shape_k", [((2, 0, 3, 16), (2, 0, 1, 16)), ((0, 5, 3, 16), (0, 5, 2, 16))])
@pytest.mark.parametrize("inplace", [False, True])
def test_zero_size_inputs_return_empty_outputs(framework, shape_q, shape_k, inplace):
    if framework == "torch":
        q, k = torch.zeros(shape_q), torch.zeros(shape_k)
    else:
        q, k = np.zeros(shape_q, np.float32), np.zeros(shape_k, np.float32)
    out_q, out_k = longattn.apply_rope(q, k, inv_freq=INV, inplace=inplace)
    assert type(out_q) is type(q) and type(out_k) is type(k)
    assert tuple(out_q.shape) == shape_q and tuple(out_k.shape) == shape_k
    assert out_q.dtype == q.dtype
    if inplace:
        assert out_q is q and out_k is k


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_zero_length_sequence_with_explicit_positions_returns_empty(framework):
    if framework == "torch":
        q, pos = torch.zeros(2, 0, 3, 16, dtype=torch.float16), torch.zeros(2, 0, dtype=torch.int32)
    else:
        q, pos = np.zeros((2, 0, 3, 16), np.float16), np.zeros((2, 0), np.int32)
    out = longattn.apply_rope(q, None, pos, inv_freq=INV)
    assert type(out) is type(q) and tuple(out.shape) == (2, 0, 3, 16) and out.dtype == q.dtype


# ----------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------
JAX_DTYPES = ["float32", "float16", "bfloat16"]


@pytest.mark.parametrize("dtype", JAX_DTYPES)
def test_jax_in_jax_out_equal_to_numpy(dtype):
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    q, k, pos = make_inputs(dtype, seed=5)
    jq, jk, jpos = jnp.asarray(q), jnp.asarray(k), jnp.asarray(pos.astype(np.int32))
    out_q, out_k = longattn.apply_rope(jq, jk, jpos, inv_freq=INV, attention_factor=AF)
    for out, x in ((out_q, jq), (out_k, jk)):
        assert isinstance(out, jax.Array)
        assert out.dtype == x.dtype and out.shape == x.shape
        assert out.devices() == x.devices()
    n_q, n_k = longattn.apply_rope(q, k, pos, inv_freq=INV, attention_factor=AF)
    assert bits(np.asarray(out_q)) == bits(n_q)
    assert bits(np.asarray(out_k)) == bits(n_k)
    check_values(dtype, q, k, pos, np.asarray(out_q), np.asarray(out_k))


def test_jax_and_numpy_mixed_raise_type_error_naming_k():
    pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match=r"\bk\b"):
        longattn.apply_rope(jnp.zeros((1, 3, 1, 16)), np.zeros((1, 3, 1, 16), np.float32), inv_freq=INV)
    with pytest.raises(TypeError, match=r"\bk\b"):
        longattn.apply_rope(torch.zeros(1, 3, 1, 16), jnp.zeros((1, 3, 1, 16)), inv_freq=INV)


# ----------------------------------------------------------------------------
# CuPy and Numba CUDA (need a GPU)
# ----------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cupy_in_cupy_out_and_inplace_is_zero_copy(dtype):
    cp = pytest.importorskip("cupy")
    q, k, pos = make_inputs(dtype, seed=6)
    cq, ck, cpos = cp.asarray(q), cp.asarray(k), cp.asarray(pos)
    out_q, out_k = longattn.apply_rope(cq, ck, cpos, inv_freq=INV, attention_factor=AF)
    for out, x in ((out_q, cq), (out_k, ck)):
        assert isinstance(out, cp.ndarray)
        assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    check_values(dtype, q, k, pos, out_q.get(), out_k.get())
    qkv = cp.asarray(np.concatenate([q, k, k], axis=2))
    vq, vk = qkv[:, :, :3], qkv[:, :, 3:5]
    got = longattn.apply_rope(vq, vk, cpos, inv_freq=INV, attention_factor=AF, inplace=True)
    assert got[0] is vq and got[1] is vk
    assert bits(qkv[:, :, :3].get()) == bits(out_q.get())
    assert bits(qkv[:, :, 3:5].get()) == bits(out_k.get())
    assert bits(qkv[:, :, 5:].get()) == bits(k)


@pytest.mark.cuda
def test_cupy_and_torch_cuda_results_are_bit_identical():
    cp = pytest.importorskip("cupy")
    q, k, pos = make_inputs("float16", seed=7)
    c = longattn.apply_rope(cp.asarray(q), cp.asarray(k), cp.asarray(pos), inv_freq=INV, attention_factor=AF)
    t = longattn.apply_rope(torch.from_numpy(q).cuda(), torch.from_numpy(k).cuda(), torch.from_numpy(pos).cuda(),
                            inv_freq=INV, attention_factor=AF)
    assert bits(c[0].get()) == bits(t[0])
    assert bits(c[1].get()) == bits(t[1])


@pytest.mark.cuda
def test_cupy_and_torch_cuda_mixed_raise_type_error_naming_k():
    cp = pytest.importorskip("cupy")
    with pytest.raises(TypeError, match=r"\bk\b"):
        longattn.apply_rope(cp.zeros((1, 3, 1, 16), cp.float32), torch.zeros(1, 3, 1, 16, device="cuda"),
                            inv_freq=INV)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_numba_cuda_in_numba_cuda_out_and_inplace_is_zero_copy(dtype):
    numba_cuda = pytest.importorskip("numba.cuda")
    q, k, pos = make_inputs(dtype, seed=8)
    dq, dk, dpos = numba_cuda.to_device(q), numba_cuda.to_device(k), numba_cuda.to_device(pos)
    out_q, out_k = longattn.apply_rope(dq, dk, dpos, inv_freq=INV, attention_factor=AF)
    for out, x in ((out_q, q), (out_k, k)):
        assert numba_cuda.is_cuda_array(out)
        assert type(out).__module__.startswith("numba")
        assert out.dtype == x.dtype and tuple(out.shape) == x.shape
    check_values(dtype, q, k, pos, out_q.copy_to_host(), out_k.copy_to_host())
    got = longattn.apply_rope(dq, dk, dpos, inv_freq=INV, attention_factor=AF, inplace=True)
    assert got[0] is dq and got[1] is dk
    assert bits(dq.copy_to_host()) == bits(out_q.copy_to_host())
    assert bits(dk.copy_to_host()) == bits(out_k.copy_to_host())


@pytest.mark.cuda
def test_numba_cuda_and_torch_cuda_mixed_raise_type_error_naming_k():
    numba_cuda = pytest.importorskip("numba.cuda")
    with pytest.raises(TypeError, match=r"\bk\b"):
        longattn.apply_rope(torch.zeros(1, 3, 1, 16, device="cuda"),
                            numba_cuda.to_device(np.zeros((1, 3, 1, 16), np.float32)), inv_freq=INV)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_cuda_in_torch_cuda_out_equal_to_reference(dtype):
    q, k, pos = make_inputs(dtype, seed=9)
    tq, tk = numpy_to_torch(q).cuda(), numpy_to_torch(k).cuda()
    out_q, out_k = longattn.apply_rope(tq, tk, torch.from_numpy(pos).cuda(), inv_freq=INV, attention_factor=AF)
    for out, x in ((out_q, tq), (out_k, tk)):
        assert out.device == x.device and out.dtype == x.dtype and out.shape == x.shape
    check_values(dtype, q, k, pos, out_q, out_k)


@pytest.mark.cuda
def test_jax_gpu_in_jax_gpu_out():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no GPU backend here")
    q, k, pos = make_inputs("bfloat16", seed=10)
    jq = jax.device_put(jnp.asarray(q), gpu)
    jk = jax.device_put(jnp.asarray(k), gpu)
    jpos = jax.device_put(jnp.asarray(pos.astype(np.int32)), gpu)
    out_q, out_k = longattn.apply_rope(jq, jk, jpos, inv_freq=INV, attention_factor=AF)
    assert out_q.devices() == {gpu} and out_k.devices() == {gpu}
    assert out_q.dtype == jq.dtype
    check_values("bfloat16", q, k, pos, np.asarray(out_q), np.asarray(out_k))


def test_numpy_arrays_of_foreign_byte_order_or_dtype_are_rejected():
    """The array path names unsupported dtypes instead of misreading them (a big-endian
    array used to give NaN; an int8 alibi_slopes a KeyError)."""
    q = np.random.default_rng(0).standard_normal((1, 3, 2, 8)).astype(">f4")
    for fn in (longattn.flash_attention, longattn.linear_attention):
        with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64, got float32 "
                                            r"\(non-native byte order\)"):
            fn(q, q, q)
    qn = q.astype("<f4")
    with pytest.raises(TypeError, match="alibi_slopes has an unsupported dtype int8"):
        longattn.flash_attention(qn, qn, qn, alibi_slopes=np.ones(2, np.int8))
