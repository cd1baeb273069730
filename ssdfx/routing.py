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

from ssdfx.fx_leaf import graph_leaf
from ssdfx.ops.cpu_numba import top_k_indices
from ssdfx.ops.dispatch import widens

__all__ = [
    "CentroidRouter", "MLPRouter", "centroids", "select_top_k", "select_dynamic_k",
    "straight_through", "fit_temperature", "train_mlp_router", "build_router", "centroid_router",
]


def centroids(w_act: torch.Tensor, num_experts: int, w_up: torch.Tensor | None = None) -> torch.Tensor:
    """(E, d) expert centroids in input space from neuron weight rows (F, d), experts contiguous.

    c_e = normalised mean of expert e's L2-normalised input rows (SPEC section 2). For a GLU FFN
    the activated (gate) rows decide which neurons fire, so they define the centroid.
    """
    f, d = w_act.shape
    rows = F.normalize(w_act.detach().float(), dim=1)  # (F, d)
    c = rows.reshape(num_experts, f // num_experts, d).mean(dim=1)  # (E, d)
    return F.normalize(c, dim=1)


@graph_leaf  # one node when fx traces a router: its dtype check would be a traced branch
def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
            detach: bool = False) -> torch.Tensor:
    """F.linear in w's dtype, of x detached from its graph if `detach`. A bf16/fp16 router on
    a CPU where torch has no native GEMM in that dtype (`ssdfx.ops.dispatch.widens`; AVX2-only
    CPUs, where torch's generic loop ran at 1-3 GFLOP/s) computes in float32 and rounds the
    scores to w's dtype, as the experts do there (`ssdfx.ops.widened`). No call where there
    is nothing to detach or cast: right after a dense forward each torch call from Python
    costs a few us, and the router is on every sparse forward's path."""
    if detach and x.requires_grad:
        x = x.detach()
    if x.dtype != w.dtype:
        x = x.to(w.dtype)
    if widens(w):
        return F.linear(x.float(), w.float(), b.float() if b is not None else None).to(w.dtype)
    return F.linear(x, w, b)


class CentroidRouter(nn.Module):
    """score_e(x) = (x . c_e) / temperature, one row of `weight` per expert.

    Rebuilt at every conversion. The temperature does not change which experts top-k picks;
    it makes softmax(scores) a calibrated estimate of each expert's share of the activation
    mass, which dynamic-k needs (see fit_temperature).
    """

    def __init__(self, weight: torch.Tensor, temperature: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())  # (E, d)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place: the scores are the product's own fresh tensor (one allocation less)
        return _linear(x, self.weight, detach=True).div_(self.temperature)  # (..., E)

    def extra_repr(self) -> str:
        e, d = self.weight.shape
        return f"experts={e}, d_model={d}, temperature={self.temperature.item():.3g}"


class MLPRouter(nn.Module):
    """A small MLP trained to predict each expert's share of a token's activation mass."""

    def __init__(self, d_model: int, num_experts: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))

    @property
    def num_experts(self) -> int:
        return self.net[-1].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, act, last = self.net
        return _linear(act(_linear(x, first.weight, first.bias, detach=True)), last.weight,
                       last.bias)  # (..., E)


def _soft_ce(scores: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    return -(share * torch.log_softmax(scores, dim=-1)).sum(-1).mean()


def fit_temperature(scores: torch.Tensor, mass: torch.Tensor) -> float:
    """The temperature t minimising cross-entropy between softmax(scores / t) and the observed
    per-expert mass shares (scores, mass: (N, E)). A 1-D search: cheap and robust."""
    share = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)
    grid = torch.logspace(-3, 3, 121)
    losses = torch.stack([_soft_ce(scores / t, share) for t in grid])
    return float(grid[losses.argmin()])


def train_mlp_router(x: torch.Tensor, mass: torch.Tensor, *, hidden: int = 128, steps: int = 300,
                     lr: float = 3e-3, seed: int = 0) -> MLPRouter:
    """Fit an MLPRouter on observed inputs x (N, d) and per-expert mass (N, E)."""
    g = torch.Generator().manual_seed(seed)
    share = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        router = MLPRouter(x.shape[1], mass.shape[1], hidden)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    with torch.enable_grad():  # convert may run under no_grad (inference); fitting needs autograd
        _fit(router, opt, x, share, mu, sd, steps, g)
    # fold the input standardisation into the first layer, so the router reads raw x
    with torch.no_grad():
        lin = router.net[0]
        lin.bias -= (lin.weight * (mu / sd)).sum(1)
        lin.weight /= sd
    return router


