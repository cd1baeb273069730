"""Property tests: every CPU kernel equals the reference, forward and every gradient.

Kernels are called directly (forward, then backward on the reference's saved layout), so each
example checks y, the saved layout, and dx, dw1, db1, dw2, dw3, db3, dgate.

Tolerances: float32 kernels against the float32 reference: |a - ref| <= 1e-4 * (1 + max|ref|)
(only the summation order differs). bfloat16 kernels against the float32 reference run on the
same bf16-rounded inputs: |a - ref| <= 3e-2 * (1 + max|ref|) (bf16 keeps 8 mantissa bits; the
hidden activations are rounded once more before the down-projection).
"""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ssdfx.activations import ACTIVATIONS
from ssdfx.ops import reference
from ssdfx.ops.dispatch import select
from ssdfx.ops.grouped import grouped_mm_ok

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def problems(draw, align=1):
    e = draw(st.sampled_from([1, 2, 3, 4, 8]))
    m = align * draw(st.integers(1, 5))
    d = align * draw(st.integers(1, 9))
    t = draw(st.integers(1, 24))
    k = draw(st.integers(1, e))
    glu = draw(st.booleans())
    bias = draw(st.booleans())
    unused = draw(st.floats(0.0, 0.5))  # share of -1 slots (dynamic-k padding)
    skew = draw(st.booleans())  # route most tokens to expert 0: many empty experts
    seed = draw(st.integers(0, 2**31 - 1))
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    dropout_p = draw(st.sampled_from([0.0, 0.0, 0.3]))
    return dict(e=e, m=m, d=d, t=t, k=k, glu=glu, bias=bias, unused=unused, skew=skew,
                seed=seed, activation=activation, dropout_p=dropout_p)


def make(spec, dtype):
    g = torch.Generator().manual_seed(spec["seed"])
    e, m, d, t, k = spec["e"], spec["m"], spec["d"], spec["t"], spec["k"]
    f_all = e * m

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    if spec["skew"]:
        idx = torch.stack([torch.arange(k) for _ in range(t)])  # experts >= k get no token
    else:
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    idx[torch.rand(t, k, generator=g) < spec["unused"]] = -1
    keep = None
    if spec["dropout_p"] > 0:
        keep = torch.rand(t, k, m, generator=g) >= spec["dropout_p"]
    return dict(
        x=rnd(t, d), w1=rnd(f_all, d, scale=d ** -0.5),
        b1=rnd(f_all) if spec["bias"] else None, w2=rnd(d, f_all, scale=f_all ** -0.5),
        w3=rnd(f_all, d, scale=d ** -0.5) if spec["glu"] else None,
        b3=rnd(f_all) if spec["glu"] and spec["bias"] else None,
        expert_idx=idx, gate=torch.rand(t, k, generator=g).to(dtype), keep=keep,
        dy=rnd(t, d),
    )


def _upcast(p):
    return {n: (v.float() if v is not None and v.is_floating_point() else v) for n, v in p.items()}


def _close(actual, expected, rel, scale=0.0):
    """|actual - expected| <= rel * (1 + max(scale, max |expected|)) everywhere; scale: the size
    of the terms the values are sums of (`_term_scales`), where they may cancel."""
    expected = expected.to(actual.dtype) if actual.dtype == torch.float64 else expected
    diff = (actual.float() - expected.float()).abs().max() if actual.numel() else 0.0
    size = max(scale, float(expected.float().abs().max()) if expected.numel() else 0.0)
    bound = rel * (1.0 + size)
    assert diff <= bound, f"max |diff| {float(diff):.3g} > {float(bound):.3g} (term scale {scale:.3g})"


def run(kernels, p, spec):
    e, act, pdrop = spec["e"], spec["activation"], spec["dropout_p"]
    fwd = kernels.forward(p["x"], p["w1"], p["b1"], p["w2"], p["w3"], p["b3"], p["expert_idx"],
                          p["gate"], p["keep"], e, act, pdrop)
    _, a1, a3, order, offsets = fwd
    bwd = kernels.backward(p["dy"], p["x"], p["w1"], p["w2"], p["w3"], p["gate"], p["keep"], a1,
                           a3, order, offsets, e, act, pdrop)
    return fwd, bwd


def check_against_reference(backend, spec, dtype, rel, transposed=False):
    """backend: a backend name for `dispatch.select`, or a `dispatch.Kernels`; transposed: the
    weights as transposed views of their storage (HF Conv1D's layout), same values."""
    p = make(spec, dtype)
    if transposed:
        p.update({n: p[n].t().contiguous().t() for n in ("w1", "w2", "w3") if p[n] is not None})
    ref_p = _upcast(p)
    reference = select("reference", ref_p["x"], ref_p["w1"], spec["e"])
    kernels = (select(backend, p["x"], p["w1"], spec["e"]) if isinstance(backend, str)
               else backend)
    ref_fwd, _ = run(reference, ref_p, spec)
    fwd, bwd = run(kernels, p, spec)
    assert torch.equal(fwd[3], ref_fwd[3]) and torch.equal(fwd[4], ref_fwd[4])  # layout
    pairs = int(ref_fwd[4][-1])
    scale = _term_scales(ref_p, spec, fwd[1].float(), fwd[2].float(), fwd[3], fwd[4])
    _close(fwd[0], ref_fwd[0], rel, scale["y"])
    for name, got, want in zip(("a1", "a3"), fwd[1:3], ref_fwd[1:3]):  # rows < P are defined
        assert got.shape == want.shape
        _close(got[:pairs], want[:pairs], rel, scale[name])
    # the reference backward runs on the kernel's own saved pre-activations: in bf16 a ReLU
    # input rounded to the other side of zero would otherwise flip a whole derivative
    e, act, pdrop = spec["e"], spec["activation"], spec["dropout_p"]
    ref_bwd = reference.backward(ref_p["dy"], ref_p["x"], ref_p["w1"], ref_p["w2"], ref_p["w3"],
                                 ref_p["gate"], p["keep"], fwd[1].float(), fwd[2].float(),
                                 fwd[3], fwd[4], e, act, pdrop)
    names = ["dx", "dw1", "db1", "dw2", "dw3", "db3", "dgate"]
    assert all(t.dtype == dtype for t in (*fwd[:3], *bwd))  # in the inputs' dtype
    for name, got, want in zip(names, bwd, ref_bwd):
        assert got.shape == want.shape, name
        if name in ("dw1", "dw2", "dw3") and got.numel():
            assert got.stride() == p[name[1:]].stride(), name  # weight strides kept
        _close(got, want, rel, scale[name])


