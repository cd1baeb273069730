"""The `grouped_mm` backend's steps around its GEMMs, fused into Triton kernels (opt-in).

In `ssdfx.ops.grouped` the forward's up-projection is three steps over (T*K, .) tensors: the
tokens' rows of x gathered into expert order (`index_select`, read and write T*K*d), one
grouped GEMM per projection, then the expert bias and the activation (and the GLU product) in
separate elementwise kernels; the backward gathers x and dy rows again, runs the elementwise
backward in ~10 kernels, zeroes the weight gradients of empty experts with `torch.where` and
copies dW2 into w2's strides. On an H200 at T=16384, d=4096, E=16, K=4 (bf16) each gather
took 0.28 ms and the elementwise passes about 1 ms of the 8.4 ms training step (bench/README.md,
cuda_check.py). Here:

    up           gather + up-projection(s) + bias + activation [+ GLU] [+ dropout]: reads each
                 tile's x rows through the layout (row r is token order[r] // K) straight from
                 x and writes a1 (a3) for the backward and h for the down-projection;
    hidden_grad  dh = dy[token] w2_e with `layout.hidden_backward` in the epilogue: dgate (row
                 sums added atomically in float32 over the column tiles), gh, da1, da3;
    weight_grad  one weight gradient, contracting over each expert's layout rows with x or dy
                 read through the layout, written straight into the weight's layout;
    zero_empty   the bias gradients of experts without rows, zeroed in place.

No (T*K, d) gathered copy and no host sync: the expert of each row tile comes from the offsets
on the device. Expert e owns layout rows [offsets[e], offsets[e+1]), cut into ceil(n_e / BM)
row tiles; `tiles` (E+1,) is their running count, and a launch has ceil(T*K / BM) + E row
tiles (at least the sum), the surplus ones return at once. Program ids run over (row tile,
column tile) with the column tile fastest, so the programs that share a tile's gathered rows
run side by side (read from L2 after the first).

Numerics: products accumulate in float32; a1 and a3 are rounded to the input dtype after the
bias (as the eager path's `a1 += b1` leaves them), the activation reads the rounded a1, and
each output is rounded once (the eager path rounds after each elementwise op: the last bit
may differ). float32 inputs multiply in IEEE float32, not TF32. A dropout mask (the op's
`keep`) is read in the epilogues, its factor 1 / (1 - p) in float32.

Not measured on a GPU yet: `GATHERED_DEVICES` is empty by default and `bench/cuda_check.py`
times the variant beside the others. Without a GPU the kernels are run by Triton's
interpreter (tests/test_triton_interpreted.py) and compiled for sm90 ahead of time
(tests/test_triton_compile.py).
"""

from __future__ import annotations

import torch

from ssdfx.ops import cuda_kernels

__all__ = ["ACT_CODES", "CONFIG", "CONFIG_DH", "CONFIG_DH_GLU", "CONFIG_WGRAD",
           "GATHERED_DEVICES", "hidden_grad", "up", "up_config", "usable",
           "weight_grad", "zero_empty"]

# device types whose grouped_mm forward runs this kernel (module docstring); e.g. ("cuda",)
GATHERED_DEVICES: tuple[str, ...] = ()

# Tile sizes and launch options on a GPU (bf16: the grouped_mm backend takes nothing else on
# CUDA): rows, columns (hidden units), reduction step, warps, pipeline stages. Each compiles
# for sm90 without register spills (tests/test_triton_compile.py, from cuobjdump's resource
# use): `up` at 128 x 128 uses 176 registers a thread, 255 with GLU (3 stages then: two weight
# tiles a stage); `hidden_grad`'s epilogue holds more values, and at 128 x 128 it spilled
# 720 bytes a thread (1648 with GLU), so it takes 64 x 128, and 64 x 64 with GLU. Under the
# interpreter the tiles are 16 (tl.dot's smallest) to stay quick.
CONFIG = dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4)
CONFIG_DH = dict(BM=64, BN=128, BK=64, num_warps=8, num_stages=4)
CONFIG_DH_GLU = dict(BM=64, BN=64, BK=64, num_warps=8, num_stages=4)
_INTERPRETED = dict(BM=16, BN=16, BK=16)
# the weight gradients' tiles: d, hidden units, rows of the contraction
CONFIG_WGRAD = dict(BD=128, BM=128, BR=64, num_warps=8, num_stages=4)
_INTERPRETED_WGRAD = dict(BD=16, BM=16, BR=16)

