"""The table `ssdfx.flops` returns: forward FLOPs per FFN site and in total, one column per stage
(dense, then after each FLOP-changing pass applied to the model, e.g. moefy).

    >>> t = FlopTable(("dense", "moefy"), (
    ...     FlopRow("h.0.mlp", (1000, 300), kind="plain", tokens=10, experts=8, k=2.0),
    ...     FlopRow(NON_FFN, (500, 500))))
    >>> t.total, t.dense_total, t.totals
    (800, 1500, {'dense': 1500, 'moefy': 800})
    >>> t.to_dicts()[-1]["site"]
    'total'
"""

from __future__ import annotations

from dataclasses import dataclass

from ssdfx.tables import render, si, to_csv

__all__ = ["FlopRow", "FlopTable", "NON_FFN", "TOTAL"]

NON_FFN = "(non-FFN)"  # row label: everything outside the FFN sites (attention, head, ...)
TOTAL = "total"


@dataclass(frozen=True)
class FlopRow:
    """Forward FLOPs of one FFN site (or of the rest of the model), one figure per stage.

    tokens: tokens that went through the site in the counted forward pass. experts: E once the
    site is converted. k: experts per token, averaged over tokens (measured when the model ran;
    for fixed top-k it is exactly top_k).
    """

    site: str
    flops: tuple[int, ...]
    name: str = ""
    kind: str = ""
    d_model: int = 0
    d_ff: int = 0
    tokens: int = 0
    experts: int | None = None
    k: float | None = None

    def __post_init__(self):
        if not self.flops or any(not isinstance(f, int) or f < 0 for f in self.flops):
            raise ValueError(f"FlopRow {self.site}: flops must be non-negative ints, got {self.flops}")
        if self.tokens < 0:
            raise ValueError(f"FlopRow {self.site}: tokens must be >= 0, got {self.tokens}")

    @property
    def ratio(self) -> float | None:
        """Last stage over first (sparse over dense); None when the dense figure is 0."""
        return self.flops[-1] / self.flops[0] if self.flops[0] else None


@dataclass(frozen=True)
class FlopTable:
    """Per-site and total forward FLOPs of a model, one column per stage.

    `stages[0]` is always "dense" (every site as a dense FFN); later stages are the passes that
    change FLOPs, as applied to the model now (e.g. "moefy"), so `total` (the last stage) is
    what the model computes as it is. `config` describes the stages (e.g. "moefy: E=8, top_k=2"),
    `by_op` gives the counted forward FLOPs per op of the model as it is, and `notes` says what
    was assumed (e.g. that no expert was measured).
    """

    stages: tuple[str, ...]
    rows: tuple[FlopRow, ...]
    config: str = ""
    by_op: tuple[tuple[str, int], ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.stages or self.stages[0] != "dense":
            raise ValueError(f"stages must start with 'dense', got {self.stages}")
        for r in self.rows:
            if len(r.flops) != len(self.stages):
                raise ValueError(f"row {r.site} has {len(r.flops)} figures for stages {self.stages}")

    @property
    def totals(self) -> dict[str, int]:
        return {s: sum(r.flops[i] for r in self.rows) for i, s in enumerate(self.stages)}

    @property
    def total(self) -> int:
        """Forward FLOPs of the model as it is now (the last stage)."""
        return self.totals[self.stages[-1]]

    @property
    def dense_total(self) -> int:
        return self.totals["dense"]

    @property
    def sites(self) -> tuple[FlopRow, ...]:
        return tuple(r for r in self.rows if r.site != NON_FFN)

    def row(self, key: str) -> FlopRow:
        """The row of a site, by module path or site name (its input weight)."""
        for r in self.rows:
            if key in (r.site, r.name):
                return r
        raise KeyError(f"no row {key!r}; rows: {[r.site for r in self.rows]}")

    def to_dicts(self) -> list[dict]:
        """One dict per row, then the total row (site == 'total'); FLOPs as ints."""
        out = []
        for r in self.rows:
            d = {"site": r.site, "name": r.name, "kind": r.kind, "d_model": r.d_model or None,
                 "d_ff": r.d_ff or None, "tokens": r.tokens or None, "experts": r.experts, "k": r.k}
            d.update({f"flops_{s}": f for s, f in zip(self.stages, r.flops)})
            d["ratio"] = r.ratio
            out.append(d)
        tot = self.totals
        total = {k: None for k in (out[0] if out else {})}
        total.update({"site": TOTAL, "name": "", "kind": ""})
        total.update({f"flops_{s}": tot[s] for s in self.stages})
        total["ratio"] = tot[self.stages[-1]] / tot["dense"] if tot["dense"] else None
        return out + [total]

    def to_csv(self, path: str | None = None) -> str:
        """CSV text of `to_dicts()`; also written to `path` when given."""
        text = to_csv(self.to_dicts())
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def __str__(self) -> str:
        sparse = len(self.stages) > 1
        headers = ["site", "kind", "d_model", "d_ff", "tokens"] + (["E", "k"] if sparse else [])
        headers += [f"{s} FLOPs" for s in self.stages] + (["ratio"] if sparse else [])
        rows = []
        for d in self.to_dicts():
            cells = [d["site"], d["kind"], d["d_model"], d["d_ff"], d["tokens"]]
            if sparse:
                cells += [d["experts"], None if d["k"] is None else f"{d['k']:.2f}"]
            cells += [si(d[f"flops_{s}"]) for s in self.stages]
            if sparse:
                cells.append(None if d["ratio"] is None else f"{d['ratio']:.3f}")
            rows.append(cells)
        head = "forward FLOPs (2 per multiply-add, matrix products only)"
        if self.config:
            head += f"; {self.config}"
        lines = [head, render(headers, rows, left=2, rule_before_last=True)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
