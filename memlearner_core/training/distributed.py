"""This process's place in a data-parallel launch, through accelerate; one process by default.

``accelerate launch --multi_gpu --num_processes N -m memlearner_train run.toml`` or ``torchrun --nproc_per_node N -m
memlearner_train run.toml`` starts N processes with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; each joins the
process group through accelerate's ``PartialState`` (NCCL on CUDA, gloo on the CPU), trains on its own GPU and its
own share of every step's items, and the gradients are averaged by the DDP wrapper accelerate puts on the recipe
(``trainer.train``). Rank 0 alone writes checkpoints and exports. Without those variables everything runs in
this one process, unchanged, and accelerate's process state is left alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def partial_state():
    """accelerate's process state (joins the process group on first use in a launched process: on the CPU, gloo,
    when there is no CUDA or ``accelerate launch --cpu`` said so)."""
    try:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
    except ImportError:
        raise ImportError("training needs accelerate: pip install 'comfyui-memlearner[train]'") from None
    return PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))


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
        """This process's place among the ones ``accelerate launch`` or ``torchrun`` started (joins the group),
        or a single process."""
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return cls()
        state = partial_state()
        return cls(state.process_index, state.num_processes, state.local_process_index)

    def device(self) -> torch.device:
        """This process's GPU (``cuda:LOCAL_RANK``, as accelerate set it), or the CPU."""
        return partial_state().device if self.world > 1 else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (picklable objects)."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def mean(self, value: float) -> float:
        """The average of ``value`` over the ranks (the logged loss)."""
        return value if self.world == 1 else sum(self.gather(value)) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            partial_state().wait_for_everyone()
