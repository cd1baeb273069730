"""Single-precision and double-precision GEMM callable from numba nopython code.

numba's `np.dot` only takes contiguous arrays, and the weights the sparse operator sees are often
strided views (HF GPT-2's Conv1D passes `c_fc.weight.t()`, and each expert is a slice of rows or
columns of it). BLAS itself handles any matrix with one unit stride through its leading
dimension, so we call `?gemm` from SciPy's `cython_blas` directly: no copy of a weight, ever.

The BLAS function addresses are registered with LLVM under our own symbol names, so functions
that call them can be cached on disk (`cache=True`): a cached object file refers to the symbol
name, which this module registers again in every process before any kernel is loaded.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from numba import njit, types
from numba.extending import get_cython_function_address

__all__ = ["gemm"]

for _name in ("sgemm", "dgemm"):
    llvm.add_symbol(
        "ssdfx_" + _name, get_cython_function_address("scipy.linalg.cython_blas", _name)
    )

_vp = types.voidptr
# Fortran BLAS: every argument by reference (transa, transb, m, n, k, alpha, a, lda, b, ldb,
# beta, c, ldc).
_GEMM_SIG = types.void(_vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp)
_sgemm = types.ExternalFunction("ssdfx_sgemm", _GEMM_SIG)
_dgemm = types.ExternalFunction("ssdfx_dgemm", _GEMM_SIG)


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

    a (M, K), b (K, N), c (M, N). Runs BLAS in the calling thread's context; the caller makes
    sure BLAS itself is single-threaded when this runs inside a parallel region.
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
    if a.itemsize == 4:
        _sgemm(ch[0:].ctypes, ch[1:].ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes,
               sc[0:].ctypes, x1.ctypes, ints[3:].ctypes, x2.ctypes, ints[4:].ctypes,
               sc[1:].ctypes, c.ctypes, ints[5:].ctypes)
    else:
        _dgemm(ch[0:].ctypes, ch[1:].ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes,
               sc[0:].ctypes, x1.ctypes, ints[3:].ctypes, x2.ctypes, ints[4:].ctypes,
               sc[1:].ctypes, c.ctypes, ints[5:].ctypes)
