"""moefy: FFN -> router + top-k selection + routed experts, with the same parameters.

Before (GPT-2's MLP, as fx traces it):

    view = hidden_states.view(-1, 768)
    addmm = torch.addmm(c_fc_bias, view, c_fc_weight)        # (T, 3072)
    ... tanh-GELU as mul/pow/tanh ...
    addmm_1 = torch.addmm(c_proj_bias, view_2, c_proj_weight)  # (T, 768)
    view_3 = addmm_1.view(...)

After:

    ssdfx_router = self.ssdfx_router(hidden_states)            # (..., E) scores
    select_top_k = ssdfx.routing.select_top_k(ssdfx_router, 4)  # indices, gates (..., k)
    ssdfx_experts = self.ssdfx_experts(hidden_states, c_fc_weight, c_fc_bias, c_proj_weight, None,
                                       None, getitem, getitem_1)  # experts = neuron blocks
    add = ssdfx_experts + c_proj_bias

The neuron partition is a parameter of the pass: a permutation `perm` (new neuron j = old
neuron perm[j]) is applied in place to the site's parameters, so expert e is the contiguous
block [e*m, (e+1)*m) and expert weights are views, not copies. It is stored as the buffer
`ssdfx_perm*` so `densify` (and ssdfx.revert) can restore the original order exactly.

Sites whose parts sit in sibling modules of an untraceable parent (BERT, OPT) are rewritten by
the passes in chain.py.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.fx as fx
from torch import nn

from ssdfx.errors import UnsupportedSiteError
from ssdfx.match import GraphView, find_sites
from ssdfx.modules import RoutedExperts
from ssdfx.routing import centroid_router, select_dynamic_k, select_top_k
from ssdfx.site import META_KEY, NodeInfo

from .infra import PassResult, SiteReport, permute_

__all__ = ["MoefyConfig", "moefy", "site_tensors", "validate_partition", "validate_experts",
           "validate_dynamic_k", "check_site"]


@dataclass(frozen=True)
class MoefyConfig:
    """num_experts E and top_k k for every site; `prefix` is the graph module's path in the model
    (parameter names in reports and `partitions` keys are fully qualified); `sites` limits the
    pass to these input-weight names; `partitions` maps a site's input-weight name to its neuron
    permutation (default: contiguous experts)."""

    num_experts: int
    top_k: int
    prefix: str = ""
    sites: frozenset[str] | None = None
    partitions: Mapping[str, torch.Tensor] = field(default_factory=dict)
    routers: Mapping[str, nn.Module] = field(default_factory=dict)
    dynamic_k: float | None = None
    backend: str = "auto"

    def __post_init__(self):
        validate_experts(self.num_experts, self.top_k)
        validate_dynamic_k(self.dynamic_k)


def validate_experts(num_experts, top_k) -> None:
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}; "
            f"pick top_k <= num_experts (top_k == num_experts reproduces the dense FFN)")


def validate_dynamic_k(coverage) -> None:
    number = isinstance(coverage, (int, float)) and not isinstance(coverage, bool)
    if coverage is not None and not (number and 0.0 < coverage <= 1.0):
        raise ValueError(f"dynamic_k is the activation-mass share each token's experts must cover, "
                         f"a number in (0, 1] (e.g. 0.9); got {coverage!r}")


def validate_partition(perm: torch.Tensor | None, d_ff: int, site: str) -> None:
    if perm is None:
        return
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or perm.shape != (d_ff,):
        raise UnsupportedSiteError(
            f"partition for {site} must be an int64 tensor of shape ({d_ff},) (a permutation of "
            f"the {d_ff} neurons), got {getattr(perm, 'dtype', type(perm))} {tuple(getattr(perm, 'shape', ()))}")
    if not torch.equal(perm.sort().values, torch.arange(d_ff)):
        raise UnsupportedSiteError(f"partition for {site} is not a permutation of range({d_ff})")


def check_site(site: str, activation: str, d_ff: int, num_experts: int) -> None:
    """Errors a user can fix, raised before anything changes."""
    if activation == "unknown":
        from ssdfx.activations import ACTIVATIONS
        raise UnsupportedSiteError(
            f"FFN {site}: its activation matches none of the supported ones {sorted(ACTIVATIONS)}; "
            f"replace it with a supported one (e.g. nn.ReLU() for a clamped ReLU such as ReLU6, "
            f"then train or fine-tune), or exclude the site with sites=[...]")
    if d_ff % num_experts:
        divisors = [e for e in range(1, min(d_ff, 256) + 1) if d_ff % e == 0]
        raise UnsupportedSiteError(
            f"FFN {site}: d_ff={d_ff} is not divisible by num_experts={num_experts}; "
            f"choose num_experts from {divisors}")


def site_tensors(w_in, w_out, w_up=None) -> list[tuple[str, int]]:
    """(parameter name, neuron dimension) of every tensor indexed by the FFN's neurons."""
    out = [(w_in.weight, w_in.neuron_dim_in)]
    if w_in.bias:
        out.append((w_in.bias, 0))
    if w_up is not None:
        out.append((w_up.weight, w_up.neuron_dim_in))
        if w_up.bias:
            out.append((w_up.bias, 0))
    out.append((w_out.weight, w_out.neuron_dim_out))
    return out


