"""The torch path for small CPU problems: all experts in one batched GEMM over padded blocks.

At small shapes the per-expert loop of `torch_path` is dominated by call overhead: at T=512,
d=256, E=16, K=4 in bf16 each expert's GEMM is 128 x 256 x 64, and the 16 calls of one
projection took 337 us, as long as the whole dense up-projection (339 us), while one
`torch.bmm` over the 16 blocks took 97 us (this 2-core CPU, oneDNN). So here every expert's
rows are laid out in a block of C = (largest expert's row count) rows, padding rows are zero,
and each projection is one `bmm` against per-expert weight views. In bf16/fp16 C is rounded up
by `layout.gemm_rows` (oneDNN compiles a kernel for every new C; see `layout.ROW_STEPS`).

The padding is computed (E*C - P rows of GEMM work, none of it dense-and-masked: rows belong
to no pair and are never read back), and the down-projection needs nn.Linear's w2 copied into
per-expert blocks (`_w2_blocks`, a reshuffle of m-element runs). The block layout (pos, tok)
comes from one numba pass (`cpu_numba.padded_slots`). `use()` takes this variant when E*C <= 2P
and one (E*C, d) buffer stays under 5 MiB, measured in bf16 on this CPU (T in {512, 2048}, d
in {256, 768}, E in {8, 16, 32}, k = E/4, forward+backward: T=2048, d=256, E=16, 4.3 MiB:
1.00x against 0.81x; from 6.5 MiB on it lost, as fresh buffers that large page-fault: T=512,
d=768, E=16, k=8: 0.70x against 0.96x; T=2048, d=256, E=16, k=8, 8.4 MiB: 0.28x against
0.59x). Other problems take `torch_path`'s per-expert loops.

The backward takes this variant up to 32 MiB buffers (`MAX_BACKWARD_BUFFER_BYTES`; any forward's
layout feeds any backward): measured in bf16 on this CPU against the per-expert loops, backward
only, at all 54 shapes of bench/op.py, it was 1.1-2.3x faster at most shapes this admits beyond
the forward's 5 MiB (T=2048, d=256, E=16, k=8: 7.3 ms against 11.7; T=8192, d=256, E=32, k=4:
13.0 against 22.8; T=2048, d=768, E=16, k=4: 19.7 against 23.6), equal at T=8192, d=768, E=8 or
16, k <= 2 (1.01-1.04x), slower at T=2048, d=768, E=8, k=4 (0.92x); from 35 MB on it lost
(0.57-0.82x; T=8192, d=768, E=32, k=16: 338 ms against 194).

Until the twenty-fourth session the down-projection copied w2 transposed (1.34 ms at d=768 in
bf16), and this variant also required E*C >= F unless w2 was at most 1 MiB or the experts
small (C * m * d <= 2^24 multiply-adds forward, 2^25 backward): at d=768 the copy had made it
lose (T=512, 1.32x against 1.45x for the loop; E=8, k=4 forward 5.7 against 6.1 ms). With
`_w2_blocks` that condition went: `bench/ab.py --dtype bf16 --b
'ssdfx.ops.padded:SMALL_W2_BYTES=1<<40'` (the condition always met), 21-31 alternated calls,
B / A time forward / forward+backward: faster at 15 of 48 phases, none slower, the rest
undecided by their quartiles; T=512, d=768, E=16, k=4 0.79 / 0.91; E=8, k=2 0.95 / 0.79; E=8,
k=1 0.93 / 0.97; T=256, d=768, E=16, k=8 0.82 / 0.91; E=8, k=4 0.93 / 0.79; T=2048, d=768, E=8,
k=1 0.97 / 0.89; d=1024, T=1024, E=16, k=2 0.98 / 0.76; T=8192, d=768, E=32, k=4 0.95 / 0.95.

Zero padding rows stay harmless through the backward: their dy rows are zero, so dh, da1, da3
and the gate-weighted h are zero there and add nothing to any weight gradient, bias gradient
or dx (and an expert without rows gets exactly zero gradients). The forward returns a1/a3 in
the shared pair layout (`ssdfx.ops.layout`), so this backward accepts any kernel's forward.
"""

from __future__ import annotations

import torch

from ssdfx.ops import cpu_numba
from ssdfx.ops.layout import (add_rows, cols_grad, expert_views, gemm_rows, hidden,
                              hidden_backward, rounds_rows, rows_grad, sum_slots, unit_gates)

__all__ = ["backward", "forward", "use"]

