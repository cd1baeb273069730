"""convert/revert on every model family: exact with k == E, exact round trip, HF API intact."""

import copy

import pytest
import torch

import ssdfx
import models

FAMILIES = sorted(models.ALL)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("partition", ["contiguous", "random"])
@pytest.mark.parametrize("family", FAMILIES)
def test_all_experts_equals_dense(family, partition):
    """k == E: outputs and every dense parameter's gradient equal the dense model's (fp32)."""
    model, kwargs, _ = models.ALL[family]()
    dense = copy.deepcopy(model)
    ssdfx.convert(model, num_experts=4, top_k=4, partition=partition)
    torch.testing.assert_close(models.output_of(model, kwargs), models.output_of(dense, kwargs),
                               atol=1e-5, rtol=1e-5)
    models.loss_of(model, kwargs).backward()
    models.loss_of(dense, kwargs).backward()
    got, want = _grads(model), _grads(dense)
    router = {n for n in got if "ssdfx_router" in n}
    assert router, "the router must receive a gradient (straight-through gate)"
    assert set(got) - router == set(want)
    # convert permuted neurons in place; revert (below) restores the order, so compare after it
    ssdfx.revert(model)
    got = {n: p.grad for n, p in model.named_parameters()}
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact(family):
    model, kwargs, _ = models.ALL[family]()
    before = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    objects = [p for _, p in model.named_parameters()]
    ref = models.output_of(model, kwargs)
    ssdfx.convert(model, num_experts=2, top_k=1, partition="random")
    assert ssdfx.is_converted(model)
    sparse = models.output_of(model, kwargs)
    assert torch.isfinite(sparse).all()
    assert not torch.allclose(sparse, ref, atol=1e-6), "top-1 of 2 experts must differ from dense"
    ssdfx.revert(model)
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before]
    for (n, old), (_, new) in zip(before, after):
        assert torch.equal(old, new), n
    assert all(a is b for a, b in zip(objects, (p for _, p in after))), "parameter objects must survive"
    assert torch.equal(models.output_of(model, kwargs), ref)
    assert not ssdfx.is_converted(model)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_save_pretrained_after_revert_reloads_the_same_model(family, tmp_path):
    # SPEC: an HF model keeps save_pretrained after revert (no ssdfx buffers, names or modules
    # left behind), and from_pretrained gives back the same outputs
    model, kwargs, _ = models.ALL[family]()
    model.eval()
    ssdfx.convert(model, num_experts=4, top_k=2, partition="kmeans")
    ssdfx.revert(model)
    ref = models.output_of(model, kwargs)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert not any("ssdfx" in k for k in loaded.state_dict())
    assert loaded.state_dict().keys() == model.state_dict().keys()
    torch.testing.assert_close(models.output_of(loaded, kwargs), ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "bert", "t5_gated", "llama"])
def test_hf_forward_with_labels_and_loss(family):
    model, kwargs, _ = models.ALL[family]()
    ssdfx.convert(model, num_experts=4, top_k=2)
    out = model(**kwargs)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "ssdfx_router" in n)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_matches_dense_when_all_experts(family):
    model, kwargs, _ = models.ALL[family]()
    model.eval()
    prompt = kwargs["input_ids"][:1, :4]
    want = model.generate(prompt, max_new_tokens=6, do_sample=False)
    ssdfx.convert(model, num_experts=4, top_k=4)
    got = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    ssdfx.convert  # generate also runs sparse
    ssdfx.revert(model)
    ssdfx.convert(model, num_experts=4, top_k=1)
    assert model.generate(prompt, max_new_tokens=6, do_sample=False).shape == want.shape


def test_rewritten_graph_prints_router_selection_and_experts():
    model, _, _ = models.gpt2()
    ssdfx.convert(model, num_experts=4, top_k=2)
    code = model.transformer.h[0].mlp.code
    assert "ssdfx: moefy rewrote 1 site(s)" in code
    assert "ssdfx_router" in code and "select_top_k" in code and "ssdfx_experts" in code
    assert "addmm" not in code and "tanh" not in code  # the dense FFN is gone, not masked


def test_optimizer_state_follows_the_permutation():
    model, kwargs, _ = models.gpt2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    models.loss_of(model, kwargs).backward()
    opt.step()
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    ssdfx.convert(model, num_experts=4, top_k=4, partition="random", optimizer=opt)
    w = model.transformer.h[0].mlp.c_fc.weight
    perm = model.transformer.h[0].mlp.ssdfx_perm
    torch.testing.assert_close(opt.state[w]["exp_avg"], state[id(w)]["exp_avg"][:, perm])
    ssdfx.revert(model, optimizer=opt)
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[id(p)][k])


