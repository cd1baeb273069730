"""One fused CUDA kernel for the combine step, written in Triton (torch's GPU kernel language).

After the grouped GEMMs, each pair's output row sits in expert order; every token needs the
sum of its K rows. In torch ops that is a gather (index_select: read P*d, write P*d) and a sum
over K (read P*d again): at T=16384, d=4096, K=4 in bf16 about 0.43 ms on an H200, a fifth of
the whole sparse forward. This kernel reads each row once and writes each token once, summing
in fp32. numba-cuda was the other candidate, but torch does not export bfloat16 tensors through
`__cuda_array_interface__`, and Triton ships with torch's CUDA wheels.

Imported only on CUDA tensors; `available()` is False without Triton, and callers then fall back
to the torch ops (`torch_path._combine`).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["available", "gather_sum"]


@functools.cache
def _kernel():
    # compiled lazily: importing this module never needs Triton
    import triton
    import triton.language as tl

    @triton.jit
    def gather_sum_kernel(rows_ptr, inv_ptr, n_rows_ptr, gate_ptr, out_ptr, d,
                          k: tl.constexpr, has_gate: tl.constexpr, block_d: tl.constexpr):
        # rows (R, d) in layout order, of which the first n_rows = *n_rows_ptr are real;
        # inv (T*K,) layout row of each (token, slot), >= n_rows for an unused slot;
        # out (T, d) = sum over the token's K rows, accumulated in fp32. n_rows is read from
        # device memory so the caller never waits for the GPU to learn it.
        t = tl.program_id(0)
        n_rows = tl.load(n_rows_ptr)
        cols = tl.program_id(1) * block_d + tl.arange(0, block_d)
        in_row = cols < d
        acc = tl.zeros([block_d], dtype=tl.float32)
        for j in tl.static_range(k):
            r = tl.load(inv_ptr + t * k + j).to(tl.int64)
            v = tl.load(rows_ptr + r * d + cols, mask=in_row & (r < n_rows), other=0.0)
            v = v.to(tl.float32)
            if has_gate:  # gate (T*K,): y = sum_j gate[t, j] * row
                v = v * tl.load(gate_ptr + t * k + j).to(tl.float32)
            acc += v
        tl.store(out_ptr + t.to(tl.int64) * d + cols, acc.to(out_ptr.dtype.element_ty),
                 mask=in_row)

    return gather_sum_kernel


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
    _kernel()[grid](rows, inv, n_rows, gate, out, d, k=k, has_gate=has_gate, block_d=block_d)
    return out
