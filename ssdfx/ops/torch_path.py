"""Sort-by-expert kernels in plain torch ops, one GEMM call per expert: the bf16/fp16 CPU path.

Same algorithm as the numba kernels, expressed in torch ops so that it runs on any device and
dtype: gather the pairs' token rows once in expert order, run each expert's GEMMs on its
contiguous block with `torch.mm(..., out=block)` (row slices of one buffer: nothing is
concatenated, and no slice-backward zero-fill ever happens, the backward being written by
hand), and combine. The gate is folded into h before the down-projection (h has m columns,
y rows have d; skipped on CPU where every gate is exactly 1.0, as the router's are in the
forward pass), and the combine sums each token's K rows straight from the expert-ordered
output: on CPU K gathers and K-1 adds in slot order (`layout.sum_slots`), or `index_add_`
(sequential per row, deterministic) where dynamic-k leaves slots unused; the Triton kernel on
CUDA. bf16/fp16 rows add up in float32 and round once (`layout.sum_dtype`), except in the
blocked CPU forward below (see there).

On CPU the gathers, the down-projection and the whole backward run one expert's row block at
a time instead, so no (P, d) buffer exists: a fresh 25 MB buffer (T=2048, d=768, K=8, bf16) is
mapped anew by glibc on every call and page-faults on first touch, which cost 14 of 32 ms of
the forward there (measured: 18 ms with the faults suppressed through MALLOC_MMAP_THRESHOLD_;
the per-expert blocks are small enough to be reused from the heap).

Small CPU problems take `ssdfx.ops.padded` instead (one bmm per projection over padded
expert blocks), where per-call overhead, not GEMM work, dominated.

On CPU in bf16/fp16 every GEMM whose size follows an expert's row count takes a rounded count
(`layout.gemm_rows`): oneDNN compiles a kernel for each new shape (6.5-8.7 ms here), and with
exact counts fresh routing kept meeting new ones. The forward's GEMMs run on rows [s, u) of the
layout buffers, u - s = gemm_rows(t - s) >= t - s: the extra rows are the next expert's (it
overwrites them afterwards) or rows past P, and nothing reads their outputs. The backward's
weight gradients contract over the rows, so there each expert's rows are copied into
zero-padded blocks (`_backward_blocks`, which the bf16 backward always takes).

On CUDA the default is `ssdfx.ops.grouped` (one grouped GEMM per projection, no host sync);
this backend reads the expert offsets back to the host to loop over experts.
"""

from __future__ import annotations

import torch

from ssdfx.ops import cpu_numba, padded
from ssdfx.ops.layout import (add_rows, cols_grad, expert_views, gemm_rows, hidden,
                              hidden_backward, rounds_rows, rows_grad, sort_pairs, sum_dtype,
                              sum_slots, unit_gates)

__all__ = ["backward", "forward"]

# CPU: above this size of a (P, d) buffer, work in per-expert blocks instead (module docstring);
# below it the per-expert call overhead of the blocked backward costs more than the faults
BLOCKS_FROM_BYTES = 4 << 20


def _blocked(x: torch.Tensor, pairs: int) -> bool:
    return x.device.type == "cpu" and pairs * x.shape[1] * x.element_size() >= BLOCKS_FROM_BYTES


def _expert_views(w1, w2, w3, num_experts):
    """Per-expert weight views (no copy when the strides allow, as for Linear and Conv1D):
    w1_e^T (E, d, m), w3_e^T, w2_e^T (E, m, d) and w2_e (E, d, m)."""
    w1e, w3e, w2_edm = expert_views(w1, w2, w3, num_experts)
    w3t = w3e.transpose(1, 2) if w3e is not None else None
    return w1e.transpose(1, 2), w3t, w2_edm.transpose(1, 2), w2_edm


def _acc_dtype(x: torch.Tensor, k: int) -> torch.dtype:
    """The dtype of a (T, d) sum of each token's K rows: with one row a token it is that row
    exactly, in x's dtype, else `sum_dtype`."""
    return x.dtype if k == 1 else sum_dtype(x.dtype)


def _add_expert_rows(acc: torch.Tensor, rows: torch.Tensor, tok: torch.Tensor) -> None:
    """acc[tok[i]] += rows[i] (one expert's rows: distinct tokens), acc in `_acc_dtype`; bf16
    rows on CPU through numba (`cpu_numba.add_rows_bf16`), without a float32 copy of them."""
    if rows.dtype == acc.dtype:
        acc.index_add_(0, tok, rows)
    elif rows.dtype == torch.bfloat16 and rows.device.type == "cpu":
        cpu_numba.add_rows_bf16(acc, rows, tok)
    else:
        acc.index_add_(0, tok, rows.to(acc.dtype))


