"""Single-precision and double-precision GEMM callable from numba nopython code.

numba's `np.dot` only takes contiguous arrays, and the weights the sparse operator sees are often
strided views (HF GPT-2's Conv1D passes `c_fc.weight.t()`, and each expert is a slice of rows or
columns of it). BLAS itself handles any matrix with one unit stride through its leading
dimension, so we call Fortran `?gemm` directly: no copy of a weight, ever.

Which BLAS (`LIBRARY`): on Intel CPUs the MKL that torch links into libtorch_cpu (it exports
`sgemm_`), elsewhere SciPy's OpenBLAS (`scipy.linalg.cython_blas`). Measured on the two
machines this project ran on, inside the op's two-worker kernels: on an AMD Zen 4, MKL takes its
AVX2 path and was 8-12% slower than OpenBLAS at 128-512 x 768 x 192 (equal or ~11 us faster per
projection only at 16-32-row experts); on an AVX-512 Intel Xeon, MKL ran the 16 experts' GEMMs of
T=2048, d=768, E=16, k=4 in 21.6-22.2 ms against 23.1-23.5 for OpenBLAS, and `bench/op.py`
(two processes per library, no steal) measured the op at T=2048, d=256, E=32, k=16 at
0.85-0.90x of dense forward with OpenBLAS against 1.07-1.17x with MKL, T=512, d=768, E=8, k=1
3.49-3.58x against 3.97-4.79x, T=2048, d=768, E=16, k=4 equal (2.71-2.74x, 2.74-2.82x).
`SSDFX_BLAS=mkl|openblas` overrides the choice (read once, when the kernels are first loaded).

Threads: each worker runs its own GEMMs single-threaded. OpenBLAS's count is process-wide and
set around each numba phase (`cpu_numba._numba_phase`); MKL's is set per call here, thread-locally
(`MKL_Set_Num_Threads_Local(1)`, restored after), because a numba worker is not one of torch's
OpenMP threads and MKL would otherwise start a team of torch's thread count inside each worker.
With OpenBLAS that call is a no-op.

The function addresses are registered with LLVM under our own symbol names, so functions that
call them can be cached on disk (`cache=True`): a cached object file refers to the symbol name,
which this module registers again in every process before any kernel is loaded. (numba's cache
is keyed by the kernel's own source file: after editing this module, delete the `*.nbi`/`*.nbc`
files under `ssdfx/ops/__pycache__`.)
"""

from __future__ import annotations

import ctypes
import glob
import os

import llvmlite.binding as llvm
import numpy as np
from numba import cfunc, njit, types
from numba.extending import get_cython_function_address

__all__ = ["LIBRARY", "gemm"]

CHOICES = ("auto", "mkl", "openblas")


def _mkl_addresses() -> dict[str, int] | None:
    """Addresses of sgemm_, dgemm_ and MKL_Set_Num_Threads_Local in torch's own library, or None
    where this torch build has no MKL (aarch64, macOS)."""
    import torch

    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(glob.glob(os.path.join(lib_dir, "libtorch_cpu.*"))):
        try:
            lib = ctypes.CDLL(path)
            return {name: ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
                    for name, symbol in (("sgemm", "sgemm_"), ("dgemm", "dgemm_"),
                                         ("local", "MKL_Set_Num_Threads_Local"))}
        except (OSError, AttributeError):
            continue
    return None


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _choose(choice: str, mkl_available: bool, vendor: str) -> str:
    """The BLAS the kernels call, for SSDFX_BLAS=`choice`."""
    choice = choice.strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"SSDFX_BLAS={choice!r} is not one of {', '.join(CHOICES)}; "
                         "unset it to let ssdfx choose")
    if choice == "mkl" and not mkl_available:
        raise RuntimeError("SSDFX_BLAS=mkl, but this torch build exports no MKL sgemm_ "
                           "(libtorch_cpu); use SSDFX_BLAS=openblas or unset it")
    if choice == "auto":
        return "mkl" if mkl_available and vendor == "GenuineIntel" else "openblas"
    return choice


@cfunc(types.int32(types.int32), cache=True)
def _no_local_threads(n):  # OpenBLAS: its count is set per phase, process-wide
    return 0


