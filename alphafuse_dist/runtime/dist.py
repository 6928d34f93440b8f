"""The process group as the training and validation code sees it: one process without a group is
rank 0 of 1."""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(this worker's rank, number of workers); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all workers, in place (unchanged with one worker)."""
    if rank_world()[1] > 1:
        dist.all_reduce(t)
    return t
