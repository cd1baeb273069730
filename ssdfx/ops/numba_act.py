"""The FFN activations and their derivatives in numba, for the fused kernels.

`activate` applies one activation to an expert's (n, m) block (flattened), so that in
the forward kernels (`numba_kernels.fwd`) the up-projection, the activation and the
down-projection of an expert run back to back while its block is in cache. `activate_grad`
gives the activation and its derivative at once, for the backward kernel (`numba_kernels.bwd`),
which recomputes them from the saved pre-activations per expert instead of in two more passes
over (P, m) in torch.

float32 rows use formulas LLVM can vectorise: numba calls libm's scalar `erff`, `expf` and
`tanhf` one element at a time (without Intel's SVML, which pip's llvmlite does not use), and
that ran GELU over a (256, 64) block in 66 us where torch took 20. Here:

    exp(z)        2^n * e^r with n = round(z / ln 2), |r| <= ln(2) / 2, e^r by its Taylor
                  polynomial to degree 7 (truncation error below 6e-9 relative); 2^n is built
                  in the float's exponent bits, through an int32 scratch row viewed as float32
    sigmoid(z)    1 / (1 + exp(-z))                   -> silu, quick_gelu
    gelu_tanh(x)  x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3), since 1 + tanh(u) is
                  2 sigmoid(2u): no tanh, and no cancellation for negative x
    gelu(x)       0.5 x (1 + erf(x / sqrt 2)): with y = |x| / sqrt 2, erfc(y) comes from
                  Abramowitz and Stegun's formula 7.1.26, poly(1 / (1 + p y)) exp(-y^2) (absolute
                  error <= 1.5e-7), and 1 + erf(x / sqrt 2) is 2 - erfc(y) for x >= 0, erfc(y)
                  otherwise (no cancellation in the negative tail)

The derivatives reuse the same pieces: gelu'(x) = Phi(x) + x phi(x) with phi from the exp
already computed for erfc; for s = sigmoid(z), 1 - s = exp(-z) s, so silu'(x) = s + x s (1 - s)
and the tanh-GELU's is s + x s (1 - s) dz/dx, with no cancellation in either tail.

These differ from torch's float32 activations and derivatives by a few units in the last place
(tests bound it), so a GELU or SiLU FFN's sparse gradients are not bitwise those of the dense
FFN's autograd; ReLU, squared ReLU and identity are exact. float64 rows use the math module's
functions.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["CODES", "activate", "activate_grad"]

CODES = {"identity": 0, "relu": 1, "relu2": 2, "gelu": 3, "gelu_tanh": 4, "silu": 5,
         "quick_gelu": 6}

# Multiply-adds may fuse (FMA; no reassociation, NaN and infinities kept): the polynomials run
# as Horner FMAs, 1.3-1.75x faster on a (512, 192) block on the Intel Xeon (GELU 1.88
# -> 1.07 ns per element, SiLU 1.21 -> 0.97; torch's own float32 GELU on one thread: 0.56),
# with the same error against float64. `_exp32_` is inlined into its callers and takes theirs.
_FMA = {"contract"}

_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2
# ln 2 in two parts (Cody and Waite): n * _LN2_HI is exact in float32 for |n| < 2^15, so the
# reduced argument keeps its accuracy up to |z| = 88
_LN2_HI = 355.0 / 512.0
_LN2_LO = _LN2 - _LN2_HI
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 2.0 * math.sqrt(2.0 / math.pi)  # 2u = _GELU_TANH_C * (x + 0.044715 x^3)
# Abramowitz and Stegun 7.1.26
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


@njit(cache=True, nogil=True, inline="always")
def _exp32_(t, bits):
    """t = exp(t) in place for a float32 array; bits: an int32 scratch array as long. Below
    -87 it gives 0 and above 88 infinity (exp(-87) is near float32's smallest normal number,
    exp(88) near its largest), not the clamped argument's value: a sigmoid's 1 - s = exp(-z) s
    must vanish for large z, or x (1 - s) stays of order x * 1e-38 (the tanh-GELU's derivative
    was 4.5 instead of 1 at x = 1e13, SiLU's -1.8 instead of 0 at x = -3e38)."""
    for c in range(t.shape[0]):
        x0 = t[c]
        v = min(max(x0, np.float32(-87.0)), np.float32(88.0))
        n = np.floor(v * np.float32(_LOG2E) + np.float32(0.5))
        r = (v - n * np.float32(_LN2_HI)) - n * np.float32(_LN2_LO)
        p = np.float32(1.0 / 5040.0)
        p = p * r + np.float32(1.0 / 720.0)
        p = p * r + np.float32(1.0 / 120.0)
        p = p * r + np.float32(1.0 / 24.0)
        p = p * r + np.float32(1.0 / 6.0)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        p = p * r + np.float32(1.0)
        t[c] = np.float32(0.0) if x0 < np.float32(-87.0) else (
            np.float32(np.inf) if x0 > np.float32(88.0) else p)
        bits[c] = (np.int32(n) + np.int32(127)) << np.int32(23)
    scale = bits.view(np.float32)
    for c in range(t.shape[0]):
        t[c] *= scale[c]


@njit(cache=True, nogil=True, inline="always", error_model="numpy", fastmath=_FMA)
def _times_sigmoid32(a, h, tmp, bits):
    """h = a * sigmoid(z) for float32, given tmp = -z (overwritten)."""
    _exp32_(tmp, bits)
    for c in range(a.shape[0]):
        h[c] = a[c] / (np.float32(1.0) + tmp[c])


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FMA)
def _sigmoid_times(a, h, scale, tmp, bits):
    """h = a * sigmoid(scale * a) (silu: scale = 1, quick_gelu: scale = 1.702)."""
    if a.itemsize == 4:
        sf = np.float32(scale)
        for c in range(a.shape[0]):
            tmp[c] = -sf * a[c]
        _times_sigmoid32(a, h, tmp, bits)
    else:
        for c in range(a.shape[0]):
            v = a[c]
            h[c] = v / (1.0 + math.exp(-scale * v))


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FMA)
def _gelu_tanh(a, h, tmp, bits):
    if a.itemsize == 4:
        for c in range(a.shape[0]):
            v = a[c]
            tmp[c] = np.float32(-_GELU_TANH_C) * (v + np.float32(0.044715) * v * v * v)
        _times_sigmoid32(a, h, tmp, bits)
    else:
        for c in range(a.shape[0]):
            v = a[c]
            h[c] = 0.5 * v * (1.0 + math.tanh(0.5 * _GELU_TANH_C * (v + 0.044715 * v * v * v)))


