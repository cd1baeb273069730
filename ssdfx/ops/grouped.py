"""The `grouped_mm` backend: torch._grouped_mm for all experts, with no host sync.

The "torch" backend reads the expert offsets back to the host (`offsets.tolist()`) to size its
buffers and loop over experts. On a GPU that sync stalls the launch queue twice per training
step. This path never asks: every buffer has all T*K layout rows, the grouped GEMMs use the
offsets on the device (rows past offsets[E], the unused slots, are left as they come and never
read), empty experts are masked on the device, and the combine kernel reads P from device
memory. The cost is GEMM work on unused-slot rows only when dynamic-k leaves slots empty.

Layout as in `ssdfx.ops.layout`, except that a1/a3 rows >= P are unspecified here.
Needs 16-byte aligned strides (`grouped_mm_ok`).
"""

from __future__ import annotations

import torch

from ssdfx.ops.layout import expert_views, hidden, hidden_backward, rows_grad, sort_pairs
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


def _gmm(a, b, offs32):
    return torch._grouped_mm(a, b, offs=offs32)


def _inverse(order):
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


def _sum_slots(rows, inv, n_rows, t_all, k, gate=None):
    """(T, d): each token's (gate-weighted) sum of its K rows; rows >= n_rows (unused slots)
    count as zero. Fused in one Triton kernel on CUDA."""
    if rows.device.type == "cuda":
        from ssdfx.ops import cuda_kernels

        if cuda_kernels.available():
            return cuda_kernels.gather_sum(rows, inv, t_all, k, n_rows, gate)
    per_slot = rows.index_select(0, inv).view(t_all, k, -1)  # (T, K, d)
    used = (inv < n_rows).view(t_all, k, 1)
    per_slot = torch.where(used, per_slot, 0)
    if gate is not None:
        per_slot = per_slot * gate.reshape(t_all, k, 1)
    return per_slot.sum(1)


def _expert_bias(bias, row_expert, num_experts):
    # (T*K, m): the bias slice of each layout row's expert (unused rows: expert 0's)
    return bias.view(num_experts, -1).index_select(0, row_expert)


def forward(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts, activation, dropout_p):
    t_all, d = x.shape
    k = expert_idx.shape[1]
    m = w1.shape[0] // num_experts
    tk = t_all * k
    if x.device.type == "cpu":
        check_expert_idx(expert_idx, num_experts)  # a sync on GPUs: CPU only
    order, offsets = sort_pairs(expert_idx, num_experts)
    offs32 = offsets[1:].to(torch.int32)
    w1e, w3e, w2_edm = expert_views(w1, w2, w3, num_experts)
    xs = x.index_select(0, order // k)  # (T*K, d)
    row_expert = expert_idx.reshape(-1)[order].clamp_(min=0)  # (T*K,)
    a1 = _gmm(xs, w1e.transpose(1, 2), offs32)  # (T*K, m)
    if b1 is not None:
        a1 += _expert_bias(b1, row_expert, num_experts)
    a3 = None
    if w3 is not None:
        a3 = _gmm(xs, w3e.transpose(1, 2), offs32)
        if b3 is not None:
            a3 += _expert_bias(b3, row_expert, num_experts)
    kp = keep.reshape(tk, m)[order] if keep is not None else None
    h = hidden(a1, a3, kp, dropout_p, activation)
    ys = _gmm(h, w2_edm.transpose(1, 2), offs32)  # (T*K, d)
    # the gate is applied in the combine, which reads each row once anyway
    y = _sum_slots(ys, _inverse(order), offsets[num_experts:], t_all, k, gate)
    return y, a1, a3 if a3 is not None else x.new_zeros(0, m), order, offsets


def _weight_grads(a_t, b, offs32, nonempty):
    # (E, M, N) = per expert a_t[:, rows] @ b[rows]; experts without rows get zeros (where(),
    # not a multiply: what the GEMM leaves for an empty group is not specified)
    out = _gmm(a_t, b, offs32)
    return torch.where(nonempty.view(-1, 1, 1), out, 0)


def _bias_grad(a, offs32, nonempty):
    # per-expert column sums as a GEMM with ones: reads `a` once; the (8, T*K) column-major
    # ones matrix keeps the 16-byte strides grouped_mm needs
    ones = a.new_ones(a.shape[0], 8).t()
    return _weight_grads(ones, a, offs32, nonempty)[:, 0].reshape(-1)


def backward(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets, num_experts, activation,
             dropout_p):
    t_all, d = x.shape
    k = gate.shape[1]
    m = w1.shape[0] // num_experts
    tk = t_all * k
    glu = w3 is not None
    offs32 = offsets[1:].to(torch.int32)
    nonempty = offsets[1:] > offsets[:-1]  # (E,)
    n_rows = offsets[num_experts:]  # (1,) = P, on the device
    w1e, w3e, w2_edm = expert_views(w1, w2, w3, num_experts)
    tok = order // k
    xs, dys = x.index_select(0, tok), dy.index_select(0, tok)  # (T*K, d)
    dh = _gmm(dys, w2_edm, offs32)  # (T*K, m)
    kp = keep.reshape(tk, m)[order] if keep is not None else None
    dg, gh, da1, da3 = hidden_backward(dh, gate.reshape(-1)[order], a1, a3 if glu else None,
                                       kp, dropout_p, activation)
    inv = _inverse(order)
    dgate = torch.where(inv < n_rows, dg.index_select(0, inv), 0).view(t_all, k)
    dw2 = torch.empty_like(w2)
    dw2.view(d, num_experts, m).permute(1, 0, 2).copy_(
        _weight_grads(dys.t(), gh, offs32, nonempty))
    dw1 = rows_grad(w1, _weight_grads(da1.t(), xs, offs32, nonempty))
    db1 = _bias_grad(da1, offs32, nonempty)
    dxs = _gmm(da1, w1e, offs32)  # (T*K, d)
    if glu:
        dw3 = rows_grad(w3, _weight_grads(da3.t(), xs, offs32, nonempty))
        db3 = _bias_grad(da3, offs32, nonempty)
        dxs += _gmm(da3, w3e, offs32)
    else:
        dw3, db3 = x.new_empty(0), x.new_empty(0)
    dx = _sum_slots(dxs, inv, n_rows, t_all, k)
    return dx, dw1, db1, dw2, dw3, db3, dgate
