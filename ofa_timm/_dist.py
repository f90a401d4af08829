"""The process's place in ``torch.distributed``, which works the same outside it (rank 0 of 1, barriers are no-ops)."""
from typing import Tuple

import torch.distributed as dist


def rank_and_world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank; nothing to wait for in a single process."""
    if rank_and_world()[1] > 1:
        dist.barrier()
