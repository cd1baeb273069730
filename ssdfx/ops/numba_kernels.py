"""numba CPU kernels of the routed-expert FFN: numpy arrays and ints in, nothing else.

Shape legend (used in every comment below):
    T tokens, K expert slots per token, d model width, E experts, m = F // E neurons per
    expert, F = E * m hidden width, P valid (token, slot) pairs (P <= T * K), W worker threads,
    n rows of one expert, nmax the largest n.

Pair layout (shared with every backend, see `ssdfx.ops.layout`): pair p = t * K + j is token t's
slot j. `order` (T*K,) lists the valid pairs sorted stably by expert, then the -1 slots;
`offsets` (E+1,) delimits expert e's pairs as order[offsets[e]:offsets[e+1]].

Why this shape of kernel (measured on the 2-core Zen 4 box, SPEC section 6):
- different experts run on different cores, each with single-threaded BLAS: better than
  splitting each small GEMM over both cores. `plan` balances the experts over the W workers
  (largest first onto the least-loaded worker).
- each worker gathers its expert's token rows into its own scratch so the GEMMs read
  contiguous rows; the weights are read in place, whatever their strides (see `blas.gemm`).
  A large expert's rows are taken in chunks (`even_step`; `cpu_numba.chunk_rows`: 512 KiB of
  gathered rows, at least 8 m) so that each chunk's blocks stay in L2 from the gather to the
  last step that reads them; the backward adds the chunks' weight gradients up.
- each token's K output rows (and, in the backward, its K input-gradient rows) are summed
  in one of two ways that never race and give results independent of thread timing (the
  launcher picks, see `cpu_numba.by_token_blocks`): pair rows, where the GEMMs write every
  pair's row to a (P, d) buffer in layout order and token blocks then sum their K rows in
  parallel; or token blocks (`token_sum`), where each worker runs every expert's GEMM on the
  pairs of its own tokens and adds the rows into them while in cache.
- the elementwise work runs in numba inside the same kernels (`numba_act`, formulas LLVM
  vectorises), per expert while its block is in cache: the forward (`fwd`, `fwd_tokens`) is
  one call after the sort, for training (saving the pre-activations) and inference alike, and
  the backward (`bwd`) is one call that recomputes the activation and its derivative from the
  saved pre-activations. Splitting them into GEMM kernels with torch's elementwise functions
  between (three phases, each (P, m) array through memory once more, dy gathered twice) made
  the Intel Xeon's forward+backward 1.02-1.28x slower at 13 of 14 shapes measured (0.985x at
  the 14th; see `cpu_numba.backward` and bench/README.md).

Every kernel has explicit float32 and float64 signatures with weights typed as any-layout
arrays: one compiled version per dtype instead of one per combination of weight layouts (C for
nn.Linear, F for Conv1D's `.t()` views). The GEMM kernels (`_per_dtype`) compile, or load from
numba's on-disk cache, a dtype's version on their first call with that dtype instead of every
version at import: compiling all of them took 166 s on the tenth session's Xeon and loading
them from the cache 5.3 s per process, while most processes only ever use float32.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, prange, types

from ssdfx.ops.blas import gemm, gemm_by_dtype
from ssdfx.ops.numba_act import activate, activate_grad

__all__ = ["add_rows_bf16", "bf16_bits", "bwd", "count_sort", "even_step", "expert_delta",
           "expert_grads", "expert_hidden", "expert_up", "fwd", "fwd_tokens", "padded_slots",
           "plan", "route", "sum_slots_bf16", "swap_threads", "top_k", "top_k_serial"]


class _PerDtype:
    """A kernel called from Python whose signature `make(float type)` is compiled (or loaded from
    numba's cache) on the first call with that dtype (of the first argument); calls then take
    that version, converting layouts as numba does for explicit signatures."""

    def __init__(self, make, options, fn):
        self.kernel = njit(**options)(fn)  # only ever called after _compile
        self._make = make
        self._ready = set()
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        if args[0].dtype not in self._ready:
            self._compile(args[0].dtype)
        return self.kernel(*args)

    def _compile(self, dtype):
        self.kernel.disable_compile(False)
        self.kernel.compile(self._make(numba.from_dtype(dtype)))
        self.kernel.disable_compile(True)  # as njit does after explicit signatures
        self._ready.add(dtype)


def _per_dtype(make, **options):
    return lambda fn: _PerDtype(make, options, fn)


_i64 = types.int64
_I1 = types.Array(types.int64, 1, "C")


def _c(dt, nd):
    return types.Array(dt, nd, "C")


def _a(dt, nd):
    return types.Array(dt, nd, "A")


@njit(types.int64(types.int64), nogil=True)
def swap_threads(n):
    """Set numba's thread count (of the calling thread) to n; returns the previous one. One
    compiled call instead of numba.get_num_threads() and set_num_threads() from Python.
    Not cached on disk (numba cannot: the threading layer's functions are runtime pointers);
    compiling it takes ~0.1 s once per process."""
    old = numba.get_num_threads()
    if old != n:
        numba.set_num_threads(n)
    return old


@njit(cache=True, nogil=True, inline="always")
def bf16_bits(u):
    """The bfloat16 bits of the float32 whose bits are u: nearest, ties to even; NaN stays a
    (quiet) NaN, and values past bfloat16's largest finite number round to infinity, as
    torch's conversion does."""
    v = np.int64(u)
    rounded = (v + 0x7FFF + ((v >> 16) & 1)) >> 16
    nan = (v & 0x7FFFFFFF) > 0x7F800000
    return np.uint16(((v >> 16) | 0x40) if nan else rounded)


@njit(parallel=True, cache=True, nogil=True)  # compiled at its first call
def sum_slots_bf16(rows, slot_rows, out, nw):
    """out[t] = the sum over slots j of rows[slot_rows[t, j]], added in slot order in float32 and
    rounded to bf16 once (bits in, bits out; `layout.sum_slots` in torch does the same in
    2K + 1 passes over (T, c)), in `nw` blocks of tokens."""
    t_all, k = slot_rows.shape
    c = rows.shape[1]
    for w in prange(nw):
        acc = np.empty(c, np.float32)
        a = acc.view(np.uint32)
        row = np.empty(c, np.float32)
        b = row.view(np.uint32)
        for t in range(w * t_all // nw, (w + 1) * t_all // nw):
            first = rows[slot_rows[t, 0]]
            for i in range(c):
                a[i] = np.uint32(first[i]) << np.uint32(16)
            for j in range(1, k):
                src = rows[slot_rows[t, j]]
                for i in range(c):
                    b[i] = np.uint32(src[i]) << np.uint32(16)
                for i in range(c):
                    acc[i] += row[i]
            dst = out[t]
            for i in range(c):
                dst[i] = bf16_bits(a[i])


@njit(parallel=True, cache=True, nogil=True)  # compiled at its first call
def add_rows_bf16(acc, rows, tok, nw):
    """acc[tok[i]] += rows[i] (float32 acc (T, c), bf16 bits rows (n, c)), widened exactly, in
    `nw` blocks of rows: the tokens tok (n,) must be distinct (one expert's rows)."""
    n = tok.shape[0]
    c = rows.shape[1]
    for w in prange(nw):
        row = np.empty(c, np.float32)
        b = row.view(np.uint32)
        for r in range(w * n // nw, (w + 1) * n // nw):
            src = rows[r]
            for i in range(c):
                b[i] = np.uint32(src[i]) << np.uint32(16)
            dst = acc[tok[r]]
            for i in range(c):
                dst[i] += row[i]


@njit(types.int64(_I1, _i64, _I1, _I1), cache=True, nogil=True)
def count_sort(idx, num_experts, order, offsets):
    """Stable counting sort of pairs by expert. Returns P, or -1 if an index is out of range.

    idx (T*K,) expert of each pair (-1: unused slot) -> order (T*K,), offsets (E+1,).
    """
    counts = np.zeros(num_experts + 1, np.int64)
    for p in range(idx.shape[0]):
        e = idx[p]
        if e < -1 or e >= num_experts:
            return -1
        counts[e if e >= 0 else num_experts] += 1
    offsets[0] = 0
    for e in range(num_experts):
        offsets[e + 1] = offsets[e] + counts[e]
    nxt = offsets[:num_experts].copy()
    tail = offsets[num_experts]
    for p in range(idx.shape[0]):
        e = idx[p]
        if e >= 0:
            order[nxt[e]] = p
            nxt[e] += 1
        else:
            order[tail] = p
            tail += 1
    return offsets[num_experts]


@njit(types.int64(_I1, _I1, _i64, _i64, _i64, _I1, _I1), cache=True, nogil=True)
def padded_slots(order, offsets, k, t_all, cap, pos, tok):
    """The padded-block layout of `ssdfx.ops.padded` from the sorted pairs. Returns P.

    pos (P,): layout row r of expert e -> padded row e*cap + (r - offsets[e]);
    tok (E*cap,): the token of each padded row (order[r] // k), t_all on padding rows.
    """
    num_experts = offsets.shape[0] - 1
    tok[:] = t_all
    for e in range(num_experts):
        shift = e * cap - offsets[e]
        for r in range(offsets[e], offsets[e + 1]):
            pos[r] = r + shift
            tok[r + shift] = order[r] // k
    return offsets[num_experts]


@njit(cache=True, nogil=True)
def _top_1(probs, idx, bad):
    """`top_k_serial` for k = 1: one pass for the largest value, one to count its copies (a
    second copy makes the row ambiguous), O(E) per row where the ranks take O(E^2)."""
    t_all, ne = probs.shape
    n_bad = 0
    for t in range(t_all):
        p = probs[t]
        best = p[0]
        arg = 0
        nan = best != best
        for e in range(1, ne):
            v = p[e]
            nan |= v != v
            if v > best:
                best = v
                arg = e
        copies = 0
        for e in range(ne):
            copies += np.int32(p[e] == best)
        idx[t, 0] = arg
        bad[t] = nan or copies > 1
        n_bad += bad[t]
    return n_bad


@njit(
    [_i64(_c(f, 2), _i64, _c(_i64, 2), _c(types.boolean, 1))
     for f in (types.float32, types.float64)],
    cache=True, nogil=True,
)
def top_k_serial(probs, k, idx, bad):
    """`top_k` in the calling thread, for few rows; also each block of `top_k`. bad[t] = 1
    where row t has a NaN, or equal values that make its top k ambiguous (then idx[t] is
    unspecified). Returns how many rows are bad."""
    t_all, ne = probs.shape
    if k == 1:
        return _top_1(probs, idx, bad)
    rank = np.empty(ne, np.int32)
    slot = np.empty(ne, np.int64)
    # equal values share a rank and leave the slots after it empty; a tie inside the top k, or
    # one across its boundary (then slot k is empty), shows as an empty slot among the first
    # min(k + 1, E)
    check = min(k + 1, ne)
    n_bad = 0
    for t in range(t_all):
        p = probs[t]
        # rank[e] = how many experts score strictly higher: no branch on the data, and the
        # inner loop over e is vectorised (a sort's comparisons are unpredictable branches)
        rank[:] = 0
        nan = False
        for j in range(ne):
            pj = p[j]
            nan |= pj != pj
            for e in range(ne):
                rank[e] += np.int32(pj > p[e])
        slot[:] = -1
        for e in range(ne):
            slot[rank[e]] = e
        lowest = 0
        for s in range(check):
            lowest = min(lowest, slot[s])
        for s in range(k):
            idx[t, s] = slot[s]
        bad[t] = nan or lowest < 0
        n_bad += bad[t]
    return n_bad


@njit(
    [_i64(_c(f, 2), _i64, _c(_i64, 2), _c(types.boolean, 1), _i64)
     for f in (types.float32, types.float64)],
    parallel=True, cache=True, nogil=True,
)
def top_k(probs, k, idx, bad, nw):
    """Indices of the k largest values of each row, largest first, in `nw` parallel blocks.

    probs (T, E) -> idx (T, K), bad (T,). Returns how many rows are bad: a NaN, or two equal
    values inside the top k or across its boundary; their idx rows are unspecified and the
    caller takes torch.topk for them, whose ordering of NaN and ties this kernel does not
    reproduce. O(E^2) per row: for E up to 64 it beat torch.topk on fresh data (T=512, E=16,
    k=4: 20 us against 84 us on two threads); k = 1 takes `_top_1`, O(E).
    """
    t_all = probs.shape[0]
    counts = np.zeros(nw, np.int64)
    for c in prange(nw):
        lo, hi = c * t_all // nw, (c + 1) * t_all // nw
        counts[c] = top_k_serial(probs[lo:hi], k, idx[lo:hi], bad[lo:hi])
    return counts.sum()


@njit(types.Tuple((_I1, _I1, _i64))(_I1, _i64), cache=True, nogil=True)
def plan(offsets, workers):
    """Assign experts to workers, largest first onto the least-loaded worker (LPT).

    offsets (E+1,) -> ptr (W+1,), experts (E,) with worker w's experts in
    experts[ptr[w]:ptr[w+1]], and nmax rows of the largest expert (scratch size).
    """
    ne = offsets.shape[0] - 1
    counts = offsets[1:] - offsets[:-1]
    by_size = np.argsort(-counts, kind="mergesort")
    load = np.zeros(workers, np.int64)
    owner = np.empty(ne, np.int64)
    for i in range(ne):
        e = by_size[i]
        w = np.argmin(load)
        owner[e] = w
        load[w] += counts[e] + 1  # +1: an empty expert still costs a little bookkeeping
    ptr = np.zeros(workers + 1, np.int64)
    for e in range(ne):
        ptr[owner[e] + 1] += 1
    for w in range(workers):
        ptr[w + 1] += ptr[w]
    fill = ptr[:workers].copy()
    experts = np.empty(ne, np.int64)
    for i in range(ne):
        e = by_size[i]
        experts[fill[owner[e]]] = e
        fill[owner[e]] += 1
    nmax = 0
    if ne > 0:
        nmax = counts.max()
    return ptr, experts, nmax


@njit(types.Tuple((_I1, _I1, _I1, _I1, _I1, _i64, _i64))(_I1, _i64, _i64), cache=True,
      nogil=True)
def route(idx, num_experts, workers):
    """`count_sort`, `plan` and the inverse permutation in one call, for the no-grad forward
    (whose layout never leaves the launcher): each is a separate call from Python otherwise,
    and right after other work every call from Python costs 5-30 us on this machine.

    idx (T*K,) -> order (T*K,), offsets (E+1,), inv (T*K,) the layout row of each pair, ptr,
    experts, nmax as in `plan`, and P; P = -1 if an index is out of range (the rest is then
    unspecified).
    """
    n = idx.shape[0]
    order = np.empty(n, np.int64)
    offsets = np.empty(num_experts + 1, np.int64)
    inv = np.empty(n, np.int64)
    pairs = count_sort(idx, num_experts, order, offsets)
    if pairs < 0:
        return order, offsets, inv, np.zeros(workers + 1, np.int64), np.empty(0, np.int64), 0, pairs
    for r in range(n):
        inv[order[r]] = r
    ptr, experts, nmax = plan(offsets, workers)
    return order, offsets, inv, ptr, experts, nmax, pairs


@njit(cache=True, nogil=True, inline="always")
def add_scaled(dst, a, src):
    """dst += a * src for 1-D arrays, as a loop: the array expression `dst += a * src`
    allocated a temporary per call, which made the token combine 1.6x slower (T=512, d=256,
    K=16: 259 us against 159 us)."""
    for i in range(dst.shape[0]):
        dst[i] += a * src[i]


@njit(cache=True, nogil=True, inline="always")
def add_to(dst, src):
    """dst += src for 1-D arrays, as a loop (see add_scaled)."""
    for i in range(dst.shape[0]):
        dst[i] += src[i]


@njit(parallel=True, cache=True, nogil=True)
def _combine(rows, gate, inv, n_rows, k, nw, out):
    """out[t] = sum_j gate[t, j] * rows[inv[t*K + j]]; token blocks in parallel.

    rows (P, d) in layout order; gate (T*K,) or (0,) for all ones; inv (T*K,) layout row of
    each (token, slot), >= n_rows for an unused slot; out (T, d).
    """
    t_all = out.shape[0]
    for c in prange(nw):
        for t in range(c * t_all // nw, (c + 1) * t_all // nw):
            row = out[t]
            row[:] = 0.0
            for j in range(k):
                r = inv[t * k + j]
                if r < n_rows:
                    if gate.shape[0] > 0:
                        add_scaled(row, gate[t * k + j], rows[r])
                    else:
                        add_to(row, rows[r])


@njit(cache=True, nogil=True, inline="always")
def even_step(n, chunk):
    """Rows per piece when n rows are taken at most `chunk` at a time in equal pieces (the
    last one may be shorter by less than the number of pieces): n = 4096, chunk = 3072 gives
    two GEMMs of 2048 rows rather than 3072 and 1024. At least 1."""
    pieces = max(1, (n + chunk - 1) // chunk)
    return max(1, (n + pieces - 1) // pieces)


@njit(cache=True, nogil=True, inline="always")
def first_at_least(order, a, b, v):
    """The first r in [a, b) with order[r] >= v (b if none), by bisection; order[a:b]
    ascending."""
    while a < b:
        c = (a + b) // 2
        if order[c] < v:
            a = c + 1
        else:
            b = c
    return a


@njit(cache=True, nogil=True, inline="always")
def token_sum(a1, w1, a3, w3, gate, order, offsets, k, w, nw, out, ys, chunk):
    """Worker w's token block of out[t] = sum_j gate[t, j] * (a1_(t,j) w1_e (+ a3_(t,j) w3_e)).

    The worker owns tokens [w T / W, (w+1) T / W): no other worker writes their rows, so each
    expert's GEMM output is added straight into them while still in cache, with no (P, d)
    buffer and no race. The layout sorts pairs stably, so within an expert's range they ascend
    by token and the worker's pairs of expert e are one sub-range, found by bisection.

    a1, a3 (P, m) in pair order (a3 (0, m): none); w1, w3 (F, d) any layout, expert e's block
    rows [e*m, (e+1)*m); gate (T*K,) or (0,) for all ones; out (T, d); ys (min(nmax, chunk),
    d) scratch: each GEMM takes at most `chunk` rows (`even_step`, `cpu_numba.chunk_rows`).
    bfloat16 (`numba_bf16`): a1, a3, w1, w3 its bits (uint16), out and ys float32, the products
    in MKL's bf16 GEMM (`blas.gemm_by_dtype`).
    """
    ne = offsets.shape[0] - 1
    m = w1.shape[0] // ne
    t_all = out.shape[0]
    tlo = w * t_all // nw
    thi = (w + 1) * t_all // nw
    out[tlo:thi] = 0.0
    for i in range(ne):
        e = (i + w * ne // nw) % ne  # workers start on different experts
        a = first_at_least(order, offsets[e], offsets[e + 1], tlo * k)
        b = first_at_least(order, a, offsets[e + 1], thi * k)
        lo = e * m
        step = even_step(b - a, chunk)
        for q in range(a, b, step):
            n = min(step, b - q)
            gemm_by_dtype(a1[q:q + n], w1[lo:lo + m], ys[:n], 0.0)
            if a3.shape[0] > 0:
                gemm_by_dtype(a3[q:q + n], w3[lo:lo + m], ys[:n], 1.0)
            for r in range(n):
                p = order[q + r]
                if gate.shape[0] > 0:
                    add_scaled(out[p // k], gate[p], ys[r])
                else:
                    add_to(out[p // k], ys[r])


@njit(cache=True, nogil=True, inline="always")
def expert_up(x, w1, b1, w3, b3, order, s, n, k, lo, m, xw, a1, a3):
    """One expert's up-projection(s): its tokens' rows (pairs order[s:s+n]) gathered into
    xw[:n], then a1 = xw w1_e^T + b1_e and, with GLU (w3 has rows), a3 = xw w3_e^T + b3_e;
    a1, a3 (n, m) outputs, lo = e * m."""
    for r in range(n):
        xw[r, :] = x[order[s + r] // k]
    gemm(xw[:n], w1[lo:lo + m].T, a1, 0.0)
    if b1.shape[0] > 0:
        for r in range(n):
            add_to(a1[r], b1[lo:lo + m])
    if w3.shape[0] > 0:
        gemm(xw[:n], w3[lo:lo + m].T, a3, 0.0)
        if b3.shape[0] > 0:
            for r in range(n):
                add_to(a3[r], b3[lo:lo + m])


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def expert_hidden(x, w1, b1, w3, b3, order, s, n, k, lo, m, act, xw, ub, hb, gb, tmp, bits,
                  a1s, a3s, ks):
    """One expert's hidden units: `expert_up`, then hb = act(a1) (* a3) (* ks) with the
    activation in numba (`numba_act`, `act` its code), out of place (a copy and an in-place
    activation made the training forward 0.90x at T=8192, d=256, E=8, k=4: the copy of each
    2 MB block left the cache).

    Training (a1s, a3s (P, m), a3s (0, m) without GLU): the up-projections go into the saved
    a1s[s:s + n] (a3s[s:s + n]). Inference (a1s (0, m)): into the scratch ub (and gb with GLU,
    else (0, m)). ks (P, m) the dropout's keep / (1 - p) in pair order, or (0, m). hb (n, m)
    output; tmp, bits (n*m or 0,) the activation's scratch."""
    save = a1s.shape[0] > 0
    up1 = a1s[s:s + n] if save else ub
    up3 = a3s[s:s + n] if save else gb
    expert_up(x, w1, b1, w3, b3, order, s, n, k, lo, m, xw, up1, up3)
    hflat = hb.reshape(-1)
    activate(up1.reshape(-1), hflat, act, tmp, bits)
    if w3.shape[0] > 0:
        gflat = up3.reshape(-1)
        for c in range(n * m):
            hflat[c] *= gflat[c]
    if ks.shape[0] > 0:
        kflat = ks[s:s + n].reshape(-1)
        for c in range(n * m):
            hflat[c] *= kflat[c]


@_per_dtype(
    lambda f: types.void(
        _c(f, 2), _a(f, 2), _c(f, 1), _a(f, 2), _c(f, 1), _a(f, 2), _c(f, 1),
        # x, w1, b1, w3, b3, w2, gate
        _I1, _I1, _I1, _i64, _I1, _I1, _i64,  # order, inv, offsets, K, ptr, experts, act
        _c(f, 2), _c(f, 2), _c(f, 2), _c(f, 2),  # a1s, a3s, ks, y
        _c(f, 2), _c(f, 3), _c(f, 2), _c(f, 2), _c(f, 2), _c(f, 2), _c(types.int32, 2), _i64,
        # ypair, xs, us, hs, h3s, tmps, bits, chunk
    ),
    parallel=True, cache=True, nogil=True, error_model="numpy",
)
def fwd(x, w1, b1, w3, b3, w2, gate, order, inv, offsets, k, ptr, experts, act, a1s, a3s, ks, y,
        ypair, xs, us, hs, h3s, tmps, bits, chunk):
    """The whole forward in one call, by pair rows: per expert, `expert_hidden` and the
    down-projection into the pair rows run back to back while the expert's block is in cache;
    then token blocks sum each token's K rows (`_combine`).

    x (T, d); w1, w3 (F, d), w2 (d, F) any layout (w3 (0, d) without GLU); b1, b3 (F,) or
    (0,); gate (T*K,); inv (T*K,) layout row of each pair; act the activation's code
    (`numba_act.CODES`); a1s, a3s (P, m) outputs, the pre-activations saved for the backward
    in pair order, or (0, m) where nothing is saved (inference; a3s (0, m) without GLU); ks as
    in `expert_hidden`; y (T, d) output; ypair (P, d) scratch; chunk the most rows of one
    GEMM (an expert's rows are taken in equal pieces of at most `chunk`, `even_step`; see
    `cpu_numba.chunk_rows`); with
    rows = min(nmax, chunk): xs (W, rows, d), us, hs, h3s (W, rows*m) scratch (us and h3s
    (W, 0) when saving, h3s also without GLU); tmps (W, rows*m or 0) and bits (W, rows*m or
    0) int32 scratch of the float32 activations (0 where the activation needs none).
    """
    ne = offsets.shape[0] - 1
    m = w1.shape[0] // ne
    nw = ptr.shape[0] - 1
    for w in prange(nw):
        for i in range(ptr[w], ptr[w + 1]):
            e = experts[i]
            step = even_step(offsets[e + 1] - offsets[e], chunk)
            for s in range(offsets[e], offsets[e + 1], step):
                n = min(step, offsets[e + 1] - s)
                hb = hs[w][:n * m].reshape((n, m))
                nu = n if us.shape[1] > 0 else 0
                ub = us[w][:nu * m].reshape((nu, m))
                n3 = n if h3s.shape[1] > 0 else 0
                gb = h3s[w][:n3 * m].reshape((n3, m))
                ns = n * m if tmps.shape[1] > 0 else 0
                expert_hidden(x, w1, b1, w3, b3, order, s, n, k, e * m, m, act, xs[w], ub, hb,
                              gb, tmps[w][:ns], bits[w][:ns], a1s, a3s, ks)
                gemm(hb, w2[:, e * m:(e + 1) * m].T, ypair[s:s + n], 0.0)
    _combine(ypair, gate, inv, offsets[ne], k, nw, y)


@_per_dtype(
    lambda f: types.void(
        _c(f, 2), _a(f, 2), _c(f, 1), _a(f, 2), _c(f, 1), _a(f, 2), _c(f, 1),
        # x, w1, b1, w3, b3, w2t, gate
        _I1, _I1, _i64, _I1, _I1, _i64,  # order, offsets, K, ptr, experts, act
        _c(f, 2), _c(f, 2), _c(f, 2), _c(f, 2),  # a1s, a3s, ks, y
        _c(f, 2), _c(f, 2), _c(f, 3), _c(f, 2), _c(f, 2), _c(types.int32, 2), _i64,
        # h, h3, xs, us, tmps, bits, chunk
    ),
    parallel=True, cache=True, nogil=True, error_model="numpy",
)
def fwd_tokens(x, w1, b1, w3, b3, w2t, gate, order, offsets, k, ptr, experts, act, a1s, a3s, ks,
               y, h, h3, xs, us, tmps, bits, chunk):
    """`fwd` by token blocks: every expert's hidden units (`expert_hidden`, workers by expert)
    into h, then the down-projection and sum by `token_sum` (workers by token block).

    w2t (F, d) any layout (w2 transposed); h, h3 (P, m) scratch in pair order (h3 (0, m)
    without GLU or when saving); xs (W, rows, d) scratch, first for the gathered rows, then
    for the down-projection's; us, chunk and the rest as in `fwd`.
    """
    ne = offsets.shape[0] - 1
    m = w1.shape[0] // ne
    nw = ptr.shape[0] - 1
    g3 = h3.shape[0] > 0
    for w in prange(nw):
        for i in range(ptr[w], ptr[w + 1]):
            e = experts[i]
            step = even_step(offsets[e + 1] - offsets[e], chunk)
            for s in range(offsets[e], offsets[e + 1], step):
                n = min(step, offsets[e + 1] - s)
                ns = n * m if tmps.shape[1] > 0 else 0
                nu = n if us.shape[1] > 0 else 0
                expert_hidden(x, w1, b1, w3, b3, order, s, n, k, e * m, m, act, xs[w],
                              us[w][:nu * m].reshape((nu, m)), h[s:s + n],
                              h3[s:s + n] if g3 else h3[:0], tmps[w][:ns], bits[w][:ns], a1s,
                              a3s, ks)
    for w in prange(nw):
        token_sum(h, w2t, h[:0], w2t[:0], gate, order, offsets, k, w, nw, y, xs[w], chunk)


@njit(cache=True, nogil=True, inline="always")
def expert_delta(x, dy, w2, w3, a1, a3, gate, ks, order, s, n, k, lo, m, act, dgate, da1, da3,
                 xw, dw, gh, dhb, fdb, tmp, bits):
    """One expert's backward up to its weight gradients, from its selected pairs only (pairs
    order[s:s + n], neurons [lo, lo + m)), in cache, row by row:

        dh_raw = dy_t w2_e                 (dy's rows gathered into dw, one GEMM)
        f, f' = act(a1), act'(a1)          (`activate_grad`, from the saved pre-activations)
        h = f (* a3) (* ks);  dgate = <dh_raw, h>;  dL/dh = gate * dh_raw (* ks)
        da1 = dL/dh (* a3) * f';  da3 = dL/dh * f;  gh = gate * h

    x's rows are gathered into xw for `expert_grads`. gh (n*m,) output (f on the way); dhb,
    fdb (n*m,) scratch for dh_raw and f'; tmp, bits the activation's scratch (n*m or 0).
    """
    glu = w3.shape[0] > 0
    for r in range(n):
        t = order[s + r] // k
        xw[r, :] = x[t]
        dw[r, :] = dy[t]
    f, dh, fd = gh.reshape((n, m)), dhb.reshape((n, m)), fdb.reshape((n, m))
    gemm(dw[:n], w2[:, lo:lo + m], dh, 0.0)
    activate_grad(a1[s:s + n].reshape(-1), gh, fdb, act, tmp, bits)
    drop = ks.shape[0] > 0
    for r in range(n):
        row, frow, drow, arow = dh[r], f[r], fd[r], da1[s + r]
        g = gate[order[s + r]]
        acc = 0.0
        if glu or drop:
            for c in range(m):
                hv = frow[c]
                dl = g * row[c]
                if drop:
                    hv *= ks[s + r, c]
                    dl *= ks[s + r, c]
                if glu:
                    da3[s + r, c] = dl * frow[c]
                    dl *= a3[s + r, c]
                    hv *= a3[s + r, c]
                acc += row[c] * hv
                arow[c] = dl * drow[c]
                frow[c] = g * hv
        else:
            for c in range(m):
                acc += row[c] * frow[c]
                arow[c] = g * row[c] * drow[c]
                frow[c] *= g
        dgate[s + r] = acc


@njit(cache=True, nogil=True, inline="always")
def expert_grads(w1, w3, gh, da1, da3, s, n, lo, m, xw, dw, dw1, dw2, dw3, db1, db3, dxrows,
                 first):
    """One expert's weight and bias gradients from `expert_delta`'s results (gh (n, m); xw, dw
    its gathered rows of x and dy), and its pairs' input-gradient rows: dxrows (n, d) receives
    da1 w1_e (+ da3 w3_e), or is (0, d) for none (summed by token blocks instead). The
    gradients are written by an expert's first chunk of rows (`first`) and added to by the
    others. An expert nobody chose (n = 0) gets exactly zero gradients."""
    glu = w3.shape[0] > 0
    if n == 0:
        dw1[lo:lo + m, :] = 0.0
        dw2[:, lo:lo + m] = 0.0
        db1[lo:lo + m] = 0.0
        if glu:
            dw3[lo:lo + m, :] = 0.0
            db3[lo:lo + m] = 0.0
        return
    beta = 0.0 if first else 1.0
    gemm(dw[:n].T, gh, dw2[:, lo:lo + m], beta)  # (d, m)
    gemm(da1[s:s + n].T, xw[:n], dw1[lo:lo + m], beta)  # (m, d)
    if first:
        db1[lo:lo + m] = 0.0
    for r in range(n):
        add_to(db1[lo:lo + m], da1[s + r])
    with_rows = dxrows.shape[0] > 0
    if with_rows:
        gemm(da1[s:s + n], w1[lo:lo + m], dxrows, 0.0)  # (n, d)
    if glu:
        gemm(da3[s:s + n].T, xw[:n], dw3[lo:lo + m], beta)
        if first:
            db3[lo:lo + m] = 0.0
        for r in range(n):
            add_to(db3[lo:lo + m], da3[s + r])
        if with_rows:
            gemm(da3[s:s + n], w3[lo:lo + m], dxrows, 1.0)


@_per_dtype(
    lambda f: types.void(
        _c(f, 2), _c(f, 2), _a(f, 2), _a(f, 2), _a(f, 2),  # x, dy, w1, w2, w3
        _c(f, 2), _c(f, 2), _c(f, 1), _c(f, 2),  # a1, a3, gate, ks
        _I1, _I1, _i64, _I1, _I1, _i64,  # order, offsets, K, ptr, experts, act
        _a(f, 2), _a(f, 2), _a(f, 2), _c(f, 1), _c(f, 1),  # dw1, dw2, dw3, db1, db3
        _c(f, 1), _c(f, 2), _c(f, 2),  # dgate, da1, da3
        types.boolean, _I1, _c(f, 2), _c(f, 2),  # by_tokens, inv, dx, dxpair
        _c(f, 3), _c(f, 3), _c(f, 2), _c(f, 2), _c(types.int32, 2),  # xs, ds, ghs, tmps, bits
        _i64,  # chunk
    ),
    parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz"},
)
def bwd(x, dy, w1, w2, w3, a1, a3, gate, ks, order, offsets, k, ptr, experts, act,
        dw1, dw2, dw3, db1, db3, dgate, da1, da3, by_tokens, inv, dx, dxpair,
        xs, ds, ghs, tmps, bits, chunk):
    """The whole backward in one call: per expert `expert_delta` and `expert_grads` while its
    blocks are in cache (workers by expert), then
    each token's K input-gradient rows summed by token blocks (`token_sum`, by_tokens) or from
    pair rows (dxpair, summed as in `fwd`).

    x, dy (T, d); w1, w3 (F, d), w2 (d, F) any layout (w3 (0, d) without GLU); a1, a3 (P, m)
    the saved pre-activations in pair order (a3 (0, m) without GLU); gate (T*K,); ks (P, m)
    the dropout's keep / (1 - p) in pair order, or (0, m) without dropout; act the
    activation's code (`numba_act.CODES`); dw1, dw3 (F, d), dw2 (d, F) any layout, db1, db3
    (F,) (db3 (0,) without GLU), dgate (P,) in pair order, da1, da3 (P, m) (da3 (0, m) without
    GLU), dx (T, d): outputs; inv (T*K,) layout row of each pair and dxpair (P, d) scratch for
    pair rows ((0,) and (0, d) by token blocks); chunk the most rows of one expert taken at a
    time (as in `fwd`); with rows = min(nmax, chunk): xs, ds (W, rows, d), ghs (W,
    3*rows*m), tmps, bits (W, rows*m or 0) scratch (tmps and bits as in `fwd`).

    The derivative loop's dot product is reassociated (vectorised); so is nothing else that
    rounds differently: the activation is its own, non-inlined, function.
    """
    ne = offsets.shape[0] - 1
    m = w1.shape[0] // ne
    nw = ptr.shape[0] - 1
    for w in prange(nw):
        for i in range(ptr[w], ptr[w + 1]):
            e = experts[i]
            if offsets[e + 1] == offsets[e]:  # zero gradients
                expert_grads(w1, w3, ghs[w][:0].reshape((0, m)), da1, da3, offsets[e], 0,
                             e * m, m, xs[w], ds[w], dw1, dw2, dw3, db1, db3, dxpair[:0], True)
            step = even_step(offsets[e + 1] - offsets[e], chunk)
            for s in range(offsets[e], offsets[e + 1], step):
                n = min(step, offsets[e + 1] - s)
                nm = n * m
                ns = nm if tmps.shape[1] > 0 else 0
                gh = ghs[w][:nm]
                expert_delta(x, dy, w2, w3, a1, a3, gate, ks, order, s, n, k, e * m, m, act,
                             dgate, da1, da3, xs[w], ds[w], gh, ghs[w][nm:2 * nm],
                             ghs[w][2 * nm:3 * nm], tmps[w][:ns], bits[w][:ns])
                expert_grads(w1, w3, gh.reshape((n, m)), da1, da3, s, n, e * m, m, xs[w],
                             ds[w], dw1, dw2, dw3, db1, db3,
                             dxpair[:0] if by_tokens else dxpair[s:s + n], s == offsets[e])
    if by_tokens:
        for w in prange(nw):
            token_sum(da1, w1, da3, w3, np.empty(0, dx.dtype), order, offsets, k, w, nw, dx,
                      ds[w], chunk)
    else:
        _combine(dxpair, np.empty(0, dx.dtype), inv, offsets[ne], k, nw, dx)
