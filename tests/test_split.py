"""Neuron splits: balanced, recover planted structure, warm-startable."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import models
import ssdfx
from ssdfx import split
from ssdfx.stats import SiteStats
from ssdfx.split import balanced_kmeans, labels_of, perm_of
from ssdfx.stability import adjusted_rand_index


def _planted(f=256, d=32, e=8, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(e, d, generator=g), dim=1)
    truth = torch.randperm(f, generator=g) % e
    rows = F.normalize(centers[truth] + noise * torch.randn(f, d, generator=g), dim=1)
    return rows, truth


@settings(max_examples=25, deadline=None)
@given(e=st.sampled_from([1, 2, 3, 4, 8]), m=st.integers(1, 12), d=st.integers(1, 9), seed=st.integers(0, 99))
def test_kmeans_is_exactly_balanced(e, m, d, seed):
    pts = torch.randn(e * m, d, generator=torch.Generator().manual_seed(seed))
    labels = balanced_kmeans(pts, e, seed=seed)
    assert torch.equal(torch.bincount(labels, minlength=e), torch.full((e,), m))
    perm = perm_of(labels)
    assert torch.equal(perm.sort().values, torch.arange(e * m))
    assert torch.equal(labels_of(perm, e), labels)


def test_kmeans_recovers_planted_clusters():
    rows, truth = _planted()
    labels = balanced_kmeans(rows, 8)
    assert adjusted_rand_index(labels, truth) > 0.95


def test_kmeans_warm_start_keeps_a_good_split():
    rows, truth = _planted(noise=0.05)
    labels = balanced_kmeans(rows, 8, init=truth)
    assert adjusted_rand_index(labels, truth) == pytest.approx(1.0)


def test_kmeans_split_beats_random_on_its_objective():
    model, _, _ = models.gpt2()
    site = ssdfx.find_ffns(model)[0]
    rows = split.kmeans_features(site, model)

    def objective(perm):
        lab = labels_of(perm, 8)
        cent = F.normalize(F.one_hot(lab, 8).float().T @ rows, dim=1)
        return (rows * cent[lab]).sum(1).mean()

    km = split.kmeans_split(site, model, 8)
    rnd = split.random_split(site, model, 8)
    assert objective(km) > objective(rnd) + 0.05


def test_glu_features_concatenate_gate_and_up():
    model, _, _ = models.llama()
    site = ssdfx.find_ffns(model)[0]
    feats = split.kmeans_features(site, model)
    assert feats.shape == (site.d_ff, 2 * site.d_model)
    gate = model.get_parameter(site.w_in.weight)
    torch.testing.assert_close(feats[:, : site.d_model], F.normalize(gate, dim=1))


def test_coactivation_split_recovers_groups_that_fire_together():
    f, e, n = 96, 4, 600
    g = torch.Generator().manual_seed(0)
    group = torch.randperm(f, generator=g) % e
    # each token activates one random group (plus a little noise)
    token_group = torch.randint(0, e, (n,), generator=g)
    active = (group.unsqueeze(0) == token_group.unsqueeze(1)).float()
    active = active * (torch.rand(n, f, generator=g) < 0.8) + (torch.rand(n, f, generator=g) < 0.03)
    site = dataclasses.replace(ssdfx.find_ffns(models.gpt2()[0])[0], d_ff=f)
    stats = SiteStats(site, torch.zeros(n, 4), active.clamp(max=1.0), eps=0.0)
    perm = split.coactivation_split(site, None, e, stats={site.name: stats})
    labels = labels_of(perm, e)
    assert torch.equal(torch.bincount(labels), torch.full((e,), f // e))
    assert adjusted_rand_index(labels, group) > 0.9


def test_coactivation_needs_stats():
    model, _, _ = models.gpt2()
    with pytest.raises(ValueError, match="needs activation statistics"):
        ssdfx.convert(model, num_experts=4, top_k=2, partition="coactivation")


def test_random_split_is_reproducible():
    model, _, _ = models.gpt2()
    site = ssdfx.find_ffns(model)[0]
    assert torch.equal(split.random_split(site, model, 4), split.random_split(site, model, 4))
    assert not torch.equal(split.random_split(site, model, 4, seed=1), split.random_split(site, model, 4))
