"""The custom op's registrations and contract: opcheck, gradcheck, fake/export, FLOPs, errors.

Kernel-vs-reference property tests are in test_ops_kernels.py, GPU ones in test_ops_cuda.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck
from torch.utils.flop_counter import FlopCounterMode

from ssdfx.ops import BACKENDS, moe_ffn

CPU_BACKENDS = ["reference", "numba", "torch"]


def _problem(t=9, d=6, e=3, m=4, k=2, dtype=torch.float64, glu=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    f_all = e * m
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else \
        torch.zeros(0, k, dtype=torch.int64)
    return dict(
        x=rnd(t, d), w1=rnd(f_all, d), b1=rnd(f_all) if bias else None, w2=rnd(d, f_all),
        w3=rnd(f_all, d) if glu else None, b3=rnd(f_all) if glu and bias else None,
        expert_idx=idx, gate=torch.rand(t, k, generator=g, dtype=dtype), num_experts=e,
    )


def _call(p, backend, activation="gelu", dropout_p=0.0):
    return moe_ffn(p["x"], p["w1"], p["b1"], p["w2"], p["w3"], p["b3"], p["expert_idx"],
                   p["gate"], num_experts=p["num_experts"], activation=activation,
                   dropout_p=dropout_p, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("glu", [False, True])
def test_gradcheck_float64(backend, glu):
    p = _problem(glu=glu)
    p["expert_idx"][2, 0] = -1  # an unused slot
    names = [n for n in ("x", "w1", "b1", "w2", "w3", "b3", "gate") if p[n] is not None]
    inputs = tuple(p[n].requires_grad_() for n in names)

    def f(*ts):
        return _call({**p, **dict(zip(names, ts))}, backend, activation="silu")

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("backend", ["reference", "numba", "torch"])
def test_opcheck(backend):
    p = _problem(dtype=torch.float32)
    p["expert_idx"][0, 1] = -1
    for n in ("x", "w1", "b1", "w2", "w3", "b3", "gate"):
        p[n].requires_grad_()
    args = (p["x"], p["w1"], p["b1"], p["w2"], p["w3"], p["b3"], p["expert_idx"], p["gate"],
            None, p["num_experts"], "gelu", 0.0, backend)
    opcheck(torch.ops.ssdfx.moe_ffn.default, args)


def _dense(x, w1, b1, w2, w3, b3, act):
    h = act(F.linear(x, w1, b1))
    if w3 is not None:
        h = h * F.linear(x, w3, b3)
    return F.linear(h, w2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("glu", [False, True])
def test_all_experts_equals_dense_forward_and_grads(backend, glu):
    # the convert invariant: K == E and gates == 1 gives the dense FFN (fp32, atol 1e-5)
    e, m, d, t = 4, 16, 24, 33
    p = _problem(t=t, d=d, e=e, m=m, k=e, dtype=torch.float32, glu=glu, seed=1)
    p["gate"] = torch.ones(t, e)
    names = [n for n in ("x", "w1", "b1", "w2", "w3", "b3") if p[n] is not None]
    for n in ("w1", "w2", "w3"):  # nn.Linear-like scale, so fp32 rounding is what it is there
        if p[n] is not None:
            p[n] = p[n] / p[n].shape[1] ** 0.5
    leaves = {n: p[n].clone().requires_grad_() for n in names}
    dense_leaves = {n: p[n].clone().requires_grad_() for n in names}
    y = _call({**p, **leaves}, backend)
    args = [dense_leaves.get(n) for n in ("x", "w1", "b1", "w2", "w3", "b3")]
    y_dense = _dense(*args, F.gelu)
    torch.testing.assert_close(y, y_dense, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_dense.backward(dy)
    for n in names:
        torch.testing.assert_close(leaves[n].grad, dense_leaves[n].grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_transposed_weight_views_get_gradients_without_copies(backend):
    # HF GPT-2's Conv1D: the pass hands over c_fc.weight.t() and c_proj.weight.t()
    p = _problem(dtype=torch.float32, glu=False)
    conv_fc = p["w1"].t().contiguous().requires_grad_()  # (d, F) storage
    conv_proj = p["w2"].t().contiguous().requires_grad_()  # (F, d) storage
    y = moe_ffn(p["x"], conv_fc.t(), p["b1"], conv_proj.t(), None, None, p["expert_idx"],
                p["gate"], num_experts=p["num_experts"], activation="gelu", backend=backend)
    y.sum().backward()
    w1 = p["w1"].clone().requires_grad_()
    w2 = p["w2"].clone().requires_grad_()
    y_ref = moe_ffn(p["x"], w1, p["b1"], w2, None, None, p["expert_idx"], p["gate"],
                    num_experts=p["num_experts"], activation="gelu", backend="reference")
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(conv_fc.grad, w1.grad.t())
    torch.testing.assert_close(conv_proj.grad, w2.grad.t())
    # the gradient arrives in the parameter's own layout: AccumulateGrad stores it as is
    assert conv_fc.grad.is_contiguous() and conv_proj.grad.is_contiguous()


def test_leading_dims_and_unused_slots():
    p = _problem(t=12, dtype=torch.float32)
    p["expert_idx"][3] = -1  # a token with no expert at all gets y = 0
    y = _call(p, "numba")
    assert torch.all(y[3] == 0)
    p3 = {**p, "x": p["x"].view(3, 4, -1), "expert_idx": p["expert_idx"].view(3, 4, -1),
          "gate": p["gate"].view(3, 4, -1)}
    torch.testing.assert_close(_call(p3, "numba").reshape(12, -1), y)


def test_duplicate_experts_add_up():
    # documented behaviour: a duplicated expert is computed twice and both terms are added
    p = _problem(t=5, k=2, dtype=torch.float64)
    p["expert_idx"][:, 1] = p["expert_idx"][:, 0]
    p["gate"] = torch.ones(5, 2, dtype=torch.float64)
    single = {**p, "expert_idx": p["expert_idx"][:, :1], "gate": p["gate"][:, :1]}
    for backend in CPU_BACKENDS:
        torch.testing.assert_close(_call(p, backend), 2 * _call(single, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_reproducible_and_consistent(backend):
    p = _problem(t=20, dtype=torch.float64, glu=False)
    p["gate"].requires_grad_()
    torch.manual_seed(3)
    y1 = _call(p, backend, dropout_p=0.4)
    torch.manual_seed(3)
    y_ref = _call(p, "reference", dropout_p=0.4)
    torch.testing.assert_close(y1, y_ref)
    assert not torch.allclose(y1, _call(p, backend))  # the mask did something
    (g1,) = torch.autograd.grad(y1.sum(), p["gate"])
    (g_ref,) = torch.autograd.grad(y_ref.sum(), p["gate"])
    torch.testing.assert_close(g1, g_ref)


@pytest.mark.parametrize("backend, dtype", [("numba", torch.float32), ("torch", torch.float32),
                                            ("torch", torch.bfloat16), ("numba", torch.bfloat16)])
def test_eager_path_equals_the_custom_op_bit_for_bit(backend, dtype, monkeypatch):
    # plain eager CPU calls skip the custom op's dispatcher (ssdfx.ops.registry.EagerMoeFfn);
    # they must run the same kernels and give exactly the custom op's outputs and gradients
    import ssdfx.ops

    p = _problem(t=40, d=16, e=4, m=8, k=2, dtype=dtype)
    p["expert_idx"][3, 1] = -1
    names = [n for n in ("x", "w1", "b1", "w2", "w3", "b3", "gate") if p[n] is not None]
    dy = torch.randn(40, 16, dtype=dtype)

    def run():
        q = {**p, **{n: p[n].detach().clone().requires_grad_() for n in names}}
        torch.manual_seed(5)  # the dropout mask
        y = _call(q, backend, dropout_p=0.25)
        y.backward(dy)
        fn = y.grad_fn  # under the output's reshape
        return y, [q[n].grad for n in names], fn.name() + fn.next_functions[0][0].name()

    y_eager, g_eager, fn_eager = run()
    monkeypatch.setattr(ssdfx.ops, "plain_eager", lambda *ts: False)
    y_op, g_op, fn_op = run()
    assert "EagerMoeFfn" in fn_eager and "EagerMoeFfn" not in fn_op
    assert torch.equal(y_eager, y_op)
    for a, b in zip(g_eager, g_op):
        assert torch.equal(a, b)

# sum_by: how numba's launchers sum each token's K rows (pair rows or token blocks, forced)
@pytest.mark.parametrize("backend, dtype, sum_by", [
    ("numba", torch.float32, "pairs"), ("numba", torch.float32, "tokens"),
    ("torch", torch.bfloat16, None), ("numba", torch.bfloat16, "pairs")])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("shape", [(40, 4, 2), (0, 4, 2), (7, 1, 1), (9, 3, 3)])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_call_without_gradients_equals_the_custom_op(backend, dtype, dropout_p, glu, shape,
                                                     sum_by, activation, monkeypatch):
    # with nothing to differentiate (no_grad, or no input that needs a gradient) eager calls
    # run the kernels without the autograd Function (numba without dropout: its own launcher,
    # cpu_numba.infer); the output must be the op's, untracked; bit for bit except where
    # infer's fused kernel computes a GELU with numba's float32 formula
    import ssdfx.ops
    from ssdfx.ops import cpu_numba

    if sum_by is not None:
        monkeypatch.setattr(cpu_numba, "by_token_blocks", lambda *shape: sum_by == "tokens")
    t, e, k = shape
    p = _problem(t=t, d=16, e=e, m=8, k=k, dtype=dtype, glu=glu)
    if t > 3:
        p["expert_idx"][3, k - 1] = -1

    def run():
        torch.manual_seed(5)  # the dropout mask
        return _call(p, backend, activation=activation, dropout_p=dropout_p)

    with torch.no_grad():
        y_no_grad = run()
    y_plain = run()  # grad mode on, but no input requires a gradient
    p["w1"] = p["w1"].requires_grad_()
    y_tracked = run()
    monkeypatch.setattr(ssdfx.ops, "plain_eager", lambda *ts: False)
    with torch.no_grad():
        y_op = run()
    assert y_no_grad.grad_fn is None and y_plain.grad_fn is None
    assert y_tracked.grad_fn is not None
    assert torch.equal(y_tracked, y_op)
    fused_gelu = backend == "numba" and dropout_p == 0.0 and activation == "gelu"
    for y in (y_no_grad, y_plain):
        if fused_gelu:  # sums of terms up to max|y|: float32 rounding scales with them
            scale = float(y_op.abs().max()) if y_op.numel() else 0.0
            # bfloat16 (numba widened): the float32 difference may round to one bf16 step
            rel = 1e-5 if dtype == torch.float32 else 2.0 ** -7
            torch.testing.assert_close(y, y_op, rtol=0, atol=rel * (1 + scale))
        else:
            assert torch.equal(y, y_op)


@pytest.mark.parametrize("backend, dtype", [("numba", torch.float32), ("torch", torch.bfloat16),
                                            ("numba", torch.bfloat16)])
@pytest.mark.parametrize("padded_limit", [0, 1 << 30])
def test_output_can_be_modified_in_place_before_backward(backend, dtype, padded_limit,
                                                         monkeypatch):
    # a residual added in place or dropout(inplace=True) on the op's output: autograd refuses
    # that for a view made inside a custom Function, so the output must not be one
    from ssdfx.ops import padded

    monkeypatch.setattr(padded, "MAX_BUFFER_BYTES", padded_limit)
    p = _problem(t=40, d=16, e=4, m=8, k=2, dtype=dtype, glu=False)
    x = p["x"].requires_grad_()
    y = _call(p, backend)
    y.add_(1.0)
    F.dropout(y, 0.1, training=True, inplace=True).float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float32), ("numba", torch.float32),
                                            ("torch", torch.float32), ("torch", torch.bfloat16),
                                            ("numba", torch.bfloat16)])
def test_empty_batch(backend, dtype):
    # T=0 (an empty batch): an empty output and zero weight gradients (the bf16 torch path
    # failed in backward reshaping zero dgate rows)
    p = _problem(t=0, d=8, e=4, m=4, k=2, dtype=dtype, glu=False)
    for name in ("x", "w1", "w2"):
        p[name].requires_grad_()
    y = _call(p, backend, activation="relu")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert p["x"].grad.shape == (0, 8)
    assert not p["w1"].grad.any() and not p["w2"].grad.any()


def test_traced_and_counted_calls_see_the_custom_op():
    from ssdfx.ops.dispatch import plain_eager

    p = _problem(dtype=torch.float32)
    x = p["x"]
    assert plain_eager(x, torch.nn.Parameter(x), None)
    with FlopCounterMode(display=False):
        assert not plain_eager(x)
    assert not torch.func.vmap(lambda t: torch.tensor(plain_eager(t)))(x.unsqueeze(0)).item()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not plain_eager(torch.empty(2))


def test_flop_counter_counts_selected_pairs():
    p = _problem(t=10, d=8, e=4, m=6, k=2, dtype=torch.float32, glu=False)
    p["expert_idx"][0, 0] = -1
    p["expert_idx"][4] = -1
    p["x"].requires_grad_()
    pairs = 10 * 2 - 3
    with FlopCounterMode(display=False) as fc:
        _call(p, "numba").sum().backward()
    counts = fc.get_flop_counts()["Global"]
    fwd = pairs * 2 * (2 * 8 * 6)
    assert counts[torch.ops.ssdfx.moe_ffn] == fwd
    assert counts[torch.ops.ssdfx.moe_ffn_backward] == 2 * fwd


def test_fake_tensor_and_export():
    class Ffn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(8, 12)
            self.down = torch.nn.Linear(12, 8, bias=False)
            self.router = torch.nn.Linear(8, 3, bias=False)

        def forward(self, x):
            idx = self.router(x).topk(2, dim=-1).indices
            gate = torch.ones(idx.shape, dtype=x.dtype)
            return moe_ffn(x, self.up.weight, self.up.bias, self.down.weight, None, None, idx,
                           gate, num_experts=3, activation="relu")

    model = Ffn()
    x = torch.randn(2, 5, 8)
    ep = torch.export.export(model, (x,), strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.ssdfx.moe_ffn.default in targets
    torch.testing.assert_close(ep.module()(x), model(x))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fx = torch.empty(2, 5, 8)
        fake_model = Ffn()
        assert fake_model(fx).shape == (2, 5, 8)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_experts=5), "not divisible"),
        (dict(activation="swish"), "unsupported activation"),
        (dict(backend="fast"), "unknown backend"),
        (dict(dropout_p=1.0), "dropout_p"),
    ],
)
def test_bad_arguments_raise_value_error(change, message):
    p = _problem(dtype=torch.float32)
    kwargs = dict(num_experts=3, activation="gelu", backend="auto", dropout_p=0.0)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        moe_ffn(p["x"], p["w1"], p["b1"], p["w2"], p["w3"], p["b3"], p["expert_idx"],
                p["gate"], **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_of_range_expert_raises(backend):
    p = _problem(dtype=torch.float32)
    p["expert_idx"][1, 1] = 3
    with pytest.raises(ValueError, match="expert_idx"):
        _call(p, backend)


def _auto_bf16(monkeypatch, *spied):
    """A bf16 problem (T=40, an unused slot) with "auto" dispatching as where MKL's bf16 GEMM is
    native, and the names of the `cpu_numba` launchers in `spied` logged to `calls` when run."""
    from ssdfx.ops import blas, cpu_numba, dispatch

    if not blas.HAS_BF16_GEMM:
        pytest.skip("this torch build exports no MKL cblas_gemm_bf16bf16f32")
    p = _problem(t=40, d=16, e=4, m=8, k=2, dtype=torch.bfloat16)
    p["expert_idx"][3, 1] = -1
    calls = []
    for name in spied:
        real = getattr(cpu_numba, name)
        monkeypatch.setattr(cpu_numba, name,
                            lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    monkeypatch.setattr(dispatch, "_numba_bf16", lambda: True)
    monkeypatch.setattr(dispatch, "native_gemm", lambda dtype: True)
    return p, calls


def test_auto_bf16_inference_runs_numba_where_mkl_bf16_is_native(monkeypatch):
    # backend "auto", bf16 on CPU: calls with nothing to differentiate run numba's bf16 kernel
    # (cpu_numba.infer_bf16) where MKL's bf16 GEMM is native (blas.BF16); with AMX only up to
    # cpu_numba.BF16_MAX_EXPERT_BYTES (the torch path beyond it), with AVX-512-BF16 at any
    # size; backend="torch" and CPUs without a native bf16 GEMM always run the torch path
    from ssdfx.ops import blas, cpu_numba, dispatch

    p, calls = _auto_bf16(monkeypatch, "infer_bf16")
    by_torch = _call(p, "torch")
    assert not calls
    y = _call(p, "auto")
    assert len(calls) == 1 and y.dtype == torch.bfloat16
    up = {n: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
          for n, v in p.items()}
    want = _call(up, "reference")
    assert (y.float() - want).abs().max() <= 1e-2 * (1 + want.abs().max())
    assert not torch.equal(y, by_torch)  # a different kernel (fewer roundings) ran
    # an average expert's rows: T K / E = 20 of d = 16 bf16 values, 640 bytes
    monkeypatch.setattr(cpu_numba, "BF16_MAX_EXPERT_BYTES", 639)
    monkeypatch.setattr(blas, "BF16_AMX", False)  # AVX-512-BF16: no bound
    assert torch.equal(_call(p, "auto"), y) and len(calls) == 2
    monkeypatch.setattr(blas, "BF16_AMX", True)
    assert torch.equal(_call(p, "auto"), by_torch) and len(calls) == 2
    monkeypatch.setattr(cpu_numba, "BF16_MAX_EXPERT_BYTES", 640)
    assert torch.equal(_call(p, "auto"), y) and len(calls) == 3
    p["x"] = p["x"].requires_grad_()  # training: forward_bf16, the same kernel, the same y
    assert torch.equal(_call(p, "auto").detach(), y) and len(calls) == 3
    p["x"] = p["x"].detach()
    monkeypatch.setattr(dispatch, "_numba_bf16", lambda: False)
    assert torch.equal(_call(p, "auto"), by_torch) and len(calls) == 3
    with torch.no_grad():
        monkeypatch.setattr(dispatch, "_numba_bf16", lambda: True)
        assert _call(p, "auto").shape == y.shape and len(calls) == 4
        empty = {**p, "x": p["x"][:0], "expert_idx": p["expert_idx"][:0], "gate": p["gate"][:0]}
        assert _call(empty, "auto").shape == (0, 16) and len(calls) == 5
        p["expert_idx"][1, 1] = 4
        with pytest.raises(ValueError, match="expert_idx"):
            _call(p, "auto")


def test_auto_bf16_training_runs_numba_where_mkl_bf16_is_native(monkeypatch):
    # backend "auto", bf16 on CPU, calls that record gradients: numba's bf16 training kernels
    # (cpu_numba.forward_bf16, backward_bf16) where blas.BF16, dropout included, under the same
    # size bound as inference with AMX; the torch path past the bound and for backend="torch".
    # Gradients against the float32 reference; opcheck through the custom op.
    from ssdfx.ops import blas, cpu_numba

    p, calls = _auto_bf16(monkeypatch, "forward_bf16", "backward_bf16")
    names = ("x", "w1", "b1", "w2", "w3", "b3", "gate")
    dy = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))

    def grads(q, backend, dropout_p=0.0):
        leaves = {n: q[n].detach().clone().requires_grad_() for n in names}
        y = _call({**q, **leaves}, backend, dropout_p=dropout_p)
        y.backward(dy.to(y.dtype))
        return [y.detach()] + [leaves[n].grad for n in names]

    by_torch = grads(p, "torch")
    assert not calls
    got = grads(p, "auto")
    assert calls == ["forward_bf16", "backward_bf16"]
    up = {n: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
          for n, v in p.items()}
    want = grads(up, "reference")
    for name, a, b, t in zip(("y",) + names, got, want, by_torch):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape, name
        assert (a.float() - b).abs().max() <= 2e-2 * (1 + b.abs().max()), name
        assert (t.float() - b).abs().max() <= 3e-2 * (1 + b.abs().max()), name
    assert not torch.equal(got[1], by_torch[1])  # a different kernel (fewer roundings) ran
    torch.manual_seed(0)  # dropout: the same keep mask for both (drawn before the kernels)
    dropped = grads(p, "auto", dropout_p=0.3)
    assert len(calls) == 4
    torch.manual_seed(0)
    for name, a, b in zip(("y",) + names, dropped, grads(up, "reference", dropout_p=0.3)):
        assert (a.float() - b).abs().max() <= 2e-2 * (1 + b.abs().max()), name
    # an average expert's rows: T K / E = 20 of d = 16 bf16 values, 640 bytes
    monkeypatch.setattr(cpu_numba, "BF16_MAX_EXPERT_BYTES", 639)
    monkeypatch.setattr(blas, "BF16_AMX", True)
    past = grads(p, "auto")
    assert len(calls) == 4 and all(torch.equal(a, b) for a, b in zip(past, by_torch))
    monkeypatch.setattr(blas, "BF16_AMX", False)  # AVX-512-BF16: no bound
    assert all(torch.equal(a, b) for a, b in zip(grads(p, "auto"), got)) and len(calls) == 6
    for n in names:
        p[n].requires_grad_()
    args = (p["x"], p["w1"], p["b1"], p["w2"], p["w3"], p["b3"], p["expert_idx"], p["gate"],
            None, p["num_experts"], "gelu", 0.0, "auto")
    opcheck(torch.ops.ssdfx.moe_ffn.default, args)
    assert "backward_bf16" in calls[6:]


def test_backend_dtype_mismatch_raises():
    p = _problem(dtype=torch.complex64)
    with pytest.raises(ValueError, match="numba"):
        _call(p, "numba")
    assert "auto" in BACKENDS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_widens_to_numba_only_without_a_native_gemm(dtype, monkeypatch):
    # backend "auto", bf16/fp16 on CPU: the torch path where torch multiplies that dtype
    # natively, the float32 numba kernels (ssdfx.ops.widened) where it has no native GEMM
    # (AVX2-only CPUs: 1-3 GFLOP/s); "numba" asked for explicitly widens everywhere
    from ssdfx.ops import dispatch, widened

    p = _problem(t=40, d=16, e=4, m=8, k=2, dtype=dtype)
    real = dispatch.native_gemm
    # float32/float64 are always native (and asking is no error); the answer is a bool
    assert real(torch.float32) is True and real(torch.float64) is True
    assert isinstance(real(dtype), bool)
    monkeypatch.setattr(dispatch, "_numba_bf16", lambda: False)
    for native in (True, False):
        monkeypatch.setattr(dispatch, "native_gemm", lambda dt: native)
        kernels = dispatch.select("auto", p["x"], p["w1"], 4)
        assert (kernels.forward is widened.forward) == (not native)
        assert dispatch.select("numba", p["x"], p["w1"], 4).forward is widened.forward
        # only CPU tensors of a reduced dtype widen
        assert dispatch.widens(p["x"]) == (not native)
        assert not dispatch.widens(p["x"].float()) and not dispatch.widens(p["x"].to("meta"))
    assert dispatch.select("auto", p["x"].float(), p["w1"].float(), 4).name == "numba"


def test_autocast_casts_inputs_and_grads_reach_fp32_weights():
    p = _problem(t=12, d=8, e=2, m=8, k=1, dtype=torch.float32, glu=False)
    w1 = p["w1"].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe_ffn(p["x"], w1, p["b1"], p["w2"], None, None, p["expert_idx"], p["gate"],
                    num_experts=2, activation="gelu")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w1.grad is not None and w1.grad.dtype == torch.float32
    ref = _call({**p, "w3": None, "b3": None}, "reference")
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)


def test_threads_follow_torch_and_import_leaves_them_alone():
    # numba.set_num_threads can reset torch's count (numba issue 9387): importing ssdfx and
    # running the numba kernels must leave torch.get_num_threads() as the user set it.
    code = textwrap.dedent(
        """
        import torch
        torch.set_num_threads(1)
        import ssdfx.ops
        from ssdfx.ops import moe_ffn, cpu_numba
        assert torch.get_num_threads() == 1, torch.get_num_threads()
        x = torch.randn(16, 8)
        w1, w2 = torch.randn(12, 8), torch.randn(8, 12)
        idx = torch.randint(0, 3, (16, 1))
        moe_ffn(x, w1, None, w2, None, None, idx, torch.ones(16, 1), num_experts=3,
                activation="relu", backend="numba")
        assert torch.get_num_threads() == 1, torch.get_num_threads()
        assert cpu_numba.num_workers() == 1
        import numba  # the op ran its regions on one numba thread and gave the pool back
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
        assert torch.get_num_threads() == 1, torch.get_num_threads()
        torch.set_num_threads(2)
        moe_ffn(x, w1, None, w2, None, None, idx, torch.ones(16, 1), num_experts=3,
                activation="relu", backend="numba")
        assert torch.get_num_threads() == 2
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=_repo_root())
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_numba_phase_runs_one_blas_thread_and_restores_the_counts():
    # Workers call BLAS concurrently, so inside a numba phase every OpenBLAS library runs one
    # thread when the kernels call OpenBLAS (with torch's MKL, `gemm` sets that per call and
    # the phase leaves them alone); afterwards the user's counts are back. Read independently
    # with threadpoolctl.
    threadpoolctl = pytest.importorskip("threadpoolctl")
    numba = pytest.importorskip("numba")
    from ssdfx.ops import blas, cpu_numba

    def blas_threads():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]

    cpu_numba._blas_libraries()  # loads SciPy's BLAS, so it is among those read
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        assert before and set(before) == {2}
        numba_before = numba.get_num_threads()
        with cpu_numba._numba_phase(1):
            assert blas_threads() == ([1] * len(before) if blas.LIBRARY == "openblas" else before)
            # numba's regions start only the op's workers (idle pool threads stall the barrier
            # when their core is busy)
            assert numba.get_num_threads() == 1
        assert blas_threads() == before and numba.get_num_threads() == numba_before
        x = torch.randn(16, 8)
        moe_ffn(x, torch.randn(12, 8), None, torch.randn(8, 12), None, None,
                torch.randint(0, 3, (16, 1)), torch.ones(16, 1), num_experts=3,
                activation="relu", backend="numba")
        assert blas_threads() == before