def test_factored_optimizer_state_follows_and_unknown_state_is_refused():
    # Adafactor keeps per-row and per-column statistics ((F, 1) and (1, d) for a (F, d)
    # weight): a converted step then revert must train exactly like the dense model
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))

    x = torch.randn(32, 16)
    sparse, dense = net(), net()
    opts = [torch.optim.Adafactor(m.parameters(), lr=1e-2) for m in (sparse, dense)]

    def step(model, opt):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    for _ in range(2):
        step(sparse, opts[0])
        step(dense, opts[1])
    ssdfx.convert(sparse, num_experts=4, top_k=4, partition="random", optimizer=opts[0])
    step(sparse, opts[0])
    step(dense, opts[1])
    ssdfx.revert(sparse, optimizer=opts[0])
    for p, q in zip(sparse.parameters(), dense.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # state indexed in a way convert cannot tell: refused before anything changes
    w = sparse[0].weight
    opts[0].state[w]["odd"] = torch.zeros(8, 8)
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    with pytest.raises(ValueError, match="optimizer state 'odd' of 0.weight has shape"):
        ssdfx.convert(sparse, num_experts=4, top_k=4, partition="random", optimizer=opts[0])
    assert not ssdfx.is_converted(sparse)
    for k, v in sparse.state_dict().items():
        assert torch.equal(v, before[k])


def test_converted_model_state_dict_has_routers_and_permutations():
    model, _, _ = models.bert()
    ssdfx.convert(model, num_experts=4, top_k=2)
    keys = set(model.state_dict())
    assert "bert.encoder.layer.0.intermediate.ssdfx_router.weight" in keys
    assert "bert.encoder.layer.0.intermediate.ssdfx_perm" in keys
    assert "bert.encoder.layer.0.output.dense.weight" in keys  # w_out keeps its name


class _TwoFFNs(torch.nn.Module):
    """Two FFNs inline in one forward: one module scope holding two sites."""

    def __init__(self, d=16):
        super().__init__()
        self.a1, self.a2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        self.b1, self.b2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.a2(torch.relu(self.a1(x)))
        return x + self.b2(torch.relu(self.b1(x)))


def test_permutation_buffers_name_each_site_of_a_shared_scope():
    # the training driver rebuilds converted models from a state dict by these names
    # (checkpoints, final_moe/); two sites in one forward get suffixed buffers and routers
    from ssdfx.saving import shell_routers

    torch.manual_seed(0)
    model, x = _TwoFFNs(), torch.randn(3, 5, 16)
    sites = ssdfx.find_ffns(model, (x,))
    parts = {s.name: torch.randperm(64) for s in sites}
    ssdfx.convert(model, 4, 2, sites=sites, partition=parts, example_inputs=(x,))
    paths = ssdfx.api.permutation_buffers(model)
    assert len(paths) == 2 and len(set(paths.values())) == 2
    state = model.state_dict()
    for site, path in paths.items():
        assert torch.equal(state[path], parts[site])

    fresh = _TwoFFNs()
    fresh_sites = ssdfx.find_ffns(fresh, (x,))
    ssdfx.convert(fresh, 4, 2, sites=fresh_sites, example_inputs=(x,),
                  partition={site: state[path] for site, path in paths.items()},
                  router=shell_routers(state, paths))
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert ssdfx.api.permutation_buffers(ssdfx.revert(model)) == {}


@pytest.mark.parametrize("family, fullgraph", [("block", True), ("gpt2", False)])
def test_torch_compile_of_converted_model_matches_eager(family, fullgraph):
    # the routed op has a fake implementation, so dynamo traces through it (fullgraph: no
    # graph break anywhere in a converted nanoGPT block; HF GPT-2 breaks on its own logging)
    model, kwargs, _ = getattr(models, family)()
    ssdfx.convert(model, 4, 2)
    kwargs = {n: (v.clone().requires_grad_() if v.is_floating_point() else v)
              for n, v in kwargs.items()}

    def loss_and_grads(fn):
        model.zero_grad()
        out = models.loss_of(fn, kwargs)
        out.backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                              if p.grad is not None}

    torch._dynamo.reset()
    got = loss_and_grads(torch.compile(model, fullgraph=fullgraph))
    want = loss_and_grads(model)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert got[1].keys() == want[1].keys() and any(".ssdfx_router" in n for n in got[1])
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-5)


def test_bf16_gpt2_trains_through_the_numba_bf16_kernels(monkeypatch):
    """HF GPT-2 in bf16 (Conv1D: transposed weight views) through "auto" where MKL's bf16 GEMM
    is native: every FFN's forward and backward run numba's bf16 kernels, and the loss and
    every gradient match the torch path's (same routing, bf16 roundings apart)."""
    from ssdfx.ops import blas, cpu_numba, dispatch

    if not blas.HAS_BF16_GEMM:
        pytest.skip("this torch build exports no MKL cblas_gemm_bf16bf16f32")
    calls = []
    for name in ("forward_bf16", "backward_bf16"):
        real = getattr(cpu_numba, name)
        monkeypatch.setattr(cpu_numba, name,
                            lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    monkeypatch.setattr(dispatch, "_numba_bf16", lambda: True)
    monkeypatch.setattr(dispatch, "native_gemm", lambda dtype: True)
    model, kwargs, _ = models.gpt2()
    model = model.to(torch.bfloat16)
    by_torch = copy.deepcopy(model)
    ssdfx.convert(model, num_experts=4, top_k=2)
    ssdfx.convert(by_torch, num_experts=4, top_k=2, backend="torch")
    loss, want = models.loss_of(model, kwargs), models.loss_of(by_torch, kwargs)
    loss.backward()
    want.backward()
    assert calls == ["forward_bf16", "forward_bf16", "backward_bf16", "backward_bf16"]
    assert abs(loss.item() - want.item()) <= 1e-3 * abs(want.item())
    got, ref = _grads(model), _grads(by_torch)
    assert got.keys() == ref.keys() and any("c_fc" in n for n in got)
    for n in got:
        scale = ref[n].float().abs().max().item()
        assert (got[n].float() - ref[n].float()).abs().max().item() <= 1e-2 * (1 + scale), n
