"""find_ffns finds every FFN by structure, and nothing else."""

import pytest
import torch
from torch import nn

import ssdfx
import models


@pytest.mark.parametrize("family", sorted(models.ALL))
def test_finds_exactly_the_ffns(family):
    model, _, expected = models.ALL[family]()
    sites = ssdfx.find_ffns(model)
    got = sorted((s.w_in.weight, s.w_up.weight if s.w_up else None, s.w_out.weight) for s in sites)
    assert got == sorted(expected)
    params = dict(model.named_parameters())
    for s in sites:
        assert s.activation == models.EXPECTED_ACTIVATION[family]
        assert s.kind == ("glu" if s.w_up else "plain")
        w_in = params[s.w_in.weight]
        # d_model/d_ff come from the weight shapes, whichever layout (Conv1D stores (d, d_ff))
        assert sorted(w_in.shape) == sorted((s.d_model, s.d_ff))
        assert s.d_ff == (w_in.shape[1] if s.w_in.transposed else w_in.shape[0])


def test_never_matches_attention():
    # every parameter of an attention module, by type, is outside every site
    for family in ("gpt2", "bert", "llama", "opt", "t5", "block"):
        model, _, _ = models.ALL[family]()
        attn = {n for mname, mod in model.named_modules() if "Attention" in type(mod).__name__
                for n, _ in mod.named_parameters(prefix=mname)}
        assert attn, family
        for s in ssdfx.find_ffns(model):
            used = {s.w_in.weight, s.w_out.weight, s.w_up.weight if s.w_up else None}
            assert not used & attn, (family, used & attn)


def test_gpt2_conv1d_layout_and_decomposed_gelu():
    model, _, _ = models.gpt2()
    (s, _) = ssdfx.find_ffns(model)
    assert s.w_in.transposed and s.w_out.transposed  # HF Conv1D: addmm with (in, out) weights
    assert s.activation == "gelu_tanh"  # matched from mul/pow/tanh, not from a gelu op
    assert s.scope.kind == "module" and s.path == "transformer.h.0.mlp"


def test_bert_ffn_spans_two_sibling_modules():
    model, _, _ = models.bert()
    s = ssdfx.find_ffns(model)[0]
    assert s.scope.kind == "chain"
    assert s.scope.children == ("bert.encoder.layer.0.intermediate", "bert.encoder.layer.0.output")


def test_opt_ffn_inline_in_decoder_layer():
    model, _, _ = models.opt()
    s = ssdfx.find_ffns(model)[0]
    assert s.scope.kind == "chain"
    assert [c.rsplit(".", 1)[1] for c in s.scope.children] == ["fc1", "activation_fn", "fc2"]


def test_glu_gate_branch_identified():
    model, _, _ = models.llama()
    s = ssdfx.find_ffns(model)[0]
    assert s.kind == "glu" and s.activation == "silu"
    assert s.w_in.weight.endswith("gate_proj.weight") and s.w_up.weight.endswith("up_proj.weight")


def test_hidden_state_used_elsewhere_is_not_an_ffn():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h), h.mean()  # h escapes: routing it would change the second output

    assert ssdfx.find_ffns(nn.Sequential(Leaky())) == []


def test_non_elementwise_chain_is_not_an_ffn():
    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.ln, self.b = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)

        def forward(self, x):
            return self.b(self.ln(self.a(x)))  # LayerNorm mixes neurons: not expert-decomposable

    assert ssdfx.find_ffns(nn.Sequential(Norm())) == []


def test_unknown_activation_reported():
    (s,) = ssdfx.find_ffns(nn.Sequential(models.SinMLP()))
    assert s.activation == "unknown"


class _Clamped(nn.Module):
    """relu(x) then x.clamp(max=cap): equal to ReLU on [-6, 6] whenever cap >= 6."""

    def __init__(self, cap):
        super().__init__()
        self.cap = cap

    def forward(self, x):
        return torch.relu(x).clamp(max=self.cap)


@pytest.mark.parametrize("act", [nn.ReLU6(), nn.Hardtanh(0.0, 6.0), nn.Hardtanh(0.0, 20.0),
                                 _Clamped(1e4)], ids=["relu6", "hardtanh6", "hardtanh20", "clamp1e4"])
def test_clamped_relus_are_not_taken_for_relu(act):
    # They equal ReLU near zero; converting them as ReLU silently changed outputs by up to 7.
    (s,) = ssdfx.find_ffns(nn.Sequential(nn.Linear(8, 32), act, nn.Linear(32, 8)))
    assert s.activation == "unknown"


def test_clamped_gate_is_not_taken_for_a_glu():
    class ClampedGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.g, self.u, self.o = nn.Linear(8, 32), nn.Linear(8, 32), nn.Linear(32, 8)

        def forward(self, x):
            return self.o(nn.functional.relu6(self.g(x)) * self.u(x))

    (s,) = ssdfx.find_ffns(nn.Sequential(ClampedGLU()))
    assert s.activation == "unknown"


def test_relu6_site_is_refused_by_convert_and_the_model_is_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU6(), nn.Linear(64, 16)).eval()
    x = torch.randn(4, 16) * 20
    ref = model(x)
    with pytest.raises(ssdfx.UnsupportedSiteError):
        ssdfx.convert(model, num_experts=4, top_k=4)
    assert torch.equal(model(x), ref) and not ssdfx.is_converted(model)


def test_find_ffns_does_not_modify_the_model():
    model, _, _ = models.gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ssdfx.find_ffns(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_find_ffns_warns_when_untraceable_modules_may_hide_an_ffn():
    # torch's TransformerEncoderLayer applies its FFN inline in a forward fx cannot trace
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
    with pytest.warns(UserWarning, match=r"could not be traced: .*layers\.0.*pass example_inputs"):
        assert ssdfx.find_ffns(model) == []
