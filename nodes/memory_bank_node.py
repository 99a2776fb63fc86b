"""Reference Memory Bank: the top-k captioned videos of a folder for a prompt, encoded (and cached) as a MEMORY."""

from __future__ import annotations

import logging
import weakref
from pathlib import Path

import comfy.utils
import torch
from comfy_api.latest import io

from memlearner_core.confined_files import ConfinedFileError, confined_buffer
from memlearner_core.memory_bank import (
    CACHE_DIR,
    MemoryBankError,
    confined_folder,
    rank_by_text,
    read_captioned_folder,
)
from memlearner_core.training.dataset import LatentCache

from . import comfy_adapter as ca
from .comfy_types import MEMORY, MEMORY_ENCODER
from .memory_nodes import STRETCH, check_strength, check_vae_fits, encode_frames, memory_options
from .memory_patch import ReferenceMemory

log = logging.getLogger("memlearner")


def bank_folder(text: str) -> Path:
    """A folder inside ComfyUI's input folder, given relative to it; anything leading outside is refused."""
    return confined_folder(text, ca.input_directory(), "Reference Memory Bank: folder")


def cached_latent(vae, video: Path, shape: tuple[int, int, int], resize: str = STRETCH) -> torch.Tensor:
    """The video's latent ``[C, T, H, W]`` (the VAE's channels), prepared as Encode Reference Video prepares images (DiT-Mem's frame
    picking, ``resize``), from the pack's latent cache (in ComfyUI's user folder) or encoded now and cached
    atomically. An unreadable or wrong cache entry is encoded again, with a warning naming it."""
    # "official frames" in the key: latents cached before frames were picked as DiT-Mem picks them are not reused
    settings = f"{shape}|official frames|{resize}|{ca.vae_fingerprint(vae)}"
    cache = LatentCache(ca.cache_directory(CACHE_DIR))
    latent = cache.get(video, settings)
    latent = None if latent is None else latent.clone()  # never backed by a cache file someone may rewrite
    channels = ca.wan_vae_channels(vae, "Reference Memory Bank")
    if latent is not None and not (latent.is_floating_point() and tuple(latent.shape) == (channels, *shape)
                                   and torch.isfinite(latent).all()):
        log.warning("memory bank: cached latent %s has shape %s or non-finite values, not [%d, %s]; encoding "
                    "again", cache.path(video, settings), tuple(latent.shape), channels, ", ".join(map(str, shape)))
        latent = None
    if latent is None:
        try:
            frames = ca.read_video(confined_buffer(video, ca.input_directory(), "memory bank video"))
        except ConfinedFileError as e:
            raise MemoryBankError(f"Reference Memory Bank: {e}") from None
        latent = encode_frames(vae, frames, shape, resize)
        try:
            cache.put(video, settings, latent)
        except OSError as e:
            log.warning("memory bank: could not cache %s (%s); it will be encoded again next time", video.name, e)
    return latent


class ReferenceMemoryBank(io.ComfyNode):
    # Caption embeddings per text encoder (dropped with it): ranking a bank again encodes only the prompt.
    _caption_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerReferenceMemoryBank",
            display_name="Reference Memory Bank",
            category="memlearner",
            description="Picks the reference videos for DiT-Mem the way its memory bank does: the captions of a "
                        "folder of videos are ranked against the prompt (cosine similarity of the text encoder's "
                        "embeddings, the one already loaded for the prompt), the top k are encoded with the Wan "
                        "VAE (cached in ComfyUI's user folder) into a MEMORY.",
            inputs=[
                MEMORY_ENCODER.Input("memory_encoder"),
                io.Clip.Input("clip", tooltip="The text encoder that encoded the prompt (umt5 for Wan2.1)."),
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning, from CLIP Text Encode."),
                io.Vae.Input("vae", tooltip="The Wan VAE: Wan2.1's, or Wan2.2's for TI2V-5B."),
                io.String.Input("folder", default="memory_bank",
                                tooltip="Folder of videos with captions.json ({\"clip.mp4\": \"caption\"}) or a .txt "
                                        "per video, inside ComfyUI's input folder (a path relative to it)."),
                io.Int.Input("top_k", default=5, min=1, max=64, tooltip="How many references (5 in DiT-Mem)."),
                *memory_options(),
            ],
            outputs=[MEMORY.Output(display_name="memory"),
                     io.String.Output(display_name="chosen", tooltip="The chosen videos, their scores and captions.")],
        )

    @classmethod
    def execute(cls, memory_encoder, clip, positive, vae, folder="memory_bank", top_k=5, strength=1.0,
                deduplicate=True) -> io.NodeOutput:
        check_strength(strength)
        check_vae_fits(vae, memory_encoder.model.cfg.in_channels, "Reference Memory Bank")
        entries = read_captioned_folder(bank_folder(folder), ca.input_directory())
        prompt = ca.conditioning_embedding(positive)
        captions = torch.stack([cls.caption_embedding(clip, e.caption) for e in entries])
        if captions.shape[-1] != prompt.shape[-1]:
            raise ValueError(f"the prompt embedding is {prompt.shape[-1]} wide but the captions' is "
                             f"{captions.shape[-1]}: connect the text encoder that encoded the prompt")
        chosen = rank_by_text(prompt, captions, int(top_k))
        shape = memory_encoder.model.cfg.latent_shape
        bar = comfy.utils.ProgressBar(len(chosen))
        latents = []
        for i, _ in chosen:
            latents.append(cached_latent(vae, entries[i].path, shape))
            bar.update(1)
        report = "\n".join(f"{s:.3f}  {entries[i].path.name}  {entries[i].caption}" for i, s in chosen)
        log.info("memory bank %s: chose\n%s", folder, report)
        return io.NodeOutput(ReferenceMemory.from_latents(latents, memory_encoder, strength, deduplicate), report)

    @classmethod
    def caption_embedding(cls, clip, caption: str) -> torch.Tensor:
        per_encoder = cls._caption_cache.setdefault(clip.cond_stage_model, {})
        if caption not in per_encoder:
            per_encoder[caption] = ca.text_embedding(clip, caption)
        return per_encoder[caption]
