"""Find FFN subgraphs by structure: linear-like -> elementwise chain -> linear-like.

Works on two node vocabularies with one set of rules: fx symbolic traces of modules (torch-level
call_function / call_method / call_module nodes, weights as get_attr) and torch.export graphs of
whole models (aten ops, weights as placeholders). Nodes are classified by the *type* of the
operation (an op's schema name, a module's class), never by node, module or attribute names.

A candidate is accepted when redirecting the users of the output projection would leave every
node of the dense computation dead: nothing else reads the hidden activations, so the routed
expert op can replace the whole thing. Its activation is identified numerically, by evaluating
the elementwise chain on a probe and comparing it with ssdfx.activations.ACTIVATIONS; any
decomposition (HF's tanh-GELU as mul/pow/tanh, say) is recognised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn

from ssdfx.activations import ACTIVATIONS
from ssdfx.site import NeuronDims

__all__ = [
    "GraphView", "LinearMatch", "SiteMatch", "find_sites", "linear_matches", "walk_back",
    "dead_closure", "op_name", "owner_of",
]

# -- node vocabulary -----------------------------------------------------------------------------

_LINEAR_CORE = {"linear", "addmm", "mm", "matmul"}
# Ops that change a tensor's shape or dtype but not its values, as far as an FFN chain is
# concerned (they keep the last dimension in every FFN we know).
_PASS_THROUGH = {
    "view", "reshape", "_unsafe_view", "flatten", "contiguous", "clone", "alias", "to",
    "_to_copy", "type", "type_as", "float", "half", "bfloat16", "identity",
}
_DROPOUT = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"}
_RESHAPE = {"view", "reshape", "_unsafe_view", "flatten"}
_ELEMENTWISE = {
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "erf", "exp", "expm1", "log1p", "sqrt",
    "rsqrt", "square", "abs", "neg", "pow", "mul", "add", "sub", "rsub", "truediv", "div",
    "clamp", "clamp_min", "clamp_max", "maximum", "minimum", "softplus", "mish", "hardswish",
    "hardsigmoid", "hardtanh", "leaky_relu", "elu", "selu", "celu", "reciprocal",
    "logsigmoid", "softsign", "tanhshrink", "threshold", "sign", "log_sigmoid", "sin", "cos",
    "log", "erfc", "atan", "sinh", "cosh", "exp2", "log2",
}
_SHAPE_QUERY = {"size", "dim", "sym_size", "numel", "sym_numel", "getattr"}
_TRANSPOSE = {"t", "transpose", "permute", "numpy_T"}
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Tanhshrink,
    nn.Softsign, nn.LogSigmoid, nn.Threshold,
)


def op_name(node: fx.Node) -> str | None:
    """The name of the operation a node performs (its type), or None for non-ops."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            name = t._schema.name.split("::")[-1]
        elif isinstance(t, torch._ops.OpOverloadPacket):
            name = t._qualified_op_name.split("::")[-1]
        else:
            name = getattr(t, "__name__", None)
            if name is None:
                return None
    else:
        return None
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]  # in-place variants: relu_ is relu for matching purposes
    return name


