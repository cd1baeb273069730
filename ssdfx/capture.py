"""Capture: turn a model into graphs that the matcher can read, and decide where each site is
rewritten.

Two captures, chosen per model:

* torch.export of the whole model (needs example inputs; HF models provide dummy ones). Its
  nodes carry `nn_module_stack`, so every FFN found in the global dataflow knows the modules that
  run it, even when the FFN spans sibling modules (BERT) or is inline in a decoder layer (OPT).
* fx.symbolic_trace, top-down: the root if it traces, else each child in turn. No inputs needed,
  but an FFN whose parts meet only in an untraceable forward cannot be seen this way.

Each site is then rewritten at the smallest module that holds it (its lowest common ancestor),
if fx can trace that module; otherwise through that module's children (a "chain" scope).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ssdfx.errors import TraceError
from ssdfx.match import _DROPOUT, GraphView, SiteMatch, find_sites, op_name, owner_of
from ssdfx.site import FFNSite, LinearRef, Scope

__all__ = ["Located", "locate", "trace", "example_inputs", "plan_scope", "swap_module", "ROOT_SLOT"]

ROOT_SLOT = "ssdfx_root"  # where a rewritten root forward lives while it is swapped in


@dataclass
class Located:
    """The sites found in a model, and how the search went (for error messages)."""

    sites: list[FFNSite]
    method: str  # "export" or "fx"
    searched: list[str] = field(default_factory=list)  # modules whose graphs were searched
    untraceable: dict[str, str] = field(default_factory=dict)  # module path -> why
    rejected: list[str] = field(default_factory=list)  # sites found but not rewritable

    def describe(self) -> str:
        lines = [f"capture: {self.method}"]
        if self.searched:
            shown = ", ".join(p or "<root>" for p in self.searched[:8])
            more = f" (+{len(self.searched) - 8} more)" if len(self.searched) > 8 else ""
            lines.append(f"graphs searched: {shown}{more}")
        for path, why in list(self.untraceable.items())[:5]:
            lines.append(f"not traceable: {path or '<root>'}: {why}")
        lines.extend(self.rejected[:5])
        return "\n".join(lines)


def trace(module: nn.Module) -> fx.GraphModule:
    """fx-trace one module with the default leaf rules (torch.nn modules stay calls)."""
    return fx.symbolic_trace(module)


def _try_trace(module: nn.Module, cache: dict[int, Any]) -> fx.GraphModule | Exception:
    key = id(module)
    if key not in cache:
        try:
            cache[key] = trace(module)
        except Exception as e:  # fx raises many types; all mean "not traceable"
            cache[key] = e
    return cache[key]


def example_inputs(model: nn.Module) -> tuple[tuple, dict] | None:
    """Small example inputs for models that describe their own inputs (HF PreTrainedModel):
    its dummy inputs when they feed its main input, else one built from its config for image
    (pixel_values) and audio (input_features) models."""
    dummy = getattr(model, "dummy_inputs", None)
    main = getattr(model, "main_input_name", "input_ids")
    cfg = getattr(model, "config", None)
    params = inspect.signature(model.forward).parameters
    kwargs = None
    if isinstance(dummy, dict) and main in dummy:
        kwargs = dict(dummy)
    elif main == "pixel_values" and cfg is not None:
        size = getattr(cfg, "image_size", 32)
        size = size if isinstance(size, int) else tuple(size)[0]
        kwargs = {main: torch.randn(1, getattr(cfg, "num_channels", 3), size, size)}
    elif main == "input_features" and cfg is not None:
        frames = 2 * getattr(cfg, "max_source_positions", 1500)
        kwargs = {main: torch.randn(1, getattr(cfg, "num_mel_bins", 80), frames)}
    if kwargs is None:
        return None
    if (getattr(cfg, "is_encoder_decoder", False) and main != "input_ids" and "decoder_input_ids" in params
            and "decoder_input_ids" not in kwargs):  # text models shift their inputs themselves
        kwargs["decoder_input_ids"] = torch.zeros(kwargs[main].shape[0], 4, dtype=torch.long)
    if "use_cache" in params:
        kwargs["use_cache"] = False  # export cannot return cache objects
    return (), kwargs


@contextlib.contextmanager
def _quiet_on_failure():
    """Hold back what torch prints while exporting; show it only if the export succeeds.

    A failed export prints the partial graph (twice) and a symbolic-shapes warning; ssdfx then
    falls back to fx tracing and reports the failure itself, in one line. Anything the model's
    own forward prints reaches the console as usual when the export works.
    """
    out, err = io.StringIO(), io.StringIO()
    log = logging.getLogger("torch")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        log.setLevel(level)
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())


def _export_view(model: nn.Module, args: tuple, kwargs: dict) -> GraphView:
    with _quiet_on_failure():
        ep = torch.export.export(model, args, kwargs, strict=False)
    sig = ep.graph_signature.inputs_to_parameters
    params = {n: sig[n.name] for n in ep.graph.nodes if n.op == "placeholder" and n.name in sig}
    shapes = {k: p.shape for k, p in model.named_parameters(remove_duplicate=False)}
    return GraphView(ep.graph, params, shapes)


def _ref(model_params: dict, lm) -> LinearRef:
    return LinearRef(lm.weight, lm.bias, lm.transposed, lm.in_features, lm.out_features)


def _owners(match: SiteMatch, prefix: str) -> list[str]:
    """Owner module paths (model-relative) of the site's op nodes, in graph order."""
    seen: dict[str, None] = {}
    for n in match.graph_order():
        if n.op in ("call_function", "call_method", "call_module") and not _zero_dropout(n):
            own = owner_of(n)
            full = _join(prefix, own or "")
            seen.setdefault(full, None)
    return list(seen)


