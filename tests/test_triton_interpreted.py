"""The Triton kernels (`ssdfx.ops._triton`) on CPU, through Triton's interpreter: the gathered
up-projection and hidden-unit gradient (`ssdfx.ops.gathered`) against float64 references
directly and inside the grouped_mm backend against the op's reference, forward and every
gradient; the combine (`cuda_kernels.gather_sum`) against torch ops. The same
kernels compile for the GPU in bench/cuda_check.py and tests/test_ops_cuda.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssdfx.activations import ACTIVATIONS
from ssdfx.ops import cuda_kernels, gathered, grouped
from ssdfx.ops.layout import hidden, hidden_backward, sort_pairs

from test_ops_kernels import FUSED_SPECS, _patched, check_against_reference

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"),
                                reason="torch._grouped_mm missing")


@pytest.fixture
def interpreted(monkeypatch):
    """Triton's interpreter on, and grouped_mm's forward taking the kernel on CPU; yields the
    list of the kernel's calls."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []

    def counting(fn):
        def call(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        return call

    with _patched(gathered, GATHERED_DEVICES=("cpu",), up=counting(gathered.up),
                  hidden_grad=counting(gathered.hidden_grad),
                  weight_grad=counting(gathered.weight_grad)):
        yield calls


def _per_expert(offsets, fn, width):
    """(P, width) float64: rows [s, t) of each expert e from fn(e, s, t) (no (P, m, d) copy
    of the weights: the CUDA tests call this at P = 4000)."""
    bounds = offsets.tolist()
    out = torch.zeros(bounds[-1], width, dtype=torch.float64)
    for e, (s, t) in enumerate(zip(bounds[:-1], bounds[1:])):
        if s < t:
            out[s:t] = fn(e, s, t)
    return out


def _reference(x, w1, b1, w3, b3, order, offsets, k, activation, keep=None, dropout_p=0.0):
    """a1, a3, h of the layout's P rows in float64 (`layout.hidden` for h)."""
    e = offsets.shape[0] - 1
    m = w1.shape[0] // e
    pairs = int(offsets[-1])
    xs = x.double()[order[:pairs] // k]

    def up(w, b):
        we = w.double().reshape(e, m, -1)
        be = b.double().reshape(e, m) if b is not None else torch.zeros(e, m,
                                                                         dtype=torch.float64)
        return _per_expert(offsets, lambda i, s, t: xs[s:t] @ we[i].t() + be[i], m)

    a1 = up(w1, b1)
    a3 = up(w3, b3) if w3 is not None else None
    kp = keep.reshape(-1, a1.shape[1])[order[:pairs]] if keep is not None else None
    return a1, a3, hidden(a1, a3, kp, dropout_p, activation)


def _layout(g, e, t, k, unused, skew):
    """order, offsets of random routing: k distinct experts a token, or with `skew` experts
    0..k-1 for every token (the others empty); a share `unused` of slots -1."""
    idx = (torch.arange(k).repeat(t, 1) if skew
           else torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]))
    idx[torch.rand(t, k, generator=g) < unused] = -1
    return sort_pairs(idx, e)


def _assert_rows_close(got, want, pairs, rel):
    """The first `pairs` rows of each output within rel * (1 + max |want|) of the float64
    reference (None: no such output)."""
    for a, ref in zip(got, want):
        assert (a is None) == (ref is None)
        if ref is not None and pairs:
            bound = rel * (1 + ref.abs().max().item())
            assert (a[:pairs].double() - ref).abs().max().item() <= bound


