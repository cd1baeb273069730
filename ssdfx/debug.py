"""Look at what ssdfx found and rewrote: a site table, one site's graph before and after, node
counts per op, and DOT/SVG drawings. Read-only: nothing here changes a model, and no pass
depends on it.

    >>> print(ssdfx.debug.site_table(model))       # path, kind, d_model, d_ff, activation, state, E, k
    >>> ssdfx.convert(model, num_experts=8, top_k=2)
    >>> print(ssdfx.debug.listing(model, 0))         # site 0: fx code before, rewritten code after
    >>> print(ssdfx.debug.node_diff(model, 0))       # op       before  after  delta
    >>> ssdfx.debug.draw_site(model, 0, "graphs/")   # .dot files, and .svg with graphviz installed

A site is named by its index in `site_table(model)`, its module path, its name (the input
weight) or the FFNSite itself. "Before" is an fx trace of the module the conversion replaced
(of the current module while the site is dense), so it shows the graph the matcher read.
"""

from __future__ import annotations

import operator
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from ssdfx.errors import SSDFXError
from ssdfx.site import META_KEY, FFNSite, NodeInfo
from ssdfx.tables import render

__all__ = [
    "SiteRow", "SiteTable", "site_table", "model_sites", "routed_parts", "RoutedParts", "resolve_site", "SiteGraph", "site_graphs", "listing",
    "code_of", "op_counts", "NodeDiff", "node_diff", "to_dot", "draw_site", "graphviz_available",
    "GraphvizNotFoundError", "GraphvizFailedError",
]


class GraphvizNotFoundError(SSDFXError, RuntimeError):
    """Rendering a drawing needs graphviz's `dot` program, which is not installed."""


class GraphvizFailedError(SSDFXError, RuntimeError):
    """graphviz's `dot` ran and failed (e.g. installed without the plugin for the format)."""


@dataclass(frozen=True)
class SiteRow:
    """One FFN site and its state: dense, or sparse with E experts and top-k."""

    path: str
    name: str
    kind: str
    d_model: int
    d_ff: int
    activation: str
    state: str
    experts: int | None = None
    top_k: int | None = None
    scope: str = "module"
    selection: str = ""  # e.g. "select_dynamic_k(0.9, 4)" when not plain top-k

    def __post_init__(self):
        if self.state not in ("dense", "sparse"):
            raise ValueError(f"state must be 'dense' or 'sparse', got {self.state!r}")


@dataclass(frozen=True)
class SiteTable:
    rows: tuple[SiteRow, ...]

    def to_dicts(self) -> list[dict]:
        return [dict(r.__dict__) for r in self.rows]

    def __str__(self) -> str:
        headers = ["#", "path", "kind", "d_model", "d_ff", "activation", "state", "E", "k", "scope"]
        body = [[i, r.path or "<root>", r.kind, r.d_model, r.d_ff, r.activation, r.state,
                 r.experts, r.selection or r.top_k, r.scope] for i, r in enumerate(self.rows)]
        return render(headers, body, left=3) if body else "no FFN site found"


@dataclass(frozen=True)
class RoutedParts:
    """What the rewritten graphs of a converted model say about one site (node.meta["ssdfx"]):
    the fully qualified names of its router's parameters, its routed-expert modules, and the
    selection it calls with the arguments after the scores (("select_top_k", (k,)), or
    ("select_dynamic_k", (coverage, max_k)))."""

    router_params: frozenset[str]
    experts: tuple[nn.Module, ...]
    selection: tuple[str, tuple] | None = None