@njit(cache=True, nogil=True, inline="always", error_model="numpy", fastmath=_FMA)
def _erfc32_(v, e):
    """erfc(|v| / sqrt 2) for float32 v, given e = exp(-v^2 / 2) (A&S 7.1.26, as in `_gelu`)."""
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(_AS_P * _INV_SQRT2) * abs(v))
    p = np.float32(_AS_A[4])
    p = p * t + np.float32(_AS_A[3])
    p = p * t + np.float32(_AS_A[2])
    p = p * t + np.float32(_AS_A[1])
    p = p * t + np.float32(_AS_A[0])
    return p * t * e


@njit(cache=True, nogil=True, inline="always", error_model="numpy", fastmath=_FMA)
def _gauss32_(a, tmp, bits):
    """tmp = exp(-a^2 / 2) for float32 a (GELU's erfc and its derivative's density)."""
    for c in range(a.shape[0]):
        y = abs(a[c]) * np.float32(_INV_SQRT2)
        tmp[c] = -y * y
    _exp32_(tmp, bits)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FMA)
def _gelu(a, h, tmp, bits):
    if a.itemsize == 4:
        _gauss32_(a, tmp, bits)
        for c in range(a.shape[0]):
            v = a[c]
            erfc = _erfc32_(v, tmp[c])
            phi2 = np.float32(2.0) - erfc if v >= np.float32(0.0) else erfc
            h[c] = np.float32(0.5) * v * phi2
    else:
        for c in range(a.shape[0]):
            v = a[c]
            h[c] = 0.5 * v * math.erfc(-v * _INV_SQRT2)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FMA)
