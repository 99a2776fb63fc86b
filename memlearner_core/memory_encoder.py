"""DiT-Mem memory encoder: reference-video latents -> memory tokens in the DiT's width.

Latents have the channels of the model's VAE (``in_channels``: 16 for Wan2.1, 48 for Wan2.2 TI2V-5B).

Module names match the released checkpoint (``Thrcle/DiT-Mem-1.3B``) so its 38 parameter tensors load one to
one. Shapes for the released 480p config::

    latents [B, N, 16, 21, 60, 104]
      per branch (high pass, low pass; separate weights):
        conv_block1  Conv3d 16->512 k7 s4 p3 -> FFT filter -> ReLU -> MaxPool3d(2)    [B*N, 512, 3, 7, 13]
        conv_block2  Conv3d 512->768 k3 s1 p1 -> FFT filter -> ReLU -> MaxPool3d(2)   [B*N, 768, 1, 3, 6]
        (adaptive_avg_pool3d to the config's CNN shape if the input differs)
        tokens along the CNN's time axis                                             [B*N, 1, 13824]
        adaptive_avg_pool1d to 100 tokens, feature_proj -> 1536                      [B, N*100, 1536]
      shared self_attention per branch (all N*100 tokens together), concat           [B, N*200, 1536]

The FFT filters' gains are fixed and not stored in the released file; they are generated here from a fixed
seed per filter, so the same weights always give the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .model_family import FAMILIES

# Feature-projection input width / CNN channels -> (latent T, H, W) of the released configs.
KNOWN_LATENT_SHAPES = {
    3 * 6: (21, 60, 104),  # 81 frames at 480x832
    5 * 10: (21, 90, 160),  # 81 frames at 720x1280 (the 154M-parameter encoder)
}


def latent_family(channels: int) -> str:
    """The label of the Wan family whose latents have ``channels`` channels (named in refusals)."""
    labels = {f.latent_channels: f.label for f in FAMILIES.values()}
    return labels.get(channels, f"a {channels}-channel model")


def fit_problem(width: int, in_channels: int, dim: int, latent_channels: int) -> str | None:
    """Why an encoder of ``width`` reading ``in_channels``-channel latents cannot serve a model ``dim`` wide whose
    latents have ``latent_channels`` channels, in one line; None when it can."""
    if in_channels != latent_channels:
        return (f"the memory encoder is for {latent_family(in_channels)} ({in_channels} latent channels, "
                f"{width}-wide tokens) but this model is {latent_family(latent_channels)} ({latent_channels} latent "
                f"channels, {dim} wide); load the encoder trained for this model")
    if width != dim:
        return (f"the memory encoder makes {width}-wide tokens but this Wan model is {dim} wide "
                f"(1.3B: 1536, 5B: 3072, 14B: 5120); load the encoder trained for this model")
    return None


@dataclass(frozen=True)
class EncoderConfig:
    in_channels: int = 16
    hidden_channels: tuple[int, int] = (512, 768)
    first_kernel: int = 7
    width: int = 1536
    tokens_per_video: int = 100
    heads: int = 8
    latent_shape: tuple[int, int, int] = (21, 60, 104)  # (T, H, W) the encoder expects

    def to_metadata(self) -> dict[str, str]:
        return {f"memlearner.encoder.{k}": str(list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def cnn_output_shape(cfg: EncoderConfig, latent_shape=None) -> tuple[int, int, int]:
    """(T', H', W') after both conv blocks for a latent of ``latent_shape`` (default: the config's)."""
    t, h, w = latent_shape or cfg.latent_shape
    k = cfg.first_kernel
    stride, pad = 4, k // 2

    def conv(n):
        return (n + 2 * pad - k) // stride + 1

    return tuple(conv(n) // 2 // 2 for n in (t, h, w))


def fft_gain(kind: str, channels: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Fixed complex gain ``[C, T, H, W//2+1]`` of one FFT filter (high- or low-pass curve + seeded noise)."""
    t, h, wf = shape[0], shape[1], shape[2] // 2 + 1
    grid = torch.meshgrid(*(torch.linspace(0, 1, n) for n in (t, h, wf)), indexing="ij")
    r = torch.sqrt(sum(g**2 for g in grid)) / math.sqrt(3.0)
    curve = 0.2 + 0.8 * r.sqrt() if kind == "high" else 1.2 - 0.8 * r.sqrt()
    slope = torch.linspace(0.7, 1.3, channels).view(-1, 1, 1, 1)
    offset = torch.linspace(-0.05, 0.05, channels).view(-1, 1, 1, 1)
    real = (slope * curve + offset).clamp(0.2, 1.2)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((*real.shape, 2), generator=gen) * 0.05
    real = (real + noise[..., 0]).clamp(0.05, 1.2)
    return torch.complex(real, noise[..., 1])


