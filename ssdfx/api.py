"""The public entry points: find_ffns, convert, revert.

convert works in three phases so that a failure leaves the model as it was:
1. plan (read-only): find the sites, check every argument, trace every scope;
2. rewrite the traced copies (the passes permute the shared parameters in place; on any error
   the permutations are undone);
3. swap the rewritten modules into the model and carry optimizer state along.
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ssdfx.capture import ROOT_SLOT, Located, locate, require_traced, swap_module
from ssdfx.errors import (
    AlreadyConvertedError, NoFFNFoundError, NotConvertedError, TraceError, UnsupportedSiteError,
)
from ssdfx.site import FFNSite

__all__ = [
    "find_ffns", "convert", "revert", "is_converted", "converted_sites", "conversion", "original_modules",
    "permutation_buffers", "ConversionReport",
]

_STATE = "_ssdfx_converted"  # attribute on the root module while it is converted

PartitionSpec = str | Mapping[str, torch.Tensor] | Callable[[FFNSite, nn.Module], torch.Tensor]


@dataclass
class ConversionReport:
    """What convert did: per site, where it was rewritten and the pass reports."""

    num_experts: int
    top_k: int
    sites: list[FFNSite]
    reports: list = field(default_factory=list)  # passes.SiteReport, one or more per site
    dynamic_k: float | None = None  # the coverage target when selection is dynamic-k
    router: str = "centroid"

    def __str__(self) -> str:
        select = (f"top-{self.top_k}" if self.dynamic_k is None else
                  f"dynamic-k (coverage {self.dynamic_k:g}, at most {self.top_k})")
        lines = [f"converted {len(self.sites)} FFN site(s) to {self.num_experts} experts, {select}, "
                 f"{self.router} router"]
        for s in self.sites:
            lines.append(f"  {s.path or '<root>'}: {s.kind} d={s.d_model} d_ff={s.d_ff} "
                         f"act={s.activation} scope={s.scope.kind}")
        return "\n".join(lines)


@dataclass
class _State:
    report: ConversionReport
    originals: dict[str, nn.Module]  # module path -> the module it replaced
    perm_holders: dict[str, tuple[str, str]]  # site -> (module path, buffer name)
    backend: str


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}; "
                        "pass the model object itself (e.g. AutoModelForCausalLM.from_config(cfg))")


def _check_backend(backend) -> None:
    from ssdfx.ops.dispatch import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} "
                         "('auto' picks the fastest available for each call)")


def find_ffns(model: nn.Module, example_inputs: tuple | None = None,
              example_kwargs: dict | None = None) -> list[FFNSite]:
    """Every FFN site of `model`, found by graph structure. Does not modify the model.

    HF models export with their own dummy inputs; other models are fx-traced module by module,
    or exported when `example_inputs`/`example_kwargs` are given (which also finds FFNs that
    span sibling modules of an untraceable parent). On a converted model: the FFNs still dense
    (the converted ones are `converted_sites(model)`). Warns when it finds nothing and some
    modules could not be traced (an FFN may be inside them).
    """
    _check_model(model)
    located = locate(model, example_inputs, example_kwargs)
    if not located.sites and located.untraceable and not is_converted(model):
        hint = ("" if example_inputs is not None or example_kwargs is not None else
                "; pass example_inputs=(...) so the whole model can be exported")
        warnings.warn(f"no FFN found, but these modules could not be traced: "
                      f"{', '.join(p or '<root>' for p in located.untraceable)}{hint}", stacklevel=2)
    return located.sites


def is_converted(model: nn.Module) -> bool:
    return isinstance(getattr(model, _STATE, None), _State)


def converted_sites(model: nn.Module) -> list[FFNSite]:
    state = getattr(model, _STATE, None)
    if not isinstance(state, _State):
        raise NotConvertedError("the model is not converted; call ssdfx.convert(model) first")
    return list(state.report.sites)


def original_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules convert replaced, by path (what revert puts back); {} for a dense model."""
    state = getattr(model, _STATE, None)
    return dict(state.originals) if isinstance(state, _State) else {}


