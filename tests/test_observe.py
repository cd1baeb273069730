"""observe: statistics from recorded FFN inputs equal the model's own activations."""

import pytest
import torch
import torch.fx as fx

import ssdfx
import models
from ssdfx.stats import calibrate_eps, observe
from ssdfx.passes import ObservePassConfig, observe as observe_pass, run_pass, unobserve
from ssdfx.passes.observe import InputRecorder


def _hook_activation(module):
    """Record a module's output (an independent view of the FFN's hidden activations)."""
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().reshape(-1, o.shape[-1])))
    return seen, handle


@pytest.mark.parametrize("family", ["gpt2_relu", "bert", "llama", "opt", "t5"])
def test_observe_leaves_outputs_and_model_unchanged(family):
    model, kwargs, _ = models.ALL[family]()
    model.eval()
    ref = models.output_of(model, kwargs)
    mods = [type(m) for m in model.modules()]
    stats = observe(model, [kwargs])
    assert [type(m) for m in model.modules()] == mods
    torch.testing.assert_close(models.output_of(model, kwargs), ref, atol=0, rtol=0)
    assert len(stats) == len(ssdfx.find_ffns(model))
    n_tokens = kwargs["input_ids"].numel()
    for st in stats.values():
        assert st.x.shape[0] in (n_tokens, kwargs["labels"].numel())  # T5's decoder sees labels
        assert st.h.shape == (st.x.shape[0], st.site.d_ff)


def test_recorded_activations_equal_the_models():
    model, kwargs, _ = models.gpt2("relu")
    model.eval()
    seen, handle = _hook_activation(model.transformer.h[1].mlp.act)
    model(**kwargs)
    handle.remove()
    stats = observe(model, [kwargs])
    st = stats["transformer.h.1.mlp.c_fc.weight"]
    torch.testing.assert_close(st.h, seen[0], atol=1e-5, rtol=1e-5)
    assert st.eps == 0.0  # ReLU: active means non-zero
    assert st.sparsity == pytest.approx(1 - (seen[0] > 0).float().mean().item())


def test_glu_activations_include_the_up_branch():
    model, kwargs, _ = models.llama()
    model.eval()
    mlp = model.model.layers[0].mlp
    seen = []
    handle = mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    model(**kwargs)
    handle.remove()
    st = observe(model, [kwargs])["model.layers.0.mlp.gate_proj.weight"]
    torch.testing.assert_close(st.h, seen[0], atol=1e-5, rtol=1e-5)


def test_eps_calibration_meets_the_tolerance():
    torch.manual_seed(0)
    h = torch.nn.functional.gelu(torch.randn(512, 256) * 2)
    w2 = torch.randn(64, 256)
    eps = calibrate_eps(h, w2, 0.01)
    y = h @ w2.T
    err = lambda e: ((h * (h.abs() <= e)) @ w2.T).norm() / y.norm()
    assert eps > 0
    assert err(eps) < 0.01
    assert err(eps * 1.05 + 1e-6) >= 0.0099  # close to the largest such eps


def test_gelu_sparsity_uses_calibrated_eps():
    model, kwargs, _ = models.gpt2()
    model.eval()
    st = observe(model, [kwargs])["transformer.h.0.mlp.c_fc.weight"]
    assert st.eps > 0
    assert 0.0 < st.sparsity < 1.0
    assert st.sparsity == pytest.approx(1 - (st.h.abs() > st.eps).float().mean().item())


def test_observe_pass_and_its_inverse():
    module = models.MLP(16, 64)
    gm = fx.symbolic_trace(module)
    code = gm.code
    rec = InputRecorder(100)
    res = run_pass(observe_pass, gm, ObservePassConfig({"c_fc.weight": rec}))
    assert res.modified and "ssdfx_observer_0" in gm.code
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(gm(x), module(x))
    torch.testing.assert_close(rec.sample(), x.reshape(-1, 16))
    run_pass(unobserve, gm)
    assert "ssdfx_observer" not in gm.code
    assert gm.code.strip().splitlines()[-3:] == code.strip().splitlines()[-3:]


def test_recorder_caps_tokens():
    rec = InputRecorder(10)
    rec(torch.randn(4, 3, 8))
    rec(torch.randn(4, 3, 8))
    assert rec.sample().shape == (10, 8) and rec.seen == 24


def test_observe_refuses_converted_model():
    model, kwargs, _ = models.gpt2()
    ssdfx.convert(model, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="revert"):
        observe(model, [kwargs])


def test_padding_positions_are_not_recorded():
    # GPT-2 is causal: the first 4 positions of a right-padded batch see exactly what a batch
    # of only those 4 positions sees, so their recorded inputs must be that batch's, and the
    # padding none of them
    model, kwargs, _ = models.gpt2()
    model.eval()
    ids = kwargs["input_ids"]
    mask = torch.zeros_like(ids)
    mask[:, :4] = 1
    padded = ssdfx.observe(model, [{"input_ids": ids, "attention_mask": mask}])
    short = ssdfx.observe(model, [{"input_ids": ids[:, :4]}])
    for name, st in padded.items():
        assert st.tokens_seen == short[name].tokens_seen == ids.shape[0] * 4
        torch.testing.assert_close(st.x, short[name].x, rtol=1e-5, atol=1e-6)
