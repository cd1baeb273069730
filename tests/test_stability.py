"""Coverage, adjusted Rand index, and the stability trigger."""

import itertools

import pytest
import torch

import models
from ssdfx.stats import observe
from ssdfx.stability import StabilityMonitor, adjusted_rand_index, coverage, oracle_mean_k, routed_coverage


def test_coverage_by_brute_force():
    g = torch.Generator().manual_seed(0)
    mass = torch.rand(7, 12, generator=g)
    perm = torch.randperm(12, generator=g)
    e, k = 4, 2
    want = []
    for t in range(7):
        per_expert = [mass[t, perm[3 * j: 3 * j + 3]].sum().item() for j in range(e)]
        want.append(sum(sorted(per_expert, reverse=True)[:k]) / sum(per_expert))
    assert coverage(mass, perm, e, k) == pytest.approx(sum(want) / 7)
    assert coverage(mass, perm, e, e) == pytest.approx(1.0)
    idx = torch.tensor([[0, -1]] * 7)
    want_r = sum(mass[t, perm[0:3]].sum().item() / mass[t].sum().item() for t in range(7)) / 7
    assert routed_coverage(mass, perm, e, idx) == pytest.approx(want_r)


def test_oracle_mean_k():
    mass = torch.tensor([[10.0, 0, 0, 0], [1, 1, 1, 1]])
    assert oracle_mean_k(mass, torch.arange(4), 4, 0.9) == pytest.approx((1 + 4) / 2)


def _ari_reference(a, b):
    """ARI from pair counting over all pairs of items (independent of the contingency formula)."""
    n = len(a)
    same_a = [a[i] == a[j] for i, j in itertools.combinations(range(n), 2)]
    same_b = [b[i] == b[j] for i, j in itertools.combinations(range(n), 2)]
    both = sum(x and y for x, y in zip(same_a, same_b))
    pa, pb, total = sum(same_a), sum(same_b), len(same_a)
    expected = pa * pb / total
    return (both - expected) / ((pa + pb) / 2 - expected)


def test_ari_against_pair_counting():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.randint(0, 4, (30,), generator=g)
        b = torch.randint(0, 3, (30,), generator=g)
        assert adjusted_rand_index(a, b) == pytest.approx(_ari_reference(a.tolist(), b.tolist()))
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, torch.tensor([2, 2, 0, 0, 1, 1])) == pytest.approx(1.0)


def test_monitor_triggers_on_a_fixed_model_and_not_on_a_changing_one():
    model, kwargs, _ = models.gpt2("relu")
    model.eval()
    mon = StabilityMonitor(num_experts=4, top_k=1, tol=0.03, patience=2)
    reports = [mon.check(model, observe(model, [kwargs]), step=i) for i in range(3)]
    assert reports[0].mean_delta is None and not reports[0].stable
    assert reports[1].mean_delta == pytest.approx(0.0, abs=0.03) and not reports[1].stable
    assert reports[2].stable
    # re-randomise the FFN input weights: the old split no longer fits the new pattern. A seeded
    # generator: drawn from the global RNG, the outcome depended on which tests ran before (one
    # order gave mean_delta 0.028; over seeds 0-7 it is 0.030-0.090, this one 0.090)
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "c_fc.weight" in name:
            torch.nn.init.normal_(p, std=0.5, generator=g)
    r = mon.check(model, observe(model, [kwargs]), step=3)
    assert r.mean_delta > 0.03 and not r.stable and r.streak == 0
    assert set(r.as_dict()) >= {"sparsity", "coverage", "coverage_prev", "ari", "stable"}


def test_reachable_as_an_attribute_after_import_ssdfx():
    # the README names it ssdfx.stability; it loads on first use (it pulls in numba)
    import subprocess
    import sys

    code = ("import sys, ssdfx; assert 'ssdfx.stability' not in sys.modules; "
            "print(ssdfx.stability.StabilityMonitor.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "StabilityMonitor"
