"""Functions that stay one node when torch.fx traces code calling them."""

from __future__ import annotations

import functools

import torch.fx

__all__ = ["graph_leaf"]


def graph_leaf(fn):
    """fn, kept as one call_function node when torch.fx traces code that calls it.

    Rewritten graphs call ssdfx functions (the top-k selection, the routed-expert op inside
    `RoutedExperts`), and FX traces such code again when a GraphModule is unpickled
    (`torch.load` of a whole converted model) or a converted module is passed to
    `symbolic_trace`. Tracing into them would reach their data-dependent checks and fail.
    `torch.fx.wrap` does not cover this: it patches only the globals of the module that calls
    the function, and a reloaded GraphModule's code has globals of its own. Costs one
    isinstance check per argument on eager calls.
    """

    @functools.wraps(fn)
    def leaf(*args, **kwargs):
        for a in args:
            if isinstance(a, _Proxy):
                return a.tracer.create_proxy("call_function", leaf, args, kwargs)
        for a in kwargs.values():
            if isinstance(a, _Proxy):
                return a.tracer.create_proxy("call_function", leaf, args, kwargs)
        return fn(*args, **kwargs)

    return leaf


_Proxy = torch.fx.Proxy
