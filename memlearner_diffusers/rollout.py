"""A long video from a diffusers Wan pipeline, chunk after chunk, each chunk reading its history as query memory.

The same schedule as the ComfyUI node Memory Rollout, over the same core (``memlearner_core.rollout``,
``context_policy``): every generated latent frame joins a memory bank; before chunk ``k`` a policy picks its
context from the bank within one token budget; the chunk is sampled by the pipeline itself (its scheduler, its
CFG) with seed ``seed + k`` (initial noise and query noise alike) and query memory over the picked frames.
Latents stay in the transformer's normalized latent space (what ``output_type="latent"`` returns); decode them
with ``to_vae_latents`` and the pipeline's VAE.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from memlearner_core.camera import CameraEmbedding
from memlearner_core.context_policy import frame_cost, route_frames, select_context
from memlearner_core.rollout import ChunkRecord, MemoryBank, context_tokens, latent_frames

from . import wan_host as wh
from .memory import QueryMemory, apply_memory, installed, remove_memory

SEED_RANGE = 2**64


@dataclass
class RolloutResult:
    """``latents [1, C, N, H/s, W/s]`` (the family's channels and VAE stride: 16 and 8 Wan2.1, 48 and 16 Wan2.2
    TI2V-5B): ``first_chunk`` then every chunk, in the transformer's latent space;
    ``records``: per chunk, its first frame, the picked ``[frame, pool]`` pairs, context tokens, seconds and peak
    memory (as the node's report)."""

    latents: torch.Tensor
    records: list[ChunkRecord]


def _vae_stats(vae, latents: torch.Tensor):
    shape = (1, -1, 1, 1, 1) if latents.ndim == 5 else (-1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
    return mean, std


def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents as ``AutoencoderKLWan.encode`` gives them -> the transformer's space ``(z - mean) / std`` (history
    and reference videos are read there, as the pipeline denoises there). ``[B, C, T, H, W]`` or ``[C, T, H, W]``."""
    mean, std = _vae_stats(vae, latents)
    return (latents - mean) / std


def to_vae_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of ``normalize_latents``: what ``vae.decode`` takes."""
    mean, std = _vae_stats(vae, latents)
    return latents * std + mean


def _peak_memory(device) -> tuple[str, float | None]:
    if torch.device(device).type == "cuda":
        return "cuda_allocated", round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return "process_peak_rss", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rollout(pipe, *, chunks: int, chunk_frames: int, height: int, width: int, policy: str = "all",
            context_frames: int = 21, query_layers: int = 5, query_pool: int = 1,
            camera: CameraEmbedding | None = None, poses: torch.Tensor | None = None,
            first_chunk: torch.Tensor | None = None, seed: int = 0, cache_context: bool = True,
            **pipe_kwargs) -> RolloutResult:
    """Generate ``chunks`` chunks of ``chunk_frames`` video frames (4k+1) with ``pipe`` (a ``WanPipeline``).

    ``policy`` (``all``, ``recent``, ``fov``, ``framepack``, ``learned``) picks each chunk's context within
    ``context_frames`` full-resolution latent frames of tokens (0 = unlimited, ``all`` only); ``query_layers``
    0 generates the chunks without memory of each other. ``poses [N, 3, 4]``: one camera-to-world pose per
    latent frame of the whole video (``first_chunk`` included), for ``fov`` and the ``camera`` MLP.
    ``first_chunk [C, T, H/s, W/s]`` (transformer space; the family's channels and VAE stride) enters the bank first. Everything else (prompt or
    ``prompt_embeds``, ``negative_prompt``, ``num_inference_steps``, ``guidance_scale``...) goes to the pipeline.
    A DiT-Mem memory already applied to ``pipe.transformer`` is kept for every chunk; the transformer leaves
    with the memory it came with."""
    family = wh.wan_family(pipe.transformer)
    stride = getattr(pipe, "vae_scale_factor_spatial", family.vae_stride)
    if stride != family.vae_stride:
        raise ValueError(f"the pipeline's VAE compresses {stride}x but {family.label} latents are {family.vae_stride}x "
                         f"the frames; give the pipeline this model's VAE")
    t, h, w, c = latent_frames(chunk_frames), height // stride, width // stride, family.latent_channels
    if first_chunk is not None:
        first_chunk = first_chunk[0] if first_chunk.ndim == 5 else first_chunk
        if first_chunk.ndim != 4 or first_chunk.shape[0] != c or tuple(first_chunk.shape[-2:]) != (h, w):
            raise ValueError(f"first_chunk must be a {family.label} latent [{c}, T, {h}, {w}], got "
                             f"{tuple(first_chunk.shape)}")
    n_first = 0 if first_chunk is None else first_chunk.shape[1]
    if poses is not None and poses.shape[0] < n_first + chunks * t:
        raise ValueError(f"poses cover {poses.shape[0]} latent frames; the video has {n_first + chunks * t}")
    budget = None if context_frames == 0 else context_frames * frame_cost(h, w)
    if query_layers and budget is None and policy != "all":
        raise ValueError(f"the {policy} policy needs a budget: set context_frames above 0 (0 = unlimited is for 'all')")
    if query_layers and policy == "fov" and poses is None:
        raise ValueError("the fov policy picks frames by camera view: give poses")
    tr = pipe.transformer
    prev = installed(tr)
    prev_memory, prev_query = (prev.memory, prev.query) if prev is not None else (None, None)

    bank = MemoryBank(None if poses is None else poses.detach().cpu().float())
    if first_chunk is not None:
        bank.append(first_chunk.float())
    records = []
    try:
        for k in range(chunks):
            start = bank.n_frames
            chunk_seed = (int(seed) + start // t) % SEED_RANGE
            chunk_poses = bank.poses(start, start + t)
            picks = []
            if query_layers:
                picks = select_context(policy, start, budget, (h, w), bank.poses(0, start), chunk_poses)
                query = QueryMemory(query_layers, bank.context(picks, start), camera, chunk_poses, cache_context,
                                    query_pool, chunk_seed, route_frames(policy, context_frames))
                apply_memory(tr, memory=prev_memory, query=query)
            record = ChunkRecord(k, start, [[p.index, p.pool] for p in picks], context_tokens(picks, (h, w)))
            device = pipe._execution_device
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            began = time.perf_counter()
            out = pipe(num_frames=chunk_frames, height=height, width=width, output_type="latent", return_dict=False,
                       generator=torch.Generator().manual_seed(chunk_seed), **pipe_kwargs)[0]
            if not torch.isfinite(out).all():
                raise ValueError(f"rollout: chunk {k} came out with NaN or infinite values")
            record.seconds = round(time.perf_counter() - began, 3)
            record.memory_kind, record.peak_memory_mb = _peak_memory(device)
            if query_layers and policy == "learned":
                record.routed_to(query.routed, picks, (h, w))
            bank.append(out[0].float())
            records.append(record)
    finally:
        remove_memory(tr)
        if prev_memory is not None or prev_query is not None:
            apply_memory(tr, memory=prev_memory, query=prev_query)
    return RolloutResult(bank.frames.unsqueeze(0), records)
