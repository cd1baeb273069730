"""One fused CUDA kernel for the combine step, written in Triton (torch's GPU kernel language).

After the grouped GEMMs, each pair's output row sits in expert order; every token needs the
sum of its K rows. In torch ops that is a gather (index_select: read P*d, write P*d) and a sum
over K (read P*d again): at T=16384, d=4096, K=4 in bf16 about 0.43 ms on an H200, a fifth of
the whole sparse forward. This kernel reads each row once and writes each token once, summing
in fp32. numba-cuda was the other candidate, but torch does not export bfloat16 tensors through
`__cuda_array_interface__`, and Triton ships with torch's CUDA wheels.

Imported only on CUDA tensors; `available()` is False without Triton, and callers then fall back
to the torch ops (`torch_path._combine`). The kernels themselves live in `ssdfx.ops._triton`
(this one and `gathered`'s), loaded by `kernels()`: compiled for the GPU, or, with
TRITON_INTERPRET=1, run by Triton's interpreter on CPU tensors, which is how the tests check
them on machines without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["LAUNCH", "available", "gather_sum", "interpreting", "kernels"]

# options of every launch: multiply-adds contracted to FMAs, stated (Triton 3.9 warns when it
# is left to its default, which Triton 3.10 turns off)
LAUNCH = dict(enable_fp_fusion=True)


@functools.cache
def _kernels(interpret: bool):
    # `triton.jit` decides at decoration time whether it builds an interpreted kernel, so the
    # kernels module is executed afresh once per mode; it imports Triton at its top, and this
    # module never needs Triton until a kernel runs
    import importlib.util

    spec = importlib.util.find_spec("ssdfx.ops._triton")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernels():
    """The Triton kernels module (`ssdfx.ops._triton`), built for the current mode: compiled
    for the GPU, or run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, `tests`)."""
    return _kernels(interpreting())


def interpreting() -> bool:
    """Whether triton.jit builds interpreted kernels now (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs
    except ImportError:  # Triton before 3.4 read the variable directly
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return bool(knobs.runtime.interpret)


def available() -> bool:
    """Whether Triton is importable here (the torch-op combine is used otherwise)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def gather_sum(rows: torch.Tensor, inv: torch.Tensor, t_all: int, k: int,
               n_rows: torch.Tensor | None = None,
               gate: torch.Tensor | None = None) -> torch.Tensor:
    """out (T, d)[t] = sum_j gate[t, j] * rows[inv[t*K + j]], skipping rows >= n_rows.

    rows (R, d) and inv (T*K,) on CUDA; n_rows a 1-element int64 CUDA tensor (default R);
    gate (T, K) or None (all ones).
    """
    rows = rows.contiguous()
    if n_rows is None:
        n_rows = torch.full((1,), rows.shape[0], dtype=torch.int64, device=rows.device)
    d = rows.shape[1]
    out = rows.new_empty(t_all, d)
    if t_all == 0 or d == 0:
        return out
    block_d = min(1024, max(16, 1 << (d - 1).bit_length()))
    grid = (t_all, (d + block_d - 1) // block_d)
    has_gate = gate is not None
    gate = gate.contiguous() if has_gate else inv  # any pointer when unused
    kernels().gather_sum_kernel[grid](rows, inv, n_rows, gate, out, d, k=k, has_gate=has_gate,
                                      block_d=block_d, **LAUNCH)
    return out
