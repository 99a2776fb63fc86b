"""MemLearner query memory and DiT-Mem reference memory for diffusers' Wan (``WanTransformer3DModel``: Wan2.1,
the Wan2.2 A14B experts, Wan2.2 TI2V-5B).

The second host beside the ComfyUI nodes, over the same host-free core (``memlearner_core``) and the same weight
files (memory encoder, query weights; Wan2.1 weights converted by key between ComfyUI's and diffusers' layouts).
Imports diffusers and the core only, never ComfyUI.
"""

from .convert import comfy_to_diffusers, diffusers_config, diffusers_to_comfy, transformer_from_comfy
from .memory import (
    MemoryAdapter,
    QueryMemory,
    ReferenceMemory,
    apply_memory,
    installed,
    load_camera,
    query_noise,
    remove_memory,
)

__all__ = [
    "MemoryAdapter", "QueryMemory", "ReferenceMemory", "apply_memory", "comfy_to_diffusers", "diffusers_config",
    "diffusers_to_comfy", "installed", "load_camera", "query_noise", "remove_memory", "transformer_from_comfy",
]
