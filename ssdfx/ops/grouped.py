"""The `grouped_mm` backend: torch._grouped_mm for all experts, with no host sync.

The "torch" backend reads the expert offsets back to the host (`offsets.tolist()`) to size its
buffers and loop over experts. On a GPU that sync stalls the launch queue twice per training
step. This path never asks: every buffer has all T*K layout rows, the grouped GEMMs use the
offsets on the device (rows past offsets[E], the unused slots, are left as they come and never
read), empty experts are masked on the device, and the combine kernel reads P from device
memory. The cost is GEMM work on unused-slot rows only when dynamic-k leaves slots empty.

Layout as in `ssdfx.ops.layout`, except that a1/a3 rows >= P are unspecified here.
Needs 16-byte aligned strides (`grouped_mm_ok`).

Between the GEMMs sits elementwise work on (T*K, m) tensors: the expert bias and the activation
forward; the activation derivative, the gate and the gate's gradient (a row sum) backward. In
eager torch ops that is ~10 kernels, each reading and writing the whole tensor; on an H200 at
T=16384, d=4096, E=16, K=4 those passes took about 1 of the 8.4 ms of a forward+backward
(bench/results/cuda_profile_grouped_mm.txt). On the device types in FUSED_DEVICES the two
functions run through `torch.compile` (inductor: one or two fused kernels each, the first call
compiles; each new combination of dtype, activation, GLU, bias and dropout compiles again, and
past torch's recompile limit, 8 per function, dynamo runs further combinations eagerly). Off by
default: it has not yet been measured on a GPU; `bench/cuda_check.py` times both variants.
The compiled code computes in fp32 and rounds once, so bf16 results can differ from the eager
variant in the last bit.

On the device types in `gathered.GATHERED_DEVICES` (also empty by default, not yet measured)
the forward's gather, up-projection GEMMs, expert bias and activation run as one Triton kernel
(`ssdfx.ops.gathered.up`) instead, without the (T*K, d) gathered copy of x, and the
backward's dh GEMM with the elementwise backward as another (`gathered.hidden_grad`) and each
weight gradient as one more, straight into the weight's layout (`gathered.weight_grad`); none
makes a gathered copy of x or dy. The bias gradients of empty experts are zeroed in place
(`gathered.zero_empty`). A dropout mask is read inside the kernels' epilogues.
"""

from __future__ import annotations

import warnings

import torch

from ssdfx.ops import gathered
from ssdfx.ops.layout import (cols_grad, expert_views, hidden, hidden_backward, rows_grad,
                              sort_pairs)
from ssdfx.ops.reference import check_expert_idx

__all__ = ["FUSED_DEVICES", "backward", "forward", "grouped_mm_ok"]

# device types whose elementwise middle runs compiled (module docstring); e.g. ("cuda",)
FUSED_DEVICES: tuple[str, ...] = ()


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


def _up_epilogue(a1, a3, b1, b3, row_expert, keep, dropout_p, activation):
    """Adds each layout row's expert bias to a1 and a3 in place; returns h (T*K, m)."""
    if b1 is not None:
        a1 += b1.view(-1, a1.shape[1]).index_select(0, row_expert)
    if a3 is not None and b3 is not None:
        a3 += b3.view(-1, a3.shape[1]).index_select(0, row_expert)
    return hidden(a1, a3, keep, dropout_p, activation)


class _Fusable:
    """fn, or fn compiled by inductor on the device types in FUSED_DEVICES. A compile failure
    (no compiler or Triton here) warns once and falls back to fn for the rest of the process.

    The two instances below are process-wide on purpose, like torch.compile's own cache (keyed
    on the function's code) and the Triton kernel cache: compiling takes seconds and must
    happen once, and a failed compile must not be retried on every call. Neither changes what
    is computed beyond the last bit of bf16 rounding."""

    def __init__(self, fn):
        self.fn, self.compiled, self.broken = fn, None, False

    def __call__(self, device: torch.device, *args):
        if self.broken or device.type not in FUSED_DEVICES:
            return self.fn(*args)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=True)
            return self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure; fn reruns the work
            self.broken = True
            warnings.warn(f"ssdfx: compiling {self.fn.__name__} failed ({exc!r:.300}); "
                          "running it as separate torch ops from now on", stacklevel=2)
            return self.fn(*args)


