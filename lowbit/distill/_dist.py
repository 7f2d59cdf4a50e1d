"""Data-parallel training under ``torchrun`` (gloo on CPU): process group and DDP wrapper."""

from __future__ import annotations

import os

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


def wrap(model: nn.Module) -> nn.Module | None:
    """``model`` in DistributedDataParallel when running with several processes, else None."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return DistributedDataParallel(model)
