"""relufy: swap an FFN's activation for ReLU, so its activations become exactly sparse.

Before (GPT-2's MLP: tanh-GELU decomposed):

    view_1 = addmm.view(add)
    mul = 0.5 * view_1 ... tanh = torch.tanh(mul_2) ... mul_3 = mul * add_2
    view_2 = mul_3.view(-1, size_3)
After:

    view_1 = addmm.view(add)
    relu = torch.relu(view_1)
    view_2 = relu.view(-1, size_3)

The node that produces the activation is found numerically: the first node of the chain whose
value, as a function of the projection's output, equals the site's activation. Everything after
it (dropout, the GLU multiply, reshapes) is kept. This changes the function (it is meant for
training from scratch, or for relufication of a dense model before fine-tuning): it has no exact
inverse; `relufy(..., activation=...)` with the old name rewrites back to the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ssdfx.activations import activation_fn
from ssdfx.errors import UnsupportedSiteError
from ssdfx.match import GraphView, _evaluate, find_sites, op_name
from ssdfx.site import META_KEY, NodeInfo

from .infra import PassResult, SiteReport

__all__ = ["RelufyConfig", "relufy", "activation_output"]


@dataclass(frozen=True)
class RelufyConfig:
    prefix: str = ""
    sites: frozenset[str] | None = None
    activation: str = "relu"  # the activation to put in


def _ancestors_within(node: fx.Node, chain: set) -> list:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or n not in chain:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def activation_output(view: GraphView, chain, source: fx.Node, name: str) -> fx.Node | None:
    """The chain node whose value is activation `name` of `source`'s value, or None."""
    probe = torch.linspace(-6.0, 6.0, 1201, dtype=torch.float64)
    want = activation_fn(name)(probe)
    chain_set = set(chain)
    for c in chain:
        if op_name(c) in ("dropout", "view", "reshape"):
            continue
        sub = [n for n in chain if n in _ancestors_within(c, chain_set)]
        try:
            with torch.no_grad():
                got = _evaluate(view, sub, {source: probe})
        except Exception:  # a node that needs the other GLU branch, say
            continue
        if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, atol=1e-6):
            return c
    return None


def relufy(gm: fx.GraphModule, config: RelufyConfig = RelufyConfig()) -> PassResult:
    view = GraphView.of_module(gm, config.prefix)
    target = activation_fn(config.activation)
    reports = []
    for m in find_sites(view):
        if config.sites is not None and m.w_in.weight not in config.sites:
            continue
        if m.activation == config.activation:
            continue
        if m.activation == "unknown":
            raise UnsupportedSiteError(f"FFN {m.w_in.weight}: unknown activation, cannot locate it to swap")
        out = activation_output(view, m.chain, m.w_in.out, m.activation)
        if out is None:
            raise UnsupportedSiteError(f"FFN {m.w_in.weight}: could not isolate its {m.activation} node")
        with gm.graph.inserting_after(out):
            new = gm.graph.call_function(target, (m.w_in.out,))
        new.meta[META_KEY] = NodeInfo("relufy", m.w_in.weight, "activation")
        out.replace_all_uses_with(new)
        reports.append(SiteReport(m.w_in.weight, config.prefix, len(_ancestors_within(out, set(m.chain))), 1))
    return PassResult(gm, bool(reports), tuple(reports))