# the limits described in the module docstring
MAX_BUFFER_BYTES = 5 << 20  # of one (E*C, d) buffer, forward
MAX_BACKWARD_BUFFER_BYTES = 32 << 20  # the same, backward
MAX_PAD = 2.0  # padded rows per pair row, E*C / P


def use(x: torch.Tensor, bounds: list[int], backward: bool = False) -> bool:
    """Whether this call takes the padded variant (see the module docstring)."""
    pairs = bounds[-1]
    if x.device.type != "cpu" or pairs == 0:
        return False
    num_experts = len(bounds) - 1
    cap = _capacity(bounds, rounds_rows(x))
    rows = num_experts * cap
    limit = MAX_BACKWARD_BUFFER_BYTES if backward else MAX_BUFFER_BYTES
    return rows <= MAX_PAD * pairs and rows * x.shape[1] * x.element_size() < limit


def _capacity(bounds: list[int], rounded: bool) -> int:
    """C: the largest expert's row count, rounded by `gemm_rows` where `rounds_rows` (bf16 and
    fp16 bmm run in oneDNN, which compiles a kernel for every new C)."""
    cap = max(t - s for s, t in zip(bounds[:-1], bounds[1:]))
    return gemm_rows(cap) if rounded else cap


def _scatter(rows: torch.Tensor, pos: torch.Tensor, n: int) -> torch.Tensor:
    """(P, c) layout rows -> (n, c) padded rows, zeros elsewhere."""
    return rows.new_zeros(n, rows.shape[1]).index_copy_(0, pos, rows)


def _slots(order, offsets, bounds, k, t_all, rounded):
    """pos (P,): the padded row of each layout row (expert e's i-th row -> e*C + i), C, the
    pairs sel (P,) in layout order, and the token of each padded row tok (E*C,) (T for a
    padding row)."""
    cap = _capacity(bounds, rounded)
    pairs = bounds[-1]
    pos, tok = cpu_numba.padded_slots(order, offsets, pairs, cap, k, t_all)
    return pos, cap, order[:pairs], tok


def _rows(x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """(E*C, c): row tok[i] of x, zeros where tok[i] = T (padding). One gather from x with a
    zero row appended: cheaper than gathering the P rows, zero-filling the padded buffer and
    scattering them into it (three passes over (P, d) in bf16)."""
    return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, tok)


def _sum_rows(rows: torch.Tensor, tok: torch.Tensor, t_all: int, pos: torch.Tensor,
              sel: torch.Tensor, k: int) -> torch.Tensor:
    """(T, c): each token's sum of its padded rows. Where every slot holds a pair, the rows
    are gathered slot by slot and added (`layout.sum_slots`, 1.2-3.2x faster than index_add_,
    which is serial). With unused slots (dynamic-k), index_add_ in padded order (= layout
    order), padding rows into a spare row that is dropped (both add bf16 rows in float32,
    `layout.sum_dtype`); the result is then a copy, not a
    view of that (T + 1, c) buffer: autograd refuses in-place changes to a view made inside a
    custom Function, and users may modify the op's output."""
    if sel.shape[0] == t_all * k:
        slot_rows = torch.empty_like(pos)
        slot_rows[sel] = pos  # the padded row of each (token, slot)
        return sum_slots(rows, slot_rows.view(t_all, k))
    return add_rows(rows, tok, t_all + 1)[:t_all].to(rows.dtype, copy=True)


def _up(xs, we, bias, num_experts):
    # (E, C, m) = xs_e @ w_e^T [+ b_e]
    if bias is not None:
        return torch.baddbmm(bias.view(num_experts, 1, -1), xs, we.transpose(1, 2))
    return torch.bmm(xs, we.transpose(1, 2))


def _w2_blocks(w2_edm: torch.Tensor) -> torch.Tensor:
    """w2's expert blocks (E, d, m) in a layout bmm reads in place: contiguous, or the transpose
    of a contiguous (E, m, d) (a Conv1D weight, already stored that way). nn.Linear's (d, F)
    gives each block as a strided view (leading dimension F), which bmm copies block by block
    on every call; one copy into contiguous blocks first is a reshuffle of m-element runs (8-10
    us at d=256, 63 at d=768, bf16)."""
    if w2_edm.is_contiguous() or w2_edm.transpose(1, 2).is_contiguous():
        return w2_edm
    return w2_edm.contiguous()


