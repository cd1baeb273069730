"""The routed-expert FFN operator: `moe_ffn`, backed by the custom op `ssdfx::moe_ffn`.

Only the selected (token, expert) pairs are ever computed, forward and backward; nothing
computes the dense FFN and masks it. Modules:

    registry      the custom ops, fake/autograd/FLOP registrations, per-device kernels
    dispatch      which backend runs (explicit strings, see BACKENDS)
    layout        the pair layout shared by every kernel, and the elementwise middle
    reference     pure-torch oracle kernels
    cpu_numba     launchers of the numba CPU kernels (numba_kernels, blas): fp32/fp64 on CPU,
                  and bf16 inference where MKL's bf16 GEMM is native (numba_bf16: AMX,
                  or AVX-512-BF16 with MKL's Intel code paths, see blas)
    widened       bf16/fp16 through the float32 numba kernels, where torch has no native
                  GEMM in that dtype (AVX2-only CPUs)
    torch_path    sort-by-expert torch kernels, one mm per expert: bf16/fp16 on CPU
    padded        torch_path's variant for small CPU problems: one bmm over padded blocks
    grouped       torch._grouped_mm kernels without host syncs: the CUDA path
    cuda_kernels  the Triton combine kernel used on CUDA, and the loader of the Triton
                  kernels (_triton), compiled or run by Triton's interpreter on CPU
    gathered      grouped's forward up-projection as one Triton kernel (gather, GEMM, bias,
                  activation; opt-in, GATHERED_DEVICES)
"""

from __future__ import annotations

import torch

from ssdfx.activations import ACTIVATIONS
from ssdfx.fx_leaf import graph_leaf
from ssdfx.ops.dispatch import BACKENDS, plain_eager
from ssdfx.ops.registry import (EagerMoeFfn, device_infer, moe_ffn_backward_op, moe_ffn_op,
                                pair_count)

__all__ = ["BACKENDS", "moe_ffn", "moe_ffn_backward_op", "moe_ffn_op", "pair_count"]


def _validate(x, w1, b1, w2, w3, b3, expert_idx, gate, num_experts, activation, dropout_p,
              backend):
    # shape/dtype checks only: this runs under FakeTensor tracing and torch.export too
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {activation!r}; supported: {sorted(ACTIVATIONS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if w1.dim() != 2 or w2.dim() != 2:
        raise ValueError(f"w1 and w2 must be 2-D, got {tuple(w1.shape)} and {tuple(w2.shape)}")
    f_all, d = w1.shape
    if num_experts < 1 or f_all % num_experts:
        raise ValueError(
            f"d_ff={f_all} is not divisible by num_experts={num_experts}; pick a divisor of d_ff"
        )
    if x.shape[-1] != d or w2.shape != (d, f_all):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}; "
            "expected x (..., d), w1 (F, d), w2 (d, F)"
        )
    if w3 is not None and w3.shape != (f_all, d):
        raise ValueError(f"w3 {tuple(w3.shape)} must be (F, d) = {(f_all, d)}")
    for name, b in (("b1", b1), ("b3", b3)):
        if b is not None and b.shape != (f_all,):
            raise ValueError(f"{name} {tuple(b.shape)} must be (F,) = ({f_all},)")
    if b3 is not None and w3 is None:
        raise ValueError("b3 given without w3")
    if expert_idx.shape != gate.shape or expert_idx.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"expert_idx {tuple(expert_idx.shape)} and gate {tuple(gate.shape)} must both be "
            f"(..., K) with x's leading dims {tuple(x.shape[:-1])}"
        )
    if expert_idx.dtype.is_floating_point or expert_idx.dtype == torch.bool:
        raise ValueError(f"expert_idx must be an integer tensor, got {expert_idx.dtype}")
    dt = x.dtype
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("w3", w3), ("b3", b3), ("gate", gate)):
        if t is not None and t.dtype != dt:
            raise ValueError(f"{name} is {t.dtype} but x is {dt}; cast them to one dtype")


def _autocast(*tensors):
    """Cast floating tensors to the autocast dtype when autocast is on for their device."""
    dev = tensors[0].device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


@graph_leaf
def moe_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    expert_idx: torch.Tensor,
    gate: torch.Tensor,
    *,
    num_experts: int,
    activation: str,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """y[t] = sum_j gate[t, j] * expert_{idx[t, j]}(x[t]); no output bias.

    x (..., d); w1, w3 (F, d); b1, b3 (F,) or None; w2 (d, F) (nn.Linear layout); expert_idx,
    gate (..., K). Expert e owns neurons [e*m, (e+1)*m), m = F // num_experts:
    expert_e(x) = (act(x w1_e^T + b1_e) [* (x w3_e^T + b3_e)]) w2_e^T.

    expert_idx = -1 marks an unused slot (dynamic-k). An expert listed twice for one token is
    computed twice and both contributions are added (the router never does this).
    Weights may be strided views (e.g. a Conv1D weight's `.t()`): they are read in place and
    their gradients come back with the same strides, so no copy is made either way.
    dropout_p > 0 applies inverted dropout to h of the selected pairs, with a keep-mask drawn
    from torch's default generator (reproducible under torch.manual_seed) and saved for
    backward; pass 0.0 in eval mode. Gradients flow to x, w1, b1, w2, w3, b3 and gate;
    d(gate[t, j]) = <dy_t, expert_e(x_t)>.
    With K == num_experts, every expert selected and gate == 1, y equals the dense FFN.
    Under torch.autocast the floating inputs are cast to the autocast dtype first (like the
    Linear layers this op replaces); gradients reach the original-precision parameters.
    """
    x, w1, b1, w2, w3, b3, gate = _autocast(x, w1, b1, w2, w3, b3, gate)
    _validate(x, w1, b1, w2, w3, b3, expert_idx, gate, num_experts, activation, dropout_p,
              backend)
    lead = x.shape[:-1]
    d = x.shape[-1]
    k = expert_idx.shape[-1]
    flat = x.dim() == 2  # then expert_idx and gate are 2-D too (validated): no views to make
    x2 = x if flat else x.reshape(-1, d)  # (T, d)
    idx2 = (expert_idx if flat else expert_idx.reshape(-1, k)).to(torch.int64)  # (T, K)
    gate2 = gate if flat else gate.reshape(-1, k)  # (T, K)
    keep = None
    if dropout_p > 0.0:
        m = w1.shape[0] // num_experts
        keep = torch.empty(x2.shape[0], k, m, device=x.device).bernoulli_(1.0 - dropout_p).bool()
    args = (x2, w1, b1, w2, w3, b3, idx2, gate2, keep, num_experts, activation,
            float(dropout_p), backend)
    if x.device.type == "cpu" and plain_eager(x2, w1, b1, w2, w3, b3, idx2, gate2):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x2, w1, b1, w2, w3, b3, gate2)):
            y = EagerMoeFfn.apply(*args)  # the op's kernels without its dispatch overhead
        else:
            # nothing to differentiate (inference): the kernels alone, without the autograd
            # Function's bookkeeping (25-80 us a call, ~6% of the forward at T=64, d=256)
            y = device_infer(*args)
    else:
        y = moe_ffn_op(*args)[0]
    return y if flat else y.reshape(*lead, d)