def _zero_dropout(node) -> bool:
    """A functional dropout of rate 0 (BART's inline activation_dropout): an identity, whoever
    runs it. Modules' dropouts are call_module nodes and keep their owner."""
    if node.op != "call_function" or op_name(node) not in _DROPOUT:
        return False
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    return isinstance(p, (int, float)) and p == 0


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else (a or b)


def _lca(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _param_owner(name: str) -> str:
    return name.rpartition(".")[0]


def plan_scope(model: nn.Module, owners: list[str], cache: dict[int, Any],
               params: list[str] = ()) -> tuple[Scope | None, str]:
    """Where to rewrite a site whose parameters are `params` and whose ops ran in `owners`:
    (scope, reason if None).

    The scope is the lowest common ancestor of the modules holding the site's parameters (exact,
    from their names) and of the modules that ran its ops (from nn_module_stack, which export
    does not record inside fx GraphModules: owners above the parameters' LCA are ignored).
    """
    base = _lca([_param_owner(p) for p in params]) if params else _lca(owners)
    inside = [o for o in owners if o == base or o.startswith(base + ".") or not base]
    lca = _lca([base] + inside) if inside else base
    if lca:
        traced = _try_trace(model.get_submodule(lca), cache)
        if not isinstance(traced, Exception):
            return Scope("module", lca), ""
    # Through the children of the LCA: every op must run inside one of them.
    inline = [o for o in owners if not (o.startswith(lca + ".") if lca else o)]
    if inline and not lca and not isinstance(_try_trace(model, cache), Exception):
        return Scope("module", ""), ""  # the root's own forward: swap_module redirects it
    if inline:
        why = ("it is inline in the forward of " + (lca or "the root module") +
               ", which fx cannot trace and which cannot be replaced")
        return None, why
    depth = len(lca.split(".")) if lca else 0
    children: dict[str, None] = {}
    for o in owners:
        children.setdefault(".".join(o.split(".")[: depth + 1]), None)
    for c in children:
        traced = _try_trace(model.get_submodule(c), cache)
        if isinstance(traced, Exception):
            return None, f"its part in {c} cannot be traced: {_short(traced)}"
    return Scope("chain", lca, tuple(children)), ""


def swap_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at `path` in `model` and return what was there.

    Path "" is the root's own forward (an FFN that is the whole model): `new` (its rewritten
    GraphModule) is registered as the submodule `ssdfx_root`, so its new parameters show up in
    model.parameters(), and model.forward is redirected to it. Swapping `model` itself back in
    undoes that.
    """
    if path:
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent)
        old = getattr(owner, name)
        setattr(owner, name, new)
        return old
    if new is model:
        model.__dict__.pop("forward", None)
        return model._modules.pop(ROOT_SLOT, None) or model
    model.add_module(ROOT_SLOT, new)
    object.__setattr__(model, "forward", new.forward)
    return model


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:160]}"


def _to_site(model: nn.Module, m: SiteMatch, owners: list[str], scope: Scope) -> FFNSite:
    params = dict(model.named_parameters(remove_duplicate=False))
    return FFNSite(
        path=scope.path,
        kind="glu" if m.w_up is not None else "plain",
        d_model=m.w_in.in_features,
        d_ff=m.w_in.out_features,
        activation=m.activation,
        w_in=_ref(params, m.w_in),
        w_out=_ref(params, m.w_out),
        w_up=_ref(params, m.w_up) if m.w_up is not None else None,
        dropout_p=m.dropout_p,
        modules=tuple(owners),
        scope=scope,
    )


def _created_by_ssdfx(model: nn.Module) -> tuple[str, ...]:
    """Paths of modules the passes add (routers): their MLPs are not FFN sites."""
    from ssdfx.routing import CentroidRouter, MLPRouter

    return tuple(p + "." for p, m in model.named_modules() if isinstance(m, (CentroidRouter, MLPRouter)))


def _collect(model, view: GraphView, prefix: str, located: Located, cache, seen: set[str]):
    ours = _created_by_ssdfx(model)
    for m in find_sites(view):
        if m.w_in.weight in seen or m.w_in.weight.startswith(ours or ("\0",)):
            continue  # a module called twice (shared layers) holds one site; routers are ours
        owners = _owners(m, prefix)
        params = [lm.weight for lm in (m.w_in, m.w_out, m.w_up) if lm is not None]
        scope, why = plan_scope(model, owners, cache, params)
        seen.add(m.w_in.weight)
        if scope is None:
            located.rejected.append(f"FFN {m.w_in.weight} -> {m.w_out.weight} cannot be rewritten: {why}")
            continue
        located.sites.append(_to_site(model, m, owners, scope))


def locate(model: nn.Module, example_args: tuple | None = None,
           example_kwargs: dict | None = None) -> Located:
    """Find every FFN site of `model` and plan where each is rewritten. Does not modify it."""
    cache: dict[int, Any] = {}
    seen: set[str] = set()
    if example_args is None and example_kwargs is None:
        auto = example_inputs(model)
        if auto is not None:
            example_args, example_kwargs = auto
    export_error = None
    if example_args is not None or example_kwargs is not None:
        try:
            view = _export_view(model, tuple(example_args or ()), dict(example_kwargs or {}))
        except Exception as e:
            export_error = e
        else:
            located = Located([], "export", searched=["<whole model, torch.export>"])
            _collect(model, view, "", located, cache, seen)
            return located
    located = Located([], "fx")
    if export_error is not None:
        located.untraceable["<whole model, torch.export>"] = _short(export_error)
    _fx_search(model, "", model, located, cache, seen)
    return located


def _fx_search(model, path: str, module: nn.Module, located: Located, cache, seen) -> None:
    traced = _try_trace(module, cache)
    if isinstance(traced, Exception):
        located.untraceable[path] = _short(traced)
        for name, child in module.named_children():
            _fx_search(model, _join(path, name), child, located, cache, seen)
        return
    located.searched.append(path)
    _collect(model, GraphView.of_module(traced, path), path, located, cache, seen)


def require_traced(module: nn.Module, path: str) -> fx.GraphModule:
    try:
        return trace(module)
    except Exception as e:
        raise TraceError(f"cannot fx-trace {path or 'the root module'}: {_short(e)}") from e
