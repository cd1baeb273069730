"""Routers (which experts a token gets) and selection (top-k, dynamic-k).

A router maps tokens to one score per expert. Selection turns scores into expert indices and
gates. Gates are exactly 1.0 in the forward pass, so selecting every expert reproduces the dense
FFN bit for bit up to summation order; their gradient is a softmax's (straight-through), so the
router still learns. The router reads a detached copy of its input: routing must not change the
gradient the rest of the model sees (with k == E, every dense parameter gets the dense gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CentroidRouter", "centroids", "select_top_k", "straight_through"]


def centroids(w_act: torch.Tensor, num_experts: int, w_up: torch.Tensor | None = None) -> torch.Tensor:
    """(E, d) expert centroids in input space from neuron weight rows (F, d), experts contiguous.

    c_e = normalised mean of expert e's L2-normalised input rows (SPEC section 2). For a GLU FFN
    the activated (gate) rows decide which neurons fire, so they define the centroid.
    """
    f, d = w_act.shape
    rows = F.normalize(w_act.detach().float(), dim=1)  # (F, d)
    c = rows.reshape(num_experts, f // num_experts, d).mean(dim=1)  # (E, d)
    return F.normalize(c, dim=1)


class CentroidRouter(nn.Module):
    """score_e(x) = x . c_e, one row of `weight` per expert; rebuilt at every conversion."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())  # (E, d)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.detach().to(self.weight.dtype), self.weight)  # (..., E)

    def extra_repr(self) -> str:
        e, d = self.weight.shape
        return f"experts={e}, d_model={d}"


def straight_through(probs: torch.Tensor) -> torch.Tensor:
    """Exactly 1.0 forward, d/dprobs = 1 backward. (p - p) is exactly 0, so + 1 is exactly 1."""
    return (probs - probs.detach()) + 1.0


def select_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest-scoring experts per token: indices (..., k) int64 and gates (..., k)."""
    probs = torch.softmax(scores.float(), dim=-1)  # (..., E)
    top, idx = probs.topk(k, dim=-1, sorted=False)  # (..., k)
    return idx, straight_through(top)
