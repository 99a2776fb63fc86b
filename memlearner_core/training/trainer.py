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

A run that diverges stops at the step whose loss or gradients are not finite, before the optimizer applies them:
no NaN reaches the weights, a checkpoint or an export, and the message names the step and the fix (a lower lr).
What a run reads and writes is checked before a model is loaded (``preflight``): the data folder, the output
folder (everything written stays inside it: no link leads its checkpoints, exports or cache out) and the
checkpoint it would resume.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..bounded_text import cut, shown_path
from ..confined_files import is_inside
from .checkpointing import (
    TORCH_STATE,
    TrainCheckpointError,
    again,
    check_bytes,
    check_header,
    check_rng,
    latest_checkpoint,
    load_checkpoint,
    read_state,
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


class TrainingDiverged(ValueError):
    """A step whose loss, gradients or weights are not finite: the run stops there, nothing exported."""


def require_data(items: list, skipped: list | tuple = ()) -> None:
    """Refuse to train on nothing, saying why it can be empty (the first skipped files, and why)."""
    if not items:
        why = "; ".join(f"{shown_path(Path(p).name, 80)}: {cut(w, 120)}" for p, w in list(skipped)[:3])
        raise ValueError("no training data: " + (f"every clip was skipped ({why}{'; ...' if len(skipped) > 3 else ''})"
                                                 if skipped else "the folder is empty")
                         + "; add readable videos (or latents) to data_dir")


def check_data_dir(cfg: TrainConfig) -> None:
    """``data_dir`` is a folder this process can list (not a file, a link loop or a locked folder)."""
    folder, what = cfg.data_dir, "latent clips" if cfg.data_format == "latents" else "videos"
    try:
        mode = os.stat(folder).st_mode
    except FileNotFoundError:
        raise ValueError(f"data_dir {shown_path(folder)}: no such folder; point data_dir at the folder of training "
                         f"{what}") from None
    except OSError as e:
        why = "is a loop of symbolic links" if e.errno == errno.ELOOP else f"cannot be read ({e.strerror})"
        raise ValueError(f"data_dir {shown_path(folder)} {why}; point data_dir at the folder of training {what} "
                         "itself") from None
    if not stat.S_ISDIR(mode):
        raise ValueError(f"data_dir {shown_path(folder)} is not a folder (a file, FIFO or device); point data_dir "
                         f"at the folder of training {what}")
    try:
        os.listdir(folder)
    except OSError as e:
        raise ValueError(f"data_dir {shown_path(folder)} cannot be read ({e.strerror}); make it readable "
                         "(chmod u+rx) or point data_dir at another folder") from None


def export_names() -> tuple[str, ...]:
    """The files an export writes (``recipes``, imported here only when needed: it loads the model code)."""
    from .recipes import ENCODER_EXPORT, LORA_EXPORT, QUERY_EXPORT, WAN_EXPORT

    return WAN_EXPORT, LORA_EXPORT, QUERY_EXPORT, ENCODER_EXPORT


def check_output_dir(cfg: TrainConfig) -> None:
    """``output_dir`` is a folder, or can be made one, and what the run writes in it stays inside it: its
    ``checkpoints/``, ``export/`` and (by default) ``latent_cache/`` are folders inside it (links resolved, so
    neither a link nor ``..`` leads out), and no export file is a link a write would follow."""
    out = Path(cfg.output_dir)
    fix = "point output_dir at a folder (it is created when missing)"
    existing = out
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    try:
        mode = os.stat(existing).st_mode
    except OSError as e:  # a dangling link, a loop of links
        why = "is a loop of symbolic links" if e.errno == errno.ELOOP else f"cannot be used ({e.strerror})"
        raise ValueError(f"output_dir {shown_path(out)}: {shown_path(existing)} {why}; {fix}") from None
    if not stat.S_ISDIR(mode):
        where = "is" if existing == out else f"cannot be made: {shown_path(existing)} is"
        raise ValueError(f"output_dir {shown_path(out)} {where} a file (or FIFO or device), not a folder; {fix}")
    if existing != out:
        return  # made fresh: nothing inside it yet
    subs = ["checkpoints", "export"] + (["latent_cache"] if Path(cfg.cache_dir) == out / "latent_cache" else [])
    for sub in subs:
        path = out / sub
        if not os.path.lexists(path):
            continue
        if not is_inside(path, out):
            raise ValueError(f"output_dir {shown_path(out)}: {sub} leads outside output_dir (a link); remove the "
                             f"link so {sub} is written inside output_dir")
        if not path.is_dir():
            raise ValueError(f"output_dir {shown_path(out)}: {sub} is not a folder; remove or rename it")
    for name in export_names():
        path = out / "export" / name
        if path.is_symlink():
            raise ValueError(f"output_dir {shown_path(out)}: export/{name} is a link; remove it (an export is "
                             "written in place, never through a link)")


def check_run_state(state: dict, path: Path, world: int, n_items: int | None = None) -> list:
    """The random states of a checkpoint's ``state.json`` as ``train`` resumes them: one per process (as many as
    this run has), the data-order generator and, given ``n_items``, an order that is a permutation of this run's
    items with every position inside it. Returns the per-process states."""
    file = path / "state.json"
    rng = state["rng"]
    ranks = rng.get("ranks")
    if not isinstance(ranks, list) or not ranks:
        raise TrainCheckpointError(f"{shown_path(file)}: rng.ranks must be a list of each process's random states, "
                                   f"got {type(ranks).__name__}; {again(path)}")
    if len(ranks) != world:
        raise TrainCheckpointError(f"{shown_path(path)} was written by {len(ranks)} process(es); resume it with the "
                                   f"same number (this run has {world}) so no item is lost or repeated")
    for i, r in enumerate(ranks):
        check_rng(r, file, f"rng.ranks[{i}]", generator=True)
    check_bytes(rng.get("order_generator"), "rng.order_generator", file, TORCH_STATE)
    order = rng.get("order")
    if order is not None and not (isinstance(order, list) and all(type(i) is int for i in order)):
        raise TrainCheckpointError(f"{shown_path(file)}: rng.order must be a list of clip indices, got "
                                   f"{type(order).__name__}; {again(path)}")
    if n_items is not None and order is not None and sorted(order) != list(range(n_items)):
        raise TrainCheckpointError(f"{shown_path(file)}: rng.order is a data order of {len(order)} clip(s), this run "
                                   f"has {n_items}; resume with the same training data (data_dir), or point "
                                   "output_dir at a new folder")
    if n_items is not None and any(r["position"] >= n_items for r in ranks):
        raise TrainCheckpointError(f"{shown_path(file)}: rng.ranks[].position is past this run's {n_items} clip(s); "
                                   "resume with the same training data (data_dir), or point output_dir at a new "
                                   "folder")
    return ranks


def preflight(cfg: TrainConfig, world: int = 1) -> Path | None:
    """The cheap checks before a model is loaded, each one line naming the key or file: the data folder, the output
    folder, and the checkpoint a run would resume (its files, ``state.json`` and random states, the tensor files'
    headers); the tensors themselves are checked against the model in ``train``. Returns that checkpoint."""
    check_data_dir(cfg)
    check_output_dir(cfg)
    last = latest_checkpoint(Path(cfg.output_dir) / "checkpoints")
    if last is not None:
        state = read_state(last)
        check_step(state["step"], cfg, last)
        check_run_state(state, last, world)
        check_header(last)
    return last


def check_step(step: int, cfg: TrainConfig, path: Path) -> None:
    """A checkpoint past ``cfg.steps`` is refused: the run would export it and report steps it was never asked
    for."""
    if step > cfg.steps:
        raise TrainCheckpointError(f"{shown_path(path)} is {step} steps in, past this run's steps = {cfg.steps}; raise "
                                   f"steps to {step} or more to train on from it, or point output_dir at a new "
                                   "folder")


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor of ``tensors`` is finite (one device sync)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t is not None and t.is_floating_point()]
    return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def diverged(cfg: TrainConfig, step: int, what: str) -> TrainingDiverged:
    return TrainingDiverged(f"training diverged at step {step}: {what}; stopped before it reached the weights, a "
                            f"checkpoint or an export. Lower lr (now {cfg.lr:g}; try {cfg.lr / 10:g}) or set "
                            "grad_clip = 1.0 or warmup_steps, then run again: it resumes from the last checkpoint")


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
    if last is not None:  # every file checked before anything is restored
        state = read_state(last)
        check_step(state["step"], cfg, last)
        check_run_state(state, last, procs.world, len(items))
        step, tensors, state = load_checkpoint(last, optimizer, names=list(params), expected=recipe.checkpointed())
        ranks = state["rng"]["ranks"]
        with torch.no_grad():
            for name, t in recipe.checkpointed().items():
                t.copy_(tensors[name])
        position = restore_rng(ranks[procs.rank], noise_gen, last / "state.json", f"rng.ranks[{procs.rank}]")
        try:
            order_gen.set_state(torch.tensor(state["rng"]["order_generator"], dtype=torch.uint8))
        except RuntimeError as e:
            raise TrainCheckpointError(f"{shown_path(last / 'state.json')}: rng.order_generator cannot be restored "
                                       f"({cut(e, 120)}); {again(last)}") from None
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
        loss = procs.mean(total)  # the same on every process, so all of them stop together
        if not math.isfinite(loss):
            raise diverged(cfg, step + 1, f"the loss is {loss}")
        if not all_finite(p.grad for p in params.values()):
            raise diverged(cfg, step + 1, f"the gradients are not finite (loss {loss:.4g})")
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        for group in optimizer.param_groups:  # linear warmup, a function of the step alone (exact on resume)
            group["lr"] = cfg.lr * warmup_factor(step, cfg.warmup_steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        result.losses.append(loss)
        if on_step is not None:
            on_step(step, result.losses[-1])
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            if not all_finite(recipe.checkpointed().values()):  # a finite step too large for the weights
                raise diverged(cfg, step, "the weights are no longer finite after the optimizer step")
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