def conversion(model: nn.Module) -> ConversionReport | None:
    """The report of the conversion in effect (num_experts, top_k, sites, pass reports), or None
    when the model is dense."""
    state = getattr(model, _STATE, None)
    return state.report if isinstance(state, _State) else None


def permutation_buffers(model: nn.Module) -> dict[str, str]:
    """site name -> state-dict key of the buffer holding that site's neuron permutation (how
    `revert` restores the original order); empty when the model is dense. The site's router
    sits beside it with the same suffix: `x.ssdfx_perm_1` goes with `x.ssdfx_router_1`."""
    state = getattr(model, _STATE, None)
    if not isinstance(state, _State):
        return {}
    return {site: f"{holder}.{buf}" for site, (holder, buf) in state.perm_holders.items()}


def _partition(spec: PartitionSpec, site: FFNSite, model: nn.Module, num_experts: int,
               stats: Mapping | None) -> torch.Tensor | None:
    if isinstance(spec, Mapping):
        return spec.get(site.name)
    if callable(spec):
        return spec(site, model)
    if spec == "contiguous":
        return None
    from ssdfx import split  # imported lazily: clustering pulls in numba/networkx

    return split.partition(spec, site, model, num_experts, stats=stats)


def convert(
    model: nn.Module,
    num_experts: int = 8,
    top_k: int = 2,
    *,
    sites: Sequence[FFNSite] | Iterable[str] | None = None,
    partition: PartitionSpec = "contiguous",
    router: str | Mapping[str, nn.Module] = "centroid",
    dynamic_k: float | None = None,
    stats: Mapping | None = None,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    backend: str = "auto",
) -> nn.Module:
    """Rewrite every FFN of `model` into `num_experts` routed experts, `top_k` per token.

    The model is modified in place and returned; parameters keep their names and objects (their
    neuron order is permuted so each expert is a contiguous block; `optimizer` state follows).
    With top_k == num_experts the outputs equal the dense model's. `sites` restricts the rewrite
    to these sites (FFNSite objects from find_ffns, which also skips the search, or input-weight
    names). `partition`: "contiguous", "random", "kmeans", "coactivation", a mapping from site
    name to permutation, or a callable (site, model) -> permutation. `router`: "centroid" (x . c_e,
    c_e from the expert's input weights), "mlp" (trained on `stats`), or a mapping from site name
    to a module. `dynamic_k`: instead of a fixed top-k, each token takes the fewest experts whose
    predicted activation-mass share reaches this target (top_k is then the cap). `stats`:
    {site name: SiteStats} from ssdfx.observe, needed by "coactivation", "mlp" and dynamic_k.
    """
    from ssdfx.passes import HeadConfig, MoefyConfig, bypass, hoist_out, moefy, moefy_head, run_pass
    from ssdfx.passes.moefy import check_site, validate_dynamic_k, validate_experts, validate_partition
    from ssdfx.routing import build_router

    # -- 1. plan: nothing below may modify the model until every check has passed ------------
    _check_model(model)
    validate_experts(num_experts, top_k)
    validate_dynamic_k(dynamic_k)
    dynamic_k = None if dynamic_k is None else float(dynamic_k)
    _check_backend(backend)
    if is_converted(model):
        raise AlreadyConvertedError("the model is already converted; call ssdfx.revert(model) first")
    found, located = _resolve_sites(model, sites, example_inputs, example_kwargs)
    _check_mappings(found, partition=partition, router=router)
    _check_stats(found, stats)
    if optimizer is not None:
        _check_optimizer_state(optimizer, model, found)
    for s in found:
        check_site(s.name, s.activation, s.d_ff, num_experts)
    perms = {s.name: _partition(partition, s, model, num_experts, stats) for s in found}
    for s in found:
        validate_partition(perms[s.name], s.d_ff, s.name)
    if isinstance(router, Mapping):
        routers = dict(router)
    else:
        calibrate = dynamic_k is not None and router == "centroid"
        routers = {s.name: build_router(router, s, model, perms[s.name], num_experts,
                                        stats.get(s.name) if stats else None, calibrate)
                   for s in found}
    module_scopes: dict[str, list[FFNSite]] = {}
    for s in found:
        if s.scope.kind == "module":
            module_scopes.setdefault(s.scope.path, []).append(s)
    module_scopes = _merge_nested(module_scopes)
    traced = {p: require_traced(model.get_submodule(p), p) for p in module_scopes}
    chains = [s for s in found if s.scope.kind == "chain"]
    for s in chains:
        for c in s.scope.children:
            traced[c] = require_traced(model.get_submodule(c), c)

    # -- 2. rewrite the traced copies; undo the permutations if anything fails ----------------
    reports, holders = [], {}
    try:
        for path, group in module_scopes.items():
            cfg = MoefyConfig(num_experts, top_k, prefix=path, sites=frozenset(s.name for s in group),
                              partitions={s.name: perms[s.name] for s in group if perms[s.name] is not None},
                              routers={s.name: routers[s.name] for s in group if s.name in routers},
                              dynamic_k=dynamic_k, backend=backend)
            res = run_pass(moefy, traced[path], cfg)
            reports.extend(res.report)  # before any check below: a failure must undo these too
            got = {r.site for r in res.report}
            missing = [s.name for s in group if s.name not in got]
            if missing:
                raise UnsupportedSiteError(
                    f"fx's trace of {path} does not contain the FFN(s) {missing} found by capture")
            for i, r in enumerate(res.report):
                holders[r.site] = (path or ROOT_SLOT, "ssdfx_perm" + ("" if len(res.report) == 1 else f"_{i}"))
        for s in chains:
            head, *middles, tail = s.scope.children
            if len(s.scope.children) < 2:
                raise UnsupportedSiteError(f"FFN {s.name}: chain scope with a single child")
            run_pass(hoist_out, traced[tail], (s, tail))
            for mid in middles:
                run_pass(bypass, traced[mid], s)
            res = run_pass(moefy_head, traced[head], HeadConfig(
                s, num_experts, top_k, head, traced[tail], tail, perms[s.name], routers.get(s.name),
                dynamic_k, backend))
            reports.extend(res.report)  # moefy_head checks everything before it permutes
            holders[s.name] = (head, "ssdfx_perm")
    except Exception:
        _undo_permutations(model, reports)
        raise

    # -- 3. swap the rewritten modules in, carry optimizer state -----------------------------
    originals = {path: swap_module(model, path, gm) for path, gm in traced.items()}
    if optimizer is not None:
        for r in reports:
            for name, dim in r.permuted:
                _permute_state(optimizer, _param_by_name(model, name), r.permutation, dim)
    report = ConversionReport(num_experts, top_k, list(found), reports, dynamic_k,
                              router if isinstance(router, str) else "custom")
    setattr(model, _STATE, _State(report, originals, holders, backend))
    return model


