"""Neuron splits (MoEfication): which FFN neurons form each expert.

A split is a permutation `perm` of the d_ff neurons; expert e is perm[e*m:(e+1)*m] with
m = d_ff / E, so every expert has exactly m neurons.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from ssdfx.site import FFNSite

__all__ = ["partition", "random_split", "METHODS"]


def _seed_for(site: FFNSite, seed: int) -> int:
    # stable across processes (unlike hash()), so every DDP rank draws the same split
    return (zlib.crc32(site.name.encode()) + seed) % (2**31)


def random_split(site: FFNSite, model: nn.Module, num_experts: int, seed: int = 0) -> torch.Tensor:
    """A uniformly random balanced split: the ablation baseline."""
    g = torch.Generator().manual_seed(_seed_for(site, seed))
    return torch.randperm(site.d_ff, generator=g)


METHODS = {"random": random_split}


def partition(method: str, site: FFNSite, model: nn.Module, num_experts: int, **kwargs) -> torch.Tensor:
    try:
        fn = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown partition {method!r}; choose one of "
                         f"{['contiguous', *sorted(METHODS)]}, a mapping or a callable") from None
    return fn(site, model, num_experts, **kwargs)
