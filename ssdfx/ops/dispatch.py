"""Which kernel runs: a pure function of (device type, dtype, backend string, shapes).

Backends (explicit strings; there is no global switch):

    "auto"        CPU float32/float64 -> "numba"; CPU bfloat16/float16 -> "torch" where torch
                  has a native GEMM in that dtype (`native_gemm`), except bfloat16 where MKL's
                  bf16 GEMM is native (`blas.BF16`: AMX, or AVX-512-BF16 with MKL's Intel code
                  paths), which runs numba's bf16 kernels, inference and training (with AMX
                  up to a size, `cpu_numba.forward_bf16_or_torch`);
                  "numba" (widened) where it has none;
                  CUDA -> "grouped_mm" where torch._grouped_mm takes the shapes, else "torch";
                  any other device -> "reference"
    "reference"   the pure-torch oracle (`ssdfx.ops.reference`), any device and dtype
    "torch"       sort-by-expert with one torch.mm per expert (`ssdfx.ops.torch_path`; small
                  CPU problems: one torch.bmm over padded expert blocks, `ssdfx.ops.padded`)
    "grouped_mm"  one torch._grouped_mm per projection and no host sync (`ssdfx.ops.grouped`;
                  CUDA bf16 on sm90+, and CPU in recent torch)
    "numba"       numba CPU kernels with BLAS per expert (`ssdfx.ops.cpu_numba`), fp32/fp64;
                  bfloat16/float16 computed in float32 (`ssdfx.ops.widened`)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["BACKENDS", "Kernels", "native_gemm", "plain_eager", "select", "widens"]

BACKENDS = ("auto", "reference", "torch", "grouped_mm", "numba")
_WIDENED = (torch.bfloat16, torch.float16)  # what "numba" computes in float32 (ssdfx.ops.widened)


@dataclass(frozen=True)
class Kernels:
    """A backend's forward and backward kernel functions (see `ssdfx.ops.reference`), and
    optionally `infer`: forward's y alone without dropout, for calls with nothing to
    differentiate (x, w1, b1, w2, w3, b3, expert_idx, gate, num_experts, activation)."""

    name: str
    forward: Callable
    backward: Callable
    infer: Callable | None = None


@functools.cache
def _make(name: str) -> Kernels:
    if name == "reference":
        from ssdfx.ops import reference as mod

        return Kernels(name, mod.forward, mod.backward)
    if name == "numba":
        from ssdfx.ops import cpu_numba as mod

        return Kernels(name, mod.forward, mod.backward, mod.infer)
    if name == "numba_widened":  # "numba" for bfloat16/float16: float32 kernels
        from ssdfx.ops import widened as mod

        return Kernels("numba", mod.forward, mod.backward, mod.infer)
    if name == "numba_bf16":  # "auto" for bf16 where MKL multiplies bf16 natively
        from ssdfx.ops import cpu_numba as mod

        return Kernels("numba", mod.forward_bf16_or_torch, mod.backward_bf16_or_torch,
                       mod.infer_bf16_or_torch)
    if name == "grouped_mm":
        from ssdfx.ops import grouped as mod

        return Kernels(name, mod.forward, mod.backward)
    from ssdfx.ops import torch_path as mod

    return Kernels(name, mod.forward, mod.backward)


def select(backend: str, x: torch.Tensor, w1: torch.Tensor, num_experts: int) -> Kernels:
    """The kernels for this call; ValueError when the backend cannot run these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    dev = x.device.type
    if backend == "auto":
        if dev == "cpu":
            if widens(x):
                backend = "numba"
            elif x.dtype == torch.bfloat16 and _numba_bf16():
                return _make("numba_bf16")
            else:
                backend = "numba" if x.dtype in (torch.float32, torch.float64) else "torch"
        elif dev == "cuda":
            backend = "grouped_mm" if _grouped_mm_ok(x, w1, num_experts) else "torch"
        else:
            backend = "reference"
    if backend == "numba" and (dev != "cpu" or x.dtype not in (torch.float32, torch.float64,
                                                               *_WIDENED)):
        raise ValueError(
            f"backend 'numba' runs float32/float64 (and bfloat16/float16 widened to float32) on "
            f"CPU; got {x.dtype} on {dev} (use 'auto', 'torch' or 'reference')"
        )
    if backend == "numba" and x.dtype in _WIDENED:
        return _make("numba_widened")
    if backend == "grouped_mm" and not _grouped_mm_ok(x, w1, num_experts):
        raise ValueError(
            "backend 'grouped_mm' needs torch._grouped_mm, bfloat16 on CUDA sm90+ (or CPU), and "
            "d, F and F/num_experts multiples of 16 bytes; use 'torch' instead"
        )
    return _make(backend)


def _grouped_mm_ok(x, w1, num_experts) -> bool:
    from ssdfx.ops.grouped import grouped_mm_ok  # imports Triton's launchers where installed

    return grouped_mm_ok(x, w1, num_experts)


_NATIVE: dict[torch.dtype, bool] = {}  # native_gemm's answers, asked once per dtype


@torch.compiler.assume_constant_result  # torch.compile: a constant of the trace, no guard
def native_gemm(dtype: torch.dtype) -> bool:
    """Whether torch multiplies CPU matrices of this dtype natively: bf16 with oneDNN (AVX-512
    or AMX), fp16 with AVX-512-FP16 or AMX-FP16, float32/float64 always; otherwise its generic
    loop runs them, at 1-3 GFLOP/s on an AVX2-only CPU (`ssdfx.ops.widened`)."""
    if dtype not in _NATIVE:
        _NATIVE[dtype] = _query_native(dtype)
    return _NATIVE[dtype]


def _query_native(dtype: torch.dtype) -> bool:
    query = {torch.bfloat16: "_is_mkldnn_bf16_supported",
             torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    if query is None:  # not a dtype torch multiplies through oneDNN's reduced precision
        return True
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(getattr(torch.ops.mkldnn, query)())
    except (AttributeError, RuntimeError):  # a torch without the query: assume native
        return True


def widens(t: torch.Tensor) -> bool:
    """Whether ssdfx runs the GEMMs of this tensor in float32 (`ssdfx.ops.widened`, and the
    routers): a CPU bfloat16/float16 tensor whose dtype torch cannot multiply natively."""
    return t.device.type == "cpu" and t.dtype in _WIDENED and not native_gemm(t.dtype)


@functools.cache
def _numba_bf16() -> bool:
    from ssdfx.ops.blas import BF16  # loads numba: only once a bf16 CPU call runs

    return BF16


def plain_eager(*tensors: torch.Tensor | None) -> bool:
    """Whether these tensors are plain eager tensors that a kernel may read directly.

    False under torch.compile, torch.jit tracing, any torch_dispatch mode (FlopCounterMode,
    FakeTensorMode, ...) or torch_function mode, and for tensor subclasses (FakeTensor,
    FunctionalTensor, ...; nn.Parameter is fine) and functorch-wrapped tensors (vmap, grad):
    those must see the custom op, so callers take the op path for them. About 0.4 us.
    """
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the checks below
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch.jit.is_tracing()):
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for t in tensors:  # a loop: `all` over a generator cost ~0.5 us more for eight tensors
        if t is not None and (type(t) not in _PLAIN or wrapped(t)):
            return False
    return True


# nn.Parameter is a subclass that only disables __torch_function__
_PLAIN = (torch.Tensor, torch.nn.Parameter)