@settings(max_examples=25, deadline=None)
@given(e=st.integers(1, 6), m=st.integers(1, 40), d=st.integers(1, 40), t=st.integers(1, 40),
       kk=st.integers(1, 6), glu=st.booleans(), bias=st.booleans(),
       unused=st.sampled_from([0.0, 0.0, 0.4]), skew=st.booleans(),
       activation=st.sampled_from(sorted(ACTIVATIONS)), dropout_p=st.sampled_from([0.0, 0.3]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_gathered_up_matches_float64(e, m, d, t, kk, glu, bias, unused, skew, activation,
                                     dropout_p, dtype, seed):
    # odd widths, E=1, k=E, T=1, empty experts (skew), unused slots, transposed weights
    k = min(kk, e)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g).to(dtype)
    w1 = (torch.randn(d, e * m, generator=g) / d ** 0.5).to(dtype).t()  # Conv1D strides
    w3 = (torch.randn(e * m, d, generator=g) / d ** 0.5).to(dtype) if glu else None
    b1 = torch.randn(e * m, generator=g).to(dtype) if bias else None
    b3 = torch.randn(e * m, generator=g).to(dtype) if bias and glu else None
    order, offsets = _layout(g, e, t, k, unused, skew)
    keep = torch.rand(t, k, m, generator=g) >= dropout_p if dropout_p else None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        a1, a3, h = gathered.up(x, w1, b1, w3, b3, order, offsets, k, activation, keep,
                                dropout_p)
    pairs = int(offsets[-1])
    want = _reference(x, w1, b1, w3, b3, order, offsets, k, activation, keep, dropout_p)
    assert a1.shape == h.shape == (t * k, m) and (a3 is None) == (not glu)
    assert all(a.dtype == dtype for a in (a1, h, *([a3] if glu else [])))
    _assert_rows_close((a1, a3, h), want, pairs, 1e-5 if dtype == torch.float32 else 2e-2)


def _hidden_grad_reference(dy, w2, a1, a3, gate, order, offsets, k, activation, keep=None,
                           dropout_p=0.0):
    """dgate, gh, da1, da3 of the layout's P rows in float64 (`layout.hidden_backward` on
    dh = dy[token] w2_e)."""
    e = offsets.shape[0] - 1
    m = w2.shape[1] // e
    pairs = int(offsets[-1])
    sel = order[:pairs]
    dys = dy.double()[sel // k]
    w2e = w2.double().t().reshape(e, m, -1)  # (E, m, d)
    dh = _per_expert(offsets, lambda i, s, t: dys[s:t] @ w2e[i].t(), m)
    kp = keep.reshape(-1, m)[sel] if keep is not None else None
    return hidden_backward(dh, gate.double().reshape(-1)[sel], a1[:pairs].double(),
                           a3[:pairs].double() if a3 is not None else None, kp, dropout_p,
                           activation)


@settings(max_examples=25, deadline=None)
@given(e=st.integers(1, 6), m=st.integers(1, 40), d=st.integers(1, 40), t=st.integers(1, 40),
       kk=st.integers(1, 6), glu=st.booleans(), unused=st.sampled_from([0.0, 0.0, 0.4]),
       skew=st.booleans(), activation=st.sampled_from(sorted(ACTIVATIONS)),
       dropout_p=st.sampled_from([0.0, 0.3]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_hidden_grad_matches_float64(e, m, d, t, kk, glu, unused, skew, activation, dropout_p,
                                     dtype, seed):
    k = min(kk, e)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(t, d, generator=g).to(dtype)
    w2 = (torch.randn(e * m, d, generator=g) / (e * m) ** 0.5).to(dtype).t()  # Conv1D strides
    a1 = torch.randn(t * k, m, generator=g).to(dtype)
    a3 = torch.randn(t * k, m, generator=g).to(dtype) if glu else None
    gate = torch.rand(t, k, generator=g).to(dtype)
    order, offsets = _layout(g, e, t, k, unused, skew)
    keep = torch.rand(t, k, m, generator=g) >= dropout_p if dropout_p else None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        got = gathered.hidden_grad(dy, w2, a1, a3, gate, order, offsets, k, activation, keep,
                                   dropout_p)
    pairs = int(offsets[-1])
    want = _hidden_grad_reference(dy, w2, a1, a3, gate, order, offsets, k, activation, keep,
                                  dropout_p)
    assert got[0].shape == (t * k,) and (got[3] is None) == (not glu)
    assert (got[0][pairs:] == 0).all()  # unused slots: no gate gradient
    assert all(a.dtype == dtype for a in got if a is not None)
    _assert_rows_close(got, want, pairs, 1e-5 if dtype == torch.float32 else 2e-2)


def _weight_grad_reference(src, h, order, offsets, k, neurons_first):
    """In float64: per expert sum over its rows of h[r]^T src[token], in w1's (F, d) or w2's
    (d, F) layout; zeros for experts without rows."""
    e = offsets.shape[0] - 1
    m, d = h.shape[1], src.shape[1]
    bounds = offsets.tolist()
    srcs = src.double()[order[:bounds[-1]] // k]
    per_expert = torch.zeros(e, m, d, dtype=torch.float64)
    for i, (s, t) in enumerate(zip(bounds[:-1], bounds[1:])):
        per_expert[i] = h[s:t].double().t() @ srcs[s:t]
    if neurons_first:
        return per_expert.reshape(e * m, d)
    return per_expert.permute(2, 0, 1).reshape(d, e * m)


@settings(max_examples=25, deadline=None)
@given(e=st.integers(1, 6), m=st.integers(1, 40), d=st.integers(1, 40), t=st.integers(1, 40),
       kk=st.integers(1, 6), neurons_first=st.booleans(), transposed=st.booleans(),
       unused=st.sampled_from([0.0, 0.0, 0.4]), skew=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_weight_grad_matches_float64(e, m, d, t, kk, neurons_first, transposed, unused, skew,
                                     dtype, seed):
    k = min(kk, e)
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(t, d, generator=g).to(dtype)
    h = torch.randn(t * k, m, generator=g).to(dtype)
    shape = (e * m, d) if neurons_first else (d, e * m)
    like = torch.empty(shape[::-1], dtype=dtype).t() if transposed else torch.empty(shape,
                                                                                   dtype=dtype)
    order, offsets = _layout(g, e, t, k, unused, skew)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        got = gathered.weight_grad(src, h, order, offsets, k, like, neurons_first)
    want = _weight_grad_reference(src, h, order, offsets, k, neurons_first)
    assert got.shape == shape and got.stride() == like.stride() and got.dtype == dtype
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.double() - want).abs().max().item() <= rel * (1 + want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", FUSED_SPECS, ids=[s["activation"] for s in FUSED_SPECS])
def test_grouped_mm_with_gathered_up_matches_reference(spec, dtype, interpreted):
    # every activation, GLU, bias, unused slots, empty experts, dropout masks
    check_against_reference("grouped_mm", spec, dtype, 1e-4 if dtype == torch.float32 else 3e-2)
    assert interpreted == ["up", "hidden_grad"] + ["weight_grad"] * (3 if spec["glu"] else 2)


def test_grouped_mm_with_gathered_up_edge_shapes(interpreted):
    base = dict(m=8, d=16, glu=True, bias=True, unused=0.0, skew=False, seed=3,
                activation="silu", dropout_p=0.0)
    for shape in (dict(e=1, t=1, k=1), dict(e=4, t=9, k=4), dict(e=8, t=3, k=2)):
        check_against_reference("grouped_mm", {**base, **shape}, torch.bfloat16, 3e-2)
        check_against_reference("grouped_mm", {**base, **shape}, torch.float32, 1e-4,
                                transposed=True)
    assert interpreted == (["up", "hidden_grad"] + ["weight_grad"] * 3) * 6


def test_gathered_up_is_opt_in(monkeypatch):
    x = torch.randn(4, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert grouped is not None and not gathered.usable(x)  # no device listed
    with _patched(gathered, GATHERED_DEVICES=("cpu",)):
        assert not gathered.usable(x)  # a CPU tensor needs the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert gathered.usable(x)


@pytest.mark.parametrize("k, d, unused, gated", [(1, 24, 0.0, False), (4, 300, 0.0, True),
                                                 (3, 17, 0.3, True)])
def test_gather_sum_matches_torch_ops(k, d, unused, gated, monkeypatch):
    from ssdfx.ops.torch_path import _inverse, _per_slot

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    t, e = 37, 5
    g = torch.Generator().manual_seed(k * 100 + d)
    idx = torch.randint(0, e, (t, k), generator=g)
    idx[torch.rand(t, k, generator=g) < unused] = -1
    order, offsets = sort_pairs(idx, e)
    pairs = int(offsets[-1])
    rows = torch.randn(t * k, d, generator=g).to(torch.bfloat16)  # rows >= P: not read
    inv = _inverse(order, pairs)
    gate = torch.rand(t, k, generator=g).to(torch.bfloat16) if gated else None
    per_slot = _per_slot(rows[:pairs].double(), inv, t, k)  # zeros for unused slots
    want = (per_slot * gate.double().unsqueeze(2) if gated else per_slot).sum(1)
    got = cuda_kernels.gather_sum(rows, inv, t, k, offsets[e:], gate)
    assert got.dtype == torch.bfloat16 and got.shape == (t, d)
    # float32 sums converted to bf16 once: within one bf16 unit of the float64 sum (on a GPU
    # the conversion rounds to nearest, half a unit; the interpreter truncates)
    assert ((got.double() - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all()


def test_every_activation_has_a_kernel_code():
    assert set(gathered.ACT_CODES) == set(ACTIVATIONS)
    assert len(set(gathered.ACT_CODES.values())) == len(ACTIVATIONS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zero_empty_writes_only_empty_experts(dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    counts = torch.tensor([3, 0, 5, 0, 0, 1])  # experts 1, 3 and 4 have no rows
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    out = torch.full((6, 7, 300), float("nan"), dtype=dtype)  # 2100 values an expert
    out[counts > 0] = torch.randn(3, 7, 300).to(dtype)
    before = out.clone()
    assert gathered.zero_empty(out, offsets) is out
    assert (out[counts == 0] == 0).all()
    assert torch.equal(out[counts > 0], before[counts > 0])
