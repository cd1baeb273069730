"""Launchers of the numba CPU kernels: validate, convert torch tensors to numpy views, run.

The forward is one numba call after the sort (`numba_kernels.fwd` or `fwd_tokens`, shared
with `infer`, which saves nothing), the backward one more (`numba_kernels.bwd`); the
activation and its derivative run in numba inside them (`numba_act`). See `numba_kernels` for
why the work is split this way; `by_token_blocks` picks how each token's K rows are summed.

Why numba + BLAS per expert rather than torch.mm per expert (the "torch" backend): measured
on the 2-core target machine, OpenBLAS sgemm called in place from numba ran an expert's GEMM
at ~120 GFLOP/s on one core (torch.mm on one thread: ~106), and putting different experts on
the two cores beat torch.mm's splitting of each small GEMM over both: the op's forward at
T=2048, d=768, E=16, k=4 took 27 ms with numba and 47 ms with the torch backend.

Threads. The kernels run `W = min(torch.get_num_threads(), NUMBA_NUM_THREADS)` workers, so the
op follows the thread count the user gave torch. Each launcher call runs its kernels (and the
torch elementwise middle, which uses neither numba's pool nor that BLAS) inside one
`_numba_phase`, which sets numba's (thread-local) count to W and restores it afterwards:
without that, a parallel region starts all of numba's NUMBA_NUM_THREADS threads even when
W = 1, and the idle ones must still reach its barrier; with torch at one thread and the other
core busy (another process), the forward at T=64, d=256, E=16, k=4 took 20.6 ms instead of
0.53 ms. `numba.set_num_threads` can also reset torch's
count where numba and torch share one libgomp (numba issue 9387), so torch's count is restored
after every launcher if anything changed it. BLAS must be single-threaded inside the workers
(each runs its own experts' GEMMs; a multi-threaded OpenBLAS called from two OpenMP threads at
once oversubscribes the cores and warns "Detect OpenMP Loop"), so the phase also sets one BLAS
thread, and restores the previous counts afterwards.

Tensors that leave a launcher (outputs, the saved layout, gradients) are allocated by torch and
written through numpy views; numpy arrays serve as scratch only. A tensor over a numpy array
needs the GIL to be freed, which autograd or a gloo thread may do at interpreter exit. The
scratch comes from each thread's arena, kept between calls (`workspace`): fresh buffers
page-faulted in again whenever glibc had returned them to the OS (a 4-layer HF GPT-2, d=768,
E=16, k=4, 2048 tokens, on the AMD Zen 5: a training step 1528 ms against 1631 with fresh
buffers, 154k page faults against 206k; inference 316 against 328 ms).

The numba kernels module is imported on first use, so `import ssdfx` neither compiles nor
loads numba code, nor starts numba's thread pool.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

from ssdfx.ops.dispatch import plain_eager
from ssdfx.ops.layout import keep_scale
from ssdfx.ops.reference import check_expert_idx
from ssdfx.ops.workspace import workspace

__all__ = ["BF16_CHUNK_ROWS", "BF16_MAX_EXPERT_BYTES", "CHUNK_BYTES", "PAIR_BUFFER_BYTES",
           "SUPPORTED_DTYPES", "add_rows_bf16", "backward", "backward_bf16",
           "backward_bf16_or_torch", "by_token_blocks", "chunk_rows", "chunk_rows_bf16",
           "forward", "forward_bf16", "forward_bf16_or_torch", "infer", "infer_bf16",
           "infer_bf16_or_torch", "num_workers", "padded_slots", "sort_pairs", "sum_slots_bf16",
           "top_k_indices"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)

# Two ways to sum each token's K expert outputs (and, in the backward, its K input-gradient
# rows), see numba_kernels:
#   pair rows     workers by expert write every pair's (d,) row to a (P, d) buffer, then token
#                 blocks sum them (`fwd`, and `bwd` without by_tokens);
#   token blocks  each worker runs every expert's GEMM on the pairs of its own block of tokens
#                 and adds the rows into those tokens while in cache (`fwd_tokens`, and `bwd`
#                 with by_tokens):
#                 no (P, d) buffer through memory, but each of the W workers reads every
#                 expert's weights, and inference writes the (P, m) hidden units out between
#                 its two phases instead of keeping each expert's block in cache.
# `by_token_blocks` takes token blocks where tokens have several rows to sum (P >= 4 T) and
# the pairs outnumber the weights' extra reads (P >= (W - 1) F), and wherever the pair rows
# would reach PAIR_BUFFER_BYTES. Measured on the Intel Xeon (W=2, in-process A/B through the
# converted module, forward / forward+backward, token blocks over pair rows): k=16 at d=256,
# E=32 (m=32) T=512 1.13x / 1.14x; T=2048, d=256, E=16, k=8 1.07x / 1.08x; d=768, E=32, k=16,
# T=512 1.12x / 1.08x; T=2048, d=768, E=16, k=4 1.00x / 1.02x; but k=1 at T=8192, d=256,
# E=8 0.87x / 1.01x, T=2048, d=768, E=16, k=2 0.97x / 1.09x, and T=64, d=768, E=16, k=4
# (P=256 < F=3072) 0.73x / 0.88x. Past PAIR_BUFFER_BYTES they replace per-worker (T, d)
# accumulators, which they beat by 1.02x (T=8192, d=768, E=16, k=4) to 1.12x (d=256, E=32,
# k=16). 32 MiB is glibc's largest dynamic mmap threshold: a request of that size or more is
# mapped fresh, and page-faults, on every call (an exactly-32 MiB pair buffer at T=2048,
# d=256, E=32, k=16 made the forward 0.71-1.01x of dense).
PAIR_BUFFER_BYTES = 32 * 2**20


def by_token_blocks(pairs: int, t_all: int, f_all: int, d: int, itemsize: int,
                    workers: int) -> bool:
    """Whether the kernels sum each token's rows by token blocks rather than pair rows (see
    above): P pairs of T tokens, F hidden units, W workers."""
    if pairs * d * itemsize >= PAIR_BUFFER_BYTES:
        return True
    return pairs >= 4 * t_all and pairs >= (workers - 1) * f_all


_KERNELS = None  # ssdfx.ops.numba_kernels once loaded (`_kernels`)


def _kernels():
    """The numba kernels module, imported on the first call (so that `import ssdfx` does not
    load numba): one global read afterwards, where an import statement in every launcher was
    ~1 us each of a call from Python, several per call."""
    global _KERNELS
    if _KERNELS is None:
        from ssdfx.ops import numba_kernels

        _KERNELS = numba_kernels
    return _KERNELS


def num_workers(torch_threads: int | None = None) -> int:
    """Worker threads of the numba phases: torch's thread count, capped by numba's pool."""
    import numba  # numba alone: loading the kernels may start the pool (`_keeps_torch_threads`)

    if torch_threads is None:
        torch_threads = torch.get_num_threads()
    # NUMBA_NUM_THREADS is the pool size; reading it does not start the pool (unlike
    # numba.get_num_threads(), which does and may reset torch's count, numba issue 9387).
    return max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))


@functools.cache
def _blas_libraries() -> tuple:
    # threadpoolctl's controllers of the loaded BLAS libraries, found once per process: a
    # handle on libraries that stay loaded, not state that changes what the op computes.
    from threadpoolctl import ThreadpoolController

    import scipy.linalg.cython_blas  # noqa: F401  (make sure SciPy's BLAS is loaded)

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@functools.cache
def _blas_thread_calls() -> tuple:
    """(get, set) of each loaded BLAS library's thread count, resolved once per process.

    For OpenBLAS with its own threads, the library's functions themselves: threadpoolctl's
    methods look the symbol up by name on every call and a phase makes four calls per
    library. threadpoolctl's methods for anything else (OpenMP-threaded builds, MKL, BLIS).
    Empty where the kernels call torch's MKL, which `blas.gemm` keeps single-threaded itself.
    """
    from ssdfx.ops.blas import LIBRARY

    if LIBRARY == "mkl":
        return ()
    calls = []
    for lib in _blas_libraries():
        get = put = None
        find = getattr(lib, "_get_symbol", None)  # threadpoolctl's affix-aware lookup
        if (find is not None and lib.internal_api == "openblas"
                and getattr(lib, "threading_layer", None) == "pthreads"):
            get, put = find("openblas_get_num_threads"), find("openblas_set_num_threads")
        if get is None or put is None:
            get, put = lib.get_num_threads, lib.set_num_threads
        calls.append((get, put))
    return tuple(calls)


class _numba_phase:  # noqa: N801 - used as a function: `with _numba_phase(workers):`
    """numba runs `workers` threads (and BLAS one) inside the phase; the counts are restored
    after. `blas=False` for kernels that call no BLAS.

    Right after other work each step here is a cold call: threadpoolctl's `limit()` took
    11.5 us per phase, its per-library methods 13 us for one round of reads, and
    `numba.get_num_threads()` alone 22 us (it takes a lock and checks the pool from Python);
    so the BLAS counts go through the libraries' own functions (`_blas_thread_calls`) and
    numba's through one compiled call that swaps it (`numba_kernels.swap_threads`). A class
    rather than a generator context manager: ~1 us a phase less.
    """

    __slots__ = ("_workers", "_calls", "_before", "_numba_before")

    def __init__(self, workers: int, blas: bool = True):
        self._workers = workers
        self._calls = _blas_thread_calls() if blas else ()

    def __enter__(self) -> None:
        calls = self._calls
        self._before = before = [get() for get, _ in calls]
        for (_, put), n in zip(calls, before):
            if n != 1:
                put(1)
        self._numba_before = _kernels().swap_threads(self._workers)

    def __exit__(self, *exc) -> None:
        if self._numba_before != self._workers:
            _kernels().swap_threads(self._numba_before)
        for (_, put), n in zip(self._calls, self._before):
            if n != 1:
                put(n)


def _keeps_torch_threads(launcher):
    """Restore torch's thread count after the launcher if numba changed it.

    numba's OpenMP layer may bind to the libgomp that torch loaded; starting its pool (at the
    first parallel kernel, or when cached parallel kernels load) then sets that library's
    thread count to NUMBA_NUM_THREADS, which is what torch.get_num_threads() reports
    (numba issue 9387). The count is read before the kernels module is even imported.
    """

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        torch_threads = torch.get_num_threads()
        try:
            _kernels()  # loading it may start numba's pool
            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)
            return launcher(*args, **kwargs)
        finally:
            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)

    return wrapper


_load_kernels = _keeps_torch_threads(_kernels)  # the first load may start numba's pool


def _np(t: torch.Tensor) -> np.ndarray:
    # detach only what records gradients: a training step makes ~27 of these views, and
    # detach() is most of each one's cost
    return (t.detach() if t.requires_grad else t).numpy()


def _check(x, w1, w2, w3, num_experts, dtypes=SUPPORTED_DTYPES, **optional):
    if x.device.type != "cpu":
        raise ValueError(f"the numba backend runs on CPU tensors only, got device {x.device}")
    if x.dtype not in dtypes:
        if dtypes != SUPPORTED_DTYPES:
            raise ValueError(f"this kernel takes {dtypes[0]} tensors, got {x.dtype}")
        raise ValueError(
            f"the numba backend supports float32 and float64, got {x.dtype}; "
            "use backend='torch' (or 'auto') for bfloat16/float16"
        )
    dt = x.dtype
    for name, t in (("w1", w1), ("w2", w2), ("w3", w3), *optional.items()):
        if t is not None and (t.dtype != dt or not t.is_cpu):
            raise ValueError(f"{name} is {t.dtype} on {t.device}; expected {dt} on cpu like x")
    f_all, d = w1.shape
    if x.dim() != 2 or x.shape[1] != d or w2.shape != (d, f_all):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}; "
            "expected x (T, d), w1 (F, d), w2 (d, F)"
        )
    if w3 is not None and w3.shape != w1.shape:
        raise ValueError(f"w3 {tuple(w3.shape)} must have w1's shape {tuple(w1.shape)}")
    if num_experts < 1 or f_all % num_experts:
        raise ValueError(f"F={f_all} is not divisible by num_experts={num_experts}")


def _inverse(o: np.ndarray) -> np.ndarray:
    """inv (T*K,): the layout row of each (token, slot) pair (rows >= P: unused slots)."""
    inv = np.empty_like(o)
    inv[o] = np.arange(o.shape[0])
    return inv


def _sort_pairs(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`ssdfx.ops.layout.sort_pairs` for CPU tensors by numba's counting sort: the same order
    and offsets (stable, unused slots last). ValueError for an index outside [-1, E)."""
    nk = _kernels()

    order = torch.empty(expert_idx.numel(), dtype=torch.int64)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64)
    flat = _np(expert_idx.to(torch.int64).contiguous()).reshape(-1)
    if nk.count_sort(flat, num_experts, _np(order), _np(offsets)) < 0:
        check_expert_idx(expert_idx, num_experts)  # raises with the offending range
    return order, offsets


