"""The training loop both recipes share: data order, optimizer, mixed precision, checkpoints and resume.

What is trained and how its loss is computed is a ``Recipe`` (query layers on a Wan2.1 host, or a DiT-Mem
encoder against a frozen one); the loop only sees its trainable parameters and its loss. Multi-process data
parallelism (DDP), bf16 mixed precision (autocast over fp32 weights) and gradient accumulation go through
accelerate's ``Accelerator``: a step is ``batch_size`` items per process (``gradient_accumulation_steps``), the
gradients averaged over processes. The data order comes from one seeded generator, the same in every process;
each process draws its noise from its own.

Checkpoints and random states stay this package's own (``checkpointing``), not ``Accelerator.save_state`` /
``load_state``: accelerate restores the random states inside a ``try`` that only logs a failure (a resume that
silently draws other noise), reads registered custom state (the data-order and noise generators, the position
in the epoch, which it does not track itself) by unpickling with ``weights_only=False``, writes in place (a crash
mid-save leaves a checkpoint that looks whole) and does not check that the number of processes matches. Ours hold
every process's random state with the position in the epoch as JSON in a folder published by rename, so a
resumed run draws exactly the items (and noise) the uninterrupted run would have, or refuses in one line.
"""

from __future__ import annotations

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


class _Step(torch.nn.Module):
    """What ``Accelerator.prepare`` wraps (DDP, autocast), so the recipe's own ``forward`` stays as it is."""

    def __init__(self, recipe: torch.nn.Module):
        super().__init__()
        self.recipe = recipe

    def forward(self, item, generator):
        return self.recipe(item, generator)


def accelerator_for(cfg: TrainConfig, device: torch.device, processes: Processes):
    """accelerate's ``Accelerator`` for ``cfg``: bf16 autocast or none, ``batch_size`` accumulation steps, DDP that
    allows unused parameters (a DiT-Mem encoder's spare BatchNorms, a frozen backbone get no gradient), the model
    left where the host put it (``device``; accelerate would move it to its own default GPU)."""
    try:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs
    except ImportError:
        raise ImportError("training needs accelerate: pip install 'comfyui-memlearner[train]'") from None
    kwargs = dict(mixed_precision="bf16" if cfg.mixed_precision == "bf16" else "no", cpu=device.type == "cpu",
                  gradient_accumulation_steps=cfg.batch_size, device_placement=False,
                  kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    try:
        return Accelerator(**kwargs)
    except ValueError as e:
        # accelerate keeps one state per process, fixed by its first Accelerator; one process may train several
        # runs with other settings (a notebook, a benchmark, the tests): start its state afresh. Never in a
        # launched group, where the state holds the process group.
        if processes.world > 1 or "already been initialized" not in str(e):
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def train(cfg: TrainConfig, recipe: Recipe, items: list, device: str | torch.device = "cpu",
          on_step=None, processes: Processes | None = None) -> TrainResult:
    """Run ``cfg.steps`` optimizer steps over ``items`` (resuming from the newest checkpoint in
    ``cfg.output_dir/checkpoints``), checkpointing every ``cfg.checkpoint_every`` steps and at the end, then
    export. ``on_step(step, loss)`` is called after each step (progress bars); ``processes`` is this process's
    place in an ``accelerate launch`` or ``torchrun`` launch (default: read from the environment; alone)."""
    require_data(items)
    procs = processes or Processes.from_env()
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
    accelerator = accelerator_for(cfg, device, procs)
    module, optimizer = accelerator.prepare(_Step(recipe), optimizer)
    while step < cfg.steps:
        total = 0.0
        for _ in range(cfg.batch_size):
            if position == 0 or order is None:
                order = data_order(len(items), order_gen)  # a new epoch
            item = items[order[(position + procs.rank) % len(items)]]
            position = position + procs.world if position + procs.world < len(items) else 0
            with accelerator.accumulate(module):  # gradients averaged over processes on the step's last item
                loss = module(item, noise_gen)
                accelerator.backward(loss)  # divides by the accumulation steps
            total += float(loss.detach() / cfg.batch_size)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(list(params.values()), cfg.grad_clip)
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
