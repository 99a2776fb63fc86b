"""Memory Rollout: a long video, chunk after chunk, each chunk's context chosen from all before it by a policy.

Built from ComfyUI's own sampling parts, as SamplerCustomAdvanced is: NOISE, GUIDER, SAMPLER and SIGMAS, so any
guider, sampler and scheduler plugs in. What to generate and how context is picked is one ``RolloutPlan``. Wan2.2
A14B's two experts: a second GUIDER (the low-noise expert) samples each chunk's steps from ``switch_step`` on, as
ComfyUI's template does with two KSamplerAdvanced (the first returns its leftover noise, the second adds none).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from comfy_api.latest import io

from memlearner_core.context_policy import POLICIES, route_frames, select_context
from memlearner_core.rollout import (
    MAX_QUERY_LAYERS,
    ChunkRecord,
    MemoryBank,
    RolloutPlan,
    check_settings,
    check_switch_step,
    context_tokens,
    split_steps,
)

from . import comfy_adapter as wa
from .camera_path_node import CAMERA_PATH, CameraPathSpec
from .memory_patch import QueryMemory, apply_memory, context_in_model_space, installed_patch
from .query_memory_node import NO_WEIGHTS, load_camera, query_pool_input, query_weights_input

SEED_RANGE = 2**64  # the seeds ComfyUI's noise takes: 0 .. 2^64 - 1
SAME_WEIGHTS = "same as query_weights"  # query_weights_low's default
log = logging.getLogger("memlearner")


def chunk_seed(seed: int, index: int) -> int:
    """The seed of chunk ``index``: ``seed + index`` modulo 2^64, always a seed ComfyUI's noise accepts."""
    return (int(seed) + int(index)) % SEED_RANGE


@dataclass
class LowNoiseExpert:
    """Wan2.2 A14B's low-noise expert: its guider samples the steps from ``switch_step`` on, its query weights'
    camera MLP (or None) on the same memory as the first expert."""

    guider: Any
    switch_step: int
    camera_mlp: Any = None

    @property
    def model(self):
        return self.guider.model_patcher


@dataclass
class Sampling:
    """ComfyUI's sampling parts for every chunk: chunk k draws its noise with the noise's seed + k. With ``low``,
    the guider samples steps 0 .. switch_step - 1 and ``low``'s guider the rest."""

    noise: Any
    guider: Any
    sampler: Any
    sigmas: torch.Tensor
    low: LowNoiseExpert | None = None

    @property
    def model(self):
        return self.guider.model_patcher

    @property
    def steps(self) -> int:
        return max(int(self.sigmas.shape[-1]) - 1, 0)


def chunk_shape(latent: dict, channels: int = 16) -> tuple[int, int, int]:
    """(latent frames, height, width) of one chunk, from an empty video latent ``[1, channels, T, H, W]``."""
    s = latent["samples"]
    if s.ndim != 5 or s.shape[0] != 1 or s.shape[1] != channels:
        raise ValueError(f"chunk_latent must be one video latent [1, {channels}, T, H, W] of the model's VAE "
                         f"(EmptyHunyuanLatentVideo for Wan2.1, Wan22ImageToVideoLatent for Wan2.2 TI2V-5B: "
                         f"width, height, length = video frames per chunk), got {tuple(s.shape)}")
    return tuple(s.shape[2:])


def first_frames(first_chunk: dict | None, shape: tuple[int, int, int], size: str,
                 channels: int = 16) -> torch.Tensor | None:
    """The latent frames to continue from ``[1, channels, T, H, W]``, checked against the chunk size."""
    if first_chunk is None:
        return None
    first, (_, h, w) = first_chunk["samples"], shape
    if first.ndim != 5 or first.shape[0] != 1 or first.shape[1] != channels or tuple(first.shape[-2:]) != (h, w):
        raise ValueError(f"first_chunk must be one video latent [1, {channels}, T, {h}, {w}] for {size}, "
                         f"got {tuple(first.shape)}")
    return first


def check_model(model, plan: RolloutPlan, what: str = "the model") -> None:
    wa.wan_family(model)
    prev = installed_patch(model)
    if plan.query_layers == 0 and prev is not None and prev.query is not None:
        raise ValueError(f"query_layers is 0 but {what} carries query memory from Apply Query Memory; connect "
                         "the model from before that node, or set query_layers")


