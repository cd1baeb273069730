"""When is the activation pattern stable enough to go sparse? (SPEC section 2)

Every check re-splits each FFN on the current weights and measures, on a probe batch, the
*coverage* of a split: for each token take the top-k experts by true activation mass; coverage is
their share of the token's total mass. The pattern is stable when the previous split's coverage
is within `tol` of the fresh split's, averaged over layers, at `patience` consecutive checks.
The trigger is this change, not the absolute coverage (small models cover well under 90% at
k/E = 1/4 even when settled). The adjusted Rand index between consecutive splits is logged as a
diagnostic only: two k-means runs on the same weights already agree little label by label.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ssdfx.stats import SiteStats, expert_mass
from ssdfx.split import kmeans_split, labels_of

__all__ = ["coverage", "routed_coverage", "oracle_mean_k", "adjusted_rand_index", "LayerStability",
           "StabilityReport", "StabilityMonitor"]


def coverage(mass: torch.Tensor, perm: torch.Tensor, num_experts: int, k: int) -> float:
    """Mean over tokens of the share of activation mass in the token's top-k experts (by mass)."""
    em = expert_mass(mass, perm, num_experts)  # (N, E)
    total = em.sum(-1)
    ok = total > 0
    return (em.topk(k, dim=-1).values.sum(-1)[ok] / total[ok]).mean().item()


def routed_coverage(mass: torch.Tensor, perm: torch.Tensor, num_experts: int, idx: torch.Tensor) -> float:
    """Mean share of activation mass inside the experts a router selected (idx (N, k), -1 = none)."""
    em = expert_mass(mass, perm, num_experts)  # (N, E)
    sel = torch.zeros_like(em, dtype=torch.bool)
    valid = idx >= 0
    rows = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)
    sel[rows[valid], idx[valid]] = True
    total = em.sum(-1)
    ok = total > 0
    return ((em * sel).sum(-1)[ok] / total[ok]).mean().item()


def oracle_mean_k(mass: torch.Tensor, perm: torch.Tensor, num_experts: int, target: float) -> float:
    """Mean number of experts (taken by true mass) a token needs to reach `target` coverage."""
    em = expert_mass(mass, perm, num_experts)
    share = em / em.sum(-1, keepdim=True).clamp_min(1e-30)
    srt = share.sort(-1, descending=True).values.cumsum(-1)
    return ((srt < target).sum(-1) + 1).clamp(max=num_experts).float().mean().item()


def adjusted_rand_index(a: torch.Tensor, b: torch.Tensor) -> float:
    """Adjusted Rand index of two labelings (Hubert & Arabie 1985): 1 = identical, ~0 = chance."""
    a, b = a.long(), b.long()
    n = a.numel()
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    table.index_put_((a, b), torch.ones(n, dtype=torch.float64), accumulate=True)

    def pairs(t):
        return (t * (t - 1) / 2).sum()

    index = pairs(table)
    ra, rb = pairs(table.sum(1)), pairs(table.sum(0))
    expected = ra * rb / (n * (n - 1) / 2)
    maximum = (ra + rb) / 2
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))


@dataclass(frozen=True)
class LayerStability:
    site: str
    sparsity: float
    coverage_fresh: float
    coverage_prev: float | None
    ari: float | None

    @property
    def delta(self) -> float | None:
        return None if self.coverage_prev is None else self.coverage_fresh - self.coverage_prev


@dataclass(frozen=True)
class StabilityReport:
    step: int
    layers: tuple[LayerStability, ...]
    mean_delta: float | None
    streak: int
    stable: bool
    partitions: dict = field(compare=False, repr=False)

    def as_dict(self) -> dict:
        return {
            "step": self.step, "mean_delta": self.mean_delta, "streak": self.streak, "stable": self.stable,
            "sparsity": [l.sparsity for l in self.layers],
            "coverage": [l.coverage_fresh for l in self.layers],
            "coverage_prev": [l.coverage_prev for l in self.layers],
            "ari": [l.ari for l in self.layers],
        }


class StabilityMonitor:
    """Tracks splits across checks and decides when the pattern is stable."""

    def __init__(self, num_experts: int, top_k: int, tol: float = 0.03, patience: int = 2):
        if not 0 < tol < 1:
            raise ValueError(f"stability tol must be in (0, 1), got {tol}")
        self.num_experts, self.top_k, self.tol, self.patience = num_experts, top_k, tol, patience
        self.previous: dict[str, torch.Tensor] = {}
        self.streak = 0

    def check(self, model: nn.Module, stats: dict[str, SiteStats], step: int = 0) -> StabilityReport:
        layers, fresh = [], {}
        for name, st in stats.items():
            prev = self.previous.get(name)
            perm = kmeans_split(st.site, model, self.num_experts, previous=prev)
            fresh[name] = perm
            mass = st.mass
            layers.append(LayerStability(
                name, st.sparsity,
                coverage(mass, perm, self.num_experts, self.top_k),
                None if prev is None else coverage(mass, prev, self.num_experts, self.top_k),
                None if prev is None else adjusted_rand_index(labels_of(prev, self.num_experts),
                                                              labels_of(perm, self.num_experts)),
            ))
        deltas = [l.delta for l in layers if l.delta is not None]
        mean_delta = sum(deltas) / len(deltas) if deltas else None
        self.streak = self.streak + 1 if mean_delta is not None and mean_delta <= self.tol else 0
        self.previous = fresh
        return StabilityReport(step, tuple(layers), mean_delta, self.streak,
                               self.streak >= self.patience, fresh)

    def reset(self) -> None:
        """After a sparse phase the pattern must prove itself stable again."""
        self.streak = 0

    def state_dict(self) -> dict:
        return {"previous": dict(self.previous), "streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.previous = dict(state["previous"])
        self.streak = int(state["streak"])
