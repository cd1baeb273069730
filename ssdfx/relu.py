"""relufy at model level: swap every FFN's activation for ReLU (a permanent change).

Use it before pre-training from scratch with an architecture whose config has no ReLU option,
or to relufy a trained dense model before fine-tuning (Mirzadeh et al. 2023). For HF models
whose config names the activation (GPT-2's activation_function, BERT's hidden_act), setting the
config is the simpler route and keeps save_pretrained/from_pretrained consistent.
"""

from __future__ import annotations

import torch
from torch import nn

from ssdfx.activations import activation_fn
from ssdfx.api import find_ffns, is_converted
from ssdfx.capture import require_traced, swap_module
from ssdfx.errors import UnsupportedSiteError
from ssdfx.match import GraphView, linear_matches, walk_back
from ssdfx.site import FFNSite

__all__ = ["relufy"]


def relufy(model: nn.Module, *, sites: list[FFNSite] | None = None) -> list[FFNSite]:
    """Rewrite every FFN of `model` to use ReLU; returns the sites it changed."""
    from ssdfx.passes import RelufyConfig, run_pass
    from ssdfx.passes import relufy as relufy_pass

    if is_converted(model):
        raise ValueError("relufy needs the dense model; call ssdfx.revert(model) first")
    sites = [s for s in (find_ffns(model) if sites is None else sites) if s.activation != "relu"]
    unknown = [s.name for s in sites if s.activation == "unknown"]
    if unknown:
        raise UnsupportedSiteError(
            f"relufy: the activation of {', '.join(unknown)} is none of the supported ones, so it "
            "cannot be located to swap; replace that activation module with nn.ReLU() yourself, "
            "or pass sites=[...] without it")
    swaps: dict[str, nn.Module] = {}
    for s in sites:
        module = _activation_module(model, s)
        if module is not None:  # GPT-2's act, BERT's intermediate_act_fn, OPT's activation_fn
            swaps[module] = nn.ReLU()
        elif s.scope.kind == "module":
            gm = swaps.get(s.scope.path) or require_traced(model.get_submodule(s.scope.path), s.scope.path)
            res = run_pass(relufy_pass, gm, RelufyConfig(s.scope.path, frozenset({s.name})))
            if not res.modified:
                raise UnsupportedSiteError(f"relufy: {s.name} not found in the trace of {s.scope.path}")
            swaps[s.scope.path] = gm
        else:
            swaps[s.scope.children[0]] = _relufy_head(model, s, s.scope.children[0])
    for path, new in swaps.items():
        swap_module(model, path, new)
    return sites


def _activation_module(model: nn.Module, s: FFNSite) -> str | None:
    """The parameter-free module among those that run the site which computes exactly its
    activation (checked on a probe), if any: swapping it keeps the model's own classes."""
    probe = torch.linspace(-6.0, 6.0, 1201)
    want = activation_fn(s.activation)(probe)
    weights = {s.w_in.weight, s.w_out.weight} | ({s.w_up.weight} if s.w_up else set())
    for path in s.modules:
        if not path or any(w.startswith(path + ".") for w in weights):
            continue
        mod = model.get_submodule(path)
        if any(True for _ in mod.parameters()) or isinstance(mod, nn.Dropout):
            continue
        try:
            with torch.no_grad():
                got = mod(probe)
        except Exception:
            continue
        if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, atol=1e-6):
            return path
    return None


def _relufy_head(model: nn.Module, s: FFNSite, head: str):
    from ssdfx.passes.relufy import activation_output

    gm = require_traced(model.get_submodule(head), head)
    view = GraphView.of_module(gm, head)
    lin = next((m for m in linear_matches(view) if m.weight == s.w_in.weight), None)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    walked = walk_back(view, out, {lin.out: lin}) if lin is not None else None
    if walked is None:
        raise UnsupportedSiteError(f"relufy: cannot follow {s.name}'s activation inside {head}")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    chain = sorted(walked[0], key=order.__getitem__)
    act = activation_output(view, chain, lin.out, s.activation)
    if act is None:
        raise UnsupportedSiteError(f"relufy: could not isolate {s.name}'s {s.activation} in {head}")
    with gm.graph.inserting_after(act):
        new = gm.graph.call_function(torch.relu, (lin.out,))
    act.replace_all_uses_with(new)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