def _inverse(order: torch.Tensor, pairs: int) -> torch.Tensor:
    """inv (T*K,): the layout row of each pair; unused slots point at row P (no row)."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device).clamp_(max=pairs)
    return inv


def _per_slot(rows: torch.Tensor, inv: torch.Tensor, t_all: int, k: int) -> torch.Tensor:
    """rows (P, c) in layout order -> (T, K, c) in (token, slot) order, zeros for unused slots."""
    if rows.shape[0] < t_all * k:  # dynamic-k: unused slots read an appended zero row
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    return rows.index_select(0, inv).view(t_all, k, rows.shape[1])


def _dgate(dg: torch.Tensor, inv: torch.Tensor, t_all: int, k: int) -> torch.Tensor:
    """dg (P,) in layout order -> dgate (T, K), zero for unused slots (inv: `_inverse`)."""
    return _per_slot(dg.unsqueeze(1), inv, t_all, k).view(t_all, k)


def _combine(rows: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, t_all: int,
             k: int) -> torch.Tensor:
    """(T, d): each token's sum of its K rows of `rows` (P, d, layout order)."""
    full = rows.shape[0] == t_all * k  # every slot holds a pair (no dynamic-k gaps)
    if full and (k == 1 or rows.device.type == "cpu"):
        return sum_slots(rows, inv.view(t_all, k))
    if rows.device.type == "cuda":
        from ssdfx.ops import cuda_kernels

        if cuda_kernels.available():
            return cuda_kernels.gather_sum(rows, inv, t_all, k)  # fp32 accumulation
        per_slot = _per_slot(rows, inv, t_all, k)  # (T, K, d)
        return per_slot[:, 0] if k == 1 else per_slot.sum(1)  # fp32 accumulation
    # CPU with unused slots: index_add_ (sequential per row, deterministic; 4x faster than a
    # gather + sum over K in bf16 at T=2048, d=768, K=4)
    return add_rows(rows, order[:rows.shape[0]] // k, t_all).to(rows.dtype)


def _pad_rows(a: torch.Tensor, rows: int) -> torch.Tensor:
    """a (n, ...) with zero rows appended up to `rows` (a itself when it has them): the saved
    layout's T*K rows, an index of R >= P layout rows, an expert's rounded GEMM block."""
    if a.shape[0] == rows:
        return a
    return torch.cat([a, a.new_zeros((rows - a.shape[0], *a.shape[1:]))])


def _spans(bounds, rounded=False):
    """(e, s, t, u) for every expert with rows: its block is layout rows [s, t), and its GEMMs
    with a row count that varies take rows [s, u): u = t, or with `rounded` (`rounds_rows`)
    s + gemm_rows(t - s), rows of the next experts or past P that the GEMM computes and
    nothing reads (forward), or zero rows (the blocked backward's per-expert copies)."""
    return [(e, s, t, s + gemm_rows(t - s) if rounded else t)
            for e, (s, t) in enumerate(zip(bounds[:-1], bounds[1:])) if s < t]


def _extent(spans, pairs):
    """Rows a buffer in layout order needs for these spans' GEMMs: P, or more where the last
    expert's rounded block runs past it."""
    return max([pairs] + [u for *_, u in spans])


def _mm_into(out, a, b, bias, e):
    """out = a @ b, plus expert e's slice of `bias` if given (one addmm: no second pass)."""
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        n = b.shape[1]
        torch.addmm(bias[e * n:(e + 1) * n], a, b, out=out)


def _mm(a, b_e, spans, bias=None):
    """(R, N): each expert block a[s:u] (rows of the layout) times b_e[e] (E, K, N) [+ bias].

    The experts run in layout order, so where a rounded block [s, u) overlaps the next
    expert's rows, that expert overwrites them afterwards."""
    out = a.new_empty(a.shape[0], b_e.shape[2])
    for e, s, _, u in spans:
        _mm_into(out[s:u], a[s:u], b_e[e], bias, e)
    return out


def _gated(h: torch.Tensor, gate: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """h (P, m) times each pair's gate; h itself where `unit_gates`. Never in place: h may be
    a1."""
    if unit_gates(gate):
        return h
    return h * gate.reshape(-1)[sel].unsqueeze(1)


def forward(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts, activation, dropout_p):
    t_all, d = x.shape
    k = expert_idx.shape[1]
    m = w1.shape[0] // num_experts
    if x.device.type == "cpu":
        # numba's counting sort, the same order as sort_pairs' stable argsort (233 us of a
        # 2.6 ms bf16 forward at T=2048, d=256, E=16, k=4 on fresh data; this ~20 us)
        order, offsets = cpu_numba.sort_pairs(expert_idx, num_experts)
    else:
        order, offsets = sort_pairs(expert_idx, num_experts)
    bounds = offsets.tolist()  # the one host sync: shapes depend on P
    pairs = bounds[-1]
    if padded.use(x, bounds):  # small CPU problem: one bmm per projection (ssdfx.ops.padded)
        y, a1, a3 = padded.forward(x, w1, b1, w2, w3, b3, order, offsets, bounds, gate, keep,
                                   num_experts, activation, dropout_p)
        return _outputs(y, a1, a3, order, offsets, t_all * k)
    w1t, w3t, w2t, _ = _expert_views(w1, w2, w3, num_experts)
    spans = _spans(bounds, rounds_rows(x))
    rows = _extent(spans, pairs)  # R >= P rows in the buffers below (rounded GEMM blocks)
    sel = _pad_rows(order[:pairs], rows)  # rows past P gather pair 0's (never read back)
    tok = sel // k
    blocks = _blocked(x, pairs)
    if blocks:  # per-expert row blocks: no (P, d) buffer (see the module docstring)
        a1 = x.new_empty(rows, m)
        a3 = x.new_empty(rows, m) if w3 is not None else None
        for e, s, _, u in spans:
            xe = x.index_select(0, tok[s:u])  # (u - s, d)
            _mm_into(a1[s:u], xe, w1t[e], b1, e)
            if a3 is not None:
                _mm_into(a3[s:u], xe, w3t[e], b3, e)
    else:
        xs = x.index_select(0, tok)  # (R, d)
        a1 = _mm(xs, w1t, spans, b1)  # (R, m)
        a3 = _mm(xs, w3t, spans, b3) if w3 is not None else None
    kp = keep.reshape(t_all * k, m)[sel] if keep is not None else None
    gh = _gated(hidden(a1, a3, kp, dropout_p, activation), gate, sel)  # (R, m)
    if blocks:
        # index_add_ one expert at a time (no (P, d) buffer); with one row per token, each
        # row is written once instead
        once = k == 1 and pairs == t_all
        # in x's dtype, unlike every other sum of K rows (`layout.sum_dtype`): a float32 sum
        # here, in torch or numba (`_add_expert_rows`), made the bf16 forward at T=2048,
        # d=768, E=16, k=4 4-9% slower (in-process A/B, 21-41 alternated calls), for an error
        # of K roundings instead of one on outputs this large
        y = x.new_empty(t_all, d) if once else x.new_zeros(t_all, d)
        for e, s, t, u in spans:
            ye = torch.mm(gh[s:u], w2t[e])[:t - s]
            if once:
                y.index_copy_(0, tok[s:t], ye)
            else:
                y.index_add_(0, tok[s:t], ye)
    else:
        ys = _mm(gh, w2t, spans)[:pairs]  # (P, d)
        y = _combine(ys, order, _inverse(order, pairs), t_all, k)
    a3 = a3[:pairs] if a3 is not None else None
    return _outputs(y, a1[:pairs], a3, order, offsets, t_all * k)


def _outputs(y, a1, a3, order, offsets, rows):
    # the forward kernel contract: a1/a3 with all T*K layout rows (zeros past P), a3 (0, m)
    # for a plain FFN
    a3 = _pad_rows(a3, rows) if a3 is not None else a1.new_zeros(0, a1.shape[1])
    return y, _pad_rows(a1, rows), a3, order, offsets


def _grad_weights(a_t, b, spans, num_experts):
    """(E, M, N): per expert a_t[:, s:t] @ b[s:t] (the contraction runs over layout rows);
    an expert with no rows gets exactly zero."""
    out = a_t.new_zeros(num_experts, a_t.shape[0], b.shape[1])
    for e, s, t, _ in spans:
        torch.mm(a_t[:, s:t], b[s:t], out=out[e])
    return out


def _segment_sum(a, spans, num_experts):
    """(E*m,): each expert's column sums of a (P, m), zero for empty experts."""
    out = a.new_zeros(num_experts, a.shape[1])
    for e, s, t, _ in spans:
        torch.sum(a[s:t], 0, out=out[e])
    return out.reshape(-1)


def backward(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets, num_experts, activation,
             dropout_p):
    bounds = offsets.tolist()
    pairs = bounds[-1]
    if padded.use(x, bounds, backward=True):
        *grads, dg = padded.backward(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets,
                                     bounds, num_experts, activation, dropout_p)
        return (*grads, _dgate(dg, _inverse(order, pairs), x.shape[0], gate.shape[1]))
    if _blocked(x, pairs) or rounds_rows(x):  # rounded row counts: only the blocks have them
        return _backward_blocks(dy, x, w1, w2, w3, gate, keep, a1, a3, order, bounds, num_experts,
                                activation, dropout_p)
    t_all, d = x.shape
    k = gate.shape[1]
    f_all = w1.shape[0]
    m = f_all // num_experts
    glu = w3 is not None
    w1t, w3t, _, w2_edm = _expert_views(w1, w2, w3, num_experts)
    sel = order[:pairs]
    tok = sel // k
    xs, dys = x.index_select(0, tok), dy.index_select(0, tok)  # (P, d)
    spans = _spans(bounds)
    dh = _mm(dys, w2_edm, spans)  # (P, m)
    kp = keep.reshape(t_all * k, m)[sel] if keep is not None else None
    dg, gh, da1, da3 = hidden_backward(
        dh, gate.reshape(-1)[sel], a1[:pairs], a3[:pairs] if glu else None, kp,
        dropout_p, activation,
    )
    inv = _inverse(order, pairs)
    dgate = _dgate(dg, inv, t_all, k)
    # weight gradients come out per expert, (E, d, m) for w2 and (E, m, d) for w1 and w3
    dw2 = cols_grad(w2, _grad_weights(dys.t(), gh, spans, num_experts))
    dw1 = rows_grad(w1, _grad_weights(da1.t(), xs, spans, num_experts))
    db1 = _segment_sum(da1, spans, num_experts)
    dxs = _mm(da1, w1t.transpose(1, 2), spans)  # (P, d)
    if glu:
        dw3 = rows_grad(w3, _grad_weights(da3.t(), xs, spans, num_experts))
        db3 = _segment_sum(da3, spans, num_experts)
        dxs += _mm(da3, w3t.transpose(1, 2), spans)
    else:
        dw3, db3 = x.new_empty(0), x.new_empty(0)
    dx = _combine(dxs, order, inv, t_all, k)
    return dx, dw1, db1, dw2, dw3, db3, dgate


def _backward_blocks(dy, x, w1, w2, w3, gate, keep, a1, a3, order, bounds, num_experts,
                     activation, dropout_p):
    """The CPU backward, one expert's row block at a time: gather its tokens' x and dy rows,
    then every product of that expert while they are in cache. Same results as `backward`
    (same GEMM blocks, the same index_add_ order for dx) without its (P, d) buffers.

    With rounded row counts (`rounds_rows`) each expert's n rows are copied into blocks of
    gemm_rows(n) rows whose extra rows are zero: x, dy, a1, a3, the gates and the dropout mask
    alike. There dh = 0, the gate-weighted h = 0 * act(0) = 0 and da1 = da3 = 0, so those
    rows add nothing to any weight or bias gradient, and their dx rows are dropped."""
    t_all, d = x.shape
    k = gate.shape[1]
    m = w1.shape[0] // num_experts
    glu = w3 is not None
    pairs = bounds[-1]
    w1t, w3t, _, w2_edm = _expert_views(w1, w2, w3, num_experts)
    sel = order[:pairs]
    tok = sel // k
    g = gate.reshape(-1)[sel]
    kp = keep.reshape(t_all * k, m)[sel] if keep is not None else None
    dg = x.new_empty(pairs)
    dw1e, dw2e = x.new_zeros(num_experts, m, d), x.new_zeros(num_experts, d, m)
    db1 = x.new_zeros(num_experts, m)
    dw3e = x.new_zeros(num_experts, m, d) if glu else None
    db3 = x.new_zeros(num_experts, m) if glu else x.new_empty(0)
    dx = x.new_zeros(t_all, d, dtype=_acc_dtype(x, k))  # K > 1 rows: in float32 for bf16
    for e, s, t, u in _spans(bounds, rounds_rows(x)):
        r = u - s  # rows of this expert's GEMMs: its t - s pairs, then zero rows
        xe = _pad_rows(x.index_select(0, tok[s:t]), r)  # (r, d)
        dye = _pad_rows(dy.index_select(0, tok[s:t]), r)
        dge, ghe, da1, da3 = hidden_backward(
            torch.mm(dye, w2_edm[e]), _pad_rows(g[s:t], r), _pad_rows(a1[s:t], r),
            _pad_rows(a3[s:t], r) if glu else None,
            _pad_rows(kp[s:t], r) if kp is not None else None, dropout_p, activation,
        )
        dg[s:t] = dge[:t - s]
        torch.mm(dye.t(), ghe, out=dw2e[e])
        torch.mm(da1.t(), xe, out=dw1e[e])
        torch.sum(da1, 0, out=db1[e])
        dxe = torch.mm(da1, w1t[e].t())
        if glu:
            torch.mm(da3.t(), xe, out=dw3e[e])
            torch.sum(da3, 0, out=db3[e])
            dxe += torch.mm(da3, w3t[e].t())
        _add_expert_rows(dx, dxe[:t - s], tok[s:t])
    dgate = _dgate(dg, _inverse(order, pairs), t_all, k)
    dw2 = cols_grad(w2, dw2e)
    dw1 = rows_grad(w1, dw1e)
    dw3 = rows_grad(w3, dw3e) if glu else x.new_empty(0)
    return dx.to(x.dtype), dw1, db1.reshape(-1), dw2, dw3, db3.reshape(-1), dgate
