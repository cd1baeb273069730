"""numba CPU kernels of the routed-expert FFN in bfloat16: inference (`cpu_numba.infer_bf16`)
and training (`cpu_numba.forward_bf16`, `backward_bf16`).

numba has no bfloat16 type: bf16 tensors come in and go out as uint16 arrays of their bits, and
every product runs in MKL's `cblas_gemm_bf16bf16f32` (`blas.gemm_bf16`: bf16 inputs, float32
output; AMX on the Intel Xeon, where one core ran an expert's 512 x 768 x 192 projection at
730 GFLOP/s against 145 for float32; AVX-512-BF16 on the AMD Zen 5 with MKL's Intel code
paths, 389 against 187). The forward is `numba_kernels.fwd_tokens`'s, by token blocks
(shape legend there):

1. workers by expert, an expert's rows in chunks (`numba_kernels.even_step`): gather the
   tokens' bf16 rows, up-projection(s) into float32, bias (training: the pre-activations
   rounded to bf16 and saved in pair order, the layout every backend shares), activation
   (`numba_act`, float32), GLU product, dropout's scale, then the hidden units rounded once
   to bf16 into h (P, m) in pair order;
2. workers by token block (`numba_kernels.token_sum`'s scheme: each worker owns a block of
   tokens, runs every expert's down-projection on its pairs and adds the float32 rows into its
   own tokens' float32 accumulator), then rounds its block to bf16 once.

The backward (`bwd_bf16`) is `numba_kernels.bwd`'s by token blocks: workers by expert compute
the hidden units' gradient, the activation's derivative, the gate's gradient and the weight
gradients (float32 accumulators over an expert's chunks, rounded once per expert), then workers
by token block sum each token's input-gradient rows.

Rounding: the hidden units and the output are rounded to bf16 once each; the up-projection,
bias and activation stay in float32 in between (torch's bf16 FFN rounds after the
up-projection, after the bias and after the activation too, and sums the K expert outputs in
bf16), so the results are at least as close to the exact value as the torch path's. The
backward likewise rounds only what a bf16 product takes as input (da1, da3 and gate * h) and
each gradient once.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types

from ssdfx.ops.blas import gemm_bf16
from ssdfx.ops.numba_act import activate, activate_grad
from ssdfx.ops.numba_kernels import add_to, bf16_bits, even_step, token_sum

__all__ = ["bwd_bf16", "fwd_tokens_bf16", "round_bf16", "widen_bf16"]


@njit(cache=True, nogil=True, inline="always")
def round_bf16(src, dst):
    """dst = src rounded to bfloat16 (nearest, ties to even), as uint16 bits; src a contiguous
    1-D float32 array. NaN stays a (quiet) NaN, infinities stay infinite, and values past
    bfloat16's largest finite number round to infinity, as torch's conversion does."""
    bits = src.view(np.uint32)
    for i in range(bits.shape[0]):
        dst[i] = bf16_bits(bits[i])


@njit(cache=True, nogil=True, inline="always")
def widen_bf16(src, dst):
    """dst = src for bfloat16 bits src (uint16, 1-D) into float32 dst (contiguous 1-D): exact."""
    out = dst.view(np.uint32)
    for i in range(src.shape[0]):
        out[i] = np.uint32(src[i]) << np.uint32(16)


@njit(cache=True, nogil=True, inline="always")
def _hidden_bf16(x, w1, b1, w3, b3, order, s, n, k, lo, m, act, xw, ub, gb, hb, tmp, bits, h,
                 a1s, a3s, ks):
    """One chunk of an expert (pairs order[s:s + n], neurons [lo, lo + m)): h[s:s + n] =
    bf16(act(x w1_e^T + b1_e) (* (x w3_e^T + b3_e)) (* ks)), the inner values in float32
    scratch (ub, gb, hb (n, m); tmp, bits the activation's scratch). Training (a1s has rows):
    the pre-activations rounded to bf16 into a1s[s:s + n] (and a3s) for the backward; ks (P, m)
    float32 the dropout's keep / (1 - p) in pair order, or (0, m)."""
    for r in range(n):
        xw[r, :] = x[order[s + r] // k]
    gemm_bf16(xw[:n], w1[lo:lo + m].T, ub, 0.0)
    if b1.shape[0] > 0:
        for r in range(n):
            add_to(ub[r], b1[lo:lo + m])
    save = a1s.shape[0] > 0
    if save:
        round_bf16(ub.reshape(-1), a1s[s:s + n].reshape(-1))
    hflat = hb.reshape(-1)
    activate(ub.reshape(-1), hflat, act, tmp, bits)
    if w3.shape[0] > 0:
        gemm_bf16(xw[:n], w3[lo:lo + m].T, gb, 0.0)
        if b3.shape[0] > 0:
            for r in range(n):
                add_to(gb[r], b3[lo:lo + m])
        if save:
            round_bf16(gb.reshape(-1), a3s[s:s + n].reshape(-1))
        gflat = gb.reshape(-1)
        for c in range(n * m):
            hflat[c] *= gflat[c]
    if ks.shape[0] > 0:
        kflat = ks[s:s + n].reshape(-1)
        for c in range(n * m):
            hflat[c] *= kflat[c]
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
                 _c(_U16, 2), _c(_U16, 2), _c(_F32, 2), _c(_U16, 2), _c(_U16, 2), _c(_F32, 2),
                 _c(_U16, 3), _c(_F32, 3),
                 # a1s, a3s, ks, y, h, acc, xs, ys
                 _c(_F32, 2), _c(_F32, 2), _c(_F32, 2), _c(_F32, 2), _c(types.int32, 2), _I64),
      # us, gs, hs, tmps, bits, chunk
      parallel=True, cache=True, nogil=True, error_model="numpy")
