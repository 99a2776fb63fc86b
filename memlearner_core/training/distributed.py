"""Data-parallel training through torch.distributed (launched by ``torchrun``) and DDP; one process by default.

``torchrun --nproc_per_node N -m memlearner_train run.toml`` starts N processes with ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` set; each joins the process group (NCCL on CUDA, gloo on CPU), trains on its own GPU and
its own share of every step's items, and DDP averages the gradients. Rank 0 alone writes checkpoints and
exports. Without those variables everything runs in this one process, unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Processes:
        """This process's place among the ones ``torchrun`` started (joins the group), or a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(rank, world, local)

    def device(self) -> torch.device:
        """This process's GPU (``cuda:LOCAL_RANK``), or the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under DDP when there are several processes. Unused parameters are allowed: a DiT-Mem
        encoder's spare BatchNorms and a frozen backbone get no gradient."""
        if self.world == 1:
            return module
        ids = [self.local_rank] if torch.cuda.is_available() else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (picklable objects)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        """The average of ``value`` over the ranks (the logged loss)."""
        return value if self.world == 1 else sum(self.gather(value)) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