sort_pairs = _keeps_torch_threads(_sort_pairs)


def _padded_slots(order: torch.Tensor, offsets: torch.Tensor, pairs: int, cap: int, k: int,
                  t_all: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (P,) and tok (E*cap,) of `ssdfx.ops.padded`'s blocks, in one numba pass (the torch
    ops it replaces, repeat_interleave, two aranges, full and index_copy_, took 49 us of a
    0.34 ms bf16 forward at T=64, d=256, E=16, k=4)."""
    nk = _kernels()

    num_experts = offsets.numel() - 1
    pos = torch.empty(pairs, dtype=torch.int64)
    tok = torch.empty(num_experts * cap, dtype=torch.int64)
    nk.padded_slots(_np(order.to(torch.int64).contiguous()), _np(offsets.to(torch.int64).contiguous()),
                    k, t_all, cap, _np(pos), _np(tok))
    return pos, tok


padded_slots = _keeps_torch_threads(_padded_slots)


# numba's top-k is O(E^2) per row: faster than torch.topk on fresh data up to E=64 (T=2048,
# E=64, k=8: 279 us against 612 us). Below TOP_K_PARALLEL_ROWS rows it runs in the calling
# thread: in a model (each call right after a dense forward+backward, alternated, 60-80 calls)
# that made the sparse forward 1.03-1.14x faster at T=64-512 than torch.topk below 256 rows
# and numba's two threads from there, 1.005x at T=2048 and 0.95-0.97x at T=8192, where the
# two threads are kept. For k = 1 it is one O(E) pass (`numba_kernels._top_1`): the kernel
# alone, right after a dense forward (AMD Zen 5, E=8, medians of 100) 23 -> 9 us at T=512,
# 111 -> 48 at T=2048, 359 -> 115 at T=8192; calling threads past TOP_K_PARALLEL_ROWS stayed
# a draw for it as for k > 1 (in-process A/B, T=2048-8192, E=8, k=1: 0.98-1.02x, undecided).
TOP_K_MAX_EXPERTS = 64
TOP_K_PARALLEL_ROWS = 2048


def top_k_indices(probs: torch.Tensor, k: int) -> torch.Tensor | None:
    """Indices (..., k) of the k largest values along the last dim, largest first, computed by
    numba for CPU float32/float64 eager tensors; None where torch.topk should run instead
    (other devices or dtypes, traced or fake tensors, many experts). Rows with a NaN or with
    equal values that make the top k ambiguous are taken from torch.topk.

    torch.topk sorts each row with unpredictable branches: at T=512, E=16, k=4 it took 84 us
    on fresh data, this 20 us (two threads).
    """
    ne = probs.shape[-1]
    if (probs.device.type != "cpu" or probs.dtype not in SUPPORTED_DTYPES
            or not 0 < k <= ne <= TOP_K_MAX_EXPERTS or not plain_eager(probs)):
        return None
    flat = probs.detach() if probs.requires_grad else probs
    if flat.dim() != 2:
        flat = flat.reshape(-1, ne)
    flat = flat.contiguous()
    if flat.shape[0] == 0:
        return None
    idx, bad = _top_k(flat, k)
    if bad is not None:
        idx[bad] = flat[bad].topk(k, dim=-1).indices
    return idx if probs.dim() == 2 else idx.view(*probs.shape[:-1], k)


def _top_k(probs, k):
    """numba's top-k of probs (T, E), contiguous and detached: idx (T, k) and the bool mask of
    its bad rows (None if there are none). The mask is numpy's until it is needed (a tensor
    made and viewed as numpy costs ~1-3 us of a call right after other work); idx is torch's,
    as it leaves (a tensor over a numpy array needs the GIL to be freed: see
    `_training_layout`). Few rows run in the calling thread, outside numba's pool: no thread
    counts to set or guard once the kernels are loaded."""
    nk = _KERNELS or _load_kernels()
    rows = probs.shape[0]
    idx = torch.empty(rows, k, dtype=torch.int64)
    bad = np.empty(rows, np.bool_)
    if rows < TOP_K_PARALLEL_ROWS:
        n_bad = nk.top_k_serial(probs.numpy(), k, idx.numpy(), bad)
    else:
        n_bad = _top_k_parallel(probs.numpy(), k, idx.numpy(), bad)
    return idx, torch.from_numpy(bad) if n_bad else None


@_keeps_torch_threads
def _top_k_parallel(probs, k, idx, bad):
    workers = num_workers()
    with _numba_phase(workers, blas=False):
        return _kernels().top_k(probs, k, idx, bad, workers)


# The kernels take an expert's rows in chunks of CHUNK_BYTES of gathered input (forward and
# backward, and the token-block sums' down-projections likewise; equal pieces, `even_step`),
# so that the gathered rows, the GEMMs' outputs and the hidden block stay in the Intel Xeon's
# 2 MiB L2 while they are used; but at least 8 m rows, so that BLAS's packing of the expert's
# (m, d) weight block, repeated for every chunk, stays small against the chunk's GEMM. The
# backward's weight gradients add up the chunks (GEMMs with beta = 1 after the first).
# In-process A/B on the Xeon against whole experts (GELU, fp32; inference / training forward
# / forward+backward): T=8192, d=256, E=32, k=16 1.17x / 1.23x / 1.03x with the forward
# chunked, and forward+backward 1.10-1.11x more with the backward too (ReLU 1.12x); E=16,
# k=8 1.27x / 1.16x / 1.09x, then 1.09-1.14x more; T=2048, d=256, E=32, k=16 1.06x / 1.03x
# / 1.02x, then 1.06-1.08x; T=8192, d=768, E=32, k=16 forward+backward 1.05x; shapes whose
# experts have fewer rows than a chunk (T=512, d=256; T=2048, d=768, E=16, k=4) run as
# before. Fixed chunks of 256 KiB cost up to 10% at d=768 (85 rows against a 590 KB block).
CHUNK_BYTES = 512 * 2**10


def chunk_rows(d: int, m: int, itemsize: int) -> int:
    """The most rows of one expert that one GEMM of the kernels takes (see CHUNK_BYTES)."""
    return max(CHUNK_BYTES // (itemsize * max(d, 1)), 8 * m, 1)


# The bf16 kernels take at most BF16_CHUNK_ROWS rows of an expert at a time: the `8 m` floor
# above (for float32 BLAS's packing) made their chunks up to 3072 rows at m = 384, and the
# backward's float32 scratch (six (rows, m) blocks per worker, 28 MiB there) then streamed
# through memory. On the Zen 5 with MKL's Intel code paths (one process, alternated, medians of
# 7; default / 512 rows, ms): backward T=8192, d=768, E=8, k=4 156 / 102, E=8, k=2 91.7 / 52.0,
# E=16, k=4 62.4 / 56.3; T=2048, d=768, E=16, k=4 16.3 / 15.6 and 14.0 / 14.0; E=8, k=4
# 27.6 / 26.7; T=8192, d=256, E=8, k=4 16.2 / 15.7; forward and inference unchanged or faster
# (T=8192, d=768, E=8, k=4 inference 56.7 / 52.9). 256-1024 rows measured alike.
BF16_CHUNK_ROWS = 512


def chunk_rows_bf16(d: int, m: int) -> int:
    """The most rows of one expert that one GEMM of the bf16 kernels takes."""
    return min(chunk_rows(d, m, 2), BF16_CHUNK_ROWS)


def _act_scratch(code: int, dt: np.dtype, workers: int, block: int) -> tuple:
    """The `workspace` specs of tmps, bits (W, block or 0): the per-worker scratch of the
    float32 GELU/SiLU variants' exp (`numba_act`); empty where the activation needs none."""
    sized = block if (code >= 3 and dt == np.float32) else 0
    return ((workers, sized), dt), ((workers, sized), np.int32)


