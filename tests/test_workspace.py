"""The numba launchers' scratch arena (ssdfx.ops.workspace): layout, reuse, fallback, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssdfx.ops import workspace as ws
from test_ops import _call, _problem

DTYPES = [np.float32, np.float64, np.uint16, np.int32, np.int64]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 9), min_size=1, max_size=3),
                          st.sampled_from(DTYPES)), min_size=1, max_size=6))
def test_arrays_have_their_specs_are_aligned_and_do_not_overlap(specs):
    specs = [(tuple(shape), dt) for shape, dt in specs]
    with ws.workspace(*specs) as arrays:
        assert len(arrays) == len(specs)
        for a, (shape, dt) in zip(arrays, specs):
            assert a.shape == shape and a.dtype == dt and a.flags.c_contiguous
            assert a.ctypes.data % 64 == 0 or a.size == 0
            a[...] = 1  # writable
        for i, a in enumerate(arrays):
            for b in arrays[i + 1:]:
                assert not np.shares_memory(a, b)


def test_nested_use_gets_fresh_arrays_and_the_arena_is_kept():
    ws.release()
    with ws.workspace(((100,), np.float32)) as (a,):
        held = ws.arena_bytes()
        assert held >= 400
        with ws.workspace(((100,), np.float32)) as (b,):  # the arena is busy: fresh memory
            assert not np.shares_memory(a, b)
        with pytest.raises(RuntimeError, match="in use"):
            ws.release()
    with ws.workspace(((50,), np.float64)) as (c,):  # fits: the same arena, the same memory
        assert ws.arena_bytes() == held and np.shares_memory(a, c)
    ws.release()
    assert ws.arena_bytes() == 0


def test_the_same_specs_get_the_same_arrays_until_the_arena_grows():
    ws.release()
    specs = (((3, 5), np.float32), ((7,), np.int64))
    with ws.workspace(*specs) as first:
        pass
    with ws.workspace(((10,), np.float64)) as (other,):  # other specs, the same arena
        assert np.shares_memory(other, first[0])
    with ws.workspace(*specs) as again:
        assert all(a is b for a, b in zip(first, again))  # carved once, handed out again
    with ws.workspace(((10**5,), np.float32)):  # grows: a new arena, the carvings dropped
        pass
    with ws.workspace(*specs) as after:
        assert not any(np.shares_memory(a, b) for a, b in zip(first, after))
        assert [(a.shape, a.dtype) for a in after] == [(a.shape, a.dtype) for a in first]
    ws.release()


def test_scratch_rows_rounds_up_by_at_most_an_eighth():
    from ssdfx.ops.cpu_numba import scratch_rows

    seen = set()
    for n in range(0, 20000):
        r = scratch_rows(n)
        assert n <= r and r % 8 == 0 and r - n < max(8, n / 8 + 1), n
        if 10000 <= n:
            seen.add(r)
    assert len(seen) <= 20  # 10000-20000 rows: a handful of sizes, not one per row count


def test_over_the_bound_gets_fresh_arrays(monkeypatch):
    ws.release()
    monkeypatch.setattr(ws, "WORKSPACE_MAX_BYTES", 1024)
    with ws.workspace(((1000,), np.float32)) as (a,):
        assert a.shape == (1000,)
    assert ws.arena_bytes() == 0


def _run(p, backend, train):
    x = p["x"].clone().requires_grad_(train)
    y = _call({**p, "x": x}, backend)
    if not train:
        return (y,)
    y.backward(torch.ones_like(y))
    return y, x.grad


def _problem_f32(seed, t=300, glu=False):
    return _problem(t=t, d=24, e=8, m=6, k=3, dtype=torch.float32, glu=glu, seed=seed)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_numba_calls_reuse_the_arena_and_match_fresh_buffers_and_the_reference(
        monkeypatch, glu, train):
    ws.release()
    p = _problem_f32(0, glu=glu)
    first = _run(p, "numba", train)
    held = ws.arena_bytes()
    assert held > 0
    again = _run(p, "numba", train)
    assert ws.arena_bytes() == held  # the same sizes: no new arena
    monkeypatch.setattr(ws, "WORKSPACE_MAX_BYTES", 0)  # every buffer fresh
    fresh = _run(p, "numba", train)
    ref = _run(p, "reference", train)
    for a, b, c, r in zip(first, again, fresh, ref):
        assert torch.equal(a, b) and torch.equal(a, c)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def test_threads_calling_at_once_each_use_their_own_arena():
    problems = [_problem_f32(s, t=2000, glu=s % 2 == 1) for s in range(4)]
    expected = [_run(p, "reference", False)[0] for p in problems]
    got, sizes, errors = {}, {}, []

    def work(i):
        try:
            for _ in range(3):
                got[i] = _run(problems[i], "numba", False)[0]
            sizes[i] = ws.arena_bytes()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for i, r in enumerate(expected):
        torch.testing.assert_close(got[i], r, rtol=1e-4, atol=1e-4)
        assert sizes[i] > 0
