"""The tests' ComfyUI: ``memlearner_host.server`` (imported in-process or started as its HTTP server) plus the
test-only nodes and helpers. Without a GPU it runs with ``--cpu``; ``MEMLEARNER_TEST_GPU=1`` runs it on the GPU,
with ``MEMLEARNER_TEST_VRAM=lowvram|novram`` for ComfyUI's low-VRAM modes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memlearner_host import server
from memlearner_host.server import (  # noqa: F401  (the tests use them as host.*)
    PACK_NODE_IDS,
    ROOT,
    ComfyServer,
    boot_in_process,
    comfy_flags,
    comfy_path,
    free_port,
    prepare_imports,
    use_gpu,
    vram_mode,
)
from memlearner_host.tiny_models import TINY_NODES

TEST_NODES = Path(__file__).resolve().parent / "comfy_nodes"


def write_extra_paths(models_dir: Path, path: Path) -> Path:
    """An extra_model_paths.yaml pointing ComfyUI at the test models, the tiny fixtures' node and the test-only
    nodes."""
    return server.write_extra_paths(models_dir, path, [TINY_NODES, TEST_NODES])


def pack(submodule: str):
    """A module of the pack as ComfyUI loaded it (``pack("nodes.memory_patch")``), so tests and nodes share
    one copy of every class. ComfyUI names a custom-node package after its folder path."""
    import importlib

    init = (ROOT / "__init__.py").resolve()
    for name, module in list(sys.modules.items()):
        f = getattr(module, "__file__", None)
        if f and Path(f).resolve() == init:
            return importlib.import_module(f"{name}.{submodule}")
    raise RuntimeError("the pack is not loaded into ComfyUI")


def run_node(cls, **inputs) -> tuple:
    """Execute a node class the way ComfyUI does (V3 ``execute`` or V1 ``FUNCTION``); returns its outputs."""
    if hasattr(cls, "GET_SCHEMA") and hasattr(cls, "define_schema"):
        return tuple(cls.execute(**inputs).args)
    return tuple(getattr(cls(), cls.FUNCTION)(**inputs))
