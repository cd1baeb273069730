"""numba CPU kernel of the routed-expert FFN's bfloat16 inference (`cpu_numba.infer_bf16`).

numba has no bfloat16 type: bf16 tensors come in and go out as uint16 arrays of their bits, and
every product runs in MKL's `cblas_gemm_bf16bf16f32` (`blas.gemm_bf16`: bf16 inputs, float32
output; AMX on the Intel Xeon, where one core ran an expert's 512 x 768 x 192 projection at
730 GFLOP/s against 145 for float32; AVX-512-BF16 on the AMD Zen 5 with MKL's Intel code
paths, 389 against 187). The work is `numba_kernels.fwd_tokens`'s, by token blocks
(shape legend there):

1. workers by expert, an expert's rows in chunks (`numba_kernels.even_step`): gather the
   tokens' bf16 rows, up-projection(s) into float32, bias, activation (`numba_act`, float32),
   GLU product, then the hidden units rounded once to bf16 into h (P, m) in pair order;
2. workers by token block (`numba_kernels.token_sum`'s scheme: each worker owns a block of
   tokens, runs every expert's down-projection on its pairs and adds the float32 rows into its
   own tokens' float32 accumulator), then rounds its block to bf16 once.

Rounding: the hidden units and the output are rounded to bf16 once each; the up-projection,
bias and activation stay in float32 in between (torch's bf16 FFN rounds after the
up-projection, after the bias and after the activation too, and sums the K expert outputs in
bf16), so the results are at least as close to the exact value as the torch path's.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types

from ssdfx.ops.blas import gemm_bf16
from ssdfx.ops.numba_act import activate
from ssdfx.ops.numba_kernels import add_scaled, add_to, even_step, first_at_least

__all__ = ["fwd_tokens_bf16", "round_bf16"]


@njit(cache=True, nogil=True, inline="always")
def round_bf16(src, dst):
    """dst = src rounded to bfloat16 (nearest, ties to even), as uint16 bits; src a contiguous
    1-D float32 array. NaN stays a (quiet) NaN, infinities stay infinite, and values past
    bfloat16's largest finite number round to infinity, as torch's conversion does."""
    bits = src.view(np.uint32)
    for i in range(bits.shape[0]):
        v = np.int64(bits[i])
        rounded = (v + 0x7FFF + ((v >> 16) & 1)) >> 16
        nan = (v & 0x7FFFFFFF) > 0x7F800000
        dst[i] = np.uint16(((v >> 16) | 0x40) if nan else rounded)


@njit(cache=True, nogil=True, inline="always")
def _hidden_bf16(x, w1, b1, w3, b3, order, s, n, k, lo, m, act, xw, ub, gb, hb, tmp, bits, h):
    """One chunk of an expert (pairs order[s:s + n], neurons [lo, lo + m)): h[s:s + n] =
    bf16(act(x w1_e^T + b1_e) (* (x w3_e^T + b3_e))), the inner values in float32 scratch
    (ub, gb, hb (n, m); tmp, bits the activation's scratch)."""
    for r in range(n):
        xw[r, :] = x[order[s + r] // k]
    gemm_bf16(xw[:n], w1[lo:lo + m].T, ub, 0.0)
    if b1.shape[0] > 0:
        for r in range(n):
            add_to(ub[r], b1[lo:lo + m])
    hflat = hb.reshape(-1)
    activate(ub.reshape(-1), hflat, act, tmp, bits)
    if w3.shape[0] > 0:
        gemm_bf16(xw[:n], w3[lo:lo + m].T, gb, 0.0)
        if b3.shape[0] > 0:
            for r in range(n):
                add_to(gb[r], b3[lo:lo + m])
        gflat = gb.reshape(-1)
        for c in range(n * m):
            hflat[c] *= gflat[c]
    round_bf16(hflat, h[s:s + n].reshape(-1))


def _c(dt, nd):
    return types.Array(dt, nd, "C")


_U16, _F32, _I64 = types.uint16, types.float32, types.int64
_W = types.Array(_U16, 2, "A")  # a weight: any layout (nn.Linear's C, Conv1D's .t(), w2.T)


# one explicit signature, weights of any layout: one compiled version (~50 s on two cores, then
# loaded from numba's cache) instead of one per combination of weight layouts
@njit(types.void(_c(_U16, 2), _W, _c(_F32, 1), _W, _c(_F32, 1), _W, _c(_F32, 1),
                 # x, w1, b1, w3, b3, w2t, gate
                 _c(_I64, 1), _c(_I64, 1), _I64, _c(_I64, 1), _c(_I64, 1), _I64,
                 # order, offsets, k, ptr, experts, act
                 _c(_U16, 2), _c(_U16, 2), _c(_F32, 2), _c(_U16, 3), _c(_F32, 3),
                 # y, h, acc, xs, ys
                 _c(_F32, 2), _c(_F32, 2), _c(_F32, 2), _c(_F32, 2), _c(types.int32, 2), _I64),
      # us, gs, hs, tmps, bits, chunk
      parallel=True, cache=True, nogil=True, error_model="numpy")
def fwd_tokens_bf16(x, w1, b1, w3, b3, w2t, gate, order, offsets, k, ptr, experts, act, y, h,
                    acc, xs, ys, us, gs, hs, tmps, bits, chunk):
    """y = the routed FFN of x, by token blocks (see the module's docstring).

    x (T, d), w1, w3, w2t (F, d) bf16 bits (uint16), the weights in any unit-stride layout
    (w3 (0, d) without GLU; w2t is w2 transposed); b1, b3 (F,) or (0,) and gate (T*K,) or (0,)
    (all ones) float32; order, offsets, ptr, experts the layout and worker plan
    (`numba_kernels.route`); act `numba_act.CODES`'s code; y (T, d) uint16 output; scratch:
    h (P, m) uint16, acc (T, d) float32, and per worker, rows = min(nmax, chunk): xs (W, rows,
    d) uint16, ys (W, rows, d) float32, us, hs (W, rows*m), gs (W, rows*m with GLU, else 0),
    tmps (W, rows*m or 0) float32, bits (W, rows*m or 0) int32.
    """
    ne = offsets.shape[0] - 1
    m = w1.shape[0] // ne
    nw = ptr.shape[0] - 1
    glu = w3.shape[0] > 0
    for w in prange(nw):
        for i in range(ptr[w], ptr[w + 1]):
            e = experts[i]
            step = even_step(offsets[e + 1] - offsets[e], chunk)
            for s in range(offsets[e], offsets[e + 1], step):
                n = min(step, offsets[e + 1] - s)
                ng = n if glu else 0
                ns = n * m if tmps.shape[1] > 0 else 0
                _hidden_bf16(x, w1, b1, w3, b3, order, s, n, k, e * m, m, act, xs[w],
                             us[w][:n * m].reshape((n, m)), gs[w][:ng * m].reshape((ng, m)),
                             hs[w][:n * m].reshape((n, m)), tmps[w][:ns], bits[w][:ns], h)
    t_all = y.shape[0]
    for w in prange(nw):
        tlo = w * t_all // nw
        thi = (w + 1) * t_all // nw
        out = acc[tlo:thi]
        out[:] = 0.0
        yw = ys[w]
        for i in range(ne):
            e = (i + w * ne // nw) % ne  # workers start on different experts
            a = first_at_least(order, offsets[e], offsets[e + 1], tlo * k)
            b = first_at_least(order, a, offsets[e + 1], thi * k)
            lo = e * m
            step = even_step(b - a, chunk)
            for q in range(a, b, step):
                n = min(step, b - q)
                gemm_bf16(h[q:q + n], w2t[lo:lo + m], yw[:n], 0.0)
                for r in range(n):
                    p = order[q + r]
                    if gate.shape[0] > 0:
                        add_scaled(acc[p // k], gate[p], yw[r])
                    else:
                        add_to(acc[p // k], yw[r])
        round_bf16(out.reshape(-1), y[tlo:thi].reshape(-1))