def routed_parts(model: nn.Module) -> dict[str, RoutedParts]:
    """{site name: RoutedParts} for every converted site of `model` ({} when dense)."""
    params: dict[str, set[str]] = {}
    experts: dict[str, list[nn.Module]] = {}
    selection: dict[str, tuple[str, tuple]] = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, fx.GraphModule):
            continue
        for n in mod.graph.nodes:
            info = n.meta.get(META_KEY)
            if not isinstance(info, NodeInfo):
                continue
            if info.role == "select" and n.op == "call_function" and n.target is not operator.getitem:
                selection[info.site] = (getattr(n.target, "__name__", str(n.target)), tuple(n.args[1:]))
            if n.op != "call_module":
                continue
            sub = mod.get_submodule(str(n.target))
            full = f"{path}.{n.target}" if path else str(n.target)
            if info.role == "router":
                params.setdefault(info.site, set()).update(
                    f"{full}.{p}" for p, _ in sub.named_parameters())
            elif info.role == "experts":
                experts.setdefault(info.site, []).append(sub)
    return {s: RoutedParts(frozenset(params.get(s, ())), tuple(experts.get(s, ())), selection.get(s))
            for s in set(params) | set(experts)}


def model_sites(model: nn.Module, example_inputs: tuple | None = None,
                example_kwargs: dict | None = None) -> list[tuple[FFNSite, bool]]:
    """(site, converted) pairs: converted sites in conversion order, then the dense ones
    (find_ffns on the model as it is, minus structures ssdfx created, e.g. an MLP router)."""
    from ssdfx.api import conversion
    from ssdfx.capture import locate

    conv = conversion(model)
    converted = list(conv.sites) if conv else []
    names = {s.name for s in converted}
    ours = set().union(*(r.router_params for r in routed_parts(model).values()))
    # locate, not find_ffns: callers report an empty result themselves, without its warning
    dense = [s for s in locate(model, example_inputs, example_kwargs).sites
             if s.name not in names and s.name not in ours]
    return [(s, True) for s in converted] + [(s, False) for s in dense]


def site_table(model: nn.Module, example_inputs: tuple | None = None,
               example_kwargs: dict | None = None) -> SiteTable:
    """Every FFN site of `model` (converted ones first) with its state."""
    from ssdfx.api import conversion

    conv = conversion(model)
    routed = routed_parts(model)
    rows = []
    for s, converted in model_sites(model, example_inputs, example_kwargs):
        sel = routed[s.name].selection if s.name in routed else None
        shown = "" if sel is None or sel[0] == "select_top_k" else \
            f"{sel[0].removeprefix('select_')}({', '.join(map(str, sel[1]))})"
        rows.append(SiteRow(
            s.path, s.name, s.kind, s.d_model, s.d_ff, s.activation,
            "sparse" if converted else "dense",
            conv.num_experts if converted else None, conv.top_k if converted else None,
            s.scope.kind, shown))
    return SiteTable(tuple(rows))


def resolve_site(model: nn.Module, site: FFNSite | int | str, example_inputs: tuple | None = None,
                 example_kwargs: dict | None = None) -> FFNSite:
    """The FFNSite named by `site`: an index into site_table(model), a module path, a site name
    (input weight), or an FFNSite (returned as is)."""
    if isinstance(site, FFNSite):
        return site
    found = [s for s, _ in model_sites(model, example_inputs, example_kwargs)]
    if isinstance(site, int) and not isinstance(site, bool):
        if not -len(found) <= site < len(found):
            raise IndexError(f"site index {site} out of range: the model has {len(found)} FFN site(s)")
        return found[site]
    for s in found:
        if site in (s.path, s.name):
            return s
    raise KeyError(f"no FFN site {site!r}; sites: {[s.path for s in found]} "
                   "(a site is named by its index, module path or input-weight name)")


@dataclass(frozen=True)
class SiteGraph:
    """One module of a site: `before` is an fx trace of the dense module, `after` the rewritten
    GraphModule in the model (None while the site is dense)."""

    path: str
    before: fx.GraphModule
    after: fx.GraphModule | None


def _originals(model: nn.Module) -> dict[str, nn.Module]:
    from ssdfx.api import original_modules

    return original_modules(model)