_up_epilogue_op = _Fusable(_up_epilogue)
_hidden_backward_op = _Fusable(hidden_backward)


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
    if gathered.usable(x):  # gather, GEMMs and epilogue in one Triton kernel
        a1, a3, h = gathered.up(x, w1, b1, w3, b3, order, offsets, k, activation, keep,
                                dropout_p)
    else:
        xs = x.index_select(0, order // k)  # (T*K, d)
        row_expert = expert_idx.reshape(-1)[order].clamp_(min=0)  # (T*K,)
        a1 = _gmm(xs, w1e.transpose(1, 2), offs32)  # (T*K, m)
        a3 = _gmm(xs, w3e.transpose(1, 2), offs32) if w3 is not None else None
        kp = keep.reshape(tk, m)[order] if keep is not None else None
        h = _up_epilogue_op(x.device, a1, a3, b1, b3, row_expert, kp, dropout_p, activation)
    ys = _gmm(h, w2_edm.transpose(1, 2), offs32)  # (T*K, d)
    # the gate is applied in the combine, which reads each row once anyway
    y = _sum_slots(ys, _inverse(order), offsets[num_experts:], t_all, k, gate)
    return y, a1, a3 if a3 is not None else x.new_zeros(0, m), order, offsets


def _weight_grads(a_t, b, offs32, nonempty, offsets=None):
    # (E, M, N) = per expert a_t[:, rows] @ b[rows]; experts without rows get zeros (where(),
    # not a multiply: what the GEMM leaves for an empty group is not specified). Given the
    # offsets (`gathered.usable`), a Triton kernel writes those zeros in place instead
    out = _gmm(a_t, b, offs32)
    if offsets is not None and out.is_contiguous():
        return gathered.zero_empty(out, offsets)
    return torch.where(nonempty.view(-1, 1, 1), out, 0)


def _bias_grad(a, offs32, nonempty, offsets=None):
    # per-expert column sums as a GEMM with ones: reads `a` once; the (8, T*K) column-major
    # ones matrix keeps the 16-byte strides grouped_mm needs
    ones = a.new_ones(a.shape[0], 8).t()
    return _weight_grads(ones, a, offs32, nonempty, offsets)[:, 0].reshape(-1)


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
    fused = gathered.usable(x)
    wo = offsets if fused else None  # zero the bias gradients of empty experts in place
    if fused:
        # dh and its elementwise backward in one Triton kernel, the weight gradients each in
        # one more, written in the weights' layouts; none makes a gathered copy of x or dy
        dg, gh, da1, da3 = gathered.hidden_grad(dy, w2, a1, a3 if glu else None, gate, order,
                                                offsets, k, activation, keep, dropout_p)
        dw2 = gathered.weight_grad(dy, gh, order, offsets, k, w2, neurons_first=False)
        dw1 = gathered.weight_grad(x, da1, order, offsets, k, w1, neurons_first=True)
        dw3 = (gathered.weight_grad(x, da3, order, offsets, k, w3, neurons_first=True)
               if glu else x.new_empty(0))
    else:
        tok = order // k
        xs, dys = x.index_select(0, tok), dy.index_select(0, tok)  # (T*K, d)
        dh = _gmm(dys, w2_edm, offs32)  # (T*K, m)
        kp = keep.reshape(tk, m)[order] if keep is not None else None
        dg, gh, da1, da3 = _hidden_backward_op(x.device, dh, gate.reshape(-1)[order], a1,
                                               a3 if glu else None, kp, dropout_p, activation)
        dw2 = cols_grad(w2, _weight_grads(dys.t(), gh, offs32, nonempty))
        dw1 = rows_grad(w1, _weight_grads(da1.t(), xs, offs32, nonempty))
        dw3 = (rows_grad(w3, _weight_grads(da3.t(), xs, offs32, nonempty))
               if glu else x.new_empty(0))
    inv = _inverse(order)
    dgate = torch.where(inv < n_rows, dg.index_select(0, inv), 0).view(t_all, k)
    db1 = _bias_grad(da1, offs32, nonempty, wo)
    dxs = _gmm(da1, w1e, offs32)  # (T*K, d)
    if glu:
        db3 = _bias_grad(da3, offs32, nonempty, wo)
        dxs += _gmm(da3, w3e, offs32)
    else:
        db3 = x.new_empty(0)
    dx = _sum_slots(dxs, inv, n_rows, t_all, k)
    return dx, dw1, db1, dw2, dw3, db3, dgate
