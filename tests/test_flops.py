"""ssdfx.flops against independent references: torch's FlopCounterMode on the same forward pass,
and FLOPs written out by hand for tiny shapes."""

import csv
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import models
import ssdfx
from ssdfx.floptable import NON_FFN, FlopRow, FlopTable


def reference(model, kwargs, by_op=False):
    """FlopCounterMode's total for one forward pass. The math SDPA backend, because on CPU
    FlopCounterMode counts the fused flash-attention kernel as 0; grad enabled, because its
    ModuleTracker fails under no_grad when a module gets a view of a parameter."""
    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad(), FlopCounterMode(display=False) as fc:
        model(**kwargs)
    return fc.get_flop_counts()["Global"] if by_op else fc.get_total_flops()


def _close(got, want, rel):
    assert abs(got - want) <= rel * want, f"ssdfx {got:,} vs FlopCounterMode {want:,} ({got / want - 1:+.3%})"


@pytest.mark.parametrize("family", ["gpt2", "bert", "t5", "t5_gated", "llama", "opt", "block"])
def test_dense_total_agrees_with_flop_counter(family):
    model, kwargs, expected = models.ALL[family]()
    model.eval()
    table = ssdfx.flops(model, **kwargs)
    _close(table.total, reference(model, kwargs), 0.01)
    assert table.stages == ("dense",)
    assert {r.name for r in table.sites} == {w_in for w_in, _, _ in expected}


@pytest.mark.parametrize("family,e,k", [("gpt2", 4, 1), ("bert", 4, 2), ("t5_gated", 2, 1),
                                        ("llama", 4, 2), ("opt", 4, 1)])
def test_converted_total_agrees_with_flop_counter(family, e, k):
    """FlopCounterMode counts the routed-expert op by its registered formula (the pairs it
    computes) and the router's matmul; ssdfx's sparse figure is analytic."""
    model, kwargs, _ = models.ALL[family]()
    model.eval()
    dense = reference(model, kwargs)
    ssdfx.convert(model, num_experts=e, top_k=k)
    table = ssdfx.flops(model, **kwargs)
    _close(table.total, reference(model, kwargs), 0.02)
    _close(table.dense_total, dense, 0.01)
    assert table.stages == ("dense", "moefy") and table.total < table.dense_total


