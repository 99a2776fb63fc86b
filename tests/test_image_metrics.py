"""RGB PSNR and SSIM (memlearner_core.image_metrics) against written-out definitions."""

import math

import pytest
import torch

from memlearner_core import image_metrics as im


def naive_ssim(x: torch.Tensor, y: torch.Tensor, i: int, j: int) -> float:
    """SSIM at pixel (i, j) of one [H, W, 3] image pair, straight from Wang et al.: Gaussian-weighted means,
    variances and covariance over the 11x11 window (reflected at the borders), per channel, then the channel mean."""
    h, w = x.shape[:2]
    g = [math.exp(-(k - 5) ** 2 / (2 * 1.5 ** 2)) for k in range(11)]
    total = sum(g)
    g = [v / total for v in g]

    def reflect(k, n):
        return -k if k < 0 else 2 * (n - 1) - k if k >= n else k

    out = []
    for c in range(3):
        mx = my = sxx = syy = sxy = 0.0
        for a in range(11):
            for b in range(11):
                wgt = g[a] * g[b]
                u, v = reflect(i + a - 5, h), reflect(j + b - 5, w)
                p, q = float(x[u, v, c]), float(y[u, v, c])
                mx, my = mx + wgt * p, my + wgt * q
                sxx, syy, sxy = sxx + wgt * p * p, syy + wgt * q * q, sxy + wgt * p * q
        vx, vy, cov = sxx - mx * mx, syy - my * my, sxy - mx * my
        out.append(((2 * mx * my + im.C1) * (2 * cov + im.C2)) / ((mx * mx + my * my + im.C1) * (vx + vy + im.C2)))
    return sum(out) / 3


def test_ssim_map_equals_the_written_out_definition_at_corners_edges_and_centre():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 14, 17, 3, generator=g)
    y = (x + 0.2 * torch.randn(1, 14, 17, 3, generator=g)).clamp(0, 1)
    s = im.ssim_map(x, y)
    for i, j in ((0, 0), (0, 16), (13, 8), (7, 7), (3, 15)):
        assert s[0, i, j].item() == pytest.approx(naive_ssim(x[0], y[0], i, j), abs=1e-5)


def test_identical_frames_score_ssim_1_and_the_psnr_cap():
    x = torch.rand(2, 12, 12, 3)
    scores = im.frame_scores(x, x.clone())
    assert scores["ssim"] == pytest.approx(1.0)
    assert scores["psnr"] == im.PSNR_CAP


def test_psnr_counts_three_values_a_pixel_within_the_mask():
    x = torch.zeros(1, 8, 8, 3)
    y = x.clone()
    y[0, :4] = 0.1  # error 0.01 per value in the top half
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :4] = True
    assert im.frame_scores(x, y, mask)["psnr"] == pytest.approx(20.0, abs=1e-3)  # 10 log10(1 / 0.01), 3 decimals
    assert im.frame_scores(x, y)["psnr"] == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-3)


def test_an_empty_mask_scores_none():
    x = torch.rand(1, 8, 8, 3)
    got = im.frame_scores(x, x, torch.zeros(1, 8, 8, dtype=torch.bool))
    assert got == {"psnr": None, "ssim": None, "pixels": 0}


def test_frames_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        im.ssim_map(torch.rand(1, 8, 8, 3), torch.rand(1, 8, 9, 3))