def experts_family(guider, guider_low=None):
    """The family of guider's model; guider_low's model (when given) must be of the same family."""
    family = wa.wan_family(guider.model_patcher)
    if guider_low is None:
        return family
    try:
        family_low = wa.wan_family(guider_low.model_patcher)
    except wa.UnsupportedModel as e:
        raise wa.UnsupportedModel(f"guider_low: {e}") from None
    if family_low != family:
        raise ValueError(f"guider_low's model is {family_low.label} but guider's is {family.label}: connect the "
                         "low-noise expert of the same model (Wan2.2 A14B's experts are both Wan2.1 14B-shaped)")
    return family


def check_low_expert(sampling: Sampling, plan: RolloutPlan) -> None:
    """The low-noise expert, when given: the family of the first expert, a switch_step within the sigmas' steps."""
    low = sampling.low
    if low is None:
        return
    experts_family(sampling.guider, low.guider)
    check_switch_step(low.switch_step, sampling.steps, True)
    check_model(low.model, plan, "guider_low's model")


def rollout(plan: RolloutPlan, sampling: Sampling, first: torch.Tensor | None, camera_mlp) -> tuple[dict, str]:
    """Every chunk of ``plan``; the LATENT of the whole video and the JSON report. After an interrupt or a failure
    the finished chunks are saved to output/memlearner/ before the error goes on."""
    check_model(sampling.model, plan)
    check_low_expert(sampling, plan)
    if plan.query_layers == 0:
        log.warning("Memory Rollout: query_layers is 0, so chunks are generated without memory of each other")
    bank = MemoryBank(plan.poses)
    if first is not None:
        bank.append(first[0])
    progress = wa.Progress(sampling.model, plan.chunks * sampling.steps)
    records = []
    try:
        for k in range(plan.chunks):
            records.append(generate_chunk(plan, sampling, bank, k, camera_mlp, progress))
    except BaseException as e:
        if bank.n_frames > plan.first_frames:  # interrupted or failed: the finished chunks are kept
            save_finished(bank, e, len(records))
        raise
    return {"samples": bank.frames.unsqueeze(0)}, json.dumps([r.as_dict() for r in records], indent=1)


def save_finished(bank: MemoryBank, error: BaseException, n_chunks: int) -> None:
    what = "interrupted" if wa.is_interrupt(error) else f"failed ({type(error).__name__}: {error})"
    try:
        path = wa.save_latent(bank.frames.unsqueeze(0), "memlearner/rollout_interrupted")
    except Exception as save_error:  # the first error is the one to report
        log.error("Memory Rollout %s; saving the finished frames failed too (%s)", what, save_error)
        raise error from None
    log.warning("Memory Rollout %s after %d chunk(s); the finished frames are saved as %s "
                "(copy it to input/ and continue with Load Latent -> first_chunk)", what, n_chunks, path)


def generate_chunk(plan: RolloutPlan, sampling: Sampling, bank: MemoryBank, k: int, camera_mlp,
                   progress) -> ChunkRecord:
    t, h, w = plan.chunk_shape
    start = bank.n_frames
    chunk_poses = bank.poses(start, start + t)
    low = sampling.low
    picks, guider, guider_low = [], sampling.guider, None if low is None else low.guider
    if plan.query_layers:
        picks = select_context(plan.policy, start, plan.budget, (h, w), bank.poses(0, start), chunk_poses)
        context = context_in_model_space(bank.context(picks, start), sampling.model)

        route = route_frames(plan.policy, plan.context_frames)
        queries = []

        def with_memory(g, camera):  # the same context and poses for either expert, its own camera MLP
            queries.append(QueryMemory(query_layers=plan.query_layers, context=context, camera=camera,
                                       chunk_poses=chunk_poses, cache_context=True, query_pool=plan.query_pool,
                                       route_frames=route))
            return wa.guider_on(g, apply_memory(g.model_patcher, query=queries[-1]))

        guider = with_memory(guider, camera_mlp)
        guider_low = None if low is None else with_memory(guider_low, low.camera_mlp)
    record = ChunkRecord(k, start, [[p.index, p.pool] for p in picks], context_tokens(picks, (h, w)))
    device = sampling.model.load_device
    wa.reset_peak_memory(device)
    began = time.perf_counter()
    noise = wa.reseeded(sampling.noise, chunk_seed(getattr(sampling.noise, "seed", 0), plan.chunk_index(start)))
    empty = torch.zeros(1, wa.wan_family(sampling.model).latent_channels, t, h, w)
    offset = k * sampling.steps
    if low is None:
        samples = wa.sample_with(guider, noise, sampling.sampler, sampling.sigmas, empty, progress.callback(offset))
    else:  # as two KSamplerAdvanced: the first returns its leftover noise, the second adds none (same seed)
        high_sigmas, low_sigmas = split_steps(sampling.sigmas, low.switch_step)
        noisy = wa.sample_with(guider, noise, sampling.sampler, high_sigmas, empty, progress.callback(offset))
        samples = wa.sample_with(guider_low, wa.empty_noise(), sampling.sampler, low_sigmas, noisy,
                                 progress.callback(offset + low.switch_step), seed=getattr(noise, "seed", None))
    if not torch.isfinite(samples).all():
        raise ValueError(f"Memory Rollout: chunk {k} came out with NaN or infinite values (check the "
                         "conditioning, cfg and the model's weights); the finished chunks before it are saved")
    record.seconds = round(time.perf_counter() - began, 3)
    record.memory_kind, mb = wa.peak_memory_mb(device)
    record.peak_memory_mb = round(mb, 1)
    if plan.query_layers and plan.policy == "learned":
        record.routed_to(queries[0].routed, picks, (h, w), queries[1].routed if len(queries) > 1 else None)
    bank.append(samples[0])
    log.info("Memory Rollout chunk %d: frames %d-%d, context %d frames (%d tokens), %.2fs, peak %s %.0f MB",
             k, start, start + t - 1, len(record.context), record.context_tokens, record.seconds, record.memory_kind, mb)
    return record


