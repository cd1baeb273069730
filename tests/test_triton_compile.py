"""The Triton kernels compiled ahead of time for an H100/H200 (sm90) on a machine without a GPU:
Triton's wheel carries ptxas, so what a GPU run would compile is compiled here, and a kernel
that fails to compile, spills registers (cuobjdump's resource usage of the machine code), or
asks for more shared memory than sm90 has fails here first. The bf16 GEMM kernels must use
Hopper's wgmma and pipeline their loads with cp.async; the interpreter tests
(test_triton_interpreted.py) check what they compute.

Arguments are specialised as a real launch specialises them: pointers and the sizes and
strides that are multiples of 16 carry that divisibility, and unit strides are constants."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton")

from ssdfx.ops import cuda_kernels, gathered  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - an older Triton
    pytest.skip("this Triton cannot compile ahead of time", allow_module_level=True)

SM90 = GPUTarget("cuda", 90, 32)
SM90_SHARED = 227 * 1024  # an H100/H200 block's shared memory at most
INDEX_PTRS = {"order_ptr", "offsets_ptr", "tiles_ptr", "inv_ptr", "n_rows_ptr"}


def _bench_configs():
    spec = importlib.util.spec_from_file_location(
        "_bench_cuda_check", os.path.join(os.path.dirname(__file__), "..", "bench",
                                          "cuda_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GATHERED_CONFIGS, module.WGRAD_CONFIGS


def compile_sm90(fn, dtype, consts, units=(), options=None):
    """fn compiled for sm90: pointers to `dtype` (index pointers int64, dg float32, the dropout
    mask bool), `scale` float32, the other arguments int32 divisible by 16, except `units`
    (strides of 1: constants)."""
    consts = dict(consts, **{n: 1 for n in units})
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name == "scale":  # a float argument
            sig[name] = "fp32"
            continue
        if name.endswith("_ptr"):
            sig[name] = ("*i64" if name in INDEX_PTRS else "*fp32" if name == "dg_ptr"
                         else "*i1" if name == "keep_ptr" else f"*{dtype}")
        else:
            sig[name] = "i32"
        attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=SM90, options={**(options or {}), **cuda_kernels.LAUNCH})


def _resources(cubin: bytes) -> dict[str, int]:
    """The machine code's resource use (cuobjdump --dump-resource-usage): REG, STACK, LOCAL,
    SHARED per thread or block."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out)}


def _check(kernel, gemm):
    ptx = kernel.asm["ptx"]
    assert kernel.metadata.shared <= SM90_SHARED, kernel.metadata.shared
    use = _resources(kernel.asm["cubin"])
    # no register spills (they would go to local memory, on the stack), at most 255 registers
    assert use["LOCAL"] == 0 and use["STACK"] == 0 and use["REG"] <= 255, use
    if gemm:
        assert re.search(r"wgmma\.mma_async", ptx), "no wgmma: the GEMM would not use Hopper's"
        assert re.search(r"cp\.async", ptx), "loads not pipelined"


def _opts(cfg):
    return {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}


def _tiles(cfg):
    return {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}


def _kernels():
    return cuda_kernels._kernels(False)  # the compiled (not interpreted) kernels


@pytest.mark.parametrize("glu", [False, True])  # with GLU also a dropout mask
@pytest.mark.parametrize("activation", sorted(gathered.ACT_CODES))
def test_up_and_hidden_grad_compile_for_sm90(glu, activation):
    # bf16 only: on CUDA the grouped_mm backend (and so these kernels) takes nothing else
    k = _kernels()
    flags = dict(K=4, E=16, ACT=gathered.ACT_CODES[activation], GLU=glu, KEEP=glu, IEEE=False,
                 WIDEN=False)
    cfg = gathered.up_config(glu)
    up = compile_sm90(k.gathered_up_kernel, "bf16",
                      dict(flags, HAS_B1=True, HAS_B3=glu, **_tiles(cfg)),
                      units=("sxd", "s1d", "s3d"), options=_opts(cfg))
    cfg = gathered.CONFIG_DH_GLU if glu else gathered.CONFIG_DH
    dh = compile_sm90(k.gathered_dh_kernel, "bf16", dict(flags, **_tiles(cfg)),
                      units=("syd", "s2f"), options=_opts(cfg))
    for kernel in (up, dh):
        _check(kernel, gemm=True)


@pytest.mark.parametrize("layout", ["w1", "w2"])
def test_weight_grad_compiles_for_sm90(layout):
    cfg = gathered.CONFIG_WGRAD
    kernel = compile_sm90(_kernels().gathered_wgrad_kernel, "bf16",
                          dict(K=4, IEEE=False, WIDEN=False, **_tiles(cfg)),
                          units=("ssd", "so_d" if layout == "w1" else "so_f"),
                          options=_opts(cfg))
    _check(kernel, gemm=True)


def test_the_benchmark_sweeps_configs_compile_for_sm90():
    ups, wgrads = _bench_configs()
    assert ups[0] == gathered.CONFIG and wgrads[0] == gathered.CONFIG_WGRAD
    k = _kernels()
    for cfg in ups:
        _check(compile_sm90(k.gathered_up_kernel, "bf16",
                            dict(K=4, E=16, ACT=2, GLU=False, KEEP=False, HAS_B1=True,
                                 HAS_B3=False, IEEE=False, WIDEN=False, **_tiles(cfg)),
                            units=("sxd", "s1d", "s3d"), options=_opts(cfg)), gemm=True)
    for cfg in wgrads:
        _check(compile_sm90(k.gathered_wgrad_kernel, "bf16",
                            dict(K=4, IEEE=False, WIDEN=False, **_tiles(cfg)),
                            units=("ssd", "so_d"), options=_opts(cfg)), gemm=True)


def test_small_kernels_compile_for_sm90():
    k = _kernels()
    _check(compile_sm90(k.gather_sum_kernel, "bf16", dict(k=4, has_gate=True, block_d=1024),
                        options=dict(num_warps=4)), gemm=False)
    _check(compile_sm90(k.zero_empty_kernel, "bf16", dict(BLOCK=1024),
                        options=dict(num_warps=4)), gemm=False)
