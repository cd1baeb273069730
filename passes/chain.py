"""Passes for FFN sites whose parts sit in sibling modules of an untraceable parent.

BERT's FFN is Linear -> GELU in BertIntermediate and Linear in the sibling BertOutput; OPT's is
fc1 -> activation module -> fc2, inline in the decoder layer. fx cannot trace those parents, so
each child is traced and rewritten on its own:

* `moefy_head`: the child with the input projection(s) computes the whole routed FFN (reading
  w_out through an unregistered reference to the tail, so w_out keeps its name there);
* `bypass`: children in between (OPT's activation module) pass their input through;
* `hoist_out`: the child with the output projection keeps only its bias add (and whatever
  follows, e.g. BERT's dropout + residual + LayerNorm).

Their inverse is ssdfx.revert, which puts the original children back.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ssdfx.errors import UnsupportedSiteError
from ssdfx.match import GraphView, dead_closure, linear_matches, walk_back
from ssdfx.modules import RoutedExperts
from ssdfx.routing import centroid_router
from ssdfx.site import FFNSite

from .infra import PassResult, SiteReport, permute_
from .moefy import _emit, _flops_per_token, _install, _rel, _tag, _Targets, site_tensors, validate_partition

__all__ = ["HeadConfig", "moefy_head", "bypass", "hoist_out", "PEER"]

PEER = "_ssdfx_peer"  # unregistered attribute of a chain head: the tail that owns w_out


class PeerTracer(fx.Tracer):
    """The tracer torch.fx uses to rebuild a chain head's graph when it is unpickled
    (`torch.load` of a whole converted model): the head reads w_out through its unregistered
    PEER attribute, and the default tracer, which names parameters by searching the root's own,
    raises NameError for it."""

    def create_arg(self, a):
        try:
            return super().create_arg(a)
        except NameError:
            peer = self.root.__dict__.get(PEER)
            if not isinstance(a, nn.Parameter) or peer is None:
                raise
            name = next((n for n, p in peer.named_parameters() if p is a), None)
            if name is None:
                raise
            return self.create_node("get_attr", f"{PEER}.{name}", (), {})


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
    router: nn.Module | None = None
    dynamic_k: float | None = None
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
    gm._tracer_cls = PeerTracer  # what unpickling re-traces the generated code with
    perm = config.partition if config.partition is not None else torch.arange(s.d_ff)
    tensors = site_tensors(s.w_in, s.w_out, s.w_up)
    for name, dim in tensors:
        owner, pre = (config.tail, config.tail_prefix) if name == s.w_out.weight else (gm, p)
        permute_(owner.get_parameter(_rel(name, pre)), perm, dim)
    router = config.router
    if router is None:
        w_act = gm.get_parameter(_rel(s.w_in.weight, p))
        router = centroid_router(w_act.t() if s.w_in.transposed else w_act, config.num_experts)
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
        y = _emit(gm.graph, w_in.x, t, rname, ename, config.top_k, s.name, config.dynamic_k)
    val.replace_all_uses_with(y)
    dense, sparse = _flops_per_token(s.d_model, s.d_ff, s.w_up is not None, config.num_experts,
                                     config.top_k, router)
    return PassResult(gm, True, (SiteReport(
        site=s.name, path=p, nodes_erased=len(dead), nodes_created=len(gm.graph.nodes) - before,
        params=tuple(("", f"{p}.{rname}.{n}".lstrip(".")) for n, _ in router.named_parameters()),
        permuted=tuple(tensors),
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