def _rel(name: str, prefix: str) -> str:
    if not prefix:
        return name
    if not name.startswith(prefix + "."):
        raise ValueError(f"parameter {name} is not inside {prefix}")
    return name[len(prefix) + 1:]


def _tag(nodes, site: str, role: str) -> None:
    for n in nodes:
        n.meta[META_KEY] = NodeInfo("moefy", site, role)


def _weight(graph: fx.Graph, target: str, site: str, role: str) -> fx.Node:
    """The parameter itself: passing a parameter (not a view made in the graph) keeps autograd
    hooks, e.g. FlopCounterMode's module tracking under no_grad, working."""
    w = graph.get_attr(target)
    _tag([w], site, role)
    return w


@dataclass(frozen=True)
class _Targets:
    """get_attr targets of one site, relative to the graph module that runs the routed op."""

    w1: str
    w1_t: bool
    b1: str | None
    w2: str
    w2_t: bool  # True when stored (F, d): the op wants (d, F)
    w3: str | None = None
    w3_t: bool = False
    b3: str | None = None


def _emit(graph: fx.Graph, x: fx.Node, t: _Targets, router: str, experts: str, top_k: int,
          site: str, dynamic_k: float | None = None) -> fx.Node:
    scores = graph.call_module(router, (x,))
    if dynamic_k is None:
        sel = graph.call_function(select_top_k, (scores, top_k))
    else:
        sel = graph.call_function(select_dynamic_k, (scores, dynamic_k, top_k))
    idx = graph.call_function(operator.getitem, (sel, 0))
    gate = graph.call_function(operator.getitem, (sel, 1))
    _tag([scores], site, "router")
    _tag([sel, idx, gate], site, "select")
    w1 = _weight(graph, t.w1, site, "w1")
    b1 = graph.get_attr(t.b1) if t.b1 else None
    w2 = _weight(graph, t.w2, site, "w2")
    w3 = _weight(graph, t.w3, site, "w3") if t.w3 else None
    # HF Conv1D stores (in, out): the module transposes inside (a free view)
    graph.owning_module.get_submodule(experts).layout = (t.w1_t, t.w2_t, t.w3_t)
    b3 = graph.get_attr(t.b3) if t.b3 else None
    _tag([n for n in (b1, b3) if n is not None], site, "bias")
    y = graph.call_module(experts, (x, w1, b1, w2, w3, b3, idx, gate))
    _tag([y], site, "experts")
    return y


