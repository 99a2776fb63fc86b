"""The Wan model families this pack patches: what a family's latents look like and what its files record.

A family is told from a loaded model by the host adapter; query-weights files record the family they were
fine-tuned on (``memlearner.model_family``), so weights of one family are never run on another.
"""

from __future__ import annotations

from dataclasses import dataclass

# Per-channel statistics of each family's VAE latents: the DiT denoises ``(z - mean) / std`` (the numbers ComfyUI's
# latent formats Wan21 and Wan22 and the VAEs' diffusers configs, ``latents_mean``/``latents_std``, carry).
_WAN21_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
_WAN21_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
_WAN22_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
_WAN22_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


@dataclass(frozen=True)
class WanFamily:
    """``name`` (as files record it); its latents ``[B, latent_channels, T, H / vae_stride, W / vae_stride]``
    (the VAE maps ``4k+1`` frames to ``k+1``), normalized per channel with ``latents_mean``/``latents_std`` where
    the DiT (patch ``(1, 2, 2)``) reads them."""

    name: str
    label: str
    latent_channels: int
    vae_stride: int
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]

    @property
    def pixel_multiple(self) -> int:
        """What a video's width and height must be a multiple of: the VAE's stride times the 2x patch."""
        return 2 * self.vae_stride


WAN21 = WanFamily("wan2.1", "Wan2.1 text-to-video", 16, 8, _WAN21_MEAN, _WAN21_STD)
WAN22_TI2V_5B = WanFamily("wan2.2-ti2v-5b", "Wan2.2 TI2V-5B", 48, 16, _WAN22_MEAN, _WAN22_STD)
FAMILIES = {f.name: f for f in (WAN21, WAN22_TI2V_5B)}
DEFAULT_FAMILY = WAN21.name  # what a file that records no family was made for
SUPPORTED = ("Wan2.1 T2V 1.3B/14B and each Wan2.2 T2V-A14B expert (16 latent channels), "
             "Wan2.2 TI2V-5B (48 latent channels)")


def text_to_video_family(in_channels: int, out_channels: int) -> WanFamily | None:
    """The family of a text-to-video DiT reading and predicting ``in_channels`` / ``out_channels`` latent channels
    (Wan2.2 T2V-A14B's experts read 16, as Wan2.1); None when the two differ (image or control channels
    concatenated: image-to-video, Fun, control) or no family has that many."""
    if in_channels != out_channels:
        return None
    return next((f for f in FAMILIES.values() if f.latent_channels == in_channels), None)
