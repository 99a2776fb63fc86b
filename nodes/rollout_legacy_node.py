"""The first Memory Rollout node (KSampler settings, camera and size as widgets), kept so that saved workflows
still load and run. Deprecated: new graphs use Memory Rollout (noise, guider, sampler, sigmas) and Camera Path.
It runs the same rollout: its widgets become those parts and one ``RolloutPlan``."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from memlearner_core.rollout import RolloutPlan, latent_frames
from memlearner_core.trajectory import preset_names

from . import comfy_adapter as wa
from .camera_path_node import CUSTOM, CameraPathSpec
from .query_memory_node import load_camera, query_pool_input, query_weights_input
from .rollout_node import (
    SEED_RANGE,
    Sampling,
    first_chunk_input,
    first_frames,
    memory_inputs,
    rollout,
    rollout_outputs,
)

NO_CAMERA = "none"


class MemoryRolloutLegacy(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerMemoryRollout",
            display_name="Memory Rollout (legacy)",
            category="memlearner",
            is_deprecated=True,
            description="Deprecated: use Memory Rollout (noise, guider, sampler, sigmas) with Camera Path. Kept so "
                        "that saved workflows run unchanged; it generates the same video.",
            inputs=[
                io.Model.Input("model", tooltip="Wan2.1 (plain, or from Apply Reference Memory / Apply Query Memory)."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Int.Input("seed", default=0, min=0, max=SEED_RANGE - 1, control_after_generate=True,
                             tooltip="Chunk k samples with seed + k, wrapped to 0 past the largest seed "
                                     "(modulo 2^64), so every seed works for every chunk."),
                io.Int.Input("steps", default=30, min=1, max=10000),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01),
                wa.combo_input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="uni_pc"),
                wa.combo_input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple"),
                io.Int.Input("width", default=832, min=16, max=4096, step=16),
                io.Int.Input("height", default=480, min=16, max=4096, step=16),
                io.Int.Input("chunk_frames", default=33, min=5, max=1025, step=4,
                             tooltip="Video frames per chunk (4k+1; 33 frames = 9 latent frames)."),
                io.Int.Input("chunks", default=4, min=1, max=1000, tooltip="Chunks to generate."),
                *memory_inputs(),
                query_weights_input(optional=True),
                wa.combo_input("camera", options=[NO_CAMERA, *preset_names(), CUSTOM], default=NO_CAMERA, optional=True,
                               tooltip="Camera trajectory, one pose per latent frame: a preset or custom JSON."),
                io.String.Input("trajectory", default="", multiline=True, optional=True,
                                tooltip="custom JSON: [[3x4 [R|t]], ...] or [{\"position\": [x,y,z], \"yaw\": deg, "
                                        "\"pitch\": deg}, ...]; for a preset, an optional JSON object of its "
                                        "parameters (e.g. {\"degrees\": 90})."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, optional=True),
                first_chunk_input(),
                query_pool_input(),
            ],
            outputs=rollout_outputs(),
        )

    @classmethod
    def execute(cls, model, positive, negative, seed, steps, cfg, sampler_name, scheduler, width, height,
                chunk_frames, chunks, policy, context_frames, query_layers, query_weights="none", camera=NO_CAMERA,
                trajectory="", denoise=1.0, first_chunk=None, query_pool=1) -> io.NodeOutput:
        family = wa.wan_family(model)
        shape = (latent_frames(chunk_frames), height // family.vae_stride, width // family.vae_stride)
        first = first_frames(first_chunk, shape, f"{width}x{height}", family.latent_channels)
        n_first = 0 if first is None else first.shape[2]
        path = None if (camera or NO_CAMERA) == NO_CAMERA else CameraPathSpec.from_inputs(camera, trajectory or "")
        poses = None if path is None else path.poses(n_first + chunks * shape[0])
        plan = RolloutPlan(chunk_shape=shape, chunks=chunks, policy=policy, context_frames=context_frames,
                           query_layers=query_layers, query_pool=int(query_pool), first_frames=n_first, poses=poses)
        camera_mlp = load_camera(query_weights, query_layers, plan.query_pool, family.name) if query_layers else None
        sampling = Sampling(*wa.ksampler_parts(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                               denoise))
        return io.NodeOutput(*rollout(plan, sampling, first, camera_mlp))
