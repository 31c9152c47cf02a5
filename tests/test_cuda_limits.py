"""Sizes past what the CUDA grids or the kernels' int token indices hold are rejected with a
ValueError before any launch (instead of a vague launch error, or an int that wraps and
leaves outputs unwritten).

The arrays are only described: TensorViews of CUDA device memory at a dummy address, which
the shape checks reject before anything could read them. This runs without a GPU (and on
one), since the checks come before the backend.
"""
import pytest

from longattn import _C

F16, I32 = 2, 4
DUMMY = 1 << 40  # never dereferenced: each call below fails its checks first


def view(shape, dtype=F16):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return _C.TensorView(DUMMY, dtype, 1, 0, list(shape), strides[::-1])


def flash(q, k, v, out, lse, cu_q=None, cu_k=None, max_q=0, max_k=0):
    _C.attention_forward(q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.125, 0.0, None, -1, -1, False, 0)


def test_flash_sequence_past_int32():
    S = 1 << 31  # one token past the int range the kernels index rows in
    q, out = view((1, S, 1, 64)), view((1, S, 1, 64))
    kv = view((1, 16, 1, 64))
    with pytest.raises(ValueError, match="sequences of up to 2\\^31 - 1 tokens"):
        flash(q, kv, kv, out, view((1, 1, S), 0))
    with pytest.raises(ValueError, match="sequences of up to 2\\^31 - 1 tokens"):
        flash(kv, view((1, S, 1, 64)), view((1, S, 1, 64)), view((1, 16, 1, 64)), view((1, 1, 16), 0))


def test_flash_too_many_heads():
    H = 65536  # grid y
    q, out = view((1, 4, H, 32)), view((1, 4, H, 32))
    with pytest.raises(ValueError, match="up to 65535 heads"):
        flash(q, q, q, out, view((1, H, 4), 0))


def test_flash_varlen_grid_past_limit():
    # One 2^20-token sequence among 70000: ceil(2^20 / 32) * 70000 blocks > 2^31 - 1.
    n, longest = 70000, 1 << 20
    total = longest + n - 1
    q = view((total, 1, 64))
    cu = view((n + 1,), I32)
    with pytest.raises(ValueError, match="split the batch"):
        flash(q, q, q, view((total, 1, 64)), view((1, total), 0), cu, cu, longest, longest)


def linear(q, k, v, out, cu=None, max_seqlen=0):
    _C.linear_attention_forward(q, k, v, out, None, None, None, None, None, cu, 0.125, 0, True, False, 64, 0,
                                max_seqlen)


def test_linear_limits():
    T = 1 << 31
    q = view((1, T, 1, 16))
    with pytest.raises(ValueError, match="up to 2\\^31 - 1 tokens"):
        linear(q, q, q, view((1, T, 1, 16)))
    H = 65536
    q = view((1, 4, H, 16))
    with pytest.raises(ValueError, match="up to 65535 heads"):
        linear(q, q, q, view((1, 4, H, 16)))
    n = (1 << 28) + 1
    q = view((1, n, 1, 16))
    with pytest.raises(ValueError, match="up to 2\\^28 sequences"):
        linear(q, q, q, view((1, n, 1, 16)), view((n + 1,), I32), 1)