def _down(gh: torch.Tensor, w2_edm: torch.Tensor) -> torch.Tensor:
    """(E*C, d) = gh_e (C, m) @ w2_e^T per expert, one bmm over `_w2_blocks` (their transpose:
    bmm takes it without a copy). Against the two ways before (bmm against the strided view,
    or w2 transposed into a contiguous (F, d) copy, 91 us at d=256 and 1.34 ms at d=768),
    bf16, one thread pool, hot, us: d=256, E=16, C=23 93 against 136-277; C=152 239 against
    426-437; d=768, E=16, C=40 418 against 599-1732; C=300 2211 against 3744-4076; the
    same bits."""
    num_experts, cap, _ = gh.shape
    return torch.bmm(gh, _w2_blocks(w2_edm).transpose(1, 2)).view(num_experts * cap, -1)


def forward(x, w1, b1, w2, w3, b3, order, offsets, bounds, gate, keep, num_experts, activation,
            dropout_p):
    """Same contract as `torch_path.forward` after its sort: returns y (T, d), a1, a3.

    Padding rows need not be zero here: `_sum_rows` never reads them (or, with unused slots,
    adds them to a spare row that is dropped), and a1/a3 keep only the pairs' rows. So they
    read some token's x (no zero row is appended to x: that copy of x took 134-204 us at
    T=8192, d=256, bf16), and the gate multiplies h only where some gate is not exactly 1.0
    (the router's gates are 1.0 in the forward pass; the multiply and the scatter of the gates
    took 105 us there).
    """
    t_all, d = x.shape
    k = gate.shape[1]
    m = w1.shape[0] // num_experts
    pos, cap, sel, tok = _slots(order, offsets, bounds, k, t_all, rounds_rows(x))
    n = num_experts * cap
    xs = x.index_select(0, tok.clamp(max=t_all - 1)).view(num_experts, cap, d)
    w1e, w3e, w2_edm = expert_views(w1, w2, w3, num_experts)
    a1 = _up(xs, w1e, b1, num_experts).view(n, m)
    a3 = _up(xs, w3e, b3, num_experts).view(n, m) if w3 is not None else None
    kp = _scatter(keep.reshape(t_all * k, m)[sel], pos, n) if keep is not None else None
    gh = hidden(a1, a3, kp, dropout_p, activation)
    if not unit_gates(gate):
        # (n, 1) gates, zero on padding rows; never in place: gh may be a1
        gh = gh * _scatter(gate.reshape(-1, 1)[sel], pos, n)
    ys = _down(gh.view(num_experts, cap, m), w2_edm)
    y = _sum_rows(ys, tok, t_all, pos, sel, k)
    a1 = a1.index_select(0, pos)
    a3 = a3.index_select(0, pos) if a3 is not None else None
    return y, a1, a3


def backward(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets, bounds, num_experts,
             activation, dropout_p):
    """Same contract as `torch_path.backward` after its host sync."""
    t_all, d = x.shape
    k = gate.shape[1]
    m = w1.shape[0] // num_experts
    glu = w3 is not None
    pairs = bounds[-1]
    pos, cap, sel, tok = _slots(order, offsets, bounds, k, t_all, rounds_rows(x))
    n = num_experts * cap
    xs = _rows(x, tok).view(num_experts, cap, d)  # zero padding rows (module docstring)
    w1e, w3e, w2_edm = expert_views(w1, w2, w3, num_experts)
    dys = _rows(dy, tok).view(num_experts, cap, d)
    dh = torch.bmm(dys, _w2_blocks(w2_edm)).view(n, m)
    kp = _scatter(keep.reshape(t_all * k, m)[sel], pos, n) if keep is not None else None
    dg, gh, da1, da3 = hidden_backward(
        dh, _scatter(gate.reshape(-1, 1)[sel], pos, n).view(n), _scatter(a1[:pairs], pos, n),
        _scatter(a3[:pairs], pos, n) if glu else None, kp, dropout_p, activation,
    )
    da1 = da1.view(num_experts, cap, m)
    dw2 = cols_grad(w2, torch.bmm(dys.transpose(1, 2), gh.view(num_experts, cap, m)))
    dw1 = rows_grad(w1, torch.bmm(da1.transpose(1, 2), xs))
    db1 = da1.sum(1).reshape(-1)
    dxs = torch.bmm(da1, w1e)  # (E, C, d)
    if glu:
        da3 = da3.view(num_experts, cap, m)
        dw3 = rows_grad(w3, torch.bmm(da3.transpose(1, 2), xs))
        db3 = da3.sum(1).reshape(-1)
        dxs.baddbmm_(da3, w3e)
    else:
        dw3, db3 = x.new_empty(0), x.new_empty(0)
    dx = _sum_rows(dxs.view(n, d), tok, t_all, pos, sel, k)
    return dx, dw1, db1, dw2, dw3, db3, dg.index_select(0, pos)

