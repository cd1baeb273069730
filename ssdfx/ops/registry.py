"""The custom ops `ssdfx::moe_ffn` and `ssdfx::moe_ffn_backward`, and what torch needs to know.

`ssdfx::moe_ffn` is one opaque node in traced graphs (torch.export, FX, compile) with:
- a fake implementation (shapes only), so FakeTensor tracing and torch.export work;
- autograd through `ssdfx::moe_ffn_backward`, itself a custom op so that the backward is
  dispatched per device too;
- FLOP formulas for both ops, so `FlopCounterMode` counts the pairs actually computed
  (it counts unregistered custom ops as zero);
- kernels per device: "cpu" and "cuda" pick a backend with `dispatch.select`; every other
  device gets the pure-torch reference (the op's default implementation).

Besides y, the forward op returns what its backward needs (the pair layout and the
pre-activations, see `ssdfx.ops.layout`); they are marked non-differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ssdfx.ops import reference
from ssdfx.ops.dispatch import select

__all__ = ["EagerMoeFfn", "device_forward", "device_infer", "moe_ffn_backward_op", "moe_ffn_op",
           "pair_count"]

_FwdOut = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
_BwdOut = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("ssdfx::moe_ffn", mutates_args=())
def moe_ffn_op(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, w3: Tensor | None, b3: Tensor | None,
    expert_idx: Tensor, gate: Tensor, keep: Tensor | None,
    num_experts: int, activation: str, dropout_p: float, backend: str,
) -> _FwdOut:
    """Routed-expert FFN on 2-D inputs: x (T, d), expert_idx and gate (T, K).

    Returns y (T, d) and the saved layout: a1 (T*K, m), a3 (T*K or 0, m), order (T*K,),
    offsets (E+1,). Devices without a registered kernel run the reference.
    """
    return reference.forward(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts,
                             activation, dropout_p)


def device_forward(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts, activation,
                   dropout_p, backend):
    """The op's forward on a CPU or CUDA device: the kernels `dispatch.select` picks."""
    kernels = select(backend, x, w1, num_experts)
    return kernels.forward(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts,
                           activation, dropout_p)


def device_infer(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts, activation,
                 dropout_p, backend):
    """y of `device_forward` for a call with nothing to differentiate: the backend's `infer`
    where it has one and there is no dropout (it saves nothing for a backward), else the
    forward's y."""
    kernels = select(backend, x, w1, num_experts)
    if kernels.infer is not None and keep is None:
        return kernels.infer(x, w1, b1, w2, w3, b3, expert_idx, gate, num_experts, activation)
    return kernels.forward(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts,
                           activation, dropout_p)[0]


moe_ffn_op.register_kernel("cpu")(device_forward)
moe_ffn_op.register_kernel("cuda")(device_forward)


@moe_ffn_op.register_fake
def _moe_ffn_fake(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts, activation,
                  dropout_p, backend):
    t_all, d = x.shape
    rows = t_all * expert_idx.shape[1]
    m = w1.shape[0] // num_experts
    return (
        x.new_empty(t_all, d),
        x.new_empty(rows, m),
        x.new_empty(rows if w3 is not None else 0, m),
        expert_idx.new_empty(rows, dtype=torch.int64),
        expert_idx.new_empty(num_experts + 1, dtype=torch.int64),
    )


@torch.library.custom_op("ssdfx::moe_ffn_backward", mutates_args=())
def moe_ffn_backward_op(
    dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor | None, gate: Tensor,
    keep: Tensor | None, a1: Tensor, a3: Tensor, order: Tensor, offsets: Tensor,
    num_experts: int, activation: str, dropout_p: float, backend: str,
) -> _BwdOut:
    """Gradients (dx, dw1, db1, dw2, dw3, db3, dgate) of `ssdfx::moe_ffn` for dy (T, d)."""
    return reference.backward(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets,
                              num_experts, activation, dropout_p)


def _device_backward(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets, num_experts,
                     activation, dropout_p, backend):
    kernels = select(backend, x, w1, num_experts)
    return kernels.backward(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets,
                            num_experts, activation, dropout_p)


moe_ffn_backward_op.register_kernel("cpu")(_device_backward)
moe_ffn_backward_op.register_kernel("cuda")(_device_backward)