def scratch_rows(n: int) -> int:
    """n rounded up to at most 1/8 more (a multiple of 8 at least): the row count the scratch of
    a call is sized for, so that calls whose largest expert differs by a few rows ask the
    `workspace` for the same arrays (and `_forward_plan` answers from its cache)."""
    step = max(8, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def _plan(workers, t_all, d, m, f_all, pairs, rows, dt, activation) -> tuple:
    """What both kernels' launchers decide alike: (the activation's code, chunk, the most rows
    of one GEMM (rows capped by a chunk), the per-worker hidden block rows * m, token blocks?)."""
    from ssdfx.ops.numba_act import CODES

    chunk = chunk_rows(d, m, dt.itemsize)
    rows = min(rows, chunk)
    tokens = by_token_blocks(pairs, t_all, f_all, d, dt.itemsize, workers)
    return CODES[activation], chunk, rows, rows * m, tokens


@functools.lru_cache(maxsize=256)
def _forward_plan(workers: int, t_all: int, d: int, m: int, f_all: int, pairs: int, rows: int,
                  dt: np.dtype, activation: str, glu: bool, save: bool) -> tuple:
    """What `_forward_kernel` decides from the shapes alone: (token blocks?, chunk, the
    activation's code, the `workspace` specs). rows: `scratch_rows` of the largest expert's
    row count. Cached: the same handful of shapes comes back every step, and working this out
    took ~10 us of a call from Python right after other work."""
    code, chunk, rows, block, tokens = _plan(workers, t_all, d, m, f_all, pairs, rows, dt,
                                             activation)
    # inference's up-projections go to scratch (training's to the saved a1, a3)
    g3 = glu and not save
    # token blocks: the (P, m) hidden units h, h3; pair rows: the (P, d) rows and per-worker
    # hidden blocks
    hp, yp = (pairs, 0) if tokens else (0, pairs)
    specs = (((workers, rows, d), dt), ((workers, 0 if save else block), dt),
             *_act_scratch(code, dt, workers, block), ((hp, m), dt), ((hp if g3 else 0, m), dt),
             ((yp, d), dt), ((workers, 0 if tokens else block), dt),
             ((workers, block if g3 and not tokens else 0), dt))
    return tokens, chunk, code, specs


def _forward_kernel(x, w1, b1, w2, w3, b3, gate, order, offsets, inv, ptr, experts, nmax,
                    k, activation, a1s, a3s, ks, y):
    """Run `numba_kernels.fwd` (pair rows) or `fwd_tokens` (token blocks, see
    `by_token_blocks`) for `forward` and `infer`: numpy order, offsets, ptr, experts; inv the
    inverse permutation or None (built here if pair rows need it); a1s, a3s, ks, y numpy
    arrays as the kernels take them."""
    nk = _kernels()
    workers = ptr.shape[0] - 1
    t_all, d = x.shape
    m = a1s.shape[1]
    glu = w3 is not None
    xn = _np(x.contiguous())
    dt = xn.dtype
    tokens, chunk, code, specs = _forward_plan(workers, t_all, d, m, w1.shape[0],
                                               int(offsets[-1]), scratch_rows(int(nmax)), dt,
                                               activation, glu, a1s.shape[0] > 0)
    empty1 = np.empty(0, dt)
    g = _np(gate.contiguous()).reshape(-1)
    weights = (xn, _np(w1), _np(b1) if b1 is not None else empty1,
               _np(w3) if glu else np.empty((0, d), dt), _np(b3) if b3 is not None else empty1)
    with _numba_phase(workers), workspace(*specs) as (scratch, us, tmps, bits, h, h3, ypair,
                                                       hs, h3s):
        if tokens:
            nk.fwd_tokens(*weights, _np(w2).T, g, order, offsets, k, ptr, experts, code, a1s,
                          a3s, ks, y, h, h3, scratch, us, tmps, bits, chunk)
        else:
            nk.fwd(*weights, _np(w2), g, order, _inverse(order) if inv is None else inv,
                   offsets, k, ptr, experts, code, a1s, a3s, ks, y, ypair, scratch, us, hs, h3s,
                   tmps, bits, chunk)


class _Saved(NamedTuple):
    """What a training forward allocates and plans before its kernel (`_training_layout`)."""

    order_t: torch.Tensor  # (T*K,) the pair layout, saved for the backward
    offsets_t: torch.Tensor  # (E+1,)
    order: np.ndarray  # numpy views of the two
    offsets: np.ndarray
    pairs: int
    ptr: np.ndarray  # the worker plan (`numba_kernels.plan`)
    experts: np.ndarray
    nmax: int
    a1t: torch.Tensor  # (T*K, m) the pre-activations, rows >= P zero
    a3t: torch.Tensor  # (T*K, m) with GLU, else (0, m)
    yt: torch.Tensor  # (T, d) the output


def _training_layout(x, w1, w3, expert_idx, num_experts) -> _Saved:
    """Sort the pairs, plan the workers and allocate what leaves a training forward, in x's
    dtype."""
    nk = _kernels()

    t_all, d = x.shape
    k = expert_idx.shape[1]
    m = w1.shape[0] // num_experts
    # what leaves the launcher is allocated by torch: a tensor over a numpy array needs the GIL
    # to be freed, which an autograd graph may do from another thread or at interpreter exit
    # (the saved a1, the gradients); scratch that never leaves is numpy
    order_t, offsets_t = _sort_pairs(expert_idx, num_experts)
    order, offsets = _np(order_t), _np(offsets_t)
    pairs = int(offsets[-1])
    ptr, experts, nmax = nk.plan(offsets, num_workers())
    a1t = torch.empty(t_all * k, m, dtype=x.dtype)
    a3t = torch.empty(t_all * k if w3 is not None else 0, m, dtype=x.dtype)
    if pairs < t_all * k:  # unused slots (dynamic-k): their rows are zero
        a1t[pairs:] = 0.0
        a3t[pairs:] = 0.0
    return _Saved(order_t, offsets_t, order, offsets, pairs, ptr, experts, nmax, a1t, a3t,
                  torch.empty(t_all, d, dtype=x.dtype))


_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _keep_rows(keep, sel, m, dropout_p, dtype) -> np.ndarray:
    """The dropout's scale keep / (1 - p) (P, m) in dtype for the selected pairs sel in layout
    order, or (0, m) without dropout."""
    if keep is None:
        return np.empty((0, m), _NP_DTYPES[dtype])
    return _np(keep_scale(keep.reshape(-1, m)[sel], dropout_p, dtype).contiguous())


@_keeps_torch_threads
def forward(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts, activation, dropout_p):
    """y, and what the backward needs: the pre-activations a1, a3 (T*K, m) in pair order
    (rows >= P zero), the layout order and offsets. One numba call after the sort
    (`_forward_kernel`), with the activation in numba (`numba_act`): the values differ from
    torch's float32 GELU/SiLU family by ~1e-7 relative; ReLU, squared ReLU and identity are
    exact."""
    _check(x, w1, w2, w3, num_experts, b1=b1, b3=b3, gate=gate)
    k = expert_idx.shape[1]
    m = w1.shape[0] // num_experts
    sv = _training_layout(x, w1, w3, expert_idx, num_experts)
    p = sv.pairs
    _forward_kernel(x, w1, b1, w2, w3, b3, gate, sv.order, sv.offsets, None, sv.ptr, sv.experts,
                    sv.nmax, k, activation, _np(sv.a1t[:p]),
                    _np(sv.a3t[:p]) if w3 is not None else np.empty((0, m), _np(x).dtype),
                    _keep_rows(keep, sv.order_t[:p], m, dropout_p, x.dtype), _np(sv.yt))
    return sv.yt, sv.a1t, sv.a3t, sv.order_t, sv.offsets_t


def _route(expert_idx, num_experts, workers):
    """`numba_kernels.route` of expert_idx (T, K) for the inference launchers: order, offsets,
    inv, ptr, experts, nmax; ValueError for an index outside [-1, E)."""
    nk = _kernels()

    *layout, pairs = nk.route(_np(expert_idx.to(torch.int64).contiguous()).reshape(-1),
                              num_experts, workers)
    if pairs < 0:
        check_expert_idx(expert_idx, num_experts)  # raises with the offending range
    return layout


@_keeps_torch_threads
def infer(x, w1, b1, w2, w3, b3, expert_idx, gate, num_experts, activation):
    """`forward`'s y alone, for calls with nothing to differentiate and no dropout.

    Nothing is saved for a backward, so the layout (sort, worker plan, inverse permutation) is
    built by one numba call (`numba_kernels.route`), and the rest is one more
    (`_forward_kernel`, saving nothing). Right after other work, as in a model, every call from
    Python costs 5-30 us on this machine: at T=64, d=256, E=16, k=4 the sort, plan, inverse,
    buffers and torch's activation between two numba phases were 90 us of a 440 us forward.
    The same kernels as `forward`'s, so the same y.
    """
    _check(x, w1, w2, w3, num_experts, b1=b1, b3=b3, gate=gate)
    workers = num_workers()
    t_all, d = x.shape
    m = w1.shape[0] // num_experts
    order, offsets, inv, ptr, experts, nmax = _route(expert_idx, num_experts, workers)
    yt = torch.empty(t_all, d, dtype=x.dtype)
    none = np.empty((0, m), _np(x).dtype)
    _forward_kernel(x, w1, b1, w2, w3, b3, gate, order, offsets, inv, ptr, experts, nmax,
                    expert_idx.shape[1], activation, none, none, none, _np(yt))
    return yt


# bfloat16 inference where MKL multiplies bf16 natively (`blas.BF16`). With AMX
# (`blas.BF16_AMX`): `infer_bf16` against the torch path (one oneDNN `mm` per expert on torch's
# threads), in one process on the Intel Xeon (2 cores), each call right after a dense bf16
# forward, alternated, medians of 21; torch path / numba (speedup of numba), sparse ms:
#   T=64, d=256, E=16, k=4 0.93 / 0.67 (1.39x); T=512, d=256: E=8, k=1 1.53 / 1.13 (1.36x),
#   E=8, k=4 1.90 / 1.62 (1.18x), E=16, k=4 2.04 / 1.34 (1.52x), E=16, k=8 3.93 / 1.85
#   (2.12x), E=32, k=16 5.22 / 2.72 (1.92x); T=512, d=768: E=8, k=1 4.88 / 3.80 (1.28x),
#   E=16, k=4 9.06 / 5.70 (1.59x), E=16, k=8 10.71 / 7.82 (1.37x), E=32, k=16 15.80 / 9.49
#   (1.66x); T=2048, d=256: E=8, k=2 4.66 / 4.19 (1.11x), E=16, k=4 5.11 / 3.64 (1.40x),
#   E=16, k=8 11.14 / 7.81 (1.43x), E=32, k=16 14.56 / 7.73 (1.88x); T=2048, d=768: E=8, k=1
#   13.10 / 10.61 (1.23x), E=32, k=4 21.94 / 12.98 (1.69x);
# but T=8192, d=256: E=8, k=1 8.54 / 8.80 (0.97x), E=16, k=4 0.96-1.05x over three runs;
# T=2048, d=768: E=16, k=4 0.91-0.94x, E=16, k=8 0.85x; T=8192, d=768, E=8, k=1 0.85x. The
# losses are the shapes whose average expert has the most rows: there two threads on one large
# GEMM (the torch path) beat two workers each on its own GEMM, whose AMX products are bound by
# memory (weights repacked for every call, float32 outputs written and read back). So numba
# takes the calls whose average expert's gathered bf16 rows (T k / E rows of d) take at most
# BF16_MAX_EXPERT_BYTES; every win above is under it, every loss over it (T=8192, d=256, E=8,
# k=1, exactly at it, a draw).
# With AVX-512-BF16 and no AMX (the AMD Zen 5 with MKL's Intel code paths, see
# `bench/mkl_intel_path.c`) no size bound held: over the 54 shapes of bench/op.py's sweep (T
# 512-8192, d 256/768, E 8-32, k = E/8-E/2; one process, each call alternated with a dense
# forward, fresh data and routing, medians of 8, one run) numba was faster than the torch path
# at 53, by a median 1.49x (0.92-4.03x; T=8192, d=768, E=32, k=4 28.1 ms against 36.9), slower
# only at T=8192, d=768, E=8, k=2 (47.2 against 43.5 ms); so there it takes every bf16
# inference call.
# Training (`forward_bf16`, `backward_bf16`) follows the same rule. On the Zen 5 with
# the Intel code paths, forward+backward through the converted module against the torch path,
# one process, alternated with a dense bf16 forward+backward, medians of 15 (numba / torch ms):
# T=2048, d=768, E=16, k=4 24.9 / 35.4 (1.42x); T=512, d=256: E=16, k=4 2.03 / 2.85 (1.41x),
# E=32, k=16 3.96 / 6.32 (1.59x); T=2048, d=256, E=16, k=8 8.36 / 13.1 (1.57x); T=8192,
# d=256: E=8, k=4 34.5 / 55.4 (1.61x), E=32, k=16 36.9 / 66.6 (1.81x); T=512, d=768, E=32,
# k=16 16.0 / 33.3 (2.08x); T=2048, d=768: E=8, k=4 1.14x, E=32, k=16 1.66x; T=8192, d=768:
# E=8, k=2 1.24x, E=16, k=4 1.09x, E=16, k=8 1.26x, E=32, k=16 1.48x; slower only at T=8192,
# d=768, E=8, k=4 (257 / 230 ms, 0.90x), which BF16_CHUNK_ROWS then turned into 163 / 197 ms
# (1.21x; E=8, k=2 1.37x). With AMX training was not measured: there the inference bound keeps
# the torch path for large experts.
BF16_MAX_EXPERT_BYTES = 512 * 2**10


def _bf16_numba_fits(t_all: int, k: int, d: int, num_experts: int) -> bool:
    """Whether the "auto" backend runs numba's bf16 kernels for T tokens, K slots, width d and
    E experts where `blas.BF16`: always with AVX-512-BF16, with AMX while an average expert's
    gathered rows take at most BF16_MAX_EXPERT_BYTES (see above)."""
    from ssdfx.ops import blas

    return not blas.BF16_AMX or t_all * k * d * 2 <= BF16_MAX_EXPERT_BYTES * num_experts


def infer_bf16_or_torch(x, w1, b1, w2, w3, b3, expert_idx, gate, num_experts, activation):
    """bfloat16 inference of the "auto" backend where `blas.BF16`: `infer_bf16`, except on a
    CPU with AMX when an average expert's rows take more than BF16_MAX_EXPERT_BYTES (the torch
    path's forward there)."""
    if _bf16_numba_fits(x.shape[0], expert_idx.shape[1], x.shape[1], num_experts):
        return infer_bf16(x, w1, b1, w2, w3, b3, expert_idx, gate, num_experts, activation)
    from ssdfx.ops import torch_path

    return torch_path.forward(x, w1, b1, w2, w3, b3, expert_idx, gate, None, num_experts,
                              activation, 0.0)[0]


def forward_bf16_or_torch(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts,
                          activation, dropout_p):
    """The bfloat16 training forward of the "auto" backend where `blas.BF16`: `forward_bf16`
    where `infer_bf16_or_torch` takes numba, else the torch path's. Both save the same layout,
    so either backward takes either forward's."""
    from ssdfx.ops import torch_path

    fits = _bf16_numba_fits(x.shape[0], expert_idx.shape[1], x.shape[1], num_experts)
    run = forward_bf16 if fits else torch_path.forward
    return run(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts, activation,
               dropout_p)


def backward_bf16_or_torch(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets, num_experts,
                           activation, dropout_p):
    """The bfloat16 backward of the "auto" backend where `blas.BF16`, chosen as in
    `forward_bf16_or_torch`."""
    from ssdfx.ops import torch_path

    fits = _bf16_numba_fits(x.shape[0], gate.shape[1], x.shape[1], num_experts)
    run = backward_bf16 if fits else torch_path.backward
    return run(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets, num_experts, activation,
               dropout_p)


def _flat_bits(t: torch.Tensor) -> np.ndarray:
    """A dense bfloat16 tensor's storage (from its first element) as 1-D uint16 bits."""
    return _bits(t.as_strided((t.numel(),), (1,)))


def _bits(t: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor's bits as a uint16 numpy view (same strides, no copy)."""
    return t.detach().view(torch.int16).numpy().view(np.uint16)


@_keeps_torch_threads
def sum_slots_bf16(rows: torch.Tensor, slot_rows: torch.Tensor) -> torch.Tensor:
    """`layout.sum_slots` of bfloat16 rows (P, c) on CPU in one numba pass
    (`numba_kernels.sum_slots_bf16`): the same float32 sums, rounded once, the same bits."""
    nk = _kernels()

    out = torch.empty(slot_rows.shape[0], rows.shape[1], dtype=torch.bfloat16)
    workers = num_workers()
    with _numba_phase(workers, blas=False):
        nk.sum_slots_bf16(_bits(rows.contiguous()), _np(slot_rows.contiguous()), _bits(out),
                          workers)
    return out


@_keeps_torch_threads
def add_rows_bf16(acc: torch.Tensor, rows: torch.Tensor, tok: torch.Tensor) -> None:
    """acc[tok[i]] += rows[i] in place: float32 acc (T, c), bfloat16 rows (n, c) added exactly
    as float32 (`numba_kernels.add_rows_bf16`); tok's tokens must be distinct. What
    `index_add_` does after converting the rows, without the (n, c) float32 copy."""
    nk = _kernels()

    workers = num_workers()
    with _numba_phase(workers, blas=False):
        nk.add_rows_bf16(_np(acc), _bits(rows.contiguous()), _np(tok.contiguous()), workers)


def _need_bf16_gemm():
    from ssdfx.ops.blas import HAS_BF16_GEMM

    if not HAS_BF16_GEMM:
        raise RuntimeError("the numba bfloat16 kernels need MKL's cblas_gemm_bf16bf16f32, which "
                           "this torch build does not export; use backend='torch'")


def _unit_or_empty(gate: torch.Tensor) -> np.ndarray:
    """The gates as float32 (T*K,), or (0,) where all are exactly 1.0 (the router's in the
    forward): the kernels then skip the multiplications."""
    g = _np(gate.float().contiguous()).reshape(-1)
    return np.empty(0, np.float32) if bool((g == 1.0).all()) else g


def _forward_bf16(x, w1, b1, w2, w3, b3, gate, order, offsets, ptr, experts, nmax, k,
                  activation, a1s, a3s, ks, yt):
    """Run `numba_bf16.fwd_tokens_bf16` into yt for `infer_bf16` and `forward_bf16`: numpy
    order, offsets, ptr, experts; a1s, a3s uint16 arrays ((0, m) where nothing is saved); ks
    the dropout's float32 scale (P, m) in pair order, or (0, m)."""
    from ssdfx.ops import numba_bf16
    from ssdfx.ops.numba_act import CODES

    workers = ptr.shape[0] - 1
    t_all, d = x.shape
    m = w1.shape[0] // (offsets.shape[0] - 1)
    pairs = int(offsets[-1])
    glu = w3 is not None
    code = CODES[activation]
    f32 = np.float32
    chunk = chunk_rows_bf16(d, m)
    rows = min(nmax, chunk)
    block = rows * m
    empty = np.empty(0, f32)
    specs = [((pairs, m), np.uint16), ((t_all, d), f32), ((workers, rows, d), np.uint16),
             ((workers, rows, d), f32), ((workers, block), f32),
             ((workers, block if glu else 0), f32), ((workers, block), f32),
             *_act_scratch(code, np.dtype(f32), workers, block)]
    with _numba_phase(workers), workspace(*specs) as scratch:
        numba_bf16.fwd_tokens_bf16(
            _bits(x.contiguous()), _bits(w1), _np(b1.float()) if b1 is not None else empty,
            _bits(w3) if glu else np.empty((0, d), np.uint16),
            _np(b3.float()) if b3 is not None else empty,
            _bits(w2).T, _unit_or_empty(gate), order, offsets, k, ptr, experts, code, a1s, a3s,
            ks, _bits(yt), *scratch, chunk)


@_keeps_torch_threads
def infer_bf16(x, w1, b1, w2, w3, b3, expert_idx, gate, num_experts, activation):
    """`infer` for bfloat16: one numba call after the routing (`numba_bf16.fwd_tokens_bf16`),
    every product in MKL's bf16 GEMM (`blas.gemm_bf16`), only where `blas.HAS_BF16_GEMM`.
    The hidden units and y are rounded to bf16 once each (see `numba_bf16`)."""
    _need_bf16_gemm()
    _check(x, w1, w2, w3, num_experts, dtypes=(torch.bfloat16,), b1=b1, b3=b3, gate=gate)
    workers = num_workers()
    t_all, d = x.shape
    m = w1.shape[0] // num_experts
    order, offsets, _, ptr, experts, nmax = _route(expert_idx, num_experts, workers)
    yt = torch.empty(t_all, d, dtype=torch.bfloat16)
    none = np.empty((0, m), np.uint16)
    _forward_bf16(x, w1, b1, w2, w3, b3, gate, order, offsets, ptr, experts, nmax,
                  expert_idx.shape[1], activation, none, none, np.empty((0, m), np.float32), yt)
    return yt


@_keeps_torch_threads
def forward_bf16(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts, activation,
                 dropout_p):
    """`forward` for bfloat16: `infer_bf16`'s kernel, which also saves the pre-activations,
    rounded to bf16, in the layout every backend shares, and applies dropout's keep mask;
    only where `blas.HAS_BF16_GEMM`."""
    _need_bf16_gemm()
    _check(x, w1, w2, w3, num_experts, dtypes=(torch.bfloat16,), b1=b1, b3=b3, gate=gate)
    m = w1.shape[0] // num_experts
    sv = _training_layout(x, w1, w3, expert_idx, num_experts)
    p = sv.pairs
    _forward_bf16(x, w1, b1, w2, w3, b3, gate, sv.order, sv.offsets, sv.ptr, sv.experts,
                  sv.nmax, expert_idx.shape[1], activation, _bits(sv.a1t[:p]),
                  _bits(sv.a3t[:p]) if w3 is not None else np.empty((0, m), np.uint16),
                  _keep_rows(keep, sv.order_t[:p], m, dropout_p, torch.float32), sv.yt)
    return sv.yt, sv.a1t, sv.a3t, sv.order_t, sv.offsets_t


@_keeps_torch_threads
def backward_bf16(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets, num_experts,
                  activation, dropout_p):
    """`backward` for bfloat16: every gradient in one numba call (`numba_bf16.bwd_bf16`),
    every product in MKL's bf16 GEMM, float32 in between; takes the layout any backend's
    forward saved."""
    _need_bf16_gemm()
    _check(x, w1, w2, w3, num_experts, dtypes=(torch.bfloat16,), dy=dy, gate=gate, a1=a1)
    from ssdfx.ops import numba_bf16
    nk = _kernels()
    from ssdfx.ops.numba_act import CODES

    workers = num_workers()
    t_all, d = x.shape
    k = gate.shape[1]
    f_all = w1.shape[0]
    m = f_all // num_experts
    glu = w3 is not None
    on, offn = _np(order), _np(offsets)
    pairs = int(offn[-1])
    ptr, experts, nmax = nk.plan(offn, workers)
    code = CODES[activation]
    f32, u16 = np.float32, np.uint16
    chunk = chunk_rows_bf16(d, m)
    rows = min(nmax, chunk)
    block = rows * m
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
    dw3 = torch.empty_like(w3) if glu else x.new_empty(0)
    db1, db3 = np.empty(f_all, f32), np.empty(f_all if glu else 0, f32)
    dg = np.empty(pairs, f32)
    dxt = x.new_empty(t_all, d)
    ks = _keep_rows(keep, order[:pairs], m, dropout_p, torch.float32)
    specs = [((pairs, m), u16), ((pairs if glu else 0, m), u16), ((t_all, d), f32),
             ((workers, rows, d), u16), ((workers, rows, d), u16), ((workers, rows, d), f32),
             ((workers, m, d), f32), ((workers, d, m), f32),
             ((workers, m if glu else 0, d), f32), ((workers, 6, block), f32),
             ((workers, block), u16), *_act_scratch(code, np.dtype(f32), workers, block)]
    with _numba_phase(workers), workspace(*specs) as scratch:
        numba_bf16.bwd_bf16(
            _bits(x.contiguous()), _bits(dy.contiguous()), _bits(w1), _bits(w2),
            _bits(w3) if glu else np.empty((0, d), u16), _bits(a1[:pairs]),
            _bits(a3[:pairs]) if glu else np.empty((0, m), u16), _unit_or_empty(gate),
            ks, on, offn, k, ptr, experts, code,
            _flat_bits(dw1), _flat_bits(dw2), _flat_bits(dw3),
            np.array([dw1.stride(), dw2.stride(), dw3.stride() if glu else (0, 0)], np.int64),
            db1, db3, dg, _bits(dxt), *scratch, chunk,
        )
    dgate = x.new_zeros(t_all * k)
    dgate[order[:pairs]] = torch.from_numpy(dg).to(x.dtype)
    return (dxt, dw1, torch.from_numpy(db1).to(x.dtype), dw2, dw3,
            torch.from_numpy(db3).to(x.dtype), dgate.view(t_all, k))


@_keeps_torch_threads
def backward(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets, num_experts, activation,
             dropout_p):
    """Every gradient in one numba call (`numba_kernels.bwd`): per expert, the hidden units'
    gradient, the activation's derivative (numba's, `numba_act.activate_grad`, recomputed from
    the saved a1), the gate's gradient and the weight gradients while the expert's blocks are
    in cache, then the input gradient. Against three phases (a GEMM kernel, torch's
    elementwise backward over (P, m), a second GEMM kernel that gathered dy again), in-process
    on the Intel Xeon: 1.06x at T=2048, d=768, E=16, k=4 (GELU, and SwiGLU), 1.16x at T=512,
    d=256, E=16, k=8, 1.20x at T=64, 1.31x at T=8192, d=256, E=32, k=16 (ReLU)."""
    nk = _kernels()
    _check(x, w1, w2, w3, num_experts, dy=dy, gate=gate, a1=a1)
    workers = num_workers()
    t_all, d = x.shape
    k = gate.shape[1]
    f_all = w1.shape[0]
    m = f_all // num_experts
    glu = w3 is not None
    xn, dyn = _np(x.contiguous()), _np(dy.contiguous())
    dt = xn.dtype
    on, offn = _np(order), _np(offsets)
    pairs = int(offn[-1])
    ptr, experts, nmax = nk.plan(offn, workers)
    ks = _keep_rows(keep, order[:pairs], m, dropout_p, x.dtype)
    # internal buffers are the workspace's: with torch buffers freed on return the backward
    # at T=64, d=768, E=8, k=4 took 9.8 ms instead of 4.6 (glibc then returned the freed pages
    # to the OS, and the next call faulted them in again)
    tokens, chunk, code, specs = _backward_plan(workers, t_all, d, m, f_all, pairs,
                                                scratch_rows(int(nmax)), dt, activation, glu)
    dg = np.empty(pairs, dt)
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
    db1t = x.new_empty(f_all)
    dw3 = torch.empty_like(w3) if glu else x.new_empty(0)
    db3t = x.new_empty(f_all if glu else 0)
    dxt = x.new_empty(t_all, d)
    with _numba_phase(workers), workspace(*specs) as (da1, da3, ypair, xs, ys, blocks, tmps,
                                                       bits):
        nk.bwd(
            xn, dyn, _np(w1), _np(w2), _np(w3) if glu else np.empty((0, d), dt),
            _np(a1[:pairs]), _np(a3[:pairs]) if glu else np.empty((0, m), dt),
            _np(gate.contiguous()).reshape(-1), ks, on, offn, k, ptr, experts, code,
            _np(dw1), _np(dw2), _np(dw3) if glu else np.empty((0, d), dt), _np(db1t),
            _np(db3t), dg, da1, da3, tokens,
            np.empty(0, np.int64) if tokens else _inverse(on), _np(dxt), ypair, xs, ys, blocks,
            tmps, bits, chunk,
        )
    # the gate's gradient from layout order to (token, slot) order, zero for unused slots;
    # numpy's scatter (indexing a torch tensor with a tensor of positions took ~5-10 us)
    dgate = x.new_empty(t_all, k) if pairs == t_all * k else x.new_zeros(t_all, k)
    _np(dgate).reshape(-1)[on[:pairs]] = dg
    return dxt, dw1, db1t, dw2, dw3, db3t, dgate


@functools.lru_cache(maxsize=256)
def _backward_plan(workers: int, t_all: int, d: int, m: int, f_all: int, pairs: int,
                   rows: int, dt: np.dtype, activation: str, glu: bool) -> tuple:
    """`backward`'s decisions from the shapes alone, as `_forward_plan`: (token blocks?, chunk,
    the activation's code, the `workspace` specs); rows: `scratch_rows` of the largest
    expert's row count."""
    code, chunk, rows, block, tokens = _plan(workers, t_all, d, m, f_all, pairs, rows, dt,
                                             activation)
    specs = (((pairs, m), dt), ((pairs if glu else 0, m), dt), ((0 if tokens else pairs, d), dt),
             ((workers, rows, d), dt), ((workers, rows, d), dt), ((workers, 3 * block), dt),
             *_act_scratch(code, dt, workers, block))
    return tokens, chunk, code, specs
