"""The training loop both recipes share: data order, optimizer, mixed precision, checkpoints and resume.

What is trained and how its loss is computed is a ``Recipe`` (query layers on a Wan2.1 host, or a DiT-Mem
encoder against a frozen one); the loop only sees its trainable parameters and its loss. Data order comes from
one seeded generator whose state is checkpointed with the position in the epoch, so a resumed run draws exactly
the items (and noise) the uninterrupted run would have.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .checkpointing import latest_checkpoint, load_checkpoint, restore_rng, rng_snapshot, save_checkpoint
from .config import TrainConfig

log = logging.getLogger("memlearner")


class Recipe(Protocol):
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """Name -> parameter, in a fixed order (the optimizer and the checkpoints follow it)."""

    def loss(self, item, generator: torch.Generator) -> torch.Tensor:
        """The scalar loss of one data item; all randomness drawn from ``generator``."""

    def export(self, folder: Path) -> list[Path]:
        """Write what the ComfyUI nodes load (model weights, the pack's tensors); returns the files."""


@dataclass
class TrainResult:
    start_step: int
    steps_done: int
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    exported: list[Path] = field(default_factory=list)


def data_order(n: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=generator).tolist()


def train(cfg: TrainConfig, recipe: Recipe, items: list, device: str | torch.device = "cpu",
          on_step=None) -> TrainResult:
    """Run ``cfg.steps`` optimizer steps over ``items`` (resuming from the newest checkpoint in
    ``cfg.output_dir/checkpoints``), checkpointing every ``cfg.checkpoint_every`` steps and at the end, then
    export. ``on_step(step, loss)`` is called after each step (progress bars)."""
    if not items:
        raise ValueError("no training data: every video was skipped (see the warnings above) or the folder is empty")
    params = recipe.trainable()
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    step, position, order = 0, 0, None
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        step, tensors, state = load_checkpoint(last, optimizer)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        position = restore_rng(state["rng"], generator)
        order = state["rng"].get("order")
        log.info("resuming from %s (step %d)", last, step)
    result = TrainResult(start_step=step, steps_done=step, checkpoint=last)
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    while step < cfg.steps:
        if position == 0 or order is None:
            order = data_order(len(items), generator)  # a new epoch
        item = items[order[position]]
        with autocast:
            loss = recipe.loss(item, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, position = step + 1, (position + 1) % len(items)
        result.losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, result.losses[-1])
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            rng = {**rng_snapshot(generator, position), "order": order}  # the epoch's order, to finish it on resume
            result.checkpoint = save_checkpoint(ckpt_dir, step, {k: p.detach() for k, p in params.items()},
                                                optimizer, rng, {"loss": result.losses[-1]},
                                                keep=cfg.keep_checkpoints)
    result.steps_done = step
    result.exported = recipe.export(Path(cfg.output_dir) / "export")
    return result