def activate(a, h, code, tmp, bits):
    """h = act(a) for 1-D arrays, act by its CODES value; tmp (a's dtype) and bits (int32) are
    scratch arrays of a's length. a and h should be different arrays: the same array twice is
    computed correctly, but LLVM then cannot prove the loops free of overlap and runs them
    unvectorised (GELU 3.2 against 1.6 ns per element, ReLU 0.27 against 0.14)."""
    if code == 0:
        h[:] = a
    elif code == 1:
        for c in range(a.shape[0]):
            v = a[c]
            h[c] = 0.0 if v < 0.0 else v  # NaN stays NaN, as in torch.relu
    elif code == 2:
        for c in range(a.shape[0]):
            v = a[c]
            h[c] = 0.0 if v < 0.0 else v * v
    elif code == 3:
        _gelu(a, h, tmp, bits)
    elif code == 4:
        _gelu_tanh(a, h, tmp, bits)
    elif code == 5:
        _sigmoid_times(a, h, 1.0, tmp, bits)
    elif code == 6:
        _sigmoid_times(a, h, 1.702, tmp, bits)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FMA)
def _sigmoid_grad(a, h, g, scale, cubic, tmp, bits):
    """h = a * s and g = dh/da for s = sigmoid(z), z = scale * (a + cubic * a^3): silu (1, 0),
    quick_gelu (1.702, 0), the tanh-GELU (_GELU_TANH_C, 0.044715)."""
    if a.itemsize == 4:
        sf, cf = np.float32(scale), np.float32(cubic)
        for c in range(a.shape[0]):
            v = a[c]
            tmp[c] = -sf * (v + cf * v * v * v)
        _exp32_(tmp, bits)  # tmp = exp(-z)
        for c in range(a.shape[0]):
            v = a[c]
            s = np.float32(1.0) / (np.float32(1.0) + tmp[c])
            # 1 - s without cancellation: exp(-z) s near s = 1, 1 - s below one half (where
            # exp(-z) may be infinite)
            om = tmp[c] * s if s >= np.float32(0.5) else np.float32(1.0) - s
            dz = sf * (np.float32(1.0) + np.float32(3.0) * cf * v * v)
            h[c] = v * s
            # where s (1 - s) is 0 the second term is too, even if x dz overflows
            g[c] = s + v * s * om * dz if s * om != np.float32(0.0) else s
    else:
        for c in range(a.shape[0]):
            v = a[c]
            s = 1.0 / (1.0 + math.exp(-scale * (v + cubic * v * v * v)))
            h[c] = v * s
            g[c] = s + v * s * (1.0 - s) * scale * (1.0 + 3.0 * cubic * v * v)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FMA)
def _gelu_grad(a, h, g, tmp, bits):
    if a.itemsize == 4:
        _gauss32_(a, tmp, bits)
        for c in range(a.shape[0]):
            v = a[c]
            erfc = _erfc32_(v, tmp[c])
            cdf = np.float32(1.0) - np.float32(0.5) * erfc if v >= np.float32(0.0) else (
                np.float32(0.5) * erfc)
            h[c] = v * cdf
            g[c] = cdf + v * tmp[c] * np.float32(_INV_SQRT_2PI)
    else:
        for c in range(a.shape[0]):
            v = a[c]
            cdf = 0.5 * math.erfc(-v * _INV_SQRT2)
            h[c] = v * cdf
            g[c] = cdf + v * math.exp(-0.5 * v * v) * _INV_SQRT_2PI


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FMA)
def activate_grad(a, h, g, code, tmp, bits):
    """h = act(a) and g = act'(a) for 1-D arrays (a unchanged), act by its CODES value; tmp
    (a's dtype) and bits (int32) scratch arrays of a's length. At a kink (ReLU's 0) the
    derivative is torch's: 0."""
    if code == 0:
        for c in range(a.shape[0]):
            h[c] = a[c]
            g[c] = 1.0
    elif code == 1:
        for c in range(a.shape[0]):
            v = a[c]
            h[c] = 0.0 if v < 0.0 else v  # NaN stays NaN, as in torch.relu
            g[c] = 0.0 if v <= 0.0 else 1.0  # as torch's threshold_backward
    elif code == 2:
        for c in range(a.shape[0]):
            v = a[c]
            h[c] = 0.0 if v < 0.0 else v * v
            g[c] = 0.0 if v < 0.0 else 2.0 * v
    elif code == 3:
        _gelu_grad(a, h, g, tmp, bits)
    elif code == 4:
        _sigmoid_grad(a, h, g, _GELU_TANH_C, 0.044715, tmp, bits)
    elif code == 5:
        _sigmoid_grad(a, h, g, 1.0, 0.0, tmp, bits)
    elif code == 6:
        _sigmoid_grad(a, h, g, 1.702, 0.0, tmp, bits)
