"""Load Memory Encoder and Encode Reference Video (DiT-Mem)."""

from __future__ import annotations

import math

import folder_paths
import torch
from comfy_api.latest import io

from memlearner_core.checkpoint_io import load_memory_encoder
from memlearner_core.hub import fetch_safetensors
from memlearner_core.memory_encoder import latent_family
from memlearner_core.reference_video import (
    ReferenceVideoError,
    frames_for_latent,
    resample_latent,
    sample_indices,
    split_videos,
)

from . import comfy_adapter as ca
from .comfy_types import ENCODER_FOLDER, MEMORY, MEMORY_ENCODER
from .memory_patch import ReferenceMemory

FROM_HUB = "(from hf_repo)"
# How reference frames reach the encoder's size: DiT-Mem's own preprocessing stretches them whole (cv2.resize to
# 832x480); "crop" keeps the aspect, center-cropping after scaling. Values: ComfyUI's common_upscale crop.
RESIZE_MODES = {"stretch (official)": "disabled", "crop": "center"}
STRETCH = "stretch (official)"


def encode_frames(vae, frames: torch.Tensor, shape: tuple[int, int, int], resize: str = STRETCH) -> torch.Tensor:
    """One video ``[F, H, W, C]`` -> its Wan latent ``[C', T, H', W']`` (16 channels from the Wan2.1 VAE, 48 from
    Wan2.2's) in the encoder's ``shape``, prepared as DiT-Mem's preprocessing does: the frame count the VAE maps
    to ``T`` picked with ``np.linspace(..., dtype=int)`` (a shorter video's last frame repeated), frames stretched
    to ``sH' x sW'``, ``s`` the VAE's spatial stride (``resize`` "crop": scaled and center-cropped instead)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(map(repr, RESIZE_MODES))}, got {resize!r}")
    frames = frames[sample_indices(frames.shape[0], frames_for_latent(shape[0]), official=True)]
    stride = ca.vae_spatial_stride(vae)
    frames = ca.resize_frames(frames, shape[2] * stride, shape[1] * stride, crop=RESIZE_MODES[resize])
    return vae.encode(frames[..., :3])[0].cpu()


def check_vae_fits(vae, channels: int, what: str = "Encode Reference Video") -> None:
    """The VAE is a Wan VAE making the ``channels``-channel latents the memory encoder reads, or one line saying
    which to connect."""
    made = ca.wan_vae_channels(vae, what)
    if made != channels:
        raise ValueError(f"{what}: the VAE makes {latent_family(made)} latents ({made} channels) but the memory "
                         f"encoder reads {latent_family(channels)} latents ({channels} channels); connect the "
                         f"{latent_family(channels)} VAE, or load the encoder trained for this VAE's model")


def memory_options() -> list:
    """The inputs every MEMORY-making node shares."""
    return [
        io.Float.Input("strength", default=1.0, min=0.0, max=4.0, step=0.05,
                       tooltip="0 = memory off (the model is unchanged), 1 = as published."),
        io.Boolean.Input("deduplicate", default=True,
                         tooltip="Collapse identical memory tokens into one key with a log-count bias: "
                                 "exactly the same result, less attention work."),
    ]


def check_strength(strength) -> float:
    """``strength`` as a float, refused unless it is a finite number >= 0 (NaN passes ComfyUI's range check)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength < 0:
        raise ValueError(f"strength must be a finite number >= 0 (0 = memory off, 1 = as published), "
                         f"got {strength!r}")
    return float(strength)


class LoadMemoryEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerLoadMemoryEncoder",
            display_name="Load Memory Encoder",
            category="memlearner",
            description="Loads a DiT-Mem memory encoder (safetensors) from models/memory_encoders. The official "
                        "Thrcle/DiT-Mem-1.3B file loads as it is.",
            inputs=[
                ca.combo_input("encoder_name", options=folder_paths.get_filename_list(ENCODER_FOLDER) + [FROM_HUB],
                               tooltip="A file in models/memory_encoders (or a folder from extra_model_paths.yaml)."),
                ca.combo_input("dtype", options=["default", "fp32", "fp16", "bf16"], default="default",
                               tooltip="Weights dtype; default follows ComfyUI's choice for diffusion models."),
                io.String.Input("hf_repo", default="", optional=True,
                                tooltip="Optional Hugging Face repo id (e.g. Thrcle/DiT-Mem-1.3B): its safetensors file "
                                        "is downloaded once into models/memory_encoders/<owner>--<name>/ and used "
                                        "instead of encoder_name."),
            ],
            outputs=[MEMORY_ENCODER.Output(display_name="memory_encoder")],
        )

    @classmethod
    def execute(cls, encoder_name, dtype="default", hf_repo="") -> io.NodeOutput:
        if hf_repo and hf_repo.strip():
            path = fetch_safetensors(hf_repo, folder_paths.get_folder_paths(ENCODER_FOLDER)[0])
        elif encoder_name == FROM_HUB:
            raise ValueError("Load Memory Encoder: choose an encoder file or fill in hf_repo")
        else:
            path = ca.model_file(ENCODER_FOLDER, encoder_name, "Load Memory Encoder: encoder_name")
        encoder = load_memory_encoder(path).to(ca.default_dtype(dtype))
        return io.NodeOutput(ca.managed_module(encoder))


class EncodeReferenceVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerEncodeReferenceVideo",
            display_name="Encode Reference Video",
            category="memlearner",
            description="Reference videos -> MEMORY for Apply Reference Memory (or Apply Query Memory's memory "
                        "input). Videos are brought to the frame count and size the encoder expects (81 frames at "
                        "480x832 for the released encoder).",
            inputs=[
                MEMORY_ENCODER.Input("memory_encoder"),
                io.Image.Input("images", optional=True, tooltip="Reference frames; see frames_per_video."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The Wan VAE, to encode images: Wan2.1's, or Wan2.2's for TI2V-5B."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Already-encoded Wan video latents (16 channels, or 48 for Wan2.2 "
                                        "TI2V-5B); each batch item is one video."),
                io.Int.Input("frames_per_video", default=0, min=0, max=100000,
                             tooltip="Split the image batch into videos of this many frames; 0 = one video."),
                ca.combo_input("resize", options=list(RESIZE_MODES), default=STRETCH, optional=True,
                               tooltip="How images reach the encoder's size (832x480 for the released encoder): "
                                       "stretched whole, as DiT-Mem's own preprocessing does, or scaled and "
                                       "center-cropped to keep their aspect. Frames are picked as DiT-Mem picks "
                                       "them either way."),
                *memory_options(),
            ],
            outputs=[MEMORY.Output(display_name="memory")],
        )

    @classmethod
    def execute(cls, memory_encoder, images=None, vae=None, latent=None, frames_per_video=0, strength=1.0,
                deduplicate=True, resize=STRETCH) -> io.NodeOutput:
        check_strength(strength)
        shape, channels = memory_encoder.model.cfg.latent_shape, memory_encoder.model.cfg.in_channels
        videos = []
        if images is not None:
            if vae is None:
                raise ValueError("Encode Reference Video: connect the Wan VAE to encode images")
            check_vae_fits(vae, channels)
            if images.ndim != 4 or images.shape[-1] not in (3, 4) or 0 in images.shape:
                raise ReferenceVideoError(f"Encode Reference Video: images must be an IMAGE batch [F, H, W, 3] with "
                                          f"at least one frame and pixel, got {list(images.shape)}")
            if not torch.isfinite(images).all():
                raise ReferenceVideoError("Encode Reference Video: the images have NaN or infinite values")
            videos.extend(encode_frames(vae, frames, shape, resize)
                          for frames in split_videos(images, frames_per_video))
        if latent is not None:
            samples = latent["samples"]
            if samples.ndim != 5 or samples.shape[1] != channels or 0 in samples.shape:
                raise ReferenceVideoError(f"Encode Reference Video: latent must be {latent_family(channels)} video "
                                          f"latents [B, {channels}, T, H, W] (what the memory encoder reads) with T, "
                                          f"H, W at least 1, got {list(samples.shape)}")
            if not torch.isfinite(samples).all():
                raise ReferenceVideoError("Encode Reference Video: the latent has NaN or infinite values")
            videos.extend(resample_latent(v, shape) for v in samples.cpu())
        if not videos:
            raise ReferenceVideoError("Encode Reference Video: connect images (with a VAE) or a latent")
        videos = [resample_latent(v, shape) for v in videos]
        return io.NodeOutput(ReferenceMemory.from_latents(videos, memory_encoder, strength, deduplicate))

