"""View-aligned RoPE: every frame's tokens sit where its view falls in the view of the chunk being generated.

Stock positions put every frame's token grid at the same rows and columns, so a history frame turned 13 degrees
away from the camera now shows each place about a token off from where the chunk shows it, and a model that learnt
to copy from the same position pastes it unshifted. With ``view_rope_fov`` (degrees, the frames' horizontal field
of view), a frame turned by yaw ``y`` and pitch ``p`` relative to the chunk's first frame has its token grid moved by
``y / a`` columns and ``p / a`` rows (``a = fov / token columns``, the angle one token spans; square pixels), so
a place seen from two directions has about the same spatial position in both: RoPE's relative positions then
say which history token shows the place a query token asks for.

It is exact for a camera that turns about its own centre (a panorama, a turn on the spot) and ignores roll and
translation (parallax), which the camera embedding still carries. The history keeps its temporal positions.
"""

from __future__ import annotations

import torch


def view_offsets(poses: torch.Tensor, reference: torch.Tensor, degrees_per_token: float) -> torch.Tensor:
    """``[T, 2]`` (rows, columns) in token units: where each camera-to-world pose ``[T, 3, 4]`` (OpenCV axes: x
    right, y down, z forward) looks, seen from ``reference [3, 4]``: its optical axis's pitch and yaw in the
    reference camera, over ``degrees_per_token``. Yaw wraps into ``(-180, 180]``."""
    r_ref, r = reference[:3, :3].double(), poses[:, :3, :3].double()
    axis = torch.einsum("ji,tj->ti", r_ref, r[:, :, 2])  # each optical axis in the reference camera's axes
    yaw = torch.rad2deg(torch.atan2(axis[:, 0], axis[:, 2]))
    pitch = torch.rad2deg(torch.atan2(axis[:, 1], torch.hypot(axis[:, 0], axis[:, 2])))
    return (torch.stack([pitch, yaw], -1) / degrees_per_token).float()


def shift_positions(ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """RoPE ids ``[T * n, 3]`` (time, row, column; ``n`` tokens per frame, frame-major) with frame ``f``'s rows and
    columns moved by ``offsets[f]`` ``[T, 2]``."""
    t = offsets.shape[0]
    per_frame = ids.reshape(t, -1, 3).clone()
    per_frame[..., 1:] += offsets[:, None, :].to(ids)
    return per_frame.reshape(-1, 3)


def degrees_per_token(fov_deg: float, token_columns: int) -> float:
    """The angle one token column spans when ``token_columns`` span ``fov_deg``."""
    return fov_deg / token_columns


def aligned_positions(ids: torch.Tensor, poses: torch.Tensor | None, reference: torch.Tensor | None,
                      fov_deg: float | None, token_columns: int) -> torch.Tensor:
    """RoPE ids ``[T * n, 3]`` of ``T`` frames with poses ``[T, 3, 4]`` view-aligned to ``reference [3, 4]`` (the
    chunk's first camera) for a ``token_columns``-wide grid spanning ``fov_deg``; unchanged when any is None."""
    if poses is None or reference is None or fov_deg is None:
        return ids
    return shift_positions(ids, view_offsets(poses, reference, degrees_per_token(fov_deg, token_columns)))


def chunk_aligned(ids: torch.Tensor, poses: torch.Tensor | None, camera, chunk_poses: torch.Tensor | None,
                  token_columns: int) -> torch.Tensor:
    """What both hosts call: RoPE ids ``[T * n, 3]`` of ``T`` frames with ``poses [>= T, 3, 4]`` placed by where
    they look from the chunk's first camera (``chunk_poses[0]``) when ``camera`` (a ``CameraEmbedding``) has a
    ``view_rope_fov``; else unchanged. ``token_columns``: the full-resolution token grid's width."""
    fov = getattr(camera, "view_rope_fov", None)
    if fov is None or poses is None or chunk_poses is None:
        return ids
    frames = len(torch.unique(ids[:, 0]))
    return aligned_positions(ids, poses[:frames], chunk_poses[0], fov, token_columns)