_mkl = _mkl_addresses()
LIBRARY = _choose(os.environ.get("SSDFX_BLAS", "auto"), _mkl is not None, _cpu_vendor())
for _name in ("sgemm", "dgemm"):
    llvm.add_symbol("ssdfx_" + _name, _mkl[_name] if LIBRARY == "mkl" else
                    get_cython_function_address("scipy.linalg.cython_blas", _name))
llvm.add_symbol("ssdfx_blas_local_threads",
                _mkl["local"] if LIBRARY == "mkl" else _no_local_threads.address)

_vp = types.voidptr
# Fortran BLAS: every argument by reference (transa, transb, m, n, k, alpha, a, lda, b, ldb,
# beta, c, ldc).
_GEMM_SIG = types.void(_vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp)
_sgemm = types.ExternalFunction("ssdfx_sgemm", _GEMM_SIG)
_dgemm = types.ExternalFunction("ssdfx_dgemm", _GEMM_SIG)
# int MKL_Set_Num_Threads_Local(int): the calling thread's count, returns the previous one
_local_threads = types.ExternalFunction("ssdfx_blas_local_threads", types.int32(types.int32))


@njit(cache=True, nogil=True)
def _layout(a):
    """How BLAS can read a 2-D array: (1, ld) row-major, (0, ld) column-major, (-1, 0) neither.

    Size-1 dimensions have meaningless strides, so they never decide the layout.
    """
    r, c = a.shape
    isz = a.itemsize
    if c == 1 or a.strides[1] == isz:
        ld = a.strides[0] // isz if r > 1 else c
        if ld >= max(c, 1):
            return 1, max(ld, 1)
    if r == 1 or a.strides[0] == isz:
        ld = a.strides[1] // isz if c > 1 else r
        if ld >= max(r, 1):
            return 0, max(ld, 1)
    return -1, 0


@njit(cache=True, nogil=True)
def gemm(a, b, c, beta):
    """c = a @ b + beta * c for 2-D float32/float64 arrays with any unit-stride layouts.

    a (M, K), b (K, N), c (M, N). Runs BLAS single-threaded in the calling thread (MKL: set
    here; OpenBLAS: the caller's numba phase sets it).
    """
    m_, k_ = a.shape
    n_ = b.shape[1]
    if m_ == 0 or n_ == 0:
        return
    if k_ == 0:
        if beta == 0.0:
            c[:, :] = 0.0
        else:
            c[:, :] *= beta
        return
    ra, lda = _layout(a)
    if ra < 0:
        a = np.ascontiguousarray(a)
        ra, lda = _layout(a)
    rb, ldb = _layout(b)
    if rb < 0:
        b = np.ascontiguousarray(b)
        rb, ldb = _layout(b)
    rc, ldc = _layout(c)
    if rc < 0:
        raise ValueError("gemm: output must have a unit stride")
    ch = np.empty(2, np.uint8)
    ints = np.empty(6, np.int32)
    sc = np.empty(2, a.dtype)
    sc[0] = 1.0
    sc[1] = beta
    if rc == 1:
        # row-major C is column-major C^T = B^T A^T: operand 1 is b, operand 2 is a
        x1, x2 = b, a
        ch[0] = ord("N") if rb == 1 else ord("T")
        ch[1] = ord("N") if ra == 1 else ord("T")
        ints[0] = n_
        ints[1] = m_
        ints[3] = ldb
        ints[4] = lda
    else:
        x1, x2 = a, b
        ch[0] = ord("N") if ra == 0 else ord("T")
        ch[1] = ord("N") if rb == 0 else ord("T")
        ints[0] = m_
        ints[1] = n_
        ints[3] = lda
        ints[4] = ldb
    ints[2] = k_
    ints[5] = ldc
    before = _local_threads(1)
    if a.itemsize == 4:
        _sgemm(ch[0:].ctypes, ch[1:].ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes,
               sc[0:].ctypes, x1.ctypes, ints[3:].ctypes, x2.ctypes, ints[4:].ctypes,
               sc[1:].ctypes, c.ctypes, ints[5:].ctypes)
    else:
        _dgemm(ch[0:].ctypes, ch[1:].ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes,
               sc[0:].ctypes, x1.ctypes, ints[3:].ctypes, x2.ctypes, ints[4:].ctypes,
               sc[1:].ctypes, c.ctypes, ints[5:].ctypes)
    _local_threads(before)
