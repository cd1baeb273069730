"""Bad input gets a clear exception, raised before anything changes."""

import pytest
import torch
from torch import nn

import ssdfx
import models


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    now = model.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


class Untraceable(nn.Module):
    """An MLP whose forward branches on data: neither fx nor export can capture it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc2(torch.relu(self.fc1(x)))
        return self.fc2(torch.relu(self.fc1(-x)))


def test_no_ffn_found_says_what_was_searched():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    snap = _snapshot(model)
    with pytest.raises(ssdfx.NoFFNFoundError, match=r"linear-like .* elementwise chain .* linear-like") as e:
        ssdfx.convert(model, num_experts=2, top_k=1)
    assert "graphs searched" in str(e.value)
    assert _unchanged(model, snap) and not ssdfx.is_converted(model)


def test_d_ff_not_divisible():
    model, _, _ = models.gpt2()  # d_ff = 128
    snap = _snapshot(model)
    with pytest.raises(ssdfx.UnsupportedSiteError, match=r"d_ff=128 is not divisible by num_experts=3"):
        ssdfx.convert(model, num_experts=3, top_k=1)
    assert _unchanged(model, snap) and not ssdfx.is_converted(model)


@pytest.mark.parametrize("top_k", [0, -1, 5, 2.0])
def test_top_k_out_of_range(top_k):
    model, _, _ = models.gpt2()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, num_experts=4\]"):
        ssdfx.convert(model, num_experts=4, top_k=top_k)
    assert _unchanged(model, snap)


@pytest.mark.parametrize("bad", [None, "gpt2", torch.zeros(3), [nn.Linear(2, 2)]])
def test_not_a_module(bad):
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        ssdfx.convert(bad, num_experts=2, top_k=1)
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        ssdfx.find_ffns(bad)


def test_untraceable_ffn(capfd):
    model = nn.Sequential(Untraceable())
    snap = _snapshot(model)
    with pytest.raises(ssdfx.TraceError, match=r"(?s)could not be traced.*not traceable: 0: "):
        ssdfx.convert(model, num_experts=2, top_k=1)
    assert _unchanged(model, snap)
    # with example inputs the export fails as well: the message says so (not "pass
    # example_inputs", which the user did) and torch's partial graph dumps are not printed
    capfd.readouterr()
    with pytest.raises(ssdfx.TraceError, match="torch.export of the whole model failed as well") as e:
        ssdfx.convert(model, num_experts=2, top_k=1, example_inputs=(torch.randn(3, 8),))
    assert "Pass example_inputs" not in str(e.value)
    out, err = capfd.readouterr()
    assert "def forward" not in out + err and "symbolic_shapes" not in err
    assert _unchanged(model, snap)


def test_ffn_inline_in_an_untraceable_forward():
    # torch's TransformerEncoderLayer applies F.relu inline in a forward fx cannot trace
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer)
    snap = _snapshot(model)
    with pytest.raises(ssdfx.SSDFXError, match=r"inline in the forward of 0"):
        ssdfx.convert(model, num_experts=2, top_k=1, example_inputs=(torch.randn(2, 5, 16),))
    assert _unchanged(model, snap)


def test_revert_never_converted():
    model, _, _ = models.gpt2()
    snap = _snapshot(model)
    with pytest.raises(ssdfx.NotConvertedError, match="never converted"):
        ssdfx.revert(model)
    assert _unchanged(model, snap)


def test_convert_twice():
    model, _, _ = models.gpt2()
    ssdfx.convert(model, num_experts=4, top_k=2)
    snap = _snapshot(model)
    with pytest.raises(ssdfx.AlreadyConvertedError, match="revert"):
        ssdfx.convert(model, num_experts=4, top_k=2)
    assert _unchanged(model, snap)


def test_unsupported_activation():
    model = nn.Sequential(models.SinMLP())
    snap = _snapshot(model)
    with pytest.raises(ssdfx.UnsupportedSiteError, match=r"activation matches none of the supported"):
        ssdfx.convert(model, num_experts=2, top_k=1)
    assert _unchanged(model, snap)


def test_bad_partition():
    model, _, _ = models.gpt2()
    snap = _snapshot(model)
    site = ssdfx.find_ffns(model)[0].name
    with pytest.raises(ssdfx.UnsupportedSiteError, match="not a permutation"):
        ssdfx.convert(model, num_experts=4, top_k=2, partition={site: torch.zeros(128, dtype=torch.long)})
    with pytest.raises(ValueError, match="unknown partition"):
        ssdfx.convert(model, num_experts=4, top_k=2, partition="nonsense")
    assert _unchanged(model, snap)


def _other_gpt2(n_inner):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=models.VOCAB,
                                      n_positions=64, n_inner=n_inner)).eval()


def test_mapping_keys_stats_and_sites_must_fit_the_model():
    model, kwargs, _ = models.gpt2()
    snap = _snapshot(model)
    name = "transformer.h.0.mlp.c_fc.weight"
    # a key that names no site (here the module path instead of the site name)
    with pytest.raises(ValueError, match=r"partition= names \['transformer.h.0.mlp'\].*" + name):
        ssdfx.convert(model, 4, 2, partition={"transformer.h.0.mlp": torch.arange(128)})
    with pytest.raises(ValueError, match=r"router= names \['typo'\]"):
        ssdfx.convert(model, 4, 2, router={"typo": nn.Linear(32, 4)})
    # statistics and FFNSite objects taken from a model with another d_ff
    other = _other_gpt2(n_inner=64)
    stats = ssdfx.observe(other, [{"input_ids": kwargs["input_ids"]}])
    with pytest.raises(ValueError, match=f"stats for {name} were recorded on an FFN with "
                                         "d_model=32, d_ff=64, but this site has d_model=32, d_ff=128"):
        ssdfx.convert(model, 4, 2, partition="coactivation", stats=stats)
    with pytest.raises(ValueError, match=f"site {name} .*d_ff=64.* does not fit this model"):
        ssdfx.convert(model, 4, 2, sites=ssdfx.find_ffns(other))
    assert _unchanged(model, snap) and not ssdfx.is_converted(model)


def test_unknown_backend_refused_before_conversion():
    # it used to convert, and fail only at the first forward
    model, _, _ = models.gpt2()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"unknown backend 'foo'; choose one of .*'auto'"):
        ssdfx.convert(model, num_experts=4, top_k=2, backend="foo")
    assert _unchanged(model, snap) and not ssdfx.is_converted(model)


def test_failure_midway_rolls_back():
    """A site that fails in the rewrite phase undoes the permutations of the sites before it."""
    model, _, _ = models.gpt2(n_layer=3)
    snap = _snapshot(model)
    sites = ssdfx.find_ffns(model)
    calls = []

    def partition(site, m):
        calls.append(site.name)
        return torch.randperm(site.d_ff)

    # the third site claims a scope whose trace does not contain it: fails after two rewrites
    broken = sites[2].__class__(**{**sites[2].__dict__, "scope": sites[0].scope})
    with pytest.raises(ssdfx.UnsupportedSiteError, match="does not contain"):
        ssdfx.convert(model, num_experts=4, top_k=2, sites=[sites[0], sites[1], broken], partition=partition)
    assert len(calls) == 3
    assert _unchanged(model, snap) and not ssdfx.is_converted(model)