def _check_given_sites(model: nn.Module, sites: list[FFNSite]) -> None:
    """ValueError unless every FFNSite names parameters of `model` shaped as the site says
    (sites from find_ffns of another model, or of this one before a change, do not)."""
    from ssdfx.passes.moefy import site_tensors

    for s in sites:
        for name, dim in site_tensors(s.w_in, s.w_out, s.w_up):
            try:
                p = model.get_parameter(name)
            except AttributeError:
                p = None
            fits = p is not None and p.shape[dim] == s.d_ff and (
                p.dim() == 1 or p.shape[1 - dim] == s.d_model)
            if not fits:
                have = "no such parameter" if p is None else f"shape {tuple(p.shape)}"
                raise ValueError(
                    f"site {s.name} (d_model={s.d_model}, d_ff={s.d_ff}) does not fit this model: "
                    f"{name} has {have}; pass sites found by ssdfx.find_ffns(model) on this "
                    "model, or their names")


def _check_mappings(found: list[FFNSite], **mappings) -> None:
    """ValueError for a partition= or router= mapping key that names no site being converted
    (a typo would otherwise silently give that site the default)."""
    names = {s.name for s in found}
    for option, mapping in mappings.items():
        if isinstance(mapping, Mapping):
            unknown = sorted(set(mapping) - names)
            if unknown:
                raise ValueError(f"{option}= names {unknown}, which are not among the sites being "
                                 f"converted; site names: {sorted(names)}")


