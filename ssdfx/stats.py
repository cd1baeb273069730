"""Activation statistics of FFN sites: sparsity, activation mass, co-activation.

`observe(model, batches)` inserts the `observe` pass's input recorders into every site (through
the same scopes convert uses), runs the batches, puts the original modules back, and computes
each site's statistics from the recorded inputs and the current weights. The model's outputs
are never affected.

A neuron is active for a token when its activation is non-zero (ReLU, ReLU^2). For GELU/SiLU/GLU
it is active when |a| > eps, with eps calibrated per site so that dropping the inactive neurons
changes the FFN output by less than `output_tolerance` (relative norm; SPEC section 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ssdfx.activations import activation_fn, is_relu_like
from ssdfx.site import FFNSite

__all__ = ["SiteStats", "observe", "site_weights", "hidden", "calibrate_eps", "expert_mass"]


@dataclass
class SiteStats:
    """Statistics of one site over `x` (its recorded inputs), in the model's current neuron order."""

    site: FFNSite
    x: torch.Tensor  # (N, d) recorded inputs
    h: torch.Tensor  # (N, F) activations (post-activation, GLU product included)
    eps: float
    tokens_seen: int = 0
    _active: torch.Tensor | None = field(default=None, repr=False)

    @property
    def active(self) -> torch.Tensor:
        """(N, F) bool: neuron active for token."""
        if self._active is None:
            self._active = self.h.abs() > self.eps
        return self._active

    @property
    def sparsity(self) -> float:
        """1 - mean fraction of active neurons per token."""
        return 1.0 - self.active.float().mean().item()

    @property
    def mass(self) -> torch.Tensor:
        """(N, F) activation mass |a| of each neuron for each token."""
        return self.h.abs()

    def coactivation(self) -> torch.Tensor:
        """(F, F) how many recorded tokens activate both neurons."""
        a = self.active.float()
        return a.T @ a


def site_weights(model: nn.Module, site: FFNSite) -> dict[str, torch.Tensor | None]:
    """w1 (F, d), b1, w3 (F, d), b3, w2 (d, F) of a site, in the op's layout (views, detached)."""
    def get(name):
        return None if name is None else model.get_parameter(name).detach()

    w1 = get(site.w_in.weight)
    w2 = get(site.w_out.weight)
    out = {
        "w1": w1.t() if site.w_in.transposed else w1,
        "b1": get(site.w_in.bias),
        "w2": w2.t() if site.w_out.transposed else w2,
        "w3": None, "b3": None,
    }
    if site.w_up is not None:
        w3 = get(site.w_up.weight)
        out["w3"] = w3.t() if site.w_up.transposed else w3
        out["b3"] = get(site.w_up.bias)
    return out


def hidden(site: FFNSite, w: Mapping[str, torch.Tensor | None], x: torch.Tensor) -> torch.Tensor:
    """(N, F) FFN activations for inputs x (N, d), computed from the weights."""
    x = x.to(w["w1"].dtype)
    h = activation_fn(site.activation)(F.linear(x, w["w1"], w["b1"]))
    if w["w3"] is not None:
        h = h * F.linear(x, w["w3"], w["b3"])
    return h


def calibrate_eps(h: torch.Tensor, w2: torch.Tensor, tolerance: float = 0.01) -> float:
    """The largest eps such that zeroing |h| <= eps changes h @ w2^T by < tolerance (rel. norm).

    The output error grows with eps (more neurons dropped), so a bisection on eps finds it.
    """
    h = h[:: max(1, h.shape[0] // 1024)]  # 1k tokens pin eps down well; 40 matmuls stay cheap
    y = h @ w2.T
    norm = y.norm().clamp_min(1e-30)
    a = h.abs()
    lo, hi = 0.0, float(a.max())
    for _ in range(30):
        mid = (lo + hi) / 2
        err = ((h * (a <= mid)) @ w2.T).norm() / norm
        lo, hi = (mid, hi) if err < tolerance else (lo, mid)
    return lo


def expert_mass(mass: torch.Tensor, perm: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N, E) activation mass per expert for a partition `perm` (expert e = perm[e*m:(e+1)*m])."""
    n, f = mass.shape
    return mass[:, perm].reshape(n, num_experts, f // num_experts).sum(-1)


def stats_from_inputs(model: nn.Module, site: FFNSite, x: torch.Tensor, seen: int = 0,
                      output_tolerance: float = 0.01) -> SiteStats:
    w = site_weights(model, site)
    with torch.no_grad():
        h = hidden(site, w, x).float()
        eps = 0.0 if is_relu_like(site.activation) else calibrate_eps(h, w["w2"].float(), output_tolerance)
    return SiteStats(site, x, h, eps, seen)


def observe(model: nn.Module, batches: Iterable, *, sites: list[FFNSite] | None = None,
            max_tokens: int = 4096, output_tolerance: float = 0.01) -> dict[str, SiteStats]:
    """Run `batches` (each a dict of model kwargs, or a tuple of args) through the model with
    input recorders on every site; return {site name: SiteStats}. The model is left as it was.

    A dict batch's `attention_mask` (B, S) excludes padding positions from the statistics of
    sites whose input is (B, S, d); encoder-decoder models (config.is_encoder_decoder) are
    recorded unmasked, as their decoder runs on other positions than the mask describes.
    """
    from ssdfx.api import find_ffns, is_converted
    from ssdfx.capture import require_traced, swap_module
    from ssdfx.passes import run_pass
    from ssdfx.passes.observe import InputRecorder, ObservePassConfig, observe as observe_pass

    if is_converted(model):
        raise ValueError("observe needs the dense model; call ssdfx.revert(model) first")
    sites = find_ffns(model) if sites is None else list(sites)
    holders: dict[str, list[FFNSite]] = {}
    for s in sites:
        holder = s.scope.path if s.scope.kind == "module" else s.scope.children[0]
        holders.setdefault(holder, []).append(s)
    holders = _outermost(holders)
    recorders = {s.name: InputRecorder(max_tokens) for s in sites}
    swapped = {}
    try:
        for path, group in holders.items():
            gm = require_traced(model.get_submodule(path), path)
            res = run_pass(observe_pass, gm, ObservePassConfig({s.name: recorders[s.name] for s in group}, path))
            if len(res.report) != len(group):
                raise RuntimeError(f"observe: could not attach to every site in {path}")
            swapped[path] = swap_module(model, path, gm)
        masked = not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) and masked else None
                for r in recorders.values():
                    r.mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                model(**batch) if isinstance(batch, Mapping) else model(*batch)
    finally:
        for r in recorders.values():
            r.mask = None
        for path, original in swapped.items():
            swap_module(model, path, original)
    return {s.name: stats_from_inputs(model, s, recorders[s.name].sample(), recorders[s.name].seen,
                                      output_tolerance) for s in sites}


def _outermost(holders: dict[str, list]) -> dict[str, list]:
    out: dict[str, list] = {}
    for path in sorted(holders, key=len):
        outer = next((o for o in out if o == "" or path.startswith(o + ".")), None)
        out.setdefault(outer or path, []).extend(holders[path])
    return out
