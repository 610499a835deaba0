"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

gloo on CPU, NCCL on CUDA. A run started without torchrun is a world of one and creates no process group.
`scope` narrows a process to a subgroup (asynchronous GRPO's trainers): init_distributed then returns its rank and
size in that group, and barrier / all_reduce_sum / broadcast_object / DDP / the checkpoint's gathers run over it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_scope: tuple[DistInfo, object] | None = None
"""(this process's DistInfo inside the group, the group) while scoped, else None: the default group."""


def scope(info: DistInfo | None, group=None) -> None:
    """Run this process's collectives over `group`, seen as `info` (rank and size inside it); None: the default
    group again. Every process of the world must still create the group (torch.distributed.new_group)."""
    global _scope
    _scope = None if info is None else (info, group)


def scoped_group():
    """The group collectives run over (None: the default group)."""
    return _scope[1] if _scope is not None else None


def init_distributed() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    if _scope is not None:
        return _scope[0]
    return DistInfo(rank, world, local_rank, device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=scoped_group())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=scoped_group())
    return t


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=scoped_group())  # src: a global rank
        return box[0]
    return obj


def shutdown() -> None:
    scope(None)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
