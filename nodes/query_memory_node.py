"""Apply Query Memory: MemLearner query layers (and optionally DiT-Mem memory) on a clone of a Wan MODEL (Wan2.1 T2V,
a Wan2.2 A14B expert or Wan2.2 TI2V-5B)."""

from __future__ import annotations

import logging

import folder_paths
import torch
from comfy_api.latest import io

from memlearner_core.camera import CameraEmbedding
from memlearner_core.checkpoint_io import load_query_weights
from memlearner_core.context_tokens import ContextSpec
from memlearner_core.trajectory import parse_trajectory

from . import comfy_adapter as ca
from .comfy_types import MEMORY, QUERY_WEIGHTS_FOLDER
from .memory_patch import QueryMemory, apply_memory, context_in_model_space

NO_WEIGHTS = "none"

log = logging.getLogger("memlearner")


def load_camera(query_weights: str | None, query_layers: int, query_pool: int,
                model_family: str | None = None, what: str = "query_weights") -> CameraEmbedding | None:
    """The camera MLP of a query-memory weights file in models/memlearner; None for "none". A file fine-tuned
    with other ``query_layers`` or ``query_pool`` than the node's, or on another ``model_family`` (None: not
    checked), is refused, naming the input ``what``: the model would run untrained."""
    if not query_weights or query_weights == NO_WEIGHTS:
        return None
    weights = load_query_weights(ca.model_file(QUERY_WEIGHTS_FOLDER, query_weights, what))
    wrong = weights.mismatch(query_layers, query_pool, model_family)
    if wrong is not None:
        key, recorded, given = wrong
        if key == "model_family":
            raise ValueError(f"{what} {query_weights} was fine-tuned on {recorded}, but the model is "
                             f"{given}; load the query weights fine-tuned for this model")
        raise ValueError(f"{what} {query_weights} was fine-tuned with {key} = {recorded}, "
                         f"but the node says {given}: set {key} to {recorded}")
    return weights.camera_embedding().requires_grad_(False)


def query_weights_input(id: str = "query_weights", first: tuple[str, ...] = (NO_WEIGHTS,),
                        tooltip: str = "The pack's tensors of a query-memory fine-tune (camera MLP), from "
                                       "models/memlearner.", **kw):
    """The query-weights dropdown: ``first`` (default the first of them), then the files in models/memlearner."""
    return ca.combo_input(id, options=[*first, *folder_paths.get_filename_list(QUERY_WEIGHTS_FOLDER)],
                          default=first[0], tooltip=tooltip, **kw)


def query_pool_input():
    return io.Int.Input("query_pool", default=1, min=1, max=8, optional=True,
                        tooltip="1: one query token per video token (the published method). 2: one per 2x2 cell, "
                                "4x fewer query tokens, much cheaper at long histories. Use the value the model "
                                "was fine-tuned with.")


class ApplyQueryMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerApplyQueryMemory",
            display_name="Apply Query Memory",
            category="memlearner",
            description="Gives a Wan model memory (Wan2.1 T2V, a Wan2.2 A14B expert, or Wan2.2 TI2V-5B). With a "
                        "context: query tokens in the first query layers read the clean history frames, the video "
                        "reads only the query tokens (MemLearner; needs a model fine-tuned for it). With a MEMORY: "
                        "every self-attention also reads the reference videos' memory tokens (DiT-Mem, any Wan of "
                        "the encoder's width and latent channels). Returns a patched copy; the input model is "
                        "unchanged.",
            inputs=[
                io.Model.Input("model"),
                io.Latent.Input("context", optional=True,
                                tooltip="Clean latents of the history frames, right before the video to generate."),
                io.Int.Input("query_layers", default=5, min=1, max=64,
                             tooltip="How many of the first blocks are query layers (5 of 28 in the paper)."),
                MEMORY.Input("memory", optional=True, tooltip="Reference-video memory from Encode Reference Video."),
                query_weights_input(optional=True),
                io.String.Input("camera_poses", default="", multiline=True, optional=True,
                                tooltip="JSON: one camera pose per latent frame, history frames first, then the video's: "
                                        "3x4 [R|t] matrices or {\"position\": [x,y,z], \"yaw\": deg, \"pitch\": deg}."),
                io.Boolean.Input("cache_context", default=True, optional=True,
                                 tooltip="Compute the history's keys/values once per run (exact; faster)."),
                query_pool_input(),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, context=None, query_layers=5, memory=None, query_weights=NO_WEIGHTS, camera_poses="",
                cache_context=True, query_pool=1) -> io.NodeOutput:
        query = None
        if context is not None:
            family = ca.wan_family(model)
            samples, c = context["samples"], family.latent_channels
            if samples.ndim != 5 or samples.shape[0] != 1 or samples.shape[1] != c or 0 in samples.shape[3:]:
                raise ValueError(f"context must be one {family.label} video latent [1, {c}, T, H, W] (a batch of 1, "
                                 f"{c} channels), got {tuple(samples.shape)}; use one video's history latents")
            if not torch.isfinite(samples).all():
                raise ValueError("context has NaN or infinite values; give the clean latents of the history frames")
            chunk_poses, history_poses = None, None
            camera = load_camera(query_weights, int(query_layers), int(query_pool), family.name)
            if camera is not None:
                n_hist = samples.shape[2]
                poses = parse_trajectory(camera_poses, n_hist) if (camera_poses or "").strip() else None
                if poses is not None:
                    history_poses, chunk_poses = poses[:n_hist], (poses[n_hist:] if poses.shape[0] > n_hist else None)
            elif camera_poses and camera_poses.strip():
                raise ValueError("camera_poses need query_weights: the camera MLP is part of the query-memory weights")
            if camera is not None and camera.view_rope_fov is not None and chunk_poses is None:
                log.warning("memlearner: %s was trained with view-aligned RoPE, which places frames by their camera "
                            "poses; without camera_poses for the video every frame keeps the stock positions",
                            query_weights)
            history = context_in_model_space(ContextSpec.from_history(samples[0].cpu(), history_poses), model)
            query = QueryMemory(int(query_layers), history, camera, chunk_poses, bool(cache_context), int(query_pool))
        return io.NodeOutput(apply_memory(model, memory=memory, query=query))


class ApplyReferenceMemory(io.ComfyNode):
    """DiT-Mem alone, for graphs that do not use query memory."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerApplyReferenceMemory",
            display_name="Apply Reference Memory",
            category="memlearner",
            description="Every self-attention of the Wan model also reads the reference videos' memory tokens "
                        "(DiT-Mem). Returns a patched copy; the input model is unchanged.",
            inputs=[io.Model.Input("model"), MEMORY.Input("memory")],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, memory) -> io.NodeOutput:
        return io.NodeOutput(apply_memory(model, memory=memory))