def test_sparse_site_is_router_plus_k_over_e_of_dense():
    """Hand formulas: dense FFN 2*T*d*f per projection (3 for GLU); the centroid router 2*T*d*E."""
    for family, glu in (("gpt2", False), ("llama", True)):
        model, kwargs, _ = models.ALL[family]()
        e, k = 4, 1
        ssdfx.convert(model, num_experts=e, top_k=k)
        table = ssdfx.flops(model, **kwargs)
        t = kwargs["input_ids"].numel()
        for row in table.sites:
            d, f = row.d_model, row.d_ff
            dense = t * 2 * d * f * (3 if glu else 2)
            assert row.tokens == t and row.experts == e and row.k == k
            assert row.flops == (dense, 2 * t * d * e + dense * k // e)


def test_reports_match_per_token_figures():
    model, kwargs, _ = models.gpt2()
    ssdfx.convert(model, num_experts=4, top_k=2)
    table = ssdfx.flops(model, **kwargs)
    for rep in ssdfx.conversion(model).reports:
        row = table.row(rep.site)
        assert row.flops == (rep.flops_before * row.tokens, rep.flops_after * row.tokens)


def test_dynamic_k_counts_the_measured_pairs():
    """Dynamic-k leaves -1 slots; the figure uses the pairs actually selected, as the op's own
    FLOP formula does, and an MLP router's FLOPs come from its graph."""
    from ssdfx.stats import observe

    model, kwargs, _ = models.gpt2("relu")
    model.eval()
    stats = observe(model, [kwargs])
    ssdfx.convert(model, num_experts=4, top_k=4, router="mlp", dynamic_k=0.6, stats=stats)
    table = ssdfx.flops(model, **kwargs)
    counts = reference(model, kwargs, by_op=True)
    _close(table.total, sum(counts.values()), 0.02)
    expert_flops = counts[torch.ops.ssdfx.moe_ffn]
    per_pair = 2 * 32 * (128 // 4) * 2
    pairs = expert_flops // per_pair
    t = kwargs["input_ids"].numel()
    assert sum(r.k * r.tokens for r in table.sites) == pytest.approx(pairs)
    assert pairs < 4 * t * len(table.sites), "dynamic-k must have left slots empty"
    assert "dynamic_k" in table.config
    assert [r.site for r in table.sites] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]


def test_without_inputs_uses_the_hf_example_inputs():
    from ssdfx.capture import example_inputs

    model, _, _ = models.llama()
    args, kwargs = example_inputs(model)
    assert ssdfx.flops(model).to_dicts() == ssdfx.flops(model, *args, **kwargs).to_dicts()


class _Ops(nn.Module):
    """One of every counted op, with FLOPs written out by hand below."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5))
        self.conv = nn.Conv1d(4, 8, 3, groups=2)
        self.deconv = nn.ConvTranspose1d(4, 6, 3)
        self.lin = nn.Linear(6, 7)

    def forward(self, x, q, k, v, y):
        a = x @ self.w                                   # (2, 3, 6) @ (6, 5): 2*2*3*6*5 = 360
        b = torch.einsum("bij,jk->bik", x, self.w)       # same contraction: 360
        c = torch.bmm(x, x.transpose(1, 2))              # (2,3,6) @ (2,6,3): 2*2*3*6*3 = 216
        d = self.lin(x)                                  # 2*(2*3)*6*7 = 504
        e = F.scaled_dot_product_attention(q, k, v)      # q (2,2,3,4) k (2,2,5,4) v (2,2,5,6):
        #                                                  2*12*5*4 + 2*12*5*6 = 480 + 720
        f = self.conv(y)                                 # y (1,4,10): out (1,8,8), 2*8*8*2*3 = 768
        g = self.deconv(y)                               # 2*1*10*(4*6)*3 = 1440
        h = torch.addmm(torch.zeros(3, 5), x[0], self.w)  # (3, 6) @ (6, 5): 2*3*6*5 = 180
        return a, b, c, d, e, f, g, h


def test_node_formulas_by_hand_and_against_flop_counter():
    torch.manual_seed(0)
    m = _Ops()
    inputs = dict(x=torch.randn(2, 3, 6), q=torch.randn(2, 2, 3, 4), k=torch.randn(2, 2, 5, 4),
                  v=torch.randn(2, 2, 5, 6), y=torch.randn(1, 4, 10))
    ep = torch.export.export(m, (), inputs, strict=False)
    from ssdfx.flopcount import node_flops, op_key

    got = {}
    for n in ep.graph.nodes:
        f = node_flops(n)
        if f is not None:
            got.setdefault(op_key(n), []).append(f)
    assert got == {"aten::matmul": [360], "aten::einsum": [360], "aten::bmm": [216],
                   "aten::linear": [504], "aten::scaled_dot_product_attention": [1200],
                   "aten::conv1d": [768], "aten::conv_transpose1d": [1440], "aten::addmm": [180]}
    total = ssdfx.flops(m, **inputs).total
    assert total == 360 + 360 + 216 + 504 + 1200 + 768 + 1440 + 180
    assert total == reference(m, inputs)


def test_table_api():
    model, kwargs, _ = models.gpt2()
    ssdfx.convert(model, num_experts=4, top_k=2)
    table = ssdfx.flops(model, **kwargs)
    assert table.total == table.totals["moefy"] == sum(r.flops[-1] for r in table.rows)
    dicts = table.to_dicts()
    assert [d["site"] for d in dicts] == [r.site for r in table.rows] + ["total"]
    assert dicts[-1]["flops_moefy"] == table.total and dicts[-1]["flops_dense"] == table.dense_total
    parsed = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert [int(r["flops_dense"]) for r in parsed] == [d["flops_dense"] for d in dicts]
    text = str(table)
    assert "transformer.h.1.mlp" in text and NON_FFN in text and "moefy FLOPs" in text
    with pytest.raises(ValueError, match="flops"):
        FlopRow("x", (-1,))
    with pytest.raises(ValueError, match="stages"):
        FlopTable(("dense", "moefy"), (FlopRow("x", (1,)),))


def test_meta_device_counts_the_same_without_running():
    model, kwargs, _ = models.llama()
    ssdfx.convert(model, num_experts=4, top_k=2)
    want = ssdfx.flops(model, **kwargs)
    with torch.device("meta"):
        meta, _, _ = models.llama()
    ssdfx.convert(meta, num_experts=4, top_k=2, example_kwargs={k: v.to("meta") for k, v in kwargs.items()})
    got = ssdfx.flops(meta, **{k: v.to("meta") for k, v in kwargs.items()})
    assert got.totals == want.totals
    assert any("meta" in n for n in got.notes)


def test_errors_say_what_to_do():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="example inputs"):
        ssdfx.flops(mlp)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else x  # data-dependent: export refuses it

    with pytest.raises(ssdfx.TraceError, match="torch.export"):
        ssdfx.flops(Branchy(), torch.randn(2, 4))
    assert math.isclose(ssdfx.flops(mlp, torch.randn(5, 4)).total, 2 * 5 * 4 * 8 * 2)


def test_docstring_examples_run():
    import doctest

    from ssdfx import floptable, tables

    for mod in (floptable, tables):
        assert doctest.testmod(mod).failed == 0, mod.__name__
    globs = {"ssdfx": ssdfx, "torch": torch, "nn": nn}
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(ssdfx.flops, "flops", globs=globs):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_flop_counter_under_no_grad_on_a_converted_model():
    """The routed op receives parameters, not views made in the graph: autograd hooks such as
    FlopCounterMode's module tracking work under no_grad."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import models
    import ssdfx

    model, kwargs, _ = models.gpt2()
    ssdfx.convert(model, num_experts=4, top_k=2)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**kwargs)
    assert counter.get_total_flops() > 0


def test_find_ffns_skips_the_mlp_router_ssdfx_created():
    import models
    import ssdfx
    from ssdfx.stats import observe

    model, kwargs, _ = models.gpt2("relu")
    stats = observe(model.eval(), [kwargs])
    ssdfx.convert(model, num_experts=4, top_k=2, router="mlp", stats=stats)
    assert all(".ssdfx_router." not in s.name for s in ssdfx.find_ffns(model))