def memory_inputs() -> list:
    """The inputs that say how each chunk remembers the ones before it (shared with the legacy node)."""
    return [
        wa.combo_input("policy", options=list(POLICIES), default="all",
                       tooltip="all: all history (newest first) within the budget; recent: a sliding window; "
                               "fov: the past frames whose view overlaps the next chunk's camera most; "
                               "framepack: recent frames sharp, older ones pooled coarser; learned: each query "
                               "layer reads the past frames its own queries rank highest (model-chosen)."),
        io.Int.Input("context_frames", default=21, min=0, max=10000,
                     tooltip="Context budget, in full-resolution latent frames (its token count is the same "
                             "for every policy; learned: what each query layer reads). 0 = unlimited, for 'all' "
                             "only."),
        io.Int.Input("query_layers", default=5, min=0, max=MAX_QUERY_LAYERS,
                     tooltip="Query layers (5 of 28 in the paper). 0 = no query memory: chunks do not see "
                             "each other."),
    ]


def first_chunk_input():
    return io.Latent.Input("first_chunk", optional=True, tooltip="Latent frames to continue from: they enter the "
                                                                 "memory bank first and start the output.")


def rollout_outputs() -> list:
    return [io.Latent.Output(display_name="latent", tooltip="The whole video: first_chunk, then every chunk."),
            io.String.Output(display_name="report", tooltip="JSON per chunk: context frames [index, pool], context "
                                                            "tokens, seconds, peak memory.")]


def settings_error(chunks=None, policy=None, context_frames=None, query_layers=None, query_weights=None,
                   query_pool=None, has_camera=None, switch_step=None, query_weights_low=None,
                   has_low=None) -> str | None:
    """What is wrong with the settings known before a run (None for a linked input), or None."""
    try:
        check_settings(chunks=chunks, policy=policy, context_frames=context_frames, query_layers=query_layers,
                       query_pool=query_pool, has_camera=has_camera)
        check_switch_step(switch_step, None, has_low)
        if has_low is False and query_weights_low not in (None, SAME_WEIGHTS):
            raise ValueError(f"query_weights_low is {query_weights_low} but no guider_low is connected: connect the "
                             f"low-noise expert's guider, or set query_weights_low to {SAME_WEIGHTS!r}")
        for weights, what in ((query_weights, "query_weights"), (query_weights_low, "query_weights_low")):
            if query_layers and weights not in (None, SAME_WEIGHTS):
                load_camera(weights, query_layers, 1 if query_pool is None else query_pool, what=what)
    except (ValueError, OSError) as e:
        return str(e)
    return None


def expert_inputs() -> list:
    """Wan2.2 A14B: the low-noise expert after ``switch_step`` (off by default)."""
    return [
        io.Guider.Input("guider_low", optional=True,
                        tooltip="Wan2.2 A14B only: the low-noise expert's guider (its model from the low-noise "
                                "file, the same prompts). It samples every chunk's steps from switch_step on, with "
                                "the same memory as guider's model. Leave unconnected for one model."),
        io.Int.Input("switch_step", default=0, min=0, max=10000, optional=True,
                     tooltip="0 = off: guider's model samples every step (needed without guider_low). With "
                             "guider_low: the step where the low-noise expert takes over, 1 .. steps - 1 (steps "
                             "0 .. switch_step - 1 on guider, the rest on guider_low; ComfyUI's A14B template: 10 "
                             "of 20)."),
        query_weights_input("query_weights_low", first=(SAME_WEIGHTS, NO_WEIGHTS), optional=True,
                            tooltip="guider_low's query weights (each expert is fine-tuned on its own), from "
                                    "models/memlearner; default: the query_weights file."),
    ]


