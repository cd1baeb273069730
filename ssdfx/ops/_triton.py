"""The Triton kernels: the combine (`ssdfx.ops.cuda_kernels.gather_sum`), and the gathered
up-projection, hidden-unit gradient, weight gradients and zeroing of `ssdfx.ops.gathered`.
Loaded by `cuda_kernels.kernels()` only, once per mode (interpreted or compiled): this module
imports Triton at its top. tests/test_triton_compile.py compiles them for sm90 without a GPU.

Only Triton's builtins are called here (tl.load, tl.dot, tl.exp, ...), none of the helpers
that triton.language itself defines with @triton.jit (tl.sum, tl.zeros, tl.sigmoid, tl.cdiv):
those are decorated when Triton is first imported, and if that happened before
TRITON_INTERPRET=1 was set, the interpreter refuses to call them."""

import triton
import triton.language as tl


@triton.jit
def act(v, code: tl.constexpr):
    # the activations of ssdfx.activations on float32 values
    if code == 0:
        r = tl.maximum(v, 0.0)
    elif code == 1:
        r = tl.maximum(v, 0.0) * tl.maximum(v, 0.0)
    elif code == 2:
        r = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif code == 3:  # 0.5 (1 + tanh(z)) = sigmoid(2z)
        z = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        r = v / (1.0 + tl.exp(-2.0 * z))
    elif code == 4:
        r = v / (1.0 + tl.exp(-v))
    elif code == 5:
        r = v / (1.0 + tl.exp(-1.702 * v))
    else:
        r = v
    return r


@triton.jit
def act_grad(v, code: tl.constexpr):
    # d act / dv of `act`, on float32 values (ssdfx.activations.activation_backward)
    if code == 0:
        r = tl.where(v > 0.0, 1.0, 0.0)
    elif code == 1:
        r = 2.0 * tl.maximum(v, 0.0)
    elif code == 2:  # Phi(v) + v phi(v)
        r = (0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476))
             + v * 0.3989422804014327 * tl.exp(-0.5 * v * v))
    elif code == 3:
        z = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        th = 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0  # tanh(z)
        r = (0.5 * (1.0 + th)
             + 0.5 * v * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * v * v))
    elif code == 4:
        s = 1.0 / (1.0 + tl.exp(-v))
        r = s * (1.0 + v * (1.0 - s))
    elif code == 5:
        s = 1.0 / (1.0 + tl.exp(-1.702 * v))
        r = s * (1.0 + 1.702 * v * (1.0 - s))
    else:
        r = v * 0.0 + 1.0
    return r


@triton.jit
def kept(keep_ptr, pair, cols, m, in_out, scale):
    # inverted dropout's factor of each (pair, hidden unit): keep (T*K, m) bool in (token,
    # slot) order, so a layout row reads row order[r] of it; `scale` = 1 / (1 - p)
    keep = tl.load(keep_ptr + pair[:, None] * m + cols[None, :], mask=in_out, other=0)
    return keep.to(tl.float32) * scale


@triton.jit
def add(a, b):
    return a + b


@triton.jit
def has_tile(pid, tiles_ptr, m, E: tl.constexpr, BN: tl.constexpr):
    # whether program pid has a row tile: the launch has room for more than there are
    return pid // ((m + BN - 1) // BN) < tl.load(tiles_ptr + E)


@triton.jit
def layout_tile(pid, tiles_ptr, offsets_ptr, order_ptr, m, K: tl.constexpr, E: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr):
    """Program pid's (row tile, column tile), column tiles fastest: the row tile's expert e,
    its layout rows and which of them are e's, their pairs and tokens, and the hidden-unit
    columns and which are < m. tiles (E+1,) is the running count of row tiles per expert
    (ceil(n_e / BM))."""
    col_tiles = (m + BN - 1) // BN
    tile = pid // col_tiles
    e = 0  # the tile's expert: how many experts' tiles all come before it
    for i in tl.static_range(E):  # unrolled: E is a compile-time constant
        e += (tl.load(tiles_ptr + 1 + i) <= tile).to(tl.int32)
    start = tl.load(offsets_ptr + e) + (tile - tl.load(tiles_ptr + e)) * BM
    rows = start + tl.arange(0, BM)
    in_rows = rows < tl.load(offsets_ptr + e + 1)
    pair = tl.load(order_ptr + rows, mask=in_rows, other=0)
    cols = (pid % col_tiles) * BN + tl.arange(0, BN)
    return e, rows, in_rows, pair, pair // K, cols, cols < m


