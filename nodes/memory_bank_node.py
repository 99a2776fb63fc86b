"""Reference Memory Bank: the top-k captioned videos of a folder for a prompt, encoded (and cached) as a MEMORY."""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path

import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io
from safetensors.torch import load_file, save_file

from memlearner_core.memory_bank import latent_cache_path, rank_by_text, read_captioned_folder

from . import comfy_adapter as ca
from .comfy_types import MEMORY, MEMORY_ENCODER
from .memory_nodes import encode_frames, memory_options
from .memory_patch import ReferenceMemory

log = logging.getLogger("memlearner")


def bank_folder(text: str) -> Path:
    """An absolute path as given; a relative one inside ComfyUI's input folder."""
    path = Path(os.path.expanduser(text.strip()))
    return path if path.is_absolute() else Path(folder_paths.get_input_directory()) / path


def cached_latent(vae, video: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """The video's latent ``[16, T, H, W]``, from the bank's cache or encoded now and cached."""
    cache = latent_cache_path(video, f"{shape}|{ca.vae_fingerprint(vae)}")
    if cache.is_file():
        return load_file(str(cache))["latent"]
    latent = encode_frames(vae, ca.read_video(video), shape)
    try:
        cache.parent.mkdir(exist_ok=True)
        save_file({"latent": latent.contiguous()}, str(cache))
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
                        "VAE (cached on disk next to the videos) into a MEMORY.",
            inputs=[
                MEMORY_ENCODER.Input("memory_encoder"),
                io.Clip.Input("clip", tooltip="The text encoder that encoded the prompt (umt5 for Wan2.1)."),
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning, from CLIP Text Encode."),
                io.Vae.Input("vae", tooltip="The Wan2.1 VAE."),
                io.String.Input("folder", default="memory_bank",
                                tooltip="Folder of videos with captions.json ({\"clip.mp4\": \"caption\"}) or a .txt "
                                        "per video; relative paths are inside ComfyUI's input folder."),
                io.Int.Input("top_k", default=5, min=1, max=64, tooltip="How many references (5 in DiT-Mem)."),
                *memory_options(),
            ],
            outputs=[MEMORY.Output(display_name="memory"),
                     io.String.Output(display_name="chosen", tooltip="The chosen videos, their scores and captions.")],
        )

    @classmethod
    def execute(cls, memory_encoder, clip, positive, vae, folder="memory_bank", top_k=5, strength=1.0,
                deduplicate=True) -> io.NodeOutput:
        ca.check_wan21_vae(vae)
        entries = read_captioned_folder(bank_folder(folder))
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
