"""densify: the exact inverse of moefy on a graph module.

Before (after moefy):

    ssdfx_router = self.ssdfx_router(x)
    select_top_k = ssdfx.routing.select_top_k(ssdfx_router, 4)
    ssdfx_experts = self.ssdfx_experts(x, w1, b1, w2, w3, b3, getitem, getitem_1)

After:

    linear = torch._C._nn.linear(x, w1, b1)
    gelu = ssdfx.activations... (the site's activation)
    linear_1 = torch._C._nn.linear(gelu, w2)

The neuron permutation stored in `ssdfx_perm*` is undone in place, so parameter names, order
and values are those from before moefy, and the router and expert modules are removed.
"""

from __future__ import annotations

import operator

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ssdfx.activations import activation_fn
from ssdfx.modules import RoutedExperts
from ssdfx.site import META_KEY, NodeInfo

from .infra import PassResult, SiteReport, inverse_permutation, permute_

__all__ = ["densify"]




def densify(gm: fx.GraphModule, config=None) -> PassResult:
    """Replace every routed-experts call in `gm` by the dense FFN it was made from."""
    reports = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), RoutedExperts):
            continue
        experts: RoutedExperts = gm.get_submodule(node.target)
        suffix = str(node.target)[len("ssdfx_experts"):]
        x, w1, b1, w2, w3, b3, _, _ = node.args
        site = node.meta.get(META_KEY, NodeInfo("densify", str(node.target), "experts")).site
        act = activation_fn(experts.activation)
        t1, t2, t3 = experts.layout
        g = gm.graph
        before = len(g.nodes)
        with g.inserting_before(node):
            w1v = g.call_method("t", (w1,)) if t1 else w1
            w2v = g.call_method("t", (w2,)) if t2 else w2
            w3v = g.call_method("t", (w3,)) if (t3 and w3 is not None) else w3
            h = g.call_function(F.linear, (x, w1v, b1))
            h = g.call_function(act, (h,))
            if w3 is not None:
                u = g.call_function(F.linear, (x, w3v, b3))
                h = g.call_function(operator.mul, (h, u))
            if experts.dropout_p:
                drop = f"ssdfx_dropout{suffix}"
                gm.add_submodule(drop, nn.Dropout(experts.dropout_p).train(experts.training))
                h = g.call_module(drop, (h,))
            y = g.call_function(F.linear, (h, w2v))
        node.replace_all_uses_with(y)
        perm = getattr(gm, f"ssdfx_perm{suffix}", None)
        if perm is not None:
            inv = inverse_permutation(perm)
            for arg, dim, t in ((w1, 0, t1), (b1, 0, False), (w3, 0, t3), (b3, 0, False), (w2, 1, t2)):
                if arg is not None:  # the neuron dimension, in the stored layout
                    permute_(_resolve(gm, str(arg.target)), inv, 1 - dim if t else dim)
            delattr(gm, f"ssdfx_perm{suffix}")
        reports.append(SiteReport(site, "", 0, len(g.nodes) - before))
    return PassResult(gm, bool(reports), tuple(reports))


def _resolve(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

