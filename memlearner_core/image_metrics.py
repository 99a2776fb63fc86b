"""RGB quality against ground truth, as video-memory papers report it: PSNR and SSIM, over whole frames or a mask.

Frames are ``[T, H, W, 3]`` in ``[0, 1]`` (ComfyUI's IMAGE). ``ssim_map`` is Wang et al.'s SSIM per pixel (11-tap
Gaussian window, sigma 1.5, ``C1 = 0.01^2``, ``C2 = 0.03^2``, mean over the three channels), with reflected borders
so every pixel has a value and a mask can pick any of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_CAP = 60.0  # dB: an exact copy gets a number
WINDOW, SIGMA = 11, 1.5
C1, C2 = 0.01 ** 2, 0.03 ** 2


def psnr(squared_error_sum: float, count: int) -> float | None:
    """``10 log10(1 / MSE)`` of a sum of squared errors over ``count`` values, capped at ``PSNR_CAP``; None for
    no values."""
    if count == 0:
        return None
    mse = squared_error_sum / count
    return round(PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else -10 * math.log10(mse), 3)


def _gaussian(device, dtype) -> torch.Tensor:
    x = torch.arange(WINDOW, device=device, dtype=dtype) - WINDOW // 2
    g = torch.exp(-x ** 2 / (2 * SIGMA ** 2))
    return g / g.sum()


def _blur(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> the same, Gaussian-filtered (separable), borders reflected."""
    g = _gaussian(x.device, x.dtype)
    c = x.shape[1]
    pad = WINDOW // 2
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), g.view(1, 1, 1, -1).expand(c, 1, 1, WINDOW), groups=c)
    return F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), g.view(1, 1, -1, 1).expand(c, 1, WINDOW, 1),
                    groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Frames ``[T, H, W, 3]`` (``H, W >= 6``) -> SSIM per pixel ``[T, H, W]`` (1 = identical)."""
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"ssim_map takes two [T, H, W, 3] images of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    a, b = (t.permute(0, 3, 1, 2).double() for t in (x, y))
    mu_a, mu_b = _blur(a), _blur(b)
    var_a = _blur(a * a) - mu_a ** 2
    var_b = _blur(b * b) - mu_b ** 2
    cov = _blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + C1) * (2 * cov + C2)) / ((mu_a ** 2 + mu_b ** 2 + C1) * (var_a + var_b + C2))
    return s.mean(1).float()


def squared_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Frames ``[T, H, W, 3]`` -> squared error per pixel, summed over the channels ``[T, H, W]`` (PSNR then counts
    3 values a pixel)."""
    return (x.double() - y.double()).pow(2).sum(-1)


def frame_scores(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """PSNR and SSIM of frames ``x`` against ``y`` (``[T, H, W, 3]``), over ``mask [T, H, W]`` (default: every
    pixel): ``{"psnr", "ssim", "pixels"}``, None where the mask is empty."""
    mask = torch.ones(x.shape[:3], dtype=torch.bool) if mask is None else mask.bool()
    n = int(mask.sum())
    s = ssim_map(x, y)
    return {"psnr": psnr(float(squared_error(x, y)[mask].sum()), 3 * n),
            "ssim": round(float(s[mask].mean()), 4) if n else None, "pixels": n}