class FFTFilter(nn.Module):
    """``y = BN(dropout(irfft(rfft(x) * gain)) + x)`` over (T, H, W); the gain is fixed, only BN learns."""

    def __init__(self, channels: int, kind: str, seed: int, dropout: float = 0.5):
        super().__init__()
        self.kind, self.seed, self.channels = kind, seed, channels
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.BatchNorm3d(channels)
        self._gains: dict[tuple, torch.Tensor] = {}

    def gain(self, shape, device) -> torch.Tensor:
        key = (tuple(shape), str(device))
        if key not in self._gains:
            self._gains[key] = fft_gain(self.kind, self.channels, tuple(shape), self.seed).to(device)
        return self._gains[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfftn(x.float(), dim=(2, 3, 4), norm="ortho")
        filtered = torch.fft.irfftn(spectrum * self.gain(x.shape[2:], x.device), s=x.shape[2:], dim=(2, 3, 4), norm="ortho")
        return self.norm(self.dropout(filtered.to(x.dtype)) + x)


class ConvFFTBlock(nn.Module):
    """Conv3d -> FFT filter -> ReLU -> MaxPool3d(2). ``bn`` exists in the released weights but is unused."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, kind: str, seed: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2)
        self.fft_filter = FFTFilter(cout, kind, seed)
        self.bn = nn.BatchNorm3d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(F.relu(self.fft_filter(self.conv(x))), 2)


class FrequencyBranch(nn.Module):
    """One branch: ``[B*N, C, T, H, W] -> [B*N, S, width]`` tokens."""

    def __init__(self, cfg: EncoderConfig, kind: str, seed: int):
        super().__init__()
        c1, c2 = cfg.hidden_channels
        self.cfg = cfg
        self.conv_block1 = ConvFFTBlock(cfg.in_channels, c1, cfg.first_kernel, 4, kind, seed)
        self.conv_block2 = ConvFFTBlock(c1, c2, 3, 1, kind, seed + 1)
        t, h, w = cnn_output_shape(cfg)
        self.cnn_shape = (t, h, w)
        self.feature_proj = nn.Linear(c2 * h * w, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_block2(self.conv_block1(x))
        if tuple(x.shape[2:]) != self.cnn_shape:
            x = F.adaptive_avg_pool3d(x, self.cnn_shape)
        x = rearrange(x, "b c t h w -> b c t (h w)")
        x = rearrange(x, "b c t hw -> b (c hw) t")  # tokens along the CNN's time axis, channel-major features
        x = F.adaptive_avg_pool1d(x, self.cfg.tokens_per_video)
        return self.feature_proj(x.transpose(1, 2))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class TokenSelfAttention(nn.Module):
    """Position-free self-attention over all tokens of a branch, no residual: ``[B, L, W] -> [B, L, W]``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim), RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=self.heads)
                   for t in (self.norm_q(self.q(x)), self.norm_k(self.k(x)), self.v(x)))
        return self.o(rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)"))


class MemoryEncoder(nn.Module):
    """DiT-Mem: reference latents ``[B, N, C, T, H, W]`` -> memory tokens ``[B, N*2*S, width]``."""

    def __init__(self, cfg: EncoderConfig = EncoderConfig()):
        super().__init__()
        self.cfg = cfg
        self.high_pass_module = FrequencyBranch(cfg, "high", seed=1)
        self.low_pass_module = FrequencyBranch(cfg, "low", seed=3)
        self.self_attention = TokenSelfAttention(cfg.width, cfg.heads)

    def forward(self, latents: torch.Tensor, shuffle: bool | None = None) -> torch.Tensor:
        if latents.ndim != 6:
            raise ValueError(f"expected reference latents [B, N, C, T, H, W], got shape {tuple(latents.shape)}")
        b, n = latents.shape[:2]
        x = latents.flatten(0, 1)
        high = self.high_pass_module(x).unflatten(0, (b, n))
        low = self.low_pass_module(x).unflatten(0, (b, n))
        if shuffle if shuffle is not None else self.training:  # same video order for both branches
            perm = torch.randperm(n, device=latents.device)
            high, low = high[:, perm], low[:, perm]
        high = self.self_attention(high.flatten(1, 2))
        low = self.self_attention(low.flatten(1, 2))
        return torch.cat([high, low], dim=1)
