"""torchrun's environment as the trainer and the probes use it: one definition of the set-up."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    distributed: bool   # started by torchrun (RANK and WORLD_SIZE set)
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def process_group(log: logging.Logger) -> Iterator[Ranks]:
    """The process group (NCCL on CUDA, gloo on CPU) when torchrun started this process, this
    rank's device, and logging tagged with the rank (INFO on rank 0 only); the group is destroyed
    on the way out, also after an error."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    logging.basicConfig(level=logging.WARNING, format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", force=True)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        yield Ranks(distributed, rank, world, local_rank, device)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