@triton.jit
def dot(a, b, acc, ieee: tl.constexpr, widen: tl.constexpr):
    if widen:  # the interpreter multiplies bf16 tiles wrongly: widen them first
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if ieee:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def gathered_up_kernel(x_ptr, order_ptr, offsets_ptr, tiles_ptr, w1_ptr, b1_ptr, w3_ptr,
                       b3_ptr, keep_ptr, a1_ptr, a3_ptr, h_ptr, d, m, sxt, sxd, s1f, s1d, s3f,
                       s3d, scale, K: tl.constexpr, E: tl.constexpr, KEEP: tl.constexpr,
                       ACT: tl.constexpr, GLU: tl.constexpr, HAS_B1: tl.constexpr,
                       HAS_B3: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    if has_tile(pid, tiles_ptr, m, E, BN):
        e, rows, in_rows, pair, tok, cols, in_cols = layout_tile(
            pid, tiles_ptr, offsets_ptr, order_ptr, m, K, E, BM, BN)
        neuron = e * m + cols  # rows of w1 and w3
        first = (e * m).to(tl.int64)  # the expert's first neuron: offsets past 2^31 in int64
        kr = tl.arange(0, BK)
        a_ptrs = x_ptr + tok[:, None] * sxt + kr[None, :] * sxd
        w1_ptrs = w1_ptr + first * s1f + cols[None, :] * s1f + kr[:, None] * s1d
        w3_ptrs = w3_ptr + first * s3f + cols[None, :] * s3f + kr[:, None] * s3d
        acc1 = tl.full((BM, BN), 0.0, tl.float32)
        acc3 = tl.full((BM, BN), 0.0, tl.float32)
        for k0 in range(0, d, BK):
            in_k = k0 + kr < d
            a = tl.load(a_ptrs, mask=in_rows[:, None] & in_k[None, :], other=0.0)
            w = tl.load(w1_ptrs, mask=in_k[:, None] & in_cols[None, :], other=0.0)
            acc1 = dot(a, w, acc1, IEEE, WIDEN)
            if GLU:
                w = tl.load(w3_ptrs, mask=in_k[:, None] & in_cols[None, :], other=0.0)
                acc3 = dot(a, w, acc3, IEEE, WIDEN)
                w3_ptrs += BK * s3d
            a_ptrs += BK * sxd  # pointer steps: no k * stride products that could overflow
            w1_ptrs += BK * s1d
        out = rows[:, None] * m + cols[None, :]
        in_out = in_rows[:, None] & in_cols[None, :]
        if HAS_B1:
            acc1 += tl.load(b1_ptr + neuron, mask=in_cols, other=0.0).to(tl.float32)[None, :]
        a1 = acc1.to(a1_ptr.dtype.element_ty)
        tl.store(a1_ptr + out, a1, mask=in_out)
        h = act(a1.to(tl.float32), ACT)
        if GLU:
            if HAS_B3:
                acc3 += tl.load(b3_ptr + neuron, mask=in_cols,
                                other=0.0).to(tl.float32)[None, :]
            a3 = acc3.to(a3_ptr.dtype.element_ty)
            tl.store(a3_ptr + out, a3, mask=in_out)
            h = h * a3.to(tl.float32)
        if KEEP:
            h = h * kept(keep_ptr, pair, cols, m, in_out, scale)
        tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=in_out)


@triton.jit
def gathered_dh_kernel(dy_ptr, order_ptr, offsets_ptr, tiles_ptr, w2_ptr, a1_ptr, a3_ptr,
                       gate_ptr, keep_ptr, dg_ptr, gh_ptr, da1_ptr, da3_ptr, d, m, syt, syd, s2d,
                       s2f, scale, K: tl.constexpr, E: tl.constexpr, KEEP: tl.constexpr,
                       ACT: tl.constexpr, GLU: tl.constexpr,
                       IEEE: tl.constexpr, WIDEN: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, BK: tl.constexpr):
    # the backward's dh = dy[token] w2_e (gathered rows, one expert per row tile), then the
    # elementwise backward of `layout.hidden_backward` on the tile: dgate (row sums of
    # dh * h, added atomically in float32 over the column tiles), gh = gate h, da1, da3; with
    # KEEP, h and dh carry the dropout mask's factor as there
    pid = tl.program_id(0)
    if has_tile(pid, tiles_ptr, m, E, BN):
        e, rows, in_rows, pair, tok, cols, in_cols = layout_tile(
            pid, tiles_ptr, offsets_ptr, order_ptr, m, K, E, BM, BN)
        kr = tl.arange(0, BK)
        a_ptrs = dy_ptr + tok[:, None] * syt + kr[None, :] * syd
        w_ptrs = (w2_ptr + (e * m).to(tl.int64) * s2f + cols[None, :] * s2f
                  + kr[:, None] * s2d)  # w2's columns of expert e
        acc = tl.full((BM, BN), 0.0, tl.float32)
        for k0 in range(0, d, BK):
            in_k = k0 + kr < d
            a = tl.load(a_ptrs, mask=in_rows[:, None] & in_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=in_k[:, None] & in_cols[None, :], other=0.0)
            acc = dot(a, w, acc, IEEE, WIDEN)
            a_ptrs += BK * syd
            w_ptrs += BK * s2d
        out = rows[:, None] * m + cols[None, :]
        in_out = in_rows[:, None] & in_cols[None, :]
        a1 = tl.load(a1_ptr + out, mask=in_out, other=0.0).to(tl.float32)
        f = act(a1, ACT)
        if GLU:
            a3 = tl.load(a3_ptr + out, mask=in_out, other=0.0).to(tl.float32)
            h = f * a3
        else:
            h = f
        if KEEP:
            ks = kept(keep_ptr, pair, cols, m, in_out, scale)
            h = h * ks
        h = tl.where(in_out, h, 0.0)
        tl.atomic_add(dg_ptr + rows, tl.reduce(acc * h, 1, add), mask=in_rows)
        g = tl.load(gate_ptr + pair, mask=in_rows, other=0.0).to(tl.float32)[:, None]
        tl.store(gh_ptr + out, (h * g).to(gh_ptr.dtype.element_ty), mask=in_out)
        dh = acc * g
        if KEEP:
            dh = dh * ks
        if GLU:
            tl.store(da3_ptr + out, (dh * f).to(da3_ptr.dtype.element_ty), mask=in_out)
            dh = dh * a3
        tl.store(da1_ptr + out, (dh * act_grad(a1, ACT)).to(da1_ptr.dtype.element_ty),
                 mask=in_out)


