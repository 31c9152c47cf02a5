"""Calls from several Python threads at once (the CPU kernels release the GIL and share
one worker pool and one scratch cache) give the same results, bit for bit, as the same
calls made one after another; resizing the pool while other threads run jobs neither
deadlocks nor changes a result."""
import threading

import numpy as np
import torch

import longattn

THREADS = 4
ROUNDS = 6


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 150, 4, 40, generator=g)
    k = torch.randn(1, 170, 2, 40, generator=g)
    v = torch.randn(1, 170, 2, 24, generator=g)
    dout = torch.randn(1, 150, 4, 24, generator=g)
    lq = torch.randn(1, 90, 3, 16, generator=g)
    lk = torch.randn(1, 90, 3, 16, generator=g)
    lv = torch.randn(1, 90, 3, 20, generator=g)
    gate = -torch.rand(1, 90, 3, generator=g)
    return q, k, v, dout, lq, lk, lv, gate


def _work(seed):
    """Flash forward + backward (GQA, causal window, softcap), linear attention with
    per-token decay and state, RoPE: the results as NumPy arrays."""
    q, k, v, dout, lq, lk, lv, gate = _inputs(seed)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = longattn.flash_attention(qg, kg, vg, causal=True, window=(50, 0), softcap=20.0, return_lse=True)
    out.backward(dout)
    lo, S = longattn.linear_attention(lq, lk, lv, log_decay=gate, return_state=True)
    inv_freq, _ = longattn.rope_frequencies(40)
    rq, rk = longattn.apply_rope(q, k[:, :150], inv_freq=inv_freq)
    return [x.detach().numpy().copy() for x in (out, lse, qg.grad, kg.grad, vg.grad, lo, S, rq, rk)]


def _run_threads(target, n):
    errors = []

    def wrapped(i):
        try:
            target(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish (deadlock?)"
    if errors:
        raise errors[0]


def _check_against_serial(results, serial):
    for i, per_round in results.items():
        for got in per_round:
            for a, b in zip(got, serial[i]):
                np.testing.assert_array_equal(a, b)


def test_concurrent_calls_match_serial_calls_bit_for_bit():
    serial = {i: _work(i) for i in range(THREADS)}
    results = {i: [] for i in range(THREADS)}

    def body(i):
        for _ in range(ROUNDS):
            results[i].append(_work(i))

    _run_threads(body, THREADS)
    _check_against_serial(results, serial)


def test_resizing_the_pool_while_other_threads_run_jobs():
    before = longattn.num_threads()
    serial = {i: _work(i) for i in range(THREADS)}
    results = {i: [] for i in range(THREADS)}
    stop = threading.Event()

    def body(i):
        if i == THREADS:  # the resizer
            n = 0
            while not stop.is_set():
                longattn.set_num_threads(1 + n % 3)
                n += 1
            return
        for _ in range(ROUNDS):
            results[i].append(_work(i))

    try:
        resizer = threading.Thread(target=body, args=(THREADS,))
        resizer.start()
        try:
            _run_threads(body, THREADS)
        finally:
            stop.set()
            resizer.join(timeout=60)
        assert not resizer.is_alive()
    finally:
        longattn.set_num_threads(before)
    _check_against_serial(results, serial)
