"""The module that runs the routed experts of one site in a rewritten graph.

It holds no parameters: the expert weights stay where they were (same nn.Parameter objects,
same names), and the graph passes them in. Being a module lets it follow train()/eval() for the
dropout inside the FFN, and shows the site's configuration when the GraphModule is printed.
"""

from __future__ import annotations

import torch
from torch import nn

from ssdfx.activations import activation_fn
from ssdfx.ops import moe_ffn

__all__ = ["RoutedExperts"]


class RoutedExperts(nn.Module):
    def __init__(self, num_experts: int, activation: str, dropout_p: float = 0.0, backend: str = "auto"):
        super().__init__()
        activation_fn(activation)  # validates the name
        self.num_experts = num_experts
        self.activation = activation
        self.dropout_p = dropout_p
        self.backend = backend
        # whether w1, w2, w3 arrive stored transposed (HF Conv1D: (in, out)); the op wants
        # w1, w3 as (F, d) and w2 as (d, F)
        self.layout = (False, False, False)

    def forward(self, x, w1, b1, w2, w3, b3, expert_idx, gate) -> torch.Tensor:
        t1, t2, t3 = self.layout
        w1 = w1.t() if t1 else w1
        w2 = w2.t() if t2 else w2
        w3 = w3.t() if (t3 and w3 is not None) else w3
        return moe_ffn(
            x, w1, b1, w2, w3, b3, expert_idx, gate.to(x.dtype),
            num_experts=self.num_experts,
            activation=self.activation,
            dropout_p=self.dropout_p if self.training else 0.0,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        s = f"experts={self.num_experts}, activation={self.activation}"
        if self.dropout_p:
            s += f", dropout={self.dropout_p}"
        if any(self.layout):
            s += ", transposed=" + "".join("T" if t else "-" for t in self.layout)
        return s + ("" if self.backend == "auto" else f", backend={self.backend}")
