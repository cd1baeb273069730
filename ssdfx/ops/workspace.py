"""Scratch memory of the numba launchers, kept between calls.

Every launcher call needs scratch that never leaves it: gathered rows, hidden units between the
two phases, the backward's per-worker blocks; at T=2048, d=768, E=16, k=4 ~12 MB for the
forward, ~17 MB for the backward. Fresh buffers are only cheap while glibc hands back memory it
kept from the last free; its dynamic thresholds decide that from the allocation history of the
whole process, and when it maps them fresh, every page faults on first touch (~1-1.5 us per 4
KiB page on the AMD VMs). In one process alternating the dense FFN and the converted one at that
shape (AMD Zen 5, `LD_PRELOAD` of bench/mkl_intel_path.c), the converted forward took 17.5-19 ms
without faults and 23.5-29 ms where each call faulted its ~6000 scratch pages in again
(`GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072`). So each thread keeps one arena, grown to
the largest call it has served and carved into the call's arrays; the pages fault once.

The arrays are valid inside the `workspace` block only and must not leave it (no torch tensor
over them is returned or saved). A call that needs more than WORKSPACE_MAX_BYTES, or that runs
while this thread's arena is in use, gets fresh buffers instead. `release()` frees this
thread's arena.
"""

from __future__ import annotations

import math
import threading

import numpy as np

__all__ = ["WORKSPACE_MAX_BYTES", "arena_bytes", "release", "workspace"]

WORKSPACE_MAX_BYTES = 256 * 2**20
_ALIGN = 64  # bytes: every array starts on a cache line


class _Arena(threading.local):
    buf: np.ndarray | None = None
    base: int = 0  # the first aligned offset in buf
    busy: bool = False
    carved: dict | None = None  # specs -> their arrays in buf (`workspace`)


_ARENA = _Arena()
# carved layouts kept per arena: a model's layers call with a handful of shapes; a caller that
# cycles through more (a sweep) starts the cache again
_CARVED_MAX = 64


def _carve(specs) -> tuple[list, int]:
    """The arrays of specs laid out from offset 0 of an arena (as (shape, dtype, offset)), and
    the bytes they need."""
    layout = []
    off = 0
    for shape, dt in specs:
        dt = np.dtype(dt)
        layout.append((shape, dt, off))
        off += -(-math.prod(shape) * dt.itemsize // _ALIGN) * _ALIGN
    return layout, off + _ALIGN


class workspace:  # noqa: N801 - used as a function: `with workspace(...) as arrays`
    """Uninitialised arrays of the (shape, dtype) specs, in this thread's arena: a tuple in the
    specs' order, valid inside the block only.

    The arrays carved for a given specs tuple are kept with the arena and handed out again by
    the next call with the same specs (a layer calls with the same shapes every step): ~1.5 us
    a call instead of ~11 us for carving nine arrays (np.prod for the sizes alone took 31).
    Shapes must be tuples of ints (hashable)."""

    __slots__ = ("_specs", "_arena")

    def __init__(self, *specs):
        self._specs = specs
        self._arena = None

    def __enter__(self) -> tuple:
        arena = _ARENA
        specs = self._specs
        carved = arena.carved
        if carved is not None and not arena.busy:
            arrays = carved.get(specs)
            if arrays is not None:
                arena.busy = True
                self._arena = arena
                return arrays
        layout, total = _carve(specs)
        if arena.busy or total > WORKSPACE_MAX_BYTES:
            return tuple(np.empty(shape, dt) for shape, dt, _ in layout)
        if arena.buf is None or arena.buf.size < total:
            arena.buf = None  # free the smaller one first
            arena.carved = None
            arena.buf = np.empty(total, np.uint8)
            arena.base = -arena.buf.__array_interface__["data"][0] % _ALIGN
        arrays = tuple(np.ndarray(shape, dt, arena.buf, arena.base + off)
                       for shape, dt, off in layout)
        if arena.carved is None or len(arena.carved) >= _CARVED_MAX:
            arena.carved = {}
        arena.carved[specs] = arrays
        arena.busy = True
        self._arena = arena
        return arrays

    def __exit__(self, *exc) -> None:
        if self._arena is not None:
            self._arena.busy = False
            self._arena = None


def arena_bytes() -> int:
    """The size of this thread's arena (0 when it has none)."""
    return 0 if _ARENA.buf is None else int(_ARENA.buf.size)


def release() -> None:
    """Free this thread's arena; the next call allocates a new one."""
    if _ARENA.busy:
        raise RuntimeError("the workspace is in use by a running kernel call")
    _ARENA.buf = None
    _ARENA.carved = None
