"""GPU kernels against the CPU reference: forward and every gradient (skipped without CUDA).

Same comparison as test_ops_kernels.py: CUDA kernels run on the inputs, the float32 CPU
reference on the same (rounded) inputs. Tolerance |a - ref| <= rel * (1 + max|ref|), rel 1e-4
for float32 (TF32 is off in torch by default for matmuls) and 3e-2 for bfloat16.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from ssdfx.ops import cuda_kernels, gathered, moe_ffn
from ssdfx.ops.dispatch import select
from ssdfx.ops.grouped import grouped_mm_ok

from test_ops_kernels import _close, _patched, _term_scales, _upcast, make, run

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SPECS = [
    # e, m, d, t, k, glu, bias, unused, skew, activation, dropout_p
    (8, 32, 64, 96, 2, False, True, 0.0, False, "gelu", 0.0),
    (8, 32, 64, 96, 2, True, False, 0.2, False, "silu", 0.0),
    (4, 16, 32, 40, 4, True, True, 0.0, False, "gelu_tanh", 0.0),  # k == E
    (1, 16, 24, 1, 1, False, True, 0.0, False, "relu", 0.0),  # E = 1, T = 1
    (16, 8, 40, 30, 2, False, False, 0.0, True, "relu2", 0.0),  # empty experts
    (4, 16, 32, 50, 2, False, True, 0.0, False, "quick_gelu", 0.3),  # dropout mask
    (4, 8, 16, 33, 3, True, True, 0.6, False, "identity", 0.0),  # many -1 slots
]


def _spec(row, seed):
    keys = ["e", "m", "d", "t", "k", "glu", "bias", "unused", "skew", "activation", "dropout_p"]
    return dict(zip(keys, row), seed=seed)


def _cuda(p):
    return {n: (v.cuda() if isinstance(v, torch.Tensor) else v) for n, v in p.items()}


def _backends(x, w1, e):
    names = ["torch", "auto"]
    if grouped_mm_ok(x, w1, e):
        names += ["grouped_mm", "grouped_mm+fused"]
        if cuda_kernels.available():
            names.append("grouped_mm+gathered")
    return names


def _variant(backend):
    """(backend string, context, compiled functions): "grouped_mm+fused" is grouped_mm with its
    elementwise middle compiled (grouped.FUSED_DEVICES), "grouped_mm+gathered" with its
    forward up-projection in one Triton kernel (gathered.GATHERED_DEVICES); the others run
    as they are."""
    from ssdfx.ops import grouped

    if backend == "grouped_mm+gathered":
        return "grouped_mm", _patched(gathered, GATHERED_DEVICES=("cuda",)), {}
    if backend != "grouped_mm+fused":
        return backend, contextlib.nullcontext(), {}
    torch._dynamo.reset()  # dynamo recompiles a function at most 8 times per process
    fresh = dict(_up_epilogue_op=grouped._Fusable(grouped._up_epilogue),
                 _hidden_backward_op=grouped._Fusable(grouped.hidden_backward))
    return "grouped_mm", _patched(grouped, FUSED_DEVICES=("cuda",), **fresh), fresh


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("row", SPECS, ids=[f"spec{i}" for i in range(len(SPECS))])
def test_cuda_kernels_match_cpu_reference(row, dtype):
    spec = _spec(row, seed=len(row) * 7 + int(dtype == torch.bfloat16))
    p = make(spec, dtype)
    ref_p = _upcast(p)
    reference = select("reference", ref_p["x"], ref_p["w1"], spec["e"])
    ref_fwd, _ = run(reference, ref_p, spec)
    pc = _cuda(p)
    rel = 1e-4 if dtype == torch.float32 else 3e-2
    pairs = int(ref_fwd[4][-1])
    for backend in _backends(pc["x"], pc["w1"], spec["e"]):
        kind, context, fused = _variant(backend)
        with context:
            fwd, bwd = run(select(kind, pc["x"], pc["w1"], spec["e"]), pc, spec)
        assert not any(f.broken for f in fused.values()), "compiling fell back to eager"
        assert torch.equal(fwd[3].cpu(), ref_fwd[3]) and torch.equal(fwd[4].cpu(), ref_fwd[4])
        scale = _term_scales(ref_p, spec, fwd[1].float().cpu(), fwd[2].float().cpu(),
                             fwd[3].cpu(), fwd[4].cpu())
        _close(fwd[0].cpu(), ref_fwd[0], rel, scale["y"])
        for name, got, want in zip(("a1", "a3"), fwd[1:3], ref_fwd[1:3]):  # rows >= P: unspecified
            assert got.shape == want.shape, backend
            _close(got[:pairs].cpu(), want[:pairs], rel, scale[name])
        # reference backward on the kernel's own saved pre-activations (see test_ops_kernels)
        ref_bwd = reference.backward(
            ref_p["dy"], ref_p["x"], ref_p["w1"], ref_p["w2"], ref_p["w3"], ref_p["gate"],
            p["keep"], fwd[1].float().cpu(), fwd[2].float().cpu(), fwd[3].cpu(), fwd[4].cpu(),
            spec["e"], spec["activation"], spec["dropout_p"])
        names = ["dx", "dw1", "db1", "dw2", "dw3", "db3", "dgate"]
        for name, got, want in zip(names, bwd, ref_bwd):
            assert got.shape == want.shape, (backend, name)
            _close(got.cpu(), want, rel, scale[name])


def test_cuda_autograd_and_transposed_weights():
    spec = _spec((4, 32, 64, 64, 2, False, True, 0.0, False, "gelu", 0.0), seed=5)
    p = make(spec, torch.bfloat16)
    grads = {}
    for device in ("cpu", "cuda"):
        fc = p["w1"].t().contiguous().to(device).requires_grad_()  # Conv1D storage (d, F)
        proj = p["w2"].t().contiguous().to(device).requires_grad_()
        x = p["x"].to(device).float().requires_grad_()
        y = moe_ffn(x.to(torch.bfloat16), fc.t(), p["b1"].to(device), proj.t(), None, None,
                    p["expert_idx"].to(device), p["gate"].to(device), num_experts=4,
                    activation="gelu", backend="auto" if device == "cuda" else "reference")
        y.float().square().sum().backward()
        grads[device] = (y.float().cpu(), x.grad.cpu(), fc.grad.float().cpu(),
                         proj.grad.float().cpu())
        assert fc.grad.is_contiguous() and proj.grad.is_contiguous()
    for got, want in zip(grads["cuda"], grads["cpu"]):
        _close(got, want, 3e-2)


@pytest.mark.parametrize("k, d, unused", [(1, 24, 0.0), (4, 4096, 0.0), (3, 1000, 0.3)])
def test_fused_gather_sum_matches_torch_ops(k, d, unused):
    from ssdfx.ops import cuda_kernels
    from ssdfx.ops.layout import sort_pairs
    from ssdfx.ops.torch_path import _inverse, _per_slot

    if not cuda_kernels.available():
        pytest.skip("Triton is not installed")
    t, e = 37, 5
    idx = torch.randint(0, e, (t, k))
    idx[torch.rand(t, k) < unused] = -1
    order, offsets = sort_pairs(idx.cuda(), e)
    pairs = int(offsets[-1])
    rows = torch.randn(pairs, d, device="cuda", dtype=torch.bfloat16)
    inv = _inverse(order, pairs)
    want = _per_slot(rows.float(), inv, t, k).sum(1)
    got = cuda_kernels.gather_sum(rows, inv, t, k)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1e-2)
    gate = torch.rand(t, k, device="cuda", dtype=torch.bfloat16)
    want = (_per_slot(rows.float(), inv, t, k) * gate.float().unsqueeze(2)).sum(1)
    n_rows = torch.full((1,), pairs, dtype=torch.int64, device="cuda")
    got = cuda_kernels.gather_sum(rows, inv, t, k, n_rows, gate)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("e, m, d, t, k, glu, bias, activation", [
    (1, 24, 40, 1, 1, False, True, "gelu"),  # E = 1, T = 1, widths no tile divides
    (5, 37, 51, 70, 5, True, True, "silu"),  # k = E, odd widths
    (16, 64, 256, 300, 4, False, False, "gelu_tanh"),  # several tiles per expert
    (8, 128, 512, 2000, 2, True, False, "relu2"),
])
def test_gathered_up_matches_float64_on_cuda(e, m, d, t, k, glu, bias, activation, dtype):
    from test_triton_interpreted import _layout, _reference

    if not cuda_kernels.available():
        pytest.skip("Triton is not installed")
    g = torch.Generator().manual_seed(e * 1000 + t)
    x = torch.randn(t, d, generator=g).to(dtype)
    w1 = (torch.randn(e * m, d, generator=g) / d ** 0.5).to(dtype)
    w3 = (torch.randn(d, e * m, generator=g) / d ** 0.5).to(dtype).t() if glu else None
    b1 = torch.randn(e * m, generator=g).to(dtype) if bias else None
    b3 = torch.randn(e * m, generator=g).to(dtype) if bias and glu else None
    order, offsets = _layout(g, e, t, k, unused=0.0, skew=False)
    cu = [v.cuda() if v is not None else None for v in (x, w1, b1, w3, b3, order, offsets)]
    got = gathered.up(*cu[:5], cu[5], cu[6], k, activation)
    want = _reference(x, w1, b1, w3, b3, order, offsets, k, activation)
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    for a, ref in zip(got, want):
        if ref is not None:
            bound = rel * (1 + ref.abs().max().item())
            assert (a.cpu().double() - ref).abs().max().item() <= bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("e, m, d, t, k, glu, activation", [
    (1, 24, 40, 1, 1, False, "gelu"),
    (5, 37, 51, 70, 5, True, "silu"),
    (16, 64, 256, 300, 4, False, "gelu_tanh"),
    (8, 128, 512, 2000, 2, True, "relu"),
])
def test_hidden_grad_matches_float64_on_cuda(e, m, d, t, k, glu, activation, dtype):
    from test_triton_interpreted import _layout, _hidden_grad_reference

    if not cuda_kernels.available():
        pytest.skip("Triton is not installed")
    g = torch.Generator().manual_seed(e * 1000 + t)
    dy = torch.randn(t, d, generator=g).to(dtype)
    w2 = (torch.randn(d, e * m, generator=g) / (e * m) ** 0.5).to(dtype)
    a1 = torch.randn(t * k, m, generator=g).to(dtype)
    a3 = torch.randn(t * k, m, generator=g).to(dtype) if glu else None
    gate = torch.rand(t, k, generator=g).to(dtype)
    order, offsets = _layout(g, e, t, k, unused=0.0, skew=False)
    cu = [v.cuda() if v is not None else None for v in (dy, w2, a1, a3, gate, order, offsets)]
    got = gathered.hidden_grad(*cu, k, activation)
    want = _hidden_grad_reference(dy, w2, a1, a3, gate, order, offsets, k, activation)
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    for a, ref in zip(got, want):
        if ref is not None:
            bound = rel * (1 + ref.abs().max().item())
            assert (a[:ref.shape[0]].cpu().double() - ref).abs().max().item() <= bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("e, m, d, t, k, neurons_first", [
    (1, 24, 40, 1, 1, True),
    (5, 37, 51, 70, 5, False),
    (16, 64, 256, 300, 4, True),
    (8, 128, 512, 2000, 2, False),
])
def test_weight_grad_matches_float64_on_cuda(e, m, d, t, k, neurons_first, dtype):
    from test_triton_interpreted import _layout, _weight_grad_reference

    if not cuda_kernels.available():
        pytest.skip("Triton is not installed")
    g = torch.Generator().manual_seed(e * 1000 + t)
    src = torch.randn(t, d, generator=g).to(dtype)
    h = torch.randn(t * k, m, generator=g).to(dtype)
    order, offsets = _layout(g, e, t, k, unused=0.0, skew=False)
    like = torch.empty((e * m, d) if neurons_first else (d, e * m), dtype=dtype, device="cuda")
    got = gathered.weight_grad(src.cuda(), h.cuda(), order.cuda(), offsets.cuda(), k, like,
                               neurons_first)
    want = _weight_grad_reference(src, h, order, offsets, k, neurons_first)
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    assert (got.cpu().double() - want).abs().max().item() <= rel * (1 + want.abs().max().item())
