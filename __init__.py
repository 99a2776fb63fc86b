"""ComfyUI-MemLearner: memory for Wan2.1 video models (MemLearner query layers, DiT-Mem reference memory).

ComfyUI imports this folder as a custom-node package and calls ``comfy_entrypoint``. On a ComfyUI older than
``host_version.MIN_COMFYUI`` it logs one line and registers no nodes (an empty ``NODE_CLASS_MAPPINGS``).
"""

import logging
import os
import sys

from .host_version import refusal

_refused = refusal()  # before anything imports a ComfyUI module the old host may lack
if _refused:
    logging.getLogger("memlearner").error(_refused)
    NODE_CLASS_MAPPINGS: dict = {}
else:
    # The host-free core is a top-level package (so training scripts and tests import it without ComfyUI). When
    # the pack is used from ComfyUI's custom_nodes without being pip-installed, make it importable from here.
    # Appended, not prepended: this folder's ``nodes`` package must never shadow ComfyUI's own ``nodes`` module.
    _here = os.path.dirname(os.path.abspath(__file__))
    try:
        import memlearner_core  # noqa: F401
    except ImportError:
        sys.path.append(_here)

    from .nodes import MemLearnerExtension

    async def comfy_entrypoint() -> MemLearnerExtension:
        return MemLearnerExtension()