def _check_stats(found: list[FFNSite], stats: Mapping | None) -> None:
    """ValueError for statistics recorded on an FFN of other shapes than the site's."""
    for s in found:
        st = stats.get(s.name) if stats else None
        if st is None:
            continue
        shapes = (tuple(st.x.shape[1:]), tuple(st.h.shape[1:]))
        if shapes != ((s.d_model,), (s.d_ff,)):
            raise ValueError(
                f"stats for {s.name} were recorded on an FFN with d_model={shapes[0][0]}, "
                f"d_ff={shapes[1][0]}, but this site has d_model={s.d_model}, d_ff={s.d_ff}: "
                "record them on this model, stats=ssdfx.observe(model, batches)")


def _resolve_sites(model, sites, example_inputs, example_kwargs) -> tuple[list[FFNSite], Located | None]:
    if sites is not None:
        sites = list(sites)
        if not sites:
            raise ValueError("sites=[] selects no FFN: pass sites=None to convert every FFN found, "
                             "or the sites (or their names) to convert")
        if all(isinstance(s, FFNSite) for s in sites):
            _check_given_sites(model, sites)
            return sites, None
    located = locate(model, example_inputs, example_kwargs)
    found = located.sites
    if sites is not None:
        wanted = {s.name if isinstance(s, FFNSite) else str(s) for s in sites}
        unknown = wanted - {s.name for s in found}
        if unknown:
            raise ValueError(f"sites {sorted(unknown)} are not FFN sites of this model; "
                             f"found: {[s.name for s in found]}")
        found = [s for s in found if s.name in wanted]
    if not found:
        searched = ("searched for linear-like (nn.Linear, F.linear, addmm, matmul with a parameter) "
                    "-> elementwise chain (activation, dropout, GLU multiply) -> linear-like "
                    "subgraphs whose hidden state is used nowhere else.\n" + located.describe())
        if located.rejected:
            raise UnsupportedSiteError("FFNs were found but none can be rewritten.\n" + searched)
        if located.untraceable:
            exported = any(k.startswith("<whole model") for k in located.untraceable)
            advice = ("torch.export of the whole model failed as well (its error is listed below); "
                      "make the forward exportable (no Python branches on tensor values), or "
                      "convert a traceable submodule instead" if exported else
                      "Pass example_inputs=(...) so ssdfx can torch.export the whole model, or "
                      "make those forwards traceable")
            raise TraceError(
                "no FFN found in the parts of the model that could be traced; the modules listed as "
                "'not traceable' could not be traced (fx cannot follow data-dependent control flow). "
                f"{advice}.\n" + searched)
        raise NoFFNFoundError("no FFN found: " + searched)
    if located.rejected:
        warnings.warn("some FFNs are left dense:\n" + "\n".join(located.rejected), stacklevel=3)
    return found, located


def _merge_nested(scopes: dict[str, list[FFNSite]]) -> dict[str, list[FFNSite]]:
    """A scope inside another is traced as part of the outer one."""
    out: dict[str, list[FFNSite]] = {}
    for path in sorted(scopes, key=len):
        outer = next((o for o in out if o == "" or path.startswith(o + ".")), None)
        out.setdefault(outer or path, []).extend(scopes[path])
    return out


def _param_by_name(model: nn.Module, name: str) -> nn.Parameter:
    return model.get_parameter(name)


