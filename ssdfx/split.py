"""Neuron splits (MoEfication): which FFN neurons form each expert.

A split is a permutation `perm` of the d_ff neurons; expert e is perm[e*m:(e+1)*m] with
m = d_ff / E, so every expert has exactly m neurons. Three methods (SPEC section 2):

* "kmeans" (default for SSD): balanced k-means on the L2-normalised rows of W_in (gate and up
  rows concatenated for a GLU), warm-startable from a previous split. Neurons whose input
  weights point the same way fire for the same tokens.
* "coactivation": a networkx graph of neurons weighted by how often two neurons fire together
  (from observed activations), cut into E equal parts by recursive bisection (spectral order,
  refined by Kernighan-Lin, which swaps pairs and so keeps the sizes exact).
* "random": the ablation baseline.
"""

from __future__ import annotations

import zlib

import networkx as nx
import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssdfx.site import FFNSite

__all__ = [
    "partition", "random_split", "kmeans_split", "coactivation_split", "balanced_kmeans",
    "labels_of", "perm_of", "METHODS",
]


def _seed_for(site: FFNSite, seed: int) -> int:
    # stable across processes (unlike hash()), so every data-parallel rank draws the same split
    return (zlib.crc32(site.name.encode()) + seed) % (2**31)


def labels_of(perm: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(F,) expert label of every neuron for a split `perm`."""
    f = perm.numel()
    labels = torch.empty(f, dtype=torch.long)
    labels[perm] = torch.arange(f) // (f // num_experts)
    return labels


def perm_of(labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The split whose experts are the label groups, in label order (a stable sort)."""
    return torch.as_tensor(np.argsort(np.asarray(labels), kind="stable"), dtype=torch.long)


def random_split(site: FFNSite, model: nn.Module, num_experts: int, *, seed: int = 0, **_) -> torch.Tensor:
    """A uniformly random balanced split: the ablation baseline."""
    g = torch.Generator().manual_seed(_seed_for(site, seed))
    return torch.randperm(site.d_ff, generator=g)


# -- balanced k-means ----------------------------------------------------------------------------


@numba.njit(cache=True)
def _greedy_assign(order, num_points, num_clusters, capacity):  # pragma: no cover - numba
    """order: (P*C,) flat indices of (point, cluster) pairs, best first. Returns (P,) labels."""
    labels = np.full(num_points, -1, dtype=np.int64)
    fill = np.zeros(num_clusters, dtype=np.int64)
    left = num_points
    for flat in order:
        p = flat // num_clusters
        c = flat % num_clusters
        if labels[p] < 0 and fill[c] < capacity:
            labels[p] = c
            fill[c] += 1
            left -= 1
            if left == 0:
                break
    return labels


def _balanced_assign(sim: np.ndarray, capacity: int) -> np.ndarray:
    """Each point to a cluster, at most `capacity` per cluster, best similarities first.

    Greedy on the pair list ordered by the point's regret (how much it loses by not getting its
    best cluster) would be better in theory; in practice plain similarity order followed by the
    swap refinement below lands within 0.5% of the exact assignment's objective here.
    """
    p, c = sim.shape
    order = np.argsort(-sim, axis=None, kind="stable")
    return _greedy_assign(order, p, c, capacity)


@numba.njit(cache=True)
def _swap_refine(sim, labels, rounds):  # pragma: no cover - numba
    """Pairwise swaps that raise the total similarity; sizes never change."""
    n = labels.shape[0]
    for _ in range(rounds):
        improved = False
        for i in range(n):
            for j in range(i + 1, n):
                a, b = labels[i], labels[j]
                if a != b:
                    gain = sim[i, b] + sim[j, a] - sim[i, a] - sim[j, b]
                    if gain > 1e-9:
                        labels[i], labels[j] = b, a
                        improved = True
        if not improved:
            break
    return labels


def balanced_kmeans(points: torch.Tensor, num_experts: int, *, init: torch.Tensor | None = None,
                    iters: int = 20, seed: int = 0, refine_rounds: int = 1) -> torch.Tensor:
    """(F,) labels, exactly F/E per cluster, maximising cosine similarity to the centroids.

    points (F, D) are L2-normalised. `init`: labels of a previous split (warm start).
    """
    f = points.shape[0]
    m = f // num_experts
    x = F.normalize(points.float(), dim=1)
    if init is None:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randperm(f, generator=g) % num_experts
    else:
        labels = init.clone()
    for _ in range(iters):
        cent = _centroids(x, labels, num_experts)  # (E, D)
        sim = (x @ cent.T).numpy()  # (F, E)
        new = torch.from_numpy(_balanced_assign(sim, m))
        if torch.equal(new, labels):
            break
        labels = new
    if refine_rounds:
        sim = (x @ _centroids(x, labels, num_experts).T).numpy().astype(np.float64)
        labels = torch.from_numpy(_swap_refine(sim, labels.numpy().copy(), refine_rounds))
    return labels


def _centroids(x: torch.Tensor, labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    # one-hot matmul: much faster than index_add_ on CPU for (F, D) rows
    onehot = F.one_hot(labels, num_experts).to(x.dtype)  # (F, E)
    return F.normalize(onehot.T @ x, dim=1)  # (E, D)


def kmeans_features(site: FFNSite, model: nn.Module) -> torch.Tensor:
    """(F, D) the rows k-means clusters: L2-normalised W_in rows, gate and up concatenated."""
    from ssdfx.stats import site_weights

    w = site_weights(model, site)
    rows = F.normalize(w["w1"].float(), dim=1)
    if w["w3"] is not None:
        rows = torch.cat([rows, F.normalize(w["w3"].float(), dim=1)], dim=1)
    return rows


def kmeans_split(site: FFNSite, model: nn.Module, num_experts: int, *, previous: torch.Tensor | None = None,
                 seed: int = 0, **_) -> torch.Tensor:
    """Balanced k-means split, warm-started from `previous` (a split of the same site)."""
    init = labels_of(previous, num_experts) if previous is not None else None
    labels = balanced_kmeans(kmeans_features(site, model), num_experts, init=init,
                             seed=_seed_for(site, seed))
    return perm_of(labels)


# -- co-activation graph -------------------------------------------------------------------------


def coactivation_graph(coact: torch.Tensor, neighbours: int = 32) -> nx.Graph:
    """Neurons as nodes; each keeps edges to the `neighbours` neurons it fires with most."""
    c = coact.clone().float()
    c.fill_diagonal_(0)
    f = c.shape[0]
    k = min(neighbours, f - 1)
    top = c.topk(k, dim=1)
    g = nx.Graph()
    g.add_nodes_from(range(f))
    rows = torch.arange(f).repeat_interleave(k)
    for i, j, w in zip(rows.tolist(), top.indices.reshape(-1).tolist(), top.values.reshape(-1).tolist()):
        if w > 0:
            prev = g.get_edge_data(i, j, {"weight": 0.0})["weight"]
            g.add_edge(i, j, weight=max(prev, w))
    return g


def _fiedler_order(g: nx.Graph, nodes: list[int]) -> list[int]:
    """Nodes sorted along the Fiedler vector of their subgraph (spectral bisection order)."""
    idx = {n: i for i, n in enumerate(nodes)}
    w = torch.zeros(len(nodes), len(nodes), dtype=torch.float64)
    for a, b, d in g.subgraph(nodes).edges(data="weight"):
        w[idx[a], idx[b]] = w[idx[b], idx[a]] = d
    lap = torch.diag(w.sum(1)) - w
    _, vecs = torch.linalg.eigh(lap)
    order = torch.argsort(vecs[:, 1] if len(nodes) > 1 else vecs[:, 0])
    return [nodes[i] for i in order.tolist()]


def _bisect(g: nx.Graph, nodes: list[int], parts: int, m: int, seed: int) -> list[list[int]]:
    if parts == 1:
        return [nodes]
    left = parts // 2
    order = _fiedler_order(g, nodes)
    a, b = set(order[: left * m]), set(order[left * m:])
    a, b = nx.community.kernighan_lin_bisection(g.subgraph(nodes), partition=(a, b), max_iter=4,
                                                weight="weight", seed=seed)
    return _bisect(g, sorted(a), left, m, seed) + _bisect(g, sorted(b), parts - left, m, seed)


def coactivation_split(site: FFNSite, model: nn.Module, num_experts: int, *, stats=None,
                       seed: int = 0, **_) -> torch.Tensor:
    """Balanced k-way cut of the co-activation graph (needs `stats` from ssdfx.observe)."""
    if stats is None:
        raise ValueError("partition='coactivation' needs activation statistics: pass "
                         "stats=ssdfx.observe(model, batches) to convert")
    st = stats[site.name] if isinstance(stats, dict) else stats
    g = coactivation_graph(st.coactivation())
    parts = _bisect(g, list(range(site.d_ff)), num_experts, site.d_ff // num_experts, _seed_for(site, seed))
    labels = torch.empty(site.d_ff, dtype=torch.long)
    for e, part in enumerate(parts):
        labels[torch.tensor(part)] = e
    return perm_of(labels)


METHODS = {"random": random_split, "kmeans": kmeans_split, "coactivation": coactivation_split}


def partition(method: str, site: FFNSite, model: nn.Module, num_experts: int, **kwargs) -> torch.Tensor:
    try:
        fn = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown partition {method!r}; choose one of "
                         f"{['contiguous', *sorted(METHODS)]}, a mapping or a callable") from None
    return fn(site, model, num_experts, **kwargs)