class MemoryRollout(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerRollout",
            display_name="Memory Rollout",
            category="memlearner",
            description="Generates a long video chunk after chunk with ComfyUI's own sampling parts (as Sampler "
                        "Custom Advanced: any guider, sampler and scheduler). Every chunk's latents go into a memory "
                        "bank; before the next chunk a policy picks its context from the bank (all history, the most "
                        "recent frames, the frames whose view overlaps the next camera poses, or FramePack-style "
                        "compression), read through query memory. A MEMORY already applied to the guider's model "
                        "(DiT-Mem) is kept for every chunk. Wan2.2 A14B: connect the high-noise expert's guider to "
                        "guider and the low-noise expert's to guider_low, and set switch_step; both read the same "
                        "memory.",
            inputs=[
                io.Noise.Input("noise", tooltip="Chunk k draws with the noise's seed + k (modulo 2^64)."),
                io.Guider.Input("guider", tooltip="Its model is Wan2.1 T2V, Wan2.2 TI2V-5B or Wan2.2 A14B's high-noise "
                                                  "expert (plain, or from Apply Reference Memory)."),
                io.Sampler.Input("sampler"),
                io.Sigmas.Input("sigmas", tooltip="The same steps for every chunk."),
                io.Latent.Input("chunk_latent", tooltip="An empty latent of ONE chunk (EmptyHunyuanLatentVideo: "
                                                        "width, height, length = video frames per chunk, 4k+1)."),
                io.Int.Input("chunks", default=4, min=1, max=1000, tooltip="Chunks to generate."),
                *memory_inputs(),
                query_weights_input(optional=True),
                query_pool_input(),
                CAMERA_PATH.Input("camera_path", optional=True, tooltip="From Camera Path: one pose per latent frame "
                                                                        "(the fov policy needs one)."),
                first_chunk_input(),
                *expert_inputs(),
            ],
            outputs=rollout_outputs(),
        )

    @classmethod
    def validate_inputs(cls, policy=None, context_frames=None, query_layers=None, query_weights=None,
                        query_pool=None, switch_step=None, query_weights_low=None, input_types=None):
        """Names only the inputs whose checks read another input (ComfyUI skips its own checks of a named input and
        says the message under each): ``chunks`` is left to ComfyUI's range check, said once under its name."""
        linked = None if input_types is None else set(input_types)  # linked inputs' types
        has_camera, has_low = (None, None) if linked is None else ("camera_path" in linked, "guider_low" in linked)
        return settings_error(None, policy, context_frames, query_layers, query_weights, query_pool, has_camera,
                              switch_step, query_weights_low, has_low) or True

    @classmethod
    def execute(cls, noise, guider, sampler, sigmas, chunk_latent, chunks, policy, context_frames, query_layers,
                query_weights="none", query_pool=1, camera_path: CameraPathSpec | None = None,
                first_chunk=None, guider_low=None, switch_step=0, query_weights_low=SAME_WEIGHTS) -> io.NodeOutput:
        error = settings_error(switch_step=switch_step, query_weights_low=query_weights_low,
                               has_low=guider_low is not None)
        if error:
            raise ValueError(error)
        family = experts_family(guider, guider_low)
        channels = family.latent_channels
        shape = chunk_shape(chunk_latent, channels)
        first = first_frames(first_chunk, shape, "this chunk_latent", channels)
        n_first = 0 if first is None else first.shape[2]
        poses = None if camera_path is None else camera_path.poses(n_first + chunks * shape[0])
        plan = RolloutPlan(chunk_shape=shape, chunks=chunks, policy=policy, context_frames=context_frames,
                           query_layers=query_layers, query_pool=int(query_pool), first_frames=n_first, poses=poses)
        camera_mlp = load_camera(query_weights, query_layers, plan.query_pool, family.name) if query_layers else None
        low = None
        if guider_low is not None:
            camera_low = camera_mlp if query_weights_low == SAME_WEIGHTS or not query_layers else load_camera(
                query_weights_low, query_layers, plan.query_pool, family.name, "query_weights_low")
            low = LowNoiseExpert(guider_low, switch_step, camera_low)
        return io.NodeOutput(*rollout(plan, Sampling(noise, guider, sampler, sigmas, low), first, camera_mlp))
