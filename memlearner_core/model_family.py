"""The Wan model families this pack patches: what a family's latents look like and what its files record.

A family is told from a loaded model by the host adapter; query-weights files record the family they were
fine-tuned on (``memlearner.model_family``), so weights of one family are never run on another.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WanFamily:
    """``name`` (as files record it); its latents ``[B, latent_channels, T, H / vae_stride, W / vae_stride]``
    (the VAE maps ``4k+1`` frames to ``k+1``) and the DiT's patch ``(1, 2, 2)``."""

    name: str
    label: str
    latent_channels: int
    vae_stride: int

    @property
    def pixel_multiple(self) -> int:
        """What a video's width and height must be a multiple of: the VAE's stride times the 2x patch."""
        return 2 * self.vae_stride


WAN21 = WanFamily("wan2.1", "Wan2.1 text-to-video", 16, 8)
WAN22_TI2V_5B = WanFamily("wan2.2-ti2v-5b", "Wan2.2 TI2V-5B", 48, 16)
FAMILIES = {f.name: f for f in (WAN21, WAN22_TI2V_5B)}
DEFAULT_FAMILY = WAN21.name  # what a file that records no family was made for
SUPPORTED = ("Wan2.1 T2V 1.3B/14B and each Wan2.2 T2V-A14B expert (16 latent channels), "
             "Wan2.2 TI2V-5B (48 latent channels)")
