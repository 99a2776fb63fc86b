"""Resumable training checkpoints: a crash costs the steps since the last checkpoint, none repeated or lost.

A checkpoint is a folder ``step-XXXXXXXX/`` (the number of steps done) holding the trainable tensors
(``weights.safetensors``), the optimizer state (``optimizer.pt``, read back with ``weights_only=True``) and
``state.json``: the step, the caller's metadata, and every random state the run draws from (torch's global CPU
state and CUDA states, the data generator's, Python's ``random``) with the position in the data order. It is
written in a temporary folder and renamed into place, so a crash mid-write leaves a ``.tmp-*`` folder that
is never mistaken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT, VERSION = "memlearner-train-checkpoint", 1
STEP_DIR = re.compile(r"step-(\d{8,})")
TMP_PREFIX = ".tmp-step-"


class TrainCheckpointError(ValueError):
    """A training checkpoint that cannot be written or read; the message names the file."""


def _bytes(state: torch.Tensor) -> list[int]:
    return state.tolist()


def _tensor(values: list[int]) -> torch.Tensor:
    """A generator state (a uint8 tensor) back from its JSON list of ints."""
    return torch.tensor(values, dtype=torch.uint8)


def rng_snapshot(generator: torch.Generator | None = None, position: int = 0) -> dict:
    """Every random state a training loop draws from, as JSON: torch's global CPU state (and CUDA states once
    CUDA is in use), ``generator``'s (the data order), Python's ``random``, and ``position`` in the data."""
    version, internal, gauss = random.getstate()
    return {"torch": _bytes(torch.get_rng_state()),
            "cuda": [_bytes(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized()
            else [],
            "generator": None if generator is None else _bytes(generator.get_state()),
            "python": [version, list(internal), gauss], "position": int(position)}


def restore_rng(state: dict, generator: torch.Generator | None = None) -> int:
    """Put back the random states of ``rng_snapshot`` (``generator`` gets the saved data generator's); returns
    the data position."""
    torch.set_rng_state(_tensor(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])
    if generator is not None:
        if state.get("generator") is None:
            raise TrainCheckpointError("the checkpoint holds no data-generator state to restore")
        generator.set_state(_tensor(state["generator"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    return int(state["position"])


def _fsync(path: Path) -> None:
    """Flush a file (or, where the OS allows, a folder's entries) to disk before a rename publishes it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on Windows; its renames are durable enough there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of ``folder`` as ``(step, path)``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := STEP_DIR.fullmatch(p.name)) and (p / "state.json").is_file()]
    return sorted(found)


def save_checkpoint(folder: str | Path, step: int, trainable: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, rng_state: dict, meta: dict | None = None,
                    keep: int = 3) -> Path:
    """Write ``folder/step-XXXXXXXX/`` atomically after ``step`` steps done; keep the newest ``keep``.

    ``trainable``: name -> tensor (e.g. the parameters with ``requires_grad``); ``rng_state`` from
    ``rng_snapshot``; ``meta``: anything JSON (config, loss) for the record. Returns the checkpoint's path.
    """
    folder = Path(folder)
    if step < 0 or keep < 1:
        raise TrainCheckpointError(f"need step >= 0 and keep >= 1, got step {step}, keep {keep}")
    try:
        state = json.dumps({"format": FORMAT, "version": VERSION, "step": step, "meta": meta or {},
                            "rng": rng_state}, indent=1)
    except (TypeError, ValueError) as e:
        raise TrainCheckpointError(f"checkpoint metadata and RNG state must be JSON-serialisable: {e}") \
            from None
    final = folder / f"step-{step:08d}"
    tmp = folder / f"{TMP_PREFIX}{step:08d}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in trainable.items()}
    save_file(weights, str(tmp / "weights.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(state, encoding="utf-8")
    for name in ("weights.safetensors", "optimizer.pt", "state.json"):
        _fsync(tmp / name)
    if final.exists():  # the same step saved again (a resumed run): replace it
        old = folder / f"{TMP_PREFIX}old-{step:08d}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(folder)
    for _, path in _checkpoints(folder)[:-keep]:
        shutil.rmtree(path)
    for stale in folder.glob(f"{TMP_PREFIX}*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The complete checkpoint with the most steps in ``folder``, or None; temporary folders are ignored."""
    found = _checkpoints(Path(folder))
    return found[-1][1] if found else None


def load_checkpoint(path: str | Path, optimizer: torch.optim.Optimizer | None = None
                    ) -> tuple[int, dict[str, torch.Tensor], dict]:
    """``(step, trainable tensors, state)`` of a checkpoint; ``optimizer`` (built over the same parameters in
    the same order) gets its state back. ``state["rng"]`` goes to ``restore_rng``, ``state["meta"]`` is the
    caller's."""
    path = Path(path)
    files = {n: path / n for n in ("state.json", "weights.safetensors", "optimizer.pt")}
    missing = [n for n, f in files.items() if not f.is_file()]
    if missing:
        raise TrainCheckpointError(f"{path} is not a complete training checkpoint: "
                                   f"missing {', '.join(missing)}")
    try:
        state = json.loads(files["state.json"].read_text(encoding="utf-8"))
    except ValueError as e:
        raise TrainCheckpointError(f"{files['state.json']} is not valid JSON: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainCheckpointError(f"{files['state.json']} is not a training checkpoint state ({FORMAT!r})")
    if state.get("version") != VERSION:
        raise TrainCheckpointError(f"{files['state.json']}: checkpoint version {state.get('version')!r} is "
                                   f"not supported (this pack reads version {VERSION})")
    try:
        weights = load_file(str(files["weights.safetensors"]))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise TrainCheckpointError(f"{files['weights.safetensors']} is unreadable ({e})") from None
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(files["optimizer.pt"], map_location="cpu", weights_only=True))
    return int(state["step"]), weights, state