def site_graphs(model: nn.Module, site: FFNSite | int | str) -> tuple[SiteGraph, ...]:
    """The graphs of one site: one module (module scope) or each child of a chain (BERT, OPT)."""
    from ssdfx.api import conversion
    from ssdfx.capture import require_traced

    s = resolve_site(model, site)
    paths = [s.scope.path] if s.scope.kind == "module" else list(s.scope.children)
    conv = conversion(model)
    converted = conv is not None and s.name in {c.name for c in conv.sites}
    originals = _originals(model) if converted else {}
    out = []
    for p in paths:
        # convert traces a scope nested in another as part of the outer one
        key = next((k for k in sorted(originals, key=len) if p == k or p.startswith(k + ".")), None)
        if converted and key is not None:
            after = model.get_submodule(key)
            out.append(SiteGraph(key, require_traced(originals[key], key),
                                 after if isinstance(after, fx.GraphModule) else None))
        else:
            out.append(SiteGraph(p, require_traced(model.get_submodule(p), p), None))
    return tuple(out)


def code_of(gm: fx.GraphModule) -> str:
    """The generated Python code of a GraphModule, without surrounding blank lines or trailing spaces."""
    return "\n".join(line.rstrip() for line in gm.code.strip().splitlines())


def listing(model: nn.Module, site: FFNSite | int | str) -> str:
    """The generated code of a site's module(s), before and after the rewrite."""
    parts = []
    for g in site_graphs(model, site):
        parts.append(f"--- {g.path or '<root>'}: before ---\n{code_of(g.before)}")
        after = code_of(g.after) if g.after is not None else "(dense: not converted)"
        parts.append(f"--- {g.path or '<root>'}: after ---\n{after}")
    return "\n\n".join(parts)


