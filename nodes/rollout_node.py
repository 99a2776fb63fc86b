"""Memory Rollout: a long video, chunk after chunk, each chunk's context chosen from all before it by a policy."""

from __future__ import annotations

import json
import logging
import time

import comfy.samplers
import torch
from comfy_api.latest import io

from memlearner_core.context_policy import POLICIES, frame_cost, select_context
from memlearner_core.rollout import ChunkRecord, MemoryBank, context_tokens, latent_frames
from memlearner_core.trajectory import parse_trajectory, preset_names

from . import comfy_adapter as wa
from .memory_patch import QueryMemory, apply_memory, context_in_model_space, installed_patch
from .query_memory_node import load_camera, query_pool_input, query_weights_input

NO_CAMERA, CUSTOM = "none", "custom JSON"
SEED_RANGE = 2**64  # the seeds ComfyUI's noise takes: 0 .. 2^64 - 1
log = logging.getLogger("memlearner")


def chunk_seed(seed: int, index: int) -> int:
    """The seed of chunk ``index``: ``seed + index`` modulo 2^64, always a seed ComfyUI's noise accepts."""
    return (int(seed) + int(index)) % SEED_RANGE


def trajectory_text(camera: str, trajectory: str) -> str | None:
    """The JSON ``parse_trajectory`` reads: a preset (``trajectory`` may hold its parameters as a JSON object)
    or the custom JSON itself."""
    if camera == NO_CAMERA:
        return None
    if camera == CUSTOM:
        if not trajectory.strip():
            raise ValueError("camera is 'custom JSON' but the trajectory is empty")
        return trajectory
    params = {}
    if trajectory.strip():
        try:
            params = json.loads(trajectory)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"trajectory: the {camera} preset's parameters are not valid JSON "
                             f"({e if isinstance(e, ValueError) else 'nested too deeply'})") from None
        if not isinstance(params, dict):
            raise ValueError(f'trajectory: the {camera} preset takes a JSON object of parameters, e.g. {{"degrees": 90}}')
        if params.get("preset", camera) != camera:
            raise ValueError(f"trajectory names the preset {params['preset']!r} but camera is {camera!r}: choose "
                             f"that preset as camera (or 'custom JSON'), or remove \"preset\" from the trajectory")
    return json.dumps({**params, "preset": camera})


