"""Which history frames become the context of the next chunk of a long video, within one token budget.

A long video is generated chunk after chunk; the memory bank holds every latent frame generated so far
(absolute index ``0 .. n_history-1``), each with an optional camera pose. Attention cost grows with context
tokens, so the policies compared here all spend the same ``budget_tokens``:

- ``all``: every frame at full resolution, the oldest dropped when over budget (MemLearner as published);
- ``recent``: a sliding window of the latest frames;
- ``fov``: the frames whose view overlaps the chunk's cameras most (Context-as-Memory, WorldMem);
- ``framepack``: the latest frames sharp, older ones pooled ever coarser (FramePack), a constant total length;
- ``learned``: every frame is a candidate, and each query layer reads the ``budget`` frames its own queries rank
  highest (``context_routing``), so each layer spends the same tokens as ``recent``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .context_tokens import tokens_per_frame

POLICIES = ("all", "recent", "fov", "framepack", "learned")
DISTANCE_SCALE = 1.0  # scene units at which camera distance alone halves the view overlap


class ContextPolicyError(ValueError):
    """Context selection that cannot be done as asked; the message says why and what to pass instead."""


@dataclass(frozen=True)
class FramePick:
    """One history frame in the context: its absolute index in the bank and its spatial pooling factor."""

    index: int
    pool: int = 1


def frame_cost(h: int, w: int, pool: int = 1, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Tokens of one latent frame ``h x w`` pooled by ``pool`` (floor, as avg_pool3d does), then patched."""
    if pool < 1 or h // pool < 1 or w // pool < 1:
        raise ContextPolicyError(f"pool {pool} does not fit a {h}x{w} latent frame "
                                 f"(needs 1 <= pool <= {min(h, w)})")
    return tokens_per_frame(h // pool, w // pool, patch)


def _check_poses(poses, n: int | None, what: str) -> torch.Tensor:
    if poses is None:
        raise ContextPolicyError(f"the 'fov' policy needs {what} [N, 3, 4]; use 'recent' or 'framepack' "
                                 "for a video without camera poses")
    if poses.ndim != 3 or tuple(poses.shape[1:]) != (3, 4) or (n is not None and poses.shape[0] != n):
        want = f"[{n}, 3, 4] (one per history frame)" if n is not None else "[T, 3, 4] with T >= 1"
        raise ContextPolicyError(f"{what} must be {want}, got {tuple(poses.shape)}")
    if n is None and poses.shape[0] == 0:
        raise ContextPolicyError(f"{what} must be [T, 3, 4] with T >= 1, got {tuple(poses.shape)}")
    if not torch.isfinite(poses).all():
        raise ContextPolicyError(f"{what} contain a non-finite number (NaN or infinity)")
    return poses.double()


def overlap_matrix(a: torch.Tensor, b: torch.Tensor, fov_deg: float = 60.0,
                   distance_scale: float = DISTANCE_SCALE) -> torch.Tensor:
    """``view_overlap`` of every pose in ``a [N, 3, 4]`` with every pose in ``b [M, 3, 4]``: ``[N, M]``."""
    da, db = F.normalize(a[:, :, 2].double(), dim=-1), F.normalize(b[:, :, 2].double(), dim=-1)
    angle = torch.rad2deg(torch.arccos((da @ db.T).clamp(-1.0, 1.0)))
    dist = torch.cdist(a[:, :, 3].double(), b[:, :, 3].double())
    return (1.0 - angle / fov_deg).clamp(min=0.0) / (1.0 + dist / distance_scale)


def view_overlap(a: torch.Tensor, b: torch.Tensor, fov_deg: float = 60.0,
                 distance_scale: float = DISTANCE_SCALE) -> float:
    """How much two cameras ``[3, 4]`` (camera-to-world) see the same thing, in ``[0, 1]``.

    ``max(0, 1 - angle / fov_deg) / (1 + distance / distance_scale)``, where ``angle`` (degrees) is between
    the viewing directions (third columns of R) and ``distance`` between the camera centres: 1 for identical
    poses, 0 once the views diverge by ``fov_deg`` or more, falling monotonically with angle and distance.
    """
    if tuple(a.shape) != (3, 4) or tuple(b.shape) != (3, 4):
        raise ContextPolicyError(f"view_overlap takes two poses [3, 4], got {tuple(a.shape)} "
                                 f"and {tuple(b.shape)}")
    return float(overlap_matrix(a[None], b[None], fov_deg, distance_scale)[0, 0])


def _framepack(n: int, budget: int, h: int, w: int, patch) -> list[FramePick]:
    """Walk back from the newest frame; level ``l`` (pool ``2**l``) gets up to half of the still unused budget
    (at least one frame if one fits), the last level (largest pool <= min(h, w)) all of it."""
    last = min(h, w).bit_length() - 1  # largest l with 2**l <= min(h, w)
    picks, left, index = [], budget, n - 1
    for level in range(last + 1):
        if index < 0:
            break
        cost = frame_cost(h, w, 2**level, patch)
        allowance = left if level == last else left // 2
        count = min(max(allowance // cost, 1 if cost <= left else 0), index + 1)
        picks += [FramePick(i, 2**level) for i in range(index, index - count, -1)]
        left, index = left - count * cost, index - count
    return picks


def route_frames(policy: str, budget_frames: int) -> int:
    """Frames each query layer reads of the picked ones: the budget for ``learned``, which hands every frame over
    as a candidate; 0 (every picked frame) for the others."""
    return budget_frames if policy == "learned" else 0


def select_context(policy: str, n_history: int, budget_tokens: int | None, latent_hw: tuple[int, int],
                   history_poses: torch.Tensor | None = None, chunk_poses: torch.Tensor | None = None,
                   patch: tuple[int, int, int] = (1, 2, 2), fov_deg: float = 60.0) -> list[FramePick]:
    """The context of the next chunk: picks sorted by index, each index once, total cost <= ``budget_tokens``
    (``learned``: every frame, the candidates its query layers route over within the budget).

    ``history_poses [n_history, 3, 4]`` and ``chunk_poses [T, 3, 4]`` (the chunk to generate) are needed by
    ``fov`` only. ``budget_tokens`` None (unlimited) is allowed for ``all`` only; under a budget ``all`` and
    ``recent`` choose the same frames (the newest that fit) and differ only when the budget is None. ``fov``
    keeps the ``budget // frame_cost`` frames of highest overlap with any chunk pose (ties: newer first;
    frames of overlap 0 still fill a budget the overlapping ones leave unused).
    """
    if policy not in POLICIES:
        raise ContextPolicyError(f"unknown context policy {policy!r}; known policies: {', '.join(POLICIES)}")
    h, w = latent_hw
    if h < 1 or w < 1 or n_history < 0:
        raise ContextPolicyError(f"need a latent size >= 1x1 and n_history >= 0, got {h}x{w} and {n_history}")
    if budget_tokens is None and policy != "all":
        raise ContextPolicyError(f"the '{policy}' policy needs a token budget (budget_tokens); only 'all' "
                                 "can run without one")
    if budget_tokens is not None and budget_tokens < 0:
        raise ContextPolicyError(f"budget_tokens must be >= 0, got {budget_tokens}")
    if policy == "fov":
        if not 0 < fov_deg <= 180:
            raise ContextPolicyError(f"fov_deg must be in (0, 180], got {fov_deg}")
        history_poses = _check_poses(history_poses, n_history, "history_poses")
        chunk_poses = _check_poses(chunk_poses, None, "chunk_poses")
    if n_history == 0:
        return []
    full = frame_cost(h, w, 1, patch)
    fit = n_history if budget_tokens is None else min(n_history, budget_tokens // full)
    if policy == "learned":  # the candidates; the query layers route within the budget
        return [FramePick(i) for i in range(n_history)]
    if policy in ("all", "recent"):
        return [FramePick(i) for i in range(n_history - fit, n_history)]
    if policy == "fov":
        # rounded so that equal poses tie exactly (arccos of a rounded dot product is not exactly 0): ties go newest
        score = [round(v, 6) for v in overlap_matrix(history_poses, chunk_poses, fov_deg).amax(dim=1).tolist()]
        best = sorted(range(n_history), key=lambda i: (-score[i], -i))[:fit]
        return [FramePick(i) for i in sorted(best)]
    return sorted(_framepack(n_history, budget_tokens, h, w, patch), key=lambda p: p.index)
