"""Plain-text and CSV rendering of the small tables ssdfx prints (FLOPs, sites, node counts).

    >>> print(render(["op", "count"], [["addmm", 2], ["mul", 10]]))
    op     count
    addmm      2
    mul       10
"""

from __future__ import annotations

import csv
import io
from typing import Iterable, Mapping, Sequence

__all__ = ["render", "to_csv", "si", "name_list"]

_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


def name_list(names: Iterable[str], most: int = 6) -> str:
    """Names for a message, sorted, the first `most` of them and how many more:
    name_list(["b", "a"]) == "a, b"."""
    names = sorted(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def si(value: float | int | None, digits: int = 3) -> str:
    """A count with an SI prefix: si(830400) == '830K', si(1.5e9) == '1.50G'."""
    if value is None:
        return "-"
    for scale, prefix in _PREFIXES:
        if abs(value) >= scale:
            v = value / scale
            return f"{v:.{max(digits - len(str(int(abs(v)))), 0)}f}{prefix}"
    return str(int(value)) if float(value).is_integer() else f"{value:.{digits}g}"


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def render(headers: Sequence[str], rows: Iterable[Sequence[object]], *,
           left: int = 1, rule_before_last: bool = False) -> str:
    """Columns padded to their widest cell; the first `left` columns are left-aligned, the rest
    right-aligned (numbers). `rule_before_last` draws a line above the last row (a total)."""
    body = [[_cell(v) for v in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in body:
        if len(r) != len(headers):
            raise ValueError(f"row {r} has {len(r)} cells for {len(headers)} headers")
        widths = [max(w, len(c)) for w, c in zip(widths, r)]

    def line(cells: Sequence[str]) -> str:
        out = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    lines = [line(headers)]
    for i, r in enumerate(body):
        if rule_before_last and i == len(body) - 1 and i > 0:
            lines.append("-" * len(line(headers)))
        lines.append(line(r))
    return "\n".join(lines)


def to_csv(rows: Sequence[Mapping[str, object]]) -> str:
    """CSV text (header line, then one line per dict), keys of the first row as columns."""
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()
