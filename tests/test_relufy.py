"""relufy swaps the activation for ReLU and nothing else."""

import pytest
import torch
import torch.fx as fx

import models
import ssdfx
from ssdfx.passes import RelufyConfig, relufy as relufy_pass, run_pass
from ssdfx.relu import relufy


def test_relufied_gpt2_equals_the_relu_config_with_the_same_weights():
    model, kwargs, _ = models.gpt2()
    ref, _, _ = models.gpt2("relu")
    ref.load_state_dict(model.state_dict())
    relufy(model)
    torch.testing.assert_close(models.output_of(model, kwargs), models.output_of(ref, kwargs), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama", "t5_gated", "block"])
def test_relufy_every_family(family):
    model, kwargs, _ = models.ALL[family]()
    names = [n for n, _ in model.named_parameters()]
    changed = relufy(model)
    assert changed
    assert [s.activation for s in ssdfx.find_ffns(model)] == ["relu"] * len(changed)
    assert [n for n, _ in model.named_parameters()] == names
    assert torch.isfinite(models.output_of(model, kwargs)).all()
    ssdfx.convert(model, num_experts=4, top_k=2)  # still convertible afterwards


def test_relufy_pass_on_a_decomposed_gelu_keeps_the_rest_of_the_chain():
    mlp = models.gpt2()[0].transformer.h[0].mlp
    gm = fx.symbolic_trace(mlp)
    res = run_pass(relufy_pass, gm, RelufyConfig())
    assert res.modified and "tanh" not in gm.code and "relu" in gm.code
    x = torch.randn(2, 3, 32)
    h = torch.relu(x @ mlp.c_fc.weight + mlp.c_fc.bias)
    torch.testing.assert_close(gm(x), h @ mlp.c_proj.weight + mlp.c_proj.bias, atol=1e-5, rtol=1e-5)
    # back to the original function with the inverse rewrite
    run_pass(relufy_pass, gm, RelufyConfig(activation="gelu_tanh"))
    torch.testing.assert_close(gm(x), mlp(x), atol=1e-5, rtol=1e-5)


def test_relufy_refuses_an_unknown_activation_before_changing_anything():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU6(), torch.nn.Linear(32, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ssdfx.UnsupportedSiteError, match=r"replace that activation module"):
        ssdfx.relufy(model)
    assert isinstance(model[1], torch.nn.ReLU6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
