"""One code path for one process (`python ...`) and many (`torchrun --nproc_per_node=N ...`).

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them we run as rank 0 of 1 and never touch
torch.distributed. Global batch is the user-facing knob; per-rank batch and gradient
accumulation are derived from it and asserted (SPEC §7).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Joining and leaving the process group is shared with the library's own commands.
from mindhier.runtime import Dist, distributed_session, init_distributed, shutdown  # noqa: F401


def split_global_batch(global_batch: int, world_size: int, max_per_rank: int | None = None) -> tuple[int, int]:
    """(per-rank micro batch, accumulation steps) such that micro·accum·world == global."""
    if global_batch % world_size:
        raise ValueError(
            f"global batch {global_batch} is not divisible by the {world_size} processes; "
            f"pick a multiple of {world_size}"
        )
    per_rank, accum = global_batch // world_size, 1
    if max_per_rank is not None:
        # Smallest accumulation that fits the memory cap and divides the per-rank batch exactly.
        while per_rank > max_per_rank:
            accum += 1
            while (global_batch // world_size) % accum:
                accum += 1
            per_rank = global_batch // world_size // accum
    assert per_rank * accum * world_size == global_batch
    return per_rank, accum


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of a tensor over ranks (identity when alone)."""
    if d.enabled:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world_size
    return value


def broadcast_object(obj, d: Dist):
    """Rank 0's Python object on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
