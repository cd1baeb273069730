"""The activation functions an FFN site may use, by name.

The matcher identifies a site's activation numerically (it evaluates the traced elementwise
chain and compares it with these functions), so any decomposition of, say, tanh-GELU is
recognised. The sparse operator takes the name and implements each function and its
derivative in every kernel.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "activation_backward", "activation_fn", "is_relu_like"]


def _relu2(x: torch.Tensor) -> torch.Tensor:
    # squared ReLU (Primer, So et al. 2021); sparse like ReLU
    return torch.relu(x).square()


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "relu2": _relu2,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": F.silu,
    "quick_gelu": _quick_gelu,
    "identity": lambda x: x,
}

# Activations whose output is exactly zero for inactive neurons (sparsity = non-zero count).
_RELU_LIKE = frozenset({"relu", "relu2"})


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}"
        ) from None


def is_relu_like(name: str) -> bool:
    return name in _RELU_LIKE


def gelu_tanh_coeff() -> tuple[float, float]:
    """sqrt(2/pi) and the cubic coefficient of the tanh approximation of GELU."""
    return math.sqrt(2.0 / math.pi), 0.044715


def activation_backward(name: str, grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """grad * act'(a): the derivative of `activation_fn(name)` at pre-activation `a`.

    The sparse operator's torch kernels (reference, torch path, padded, grouped_mm) write their
    own backward (autograd over per-expert slices is slow), so each activation needs its
    derivative. Where ATen has a backward kernel we call it, so their gradients match the dense
    FFN's autograd bit for bit in the elementwise part; the others are closed forms. (The numba
    kernels compute the derivative in numba instead, `ssdfx.ops.numba_act.activate_grad`.)
    """
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, a, 0)
    if name == "relu2":
        return grad * (2.0 * torch.relu(a))
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, a, approximate="none")
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, a, approximate="tanh")
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, a)
    if name == "quick_gelu":
        s = torch.sigmoid(1.702 * a)
        return grad * (s + 1.702 * a * s * (1.0 - s))
    if name == "identity":
        return grad
    activation_fn(name)  # raises the ValueError naming the supported set
    raise AssertionError("unreachable")
