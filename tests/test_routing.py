"""Routers and selection."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import models
import ssdfx
from ssdfx.stats import expert_mass, observe
from ssdfx.routing import (CentroidRouter, centroids, fit_temperature, select_dynamic_k, select_top_k,
                           train_mlp_router)
from ssdfx.stability import routed_coverage


@pytest.mark.parametrize("rows", [6, 300])  # torch.topk; numba's top-k (>= 256 rows)
def test_top_k_gate_is_one_forward_and_softmax_backward(rows):
    g = torch.Generator().manual_seed(rows)
    scores = torch.randn(2, rows, 8, generator=g, requires_grad=True)
    idx, gate = select_top_k(scores, 3)
    assert torch.equal(gate.detach(), torch.ones(2, rows, 3))
    w = torch.randn(2, rows, 3, generator=g)
    (gate * w).sum().backward()
    # reference: gradient of sum(w * softmax(scores)[idx]), in float64
    s2 = scores.detach().double().requires_grad_(True)
    (torch.softmax(s2, -1).gather(-1, idx) * w.double()).sum().backward()
    torch.testing.assert_close(scores.grad, s2.grad.float())
    assert torch.equal(idx.sort(-1).values, scores.topk(3, -1).indices.sort(-1).values)
    # without autograd (inference): the same experts, gates of exactly one
    with torch.no_grad():
        idx_ng, gate_ng = select_top_k(scores, 3)
    assert torch.equal(idx_ng, idx) and torch.equal(gate_ng, torch.ones(2, rows, 3))


@settings(max_examples=40, deadline=None)
@given(e=st.integers(1, 8), cap=st.integers(1, 8), cov=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_dynamic_k_takes_the_fewest_experts(e, cap, cov, seed):
    cap = min(cap, e)
    scores = torch.randn(5, e, generator=torch.Generator().manual_seed(seed)) * 2
    idx, gate = select_dynamic_k(scores, cov, cap)
    probs = torch.softmax(scores, -1)
    for t in range(5):
        # brute force: sort by prob, take while the mass so far is below the target
        order = probs[t].argsort(descending=True).tolist()
        want, total = [], 0.0
        for j in order[:cap]:
            if total >= cov:
                break
            want.append(j)
            total += probs[t, j].item()
        got = [j for j in idx[t].tolist() if j >= 0]
        assert got == want
        assert torch.equal(gate[t] > 0, idx[t] >= 0)


@settings(max_examples=30, deadline=None)
@given(e=st.integers(1, 64), k_frac=st.floats(0.0, 1.0), rows=st.sampled_from([1, 7, 300, 2100]),
       lead=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       coarse=st.booleans(), seed=st.integers(0, 1000))
def test_numba_top_k_equals_torch_topk(e, k_frac, rows, lead, dtype, coarse, seed):
    from ssdfx.ops.cpu_numba import top_k_indices

    k = max(1, round(k_frac * e))
    shape = (2, rows, e) if lead else (rows, e)
    scores = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3
    if coarse:  # few distinct values: ties inside and across the top k's boundary in most rows
        scores = scores.round()
    probs = torch.softmax(scores, -1)
    want = probs.topk(k, dim=-1)  # largest first
    idx = top_k_indices(probs, k)
    assert idx.shape == want.indices.shape and idx.dtype == torch.int64
    assert torch.equal(idx, want.indices)
    # and the selections built on it agree with torch.topk's
    i2, g2 = select_top_k(scores, k)
    assert torch.equal(i2.sort(-1).values, want.indices.sort(-1).values)
    assert torch.equal(g2, torch.ones_like(g2, dtype=torch.float32))


def test_numba_top_k_takes_ambiguous_rows_from_torch_and_declines_traced_tensors():
    from torch.utils.flop_counter import FlopCounterMode

    from ssdfx.ops import cpu_numba

    probs = torch.softmax(torch.randn(300, 8, generator=torch.Generator().manual_seed(0)), -1)
    rows = {
        3: [0.1, float("nan"), 0.2, 0.0, 0.0, 0.3, 0.1, 0.2],  # NaN counts as largest
        5: [0.1, 0.3, 0.3, 0.05, 0.05, 0.1, 0.1, 0.0],  # two equal largest values
        7: [0.9, 0.8, 0.1, 0.7, 0.7, 0.05, 0.05, 0.0],  # a tie across the top 3's boundary
        9: [0.9, 0.8, 0.7, 0.1, 0.1, 0.05, 0.05, 0.0],  # ties below the top 3 only
    }
    for t, row in rows.items():
        probs[t] = torch.tensor(row)
    for k in (1, 3, 8):
        want = probs.topk(k, dim=-1).indices
        assert torch.equal(cpu_numba.top_k_indices(probs, k), want), k
    # the kernel itself flags exactly the ambiguous rows (k = 1 has a path of its own)
    import numpy as np

    for k, flagged in ((1, {3, 5}), (2, {3, 5}), (3, {3, 5, 7}), (8, {3, 5, 7, 9})):
        idx, bad = np.empty((300, k), np.int64), np.empty(300, np.bool_)
        n_bad = cpu_numba._kernels().top_k_serial(probs.numpy(), k, idx, bad)
        assert set(np.flatnonzero(bad).tolist()) == flagged and n_bad == len(flagged), k
    # the same in the calling thread (few rows) and on numba's threads (many)
    many = probs.repeat(8, 1)
    assert many.shape[0] >= cpu_numba.TOP_K_PARALLEL_ROWS
    for k in (1, 3, 8):
        assert torch.equal(cpu_numba.top_k_indices(many, k), many.topk(k, dim=-1).indices), k
    # not for tensors a kernel must not read: under a dispatch mode, bf16, no rows, wide
    with FlopCounterMode(display=False):
        assert cpu_numba.top_k_indices(probs, 3) is None
    assert cpu_numba.top_k_indices(probs.bfloat16(), 3) is None
    assert cpu_numba.top_k_indices(probs[:0], 3) is None
    wide = torch.softmax(torch.randn(300, cpu_numba.TOP_K_MAX_EXPERTS + 1), -1)
    assert cpu_numba.top_k_indices(wide, 3) is None


def test_dynamic_k_through_numba_equals_through_torch(monkeypatch):
    from ssdfx.ops import cpu_numba

    scores = torch.randn(2, 300, 16, generator=torch.Generator().manual_seed(1)) * 2
    fast = select_dynamic_k(scores, 0.7, 4)
    monkeypatch.setattr(cpu_numba, "TOP_K_MAX_EXPERTS", 0)  # torch.topk everywhere
    slow = select_dynamic_k(scores, 0.7, 4)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert (fast[0] == -1).any() and (fast[0][..., 0] >= 0).all()


def test_centroids_are_normalised_mean_rows():
    w = torch.randn(12, 5)
    c = centroids(w, 3)
    rows = F.normalize(w, dim=1)
    for e in range(3):
        torch.testing.assert_close(c[e], F.normalize(rows[4 * e: 4 * e + 4].mean(0), dim=0))


def test_router_reads_a_detached_input():
    r = CentroidRouter(torch.randn(4, 8))
    x = torch.randn(3, 8, requires_grad=True)
    r(x).sum().backward()
    assert x.grad is None and r.weight.grad is not None


def test_fit_temperature_recovers_a_known_one():
    logits = torch.randn(2000, 8) * 2
    mass = torch.softmax(logits, -1)
    t = fit_temperature(logits * 4.0, mass)
    assert t == pytest.approx(4.0, rel=0.1)


def test_mlp_router_learns_which_experts_carry_the_mass():
    model, kwargs, _ = models.gpt2("relu")
    kwargs = dict(input_ids=torch.randint(0, models.VOCAB, (8, 32), generator=torch.Generator().manual_seed(1)))
    st = observe(model.eval(), [kwargs])["transformer.h.0.mlp.c_fc.weight"]
    perm = torch.arange(st.site.d_ff)
    mass = expert_mass(st.mass, perm, 8)
    router = train_mlp_router(st.x, mass, steps=400)
    with torch.no_grad():
        idx_mlp, _ = select_top_k(router(st.x), 2)
    idx_rand = torch.stack([torch.randperm(8)[:2] for _ in range(st.x.shape[0])])
    assert routed_coverage(st.mass, perm, 8, idx_mlp) > routed_coverage(st.mass, perm, 8, idx_rand) + 0.05


def test_convert_with_mlp_router_and_dynamic_k():
    model, kwargs, _ = models.gpt2("relu")
    model.eval()
    stats = observe(model, [kwargs])
    ssdfx.convert(model, num_experts=4, top_k=4, router="mlp", dynamic_k=0.9, stats=stats,
                  partition="kmeans")
    code = model.transformer.h[0].mlp.code
    assert "select_dynamic_k" in code
    out = model(**kwargs)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.transformer.h[0].mlp.ssdfx_router.net[0].weight.grad is not None
    ssdfx.revert(model)


def test_dynamic_k_with_full_coverage_is_dense():
    model, kwargs, _ = models.gpt2("relu")
    model.eval()
    ref = models.output_of(model, kwargs)
    stats = observe(model, [kwargs])
    ssdfx.convert(model, num_experts=4, top_k=4, dynamic_k=1.0, stats=stats)
    # with target 1.0, a token stops only once the experts before hold all predicted mass
    torch.testing.assert_close(models.output_of(model, kwargs), ref, atol=1e-4, rtol=1e-4)


def test_dynamic_k_validated():
    model, _, _ = models.gpt2()
    with pytest.raises(ValueError, match="dynamic_k"):
        ssdfx.convert(model, num_experts=4, top_k=2, dynamic_k=1.5)
    with pytest.raises(ValueError, match="needs activation statistics"):
        ssdfx.convert(model, num_experts=4, top_k=2, dynamic_k=0.9)


def test_mlp_router_can_be_built_under_no_grad():
    """Inference code converts under torch.no_grad(); fitting the MLP router still works."""
    model, kwargs, _ = models.gpt2("relu")
    stats = observe(model.eval(), [kwargs])
    with torch.no_grad():
        ssdfx.convert(model, num_experts=4, top_k=2, router="mlp", stats=stats)
        assert torch.isfinite(models.output_of(model, kwargs)).all()


@pytest.mark.parametrize("dtype, native", [(torch.float32, True), (torch.bfloat16, True),
                                           (torch.bfloat16, False)])
@pytest.mark.parametrize("kind", ["centroid", "mlp"])
def test_router_takes_the_dtype_of_the_ffn_weights(dtype, native, kind, monkeypatch):
    # a bf16 model's router reads bf16 x as it is (no float32 copy of the input per call):
    # its parameters are in the weights' dtype, its scores come out in it, and the centroid
    # router's scores are those of the centroids of the dense weights (each expert's 16
    # normalised rows averaged and normalised, by hand, then rounded to the dtype), within that
    # dtype's rounding of a d=32 dot product. Where torch has no native bf16 GEMM (`native`
    # False, ssdfx.ops.dispatch.native_gemm) its matrix products run in float32 instead.
    from torch.utils._python_dispatch import TorchDispatchMode

    from ssdfx.ops import dispatch

    class GemmDtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                seen.add(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(dispatch, "native_gemm", lambda dt: native)
    torch.manual_seed(0)
    ffn = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(),
                              torch.nn.Linear(128, 32)).to(dtype)
    x = torch.randn(64, 32).to(dtype)
    stats = observe(ffn, [(x,)]) if kind == "mlp" else None
    w1 = ffn[0].weight.detach().float().clone()
    ssdfx.convert(ffn, num_experts=8, top_k=2, router=kind, stats=stats)
    router = ffn[0].ssdfx_router
    assert {p.dtype for p in router.parameters()} == {dtype}
    seen = set()
    with torch.no_grad(), GemmDtypes():
        scores = router(x)
    assert seen == {dtype if native else torch.float32}
    with torch.no_grad():
        assert scores.dtype == dtype and ffn(x).dtype == dtype
        # fx keeps the dtype check inside one node (a traced branch would fail)
        assert torch.equal(torch.fx.symbolic_trace(router)(x), scores)
    if kind == "centroid":
        c = F.normalize(F.normalize(w1.double(), dim=1).view(8, 16, 32).mean(1), dim=1)
        want = x.double() @ c.to(dtype).double().t()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(scores.double(), want, rtol=tol, atol=tol)