def fwd_tokens_bf16(x, w1, b1, w3, b3, w2t, gate, order, offsets, k, ptr, experts, act, a1s,
                    a3s, ks, y, h, acc, xs, ys, us, gs, hs, tmps, bits, chunk):
    """y = the routed FFN of x, by token blocks (see the module's docstring).

    x (T, d), w1, w3, w2t (F, d) bf16 bits (uint16), the weights in any unit-stride layout
    (w3 (0, d) without GLU; w2t is w2 transposed); b1, b3 (F,) or (0,) and gate (T*K,) or (0,)
    (all ones) float32; order, offsets, ptr, experts the layout and worker plan
    (`numba_kernels.route`); act `numba_act.CODES`'s code; a1s, a3s (P, m) uint16 outputs,
    the pre-activations saved for the training backward in pair order, or (0, m) (inference;
    a3s (0, m) without GLU); ks (P, m) float32 the dropout's keep / (1 - p) in pair order, or
    (0, m); y (T, d) uint16 output; scratch:
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
                             hs[w][:n * m].reshape((n, m)), tmps[w][:ns], bits[w][:ns], h,
                             a1s, a3s, ks)
    t_all = y.shape[0]
    for w in prange(nw):
        token_sum(h, w2t, h[:0], w2t[:0], gate, order, offsets, k, w, nw, acc, ys[w], chunk)
        block = slice(w * t_all // nw, (w + 1) * t_all // nw)
        round_bf16(acc[block].reshape(-1), y[block].reshape(-1))


@njit(cache=True, nogil=True, inline="always")
def _store_bf16(src, flat, base, rs, cs):
    """A gradient's block rounded once from src (r, c) float32 (contiguous): element (i, j) goes
    to flat[base + i rs + j cs], flat the gradient's storage (bf16 bits, 1-D). With cs = 1
    (nn.Linear's layout) each row is a contiguous slice: 0.19 ns per element, against 0.83
    through an any-layout 2-D view, which LLVM does not vectorise."""
    if cs == 1:
        for i in range(src.shape[0]):
            round_bf16(src[i], flat[base + i * rs:base + i * rs + src.shape[1]])
    else:
        bits = src.view(np.uint32)
        for i in range(src.shape[0]):
            for j in range(src.shape[1]):
                flat[base + i * rs + j * cs] = bf16_bits(bits[i, j])


@njit(cache=True, nogil=True, inline="always")
def _delta_bf16(dy, w2, a1, a3, gate, ks, order, s, n, k, lo, m, act, dw, dh, f, fd, a1f, a3f,
                da3f, tmp, bits, dgate, db1, db3):
    """One chunk of an expert's backward up to its weight gradients, in float32 from bf16
    inputs (`numba_kernels.expert_delta`'s formulas):

        dh_raw = dy_t w2_e (bf16 GEMM, dy's rows gathered into dw)
        f, f' = act(a1), act'(a1) from the saved bf16 pre-activations
        h = f (* a3) (* ks);  dgate = <dh_raw, h>;  dL/dh = gate dh_raw (* ks)
        da1 = dL/dh (* a3) f';  da3 = dL/dh f;  gh = gate h
        db1, db3 += the column sums of da1, da3 (float32)

    ks (P, m) float32 the dropout's keep / (1 - p) in pair order, or (0, m); dh, f, fd, a1f,
    a3f, da3f: (n*m,) float32 scratch (a3f, da3f (0,) without GLU; a1f apart from fd:
    activate_grad in place ran unvectorised, see `numba_act.activate`); on return f holds gh
    and fd holds da1. Row by row over 1-D rows, each loop over at most five arrays: one loop
    over the flat block, with seven, ran unvectorised (1.1 ns per element)."""
    glu = a3.shape[0] > 0
    drop = ks.shape[0] > 0
    for r in range(n):
        dw[r, :] = dy[order[s + r] // k]
    gemm_bf16(dw[:n], w2[:, lo:lo + m], dh.reshape((n, m)), 0.0)
    widen_bf16(a1[s:s + n].reshape(-1), a1f)
    activate_grad(a1f, f, fd, act, tmp, bits)
    if glu:
        widen_bf16(a3[s:s + n].reshape(-1), a3f)
    for r in range(n):
        g = gate[order[s + r]] if gate.shape[0] > 0 else np.float32(1.0)
        dhr, fr, fdr = dh[r * m:(r + 1) * m], f[r * m:(r + 1) * m], fd[r * m:(r + 1) * m]
        acc = np.float32(0.0)
        if glu or drop:
            a3r = a3f[r * m:(r + 1) * m] if glu else a3f
            d3r = da3f[r * m:(r + 1) * m] if glu else da3f
            ksr = ks[s + r] if drop else ks[0:0].reshape(-1)
            for c in range(m):
                hv = fr[c]
                dl = g * dhr[c]
                if drop:
                    hv *= ksr[c]
                    dl *= ksr[c]
                if glu:
                    d3r[c] = dl * fr[c]
                    dl *= a3r[c]
                    hv *= a3r[c]
                acc += dhr[c] * hv
                fdr[c] = dl * fdr[c]
                fr[c] = g * hv
            if glu:
                add_to(db3[lo:lo + m], d3r)
        else:
            for c in range(m):
                acc += dhr[c] * fr[c]
                fdr[c] = g * dhr[c] * fdr[c]
            if gate.shape[0] > 0:
                for c in range(m):
                    fr[c] *= g
        add_to(db1[lo:lo + m], fdr)
        dgate[s + r] = acc


# one explicit signature, weights and weight gradients of any layout (see fwd_tokens_bf16)
@njit(types.void(_c(_U16, 2), _c(_U16, 2), _W, _W, _W, _c(_U16, 2), _c(_U16, 2), _c(_F32, 1),
                 _c(_F32, 2),
                 # x, dy, w1, w2, w3, a1, a3, gate, ks
                 _c(_I64, 1), _c(_I64, 1), _I64, _c(_I64, 1), _c(_I64, 1), _I64,
                 # order, offsets, k, ptr, experts, act
                 _c(_U16, 1), _c(_U16, 1), _c(_U16, 1), _c(_I64, 2), _c(_F32, 1), _c(_F32, 1),
                 _c(_F32, 1), _c(_U16, 2),
                 # dw1, dw2, dw3, gst, db1, db3, dgate, dx
                 _c(_U16, 2), _c(_U16, 2), _c(_F32, 2), _c(_U16, 3), _c(_U16, 3), _c(_F32, 3),
                 # da1h, da3h, acc, xs, ds, ys
                 _c(_F32, 3), _c(_F32, 3), _c(_F32, 3), _c(_F32, 3), _c(_U16, 2),
                 # gw1, gw2, gw3, blocks, ghh
                 _c(_F32, 2), _c(types.int32, 2), _I64),
      # tmps, bits, chunk
      parallel=True, cache=True, nogil=True, error_model="numpy",
      fastmath={"reassoc", "contract", "nsz"})
def bwd_bf16(x, dy, w1, w2, w3, a1, a3, gate, ks, order, offsets, k, ptr, experts, act,
             dw1, dw2, dw3, gst, db1, db3, dgate, dx, da1h, da3h, acc, xs, ds, ys,
             gw1, gw2, gw3, blocks, ghh, tmps, bits, chunk):
    """Every gradient of the bf16 routed FFN in one call, in `numba_kernels.bwd`'s two
    phases: workers by expert run `_delta_bf16` and the weight
    gradients (bf16 GEMMs into float32 accumulators over an expert's chunks of rows, rounded
    to bf16 once per expert); then workers by token block sum each token's input-gradient rows
    da1 w1_e (+ da3 w3_e) in float32 and round them once.

    x, dy (T, d), w1, w3 (F, d), w2 (d, F) bf16 bits, weights in any unit-stride layout (w3
    (0, d) without GLU); a1, a3 (P, m) the saved bf16 pre-activations in pair order (a3 (0, m)
    without GLU); gate (T*K,) float32 or (0,) for all ones; ks (P, m) float32 the dropout's
    keep / (1 - p) in pair order, or (0, m); order, offsets, ptr, experts the layout and
    worker plan; act `numba_act.CODES`'s code. Outputs: dw1, dw3 (F, d), dw2 (d, F) bf16 bits
    in any dense layout, each given as its storage (1-D) and its two strides in gst (3, 2)
    (rows dw1, dw2, dw3; dw3 (0,) without GLU); db1, db3 (F,) float32 (db3 (0,) without GLU);
    dgate (P,) float32 in pair order; dx (T, d) bf16 bits. Scratch: da1h, da3h (P, m) bf16
    (da3h (0, m) without GLU) the rounded da1, da3 that the weight and input gradients
    multiply; acc (T, d) float32; per worker, rows = min(nmax, chunk): xs, ds (W, rows, d)
    bf16, ys (W, rows, d) float32; gw1, gw3 (W, m, d) and gw2 (W, d, m) float32 (gw3 (W, 0, d)
    without GLU); blocks (W, 6, rows*m) float32 (`_delta_bf16`'s dh, f, fd, a1f, a3f, da3f);
    ghh (W, rows*m) bf16; tmps, bits (W, rows*m or 0) the activation's.

    Rounding: the products' inputs are bf16 (dy, x, the weights, and da1, da3, gate * h rounded
    once each); everything in between, the bias gradients and the accumulations over tokens
    are float32, and each gradient is rounded to bf16 once at the end (the torch path rounds
    after every op).
    """
    ne = offsets.shape[0] - 1
    m = w1.shape[0] // ne
    nw = ptr.shape[0] - 1
    glu = w3.shape[0] > 0
    for w in prange(nw):
        for i in range(ptr[w], ptr[w + 1]):
            e = experts[i]
            lo = e * m
            db1[lo:lo + m] = 0.0
            if glu:
                db3[lo:lo + m] = 0.0
            if offsets[e + 1] == offsets[e]:  # an expert nobody chose: exactly zero
                gw1[w][:] = 0.0
                gw2[w][:] = 0.0
                gw3[w][:] = 0.0
            step = even_step(offsets[e + 1] - offsets[e], chunk)
            for s in range(offsets[e], offsets[e + 1], step):
                n = min(step, offsets[e + 1] - s)
                nm = n * m
                ng = nm if glu else 0
                ns = nm if tmps.shape[1] > 0 else 0
                blk = blocks[w]  # dh, f (then gh), fd (then da1), a1f, a3f, da3f
                _delta_bf16(dy, w2, a1, a3, gate, ks, order, s, n, k, lo, m, act, ds[w],
                            blk[0][:nm], blk[1][:nm], blk[2][:nm], blk[3][:nm], blk[4][:ng],
                            blk[5][:ng], tmps[w][:ns], bits[w][:ns], dgate, db1, db3)
                round_bf16(blk[2][:nm], da1h[s:s + n].reshape(-1))
                if glu:
                    round_bf16(blk[5][:ng], da3h[s:s + n].reshape(-1))
                gh = ghh[w][:nm]
                round_bf16(blk[1][:nm], gh)
                for r in range(n):
                    xs[w][r, :] = x[order[s + r] // k]
                beta = 0.0 if s == offsets[e] else 1.0
                gemm_bf16(ds[w][:n].T, gh.reshape((n, m)), gw2[w], beta)  # (d, m)
                gemm_bf16(da1h[s:s + n].T, xs[w][:n], gw1[w], beta)  # (m, d)
                if glu:
                    gemm_bf16(da3h[s:s + n].T, xs[w][:n], gw3[w], beta)
            _store_bf16(gw2[w], dw2, lo * gst[1, 1], gst[1, 0], gst[1, 1])  # [:, lo:lo + m]
            _store_bf16(gw1[w], dw1, lo * gst[0, 0], gst[0, 0], gst[0, 1])  # [lo:lo + m]
            if glu:
                _store_bf16(gw3[w], dw3, lo * gst[2, 0], gst[2, 0], gst[2, 1])
    t_all = dx.shape[0]
    for w in prange(nw):
        token_sum(da1h, w1, da3h, w3, gate[:0], order, offsets, k, w, nw, acc, ys[w], chunk)
        block = slice(w * t_all // nw, (w + 1) * t_all // nw)
        round_bf16(acc[block].reshape(-1), dx[block].reshape(-1))