@moe_ffn_backward_op.register_fake
def _moe_ffn_backward_fake(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets, num_experts,
                           activation, dropout_p, backend):
    f_all = w1.shape[0]
    return (
        torch.empty_like(x),
        torch.empty_like(w1),
        x.new_empty(f_all),
        torch.empty_like(w2),
        torch.empty_like(w3) if w3 is not None else x.new_empty(0),
        x.new_empty(f_all if w3 is not None else 0),
        torch.empty_like(gate),
    )


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, w3, b3, _idx, gate, keep, num_experts, activation, dropout_p, backend = inputs
    _y, a1, a3, order, offsets = output
    ctx.save_for_backward(x, w1, w2, w3, gate, keep, a1, a3, order, offsets)
    ctx.config = (num_experts, activation, dropout_p, backend, b1 is not None, b3 is not None)
    ctx.mark_non_differentiable(a1, a3, order, offsets)


def _input_grads(ctx, dy, backward_fn):
    x, w1, w2, w3, gate, keep, a1, a3, order, offsets = ctx.saved_tensors
    num_experts, activation, dropout_p, backend, has_b1, has_b3 = ctx.config
    dx, dw1, db1, dw2, dw3, db3, dgate = backward_fn(
        dy.contiguous(), x, w1, w2, w3, gate, keep, a1, a3, order, offsets, num_experts,
        activation, dropout_p, backend,
    )
    glu = w3 is not None
    return (dx, dw1, db1 if has_b1 else None, dw2, dw3 if glu else None,
            db3 if has_b3 else None, None, dgate, None, None, None, None, None)


def _backward(ctx, dy, *_unused):
    return _input_grads(ctx, dy, moe_ffn_backward_op)


moe_ffn_op.register_autograd(_backward, setup_context=_setup_context)


class EagerMoeFfn(torch.autograd.Function):
    """`ssdfx::moe_ffn` without the dispatcher, for plain eager CPU tensors.

    The same kernels, the same saved layout and the same gradients as the custom op (tests
    compare the two bit for bit); what it skips is the custom op's Python dispatch and its
    autograd wrapper, about 90 us per forward+backward (at T=64, d=256 that was a fifth of the
    sparse FFN's time). `ssdfx.ops.moe_ffn` takes it only when `dispatch.plain_eager` holds:
    anything that traces, counts FLOPs or wraps tensors (torch.export, torch.compile,
    FlopCounterMode, FakeTensor, vmap) sees the custom op.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts, activation,
                dropout_p, backend):
        out = device_forward(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts,
                              activation, dropout_p, backend)
        _setup_context(ctx, (x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts,
                             activation, dropout_p, backend), out)
        return out[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        return _input_grads(ctx, dy, _device_backward)


def pair_count(expert_idx: Tensor) -> int:
    """Selected (token, expert) pairs: T*K minus the -1 slots.

    Fake tensors (torch.export, FakeTensorMode) carry no values, so for them the count is the
    upper bound T*K (every slot used).
    """
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(expert_idx) or expert_idx.device.type == "meta":
        return expert_idx.numel()
    return int((expert_idx >= 0).sum())


def _expert_flops(pairs: int, d: int, m: int, glu: bool) -> int:
    # per pair: x (1,d) @ (d,m) up-projection(s) and h (1,m) @ (m,d) down: 2*d*m FLOPs each
    return pairs * 2 * d * m * (3 if glu else 2)


@register_flop_formula(torch.ops.ssdfx.moe_ffn, get_raw=True)
def _moe_ffn_flops(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts, *args,
                   out_val=None, **kwargs) -> int:
    m = w1.shape[0] // num_experts
    return _expert_flops(pair_count(expert_idx), x.shape[-1], m, w3 is not None)


@register_flop_formula(torch.ops.ssdfx.moe_ffn_backward, get_raw=True)
def _moe_ffn_backward_flops(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets,
                            num_experts, *args, out_val=None, **kwargs) -> int:
    # twice the forward, like FlopCounterMode's convention for mm: one GEMM for the input
    # gradient and one for the weight gradient per forward GEMM
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(offsets) or offsets.device.type == "meta":
        pairs = order.numel()
    else:
        pairs = int(offsets[-1])
    m = w1.shape[0] // num_experts
    return 2 * _expert_flops(pairs, x.shape[-1], m, w3 is not None)
