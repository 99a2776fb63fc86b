"""Apply Query Memory: MemLearner query layers (and optionally DiT-Mem memory) on a clone of a Wan2.1 MODEL."""

from __future__ import annotations

import json

import folder_paths
import torch
from comfy_api.latest import io

from memlearner_core.camera import CameraEmbedding
from memlearner_core.checkpoint_io import load_query_weights
from memlearner_core.context_tokens import ContextSpec

from .comfy_types import MEMORY, QUERY_WEIGHTS_FOLDER
from .memory_patch import QueryMemory, apply_memory

NO_WEIGHTS = "none"


def parse_poses(text: str, n_frames: int, what: str) -> torch.Tensor | None:
    """A JSON list of per-latent-frame 3x4 ``[R|t]`` matrices (or flat 12-number rows) -> ``[T >= n_frames, 3, 4]``."""
    if not text.strip():
        return None
    try:
        poses = torch.tensor(json.loads(text), dtype=torch.float32)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what}: not a JSON list of 3x4 camera matrices ({e})") from e
    if poses.ndim == 2 and poses.shape[1] == 12:
        poses = poses.view(-1, 3, 4)
    if poses.ndim != 3 or poses.shape[1:] != (3, 4):
        raise ValueError(f"{what}: expected one 3x4 [R|t] matrix per latent frame, got shape {tuple(poses.shape)}")
    if poses.shape[0] < n_frames:
        raise ValueError(f"{what}: {poses.shape[0]} poses for {n_frames} latent frames")
    return poses


class ApplyQueryMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerApplyQueryMemory",
            display_name="Apply Query Memory",
            category="memlearner",
            description="Gives a Wan2.1 model memory. With a context: query tokens in the first query layers read "
                        "the clean history frames, the video reads only the query tokens (MemLearner; needs a "
                        "model fine-tuned for it). With a MEMORY: every self-attention also reads the reference "
                        "videos' memory tokens (DiT-Mem, any Wan2.1 of the encoder's width). Returns a patched "
                        "copy; the input model is unchanged.",
            inputs=[
                io.Model.Input("model"),
                io.Latent.Input("context", optional=True,
                                tooltip="Clean latents of the history frames, right before the video to generate."),
                io.Int.Input("query_layers", default=5, min=1, max=64,
                             tooltip="How many of the first blocks are query layers (5 of 28 in the paper)."),
                MEMORY.Input("memory", optional=True, tooltip="Reference-video memory from Encode Reference Video."),
                io.Combo.Input("query_weights", options=[NO_WEIGHTS] + folder_paths.get_filename_list(QUERY_WEIGHTS_FOLDER),
                               default=NO_WEIGHTS, optional=True,
                               tooltip="The pack's tensors of a query-memory fine-tune (camera MLP), from models/memlearner."),
                io.String.Input("camera_poses", default="", multiline=True, optional=True,
                                tooltip="JSON: one 3x4 [R|t] per latent frame, history frames first, then the video's."),
                io.Boolean.Input("cache_context", default=True, optional=True,
                                 tooltip="Compute the history's keys/values once per run (exact; faster)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, context=None, query_layers=5, memory=None, query_weights=NO_WEIGHTS, camera_poses="",
                cache_context=True) -> io.NodeOutput:
        query = None
        if context is not None:
            samples = context["samples"]
            if samples.ndim != 5:
                raise ValueError(f"context must be a video latent [B, 16, T, H, W], got {tuple(samples.shape)}")
            camera, chunk_poses, history_poses = None, None, None
            if query_weights and query_weights != NO_WEIGHTS:
                state, _ = load_query_weights(folder_paths.get_full_path_or_raise(QUERY_WEIGHTS_FOLDER, query_weights))
                camera = CameraEmbedding(state["proj.weight"].shape[0])
                camera.load_state_dict(state)
                camera.requires_grad_(False)
                n_hist = samples.shape[2]
                poses = parse_poses(camera_poses or "", n_hist, "camera_poses")
                if poses is not None:
                    history_poses, chunk_poses = poses[:n_hist], (poses[n_hist:] if poses.shape[0] > n_hist else None)
            elif camera_poses and camera_poses.strip():
                raise ValueError("camera_poses need query_weights: the camera MLP is part of the query-memory weights")
            query = QueryMemory(int(query_layers), ContextSpec.from_history(samples[0].cpu(), history_poses),
                                camera, chunk_poses, bool(cache_context))
        return io.NodeOutput(apply_memory(model, memory=memory, query=query))


class ApplyReferenceMemory(io.ComfyNode):
    """DiT-Mem alone, for graphs that do not use query memory."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerApplyReferenceMemory",
            display_name="Apply Reference Memory",
            category="memlearner",
            description="Every self-attention of the Wan2.1 model also reads the reference videos' memory tokens "
                        "(DiT-Mem). Returns a patched copy; the input model is unchanged.",
            inputs=[io.Model.Input("model"), MEMORY.Input("memory")],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, memory) -> io.NodeOutput:
        return io.NodeOutput(apply_memory(model, memory=memory))
