"""The training loop both recipes share: data order, optimizer, mixed precision, checkpoints and resume.

What is trained and how its loss is computed is a ``Recipe`` (query layers on a Wan2.1 host, or a DiT-Mem
encoder against a frozen one); the loop only sees its trainable parameters and its loss. A step is
``batch_size`` items per process (gradients accumulated, then averaged over processes by DDP). The data order
comes from one seeded generator, the same in every process; each process draws its noise from its own.
Checkpoints hold every process's random state with the position in the epoch, so a resumed run draws exactly
the items (and noise) the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .checkpointing import (
    TrainCheckpointError,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    rng_snapshot,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import Processes

log = logging.getLogger("memlearner")


class Recipe(Protocol):
    """An ``nn.Module`` whose ``forward(item, generator)`` is the scalar loss of one data item, all randomness
    drawn from ``generator`` (and torch's global state, e.g. dropout)."""

    def __call__(self, item, generator: torch.Generator) -> torch.Tensor: ...

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """Name -> parameter, in a fixed order (the optimizer follows it)."""

    def checkpointed(self) -> dict[str, torch.Tensor]:
        """Everything training changes (the trainable parameters, running statistics), saved in checkpoints."""

    def export(self, folder: Path) -> list[Path]:
        """Write what the ComfyUI nodes load (model weights, the pack's tensors); returns the files."""


@dataclass
class TrainResult:
    start_step: int
    steps_done: int
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    exported: list[Path] = field(default_factory=list)


def require_data(items: list) -> None:
    """Refuse to train on nothing, saying why it can be empty."""
    if not items:
        raise ValueError("no training data: every video was skipped (see the warnings above) or the folder is empty")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate factor of optimizer step ``step`` (0-based): ``(step + 1) / warmup_steps`` up to 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def data_order(n: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=generator).tolist()


def train(cfg: TrainConfig, recipe: Recipe, items: list, device: str | torch.device = "cpu",
          on_step=None, processes: Processes | None = None) -> TrainResult:
    """Run ``cfg.steps`` optimizer steps over ``items`` (resuming from the newest checkpoint in
    ``cfg.output_dir/checkpoints``), checkpointing every ``cfg.checkpoint_every`` steps and at the end, then
    export. ``on_step(step, loss)`` is called after each step (progress bars); ``processes`` is this process's
    place in a ``torchrun`` launch (default: alone)."""
    require_data(items)
    procs = processes or Processes()
    params = recipe.trainable()
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order_gen = torch.Generator().manual_seed(cfg.seed)  # the same in every process
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * procs.rank)
    torch.manual_seed(cfg.seed + procs.rank)
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    step, position, order = 0, 0, None
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        step, tensors, state = load_checkpoint(last, optimizer)
        ranks = state["rng"]["ranks"]
        if len(ranks) != procs.world:
            raise TrainCheckpointError(f"{last} was written by {len(ranks)} process(es); resume it with the same "
                                       f"number (this run has {procs.world}) so no item is lost or repeated")
        with torch.no_grad():
            for name, t in recipe.checkpointed().items():
                t.copy_(tensors[name])
        position = restore_rng(ranks[procs.rank], noise_gen)
        order_gen.set_state(torch.tensor(state["rng"]["order_generator"], dtype=torch.uint8))
        order = state["rng"]["order"]
        log.info("resuming from %s (step %d)", last, step)
    result = TrainResult(start_step=step, steps_done=step, checkpoint=last)
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    module = procs.wrap(recipe)
    while step < cfg.steps:
        total = 0.0
        for micro in range(cfg.batch_size):
            if position == 0 or order is None:
                order = data_order(len(items), order_gen)  # a new epoch
            item = items[order[(position + procs.rank) % len(items)]]
            position = position + procs.world if position + procs.world < len(items) else 0
            last_micro = micro == cfg.batch_size - 1
            sync = contextlib.nullcontext() if last_micro or procs.world == 1 else module.no_sync()
            with sync:
                with autocast:
                    loss = module(item, noise_gen) / cfg.batch_size
                loss.backward()
            total += float(loss.detach())
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        for group in optimizer.param_groups:  # linear warmup, a function of the step alone (exact on resume)
            group["lr"] = cfg.lr * warmup_factor(step, cfg.warmup_steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        result.losses.append(procs.mean(total))
        if on_step is not None:
            on_step(step, result.losses[-1])
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            ranks = procs.gather(rng_snapshot(noise_gen, position))
            rng = {"ranks": ranks, "order": order, "order_generator": order_gen.get_state().tolist()}
            if procs.is_main:
                result.checkpoint = save_checkpoint(ckpt_dir, step, recipe.checkpointed(), optimizer, rng,
                                                    {"loss": result.losses[-1], "processes": procs.world},
                                                    keep=cfg.keep_checkpoints)
            procs.barrier()
    result.steps_done = step
    if procs.is_main:
        result.exported = recipe.export(Path(cfg.output_dir) / "export")
    procs.barrier()
    return result
