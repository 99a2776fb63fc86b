"""ComfyUI-facing types and folders of the pack (registered once, at import)."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

MEMORY_ENCODER = io.Custom("MEMORY_ENCODER")
MEMORY = io.Custom("MEMORY")
REVISIT_WORLD = io.Custom("REVISIT_WORLD")  # a toy-world evaluation path (memlearner_core.revisit_world)

ENCODER_FOLDER = "memory_encoders"
QUERY_WEIGHTS_FOLDER = "memlearner"


# Pickled files are listed too, so that choosing one gives the clear "convert it to safetensors" message.
LISTED_EXTENSIONS = {".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin"}


def register_model_folders() -> None:
    """``models/memory_encoders`` and ``models/memlearner``; extra_model_paths.yaml can add more of each."""
    for name in (ENCODER_FOLDER, QUERY_WEIGHTS_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        paths, _ = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(LISTED_EXTENSIONS))