def _term_scales(ref_p, spec, a1, a3, order, offsets):
    """For each output, the largest sum of |terms| behind one of its elements.

    Every output is a sum of products (y over neurons, dgate over neurons, weight gradients over
    tokens, dx over experts and neurons). Rounding errors scale with the terms, not with the
    sum: in bf16, terms of size 20 can cancel to a gate gradient of 2 and leave an error of
    0.1. So the tolerance is rel * (1 + this scale), computed like the reference kernel but on
    absolute values (and |act'|), in float32, from the kernel's own a1 and a3.
    """
    from ssdfx.activations import activation_backward

    e, k, m, act = spec["e"], spec["k"], spec["m"], spec["activation"]
    glu = spec["glu"]
    ab = {n: (v.abs() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for n, v in ref_p.items()}
    y, dx = torch.zeros_like(ab["x"]), torch.zeros_like(ab["x"])
    out = {n: 0.0 for n in ("dw1", "db1", "dw2", "dw3", "db3", "dgate")}
    bounds = offsets.tolist()
    for ex in range(e):
        s, t = bounds[ex], bounds[ex + 1]
        if s == t:
            continue
        cols = slice(ex * m, (ex + 1) * m)
        pairs = order[s:t]
        tok = pairs // k
        xs, dys, g = ab["x"][tok], ab["dy"][tok], ab["gate"].reshape(-1)[pairs].unsqueeze(1)
        f = ACTIVATIONS[act](a1[s:t]).abs()
        d1 = activation_backward(act, torch.ones_like(a1[s:t]), a1[s:t]).abs()
        ks = 1.0
        if ref_p["keep"] is not None:
            ks = ref_p["keep"].reshape(-1, m)[pairs].float() / (1.0 - spec["dropout_p"])
        h = (f * a3[s:t].abs() if glu else f) * ks
        dh = dys @ ab["w2"][:, cols]  # (n, m)
        y.index_add_(0, tok, (g * h) @ ab["w2"][:, cols].t())
        out["dgate"] = max(out["dgate"], float((dh * h).sum(1).max()))
        out["dw2"] = max(out["dw2"], float((dys.t() @ (g * h)).max()))
        da1 = dh * g * ks * (a3[s:t].abs() if glu else 1.0) * d1
        dx.index_add_(0, tok, da1 @ ab["w1"][cols])
        out["dw1"] = max(out["dw1"], float((da1.t() @ xs).max()))
        out["db1"] = max(out["db1"], float(da1.sum(0).max()))
        if glu:
            da3 = dh * g * ks * f
            dx.index_add_(0, tok, da3 @ ab["w3"][cols])
            out["dw3"] = max(out["dw3"], float((da3.t() @ xs).max()))
            out["db3"] = max(out["db3"], float(da3.sum(0).max()))
    up = ab["x"] @ ab["w1"].t() + (ab["b1"] if ab["b1"] is not None else 0.0)
    up3 = ab["x"] @ ab["w3"].t() + (ab["b3"] if ab["b3"] is not None else 0.0) if glu else up
    return dict(out, y=float(y.max()), dx=float(dx.max()), a1=float(up.max()),
                a3=float(up3.max()) if glu else 0.0)


@SETTINGS
@given(problems())
@example(dict(e=1, m=3, d=5, t=1, k=1, glu=False, bias=True, unused=0.0, skew=False, seed=0,
              activation="gelu", dropout_p=0.0))
@example(dict(e=4, m=2, d=7, t=6, k=4, glu=True, bias=True, unused=0.0, skew=False, seed=1,
              activation="silu", dropout_p=0.0))
@example(dict(e=8, m=2, d=3, t=5, k=1, glu=False, bias=False, unused=0.0, skew=True, seed=2,
              activation="relu", dropout_p=0.0))
@example(dict(e=3, m=2, d=3, t=4, k=2, glu=True, bias=False, unused=1.0, skew=False, seed=3,
              activation="gelu_tanh", dropout_p=0.3))
def test_numba_fp32_matches_reference(spec):
    check_against_reference("numba", spec, torch.float32, 1e-4)


def _sum_by(sum_by):
    # force how the numba launchers sum each token's K rows: "pairs" (a (P, d) buffer: fwd,
    # bwd) or "tokens" (token blocks: fwd_tokens, bwd with by_tokens);
    # cpu_numba.by_token_blocks picks otherwise
    from ssdfx.ops import cpu_numba

    return _patched(cpu_numba, by_token_blocks=lambda *shape: sum_by == "tokens")


@SETTINGS
@given(problems(), st.sampled_from(["pairs", "tokens"]))
@example(dict(e=4, m=2, d=7, t=6, k=4, glu=True, bias=True, unused=0.0, skew=False, seed=1,
              activation="silu", dropout_p=0.0), "pairs")
@example(dict(e=3, m=2, d=3, t=4, k=2, glu=True, bias=False, unused=1.0, skew=False, seed=3,
              activation="gelu_tanh", dropout_p=0.3), "tokens")
@example(dict(e=1, m=3, d=5, t=1, k=1, glu=False, bias=True, unused=0.0, skew=False, seed=0,
              activation="gelu", dropout_p=0.0), "tokens")
def test_numba_both_token_sums_match_reference(spec, sum_by):
    # both ways of summing each token's rows (forward's y, backward's dx), whichever the
    # problem's size would pick
    with _sum_by(sum_by):
        check_against_reference("numba", spec, torch.float32, 1e-4)


@settings(SETTINGS, max_examples=15)  # ~1.7 s each; the suite must stay within CI's budget
@given(problems(), st.sampled_from(["pairs", "tokens"]), st.sampled_from([1, 2, 3]))
@example(dict(e=3, m=2, d=3, t=9, k=2, glu=True, bias=True, unused=0.3, skew=True, seed=3,
              activation="gelu_tanh", dropout_p=0.3), "tokens", 2)
@example(dict(e=2, m=3, d=4, t=7, k=2, glu=False, bias=True, unused=0.0, skew=False, seed=4,
              activation="gelu", dropout_p=0.0), "pairs", 3)
def test_numba_experts_in_chunks_match_reference(spec, sum_by, chunk):
    # the kernels take an expert's rows `chunk` at a time (cpu_numba.chunk_rows: 512 KiB of
    # gathered rows, so no tiny problem is ever split unless forced): training forward, every
    # gradient and the inference call, with chunks that do not divide the experts' row counts
    from ssdfx.ops import cpu_numba

    with _sum_by(sum_by), _patched(cpu_numba, chunk_rows=lambda *shape: chunk):
        check_against_reference("numba", spec, torch.float32, 1e-4)
        check_inference_against_reference(spec, torch.float32)


def test_chunk_rows_bounds_the_gathered_block():
    # 512 KiB of gathered rows, but never fewer than 8 m rows (the weight block is repacked
    # by BLAS for every chunk)
    from ssdfx.ops.cpu_numba import CHUNK_BYTES, chunk_rows

    assert chunk_rows(256, 32, 4) * 256 * 4 == CHUNK_BYTES  # 512 rows
    assert chunk_rows(768, 192, 4) == 8 * 192  # 170 rows of 3 KB would repack too often
    assert chunk_rows(256, 32, 8) == 256
    assert chunk_rows(10**7, 0, 4) == 1


def test_even_step_splits_rows_into_the_fewest_equal_pieces():
    from ssdfx.ops.numba_kernels import even_step

    for n in range(0, 60):
        for chunk in range(1, 20):
            step = even_step(n, chunk)
            sizes = [min(step, n - q) for q in range(0, n, step)]
            assert sum(sizes) == n and max(sizes, default=0) <= chunk
            assert len(sizes) == -(-n // chunk)  # as few GEMMs as whole chunks would take
            assert not sizes or sizes[0] - sizes[-1] < len(sizes)
    assert even_step(4096, 3072) == 2048


@pytest.mark.parametrize("sum_by", ["pairs", "tokens"])
@pytest.mark.parametrize("threads", [1, 2])
def test_numba_token_sums_with_one_and_two_workers(sum_by, threads):
    # token blocks split the tokens over the workers (one worker: all of them; two: T=13
    # tokens split unevenly) and each worker takes a sub-range of every expert's pairs; unused
    # slots and experts nobody chose included
    spec = dict(e=4, m=3, d=5, t=13, k=3, glu=True, bias=True, unused=0.3, skew=True, seed=7,
                activation="silu", dropout_p=0.0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _sum_by(sum_by):
            check_against_reference("numba", spec, torch.float32, 1e-4)
    finally:
        torch.set_num_threads(before)


@SETTINGS
@given(problems(), st.sampled_from([torch.float32, torch.float64]),
       st.sampled_from(["pairs", "tokens"]))
@example(dict(e=4, m=2, d=7, t=6, k=4, glu=True, bias=True, unused=0.0, skew=False, seed=1,
              activation="gelu", dropout_p=0.0), torch.float32, "pairs")
@example(dict(e=8, m=2, d=3, t=5, k=1, glu=False, bias=False, unused=0.0, skew=True, seed=2,
              activation="silu", dropout_p=0.0), torch.float32, "tokens")
@example(dict(e=3, m=2, d=3, t=4, k=2, glu=True, bias=False, unused=1.0, skew=False, seed=3,
              activation="relu", dropout_p=0.0), torch.float64, "tokens")
def test_numba_inference_call_matches_reference(spec, dtype, sum_by):
    # cpu_numba.infer: the forward of calls with nothing to differentiate (one numba call
    # after the routing, with numba's activations; both ways of summing per token)
    with _sum_by(sum_by):
        check_inference_against_reference(spec, dtype)


# bfloat16 inference kernel (`cpu_numba.infer_bf16`) against the float32 reference on the same
# bf16 inputs: it rounds the hidden units and y once each (2^-9 relative each), so a tighter
# bound than the torch path's 3e-2, which rounds four times
_BF16_INFER_REL = 1e-2
# the bf16 training kernels round a1 (a3), the hidden units, da1 (da3) and gate * h once each
# before a product, and each output once: the same bound
_BF16_TRAIN_REL = 1e-2


def check_inference_against_reference(spec, dtype):
    """The inference call's y against the reference forward: `cpu_numba.infer` for float32
    (reference in float32) and float64, `cpu_numba.infer_bf16` for bfloat16 (reference in
    float32 on the same bf16 inputs)."""
    from ssdfx.ops import cpu_numba

    p = make(spec, dtype)
    ref_p = _upcast(p) if dtype != torch.float64 else p
    e, act = spec["e"], spec["activation"]
    want = reference.forward(ref_p["x"], ref_p["w1"], ref_p["b1"], ref_p["w2"], ref_p["w3"],
                             ref_p["b3"], p["expert_idx"], ref_p["gate"], None, e, act, 0.0)
    infer = cpu_numba.infer_bf16 if dtype == torch.bfloat16 else cpu_numba.infer
    y = infer(p["x"], p["w1"], p["b1"], p["w2"], p["w3"], p["b3"], p["expert_idx"], p["gate"],
              e, act)
    assert y.dtype == dtype and y.shape == p["x"].shape
    scale = _term_scales(_upcast(p), spec, want[1].float(), want[2].float(), want[3], want[4])
    rel = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: _BF16_INFER_REL}[dtype]
    _close(y, want[0], rel, scale["y"])


def _bf16_gemm():
    from ssdfx.ops.blas import HAS_BF16_GEMM

    if not HAS_BF16_GEMM:
        pytest.skip("this torch build exports no MKL cblas_gemm_bf16bf16f32")


@SETTINGS
@given(problems(), st.sampled_from([None, 1, 2, 3]))
@example(dict(e=1, m=3, d=5, t=1, k=1, glu=False, bias=True, unused=0.0, skew=False, seed=0,
              activation="gelu", dropout_p=0.0), None)
@example(dict(e=4, m=2, d=7, t=6, k=4, glu=True, bias=True, unused=0.0, skew=False, seed=1,
              activation="silu", dropout_p=0.0), 2)
@example(dict(e=8, m=2, d=3, t=5, k=1, glu=False, bias=False, unused=0.0, skew=True, seed=2,
              activation="relu", dropout_p=0.0), None)
@example(dict(e=3, m=2, d=3, t=4, k=2, glu=True, bias=False, unused=1.0, skew=False, seed=3,
              activation="gelu_tanh", dropout_p=0.0), 1)
def test_numba_bf16_inference_matches_reference(spec, chunk):
    # cpu_numba.infer_bf16 (MKL's bf16 GEMM, float32 in between): E=1, k=E, T=1, odd d,
    # experts nobody chose, unused slots, GLU, every activation; chunk forces an expert's rows
    # to be taken 1-3 at a time in both phases (None: the real chunk size)
    from ssdfx.ops import cpu_numba

    _bf16_gemm()
    patch = (_patched(cpu_numba, chunk_rows=lambda *shape: chunk) if chunk
             else contextlib.nullcontext())
    with patch:
        check_inference_against_reference(spec, torch.bfloat16)


@SETTINGS
@given(problems(), st.sampled_from([None, 1, 2, 3]), st.sampled_from(["numba", "torch"]),
       st.booleans())
@example(dict(e=1, m=3, d=5, t=1, k=1, glu=False, bias=True, unused=0.0, skew=False, seed=0,
              activation="gelu", dropout_p=0.0), None, "numba", False)
@example(dict(e=4, m=2, d=7, t=6, k=4, glu=True, bias=True, unused=0.0, skew=False, seed=1,
              activation="silu", dropout_p=0.0), 2, "numba", True)
@example(dict(e=8, m=2, d=3, t=5, k=1, glu=False, bias=False, unused=0.0, skew=True, seed=2,
              activation="relu", dropout_p=0.0), None, "torch", False)
@example(dict(e=3, m=2, d=3, t=4, k=2, glu=True, bias=False, unused=1.0, skew=False, seed=3,
              activation="gelu_tanh", dropout_p=0.0), 1, "numba", False)
@example(dict(e=4, m=3, d=5, t=9, k=2, glu=True, bias=True, unused=0.2, skew=False, seed=4,
              activation="gelu", dropout_p=0.3), 2, "numba", True)
@example(dict(e=4, m=3, d=5, t=9, k=2, glu=False, bias=True, unused=0.0, skew=False, seed=5,
              activation="relu", dropout_p=0.3), None, "torch", False)
@example(dict(e=8, m=1, d=8, t=8, k=8, glu=True, bias=True, unused=0.0, skew=False, seed=975,
              activation="relu2", dropout_p=0.0), None, "torch", False)  # K=8 slots in bf16
def test_numba_bf16_training_matches_reference(spec, chunk, forward_by, transposed):
    # cpu_numba.forward_bf16 / backward_bf16 (MKL's bf16 GEMM, float32 in between; what "auto"
    # trains with where blas.BF16): forward, saved layout and every gradient. E=1, k=E, T=1,
    # odd d, experts nobody chose, unused slots, GLU, dropout, every activation; chunk forces an
    # expert's rows to be taken 1-3 at a time (the weight gradients then add up chunks);
    # forward_by "torch": the backward on the torch path's saved layout (the "auto" backend
    # pairs them where dropout or AMX's size bound sends the forward there); transposed:
    # Conv1D's weight layout, whose gradients the kernel writes in that layout
    from ssdfx.ops import cpu_numba, torch_path
    from ssdfx.ops.dispatch import Kernels

    _bf16_gemm()
    forward = cpu_numba.forward_bf16 if forward_by == "numba" else torch_path.forward
    kernels = Kernels("numba", forward, cpu_numba.backward_bf16)
    patch = (_patched(cpu_numba, chunk_rows=lambda *shape: chunk) if chunk
             else contextlib.nullcontext())
    with patch:
        check_against_reference(kernels, spec, torch.bfloat16, _BF16_TRAIN_REL, transposed)


def test_round_bf16_equals_torch_conversion():
    # every float32 class: ties to even in both directions, subnormals, the largest finite
    # values (which round to infinity past bf16's range), infinities and NaNs
    import numpy as np
    from numba import njit

    from ssdfx.ops.numba_bf16 import round_bf16

    @njit
    def run(src, dst):
        round_bf16(src, dst)

    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (200000,), generator=g, dtype=torch.int64)
    ties = torch.arange(0, 1 << 16, dtype=torch.int64) << 16 | 0x8000  # exactly halfway
    edges = torch.tensor([0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00000001, 0x007FFFFF,
                          0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF,
                          0x80000000, 0], dtype=torch.int64)
    for b in (bits, ties, edges, -ties):
        x = b.to(torch.int32).view(torch.float32)
        out = np.empty(x.numel(), np.uint16)
        run(x.numpy(), out)
        want = x.to(torch.bfloat16)
        got = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


# largest |numba - exact| / max(1, |exact|) allowed for the float32 activations of the fused
# inference kernel (measured: 2.1e-7 for GELU, whose erfc formula is good to 1.5e-7, and
# 1.2e-7 for the others; torch's own float32 functions: 1.0e-6 and 1.2-1.5e-7)
_ACT_BOUND32 = {"gelu": 2.5e-7}


def _activation_inputs():
    # a grid, values near 0, the float32 exp's range ends (|z| = 87-88), far tails up to
    # float32's largest number (where a sigmoid's 1 - s must vanish), and NaN last
    far = [1e11, 1e15, 1e30, 3e38]
    return torch.cat([torch.linspace(-30, 30, 300001), torch.linspace(-1e-3, 1e-3, 2001),
                      torch.tensor([0.0, -0.0, 87.5, -87.5, 100.0, -100.0]
                                   + far + [-v for v in far] + [float("nan")])])


def _relative_errors(got, want, dtype):
    """|got - want| / max(1, |want|) for every input but the NaN (last); 0 where the exact
    value is beyond float32's range in a float32 check (squared ReLU of 3e38 overflows in any
    float32 code)."""
    err = ((got - want).abs() / want.abs().clamp_min(1.0))[:-1]
    if dtype == torch.float32:
        err = torch.where(want[:-1].abs() <= torch.finfo(torch.float32).max, err, 0.0)
    return err


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_numba_activations_match_float64_torch(name):
    import numpy as np

    from ssdfx.ops.numba_act import CODES, activate

    x = _activation_inputs()
    exact = ACTIVATIONS[name](x.double())
    for dtype, bound in ((torch.float32, _ACT_BOUND32.get(name, 1.5e-7)), (torch.float64, 1e-15)):
        a = x.to(dtype).numpy().copy()
        h = np.empty_like(a)
        activate(a, h, CODES[name], np.empty_like(a), np.empty(a.size, np.int32))
        assert np.array_equal(a[:-1], x.to(dtype).numpy()[:-1]), "the input must be unchanged"
        got = torch.from_numpy(h).double()
        assert torch.isnan(got[-1]), "NaN must stay NaN"
        err = _relative_errors(got, exact, dtype)
        assert float(err.max()) <= bound, (dtype, float(err.max()), float(x[err.argmax()]))


# the same for act'(x) (the backward kernel's `activate_grad`; measured: 2.5e-7 for GELU,
# 1.7-1.8e-7 for the sigmoid family, 9.8e-15 for the float64 tanh-GELU, whose derivative goes
# through the sigmoid; torch's own float32 derivatives: 2.4e-7 and 9.8e-7-1.0e-6)
_GRAD_BOUND32 = {"gelu": 3e-7, "gelu_tanh": 2.5e-7, "silu": 2.5e-7, "quick_gelu": 2.5e-7}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_numba_activation_derivatives_match_float64_autograd(name):
    import numpy as np

    from ssdfx.ops.numba_act import CODES, activate_grad

    x = _activation_inputs()
    xd = x.double().requires_grad_()
    value = ACTIVATIONS[name](xd)
    (exact,) = torch.autograd.grad(value.sum(), xd)
    value = value.detach()
    for dtype, value_bound, grad_bound in (
            (torch.float32, _ACT_BOUND32.get(name, 1.5e-7), _GRAD_BOUND32.get(name, 1.5e-7)),
            (torch.float64, 1e-15, 2e-14)):
        a = x.to(dtype).numpy().copy()
        h, g = np.empty_like(a), np.empty_like(a)
        activate_grad(a, h, g, CODES[name], np.empty_like(a), np.empty(a.size, np.int32))
        assert np.array_equal(a[:-1], x.to(dtype).numpy()[:-1]), "the input must be unchanged"
        # at NaN: what torch's backward gives (NaN, or 1 where ReLU's threshold_backward and
        # the identity pass the gradient through)
        assert np.isnan(h[-1]) and (np.isnan(g[-1]) == bool(torch.isnan(exact[-1])))
        for got, want, bound, what in ((h, value, value_bound, "value"),
                                       (g, exact, grad_bound, "derivative")):
            got = torch.from_numpy(got).double()
            err = _relative_errors(got, want, dtype)
            assert float(err.max()) <= bound, (what, dtype, float(err.max()),
                                               float(x[err.argmax()]))


@SETTINGS
@given(problems())
def test_torch_fp32_matches_reference(spec):
    check_against_reference("torch", spec, torch.float32, 1e-4)


@SETTINGS
@given(problems())
@example(dict(e=4, m=2, d=7, t=6, k=4, glu=True, bias=True, unused=0.0, skew=False, seed=1,
              activation="gelu", dropout_p=0.0))
def test_torch_bf16_matches_reference(spec):
    check_against_reference("torch", spec, torch.bfloat16, 3e-2)


@SETTINGS
@given(problems(), st.sampled_from([torch.bfloat16, torch.float16]))
@example(dict(e=4, m=2, d=7, t=6, k=4, glu=True, bias=True, unused=0.0, skew=False, seed=1,
              activation="gelu", dropout_p=0.3), torch.bfloat16)
@example(dict(e=1, m=3, d=5, t=1, k=1, glu=False, bias=True, unused=0.0, skew=False, seed=0,
              activation="silu", dropout_p=0.0), torch.float16)
def test_numba_widened_bf16_fp16_match_reference(spec, dtype):
    # backend "numba" for bfloat16/float16 (what "auto" runs where torch has no native GEMM in
    # that dtype, ssdfx.ops.widened): the float32 kernels on widened inputs, every output
    # rounded back to the inputs' dtype
    check_against_reference("numba", spec, dtype, 3e-2)


@SETTINGS
@given(problems(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_torch_blocked_variant_matches_reference(spec, dtype):
    # large CPU problems run per-expert blocks (torch_path._backward_blocks); force them here
    from ssdfx.ops import padded, torch_path

    with (_patched(torch_path, BLOCKS_FROM_BYTES=0),
          _patched(padded, MAX_BUFFER_BYTES=0, MAX_BACKWARD_BUFFER_BYTES=0)):
        check_against_reference("torch", spec, dtype, 1e-4 if dtype == torch.float32 else 3e-2)


@SETTINGS
@given(problems(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_torch_padded_variant_matches_reference(spec, dtype):
    # small CPU problems run one bmm over padded expert blocks (ssdfx.ops.padded); force it for
    # every problem with pairs, whatever its padding
    from ssdfx.ops import padded

    taken = []

    def always(x, bounds, backward=False):
        taken.append(bounds[-1] > 0)
        return taken[-1]

    with _patched(padded, use=always):
        check_against_reference("torch", spec, dtype, 1e-4 if dtype == torch.float32 else 3e-2)
    assert taken  # forward and backward asked; every call with pairs took the variant


@SETTINGS
@given(problems(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_torch_loop_variant_matches_reference(spec, dtype):
    # one mm per expert on (P, d) buffers: the variant between the padded and blocked ones
    from ssdfx.ops import padded

    with _patched(padded, MAX_BUFFER_BYTES=0, MAX_BACKWARD_BUFFER_BYTES=0):
        check_against_reference("torch", spec, dtype, 1e-4 if dtype == torch.float32 else 3e-2)


@SETTINGS
@given(problems(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_torch_loop_forward_then_padded_backward_matches_reference(spec, dtype):
    # the backward takes the padded variant up to larger buffers than the forward does, so a
    # per-expert-loop forward feeds a padded backward
    from ssdfx.ops import padded

    def backward_only(x, bounds, backward=False):
        return backward and bounds[-1] > 0

    with _patched(padded, use=backward_only):
        check_against_reference("torch", spec, dtype, 1e-4 if dtype == torch.float32 else 3e-2)


@SETTINGS
@given(problems(), st.sampled_from(["padded", "loop", "blocked"]))
@example(dict(e=3, m=2, d=5, t=19, k=2, glu=True, bias=True, unused=0.2, skew=False, seed=5,
              activation="gelu", dropout_p=0.3), "blocked")
@example(dict(e=2, m=3, d=4, t=11, k=2, glu=False, bias=True, unused=0.0, skew=False, seed=6,
              activation="relu", dropout_p=0.0), "loop")
def test_torch_bf16_rounded_row_counts_match_reference(spec, variant):
    # bf16 GEMMs take rounded row counts (layout.gemm_rows: extra rows of the next expert,
    # past P, or zero rows in the backward); ROW_STEPS = 1 rounds every count up to a power of
    # two, so these small problems have padding rows in every variant
    from ssdfx.ops import layout, padded, torch_path

    forced = dict(
        padded=[_patched(padded, use=lambda x, bounds, backward=False: bounds[-1] > 0)],
        loop=[_patched(padded, MAX_BUFFER_BYTES=0, MAX_BACKWARD_BUFFER_BYTES=0)],
        blocked=[_patched(torch_path, BLOCKS_FROM_BYTES=0),
                 _patched(padded, MAX_BUFFER_BYTES=0, MAX_BACKWARD_BUFFER_BYTES=0)],
    )[variant]
    with contextlib.ExitStack() as stack:
        for patch in forced + [_patched(layout, ROW_STEPS=1)]:
            stack.enter_context(patch)
        check_against_reference("torch", spec, torch.bfloat16, 3e-2)


def test_gemm_rows_takes_few_values_and_adds_little():
    from ssdfx.ops.layout import ROW_STEPS, gemm_rows

    values = [gemm_rows(n) for n in range(1, 5000)]
    assert all(n <= r <= n + n // ROW_STEPS for n, r in zip(range(1, 5000), values))
    assert all(gemm_rows(r) == r for r in values)  # rounded counts stay put
    assert values[:2 * ROW_STEPS - 1] == list(range(1, 2 * ROW_STEPS))  # exact below 2 steps
    for lo in (64, 512, 2048):  # ROW_STEPS values per octave
        assert len({gemm_rows(n) for n in range(lo + 1, 2 * lo + 1)}) == ROW_STEPS


@pytest.mark.parametrize("variant", ["padded", "loop", "blocked"])
def test_torch_bf16_gemms_see_only_rounded_row_counts(variant):
    # oneDNN compiles a kernel for every new GEMM shape (layout.ROW_STEPS): each bf16 GEMM's
    # rows (forward) and contraction length (weight gradients) must be a gemm_rows value, the
    # experts' 37, 45, 53 and 61 pairs are not
    from torch.utils._python_dispatch import TorchDispatchMode

    from ssdfx.ops import padded, torch_path
    from ssdfx.ops.layout import gemm_rows

    counts = [37, 45, 53, 61]
    e, m, d, k = len(counts), 8, 24, 1
    t = sum(counts)
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.full((n, 1), i) for i, n in enumerate(counts)])
    idx = idx[torch.randperm(t, generator=g)]
    x, dy = (torch.randn(t, d, generator=g).bfloat16() for _ in range(2))
    w1, w2 = torch.randn(e * m, d, generator=g).bfloat16(), torch.randn(d, e * m, generator=g).bfloat16()
    b1 = torch.randn(e * m, generator=g).bfloat16()
    gate = torch.ones(t, k, dtype=torch.bfloat16)
    seen = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "bmm", "addmm", "baddbmm"):  # the last two: bias first
                a, b = args[1:3] if name.startswith(("addmm", "baddbmm")) else args[:2]
                seen.append((a.shape[-2], a.shape[-1], b.shape[-1]))
            return func(*args, **(kwargs or {}))

    forced = dict(
        padded=dict(use=lambda x, bounds, backward=False: True),
        loop=dict(MAX_BUFFER_BYTES=0, MAX_BACKWARD_BUFFER_BYTES=0),
        blocked=dict(MAX_BUFFER_BYTES=0, MAX_BACKWARD_BUFFER_BYTES=0),
    )[variant]
    blocks = 0 if variant == "blocked" else torch_path.BLOCKS_FROM_BYTES
    with (_patched(padded, **forced), _patched(torch_path, BLOCKS_FROM_BYTES=blocks), Shapes()):
        y, a1, a3, order, offsets = torch_path.forward(x, w1, b1, w2, None, None, idx, gate,
                                                       None, e, "gelu", 0.0)
        torch_path.backward(dy, x, w1, w2, None, gate, None, a1, a3, order, offsets, e, "gelu",
                            0.0)
    assert len(seen) >= 4 * (1 if variant == "padded" else e)
    fixed = {m, d, e * m}  # the weights' dimensions
    varying = [n for shape in seen for n in shape if n not in fixed]
    assert varying and all(gemm_rows(n) == n for n in varying), sorted(set(varying))
    # and the results are the reference's on the same inputs
    ref = reference.forward(x.float(), w1.float(), b1.float(), w2.float(), None, None, idx,
                            gate.float(), None, e, "gelu", 0.0)[0]
    assert torch.allclose(y.float(), ref, atol=0.05 * (1 + ref.abs().max().item()))


@contextlib.contextmanager
def _patched(module, **values):
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm missing")
@SETTINGS
@given(problems(align=8))
def test_grouped_mm_bf16_matches_reference(spec):
    probe = torch.empty(1, spec["d"], dtype=torch.bfloat16)
    if not grouped_mm_ok(probe, torch.empty(spec["e"] * spec["m"], spec["d"]), spec["e"]):
        pytest.skip("grouped_mm does not take these shapes here")
    check_against_reference("grouped_mm", spec, torch.bfloat16, 3e-2)


# every activation once, with GLU, bias, dropout, unused slots and empty experts among them
FUSED_SPECS = [
    dict(e=4, m=8, d=16, t=20, k=2, glu=glu, bias=bias, unused=unused, skew=skew, seed=i,
         activation=act, dropout_p=p)
    for i, (act, glu, bias, unused, skew, p) in enumerate([
        ("gelu", False, True, 0.0, False, 0.0), ("gelu_tanh", True, True, 0.2, False, 0.0),
        ("relu", False, False, 0.0, True, 0.3), ("relu2", True, False, 0.0, False, 0.0),
        ("silu", True, True, 0.0, False, 0.3), ("quick_gelu", False, True, 0.3, True, 0.0),
        ("identity", False, False, 0.0, False, 0.0),
    ])
]


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm missing")
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="inductor needs a C++ compiler on CPU")
@pytest.mark.parametrize("spec", FUSED_SPECS, ids=[s["activation"] for s in FUSED_SPECS])
def test_grouped_mm_fused_elementwise_matches_reference(spec):
    # the grouped backend's elementwise middle compiled by inductor (FUSED_DEVICES, meant for
    # CUDA); on CPU inductor writes C++ instead of Triton from the same graph
    from ssdfx.ops import grouped

    compiled = []
    compile_ = torch.compile

    def counting(fn, **kw):
        compiled.append(fn.__name__)
        return compile_(fn, **kw)

    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # dynamo recompiles a function at most 8 times per process
    counters.clear()
    fresh = grouped._Fusable(grouped._up_epilogue), grouped._Fusable(grouped.hidden_backward)
    with _patched(grouped, FUSED_DEVICES=("cpu",), _up_epilogue_op=fresh[0],
                  _hidden_backward_op=fresh[1]), _patched(torch, compile=counting):
        check_against_reference("grouped_mm", spec, torch.bfloat16, 3e-2)
    assert compiled == ["_up_epilogue", "hidden_backward"]
    assert not any(f.broken for f in fresh)
    # both ran as compiled graphs (identity without bias leaves the forward nothing to compute)
    trivial = spec["activation"] == "identity" and not spec["bias"] and not spec["glu"]
    assert counters["stats"]["unique_graphs"] >= (1 if trivial else 2)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm missing")
def test_grouped_mm_fused_falls_back_when_compiling_fails():
    from ssdfx.ops import grouped

    def failing(fn, **kw):
        raise RuntimeError("no compiler here")

    fresh = grouped._Fusable(grouped._up_epilogue), grouped._Fusable(grouped.hidden_backward)
    with _patched(grouped, FUSED_DEVICES=("cpu",), _up_epilogue_op=fresh[0],
                  _hidden_backward_op=fresh[1]), _patched(torch, compile=failing):
        with pytest.warns(UserWarning, match="no compiler here"):
            check_against_reference("grouped_mm", FUSED_SPECS[1], torch.bfloat16, 3e-2)
    assert all(f.broken for f in fresh)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_transposed_weights_match_reference(backend):
    spec = dict(e=4, m=3, d=5, t=11, k=2, glu=True, bias=True, unused=0.2, skew=False, seed=7,
                activation="gelu", dropout_p=0.0)
    p = make(spec, torch.float32)
    for n in ("w1", "w2", "w3"):
        p[n] = p[n].t().contiguous().t()  # Conv1D-style column-major storage
    ref_fwd, ref_bwd = run(select("reference", p["x"], p["w1"], 4), p, spec)
    fwd, bwd = run(select(backend, p["x"], p["w1"], 4), p, spec)
    for got, want in zip(fwd + bwd, ref_fwd + ref_bwd):
        assert got.stride() == want.stride()
        _close(got, want, 1e-4)


def test_reference_rejects_out_of_range():
    idx = torch.tensor([[0, 5]])
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        reference.check_expert_idx(idx, 3)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(0, 300), e=st.integers(1, 40), k=st.integers(1, 6),
       unused=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_numba_sort_pairs_equals_the_torch_sort(t, e, k, unused, seed):
    # the CPU torch path sorts with numba's counting sort: the same order and offsets as the
    # stable argsort of ssdfx.ops.layout.sort_pairs, unused (-1) slots last
    from ssdfx.ops import cpu_numba
    from ssdfx.ops.layout import sort_pairs

    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, e, (t, k), generator=g)
    idx[torch.rand(t, k, generator=g) < unused] = -1
    order, offsets = cpu_numba.sort_pairs(idx, e)
    want_order, want_offsets = sort_pairs(idx, e)
    assert torch.equal(order, want_order) and torch.equal(offsets, want_offsets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("cap", [3, 40], ids=["rows<d_ff", "rows>d_ff"])
def test_padded_down_projection_both_layouts(dtype, conv1d, cap):
    # padded._down: one bmm against w2's expert blocks, copied into contiguous blocks for
    # nn.Linear's layout and read in place for Conv1D's (already (F, d) rows), with fewer and
    # with more padded rows than d_ff; against a float64 product per expert
    from ssdfx.ops import padded
    from ssdfx.ops.layout import expert_views

    torch.manual_seed(0)
    num_experts, d, m = 4, 24, 16
    w2 = (torch.randn(num_experts * m, d).t() if conv1d else torch.randn(d, num_experts * m)).to(dtype)
    gh = torch.randn(num_experts, cap, m).to(dtype)
    w1 = torch.empty(num_experts * m, d, dtype=dtype)
    w2_edm = expert_views(w1, w2, None, num_experts)[2]
    blocks = padded._w2_blocks(w2_edm)
    assert torch.equal(blocks, w2_edm)
    assert (blocks.data_ptr() == w2.data_ptr()) == conv1d  # a copy only for nn.Linear's layout
    got = padded._down(gh, w2_edm)
    want = torch.cat([gh[e].double() @ w2[:, e * m:(e + 1) * m].double().t() for e in range(num_experts)])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert got.shape == (num_experts * cap, d) and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * (1 + want.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bf16_sums_of_k_rows_round_once(dtype):
    # a token's K rows add up in float32 and round once (layout.sum_dtype): within half a
    # unit in the last place (plus float32's own error) of the float64 sum, where K-1 in-place
    # bf16 adds miss it by several
    from ssdfx.ops.layout import add_rows, sum_slots

    g = torch.Generator().manual_seed(0)
    t_all, k, c = 64, 8, 32
    rows = (torch.randn(t_all * k, c, generator=g) * torch.rand(t_all * k, 1, generator=g) * 4
            ).to(dtype)
    slot_rows = torch.randperm(t_all * k, generator=g).view(t_all, k)
    exact = rows.double()[slot_rows].sum(1)
    ulp = torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(exact.abs().clamp_min(1e-3)))
    bound = 0.5 * ulp + 1e-6 * exact.abs() + 1e-30
    tok = torch.arange(t_all).repeat_interleave(k)[slot_rows.reshape(-1).argsort()]
    for y in (sum_slots(rows, slot_rows), add_rows(rows, tok, t_all).to(dtype)):
        assert y.dtype == dtype
        assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("t_all,k,c", [(1, 2, 3), (33, 3, 7), (64, 8, 32), (5, 1, 4)])
def test_sum_slots_bf16_in_numba_equals_float32_sums(t_all, k, c):
    # layout.sum_slots of bf16 rows on CPU runs numba (cpu_numba.sum_slots_bf16): bit for bit
    # the float32 sums in slot order rounded once, computed here in torch; T=1, odd widths,
    # K=1 (a gather: no numba call)
    from ssdfx.ops.layout import sum_slots

    g = torch.Generator().manual_seed(t_all)
    rows = (torch.randn(t_all * k + 3, c, generator=g) * 5).to(torch.bfloat16)
    slot_rows = torch.randperm(t_all * k + 3, generator=g)[:t_all * k].view(t_all, k)
    want = rows[slot_rows[:, 0]].float()
    for j in range(1, k):
        want += rows[slot_rows[:, j]].float()
    assert torch.equal(sum_slots(rows, slot_rows), want.to(torch.bfloat16))


@pytest.mark.parametrize("n,c", [(1, 3), (37, 9), (64, 256)])
def test_add_rows_bf16_equals_index_add_in_float32(n, c):
    # cpu_numba.add_rows_bf16 (the blocked bf16 backward's dx): acc[tok[i]] += rows[i] with the
    # bf16 rows widened exactly, bit for bit torch's float32 index_add_ of the widened rows;
    # tokens distinct (one expert's rows), in any order, others untouched
    from ssdfx.ops import cpu_numba

    g = torch.Generator().manual_seed(n)
    acc = torch.randn(n + 5, c, generator=g)
    rows = (torch.randn(n, c, generator=g) * 3).to(torch.bfloat16)
    tok = torch.randperm(n + 5, generator=g)[:n]
    want = acc.clone().index_add_(0, tok, rows.float())
    cpu_numba.add_rows_bf16(acc, rows, tok)
    assert torch.equal(acc, want)


def test_padded_variant_bounds():
    # padded.use: padding at most MAX_PAD x the pairs and one (E*C, d) buffer under the
    # forward's or the backward's limit, whatever d_ff (E*C < F at d=768 takes it since w2's
    # blocks stopped costing a transposed copy)
    from ssdfx.ops import padded
    from ssdfx.ops.layout import gemm_rows

    def bounds(counts):
        return [sum(counts[:i]) for i in range(len(counts) + 1)]

    x = torch.empty(512, 768, dtype=torch.bfloat16)
    even = bounds([128] * 16)  # E*C = 2048 rows < F = 3072
    assert padded.use(x, even) and padded.use(x, even, backward=True)
    skewed = bounds([1000] + [10] * 15)  # E*C = 16 * gemm_rows(1000) > 2 P
    assert 16 * gemm_rows(1000) > padded.MAX_PAD * 1150
    assert not padded.use(x, skewed) and not padded.use(x, skewed, backward=True)
    big = bounds([1024] * 8)  # (8192, 768) bf16: 12 MiB
    assert not padded.use(x, big) and padded.use(x, big, backward=True)
    assert not padded.use(x, bounds([0] * 8))  # no pairs