@triton.jit
def gathered_wgrad_kernel(src_ptr, order_ptr, offsets_ptr, h_ptr, out_ptr, d, m, sst, ssd,
                          so_d, so_f, K: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr,
                          BD: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr):
    # a weight gradient straight into the weight's layout: for expert e = program_id(1),
    # out[i, e*m + j] (through the strides so_d of i and so_f of the neuron e*m + j)
    # = sum over e's layout rows r of src[order[r] // K, i] * h[r, j]; src's rows are read
    # through the layout, h (T*K, m) in layout order. An expert without rows gets zeros.
    pid = tl.program_id(0)
    e = tl.program_id(1)
    m_tiles = (m + BM - 1) // BM
    dcols = (pid // m_tiles) * BD + tl.arange(0, BD)
    mcols = (pid % m_tiles) * BM + tl.arange(0, BM)
    in_d = dcols < d
    in_m = mcols < m
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.full((BD, BM), 0.0, tl.float32)
    rows = start + tl.arange(0, BR)
    tok = tl.load(order_ptr + rows, mask=rows < end, other=0) // K
    for r0 in range(start, end, BR):
        in_r = rows < end
        a = tl.load(src_ptr + tok[None, :] * sst + dcols[:, None] * ssd,
                    mask=in_d[:, None] & in_r[None, :], other=0.0)
        b = tl.load(h_ptr + rows[:, None] * m + mcols[None, :],
                    mask=in_r[:, None] & in_m[None, :], other=0.0)
        acc = dot(a, b, acc, IEEE, WIDEN)
        rows += BR  # the next rows' tokens, loaded a step ahead
        tok = tl.load(order_ptr + rows, mask=rows < end, other=0) // K
    neuron = (e * m + mcols).to(tl.int64)  # a weight may hold more than 2^31 values
    tl.store(out_ptr + dcols[:, None].to(tl.int64) * so_d + neuron[None, :] * so_f,
             acc.to(out_ptr.dtype.element_ty), mask=in_d[:, None] & in_m[None, :])


@triton.jit
def zero_empty_kernel(out_ptr, offsets_ptr, n, BLOCK: tl.constexpr):
    # out (E, n): zeros in the blocks of experts without rows (offsets[e] == offsets[e+1]),
    # the others untouched; program (e, j) takes every grid-th BLOCK of expert e's block
    e = tl.program_id(0)
    if tl.load(offsets_ptr + e + 1) == tl.load(offsets_ptr + e):
        zero = tl.full([BLOCK], 0.0, tl.float32).to(out_ptr.dtype.element_ty)
        base = out_ptr + e.to(tl.int64) * n
        for s in range(tl.program_id(1) * BLOCK, n, tl.num_programs(1) * BLOCK):
            i = s + tl.arange(0, BLOCK)
            tl.store(base + i, zero, mask=i < n)


@triton.jit
def gather_sum_kernel(rows_ptr, inv_ptr, n_rows_ptr, gate_ptr, out_ptr, d,
                      k: tl.constexpr, has_gate: tl.constexpr, block_d: tl.constexpr):
    # rows (R, d) in layout order, of which the first n_rows = *n_rows_ptr are real;
    # inv (T*K,) layout row of each (token, slot), >= n_rows for an unused slot;
    # out (T, d) = sum over the token's K rows, accumulated in fp32. n_rows is read from
    # device memory so the caller never waits for the GPU to learn it.
    t = tl.program_id(0)
    n_rows = tl.load(n_rows_ptr)
    cols = tl.program_id(1) * block_d + tl.arange(0, block_d)
    in_row = cols < d
    acc = tl.full([block_d], 0.0, tl.float32)
    for j in tl.static_range(k):
        r = tl.load(inv_ptr + t * k + j).to(tl.int64)
        # the row test as a vector: the interpreter mishandles a vector mask & a scalar one
        v = tl.load(rows_ptr + r * d + cols, mask=in_row & (cols * 0 + r < n_rows), other=0.0)
        v = v.to(tl.float32)
        if has_gate:  # gate (T*K,): y = sum_j gate[t, j] * row
            v = v * tl.load(gate_ptr + t * k + j).to(tl.float32)
        acc += v
    tl.store(out_ptr + t.to(tl.int64) * d + cols, acc.to(out_ptr.dtype.element_ty),
             mask=in_row)
