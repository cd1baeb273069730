"""Analytic forward FLOPs, per FFN site and per pass: `ssdfx.flops(model, *args, **kwargs)`.

    >>> table = ssdfx.flops(model)            # HF models bring example inputs; else pass a batch
    >>> print(table); table.total, table.dense_total
    >>> ssdfx.convert(model, num_experts=8, top_k=2)
    >>> ssdfx.flops(model).totals            # {'dense': ..., 'moefy': ...}

How: `torch.export` records the model's graph with every tensor's shape (node.meta["val"]); each
matrix product in it gets the FLOPs of its formula below; a product belongs to an FFN site when
one of its operands is (a view of) a weight of the site or of its router, else to the non-FFN
row. Per site, the figure at each stage is analytic: dense, and after moefy (router + the
selected (token, expert) pairs). A converted model also runs once, so the pairs are measured
(dynamic-k selection leaves -1 slots, which compute nothing).

Convention (the one of torch.utils.flop_counter.FlopCounterMode, so the two can be compared;
also Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1: forward ~ 2N per
token): a multiply-add is 2 FLOPs and only matrix products count; elementwise ops, norms,
softmax and bias adds are not counted. Formulas, shapes as recorded:

    linear(x (..., i), W (o, i))          2 * numel(out) * i
    mm / addmm(A (m, k), B (k, n))        2 * m * k * n
    bmm / baddbmm(A (b, m, k), B)         2 * b * m * k * n
    matmul(A (..., k), B (..., k, n))     2 * numel(out) * k      (torch.matmul broadcasting)
    einsum, two operands                  2 * product of the sizes of all distinct indices
    conv(x (N, Ci, *s), W (Co, Ci/g, *w)) 2 * N * prod(out s) * Co * Ci/g * prod(w)
                                          (transposed: prod(in s) and W (Ci, Co/g, *w))
    scaled_dot_product_attention(q (..., L, E), k (..., S, E), v (..., S, Ev))
                                          2 * numel(q)/E * S * (E + Ev)   (QK^T, then AV)
    ssdfx::moe_ffn(x (T, d), w1 (F, d), expert_idx (T, K))
                                          pairs * 2 * d * F/E * (3 if GLU else 2)

FFN site (T tokens, d = d_model, f = d_ff; GLU sites have a third projection):
    dense  T * 2*d*f * (3 if GLU else 2)
    moefy  router + pairs * 2*d*(f/E) * (3 if GLU else 2)   (pairs = T*k for fixed top-k, so
           router + k/E * dense; the router is counted from the graph: 2*T*d*E for the centroid one)

FlopCounterMode on CPU does not count `aten._scaled_dot_product_flash_attention_for_cpu` (it has
no formula for it); run it under `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)` to compare
(see `counter_flops`).
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ssdfx.debug import RoutedParts, model_sites, routed_parts
from ssdfx.errors import TraceError
from ssdfx.floptable import NON_FFN, FlopRow, FlopTable

__all__ = ["flops", "count_flops", "counter_flops", "node_flops", "op_key"]

# Ops that pass a tensor on without computing on it: a weight read through them still
# belongs to its site (W.t() into an addmm, a Conv1D weight transposed for the routed op, ...).
_VIEWS = frozenset({
    "t", "transpose", "permute", "view", "reshape", "_unsafe_view", "expand", "_to_copy", "to",
    "clone", "contiguous", "detach", "alias", "slice", "select", "unsqueeze", "squeeze",
    "flatten", "unflatten", "narrow", "as_strided", "type_as", "lift_fresh_copy", "numpy_T",
    "split", "split_with_sizes", "chunk", "unbind", "getitem", "t_copy", "view_copy",
    "permute_copy", "transpose_copy", "expand_copy", "_reshape_alias", "dequantize",
})
_SDPA = frozenset({
    "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_attention_math",
})
_CONV = frozenset({"aten::convolution", "aten::_convolution", "aten::conv1d", "aten::conv2d",
                   "aten::conv3d", "aten::conv_transpose1d", "aten::conv_transpose2d",
                   "aten::conv_transpose3d"})


def op_key(node: fx.Node) -> str | None:
    """'namespace::name' of an op node (aten::addmm, ssdfx::moe_ffn), or the Python function's
    name (getitem), or None for non-ops."""
    if node.op != "call_function":
        return None
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name
    return getattr(t, "__name__", None)


def _shape(a) -> tuple[int, ...] | None:
    val = a.meta.get("val") if isinstance(a, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _einsum(equation: str, shapes: list[tuple[int, ...]]) -> int | None:
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    if len(lhs) != 2 or len(shapes) != 2:
        return None  # reductions and chains: torch contracts them pairwise; not modelled
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs, shapes):
        if "..." in term:  # name the ellipsis dims from the right, broadcasting
            head, tail = term.split("...")
            n = len(shape) - len(head) - len(tail)
            term = head + "".join(chr(0x100 + n - 1 - i) for i in range(n)) + tail
        for c, s in zip(term, shape):
            sizes[c] = max(sizes.get(c, 1), s)
    return 2 * math.prod(sizes.values())


def node_flops(node: fx.Node) -> int | None:
    """Forward FLOPs of one node of an exported graph (formulas in the module docstring);
    None when the node is not a matrix product."""
    key = op_key(node)
    if key is None:
        return None
    a = node.args
    out = _shape(node)
    if key == "aten::linear":
        x, w = _shape(a[0]), _shape(a[1])
        return 2 * math.prod(out) * w[-1]
    if key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        x = _shape(a[-2] if key in ("aten::addmm", "aten::baddbmm") else a[0])
        return 2 * math.prod(out) * x[-1]
    if key == "aten::matmul":
        return 2 * math.prod(out) * _shape(a[0])[-1]
    if key == "aten::einsum":
        return _einsum(a[0], [_shape(o) for o in a[1]])
    if key in _SDPA:
        q, k, v = _shape(a[0]), _shape(a[1]), _shape(a[2])
        return 2 * (math.prod(q) // q[-1]) * k[-2] * (q[-1] + v[-1])
    if key in _CONV:
        x, w = _shape(a[0]), _shape(a[1])
        transposed = "transpose" in key or (key in ("aten::convolution", "aten::_convolution")
                                            and bool(a[6]))
        spatial = x[2:] if transposed else out[2:]
        return 2 * x[0] * math.prod(spatial) * w[0] * w[1] * math.prod(w[2:])
    if key == "ssdfx::moe_ffn":
        x, w1, idx = _shape(a[0]), _shape(a[1]), _shape(a[6])
        glu = a[4] is not None
        return math.prod(idx) * 2 * x[-1] * (w1[0] // int(a[9])) * (3 if glu else 2)
    return None


@dataclass(frozen=True)
class _Counted:
    """The matrix products of one exported forward pass."""

    flops: dict[fx.Node, int]  # node -> FLOPs
    reads: dict[fx.Node, frozenset[str]]  # node -> parameters it reads (through views)
    uncounted: Counter  # ops FlopCounterMode knows but no formula here covers


def _export(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise TraceError(
            f"ssdfx.flops reads shapes from torch.export, which failed on {type(model).__name__}: "
            f"{type(e).__name__}: {msg}. Pass example inputs the model accepts (as positional and "
            "keyword arguments of its forward) and make its forward exportable.") from e


def _count(ep: torch.export.ExportedProgram) -> _Counted:
    from torch.utils.flop_counter import flop_registry

    names = ep.graph_signature.inputs_to_parameters
    params = {n: names[n.name] for n in ep.graph.nodes if n.op == "placeholder" and n.name in names}
    flops, reads, uncounted = {}, {}, Counter()
    for n in ep.graph.nodes:
        f = node_flops(n)
        if f is not None:
            flops[n] = f
            reads[n] = frozenset().union(*(_through_views(i, params) for i in n.all_input_nodes))
        elif n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and \
                n.target.overloadpacket in flop_registry:
            uncounted[op_key(n)] += 1
    return _Counted(flops, reads, uncounted)


def _through_views(node: fx.Node, params: dict[fx.Node, str]) -> frozenset[str]:
    """Parameters that reach `node` through view-like ops only."""
    if node.op == "placeholder":
        return frozenset([params[node]]) if node in params else frozenset()
    key = op_key(node)
    if key is None or key.split("::")[-1] not in _VIEWS:
        return frozenset()
    return frozenset().union(*(_through_views(i, params) for i in node.all_input_nodes))


def _measure(model: nn.Module, args: tuple, kwargs: dict, routed: dict[str, RoutedParts]) -> dict:
    """Run the model once; per converted site: (tokens, selected pairs). Slots with index -1
    (dynamic-k) select nothing."""
    seen: dict[str, list[int]] = {}

    def hook(site):
        def pre(module, a, kw):
            x = a[0] if a else kw["x"]
            idx = a[6] if len(a) > 6 else kw["expert_idx"]
            s = seen.setdefault(site, [0, 0])
            s[0] += x.numel() // x.shape[-1]
            s[1] += int((idx >= 0).sum())
        return pre

    handles = [m.register_forward_pre_hook(hook(site), with_kwargs=True)
               for site, r in routed.items() for m in r.experts]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {site: tuple(v) for site, v in seen.items()}


def _ffn_flops(tokens: int, d: int, f: int, glu: bool) -> int:
    return tokens * 2 * d * f * (3 if glu else 2)


def count_flops(model: nn.Module, args: tuple = (), kwargs: dict | None = None, *,
                measure: bool = True) -> FlopTable:
    """`ssdfx.flops` with explicit inputs. measure=False skips running a converted model (so does
    a model on the meta device): every selection slot is then assumed used (exact for fixed
    top-k, an upper bound for dynamic-k)."""
    from ssdfx.api import conversion

    kwargs = dict(kwargs or {})
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)  # HF: export cannot return cache objects
    conv = conversion(model)
    sites = model_sites(model, args or None, kwargs or None)
    names = {s.name for s, converted in sites if converted}
    counted = _count(_export(model, tuple(args), kwargs))
    routed = routed_parts(model)
    on_meta = any(p.is_meta for p in model.parameters())  # shapes only: nothing can run
    measure = measure and conv is not None and not on_meta
    measured = _measure(model, tuple(args), kwargs, routed) if measure else {}

    stages = ("dense", "moefy") if conv else ("dense",)
    rows, claimed = [], set()
    for s, _ in sites:
        glu = s.w_up is not None
        mine = {s.w_in.weight, s.w_out.weight} | ({s.w_up.weight} if glu else set())
        is_conv = s.name in names
        router_params = routed[s.name].router_params if s.name in routed else frozenset()
        if is_conv:
            mine |= router_params
        nodes = [n for n, r in counted.reads.items() if r & mine and n not in claimed]
        claimed.update(nodes)
        if not is_conv:
            w_in_nodes = [n for n in nodes if s.w_in.weight in counted.reads[n]]
            tokens = sum(counted.flops[n] for n in w_in_nodes) // (2 * s.d_model * s.d_ff)
            fig = _ffn_flops(tokens, s.d_model, s.d_ff, glu)
            rows.append(FlopRow(s.path, (fig,) * len(stages), s.name, s.kind, s.d_model, s.d_ff, tokens))
            continue
        e = conv.num_experts
        router = sum(counted.flops[n] for n in nodes if counted.reads[n] & router_params)
        if s.name in measured:
            tokens, pairs = measured[s.name]
        else:
            op_nodes = [n for n in nodes if s.w_in.weight in counted.reads[n]]
            tokens = sum(math.prod(_shape(n.args[0])) // s.d_model for n in op_nodes)
            pairs = tokens * conv.top_k
        sparse = router + pairs * 2 * s.d_model * (s.d_ff // e) * (3 if glu else 2)
        rows.append(FlopRow(s.path, (_ffn_flops(tokens, s.d_model, s.d_ff, glu), sparse), s.name,
                            s.kind, s.d_model, s.d_ff, tokens, e, pairs / tokens if tokens else None))
    rest = sum(f for n, f in counted.flops.items() if n not in claimed)
    rows.append(FlopRow(NON_FFN, (rest,) * len(stages)))

    by_op = Counter()
    for n, f in counted.flops.items():
        by_op[op_key(n)] += f
    notes = [f"no formula for {op} (x{c}): not counted" for op, c in counted.uncounted.items()]
    if conv and not measure:
        why = "the model is on the meta device" if on_meta else "measure=False"
        notes.append(f"not run ({why}): every top-k slot counted as a selected expert")
    config = f"moefy: E={conv.num_experts}, top_k={conv.top_k}" if conv else ""
    dynamic = {r.selection[1][0] for r in routed.values()
               if r.selection and r.selection[0] == "select_dynamic_k" and r.selection[1]}
    if dynamic:
        config += f" as the cap of dynamic_k={', '.join(map(str, sorted(dynamic)))} (k: measured mean)"
    return FlopTable(stages, tuple(rows), config, tuple(sorted(by_op.items())), tuple(notes))


def flops(model: nn.Module, *example_args, **example_kwargs) -> FlopTable:
    """Forward FLOPs of `model` per FFN site and in total, dense and after each pass applied.

    Returns a `FlopTable` (print it; `.total`, `.totals`, `.to_dicts()`, `.to_csv()`). With no
    inputs, HF models use their own small example inputs; other models need a batch:

        >>> ssdfx.flops(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16)),
        ...             torch.randn(5, 16)).total
        20480
    """
    if not example_args and not example_kwargs:
        from ssdfx.capture import example_inputs

        auto = example_inputs(model)
        if auto is None:
            raise ValueError(
                f"ssdfx.flops needs example inputs for a {type(model).__name__} (only HF models "
                "describe their own): call ssdfx.flops(model, x) with a batch its forward accepts")
        example_args, example_kwargs = auto
    return count_flops(model, tuple(example_args), dict(example_kwargs))


def counter_flops(model: nn.Module, *args, **kwargs) -> int:
    """torch's own count: FlopCounterMode's total for one forward pass, the cross-check.

    Runs under the math SDPA backend, which FlopCounterMode counts (on CPU it counts the flash
    kernel as 0), with grad enabled (torch's ModuleTracker fails under no_grad when a module
    receives a view of a parameter, as the routed-expert modules do).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad(), FlopCounterMode(display=False) as fc:
        model(*args, **kwargs)
    return fc.get_total_flops()