def _flops_per_token(d: int, f: int, glu: bool, e: int, k: int, router: nn.Module) -> tuple[int, int]:
    """Forward FLOPs per token: dense FFN, and router + k/E of it (max k for dynamic-k)."""
    dense = 2 * d * f * (3 if glu else 2)
    router_flops = sum(2 * m.in_features * m.out_features for m in router.modules() if isinstance(m, nn.Linear))
    router_flops = router_flops or 2 * d * e  # CentroidRouter: one (d, E) matmul
    return dense, router_flops + dense * k // e


def _install(gm: fx.GraphModule, suffix: str, router: nn.Module, experts: nn.Module,
             perm: torch.Tensor) -> tuple[str, str]:
    rname, ename = f"ssdfx_router{suffix}", f"ssdfx_experts{suffix}"
    router.train(gm.training)
    experts.train(gm.training)
    gm.add_submodule(rname, router)
    gm.add_submodule(ename, experts)
    gm.register_buffer(f"ssdfx_perm{suffix}", perm.clone())
    return rname, ename


def _permute_site(owner: nn.Module, prefix: str, tensors, perm: torch.Tensor) -> None:
    for name, dim in tensors:
        permute_(owner.get_parameter(_rel(name, prefix)), perm, dim)


def moefy(gm: fx.GraphModule, config: MoefyConfig) -> PassResult:
    """Rewrite every FFN of `gm` (or those in config.sites) into routed experts."""
    view = GraphView.of_module(gm, config.prefix)
    matches = [m for m in find_sites(view) if config.sites is None or m.w_in.weight in config.sites]
    for m in matches:
        check_site(m.w_in.weight, m.activation, m.w_in.out_features, config.num_experts)
        validate_partition(config.partitions.get(m.w_in.weight), m.w_in.out_features, m.w_in.weight)
    reports = []
    for i, m in enumerate(matches):
        reports.append(_rewrite(gm, m, config, "" if len(matches) == 1 else f"_{i}"))
    return PassResult(gm, bool(reports), tuple(reports))


def _rewrite(gm: fx.GraphModule, m, config: MoefyConfig, suffix: str) -> SiteReport:
    e, k, p = config.num_experts, config.top_k, config.prefix
    f, d = m.w_in.out_features, m.w_in.in_features
    site = m.w_in.weight
    perm = config.partitions.get(site, torch.arange(f))
    tensors = site_tensors(m.w_in, m.w_out, m.w_up)
    _permute_site(gm, p, tensors, perm)
    router = config.routers.get(site)
    if router is None:
        w_act = gm.get_parameter(_rel(m.w_in.weight, p))
        router = centroid_router(w_act.t() if m.w_in.transposed else w_act, e)
    experts = RoutedExperts(e, m.activation, m.dropout_p, config.backend)
    rname, ename = _install(gm, suffix, router, experts, perm)
    t = _Targets(
        _rel(m.w_in.weight, p), m.w_in.transposed, m.w_in.bias and _rel(m.w_in.bias, p),
        _rel(m.w_out.weight, p), m.w_out.transposed,
        m.w_up and _rel(m.w_up.weight, p), bool(m.w_up and m.w_up.transposed),
        m.w_up and m.w_up.bias and _rel(m.w_up.bias, p),
    )
    graph = gm.graph
    before = len(graph.nodes)
    with graph.inserting_before(m.w_out.out):
        y = _emit(graph, m.x, t, rname, ename, k, site, config.dynamic_k)
        if m.w_out.bias:
            b2 = graph.get_attr(_rel(m.w_out.bias, p))
            y = graph.call_function(operator.add, (y, b2))
            _tag([b2, y], site, "bias_out")
    m.w_out.out.replace_all_uses_with(y)
    dense, sparse = _flops_per_token(d, f, m.w_up is not None, e, k, router)
    new_params = [("", f"{p}.{rname}.{n}".lstrip(".")) for n, _ in router.named_parameters()]
    return SiteReport(
        site=site, path=p, nodes_erased=len(m.nodes), nodes_created=len(graph.nodes) - before,
        params=tuple(new_params + [(n, n) for n, _ in tensors]),
        permuted=tuple(tensors), permutation=perm, flops_before=dense, flops_after=sparse)
