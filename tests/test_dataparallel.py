"""ssdfx.dataparallel on two gloo processes: gradients become the mean of the ranks' own
gradients (computed here independently), and every rank takes rank 0's parameters and buffers,
across several buckets and dtypes."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ssdfx import dataparallel


def _module(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(24, 40), nn.LayerNorm(40), nn.Linear(40, 8))
    m.register_buffer("steps", torch.arange(5, dtype=torch.int64) * (seed + 1))
    m.register_buffer("scale", torch.randn(3).to(torch.bfloat16))
    m[1].bias.requires_grad_(False)  # frozen: keeps its (None) gradient
    return m


def _grads(m: nn.Module, rank: int) -> None:
    """Rank-specific gradients; rank 1 leaves the last bias without one."""
    torch.manual_seed(100 + rank)
    x = torch.randn(6, 24)
    (m(x) ** 2).sum().backward()
    if rank == 1:
        m[2].bias.grad = None


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        dataparallel.BUCKET_BYTES = 1024  # several buckets (the first Linear's weight alone is larger)
        m = _module(seed=rank)
        _grads(m, rank)
        dataparallel.average_gradients(m, 2)
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
        dataparallel.broadcast_state(m)
        torch.save({"grads": grads, "state": m.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_average_gradients_and_broadcast_state(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # the reference: each rank's own gradients, computed in this process, and their mean
    own = []
    for rank in range(2):
        m = _module(seed=rank)
        _grads(m, rank)
        own.append({n: p.grad for n, p in m.named_parameters()})
    for name, g0 in own[0].items():
        g1 = own[1][name]
        for rank in range(2):
            avg = got[rank]["grads"][name]
            if name == "1.bias":  # frozen on both ranks: untouched
                assert g0 is None and g1 is None and avg is None
                continue
            g1_or_zero = torch.zeros_like(g0) if g1 is None else g1
            torch.testing.assert_close(avg, (g0 + g1_or_zero) / 2, rtol=0, atol=0)

    rank0 = _module(seed=0).state_dict()
    assert not torch.equal(rank0["0.weight"], _module(seed=1).state_dict()["0.weight"])
    for rank in range(2):
        state = got[rank]["state"]
        assert state.keys() == rank0.keys()
        for name, ref in rank0.items():
            assert state[name].dtype == ref.dtype and torch.equal(state[name], ref), (rank, name)
