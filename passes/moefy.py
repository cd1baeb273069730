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
    t = c_fc_weight.t()                                          # (3072, 768), experts = row blocks
    ssdfx_experts = self.ssdfx_experts(hidden_states, t, c_fc_bias, t_1, None, None, getitem, getitem_1)
    add = ssdfx_experts + c_proj_bias

The neuron partition is a parameter of the pass: a permutation `perm` (new neuron j = old
neuron perm[j]) is applied in place to the site's parameters, so expert e is the contiguous
block [e*m, (e+1)*m) and expert weights are views, not copies. It is stored as the buffer
`ssdfx_perm*` so `densify` (and ssdfx.revert) can restore the original order exactly.

Sites whose parts sit in sibling modules of an untraceable parent (BERT, OPT) are rewritten by
three smaller passes over the children: `moefy_head` (computes the whole routed FFN where the
input projection was), `bypass` (children in between become identities) and `hoist_out` (the
output projection keeps only its bias add).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.fx as fx
from torch import nn

from ssdfx.errors import UnsupportedSiteError
from ssdfx.match import GraphView, LinearMatch, find_sites, linear_matches, walk_back, dead_closure
from ssdfx.modules import RoutedExperts
from ssdfx.routing import CentroidRouter, centroids, select_top_k
from ssdfx.site import META_KEY, FFNSite, NodeInfo

from .infra import PassResult, SiteReport, permute_

__all__ = ["MoefyConfig", "HeadConfig", "moefy", "moefy_head", "bypass", "hoist_out",
           "site_tensors", "validate_partition"]

PEER = "_ssdfx_peer"  # unregistered attribute of a chain head: the tail that owns w_out


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
    backend: str = "auto"

    def __post_init__(self):
        validate_experts(self.num_experts, self.top_k)


def validate_experts(num_experts, top_k) -> None:
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}; "
            f"pick top_k <= num_experts (top_k == num_experts reproduces the dense FFN)")


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
            f"use ssdfx.passes.relufy to swap it for ReLU, or exclude the site with sites=[...]")
    if d_ff % num_experts:
        divisors = [e for e in range(2, min(d_ff, 64) + 1) if d_ff % e == 0]
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


def _weight(graph: fx.Graph, target: str, transposed: bool, site: str, role: str) -> fx.Node:
    """A weight in the (neurons, d) or (d, neurons) layout the op expects."""
    w = graph.get_attr(target)
    _tag([w], site, role)
    if transposed:
        w = graph.call_method("t", (w,))
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
          site: str) -> fx.Node:
    scores = graph.call_module(router, (x,))
    sel = graph.call_function(select_top_k, (scores, top_k))
    idx = graph.call_function(operator.getitem, (sel, 0))
    gate = graph.call_function(operator.getitem, (sel, 1))
    _tag([scores], site, "router")
    _tag([sel, idx, gate], site, "select")
    w1 = _weight(graph, t.w1, t.w1_t, site, "w1")
    b1 = graph.get_attr(t.b1) if t.b1 else None
    w2 = _weight(graph, t.w2, t.w2_t, site, "w2")
    w3 = _weight(graph, t.w3, t.w3_t, site, "w3") if t.w3 else None
    b3 = graph.get_attr(t.b3) if t.b3 else None
    _tag([n for n in (b1, b3) if n is not None], site, "bias")
    y = graph.call_module(experts, (x, w1, b1, w2, w3, b3, idx, gate))
    _tag([y], site, "experts")
    return y


def _flops_per_token(d: int, f: int, glu: bool, e: int, k: int) -> tuple[int, int]:
    dense = 2 * d * f * (3 if glu else 2)
    return dense, 2 * d * e + dense * k // e


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
    w_act = gm.get_parameter(_rel(m.w_in.weight, p))
    router = CentroidRouter(centroids(w_act.t() if m.w_in.transposed else w_act, e))
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
        y = _emit(graph, m.x, t, rname, ename, k, site)
        if m.w_out.bias:
            b2 = graph.get_attr(_rel(m.w_out.bias, p))
            y = graph.call_function(operator.add, (y, b2))
            _tag([b2, y], site, "bias_out")
    m.w_out.out.replace_all_uses_with(y)
    dense, sparse = _flops_per_token(d, f, m.w_up is not None, e, k)
    return SiteReport(
        site=site, path=p, nodes_erased=len(m.nodes), nodes_created=len(graph.nodes) - before,
        params=tuple([("", f"{p}.{rname}.weight".lstrip("."))] + [(n, n) for n, _ in tensors]),
        permuted=tuple(tensors), permutation=perm, flops_before=dense, flops_after=sparse)


# -- sites that span sibling modules ---------------------------------------------------------


@dataclass(frozen=True)
class HeadConfig:
    """The chain head: `site` found in the whole model, `prefix` the head's path, `tail` the
    (rewritten) module that owns w_out and `tail_prefix` its path."""

    site: FFNSite
    num_experts: int
    top_k: int
    prefix: str
    tail: nn.Module
    tail_prefix: str
    partition: torch.Tensor | None = None
    backend: str = "auto"


def _output_value(gm: fx.GraphModule) -> fx.Node:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    val = out.args[0]
    if not isinstance(val, fx.Node):
        raise UnsupportedSiteError(f"{gm.__class__.__name__} returns {type(val).__name__}, not one tensor")
    return val


