"""ComfyUI nodes of the pack: thin adapters between ComfyUI types and ``memlearner_core``."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .comfy_types import register_model_folders

register_model_folders()

from .camera_path_node import CameraPath  # noqa: E402
from .input_checks import checked  # noqa: E402
from .memory_bank_node import ReferenceMemoryBank  # noqa: E402
from .memory_nodes import EncodeReferenceVideo, LoadMemoryEncoder  # noqa: E402
from .query_memory_node import ApplyQueryMemory, ApplyReferenceMemory  # noqa: E402
from .revisit_world_node import RevisitScore, RevisitWorld  # noqa: E402
from .rollout_legacy_node import MemoryRolloutLegacy  # noqa: E402
from .rollout_node import MemoryRollout  # noqa: E402
from .video_score_node import EmptyText, VideoScore  # noqa: E402

# Each node checks its inputs against its own schema when it runs (API prompts skip some of ComfyUI's checks).
NODES = [checked(n) for n in (LoadMemoryEncoder, EncodeReferenceVideo, ReferenceMemoryBank, ApplyQueryMemory,
                              ApplyReferenceMemory, CameraPath, MemoryRollout, RevisitWorld, RevisitScore,
                              MemoryRolloutLegacy, EmptyText, VideoScore)]


class MemLearnerExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
