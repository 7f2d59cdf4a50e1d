"""Data-parallel training under ``torchrun`` (gloo on CPU): process group and DDP wrapper.

Each process trains on its own shard of every epoch (``Loader(shard=(rank, world))``, the
equivalent of a ``DistributedSampler``); DDP averages the model's gradients, ``sync_grads``
does the same for other trained modules (scheme A's teacher), and only rank 0 writes files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


def setup() -> tuple[int, int]:
    """Join the process group torchrun describes (if any); return ``(rank, world_size)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def wrap(model: nn.Module) -> nn.Module | None:
    """``model`` in DistributedDataParallel when running with several processes, else None."""
    if not _active():
        return None
    # DDP copies rank 0's parameters and buffers to all ranks now and its buffers before each
    # forward, so quantizer statistics (Brevitas runtime-stats buffers) agree across ranks.
    return DistributedDataParallel(model)


def broadcast(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers of ``module`` to all processes (modules outside DDP)."""
    if not _active():
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


def sync_grads(module: nn.Module) -> None:
    """Average ``module``'s gradients over all processes (for trained modules outside DDP)."""
    if not _active():
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def all_finite(loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every process, so all ranks stop together on a NaN."""
    ok = torch.tensor(float(torch.isfinite(loss.detach()).all()))
    if _active():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)
