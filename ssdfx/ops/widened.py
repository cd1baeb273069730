"""bfloat16/float16 through the numba kernels in float32: for CPUs where torch has no native
GEMM in that dtype.

torch multiplies bf16 matrices on CPU with oneDNN only where the CPU has AVX-512 (BW, VL, DQ)
or ARM's bf16 extension, and fp16 ones only with AVX-512-FP16 or AMX-FP16 (what
`torch.ops.mkldnn._is_mkldnn_bf16_supported` / `_is_mkldnn_fp16_supported` report); without,
it falls back to a generic loop. On an AMD EPYC with AVX2 only (Zen 3, 2 vCPUs, torch 2.13.0)
that loop ran a bf16 (2048, 768) @ (768, 3072) in 9.9 s (1.0 GFLOP/s) and (512, 768) @ (768,
192) at 2.4 GFLOP/s, fp16 alike, against 117-144 GFLOP/s in float32: the torch path's one mm
per expert would be as slow. So there (`dispatch.native_gemm`) the "auto" backend, and
"numba" wherever it is asked for bf16/fp16, widen the inputs to float32, run the float32
kernels (`cpu_numba`) and round what they return to the inputs' dtype: y, the saved
pre-activations (so the saved layout keeps the op's declared dtypes) and every gradient.

Numerics: the products accumulate in float32 as torch's bf16 GEMMs do, but the hidden units
stay float32 between the two projections instead of being rounded to bf16, so y is at least
as close to the float32 result as the torch path's. The backward recomputes the activation
from the bf16-rounded pre-activations it saved, as the torch path does.

Widening costs a float32 copy of x and of the weights at every call (for d=768, d_ff=3072,
two weights: 19 MB written), and rounding the outputs a pass over each: at T=2048, d=768 the
casts took ~6-8 ms of a 60-64 ms forward+backward (E=8, k=1; 1.10x the float32 op's time in
one process). Copying the large inputs into per-thread buffers kept between calls instead of
fresh ones (whose pages a lone repeated cast faulted in every time: 2.3-2.5 ms against 0.18
ms per 768 x 3072 weight) saved 4-8% at E=8, k=1 and nothing at E=16, k=4 (alternated in one
process, a dense forward+backward between calls), not worth keeping float32 copies of the
weights alive.
"""

from __future__ import annotations

import torch

from ssdfx.ops import cpu_numba

__all__ = ["backward", "forward", "infer"]


def _wide(t: torch.Tensor | None) -> torch.Tensor | None:
    """t in float32 (strides kept, so a transposed weight view stays one); None stays None."""
    return t.float() if t is not None else None


def forward(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts, activation, dropout_p):
    y, a1, a3, order, offsets = cpu_numba.forward(
        _wide(x), _wide(w1), _wide(b1), _wide(w2), _wide(w3), _wide(b3), expert_idx,
        _wide(gate), keep, num_experts, activation, dropout_p)
    return y.to(x.dtype), a1.to(x.dtype), a3.to(x.dtype), order, offsets


def infer(x, w1, b1, w2, w3, b3, expert_idx, gate, num_experts, activation):
    return cpu_numba.infer(_wide(x), _wide(w1), _wide(b1), _wide(w2), _wide(w3), _wide(b3),
                           expert_idx, _wide(gate), num_experts, activation).to(x.dtype)


def backward(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets, num_experts, activation,
             dropout_p):
    grads = cpu_numba.backward(_wide(dy), _wide(x), _wide(w1), _wide(w2), _wide(w3), _wide(gate),
                               keep, _wide(a1), _wide(a3), order, offsets, num_experts,
                               activation, dropout_p)
    return tuple(g.to(x.dtype) for g in grads)
