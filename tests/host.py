"""The tests' ComfyUI: ``memlearner_host.server`` (imported in-process or started as its HTTP server) plus the
test-only nodes and helpers. Without a GPU it runs with ``--cpu``; ``MEMLEARNER_TEST_GPU=1`` runs it on the GPU,
with ``MEMLEARNER_TEST_VRAM=lowvram|novram`` for ComfyUI's low-VRAM modes.
"""

from __future__ import annotations

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
    pack,
    prepare_imports,
    run_node,
    use_gpu,
    vram_mode,
)
from memlearner_host.tiny_models import TINY_NODES

TEST_NODES = Path(__file__).resolve().parent / "comfy_nodes"


def write_extra_paths(models_dir: Path, path: Path) -> Path:
    """An extra_model_paths.yaml pointing ComfyUI at the test models, the tiny fixtures' node and the test-only
    nodes."""
    return server.write_extra_paths(models_dir, path, [TINY_NODES, TEST_NODES])