def _op_label(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "call_function":
        t = node.target
        name = t._schema.name if hasattr(t, "_schema") else getattr(t, "__name__", str(t))
        return name
    return node.op  # placeholder, get_attr, output


def op_counts(gm: fx.GraphModule) -> Counter:
    """Nodes per op: functions by name, methods as '.name', modules by class."""
    return Counter(_op_label(gm, n) for n in gm.graph.nodes)


@dataclass(frozen=True)
class NodeDiff:
    """Node counts per op of a site's graphs, before and after the rewrite."""

    rows: tuple[tuple[str, int, int], ...]  # (op, before, after)

    def to_dicts(self) -> list[dict]:
        return [{"op": op, "before": b, "after": a, "delta": a - b} for op, b, a in self.rows]

    def __str__(self) -> str:
        body = [[op, b, a, f"{a - b:+d}"] for op, b, a in self.rows]
        tb, ta = sum(r[1] for r in self.rows), sum(r[2] for r in self.rows)
        return render(["op", "before", "after", "delta"], body + [["total", tb, ta, f"{ta - tb:+d}"]],
                      rule_before_last=True)


def node_diff(model: nn.Module, site: FFNSite | int | str) -> NodeDiff:
    """How many nodes of each op the rewrite removed and added, over the site's graphs."""
    before, after = Counter(), Counter()
    for g in site_graphs(model, site):
        before += op_counts(g.before)
        after += op_counts(g.after if g.after is not None else g.before)
    ops = sorted(set(before) | set(after), key=lambda o: (-abs(after[o] - before[o]), o))
    return NodeDiff(tuple((o, before[o], after[o]) for o in ops))


_ROLE_COLORS = {"router": "#fde68a", "select": "#fed7aa", "experts": "#86efac",
                "w1": "#bfdbfe", "w2": "#bfdbfe", "w3": "#bfdbfe", "bias": "#e5e7eb",
                "bias_out": "#e5e7eb"}
_SHAPES = {"placeholder": "invhouse", "output": "house", "get_attr": "note"}


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(gm: fx.GraphModule, title: str = "") -> str:
    """Graphviz DOT text of a graph: one box per node (name and op), edges along data flow.
    Nodes an ssdfx pass created are filled by role (router, select, experts, weights) and
    tooltipped with their NodeInfo."""
    lines = [f'digraph "{_esc(title or type(gm).__name__)}" {{', "  rankdir=TB;",
             '  node [shape=box, fontname="monospace", fontsize=10, style="rounded,filled", '
             'fillcolor="white"];']
    if title:
        lines.append(f'  label="{_esc(title)}"; labelloc=t;')
    for n in gm.graph.nodes:
        what = f"self.{n.target}" if n.op == "get_attr" else _op_label(gm, n)
        plain = n.op in ("placeholder", "output") or what == n.name
        label = _esc(n.name) if plain else f"{_esc(n.name)}\\n{_esc(what)}"
        attrs = [f'label="{label}"']
        if n.op in _SHAPES:
            attrs.append(f"shape={_SHAPES[n.op]}")
        info = n.meta.get(META_KEY)
        if isinstance(info, NodeInfo):
            attrs.append(f'fillcolor="{_ROLE_COLORS.get(info.role, "#ddd6fe")}"')
            attrs.append(f'tooltip="{_esc(f"{info.pass_name}: {info.role} of {info.site}")}"')
        lines.append(f'  "{_esc(n.name)}" [{", ".join(attrs)}];')
    for n in gm.graph.nodes:
        for i in n.all_input_nodes:
            lines.append(f'  "{_esc(i.name)}" -> "{_esc(n.name)}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def graphviz_available() -> bool:
    """Whether graphviz's `dot` program is on PATH (needed for SVG/PNG/PDF, not for .dot)."""
    return shutil.which("dot") is not None


def _slug(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path) or "root"


def draw_site(model: nn.Module, site: FFNSite | int | str, directory: str,
              fmt: str | None = None) -> list[str]:
    """Write DOT drawings of a site's graphs before and after into `directory` and render them.

    fmt: "svg", "png", "pdf" (rendered with graphviz's `dot`), "dot" (text only) or None (svg
    when graphviz is installed, else text only). Returns the paths written. Raises
    GraphvizNotFoundError after writing the .dot files when fmt asks for rendering and `dot` is
    not on PATH, GraphvizFailedError (with dot's own message) when it fails.
    """
    if fmt not in (None, "dot", "svg", "png", "pdf"):
        raise ValueError(f"fmt must be 'svg', 'png', 'pdf', 'dot' or None, got {fmt!r}")
    exe = shutil.which("dot")
    render_fmt = ("svg" if exe else None) if fmt is None else (None if fmt == "dot" else fmt)
    os.makedirs(directory, exist_ok=True)
    written = []
    for g in site_graphs(model, site):
        for when, gm in (("before", g.before), ("after", g.after)):
            if gm is None:
                continue
            base = os.path.join(directory, f"{_slug(g.path)}.{when}")
            with open(base + ".dot", "w", encoding="utf-8") as f:
                f.write(to_dot(gm, f"{g.path or '<root>'} ({when})"))
            written.append(base + ".dot")
    if render_fmt is None:
        return written
    if exe is None:
        raise GraphvizNotFoundError(
            f"rendering {render_fmt} needs graphviz's `dot` program, which is not on PATH; the .dot "
            f"files were written to {directory}. Install graphviz (apt-get install graphviz, "
            f"brew install graphviz or conda install graphviz), or render them elsewhere with "
            f"`dot -T{render_fmt} FILE.dot -o FILE.{render_fmt}`")
    for src in list(written):
        dst = src[:-4] + "." + render_fmt
        done = subprocess.run([exe, f"-T{render_fmt}", src, "-o", dst], capture_output=True,
                              text=True)
        if done.returncode != 0:
            said = " ".join(done.stderr.split()) or f"exit status {done.returncode}, no message"
            raise GraphvizFailedError(
                f"{exe} -T{render_fmt} failed on {src}: {said}. The .dot files are written in "
                f"{directory}; pass --format dot (fmt='dot') to skip rendering, or install "
                f"graphviz with {render_fmt} support")
        written.append(dst)
    return written
