"""Sort-by-expert kernels in plain torch ops: the bfloat16/float16 CPU path and the CUDA path.

Same algorithm as the numba kernels, expressed in torch ops so that it runs on any device and
dtype: gather the pairs' token rows once in expert order, run each expert's GEMMs on its
contiguous block, and combine. Two flavours of the GEMMs:

- `grouped=False`: one `torch.mm(..., out=block)` per expert (the blocks are row slices of one
  buffer, so nothing is concatenated and no slice-backward zero-fill ever happens: the
  backward is written by hand).
- `grouped=True`: `torch._grouped_mm`, one kernel for all experts (CUDA bf16 on sm90+; also
  CPU in recent torch). Needs 16-byte aligned strides: d, m and F multiples of 8 in bf16.

The combine step puts each pair's output back in (token, slot) order and sums over the K
slots, rather than `index_add_`: deterministic, and the sum accumulates in fp32 for bf16.
"""

from __future__ import annotations

import torch

from ssdfx.ops.layout import hidden, hidden_backward, sort_pairs
from ssdfx.ops.reference import check_expert_idx

__all__ = ["backward", "forward", "grouped_mm_ok"]


def grouped_mm_ok(x: torch.Tensor, w1: torch.Tensor, num_experts: int) -> bool:
    """Whether `torch._grouped_mm` exists here and accepts these shapes and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    f_all, d = w1.shape
    align = 16 // x.element_size()
    return d % align == 0 and (f_all // num_experts) % align == 0 and f_all % align == 0


def _expert_views(w1, w2, w3, num_experts):
    """Per-expert weight views without copies: w1_e^T (E, d, m), w2_e^T (E, m, d), w2_e (E, d, m)."""
    f_all, d = w1.shape
    m = f_all // num_experts
    w1t = w1.view(num_experts, m, d).transpose(1, 2)
    w3t = w3.view(num_experts, m, d).transpose(1, 2) if w3 is not None else None
    w2_edm = w2.view(d, num_experts, m).permute(1, 0, 2)  # (E, d, m)
    return w1t, w3t, w2_edm.transpose(1, 2), w2_edm


def _inverse(order: torch.Tensor, pairs: int) -> torch.Tensor:
    """inv (T*K,): the layout row of each pair; unused slots point at row P (a zero row)."""
    inv = torch.full_like(order, pairs)
    inv[order[:pairs]] = torch.arange(pairs, device=order.device)
    return inv


def _unsort_sum(rows: torch.Tensor, inv: torch.Tensor, t_all: int, k: int) -> torch.Tensor:
    """rows (P, d) in layout order -> (T, d): sum over each token's K slots."""
    padded = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])  # (P+1, d)
    per_slot = padded.index_select(0, inv).view(t_all, k, -1)  # (T, K, d)
    if k == 1:
        return per_slot[:, 0]
    acc = torch.promote_types(rows.dtype, torch.float32)
    return per_slot.sum(1, dtype=acc).to(rows.dtype)


def _mm_blocks(a, b_e, bounds, out):
    """out[s:t] = a[s:t] @ b_e[e] for each expert block [s, t) of the layout."""
    for e in range(len(bounds) - 1):
        s, t = bounds[e], bounds[e + 1]
        if s < t:
            torch.mm(a[s:t], b_e[e], out=out[s:t])
    return out


def _mm(a, b_e, bounds, offs32, grouped):
    if grouped:
        return torch._grouped_mm(a, b_e, offs=offs32)
    return _mm_blocks(a, b_e, bounds, a.new_empty(a.shape[0], b_e.shape[2]))


def _row_bias(bias, num_experts, bounds, pairs):
    # (P, m): each layout row's expert slice of the bias
    counts = torch.tensor([bounds[e + 1] - bounds[e] for e in range(num_experts)],
                          device=bias.device)
    return bias.view(num_experts, -1).repeat_interleave(counts, dim=0, output_size=pairs)


