"""``memlearner-train CONFIG.toml``: fine-tune Wan2.1 with query memory, or train a DiT-Mem memory encoder, on a
folder of captioned videos. ``accelerate launch --multi_gpu --num_processes N -m memlearner_train CONFIG.toml`` (or
``torchrun --nproc_per_node N -m memlearner_train CONFIG.toml``) trains on N GPUs.

The model, VAE and text encoder are loaded by ComfyUI as a library (``COMFYUI_PATH``, or the ComfyUI this pack
sits in, or ``.host/ComfyUI``), and training runs the very patches the nodes install, so the exported files load
in the nodes unchanged. ``memlearner-train --example query`` prints a commented config.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from memlearner_core.bounded_text import MESSAGE_LIMIT, cut, shown_path
from memlearner_core.training.config import example_config, load_config

PACK = Path(__file__).resolve().parents[1]
log = logging.getLogger("memlearner")


def comfyui_path() -> Path:
    for candidate in (os.environ.get("COMFYUI_PATH"), PACK.parent.parent, PACK / ".host" / "ComfyUI"):
        if candidate and (Path(candidate) / "comfy" / "model_management.py").is_file():
            return Path(candidate)
    raise SystemExit("memlearner-train: ComfyUI not found; set COMFYUI_PATH to your ComfyUI folder")


def load_pack(comfy: Path, device: str = "auto"):
    """ComfyUI importable as a library, then this pack as a package (``pack.nodes.training_host``). ComfyUI picks
    its compute device when ``comfy.model_management`` is first imported: on a machine without a usable CUDA GPU
    (or with ``device = "cpu"``) it is told ``--cpu`` first, as its own launcher would be."""
    sys.path.insert(0, str(comfy))
    import comfy.cli_args
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        comfy.cli_args.args.cpu = True
    spec = importlib.util.spec_from_file_location("comfyui_memlearner", PACK / "__init__.py",
                                                  submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return importlib.import_module("comfyui_memlearner.nodes.training_host")


def one_line(error: BaseException) -> str:
    """The one stderr line for a run that cannot go on: the error's message (config, data, checkpoint and device
    problems name the key or file and the fix), or for an ``OSError`` the file and what the OS said, or for a
    ``RecursionError`` (a file nested too deeply) what to check; line breaks folded, the whole bounded."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{shown_path(error.filename)}: " if error.filename else ""
        text = f"{where}{error.strerror}; check that the path exists, is a regular file or folder and that this " \
               "user may read (and, under output_dir, write) it"
    elif isinstance(error, RecursionError):
        text = "a file is nested too deeply to read (RecursionError); check the config, the poses files and the " \
               "checkpoint's state.json"
    else:
        text = str(error) or type(error).__name__
    return "memlearner-train: " + cut(text, MESSAGE_LIMIT)


def _world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def main(argv: list[str] | None = None, text_fn=None) -> int:
    """``text_fn(caption) -> [1, L, 4096]`` replaces the umt5 text encoder (tests have no tiny umt5).

    Exit 2, with one line on stderr naming the key or file and the fix, for every config, data, checkpoint and
    device problem (and any ``OSError`` or ``RecursionError`` reading or writing the run's files)."""
    ap = argparse.ArgumentParser(prog="memlearner-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", help="the run's TOML file")
    ap.add_argument("--example", choices=["query", "encoder"], help="print an example config and exit")
    args = ap.parse_args(argv)
    if args.example:
        print(example_config(args.example))
        return 0
    if not args.config:
        ap.error("give a CONFIG.toml (or --example query / --example encoder)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    refused = (ValueError, OSError, RecursionError)  # ConfigError, TrainCheckpointError, DatasetError: ValueError
    try:
        cfg = load_config(args.config)
        from memlearner_core.training.trainer import preflight

        preflight(cfg, _world())  # before ComfyUI is imported: a bad checkpoint or folder is refused in a second
    except refused as e:
        print(one_line(e), file=sys.stderr)
        return 2
    if cfg.host == "diffusers":  # diffusers' WanTransformer3DModel: no ComfyUI needed
        from memlearner_diffusers import training as training_host
    else:
        training_host = load_pack(comfyui_path(), cfg.device)
    try:
        result = training_host.run_training(cfg, text_fn)
    except refused as e:  # config, data, checkpoint and device problems, each one line naming the input
        print(one_line(e), file=sys.stderr)
        return 2
    print(f"trained {result.steps_done} steps (from {result.start_step}); last loss "
          f"{result.losses[-1] if result.losses else float('nan'):.4f}")
    for path in result.exported:
        print(path)
    return 0