ACT_CODES = {"relu": 0, "relu2": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "quick_gelu": 5,
             "identity": 6}


def usable(x: torch.Tensor) -> bool:
    """Whether `grouped` runs these kernels for x: its device type is in GATHERED_DEVICES,
    Triton is present, and on CPU only under the interpreter."""
    if x.device.type not in GATHERED_DEVICES or not cuda_kernels.available():
        return False
    return x.device.type == "cuda" or cuda_kernels.interpreting()


def up_config(glu: bool) -> dict:
    """`up`'s tiles on a GPU: CONFIG, at most 3 stages with GLU."""
    cfg = dict(CONFIG)
    if glu:
        cfg["num_stages"] = min(cfg["num_stages"], 3)
    return cfg


def _launch(rows, m, num_experts, offsets, gpu_config):
    """(tile config, grid, tiles): the tiles' running count per expert on the device, and a
    grid with room for every tile (ceil(rows / BM) + E row tiles, the surplus returns)."""
    cfg = _config(gpu_config, _INTERPRETED)
    bm, bn = cfg["BM"], cfg["BN"]
    counts = offsets[1:] - offsets[:-1]
    tiles = counts.new_zeros(num_experts + 1)
    torch.cumsum(torch.div(counts + (bm - 1), bm, rounding_mode="floor"), 0, out=tiles[1:])
    grid = ((-(-rows // bm) + num_experts) * -(-m // bn),)
    return cfg, grid, tiles


def _config(gpu_config: dict, interpreted_config: dict) -> dict:
    """A kernel's tiles and launch options: on a GPU, or the interpreter's small tiles."""
    return dict(interpreted_config if cuda_kernels.interpreting() else gpu_config)


def _precision(dtype: torch.dtype) -> dict:
    """The GEMM kernels' IEEE flag (float32 products in IEEE float32, not TF32) and WIDEN flag
    (the interpreter's bf16 tiles widened to float32 before tl.dot)."""
    return dict(IEEE=dtype == torch.float32,
                WIDEN=cuda_kernels.interpreting() and dtype != torch.float32)


def _keep_args(keep, dropout_p, like):
    """(keep pointer, scale, KEEP flag) of a dropout mask (T, K, m) bool or None."""
    if keep is None:
        return like, 1.0, False
    return keep.contiguous(), 1.0 / (1.0 - dropout_p), True


def up(x, w1, b1, w3, b3, order, offsets, k, activation, keep=None, dropout_p=0.0):
    """a1, a3 (or None), h, each (T*K, m) in layout order: a1 = x[order // K] w1_e^T + b1_e per
    expert block, likewise a3, h = act(a1) [* a3] [* keep / (1 - p)]. Rows >= offsets[E]
    (unused slots) are left unwritten. x (T, d); w1, w3 (F, d) any strides; b1, b3 (F,) or
    None; order (T*K,), offsets (E+1,) on x's device (`layout.sort_pairs`); keep (T, K, m)
    bool or None (`layout.hidden`)."""
    num_experts = offsets.shape[0] - 1
    f_all, d = w1.shape
    m = f_all // num_experts
    rows = order.shape[0]
    glu = w3 is not None
    cfg, grid, tiles = _launch(rows, m, num_experts, offsets, up_config(glu))
    a1 = x.new_empty(rows, m)
    a3 = x.new_empty(rows, m) if glu else None
    h = x.new_empty(rows, m)
    w3_ = w3 if glu else w1
    kp, scale, has_keep = _keep_args(keep, dropout_p, x)
    cuda_kernels.kernels().gathered_up_kernel[grid](
        x, order, offsets, tiles, w1, b1 if b1 is not None else w1, w3_,
        b3 if b3 is not None else w1, kp, a1, a3 if glu else a1, h, d, m,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w3_.stride(0), w3_.stride(1),
        scale, K=k, E=num_experts, KEEP=has_keep, ACT=ACT_CODES[activation], GLU=glu,
        HAS_B1=b1 is not None, HAS_B3=glu and b3 is not None, **_precision(x.dtype), **cfg,
        **cuda_kernels.LAUNCH,
    )
    return a1, a3, h


def hidden_grad(dy, w2, a1, a3, gate, order, offsets, k, activation, keep=None,
                dropout_p=0.0):
    """The backward's hidden units in one kernel: dh = dy[order // K] w2_e (no gathered copy of
    dy), then `layout.hidden_backward`: dgate (T*K,) = rowsum(dh * h) in
    layout order, gh = gate h, da1, da3 (or None), each (T*K, m). Rows >= offsets[E] of gh,
    da1, da3 are left unwritten, dgate's are 0. dy (T, d); w2 (d, F) any strides; a1, a3 the
    forward's (T*K, m); gate (T, K); order, offsets, keep as in `up`."""
    num_experts = offsets.shape[0] - 1
    d, f_all = w2.shape
    m = f_all // num_experts
    rows = order.shape[0]
    glu = a3 is not None
    cfg, grid, tiles = _launch(rows, m, num_experts, offsets,
                               CONFIG_DH_GLU if glu else CONFIG_DH)
    dg = torch.zeros(rows, dtype=torch.float32, device=dy.device)  # summed over column tiles
    gh, da1 = dy.new_empty(rows, m), dy.new_empty(rows, m)
    da3 = dy.new_empty(rows, m) if glu else None
    kp, scale, has_keep = _keep_args(keep, dropout_p, dy)
    cuda_kernels.kernels().gathered_dh_kernel[grid](
        dy, order, offsets, tiles, w2, a1.contiguous(), a3.contiguous() if glu else a1,
        gate.contiguous(), kp, dg, gh, da1, da3 if glu else da1, d, m, dy.stride(0),
        dy.stride(1), w2.stride(0), w2.stride(1), scale,
        K=k, E=num_experts, KEEP=has_keep, ACT=ACT_CODES[activation], GLU=glu,
        **_precision(dy.dtype), **cfg, **cuda_kernels.LAUNCH,
    )
    return dg.to(dy.dtype), gh, da1, da3


def weight_grad(src, h, order, offsets, k, like, neurons_first):
    """A weight gradient in one kernel, with the layout of `like`: w1 or w3 (F, d) with
    `neurons_first`, w2 (d, F) without, any strides (written in place of the copy
    `layout.rows_grad`/`cols_grad` make):
    for each expert e, grad[e's neurons] = sum over its layout rows r of
    h[r]^T src[order[r] // K] (src (T, d): x for w1, w3; dy for w2 with h = gate h), without
    a gathered copy of src. Experts without rows get zeros."""
    num_experts = offsets.shape[0] - 1
    d = src.shape[1]
    m = h.shape[1]
    cfg = _config(CONFIG_WGRAD, _INTERPRETED_WGRAD)
    grad = torch.empty_like(like)
    so_f, so_d = grad.stride() if neurons_first else grad.stride()[::-1]
    grid = (-(-d // cfg["BD"]) * -(-m // cfg["BM"]), num_experts)
    cuda_kernels.kernels().gathered_wgrad_kernel[grid](
        src, order, offsets, h.contiguous(), grad, d, m, src.stride(0), src.stride(1), so_d,
        so_f, K=k, **_precision(src.dtype), **cfg, **cuda_kernels.LAUNCH,
    )
    return grad


def zero_empty(out: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out (E, ...) contiguous, with the blocks of experts that have no rows set to zero in
    place (what a grouped GEMM leaves there is unspecified), the rest untouched: writes only
    those blocks, where `torch.where` reads and writes all of out."""
    num_experts = out.shape[0]
    n = out[0].numel() if num_experts else 0
    if n == 0:
        return out
    block = 1024
    grid = (num_experts, min(-(-n // block), 256))
    cuda_kernels.kernels().zero_empty_kernel[grid](out, offsets, n, BLOCK=block,
                                                    **cuda_kernels.LAUNCH)
    return out