def test_blas_choice_follows_mkls_code_path_and_rejects_bad_settings():
    # "auto": MKL where it runs its Intel code paths (an Intel CPU, or MKL told so), else
    # OpenBLAS; MKL's bf16 GEMM is used where it multiplies bf16 natively
    from ssdfx.ops.blas import _choose, _choose_small, _native_bf16

    assert _choose("auto", True, True) == "mkl"
    assert _choose("", True, True) == "mkl"
    assert _choose("auto", True, False) == "openblas"
    assert _choose("auto", False, True) == "openblas"
    assert _choose(" MKL ", True, False) == "mkl"
    assert _choose("openblas", True, True) == "openblas"
    with pytest.raises(ValueError, match="SSDFX_BLAS='blis' is not one of auto, mkl, openblas"):
        _choose("blis", True, True)
    with pytest.raises(RuntimeError, match="exports no MKL sgemm_.*SSDFX_BLAS=openblas"):
        _choose("mkl", False, True)
    for flags in ({"avx512f", "amx_bf16"}, {"avx512f", "avx512_bf16"}):
        assert _native_bf16(True, True, flags)
        assert not _native_bf16(True, False, flags)  # MKL's AVX2 code: float32 speed
        assert not _native_bf16(False, True, flags)
    assert not _native_bf16(True, True, {"avx2", "avx512f", "avx512bw"})
    # GEMMs with few output rows: MKL under "auto" wherever it exists, else the one library
    assert _choose_small("auto", "openblas", True) == "mkl"
    assert _choose_small("", "mkl", True) == "mkl"
    assert _choose_small("auto", "openblas", False) == "openblas"
    assert _choose_small("OpenBLAS", "openblas", True) == "openblas"
    assert _choose_small("mkl", "mkl", True) == "mkl"