class MemoryRollout(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerMemoryRollout",
            display_name="Memory Rollout",
            category="memlearner",
            description="Generates a long video chunk after chunk. Every chunk's latents go into a memory bank; "
                        "before the next chunk a policy picks its context from the bank (all history, the most "
                        "recent frames, the frames whose view overlaps the next camera poses, or FramePack-style "
                        "compression), read through query memory. A MEMORY already applied to the model (DiT-Mem) "
                        "is kept for every chunk. Sampling is ComfyUI's own.",
            inputs=[
                io.Model.Input("model", tooltip="Wan2.1 (plain, or from Apply Reference Memory / Apply Query Memory)."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Int.Input("seed", default=0, min=0, max=SEED_RANGE - 1, control_after_generate=True,
                             tooltip="Chunk k samples with seed + k, wrapped to 0 past the largest seed "
                                     "(modulo 2^64), so every seed works for every chunk."),
                io.Int.Input("steps", default=30, min=1, max=10000),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="uni_pc"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple"),
                io.Int.Input("width", default=832, min=16, max=4096, step=16),
                io.Int.Input("height", default=480, min=16, max=4096, step=16),
                io.Int.Input("chunk_frames", default=33, min=5, max=1025, step=4,
                             tooltip="Video frames per chunk (4k+1; 33 frames = 9 latent frames)."),
                io.Int.Input("chunks", default=4, min=1, max=1000, tooltip="Chunks to generate."),
                io.Combo.Input("policy", options=list(POLICIES), default="all",
                               tooltip="all: all history (newest first) within the budget; recent: a sliding window; "
                                       "fov: the past frames whose view overlaps the next chunk's camera most; "
                                       "framepack: recent frames sharp, older ones pooled coarser."),
                io.Int.Input("context_frames", default=21, min=0, max=10000,
                             tooltip="Context budget, in full-resolution latent frames (its token count is the same "
                                     "for every policy). 0 = unlimited, for 'all' only."),
                io.Int.Input("query_layers", default=5, min=0, max=64,
                             tooltip="Query layers (5 of 28 in the paper). 0 = no query memory: chunks do not see "
                                     "each other."),
                query_weights_input(optional=True),
                io.Combo.Input("camera", options=[NO_CAMERA, *preset_names(), CUSTOM], default=NO_CAMERA, optional=True,
                               tooltip="Camera trajectory, one pose per latent frame: a preset or custom JSON."),
                io.String.Input("trajectory", default="", multiline=True, optional=True,
                                tooltip="custom JSON: [[3x4 [R|t]], ...] or [{\"position\": [x,y,z], \"yaw\": deg, "
                                        "\"pitch\": deg}, ...]; for a preset, an optional JSON object of its "
                                        "parameters (e.g. {\"degrees\": 90})."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, optional=True),
                io.Latent.Input("first_chunk", optional=True,
                                tooltip="Latent frames to continue from: they enter the memory bank first and "
                                        "start the output."),
                query_pool_input(),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The whole video: first_chunk, then every chunk."),
                     io.String.Output(display_name="report",
                                      tooltip="JSON per chunk: context frames [index, pool], context tokens, seconds, "
                                              "peak memory.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, seed, steps, cfg, sampler_name, scheduler, width, height,
                chunk_frames, chunks, policy, context_frames, query_layers, query_weights="none", camera=NO_CAMERA,
                trajectory="", denoise=1.0, first_chunk=None, query_pool=1) -> io.NodeOutput:
        wa.wan21_model(model)
        t, h, w = latent_frames(chunk_frames), height // 8, width // 8
        first = None
        if first_chunk is not None:
            first = first_chunk["samples"]
            if first.ndim != 5 or first.shape[0] != 1 or first.shape[1] != 16 or tuple(first.shape[-2:]) != (h, w):
                raise ValueError(f"first_chunk must be one Wan2.1 video latent [1, 16, T, {h}, {w}] for "
                                 f"{width}x{height}, got {tuple(first.shape)}")
        n_first = 0 if first is None else first.shape[2]
        text = trajectory_text(camera or NO_CAMERA, trajectory or "")
        poses = None if text is None else parse_trajectory(text, n_first + chunks * t)
        budget = None if context_frames == 0 else context_frames * frame_cost(h, w)
        camera_mlp = load_camera(query_weights, query_layers, int(query_pool)) if query_layers else None
        prev = installed_patch(model)
        if query_layers == 0 and prev is not None and prev.query is not None:
            raise ValueError("query_layers is 0 but the model carries query memory from Apply Query Memory; connect "
                             "the model from before that node, or set query_layers")
        if query_layers and policy == "fov" and poses is None:
            raise ValueError("the fov policy picks frames by camera view: choose a camera trajectory")
        if query_layers and budget is None and policy != "all":
            raise ValueError(f"the {policy} policy needs a budget: set context_frames above 0 (0 = unlimited is for 'all')")
        if query_layers == 0:
            log.warning("Memory Rollout: query_layers is 0, so chunks are generated without memory of each other")

        bank = MemoryBank(poses)
        if first is not None:
            bank.append(first[0])
        progress = wa.Progress(model, chunks * steps)
        records = []
        try:
            for k in range(chunks):
                records.append(cls.generate_chunk(
                    bank, k, model, positive, negative, seed, steps, cfg, sampler_name, scheduler, denoise,
                    (t, h, w), policy, budget, query_layers, int(query_pool), camera_mlp, progress))
        except BaseException as e:
            if bank.n_frames > n_first:  # interrupted or failed: the finished chunks are kept
                what = "interrupted" if wa.is_interrupt(e) else f"failed ({type(e).__name__}: {e})"
                try:
                    path = wa.save_latent(bank.frames.unsqueeze(0), "memlearner/rollout_interrupted")
                except Exception as save_error:  # the first error is the one to report
                    log.error("Memory Rollout %s; saving the finished frames failed too (%s)", what, save_error)
                    raise e from None
                log.warning("Memory Rollout %s after %d chunk(s); the finished frames are saved as %s "
                            "(copy it to input/ and continue with Load Latent -> first_chunk)", what, len(records),
                            path)
            raise
        report = json.dumps([r.as_dict() for r in records], indent=1)
        return io.NodeOutput({"samples": bank.frames.unsqueeze(0)}, report)

    @staticmethod
    def generate_chunk(bank: MemoryBank, k, model, positive, negative, seed, steps, cfg, sampler_name, scheduler,
                       denoise, shape, policy, budget, query_layers, query_pool, camera_mlp, progress) -> ChunkRecord:
        t, h, w = shape
        start = bank.n_frames
        chunk_poses = bank.poses(start, start + t)
        picks = []
        patched = model
        if query_layers:
            picks = select_context(policy, start, budget, (h, w), bank.poses(0, start), chunk_poses)
            context = context_in_model_space(bank.context(picks, start))
            query = QueryMemory(query_layers, context, camera_mlp, chunk_poses, True, query_pool)
            patched = apply_memory(model, query=query)
        record = ChunkRecord(k, start, [[p.index, p.pool] for p in picks], context_tokens(picks, (h, w)))
        wa.reset_peak_memory(model.load_device)
        began = time.perf_counter()
        latent = torch.zeros(1, 16, t, h, w)
        samples = wa.sample(patched, chunk_seed(seed, start // t), steps, cfg, sampler_name, scheduler, positive,
                            negative, latent, denoise, progress.callback(k * steps))
        if not torch.isfinite(samples).all():
            raise ValueError(f"Memory Rollout: chunk {k} came out with NaN or infinite values (check the "
                             "conditioning, cfg and the model's weights); the finished chunks before it are saved")
        record.seconds = round(time.perf_counter() - began, 3)
        record.memory_kind, mb = wa.peak_memory_mb(model.load_device)
        record.peak_memory_mb = round(mb, 1)
        bank.append(samples[0])
        log.info("Memory Rollout chunk %d: frames %d-%d, context %d frames (%d tokens), %.2fs, peak %s %.0f MB",
                 k, start, start + t - 1, len(picks), record.context_tokens, record.seconds, record.memory_kind, mb)
        return record
