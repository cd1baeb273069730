"""Single-precision and double-precision GEMM callable from numba nopython code.

numba's `np.dot` only takes contiguous arrays, and the weights the sparse operator sees are often
strided views (HF GPT-2's Conv1D passes `c_fc.weight.t()`, and each expert is a slice of rows or
columns of it). BLAS itself handles any matrix with one unit stride through its leading
dimension, so we call Fortran `?gemm` directly: no copy of a weight, ever.

Which BLAS (`LIBRARY`): the MKL that torch links into libtorch_cpu (it exports `sgemm_`) where
MKL runs its Intel code paths (`MKL_INTEL_PATH`), elsewhere SciPy's OpenBLAS
(`scipy.linalg.cython_blas`). MKL picks its code by asking whether the CPU is an Intel one
(`mkl_serv_intel_cpu_true`); on AMD CPUs it answers no and MKL runs its AVX2 code whatever the
CPU has (sgemm 84-88 GFLOP/s on one core of an AMD Zen 5, against 183-208 once MKL was told
the CPU is an Intel one; OpenBLAS 0.3.30, which does not know that CPU family and takes its
Haswell kernels, 94-106). A library preloaded into the process that defines the function and
answers yes (`bench/mkl_intel_path.c`, `LD_PRELOAD`, see bench/README.md) makes MKL take its
AVX-512 paths there, for torch's own GEMMs as well; `MKL_INTEL_PATH` asks the function as MKL's
own calls resolve it, so it sees such a library. Measured inside the op's two-worker kernels:
on an AMD Zen 4 without the preload, MKL's AVX2 path was 8-12% slower than OpenBLAS at 128-512
x 768 x 192 (equal or ~11 us faster per projection only at 16-32-row experts); on an AVX-512
Intel Xeon, MKL ran the 16 experts' GEMMs of T=2048, d=768, E=16, k=4 in 21.6-22.2 ms against
23.1-23.5 for OpenBLAS, and `bench/op.py` (two processes per library, no steal) measured the
op at T=2048, d=256, E=32, k=16 at 0.85-0.90x of dense forward with OpenBLAS against
1.07-1.17x with MKL, T=512, d=768, E=8, k=1 3.49-3.58x against 3.97-4.79x, T=2048, d=768,
E=16, k=4 equal (2.71-2.74x, 2.74-2.82x); on the Zen 5 with the preload, the op's inference at
T=2048, d=768, E=16, k=4 took 20.0 ms with MKL against 32.4 with OpenBLAS (medians of 12, one
process each). `SSDFX_BLAS=mkl|openblas` overrides the choice (read once, when the kernels are
first loaded). Where "auto" takes OpenBLAS and torch has MKL, float32 GEMMs with at most
SMALL_GEMM_ROWS output rows call MKL all the same (`SMALL_LIBRARY`): even on its AVX2 code its
per-call cost is lower on the few-row products of experts that few tokens chose (figures at
SMALL_GEMM_ROWS).

bfloat16 (`gemm_bf16`, `BF16`): MKL's `cblas_gemm_bf16bf16f32` (bf16 inputs, float32 output),
also exported by libtorch_cpu, whatever `LIBRARY` is. On an Intel CPU with AMX it ran the
16 experts' up-projections of T=2048, d=768, E=16, k=4 (512 x 768 x 192 each) at 730 GFLOP/s on
one core (torch's bf16 `mm`, oneDNN: 663; float32 sgemm: 145). Where MKL runs its AVX2 code
it converts to float32 (76-107 GFLOP/s on the Zen 4, 72-90 on the Zen 5, against 89-394 for
torch's bf16 `mm`); on the Zen 5 (AVX-512 with bf16, no AMX) with MKL's Intel paths, 273-408
(64-2048 rows), at or above oneDNN's 89-394 on the same shapes. So `BF16` is True where MKL
runs its Intel paths on a CPU with AMX or AVX-512-BF16 (`_native_bf16`); elsewhere bf16
stays on torch's kernels.

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
from numba.extending import get_cython_function_address, overload

__all__ = ["BF16", "BF16_AMX", "HAS_MKL", "LIBRARY", "MKL_INTEL_PATH", "SMALL_GEMM_ROWS",
           "SMALL_LIBRARY", "gemm", "gemm_bf16", "gemm_by_dtype"]

CHOICES = ("auto", "mkl", "openblas")


def _mkl_addresses() -> dict[str, int] | None:
    """Addresses of sgemm_, dgemm_, MKL_Set_Num_Threads_Local and (where exported, else 0)
    cblas_gemm_bf16bf16f32 in torch's own library, and under "intel" whether MKL runs its Intel
    code paths (`_intel_path`), or None where this torch build has no MKL (aarch64, macOS)."""
    import torch

    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(glob.glob(os.path.join(lib_dir, "libtorch_cpu.*"))):
        try:
            lib = ctypes.CDLL(path)
            found = {name: ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
                     for name, symbol in (("sgemm", "sgemm_"), ("dgemm", "dgemm_"),
                                          ("local", "MKL_Set_Num_Threads_Local"))}
        except (OSError, AttributeError):
            continue
        bf16 = getattr(lib, "cblas_gemm_bf16bf16f32", None)
        found["bf16"] = ctypes.cast(bf16, ctypes.c_void_p).value if bf16 is not None else 0
        found["intel"] = _intel_path(lib)
        return found
    return None


def _intel_path(lib: ctypes.CDLL) -> bool:
    """Whether MKL takes its Intel code paths: `mkl_serv_intel_cpu_true()` as MKL's own calls
    resolve it (through the process's global symbols, so a preloaded library that defines it
    comes first; else libtorch_cpu's own). False where MKL exports no such function."""
    for scope in (ctypes.CDLL(None), lib):
        fn = getattr(scope, "mkl_serv_intel_cpu_true", None)
        if fn is not None:
            fn.restype = ctypes.c_int
            fn.argtypes = []
            return fn() == 1
    return False


def _cpuinfo(key: str) -> str:
    """The value of the first `key` line of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _choose(choice: str, mkl_available: bool, intel_path: bool) -> str:
    """The BLAS the kernels call, for SSDFX_BLAS=`choice` (intel_path: `MKL_INTEL_PATH`)."""
    choice = choice.strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"SSDFX_BLAS={choice!r} is not one of {', '.join(CHOICES)}; "
                         "unset it to let ssdfx choose")
    if choice == "mkl" and not mkl_available:
        raise RuntimeError("SSDFX_BLAS=mkl, but this torch build exports no MKL sgemm_ "
                           "(libtorch_cpu); use SSDFX_BLAS=openblas or unset it")
    if choice == "auto":
        return "mkl" if mkl_available and intel_path else "openblas"
    return choice


def _choose_small(choice: str, library: str, mkl_available: bool) -> str:
    """The BLAS of the float32 GEMMs with at most SMALL_GEMM_ROWS output rows: MKL where "auto"
    chose OpenBLAS for the rest and MKL is there (its per-call cost is lower: see
    SMALL_GEMM_ROWS), else `library`, so that an explicit SSDFX_BLAS is obeyed everywhere."""
    choice = choice.strip().lower() or "auto"
    return "mkl" if choice == "auto" and mkl_available else library


def _native_bf16(has_gemm: bool, intel_path: bool, flags: set[str]) -> bool:
    """Whether MKL's bf16 GEMM multiplies in bf16 here (else it converts to float32 and runs at
    float32's speed): it exists, MKL runs its Intel code, and the CPU has AMX or AVX-512-BF16."""
    return has_gemm and intel_path and bool(flags & {"amx_bf16", "avx512_bf16"})


@cfunc(types.int32(types.int32), cache=True)
def _no_local_threads(n):  # OpenBLAS: its count is set per phase, process-wide
    return 0


_BF16_SIG = types.void(types.int32, types.int32, types.int32, types.int64, types.int64,
                       types.int64, types.float32, types.voidptr, types.int64, types.voidptr,
                       types.int64, types.float32, types.voidptr, types.int64)


@cfunc(_BF16_SIG, cache=True)
def _no_gemm_bf16(layout, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    # stands in for a missing cblas_gemm_bf16bf16f32 so that the kernels link; never called
    # (the launchers check HAS_BF16_GEMM first)
    return


_mkl = _mkl_addresses()
HAS_MKL = _mkl is not None
# an Intel CPU's MKL takes them by definition (the vendor also keeps the old rule where a
# future MKL renames the function)
MKL_INTEL_PATH = HAS_MKL and (_mkl["intel"] or _cpuinfo("vendor_id") == "GenuineIntel")
_CHOICE = os.environ.get("SSDFX_BLAS", "auto")
LIBRARY = _choose(_CHOICE, HAS_MKL, MKL_INTEL_PATH)
SMALL_LIBRARY = _choose_small(_CHOICE, LIBRARY, HAS_MKL)
# GEMMs with at most this many output rows call SMALL_LIBRARY (the others LIBRARY): the
# experts' GEMMs over few tokens. One thread of an AMD Zen 5, float32, MKL's AVX2 code (as
# shipped) against SciPy's OpenBLAS 0.3.30, rows n x d x m (up-projection), n x m x d (down),
# m x n x d (weight gradient), d in {256, 768}, m = 32-384: at n = 8-32 rows MKL took 1.2-2.2x
# less time (8 x 256 x 32: 1.7 against 3.8 us; 16 x 768 x 192: 54 against 83 us), at n = 64
# 1.02-1.07x less, from n = 128 rows OpenBLAS was 0-12% faster; the weight-gradient products
# with m <= 64 output rows ran 1.05-1.3x faster in MKL at every n, with m = 96-384 within
# -9/+5%. In the op at T=64, d=256 (bench/op.py, k = E/2, forward), MKL for every GEMM made
# E=8, k=4 0.86-0.88x of dense -> 0.98x, E=32, k=16 0.71-0.74x -> 0.87-0.90x.
SMALL_GEMM_ROWS = 64


def _address(library: str, name: str) -> int:
    """The address of `name` ("sgemm", "dgemm" or "local", the per-thread count) in `library`:
    torch's MKL, or SciPy's OpenBLAS (whose count is set per phase: a no-op here)."""
    if library == "mkl":
        return _mkl[name]
    if name == "local":
        return _no_local_threads.address
    return get_cython_function_address("scipy.linalg.cython_blas", name)


for _symbol, _library, _name in (("sgemm", LIBRARY, "sgemm"), ("dgemm", LIBRARY, "dgemm"),
                                 ("blas_local_threads", LIBRARY, "local"),
                                 ("sgemm_small", SMALL_LIBRARY, "sgemm"),
                                 ("small_local_threads", SMALL_LIBRARY, "local")):
    llvm.add_symbol("ssdfx_" + _symbol, _address(_library, _name))
# whether MKL's bf16 GEMM can be called at all (the tests run it wherever it can), and whether
# the kernels should (see the module's docstring)
HAS_BF16_GEMM = bool(_mkl and _mkl["bf16"])
_FLAGS = set(_cpuinfo("flags").split())
BF16 = _native_bf16(HAS_BF16_GEMM, MKL_INTEL_PATH, _FLAGS)
BF16_AMX = BF16 and "amx_bf16" in _FLAGS  # the size bound of cpu_numba.infer_bf16_or_torch
llvm.add_symbol("ssdfx_gemm_bf16", _mkl["bf16"] if HAS_BF16_GEMM else _no_gemm_bf16.address)
llvm.add_symbol("ssdfx_mkl_local_threads",
                _mkl["local"] if _mkl else _no_local_threads.address)

_vp = types.voidptr
# Fortran BLAS: every argument by reference (transa, transb, m, n, k, alpha, a, lda, b, ldb,
# beta, c, ldc).
_GEMM_SIG = types.void(_vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp)
_sgemm = types.ExternalFunction("ssdfx_sgemm", _GEMM_SIG)
_dgemm = types.ExternalFunction("ssdfx_dgemm", _GEMM_SIG)
_sgemm_small = types.ExternalFunction("ssdfx_sgemm_small", _GEMM_SIG)
# int MKL_Set_Num_Threads_Local(int): the calling thread's count, returns the previous one
_local_threads = types.ExternalFunction("ssdfx_blas_local_threads", types.int32(types.int32))
_small_local_threads = types.ExternalFunction("ssdfx_small_local_threads",
                                              types.int32(types.int32))
_mkl_local_threads = types.ExternalFunction("ssdfx_mkl_local_threads", types.int32(types.int32))
# CBLAS (by value): layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc; the
# MKL_INTs are passed as 64-bit values, which an LP64 build reads correctly too (registers and
# 8-byte stack slots)
_gemm_bf16 = types.ExternalFunction("ssdfx_gemm_bf16", _BF16_SIG)
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


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


@njit(cache=True, nogil=True, inline="always")
def _empty_product(m_, n_, k_, c, beta):
    """For c = a @ b + beta * c with an empty dimension: c's part of it done here (c = beta c
    when K = 0, nothing when M or N is 0), True; False when BLAS has the product to do."""
    if m_ == 0 or n_ == 0:
        return True
    if k_ == 0:
        if beta == 0.0:
            c[:, :] = 0.0
        else:
            c[:, :] *= beta
        return True
    return False


@njit(cache=True, nogil=True)
def gemm(a, b, c, beta):
    """c = a @ b + beta * c for 2-D float32/float64 arrays with any unit-stride layouts.

    a (M, K), b (K, N), c (M, N). Runs BLAS single-threaded in the calling thread (MKL: set
    here; OpenBLAS: the caller's numba phase sets it).
    """
    m_, k_ = a.shape
    n_ = b.shape[1]
    if _empty_product(m_, n_, k_, c, beta):
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
    if a.itemsize == 4 and m_ <= SMALL_GEMM_ROWS:
        before = _small_local_threads(1)
        _sgemm_small(ch[0:].ctypes, ch[1:].ctypes, ints[0:].ctypes, ints[1:].ctypes,
                     ints[2:].ctypes, sc[0:].ctypes, x1.ctypes, ints[3:].ctypes, x2.ctypes,
                     ints[4:].ctypes, sc[1:].ctypes, c.ctypes, ints[5:].ctypes)
        _small_local_threads(before)
        return
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


@njit(cache=True, nogil=True)
def gemm_bf16(a, b, c, beta):
    """c = a @ b + beta * c with a (M, K), b (K, N) bfloat16 held as uint16 arrays with any
    unit-stride layouts and c (M, N) float32 with a unit column stride; MKL's
    cblas_gemm_bf16bf16f32, single-threaded in the calling thread (only where HAS_BF16_GEMM)."""
    m_, k_ = a.shape
    n_ = b.shape[1]
    if _empty_product(m_, n_, k_, c, beta):
        return
    ra, lda = _layout(a)
    rb, ldb = _layout(b)
    rc, ldc = _layout(c)
    if ra < 0 or rb < 0 or rc != 1:
        raise ValueError("gemm_bf16: inputs need a unit stride, the output a unit column stride")
    before = _mkl_local_threads(1)
    _gemm_bf16(np.int32(_ROW_MAJOR), np.int32(_NO_TRANS if ra == 1 else _TRANS),
               np.int32(_NO_TRANS if rb == 1 else _TRANS), m_, n_, k_, np.float32(1.0),
               a.ctypes, lda, b.ctypes, ldb, np.float32(beta), c.ctypes, ldc)
    _mkl_local_threads(before)


def gemm_by_dtype(a, b, c, beta):
    """`gemm_bf16` where a holds bfloat16 bits (uint16), else `gemm`: chosen when numba compiles
    the caller, so one kernel body serves both (`numba_kernels.token_sum`). numba code only."""
    raise NotImplementedError("gemm_by_dtype is for numba-compiled code")


@overload(gemm_by_dtype)
def _gemm_by_dtype(a, b, c, beta):
    if a.dtype == types.uint16:
        return lambda a, b, c, beta: gemm_bf16(a, b, c, beta)
    return lambda a, b, c, beta: gemm(a, b, c, beta)