def test_mkl_intel_path_is_detected_through_a_preloaded_library(tmp_path):
    # bench/mkl_intel_path.c preloaded: MKL runs its Intel code paths (on an AMD CPU too),
    # ssdfx sees it (MKL_INTEL_PATH, so the kernels take MKL), and where the CPU has
    # AVX-512-BF16 or AMX the numba bf16 inference and training run MKL's native bf16 GEMM and
    # equal the float64 reference within bf16 rounding; without the preload MKL_INTEL_PATH is
    # what MKL itself answers
    pytest.importorskip("numba")
    from ssdfx.ops import blas

    if blas._mkl_addresses() is None:
        pytest.skip("this torch build has no MKL")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the preloaded library")
    shim = tmp_path / "mkl_intel_path.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(shim),
                    str(Path(__file__).parents[1] / "bench" / "mkl_intel_path.c")], check=True)
    code = textwrap.dedent(
        """
        import ctypes, glob, os, sys, torch
        from ssdfx.ops import blas, cpu_numba, reference
        lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib",
                                                 "libtorch_cpu.*"))[0])
        own = lib.mkl_serv_intel_cpu_true() == 1 or blas._cpuinfo("vendor_id") == "GenuineIntel"
        preloaded = "LD_PRELOAD" in os.environ
        assert blas.MKL_INTEL_PATH == (preloaded or own), (blas.MKL_INTEL_PATH, own)
        assert blas.LIBRARY == ("mkl" if blas.MKL_INTEL_PATH else "openblas"), blas.LIBRARY
        flags = set(blas._cpuinfo("flags").split())
        assert blas.BF16 == (blas.HAS_BF16_GEMM and blas.MKL_INTEL_PATH
                             and bool(flags & {"amx_bf16", "avx512_bf16"}))
        if blas.HAS_BF16_GEMM:
            torch.manual_seed(0)
            t, d, e, m, k = 300, 96, 8, 40, 2
            x = torch.randn(t, d).bfloat16()
            w1 = (torch.randn(e * m, d) / d ** 0.5).bfloat16()
            w2 = (torch.randn(d, e * m) / (e * m) ** 0.5).bfloat16()
            b1, b3 = torch.randn(e * m).bfloat16(), torch.randn(d).bfloat16()
            idx = torch.randn(t, e).topk(k, dim=1).indices
            gate = torch.rand(t, k).bfloat16()
            y = cpu_numba.infer_bf16(x, w1, b1, w2, None, b3, idx, gate, e, "gelu")
            f64 = [v.double() for v in (x, w1, b1, w2)]
            want = reference.forward(*f64, None, b3.double(), idx, gate.double(), None, e,
                                     "gelu", 0.0)[0]
            err = (y.double() - want).abs().max() / want.abs().max()
            assert err < 1e-2, err
            # training: forward_bf16 and backward_bf16 against the float64 reference's
            # gradients on the kernel's own saved pre-activations
            fwd = cpu_numba.forward_bf16(x, w1, b1, w2, None, None, idx, gate, None, e, "gelu",
                                         0.0)
            dy = torch.randn(t, d).bfloat16()
            got = cpu_numba.backward_bf16(dy, x, w1, w2, None, gate, None, *fwd[1:], e, "gelu",
                                          0.0)
            ref = reference.backward(dy.double(), *f64[:2], f64[3], None, gate.double(), None,
                                     fwd[1].double(), fwd[2].double(), fwd[3], fwd[4], e,
                                     "gelu", 0.0)
            for a, b in zip(got, ref):
                assert a.shape == b.shape
                if b.numel():  # dw3, db3: none without GLU
                    assert (a.double() - b).abs().max() <= 2e-2 * (1 + b.abs().max())
        print("ok", blas.MKL_INTEL_PATH, blas.BF16)
        """
    )
    outs = []
    for preload in (False, True):
        env = {n: v for n, v in os.environ.items() if n not in ("LD_PRELOAD", "SSDFX_BLAS")}
        if preload:
            env["LD_PRELOAD"] = str(shim)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outs.append(done.stdout.split())
    assert outs[1][:2] == ["ok", "True"]


