"""Which ComfyUI is hosting the pack, and whether it is new enough. Reads files only: imports no ComfyUI module, so
it runs before anything version-specific does (the pack's ``__init__.py`` calls ``refusal`` first).

The minimum is ``requires-comfyui`` in pyproject.toml's ``[tool.comfy]`` (a test keeps the two equal): 0.3.75 is
the oldest host the suite passes on; on 0.3.64 every query-memory graph fails at sampling
(``WanModel.rope_encode`` has no ``transformer_options`` there).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

MIN_COMFYUI = "0.3.75"


def comfyui_root() -> Path | None:
    """The folder of the ComfyUI whose ``comfy`` package Python would import, or None when there is none."""
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def host_comfyui_version(root: Path | None = None) -> str | None:
    """``__version__`` from the host's ``comfyui_version.py`` (beside its ``comfy`` package); None when the file
    is missing or unreadable: a ComfyUI from before that file existed, so very old."""
    root = comfyui_root() if root is None else root
    try:
        text = (root / "comfyui_version.py").read_text()
    except (OSError, TypeError):
        return None
    m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    return m.group(1) if m else None


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.12.1"`` -> ``(0, 12, 1)``; trailing text after the numbers (``"0.3.75rc1"``) is ignored."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("-")[0])[:3])


def refusal() -> str | None:
    """The one line to log when the host is older than ``MIN_COMFYUI`` (the pack then registers no nodes), or None
    when it is new enough. Outside ComfyUI (no ``comfy`` package at all) there is nothing to check."""
    if comfyui_root() is None:
        return None
    found = host_comfyui_version()
    if found is not None and version_tuple(found) >= version_tuple(MIN_COMFYUI):
        return None
    found_text = f"ComfyUI {found}" if found else "a ComfyUI too old to have comfyui_version.py"
    return (f"comfyui-memlearner needs ComfyUI {MIN_COMFYUI} or newer but found {found_text}; "
            f"its nodes are not loaded: update ComfyUI")
