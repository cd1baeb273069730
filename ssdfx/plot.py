"""Plots of a training run from its log.jsonl: `ssdfx plot RUN_DIR`."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_log", "sparse_spans", "plot_run"]


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} an ssdfx training run directory?")
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):  # the last line of a run still writing (or killed mid-write)
                break
            raise ValueError(f"{path}, line {i} is not JSON ({e.msg}); the log is damaged") from None
    return records


# the fields the plots read, per record kind (other kinds, and other fields, are not plotted)
_FIELDS = {"step": ("step", "time", "loss"), "eval": ("step", "time", "val_loss"),
           "switch": ("step", "time", "to"), "stability": ("step", "sparsity", "coverage", "mean_delta")}


def _check_plottable(run_dir: str | Path, log: list[dict]) -> None:
    """ValueError, before anything is written, for a log with no steps or a record that lacks
    a field the plots read."""
    path = Path(run_dir) / "log.jsonl"
    for i, r in enumerate(log, 1):
        kind = r.get("kind") if isinstance(r, dict) else None
        missing = [f for f in _FIELDS.get(kind, ()) if f not in r]
        if kind is None or missing:
            what = f"lacks {', '.join(missing)}" if missing else "has no kind"
            raise ValueError(f"{path}: record {i} ({kind or 'no kind'}) {what}; the log is damaged "
                             "or not an ssdfx training log")
    if not any(r["kind"] == "step" for r in log):
        raise ValueError(f"{path} holds no training steps yet ({len(log)} records): nothing to "
                         "plot; run `ssdfx plot` once the run has logged some")


def sparse_spans(log: list[dict], key: str = "step") -> list[tuple[float, float]]:
    """(start, end) of every sparse phase, in steps or in wall time."""
    spans, start = [], None
    last = max((r.get(key, 0) for r in log if r["kind"] in ("step", "eval")), default=0)
    for r in log:
        if r["kind"] != "switch":
            continue
        if r["to"] == "sparse":
            start = r[key] if key in r else r["step"]
        elif start is not None:
            spans.append((start, r[key]))
            start = None
    if start is not None:
        spans.append((start, last))
    return spans


def _smooth(ys: list[float], n: int = 20) -> list[float]:
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > n:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss (vs step and vs time, sparse phases shaded), sparsity and coverage plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = read_log(run_dir)
    _check_plottable(run_dir, log)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    steps = [r for r in log if r["kind"] == "step"]
    evals = [r for r in log if r["kind"] == "eval"]
    checks = [r for r in log if r["kind"] == "stability"]
    written = []
    for key, label, fname in (("step", "step", "loss_vs_step.png"), ("time", "wall time (s)", "loss_vs_time.png")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (a, b) in enumerate(sparse_spans(log, key)):
            ax.axvspan(a, b, color="tab:orange", alpha=0.15, label="sparse phase" if i == 0 else None)
        ax.plot([r[key] for r in steps], _smooth([r["loss"] for r in steps]), lw=1, label="train loss (smoothed)")
        if evals:
            ax.plot([r[key] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label="validation loss")
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(out / fname)
    if checks:
        for field, ylabel, fname in (("sparsity", "activation sparsity", "sparsity.png"),
                                     ("coverage", "coverage of top-k experts (fresh split)", "coverage.png")):
            fig, ax = plt.subplots(figsize=(7, 4))
            n_layers = len(checks[0][field])
            for layer in range(n_layers):
                ax.plot([c["step"] for c in checks], [c[field][layer] for c in checks], "o-", ms=2, label=f"layer {layer}")
            for i, (a, b) in enumerate(sparse_spans(log, "step")):
                ax.axvspan(a, b, color="tab:orange", alpha=0.15)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7, ncol=2)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out / fname, dpi=120)
            plt.close(fig)
            written.append(out / fname)
        deltas = [(c["step"], c["mean_delta"]) for c in checks if c["mean_delta"] is not None]
        if deltas:
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.plot([d[0] for d in deltas], [d[1] for d in deltas], "o-", ms=3)
            ax.axhline(json.loads((Path(run_dir) / "config.json").read_text()).get("stability_tol", 0.03)
                       if (Path(run_dir) / "config.json").exists() else 0.03, color="k", ls="--", lw=1,
                       label="stability_tol")
            ax.set_xlabel("step")
            ax.set_ylabel("coverage(fresh split) - coverage(previous split)")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out / "stability.png", dpi=120)
            plt.close(fig)
            written.append(out / "stability.png")
    return written