def forward(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts, activation, dropout_p,
            grouped=False):
    t_all, d = x.shape
    k = expert_idx.shape[1]
    m = w1.shape[0] // num_experts
    if x.device.type == "cpu":
        check_expert_idx(expert_idx, num_experts)  # a device sync elsewhere: CPU only
    order, offsets = sort_pairs(expert_idx, num_experts)
    bounds = offsets.tolist()
    pairs = bounds[-1]
    offs32 = offsets[1:].to(torch.int32)
    w1t, w3t, w2t, _ = _expert_views(w1, w2, w3, num_experts)
    sel = order[:pairs]
    xs = x.index_select(0, sel // k)  # (P, d)
    a1 = x.new_zeros(t_all * k, m)
    a1[:pairs] = _mm(xs, w1t, bounds, offs32, grouped)
    if b1 is not None:
        a1[:pairs] += _row_bias(b1, num_experts, bounds, pairs)
    a3 = x.new_zeros(t_all * k if w3 is not None else 0, m)
    if w3 is not None:
        a3[:pairs] = _mm(xs, w3t, bounds, offs32, grouped)
        if b3 is not None:
            a3[:pairs] += _row_bias(b3, num_experts, bounds, pairs)
    kp = keep.reshape(t_all * k, m)[sel] if keep is not None else None
    h = hidden(a1[:pairs], a3[:pairs] if w3 is not None else None, kp, dropout_p, activation)
    ys = _mm(h, w2t, bounds, offs32, grouped)  # (P, d)
    ys *= gate.reshape(-1)[sel].unsqueeze(1)
    y = _unsort_sum(ys, _inverse(order, pairs), t_all, k)
    return y, a1, a3, order, offsets


def _grad_weights(a_t, b, bounds, offs32, grouped, counts_zero):
    """(E, M, N) per-expert products a_t[:, s:t] @ b[s:t] (the K dim is the layout rows)."""
    if grouped:
        out = torch._grouped_mm(a_t, b, offs=offs32)
        if counts_zero.any():
            out[counts_zero] = 0  # an expert with no rows gets zero gradient
        return out
    num_experts = len(bounds) - 1
    out = a_t.new_zeros(num_experts, a_t.shape[0], b.shape[1])
    for e in range(num_experts):
        s, t = bounds[e], bounds[e + 1]
        if s < t:
            torch.mm(a_t[:, s:t], b[s:t], out=out[e])
    return out


def _segment_sum(a, bounds):
    """(P, m) in layout order -> (E*m,): each expert's column sums (zero for empty experts)."""
    num_experts = len(bounds) - 1
    lengths = torch.tensor([bounds[e + 1] - bounds[e] for e in range(num_experts)],
                           device=a.device)
    if a.shape[0] == 0:
        return a.new_zeros(num_experts * a.shape[1])
    return torch.segment_reduce(a, "sum", lengths=lengths, axis=0).reshape(-1)


def backward(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets, num_experts, activation,
             dropout_p, grouped=False):
    t_all, d = x.shape
    k = gate.shape[1]
    f_all = w1.shape[0]
    m = f_all // num_experts
    glu = w3 is not None
    bounds = offsets.tolist()
    pairs = bounds[-1]
    offs32 = offsets[1:].to(torch.int32)
    counts_zero = (offsets[1:] - offsets[:-1]) == 0
    w1t, w3t, _, w2_edm = _expert_views(w1, w2, w3, num_experts)
    sel = order[:pairs]
    tok = sel // k
    xs, dys = x.index_select(0, tok), dy.index_select(0, tok)  # (P, d)
    dh = _mm(dys, w2_edm, bounds, offs32, grouped)  # (P, m)
    kp = keep.reshape(t_all * k, m)[sel] if keep is not None else None
    dg, gh, da1, da3 = hidden_backward(
        dh, gate.reshape(-1)[sel], a1[:pairs], a3[:pairs] if glu else None, kp,
        dropout_p, activation,
    )
    inv = _inverse(order, pairs)
    dgate = torch.cat([dg, dg.new_zeros(1)]).index_select(0, inv).view(t_all, k)
    # weight gradients: (E, d, m) for w2, (E, m, d) for w1/w3, written through views of
    # tensors with the weights' strides
    dw2 = torch.empty_like(w2)
    dw2.view(d, num_experts, m).permute(1, 0, 2).copy_(
        _grad_weights(dys.t(), gh, bounds, offs32, grouped, counts_zero))
    dw1 = torch.empty_like(w1)
    dw1.view(num_experts, m, d).copy_(
        _grad_weights(da1.t(), xs, bounds, offs32, grouped, counts_zero))
    db1 = _segment_sum(da1, bounds)
    dxs = _mm(da1, w1t.transpose(1, 2), bounds, offs32, grouped)  # (P, d)
    if glu:
        dw3 = torch.empty_like(w3)
        dw3.view(num_experts, m, d).copy_(
            _grad_weights(da3.t(), xs, bounds, offs32, grouped, counts_zero))
        db3 = _segment_sum(da3, bounds)
        dxs += _mm(da3, w3t.transpose(1, 2), bounds, offs32, grouped)
    else:
        dw3, db3 = x.new_empty(0), x.new_empty(0)
    dx = _unsort_sum(dxs, inv, t_all, k)
    return dx, dw1, db1, dw2, dw3, db3, dgate
