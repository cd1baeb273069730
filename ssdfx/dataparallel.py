"""Data parallelism for the training driver: rank 0's state to every rank, gradients averaged.

What `nn.parallel.DistributedDataParallel` does for the driver, done differently because DDP
crashed processes at exit here: 3 of 30 two-rank runs of tests/ddp_worker.py died with SIGABRT
("terminate called without an active exception") after training had completed and every rank
had saved its results. The core dumps show a gloo worker thread dropping the last reference to
a finished all-reduce work after the interpreter had begun finalizing: destroying the work
releases Python objects it holds (the tensors it reduced, and under torch 2.13 a copy of the
contextvars context that every backward stashes in its thread-local state, which the works DDP
launches inside backward capture), that needs the GIL, and a thread that asks for the GIL
during finalization is torn down, here inside a noexcept destructor.

So the collectives here run outside backward and keep their work handles (`_held`) until the
next round: a gloo thread then only lets go of a work that this thread still references, which
needs no GIL, and the work is destroyed here, a step later or at exit. Without the handles
(the same collectives, handles dropped after `wait`) 2 of 50 runs still crashed; with them, none
of 150. What this gives up is DDP's overlap of communication with backward, which runs of this
driver's size barely have to hide: `torchrun --nproc_per_node=2 -m ssdfx train` (the default
GPT-2 4x256, gloo on this 2-core CPU) trained at 8.4-8.5k tokens/s dense and 12.8-13.2k sparse
both with DDP and with this.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["average_gradients", "broadcast_state"]

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size

_held: list = []  # the latest round's work handles (see the module docstring)


def _buckets(tensors: Iterable[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive tensors of one dtype, at most BUCKET_BYTES together (or one larger tensor)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > BUCKET_BYTES or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def _unflatten(flat: torch.Tensor, bucket: list[torch.Tensor]) -> None:
    for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
        t.copy_(part.view(t.shape))


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers into every rank's `module` (same structure on
    every rank). Call it wherever DDP would be constructed: at the start and after a rewrite."""
    tensors = [t.detach() for t in itertools.chain(module.parameters(), module.buffers())]
    _bucketed(tensors, lambda flat: dist.broadcast(flat, src=src, async_op=True), lambda flat: flat)


@torch.no_grad()
def average_gradients(module: nn.Module, world: int) -> None:
    """Replace every trainable parameter's gradient by its mean over the `world` ranks, in
    buckets that are all in flight at once. A parameter without a gradient counts as zeros
    (and gets that mean), so every rank runs the same collectives whatever its batch touched."""
    grads = []
    for p in module.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    _bucketed(grads, lambda flat: dist.all_reduce(flat, async_op=True), lambda flat: flat.div_(world))


def _bucketed(tensors: list[torch.Tensor], launch, transform) -> None:
    """Start `launch` (an async collective) on every bucket of `tensors`, flattened, all in
    flight at once; then wait for each, write `transform(flat)` back into its tensors, and
    hold the work handles until the next round (see the module docstring)."""
    pending = []
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        pending.append((bucket, flat, launch(flat)))
    for bucket, flat, work in pending:
        work.wait()
        _unflatten(transform(flat), bucket)
    _held[:] = [work for _, _, work in pending]