def owner_of(node: fx.Node) -> str | None:
    """Path (relative to the traced root) of the innermost module that ran this node."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return _normalize_path(path)


def _normalize_path(path: str) -> str:
    # strict export writes "L['self'].h[0].mlp"; non-strict export and fx write "h.0.mlp"
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
    return path.replace("[", ".").replace("]", "").replace("'", "")


# -- graph view ----------------------------------------------------------------------------------


@dataclass
class GraphView:
    """A graph plus what is needed to read parameters from it.

    params maps nodes that produce a parameter (get_attr in fx, placeholders in export) to the
    parameter's fully qualified name in the model; `shapes` gives each parameter's shape.
    `root` resolves call_module targets (None for export graphs, which have none); `prefix` is
    the root's path in the model, so names of parameters reached through modules are complete.
    """

    graph: fx.Graph
    params: Mapping[fx.Node, str]
    shapes: Mapping[str, torch.Size]
    root: nn.Module | None = None
    prefix: str = ""

    @classmethod
    def of_module(cls, gm: fx.GraphModule, prefix: str = "") -> "GraphView":
        shapes = {_join(prefix, k): p.shape for k, p in gm.named_parameters(remove_duplicate=False)}
        params = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr" and _join(prefix, str(n.target)) in shapes:
                params[n] = _join(prefix, str(n.target))
        return cls(gm.graph, params, shapes, gm, prefix)

    def module(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module" or self.root is None:
            return None
        return self.root.get_submodule(str(node.target))


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else (a or b)


# -- linear-like maps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearMatch(NeuronDims):
    core: fx.Node  # the matmul-like node
    x: fx.Node  # its data input with flattening views stripped
    out: fx.Node  # the node whose value the linear map produces (after bias add / unflatten)
    weight: str
    bias: str | None
    transposed: bool  # weight stored (in, out)
    in_features: int
    out_features: int


def _param_of(view: GraphView, node) -> tuple[str, bool] | None:
    """(name, transposed) when `node` is a parameter or the transpose of one."""
    if not isinstance(node, fx.Node):
        return None
    if node in view.params:
        return view.params[node], False
    name = op_name(node)
    if name in _TRANSPOSE or (node.op == "call_function" and node.target is getattr and
                              len(node.args) > 1 and node.args[1] in ("T", "mT")):
        src = node.args[0]
        if src in view.params and len(view.shapes[view.params[src]]) == 2:
            if name == "permute":
                dims = node.args[1] if len(node.args) == 2 else node.args[1:]
                if list(dims) not in ([1, 0], [-1, -2]):
                    return None
            if name == "transpose" and sorted(int(a) % 2 for a in node.args[1:3]) != [0, 1]:
                return None
            return view.params[src], True
    return None


def _linear_match(view: GraphView, node: fx.Node) -> LinearMatch | None:
    mod = view.module(node)
    bias = None
    if isinstance(mod, nn.Linear):
        x = node.args[0]
        weight, transposed = _join(view.prefix, f"{node.target}.weight"), False
        if mod.bias is not None:
            bias = _join(view.prefix, f"{node.target}.bias")
        shape = mod.weight.shape
    else:
        name = op_name(node)
        if name not in _LINEAR_CORE or node.op == "call_module":
            return None
        args = list(node.args)
        if name == "linear":
            x, w = args[0], args[1] if len(args) > 1 else node.kwargs.get("weight")
            b = args[2] if len(args) > 2 else node.kwargs.get("bias")
            ref = _param_of(view, w)
            if ref is None:
                return None
            weight, transposed = ref  # F.linear(x, W): W (out, in) unless a transposed param
            if b is not None:
                bref = _param_of(view, b)
                if bref is None:
                    return None
                bias = bref[0]
        elif name == "addmm":
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                return None
            b, x, w = args[0], args[1], args[2]
            ref, bref = _param_of(view, w), _param_of(view, b)
            if ref is None or bref is None:
                return None
            weight, transposed = ref[0], not ref[1]  # x @ W: W stored (in, out) unless a .t()
            bias = bref[0]
        else:  # mm / matmul: x @ W
            if len(args) != 2:
                return None
            x, w = args
            ref = _param_of(view, w)
            if ref is None:
                return None
            weight, transposed = ref[0], not ref[1]
        shape = view.shapes[weight]
        if len(shape) != 2:
            return None
    out_f, in_f = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    out = node
    # bias added after a bare matmul: y = x @ W + b
    if bias is None and len(node.users) == 1:
        (u,) = node.users
        if op_name(u) == "add" and len(u.args) == 2:
            other = u.args[1] if u.args[0] is node else u.args[0]
            bref = _param_of(view, other)
            if bref is not None and not bref[1] and tuple(view.shapes[bref[0]]) == (out_f,):
                bias, out = bref[0], u
    # flatten -> matmul -> unflatten, as HF's Conv1D does: x.view(-1, d) ... .view(*lead, out)
    flattened = False
    while isinstance(x, fx.Node) and op_name(x) in _RESHAPE and len(x.users) == 1:
        x, flattened = x.args[0], True
    if flattened and len(out.users) == 1:
        (u,) = out.users
        if op_name(u) in _RESHAPE:
            out = u
    if not isinstance(x, fx.Node):
        return None
    return LinearMatch(node, x, out, weight, bias, transposed, int(in_f), int(out_f))


# -- sites ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteMatch:
    """A matched FFN in one graph."""

    w_in: LinearMatch  # goes through the activation
    w_out: LinearMatch
    w_up: LinearMatch | None  # GLU linear branch
    activation: str  # name in ACTIVATIONS, or "unknown"
    dropout_p: float
    chain: tuple[fx.Node, ...]  # elementwise nodes between the projections, in graph order
    nodes: frozenset[fx.Node]  # every node the dense computation owns (dies on rewrite)

    @property
    def x(self) -> fx.Node:
        return self.w_in.x

    def graph_order(self) -> list[fx.Node]:
        return [n for n in self.w_out.core.graph.nodes if n in self.nodes]


def _data_args(node: fx.Node) -> list[fx.Node]:
    """Tensor operands of a chain node (not shape or dtype arguments)."""
    name = op_name(node)
    if node.op == "call_module" or name in _PASS_THROUGH or name in _DROPOUT:
        first = node.args[0] if node.args else node.kwargs.get("input")
        return [first] if isinstance(first, fx.Node) else []
    return [a for a in node.all_input_nodes]


def _is_chain_node(view: GraphView, node: fx.Node) -> bool:
    if node.op == "call_module":
        mod = view.module(node)
        return isinstance(mod, (nn.Dropout, nn.Identity) + _ELEMENTWISE_MODULES)
    name = op_name(node)
    return name in _ELEMENTWISE or name in _PASS_THROUGH or name in _DROPOUT


def _dropout_p(view: GraphView, node: fx.Node) -> float:
    mod = view.module(node)
    if isinstance(mod, nn.Dropout):
        return float(mod.p)
    if op_name(node) in _DROPOUT:
        # the rate, whatever the train flag was when captured: it is a property of the site
        return float(node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5))
    return 0.0


def dead_closure(out: fx.Node, keep: fx.Node) -> set[fx.Node]:
    """The nodes that die when every use of `out` is redirected to a value computed from
    `keep` (the site input, which stays alive): what DCE removes after the rewrite."""
    dead = {out}
    work = list(out.all_input_nodes)
    while work:
        n = work.pop()
        if n in dead or n is keep or n.op in ("placeholder", "output"):
            continue
        if all(u in dead for u in n.users):
            dead.add(n)
            work.extend(n.all_input_nodes)
    return dead


def walk_back(view: GraphView, start: fx.Node, sources: Mapping[fx.Node, object]):
    """Chain nodes between `start` (inclusive) and the `sources` that feed it, or None when a
    node on the way is not elementwise. Returns (chain nodes, the sources reached)."""
    chain, found, stack = set(), {}, [start]
    while stack:
        n = stack.pop()
        if n in chain or n in found:
            continue
        if n in sources:
            found[n] = sources[n]
            continue
        if not _is_chain_node(view, n):
            return None
        chain.add(n)
        stack.extend(_data_args(n))
    return chain, list(found.values())


def linear_matches(view: GraphView) -> list[LinearMatch]:
    """Every parameter-backed linear map in the graph, in graph order."""
    return [m for n in view.graph.nodes if (m := _linear_match(view, n)) is not None]


def find_sites(view: GraphView) -> list[SiteMatch]:
    """Every FFN in the graph, in graph order of the output projection."""
    linears = linear_matches(view)
    by_out = {m.out: m for m in linears}
    sites = []
    for lin_out in linears:
        walked = walk_back(view, lin_out.x, {k: v for k, v in by_out.items() if v is not lin_out})
        if walked is None:
            continue
        chain, srcs = walked
        if not chain or not 1 <= len(srcs) <= 2:
            continue  # two linear maps back to back, or more than two feeding one
        if len({s.x for s in srcs}) != 1 or len({s.out_features for s in srcs}) != 1:
            continue
        if srcs[0].out_features != lin_out.in_features:
            continue
        dead = dead_closure(lin_out.out, srcs[0].x)
        if not all(s.core in dead for s in srcs) or not chain <= dead:
            continue  # something else reads the hidden activations: not a self-contained FFN
        if any(n.op == "call_function" and n.is_impure() for n in dead - chain):
            continue
        order = {n: i for i, n in enumerate(view.graph.nodes)}
        chain_sorted = tuple(sorted(chain, key=order.__getitem__))
        act, gate_first = _identify(view, chain_sorted, srcs)
        if len(srcs) == 2 and not gate_first:
            srcs = [srcs[1], srcs[0]]
        p = max((_dropout_p(view, n) for n in chain_sorted), default=0.0)
        sites.append(SiteMatch(srcs[0], lin_out, srcs[1] if len(srcs) == 2 else None, act, p,
                               chain_sorted, frozenset(dead)))
    return sites


# -- activation identification ---------------------------------------------------------------


def _evaluate(view: GraphView, chain: Iterable[fx.Node], env: dict) -> torch.Tensor:
    """Run the chain on probe tensors; reshapes and dropout are identities here."""
    last = None
    for n in chain:
        name = op_name(n)
        if n.op == "call_module":
            mod = view.module(n)
            val = env[n.args[0]] if isinstance(mod, (nn.Dropout, nn.Identity)) else mod(env[n.args[0]])
        elif name in _PASS_THROUGH or name in _DROPOUT:
            val = env[_data_args(n)[0]]
        else:
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
            if n.op == "call_method":
                val = getattr(args[0], str(n.target))(*args[1:], **kwargs)
            else:
                val = n.target(*args, **kwargs)
        env[n] = val
        last = n
    return env[last]


def _probe(n: int, gen: torch.Generator) -> torch.Tensor:
    """Pre-activation probe values: dense around 0, plus magnitudes up to 1e6 of both signs.

    The far values matter: ReLU6 or Hardtanh(0, 20) equal ReLU on [-6, 6] and differ only
    beyond it (taking one for ReLU silently changed converted outputs by up to 7).
    """
    near = torch.linspace(-6.0, 6.0, n, dtype=torch.float64)
    far = torch.logspace(-3, 6, 91, dtype=torch.float64)
    vals = torch.cat([near, far, -far])
    return vals[torch.randperm(vals.numel(), generator=gen)]


def _identify(view: GraphView, chain, srcs) -> tuple[str, bool]:
    """(activation name, True if srcs[0] is the activated branch)."""
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            if len(srcs) == 1:
                a = _probe(1201, gen)
                out = _evaluate(view, chain, {srcs[0].out: a})
                for name, fn in ACTIVATIONS.items():
                    if _close(out, fn(a)):
                        return name, True
                return "unknown", True
            a, b = _probe(513, gen), _probe(513, gen)  # independently shuffled
            out = _evaluate(view, chain, {srcs[0].out: a, srcs[1].out: b})
            for name, fn in ACTIVATIONS.items():
                if _close(out, fn(a) * b):
                    return name, True
                if _close(out, fn(b) * a):
                    return name, False
    except Exception:  # an op that cannot run on a probe is not an activation we know
        pass
    return "unknown", True


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return False
    return bool(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6))