def _fit(router, opt, x, share, mu, sd, steps, g) -> None:
    n = x.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(512, n),), generator=g)
        loss = _soft_ce(router.net((x[idx] - mu) / sd), share[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def straight_through(probs: torch.Tensor) -> torch.Tensor:
    """Exactly 1.0 forward, d/dprobs = 1 backward. (p - p) is exactly 0, so + 1 is exactly 1."""
    return (probs - probs.detach()) + 1.0


def _top_k_indices(scores: torch.Tensor, k: int, sorted: bool = True) -> torch.Tensor:
    """scores.topk(k, dim=-1).indices, largest first if `sorted` (numba's are always); on CPU
    through numba's kernel where it applies (`ssdfx.ops.cpu_numba.top_k_indices`, 4-7x faster
    than torch.topk on fresh data at T=512, E<=32), else torch.topk."""
    idx = top_k_indices(scores, k)
    return scores.topk(k, dim=-1, sorted=sorted).indices if idx is None else idx


@graph_leaf
def select_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest-scoring experts per token: indices (..., k) int64 and gates (..., k),
    exactly 1.0 forward, with the gradient of softmax(scores) at the chosen experts.

    The experts are ranked by their scores: softmax is monotonic, so these are top k of the
    probabilities too. Where no gradient is recorded (inference, or scores that need none)
    the gates are plain ones and no softmax is computed (at T=8192, E=8 torch's softmax over
    the 8 experts took ~440 us of a 5.4 ms bf16 sparse forward, d=256). A custom autograd
    Function that deferred the softmax to the backward was tried for training and was slower
    at small T (fp32, T=64, d=256, E=16, k=4: forward+backward 1.84 against 1.59 ms): its
    backward is Python calling several ops, the softmax's own is one fused node.
    """
    if scores.dtype != torch.float32:
        scores = scores.float()  # (..., E)
    idx = _top_k_indices(scores, k, sorted=False)  # (..., k)
    if not (torch.is_grad_enabled() and scores.requires_grad):
        return idx, scores.new_ones(idx.shape)
    return idx, straight_through(torch.softmax(scores, dim=-1).gather(-1, idx))


@graph_leaf
def select_dynamic_k(scores: torch.Tensor, coverage: float, max_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the fewest experts whose predicted mass share (softmax of the scores) reaches
    `coverage`, at most `max_k`. Unused slots hold expert index -1 (the op skips them)."""
    probs = torch.softmax(scores.float(), dim=-1)  # (..., E)
    idx = _top_k_indices(probs, max_k)  # (..., max_k), largest first
    top = probs.gather(-1, idx)
    keep = (top.cumsum(-1) - top) < coverage  # slot j is needed while the mass before it < target
    return idx.masked_fill(~keep, -1), straight_through(top) * keep


def _weights_dtype(w: torch.Tensor) -> torch.dtype:
    return w.dtype if w.is_floating_point() else torch.float32


def centroid_router(w_act: torch.Tensor, num_experts: int, x: torch.Tensor | None = None,
                    mass: torch.Tensor | None = None) -> CentroidRouter:
    """A CentroidRouter for neuron rows w_act (F, d), experts contiguous, in w_act's dtype
    (`build_router` says why). Given observed inputs x (N, d) and their per-expert activation
    mass (N, E), its temperature is fitted first, in float32 (for dynamic-k)."""
    router = CentroidRouter(centroids(w_act, num_experts))
    if x is not None:
        with torch.no_grad():
            router.temperature.fill_(fit_temperature(router(x), mass))
    return router.to(_weights_dtype(w_act))


def build_router(kind: str, site, model: nn.Module, perm: torch.Tensor | None, num_experts: int,
                 stats=None, calibrate: bool = False) -> nn.Module:
    """A router for `site` split by `perm` (None: contiguous): "centroid" or "mlp", in the
    dtype of the site's weights.

    "mlp" and `calibrate` (the centroid router's temperature, for dynamic-k) need the site's
    observed statistics `stats` (ssdfx.observe). Routers are fitted in float32 and then take
    the weights' dtype, so that a bf16 model's router reads x as it is: a float32 router cast
    the (T, d) input to float32 on every call and ran its GEMM at float32 speed (bf16, d=768,
    AMD Zen 4: 0.5 ms against 0.2 at T=2048, E=16; 4.5 against 0.9 at T=8192, E=32; the whole
    converted FFN, alternated in one process: T=2048, d=768, E=16, k=4 forward 1.05x, forward
    + backward 1.14x; T=8192, d=768, E=32, k=4 1.08x / 1.07x; d=256 unchanged). The scores go
    to float32 before top-k either way (`select_top_k`), as HF's MoE models do with their
    gate's bf16 logits; bf16 rounding of the scores changed the chosen set of 4 experts (of 16
    or 32) for 0.6-1.2% of random tokens (near-ties).
    """
    from ssdfx.stats import expert_mass, site_weights

    if perm is None:
        perm = torch.arange(site.d_ff)
    if kind == "mlp" or calibrate:
        if stats is None:
            raise ValueError(f"router={kind!r}" + (" with dynamic_k" if calibrate else "") +
                             " needs activation statistics: pass stats=ssdfx.observe(model, batches)")
        mass = expert_mass(stats.mass, perm, num_experts)  # (N, E)
    if kind not in ("centroid", "mlp"):
        raise ValueError(f"unknown router {kind!r}; choose 'centroid' or 'mlp'")
    w1 = site_weights(model, site)["w1"]
    if kind == "mlp":
        return train_mlp_router(stats.x, mass).to(_weights_dtype(w1))
    if calibrate:
        return centroid_router(w1[perm], num_experts, stats.x, mass)
    return centroid_router(w1[perm], num_experts)
