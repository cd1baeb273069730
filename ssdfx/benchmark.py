"""Forward time and FLOPs of a model, dense and converted: what `ssdfx bench` and
bench/flops_per_pass.py report.

Dense and converted forwards (eval mode, no_grad) run in interleaved rounds, alternating their
order, and every figure is a median, so ratios are measured under the same machine load:
`time_ratio` is the median over rounds of converted/dense time within the round. With
`backward=True` each timed call is a forward and a backward of a scalar loss instead (the
model's own `.loss` when the inputs include labels, else the mean square of its output), still
in eval mode so that dropout does not differ between the models.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["PassTiming", "time_passes"]


@dataclass(frozen=True)
class PassTiming:
    """One row: the dense model (E = k = None) or one conversion of it."""

    E: int | None
    k: int | None
    dense_flops: int
    flops: int
    ffn_ratio: float  # FFN FLOPs after the pass / dense FFN FLOPs
    ms: float  # median time of a forward (or forward + backward)
    time_ratio: float  # median over rounds of this forward / the dense forward

    @property
    def ratio(self) -> float:
        return self.flops / self.dense_flops

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def _loss(out) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is not None:
        return loss
    if not isinstance(out, torch.Tensor):  # an HF output without labels: its first tensor
        out = next(v for v in (out.values() if hasattr(out, "values") else out)
                   if isinstance(v, torch.Tensor) and v.is_floating_point())
    return out.float().square().mean()


def _timed(model: nn.Module, args: tuple, kwargs: dict, backward: bool) -> float:
    t0 = time.perf_counter()
    if backward:
        model.zero_grad(set_to_none=True)
        _loss(model(*args, **kwargs)).backward()
    else:
        with torch.no_grad():
            model(*args, **kwargs)
    return time.perf_counter() - t0


def _ffn(table) -> tuple[int, int]:
    return sum(r.flops[0] for r in table.sites), sum(r.flops[-1] for r in table.sites)


def time_passes(dense: nn.Module, args: tuple, kwargs: dict, passes, *, repeats: int = 7,
                warmup: int = 2, partition: str = "contiguous",
                backward: bool = False) -> list[PassTiming]:
    """Time `dense` and one converted copy per (E, k) in `passes` (dense's weights are not
    changed; with backward=True its .grad fields are). `ms` is a forward, or a forward and a
    backward with backward=True. Returns the dense row first, then one row per pass, in order.
    """
    import ssdfx

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dense_table = ssdfx.flops(dense, *args, **kwargs)
    models = [("dense", dense, dense_table)]
    for e, k in passes:
        m = ssdfx.convert(copy.deepcopy(dense), num_experts=e, top_k=k, partition=partition,
                          example_inputs=args or None, example_kwargs=kwargs or None)
        models.append(((e, k), m, ssdfx.flops(m, *args, **kwargs)))
    times: dict = {key: [] for key, _, _ in models}
    for _ in range(warmup):  # numba compiles once, allocators and thread pools settle
        for _, m, _ in models:
            _timed(m, args, kwargs, backward)
    for r in range(repeats):
        for key, m, _ in (models if r % 2 == 0 else models[::-1]):
            times[key].append(_timed(m, args, kwargs, backward))
    if backward:
        for _, m, _ in models:
            m.zero_grad(set_to_none=True)
    rows = []
    for key, _, table in models:
        per_round = [t / td for t, td in zip(times[key], times["dense"])]
        ffn_dense, ffn_now = _ffn(table)
        e, k = (None, None) if key == "dense" else key
        rows.append(PassTiming(
            E=e, k=k, dense_flops=dense_table.total, flops=table.total,
            ffn_ratio=ffn_now / ffn_dense if ffn_dense else 1.0,
            ms=statistics.median(times[key]) * 1e3, time_ratio=statistics.median(per_round)))
    return rows
