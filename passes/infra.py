"""What every ssdfx pass returns, and the one place where graphs are cleaned and recompiled.

A pass is a function `(GraphModule, config) -> PassResult` that only edits the graph (and, for
moefy/densify, permutes the parameters it owns). `run_pass` then removes dead code, lints,
stamps a provenance comment into the generated code and recompiles. `PassResult` has
`graph_module` and `modified`, so torch.fx's own PassManager can run ssdfx passes too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

__all__ = ["SiteReport", "PassResult", "run_pass", "permute_", "inverse_permutation"]


@dataclass(frozen=True)
class SiteReport:
    """One rewritten site.

    params: (old name, new name) pairs: ("", name) for a parameter the pass created, (name, "")
    for one it removed, (name, name) for one it permuted in place. permuted: (name, dim) of every
    tensor whose neuron order changed, so optimizer state can follow (see ssdfx.api.convert).
    flops_*: forward FLOPs per token of the site, dense and after the pass.
    """

    site: str
    path: str
    nodes_erased: int
    nodes_created: int
    params: tuple[tuple[str, str], ...] = ()
    permuted: tuple[tuple[str, int], ...] = ()
    permutation: torch.Tensor | None = field(default=None, compare=False, repr=False)
    flops_before: int | None = None
    flops_after: int | None = None


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    report: tuple[SiteReport, ...] = ()


class _Provenance:
    """Prepends a comment to the generated forward (picklable, survives recompiles)."""

    def __init__(self, lines: list[str], inner=None):
        self.lines = lines
        self.inner = inner

    def __call__(self, body: list[str]) -> list[str]:
        body = self.inner(body) if self.inner is not None else body
        return [f"# {line}\n" for line in self.lines] + body


def run_pass(pass_fn: Callable[..., PassResult], gm: fx.GraphModule, config=None) -> PassResult:
    """Run one pass, then clean up and recompile the graph once."""
    result = pass_fn(gm, config) if config is not None else pass_fn(gm)
    if result.modified:
        g = result.graph_module.graph
        g.eliminate_dead_code()
        result.graph_module.delete_all_unused_submodules()
        g.lint()
        name = getattr(pass_fn, "__name__", "pass")
        note = f"ssdfx: {name} rewrote {len(result.report)} site(s): " + ", ".join(
            r.site for r in result.report)
        old = g._codegen._body_transformer
        lines = (old.lines if isinstance(old, _Provenance) else []) + [note]
        g._codegen._body_transformer = _Provenance(lines)
        result.graph_module.recompile()
    return result


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def permute_(p: torch.Tensor, perm: torch.Tensor, dim: int) -> None:
    """In place: index j along `dim` takes the value of index perm[j]. Keeps the tensor object
    (optimizers and DDP hold references to parameters), and its gradient if any."""
    with torch.no_grad():
        p.copy_(p.index_select(dim, perm.to(p.device)))
        if p.grad is not None:
            p.grad.copy_(p.grad.index_select(dim, perm.to(p.device)))