def moefy_head(gm: fx.GraphModule, config: HeadConfig) -> PassResult:
    """The child that holds the input projection(s) now returns the whole FFN's output."""
    s, p = config.site, config.prefix
    view = GraphView.of_module(gm, p)
    lins = {lm.weight: lm for lm in linear_matches(view)}
    w_in, w_up = lins.get(s.w_in.weight), lins.get(s.w_up.weight) if s.w_up else None
    if w_in is None or (s.w_up and w_up is None):
        raise UnsupportedSiteError(f"FFN {s.name}: input projection not found in the trace of {p}")
    val = _output_value(gm)
    srcs = {w_in.out: w_in} | ({w_up.out: w_up} if w_up else {})
    walked = walk_back(view, val, srcs)
    if walked is None or len(walked[1]) != len(srcs):
        raise UnsupportedSiteError(f"FFN {s.name}: {p} returns more than the FFN's hidden state")
    chain, _ = walked
    dead = dead_closure(val, w_in.x)
    if not chain <= dead or w_in.core not in dead:
        raise UnsupportedSiteError(f"FFN {s.name}: the hidden state is also used inside {p}")
    validate_partition(config.partition, s.d_ff, s.name)
    object.__setattr__(gm, PEER, config.tail)  # not registered: w_out keeps its name in the tail
    perm = config.partition if config.partition is not None else torch.arange(s.d_ff)
    tensors = site_tensors(s.w_in, s.w_out, s.w_up)
    for name, dim in tensors:
        owner, pre = (config.tail, config.tail_prefix) if name == s.w_out.weight else (gm, p)
        permute_(owner.get_parameter(_rel(name, pre)), perm, dim)
    w_act = gm.get_parameter(_rel(s.w_in.weight, p))
    router = CentroidRouter(centroids(w_act.t() if s.w_in.transposed else w_act, config.num_experts))
    experts = RoutedExperts(config.num_experts, s.activation, s.dropout_p, config.backend)
    rname, ename = _install(gm, "", router, experts, perm)
    t = _Targets(
        _rel(s.w_in.weight, p), s.w_in.transposed, s.w_in.bias and _rel(s.w_in.bias, p),
        f"{PEER}.{_rel(s.w_out.weight, config.tail_prefix)}", s.w_out.transposed,
        s.w_up and _rel(s.w_up.weight, p), bool(s.w_up and s.w_up.transposed),
        s.w_up and s.w_up.bias and _rel(s.w_up.bias, p),
    )
    before = len(gm.graph.nodes)
    with gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op == "output")):
        y = _emit(gm.graph, w_in.x, t, rname, ename, config.top_k, s.name)
    val.replace_all_uses_with(y)
    dense, sparse = _flops_per_token(s.d_model, s.d_ff, s.w_up is not None, config.num_experts, config.top_k)
    return PassResult(gm, True, (SiteReport(
        site=s.name, path=p, nodes_erased=len(dead), nodes_created=len(gm.graph.nodes) - before,
        params=(("", f"{p}.{rname}.weight".lstrip(".")),), permuted=tuple(tensors),
        permutation=perm, flops_before=dense, flops_after=sparse),))


def _placeholders(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    return {n: n for n in gm.graph.nodes if n.op == "placeholder"}


def bypass(gm: fx.GraphModule, site: FFNSite) -> PassResult:
    """A child between head and tail (e.g. OPT's activation module) passes its input through."""
    view = GraphView.of_module(gm)
    val = _output_value(gm)
    walked = walk_back(view, val, _placeholders(gm))
    if walked is None or len(walked[1]) != 1:
        raise UnsupportedSiteError(f"FFN {site.name}: a module between its projections is not elementwise")
    (ph,) = walked[1]
    erased = len(walked[0])
    val.replace_all_uses_with(ph)
    return PassResult(gm, True, (SiteReport(site.name, "", erased, 0),))


def hoist_out(gm: fx.GraphModule, config: tuple[FFNSite, str]) -> PassResult:
    """The child that holds the output projection keeps only its bias: the head computed the
    projection already (config: the site and this module's path)."""
    site, p = config
    view = GraphView.of_module(gm, p)
    lin = next((lm for lm in linear_matches(view) if lm.weight == site.w_out.weight), None)
    if lin is None:
        raise UnsupportedSiteError(f"FFN {site.name}: output projection not found in the trace of {p}")
    walked = walk_back(view, lin.x, _placeholders(gm))
    if walked is None or len(walked[1]) != 1:
        raise UnsupportedSiteError(f"FFN {site.name}: the output projection in {p} reads more than its input")
    chain, (ph,) = walked
    dead = dead_closure(lin.out, ph)
    if not chain <= dead or lin.core not in dead:
        raise UnsupportedSiteError(f"FFN {site.name}: the hidden state is also used inside {p}")
    new = ph
    before = len(gm.graph.nodes)
    if lin.bias:
        with gm.graph.inserting_before(lin.out):
            b = gm.graph.get_attr(_rel(lin.bias, p))
            new = gm.graph.call_function(operator.add, (ph, b))
            _tag([b, new], site.name, "bias_out")
    lin.out.replace_all_uses_with(new)
    return PassResult(gm, True, (SiteReport(site.name, p, len(dead), len(gm.graph.nodes) - before),))