@pytest.mark.parametrize("library", ["openblas", "mkl", "auto"])
def test_each_blas_computes_the_gemm_and_the_op(library):
    # Each library the kernels can call, in its own process (the choice is made once), and
    # "auto", which on a non-Intel CPU with MKL calls MKL for GEMMs with few output rows and
    # OpenBLAS for the rest: gemm on every operand layout against float64 numpy, with output
    # row counts on both sides of SMALL_GEMM_ROWS, MKL's per-thread count restored after each
    # call, and the numba op's forward and gradients against the reference backend.
    pytest.importorskip("numba")
    from ssdfx.ops.blas import _mkl_addresses

    if library == "mkl" and _mkl_addresses() is None:
        pytest.skip("this torch build has no MKL")
    code = textwrap.dedent(
        """
        import ctypes, glob, os, numpy as np, torch
        from numba import njit
        from ssdfx.ops import blas, moe_ffn
        if os.environ["SSDFX_BLAS"] == "auto":
            assert blas.SMALL_LIBRARY == ("mkl" if blas.HAS_MKL else blas.LIBRARY)
        else:
            assert blas.LIBRARY == blas.SMALL_LIBRARY == os.environ["SSDFX_BLAS"], blas.LIBRARY

        @njit(["void(f4[:, :], f4[:, :], f4[:, :], f8)", "void(f8[:, :], f8[:, :], f8[:, :], f8)"])
        def run(a, b, c, beta):  # any layout (one compilation per dtype)
            blas.gemm(a, b, c, beta)

        rng = np.random.default_rng(0)
        for rows in (7, blas.SMALL_GEMM_ROWS, blas.SMALL_GEMM_ROWS + 5):
            for dt, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
                a0, b0 = rng.standard_normal((rows, 5)), rng.standard_normal((5, 6))
                c0 = rng.standard_normal((rows, 6))
                for a in (a0.astype(dt), np.asfortranarray(a0.astype(dt)),
                          rng.standard_normal((rows + 2, 11)).astype(dt)[1:rows + 1, 2:7]):
                    a0 = a.astype(np.float64)
                    for b in (b0.astype(dt), b0.T.astype(dt).copy().T):
                        for c in (c0.astype(dt).copy(), np.asfortranarray(c0.astype(dt))):
                            ref = a0 @ b0 + 0.5 * c.astype(np.float64)
                            run(a, b, c, 0.5)
                            assert np.abs(c - ref).max() < tol * 10, (dt, np.abs(c - ref).max())
        if "mkl" in (blas.LIBRARY, blas.SMALL_LIBRARY):
            a, b, c = (np.ones(s, np.float32) for s in ((7, 5), (5, 6), (7, 6)))
            lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib",
                                                     "libtorch_cpu.*"))[0])
            lib.MKL_Set_Num_Threads_Local(3)
            run(a, b, c, 0.0)
            assert lib.MKL_Set_Num_Threads_Local(0) == 3  # gemm gave the thread its count back

        torch.manual_seed(0)
        t, d, e, m, k = 40, 24, 4, 8, 2
        args = [torch.randn(t, d), torch.randn(e * m, d), torch.randn(e * m),
                torch.randn(d, e * m), torch.randn(e * m, d), torch.randn(e * m)]
        for x in args:
            x.requires_grad_(True)
        idx = torch.randn(t, e).topk(k, dim=1).indices
        gate = torch.rand(t, k, requires_grad=True)
        outs = []
        # the numba op in float32 against the reference in float64; the gradients of
        # y.square().sum() reach 1e5-1e6 with cancellation in some entries, so the bound is
        # relative to each tensor's largest entry (float32 kernels measured 1e-7 to 4e-7 of it,
        # with OpenBLAS on an AMD Zen 4; an elementwise rtol failed there on one entry of 768)
        for backend, dt in (("numba", torch.float32), ("reference", torch.float64)):
            inputs = [x.detach().to(dt).requires_grad_(True) for x in args + [gate]]
            y = moe_ffn(*inputs[:-1], idx, inputs[-1], num_experts=e, activation="silu",
                        backend=backend)
            grads = torch.autograd.grad(y.square().sum(), inputs)
            outs.append((y, *grads))
        for got, want in zip(*outs):
            assert got.dtype == torch.float32 and want.dtype == torch.float64
            err = (got.double() - want).abs().max() / want.abs().max()
            assert err < 4e-6, float(err)
        print("ok")
        """
    )
    env = dict(os.environ, SSDFX_BLAS=library)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=_repo_root(), env=env)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def _repo_root():
    import pathlib

    return str(pathlib.Path(__file__).resolve().parents[1])
