"""Resumable training checkpoints: a crash costs the steps since the last checkpoint, none repeated or lost.

A checkpoint is a folder ``step-XXXXXXXX/`` (the number of steps done) holding the trainable tensors
(``weights.safetensors``), the optimizer state (``optimizer.pt``, read back with ``weights_only=True``) and
``state.json``: the step, the caller's metadata, and every random state the run draws from (torch's global CPU
state and CUDA states, the data generator's, Python's ``random``) with the position in the data order. It is
written in a temporary folder and renamed into place, so a crash mid-write leaves a ``.tmp-*`` folder that
is never mistaken for a checkpoint.

A checkpoint is read back as a file that may lie (edited, truncated, copied from another run): each file must be
a regular file inside its folder (a FIFO is never opened for reading, so it cannot block), ``state.json`` at most
``STATE_LIMIT`` bytes of JSON whose step is its folder's and whose random states have the types and lengths this
torch and Python restore, the weights finite, the optimizer state one for these very parameters. Anything else is
one ``TrainCheckpointError`` naming the file and the key, before any of it is restored.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import stat
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..bounded_text import cut, listed, shown, shown_path
from ..confined_files import is_inside, open_confined

FORMAT, VERSION = "memlearner-train-checkpoint", 1
STEP_DIR = re.compile(r"step-(\d{8,12})")  # at most 10^12 steps: a longer number is no checkpoint of ours
TMP_PREFIX = ".tmp-step-"
FILES = ("state.json", "weights.safetensors", "optimizer.pt")
# a state.json is kilobytes (megabytes with many processes and a long data order); more is not one of ours
STATE_LIMIT = 64 * 2**20
TORCH_STATE = torch.get_rng_state().numel()  # bytes of a CPU generator's state (mt19937)
PYTHON_STATE = len(random.getstate()[1])  # whole numbers of Python's random state (624 words and the index)


class TrainCheckpointError(ValueError):
    """A training checkpoint that cannot be written or read; the message names the file."""


def again(path: str | Path) -> str:
    """The fix for a checkpoint that cannot be resumed: set it aside, resume from the one before it."""
    return (f"delete {shown_path(path)} to resume from the checkpoint before it (or from the start), or point "
            "output_dir at a new folder")


OTHER_SETTINGS = "resume with the settings it was written with, or point output_dir at a new folder"


def _refuse(where: str | Path | None, text: str, fix: str | None = None) -> TrainCheckpointError:
    """A ``TrainCheckpointError`` naming the file ``where`` of a checkpoint folder, then the fix."""
    if where is None:
        return TrainCheckpointError(f"checkpoint{text}; {fix or 'resume from another checkpoint'}")
    return TrainCheckpointError(f"{shown_path(where)}{text}; {fix or again(Path(where).parent)}")


def _what(value) -> str:
    """A short description of a JSON value for a message (never the value whole)."""
    if isinstance(value, str) and len(value) > 40:
        return f"a str of {len(value)} characters"
    if isinstance(value, (list, dict)) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    return shown(value)


def _bytes(state: torch.Tensor) -> list[int]:
    return state.tolist()


def _tensor(values: list[int]) -> torch.Tensor:
    """A generator state (a uint8 tensor) back from its JSON list of ints."""
    return torch.tensor(values, dtype=torch.uint8)


def check_bytes(value, key: str, where: str | Path | None = None, size: int | None = None) -> None:
    """``value`` is a generator state as JSON: a list of whole numbers 0..255 (``size`` of them when given)."""
    if not isinstance(value, list) or (size is not None and len(value) != size) \
            or not all(type(v) is int and 0 <= v < 256 for v in value):
        raise _refuse(where, f": {key} must be a list of {size or 'the'} bytes (whole numbers 0-255), got "
                             f"{_what(value)}")


def check_rng(state, where: str | Path | None = None, key: str = "rng", generator: bool = False) -> None:
    """The fields of an ``rng_snapshot`` have the types and lengths this torch and Python restore (``generator``:
    the data generator's state must be there); checked in full before any state is set. ``where`` names the
    file in messages."""
    if not isinstance(state, dict):
        raise _refuse(where, f": {key} must be an object of random states, got {_what(state)}")
    check_bytes(state.get("torch"), f"{key}.torch", where, TORCH_STATE)
    cuda = state.get("cuda", [])
    if not isinstance(cuda, list):
        raise _refuse(where, f": {key}.cuda must be a list of CUDA states, got {_what(cuda)}")
    for i, s in enumerate(cuda):
        check_bytes(s, f"{key}.cuda[{i}]", where)
    if state.get("generator") is not None or generator:
        check_bytes(state.get("generator"), f"{key}.generator", where, TORCH_STATE)
    python = state.get("python")
    if not (isinstance(python, list) and len(python) == 3 and type(python[0]) is int
            and isinstance(python[1], list) and len(python[1]) == PYTHON_STATE
            and all(type(v) is int and 0 <= v < 2**32 for v in python[1]) and python[1][-1] <= PYTHON_STATE - 1
            and (python[2] is None or (type(python[2]) is float and math.isfinite(python[2])))):
        raise _refuse(where, f": {key}.python must be Python's random state [version, {PYTHON_STATE} whole "
                             f"numbers, gauss], got {_what(python)}")
    position = state.get("position")
    if type(position) is not int or position < 0:
        raise _refuse(where, f": {key}.position must be a whole number >= 0, got {_what(position)}")


def rng_snapshot(generator: torch.Generator | None = None, position: int = 0) -> dict:
    """Every random state a training loop draws from, as JSON: torch's global CPU state (and CUDA states once
    CUDA is in use), ``generator``'s (the data order), Python's ``random``, and ``position`` in the data."""
    version, internal, gauss = random.getstate()
    return {"torch": _bytes(torch.get_rng_state()),
            "cuda": [_bytes(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized()
            else [],
            "generator": None if generator is None else _bytes(generator.get_state()),
            "python": [version, list(internal), gauss], "position": int(position)}


def restore_rng(state: dict, generator: torch.Generator | None = None, where: str | Path | None = None,
                key: str = "rng") -> int:
    """Put back the random states of ``rng_snapshot`` (``generator`` gets the saved data generator's); returns
    the data position. Every field is checked (``check_rng``) before the first is set; ``where`` names the file."""
    if generator is not None and isinstance(state, dict) and state.get("generator") is None:
        raise _refuse(where, f" holds no data-generator state to restore ({key}.generator)")
    check_rng(state, where, key, generator is not None)
    try:
        torch.set_rng_state(_tensor(state["torch"]))
        if state.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])
        if generator is not None:
            generator.set_state(_tensor(state["generator"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    except (RuntimeError, ValueError, TypeError, OverflowError, IndexError) as e:
        raise _refuse(where, f": {key} holds random states this torch and Python cannot restore "
                             f"({cut(e, 120)})") from None
    return state["position"]


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
    """Complete checkpoints of ``folder`` as ``(step, path)``, oldest first: step folders with a ``state.json``
    entry of any kind (what it is, is checked when it is read). A step folder that is a link is refused: resuming
    would read outside the output folder, and pruning would delete there."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = STEP_DIR.fullmatch(p.name)
        if m and p.is_symlink():
            raise TrainCheckpointError(f"{shown_path(p)} is a link; a checkpoint must be a folder inside output_dir: "
                                       "remove the link (or move the checkpoint it points to in its place)")
        if m and os.path.lexists(p / "state.json"):
            found.append((int(m.group(1)), p))
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


def check_files(path: str | Path) -> None:
    """The checkpoint folder ``path`` holds its three files, each a regular file inside it (never a FIFO, a
    device or a link leading out); nothing is opened."""
    path = Path(path)
    missing = [n for n in FILES if not os.path.lexists(path / n)]
    if missing:
        raise TrainCheckpointError(f"{shown_path(path)} is not a complete training checkpoint: missing "
                                   f"{', '.join(missing)}; {again(path)}")
    for name in FILES:
        file = path / name
        try:
            mode = os.stat(file).st_mode
        except OSError as e:  # a dangling link, a loop of links
            raise _refuse(file, f" cannot be read ({e.strerror})") from None
        if not stat.S_ISREG(mode):
            raise _refuse(file, " is not a regular file (a FIFO, device, folder or a link to one)")
        if not is_inside(file, path):
            raise _refuse(file, " is a link leading outside its checkpoint folder")


def read_state(path: str | Path) -> dict:
    """``state.json`` of the checkpoint folder ``path``, checked: a regular file (opened without blocking) of at
    most ``STATE_LIMIT`` bytes, UTF-8 JSON, an object of this format and version whose ``step`` is the folder's
    number and whose ``rng`` and ``meta`` are objects. The random states themselves are ``check_rng``'s."""
    path = Path(path)
    file = path / "state.json"
    check_files(path)
    with os.fdopen(open_confined(file, path, "checkpoint state"), "rb") as f:  # exactly the file checked
        size = os.fstat(f.fileno()).st_size
        if size > STATE_LIMIT:
            raise _refuse(file, f" is {size} bytes, more than a checkpoint state ever holds ({STATE_LIMIT})")
        raw = f.read(STATE_LIMIT + 1)
    try:
        state = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _refuse(file, f" is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise _refuse(file, " is nested too deeply to be a checkpoint state") from None
    except ValueError as e:
        raise _refuse(file, f" is not valid JSON ({cut(e, 120)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = f"format {_what(state.get('format'))}" if isinstance(state, dict) else _what(state)
        raise _refuse(file, f" is not a training checkpoint state (an object of format {FORMAT!r}; got {got})")
    if state.get("version") != VERSION:
        raise _refuse(file, f": checkpoint version {_what(state.get('version'))} is not supported (this pack "
                            f"reads version {VERSION})")
    step, m = state.get("step"), STEP_DIR.fullmatch(path.name)
    if type(step) is not int or step < 0:
        raise _refuse(file, f": 'step' must be a whole number >= 0, got {_what(step)}")
    if m and int(m.group(1)) != step:
        raise _refuse(file, f": 'step' is {_what(step)}, but the folder is {path.name}")
    for key in ("rng", "meta"):
        if not isinstance(state.get(key, {}), dict):
            raise _refuse(file, f": '{key}' must be an object, got {_what(state.get(key))}")
    if "rng" not in state:
        raise _refuse(file, ": 'rng' (the random states to resume from) is missing")
    return state


def check_header(path: str | Path) -> None:
    """The cheap look at a checkpoint's tensor files before a model is loaded: ``weights.safetensors`` starts
    with a safetensors header, ``optimizer.pt`` is a ``torch.save`` archive (a zip)."""
    path = Path(path)
    file = path / "weights.safetensors"
    with open(file, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        ok = 0 < size <= min(os.fstat(f.fileno()).st_size - 8, 100 * 2**20) and f.read(1) == b"{"
    if not ok:
        raise _refuse(file, " is not a safetensors file (truncated or overwritten)")
    if not zipfile.is_zipfile(path / "optimizer.pt"):
        raise _refuse(path / "optimizer.pt", " is not an optimizer state saved by torch.save (truncated or "
                                             "overwritten)")


def check_weights(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], file: Path) -> None:
    """``weights`` are the tensors of ``expected`` (name -> tensor of this run): the same names, shapes and kinds
    (floating point or not)."""
    missing = [n for n in expected if n not in weights]
    if missing:
        raise _refuse(file, f" lacks {len(missing)} of this run's {len(expected)} tensors ({listed(missing, 3)}): "
                            "it was written for other settings (recipe, query_layers, lora_rank) or another model",
                      OTHER_SETTINGS)
    extra = [n for n in weights if n not in expected]
    if extra:
        raise _refuse(file, f" holds {len(extra)} tensor(s) this run does not train ({listed(extra, 3)}): it was "
                            "written for other settings or another model", OTHER_SETTINGS)
    for name, t in expected.items():
        got = weights[name]
        if tuple(got.shape) != tuple(t.shape) or got.is_floating_point() != t.is_floating_point():
            raise _refuse(file, f": tensor {shown(name)} is {got.dtype} {list(got.shape)}, this run's is "
                                f"{t.dtype} {list(t.shape)} (another model or settings)", OTHER_SETTINGS)


def _adam_keys(optimizer: torch.optim.Optimizer, group: dict) -> set[str]:
    if not isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam
        return set()
    return {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())


def check_optimizer_state(saved, optimizer: torch.optim.Optimizer, file: Path,
                          names: list[str] | None = None) -> None:
    """``saved`` is an optimizer state for ``optimizer``'s very parameters: as many groups and parameters, each
    state's tensors of its parameter's shape, finite (Adam's second moments >= 0), Adam's keys all there.
    ``names`` (one per parameter, in order) name them in the message."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = names if names is not None and len(names) == len(params) else [f"#{i}" for i in range(len(params))]
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved["param_groups"])):
        raise _refuse(file, " is not an optimizer state (torch.save of optimizer.state_dict())")
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise _refuse(file, f" is the optimizer state of another model: {sum(sizes)} parameter(s) in "
                            f"{len(sizes)} group(s), this run trains {len(params)} in {len(optimizer.param_groups)}",
                      OTHER_SETTINGS)
    if [i for g in saved["param_groups"] for i in g["params"]] != list(range(len(params))):
        raise _refuse(file, f": its parameter ids are not 0..{len(params) - 1} in order")
    groups = [g for g in optimizer.param_groups for _ in g["params"]]
    for key, entry in saved["state"].items():
        if type(key) is not int or not 0 <= key < len(params):
            raise _refuse(file, f": a state for parameter {_what(key)}, but this run has {len(params)}")
        name = shown(names[key])
        if not isinstance(entry, dict):
            raise _refuse(file, f": the state of {name} must be a dict of tensors, got {_what(entry)}")
        lacking = sorted(_adam_keys(optimizer, groups[key]) - set(entry))
        if lacking:
            raise _refuse(file, f": the state of {name} lacks {', '.join(lacking)}")
        for k, v in entry.items():
            if isinstance(v, bool) or not isinstance(v, (torch.Tensor, int, float)):
                raise _refuse(file, f": {shown(k)} of {name} must be a tensor or a number, got {_what(v)}")
            v = torch.as_tensor(v)
            if k == "step":
                if v.numel() != 1 or v.is_complex() or not torch.isfinite(v.double()).all() or v.item() < 0:
                    raise _refuse(file, f": 'step' of {name} must be one finite number >= 0")
                continue
            if tuple(v.shape) != tuple(params[key].shape) or not v.is_floating_point():
                raise _refuse(file, f": {shown(k)} of {name} is {v.dtype} {list(v.shape)}, the parameter is "
                                    f"{params[key].dtype} {list(params[key].shape)} (another model's state)")
            if not torch.isfinite(v).all() or (k.endswith("exp_avg_sq") and (v < 0).any()):
                raise _refuse(file, f": {shown(k)} of {name} holds "
                                    f"{'NaN or infinite' if not torch.isfinite(v).all() else 'negative'} values")


def load_optimizer(file: Path, optimizer: torch.optim.Optimizer, names: list[str] | None = None) -> None:
    """``optimizer`` gets the per-parameter state (step counts, moments) of ``file``, checked
    (``check_optimizer_state``); its settings (lr, betas, weight decay) stay the caller's, this run's config."""
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage bytes, a truncated archive, a pickle weights_only refuses
        raise _refuse(file, f" is not an optimizer state torch can read ({type(e).__name__}: "
                            f"{cut(e, 120)})") from None
    check_optimizer_state(saved, optimizer, file, names)
    try:
        optimizer.load_state_dict({"state": saved["state"],
                                   "param_groups": optimizer.state_dict()["param_groups"]})
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise _refuse(file, f" cannot be loaded into this run's optimizer ({cut(e, 120)})") from None


def load_checkpoint(path: str | Path, optimizer: torch.optim.Optimizer | None = None,
                    names: list[str] | None = None, expected: dict[str, torch.Tensor] | None = None
                    ) -> tuple[int, dict[str, torch.Tensor], dict]:
    """``(step, trainable tensors, state)`` of a checkpoint, every file checked before anything is restored:
    ``state.json`` (``read_state``), the weights finite (and, given ``expected``, name -> this run's tensor, of
    its names and shapes), then ``optimizer`` (built over the same parameters in the same order, ``names`` one
    per parameter) gets its state back. ``state["rng"]`` goes to ``restore_rng``, ``state["meta"]`` is the
    caller's."""
    path = Path(path)
    state = read_state(path)
    file = path / "weights.safetensors"
    try:
        weights = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise _refuse(file, f" is unreadable ({cut(e, 120)})") from None
    if expected is not None:
        check_weights(weights, expected, file)
    for name, t in weights.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise _refuse(file, f": tensor {shown(name)} holds NaN or infinite values (the run that wrote it "
                                "diverged: lower lr when resuming)")
    if optimizer is not None:
        load_optimizer(path / "optimizer.pt", optimizer, names)
    return state["step"], weights, state