def _follows_neurons(value, param: torch.Tensor, dim: int) -> bool | None:
    """Whether optimizer state `value` of `param` is indexed by the neurons along `dim` (True:
    permute it with the parameter), holds nothing per neuron (False: a step count, or a
    factored statistic of size 1 there, like Adafactor's column or row variance), or cannot
    be told (None)."""
    if not isinstance(value, torch.Tensor) or value.numel() == 1:
        return False
    if value.dim() != param.dim():
        return None
    if value.shape[dim] == param.shape[dim]:
        return True
    return False if value.shape[dim] == 1 else None


def _check_optimizer_state(optimizer, model: nn.Module, sites) -> None:
    """ValueError, before convert changes anything, for optimizer state that cannot follow the
    neuron permutation."""
    from ssdfx.passes.moefy import site_tensors

    for s in sites:
        for name, dim in site_tensors(s.w_in, s.w_out, s.w_up):
            param = _param_by_name(model, name)
            for key, value in optimizer.state.get(param, {}).items():
                if _follows_neurons(value, param, dim) is None:
                    raise ValueError(
                        f"optimizer state {key!r} of {name} has shape {tuple(value.shape)} for a "
                        f"parameter of shape {tuple(param.shape)}: convert permutes the FFN's "
                        f"neurons (dimension {dim}) and cannot tell how this state is indexed. "
                        "Convert before the optimizer has state (or after optimizer.state.clear()), "
                        "or without optimizer= and rebuild the optimizer")


def _permute_state(optimizer, param, perm, dim) -> None:
    from ssdfx.passes import permute_

    for value in optimizer.state.get(param, {}).values():
        if _follows_neurons(value, param, dim):
            permute_(value, perm, dim)


def _undo_permutations(model, reports) -> None:
    from ssdfx.passes import inverse_permutation, permute_

    for r in reversed(reports):
        if r.permutation is None:
            continue
        inv = inverse_permutation(r.permutation)
        for name, dim in r.permuted:
            permute_(_param_by_name(model, name), inv, dim)


def revert(model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Back to the dense model: the original modules, parameter names, order and values.

    The neuron permutation convert applied is undone (optimizer state follows it), so after
    convert + revert with no training in between, named_parameters() are identical. Parameter
    objects are never replaced, so optimizers keep working.
    """
    from ssdfx.passes import inverse_permutation, permute_
    from ssdfx.passes.moefy import site_tensors

    _check_model(model)
    state = getattr(model, _STATE, None)
    if not isinstance(state, _State):
        raise NotConvertedError("revert: this model was never converted by ssdfx.convert (or was "
                                "already reverted); there is nothing to undo")
    for s in state.report.sites:
        holder, buf = state.perm_holders[s.name]
        perm = getattr(model.get_submodule(holder), buf)
        inv = inverse_permutation(perm.cpu())
        for name, dim in site_tensors(s.w_in, s.w_out, s.w_up):
            p = _param_by_name(model, name)
            permute_(p, inv, dim)
            if optimizer is not None:
                _permute_state(optimizer, p, inv, dim)
    for path, original in state.originals.items():
        current = swap_module(model, path, original)
        if path:
            _sync(original, current)
    delattr(model, _STATE)
    return model


def _sync(original: nn.Module, rewritten: nn.Module) -> None:
    """Carry tensors that were replaced while converted (e.g. .to() made new buffers) back."""
    current = dict(rewritten.named_parameters(remove_duplicate=False))
    current.update(dict(rewritten.named_buffers(remove_duplicate=False)))
    for name, t in list(original.named_parameters(remove_duplicate=False)) + list(
            original.named_buffers(remove_duplicate=False)):
        new = current.get(name)
        if new is not None and new is not t:
            owner, _, leaf = name.rpartition(".")
            mod = original.get_submodule(owner)
            if isinstance(t, nn.Parameter):
                mod._parameters[leaf] = new
            else:
                mod._buffers[leaf] = new
