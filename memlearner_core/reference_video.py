"""Bringing reference videos to the latent shape a memory encoder expects.

Wan2.1's VAE maps ``4k+1`` frames to ``k+1`` latent frames and 8x8 pixels to one latent pixel, so an encoder
configured for latents ``(T, H, W)`` wants ``4(T-1)+1`` frames at ``8H x 8W`` (81 frames at 480x832).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ReferenceVideoError(ValueError):
    """A reference video that cannot be encoded; the message says why."""


def frames_for_latent(t: int) -> int:
    return 4 * (t - 1) + 1


def sample_indices(n_in: int, n_out: int, official: bool = False) -> torch.Tensor:
    """``n_out`` frame indices spread evenly over ``n_in`` frames (first and last included).

    ``official=False`` (the trainer's clip sampling): ``linspace`` rounded to the nearest frame, a clip shorter
    than ``n_out`` frames getting its repeats spread over it. ``official=True`` (reference videos, as DiT-Mem's
    own preprocessing picks them): ``np.linspace(0, n_in - 1, n_out, dtype=int)``, i.e. rounded down, and a clip
    shorter than ``n_out`` frames kept whole with its last frame repeated at the end."""
    if n_in < 1:
        raise ReferenceVideoError("a reference video needs at least 1 frame, got 0")
    if not official:
        return torch.linspace(0, n_in - 1, n_out).round().long()
    if n_in < n_out:
        return torch.cat([torch.arange(n_in), torch.full((n_out - n_in,), n_in - 1)])
    if n_out == 1:
        return torch.zeros(1, dtype=torch.long)
    # numpy's arithmetic exactly, float64 rounding included (113 frames -> 81 picks frame 63 where the exact
    # floor((n_in - 1) * i / (n_out - 1)) is 62): i * step, the last one set to n_in - 1, truncated
    picked = torch.arange(n_out, dtype=torch.float64) * ((n_in - 1) / (n_out - 1))
    picked[-1] = n_in - 1
    return picked.long()


def split_videos(frames: torch.Tensor, frames_per_video: int) -> list[torch.Tensor]:
    """Split an IMAGE batch ``[F, H, W, 3]`` into videos; ``frames_per_video`` 0 = the whole batch is one video."""
    if frames.shape[0] == 0:
        raise ReferenceVideoError("the reference video is empty (0 frames)")
    if frames_per_video <= 0:
        return [frames]
    if frames.shape[0] % frames_per_video:
        raise ReferenceVideoError(
            f"{frames.shape[0]} frames do not split into videos of {frames_per_video} frames each")
    return list(frames.split(frames_per_video))


def resample_latent(latent: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """A video latent ``[C, T', H', W']`` brought to ``[C, T, H, W]``: frames picked as a reference video's are
    (``sample_indices(..., official=True)``), space stretched (bilinear)."""
    if latent.ndim != 4:
        raise ReferenceVideoError(f"expected a video latent [C, T, H, W], got {tuple(latent.shape)}")
    t, h, w = shape
    latent = latent[:, sample_indices(latent.shape[1], t, official=True)]
    if tuple(latent.shape[-2:]) != (h, w):
        latent = F.interpolate(latent.float(), size=(h, w), mode="bilinear", align_corners=False).to(latent.dtype)
    return latent
