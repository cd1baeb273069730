"""observe: record each FFN site's input, so activation statistics can be computed from it.

Before:

    c_fc = self.c_fc(x)            # the site's input projection reads x
After:

    ssdfx_observer = self.ssdfx_observer(x)   # records x (a bounded token sample); no users
    c_fc = self.c_fc(x)

The observer has no effect on outputs: it returns nothing the graph uses (it is marked impure
so dead-code elimination keeps it). With the site's weights, its input determines every
statistic ssdfx needs (pre-activations, activation mass, co-activation), so observing x once
is enough. `unobserve` is the inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ssdfx.match import GraphView, linear_matches
from ssdfx.site import META_KEY, NodeInfo

from .infra import PassResult, SiteReport

__all__ = ["InputRecorder", "ObservePassConfig", "observe", "unobserve"]


class InputRecorder(nn.Module):
    """Keeps up to `max_tokens` rows of its (..., d) input, in arrival order. Where `mask` is
    set and has the input's leading shape (an attention mask (B, S) for a (B, S, d) input),
    only the rows it marks are recorded (padding is not a token)."""

    _is_impure = True  # fx: keep the call although nothing uses its result

    def __init__(self, max_tokens: int):
        super().__init__()
        self.max_tokens = max_tokens
        self.rows: list[torch.Tensor] = []
        self.seen = 0
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.mask is not None and self.mask.shape == x.shape[:-1]:
            flat = x[self.mask.to(x.device)]  # (T, d) real tokens only
        else:
            flat = x.reshape(-1, x.shape[-1])  # (T, d)
        room = self.max_tokens - sum(r.shape[0] for r in self.rows)
        if room > 0:
            self.rows.append(flat[:room].float().cpu().clone())
        self.seen += flat.shape[0]

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.empty(0)


@dataclass(frozen=True)
class ObservePassConfig:
    """recorders: input-weight name of a site -> the InputRecorder to attach; `prefix` is the
    graph module's path in the model."""

    recorders: dict
    prefix: str = ""


def observe(gm: fx.GraphModule, config: ObservePassConfig) -> PassResult:
    view = GraphView.of_module(gm, config.prefix)
    reports = []
    for i, lm in enumerate(m for m in linear_matches(view) if m.weight in config.recorders):
        name = f"ssdfx_observer_{i}"
        gm.add_submodule(name, config.recorders[lm.weight])
        with gm.graph.inserting_before(lm.core):
            node = gm.graph.call_module(name, (lm.x,))
        node.meta[META_KEY] = NodeInfo("observe", lm.weight, "observer")
        reports.append(SiteReport(lm.weight, config.prefix, 0, 1))
    return PassResult(gm, bool(reports), tuple(reports))


def unobserve(gm: fx.GraphModule, config=None) -> PassResult:
    reports = []
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), InputRecorder):
            site = node.meta.get(META_KEY, NodeInfo("observe", str(node.target), "observer")).site
            gm.graph.erase_node(node)
            reports.append(SiteReport(site, "", 1, 0))
    return PassResult(gm, bool(reports), tuple(reports))
