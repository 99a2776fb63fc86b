"""Exact camera geometry of ViZDoom renders: poses, intrinsics, depth, and which pixels were seen before.

Doom's world axes are x east, y north, z up; the player's yaw (degrees) turns counter-clockwise from east. Poses
are camera-to-world ``[R|t]`` ``[3, 4]`` in OpenCV axes (camera x right, y down, z forward), as in
``memlearner_core.trajectory``; pitch is always 0. ViZDoom's pixels are not square (fx = 2H/3, fy = 0.8H) and its
depth buffer is z-depth (along the optical axis), quantised to uint8 steps of about 7.14 map units. One map unit
is about 3.2 cm.

``seen_before`` and ``seen_by_earlier`` tell, per pixel, whether a frame shows a place an earlier frame showed:
its 3D point projects inside that frame and agrees with the depth recorded there (it was not behind a wall).
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange

DEPTH_SCALE = 7.14  # map units per uint8 depth step
DEPTH_OFFSET = 3.0  # map units


def depth_to_z(depth: torch.Tensor) -> torch.Tensor:
    """ViZDoom depth buffer ``[H, W]`` (uint8 or float) -> z-depth ``[H, W]`` float32 in map units (±4).

    A step's centre: ``Z = DEPTH_SCALE * (depth + 0.5) + DEPTH_OFFSET``. Sky reads a constant far value; mask it
    with the labels buffer (label 0), it is no distance."""
    return DEPTH_SCALE * (depth.to(torch.float32) + 0.5) + DEPTH_OFFSET


def intrinsics(width: int, height: int) -> torch.Tensor:
    """``K [3, 3]`` float64 of a ``width x height`` render: fx = 2H/3, fy = 0.8H (pixels are not square),
    principal point at the image centre. Horizontal FOV = 2 atan(0.75 W / H), 90 degrees at 4:3."""
    return torch.tensor([[2 * height / 3, 0, width / 2], [0, 0.8 * height, height / 2], [0, 0, 1]],
                        dtype=torch.float64)


def doom_poses(xyz: torch.Tensor, yaw_deg: torch.Tensor) -> torch.Tensor:
    """Camera positions ``[T, 3]`` (map units) and yaws ``[T]`` (degrees) -> camera-to-world ``[T, 3, 4]`` float32.

    R's columns: right = (s, -c, 0), down = (0, 0, -1), forward = (c, s, 0) for c, s = cos, sin of the yaw."""
    yaw = torch.deg2rad(torch.as_tensor(yaw_deg, dtype=torch.float64))
    c, s, zero, one = yaw.cos(), yaw.sin(), torch.zeros_like(yaw), torch.ones_like(yaw)
    right, down, forward = (torch.stack(axis, dim=-1) for axis in ((s, -c, zero), (zero, zero, -one), (c, s, zero)))
    rotation = torch.stack([right, down, forward], dim=-1)  # [T, 3 world, 3 camera]: columns are camera axes
    return torch.cat([rotation, torch.as_tensor(xyz, dtype=torch.float64)[..., None]], dim=-1).to(torch.float32)


def doom_pose(x: float, y: float, z: float, yaw_deg: float) -> torch.Tensor:
    """One camera at ``(x, y, z)`` (map units) looking ``yaw_deg`` from east -> ``[3, 4]`` float32."""
    return doom_poses(torch.tensor([[x, y, z]], dtype=torch.float64), torch.tensor([yaw_deg], dtype=torch.float64))[0]


def unit_scale(poses: torch.Tensor, scale: float) -> torch.Tensor:
    """``[T, 3, 4] -> [T, 3, 4]`` with the translation times ``scale`` (e.g. 1/64: 64 map units = 1 unit, the
    pack's trajectory unit); rotation unchanged."""
    return torch.cat([poses[..., :3], poses[..., 3:] * scale], dim=-1)


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def backproject(z: torch.Tensor, K: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """z-depth ``[..., H, W]`` -> world points ``[..., H, W, 3]`` of every pixel centre ``(u + 0.5, v + 0.5)``, in
    the units of the pose ``[..., 3, 4]`` (z in the pose's translation units). Leading dims broadcast."""
    dtype = _float_dtype(z, pose)
    h, w = z.shape[-2:]
    v, u = torch.meshgrid(torch.arange(h, dtype=dtype, device=z.device) + 0.5,
                          torch.arange(w, dtype=dtype, device=z.device) + 0.5, indexing="ij")
    pixels = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # [H, W, 3] homogeneous
    rays = einsum(torch.linalg.inv(K.to(device=z.device, dtype=dtype)), pixels, "i j, h w j -> h w i")  # z = 1
    camera = rays * z.to(dtype)[..., None]
    pose = pose.to(device=z.device, dtype=dtype)
    return (einsum(pose[..., :3], camera, "... i j, ... h w j -> ... h w i")
            + rearrange(pose[..., 3], "... c -> ... 1 1 c"))


def project(points: torch.Tensor, K: torch.Tensor, pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World points ``[..., 3]`` -> ``(uv [..., 2], z [...])`` in camera ``pose [3, 4]``: continuous pixel
    coordinates (pixel (u, v) covers [u, u + 1) x [v, v + 1), its centre at (u + 0.5, v + 0.5)) and camera z-depth.
    uv is meaningless where z <= 0 (behind the camera)."""
    dtype = _float_dtype(points, pose)
    points, pose = points.to(dtype), pose.to(device=points.device, dtype=dtype)
    camera = einsum(pose[:, :3], points - pose[:, 3], "j i, ... j -> ... i")  # R^T (p - t)
    uvw = einsum(K.to(device=points.device, dtype=dtype), camera, "i j, ... j -> ... i")
    return uvw[..., :2] / uvw[..., 2:], camera[..., 2]


def _confirmed_in(points: torch.Tensor, z_j: torch.Tensor, pose_j: torch.Tensor, K: torch.Tensor, tolerance: float,
                  valid_j: torch.Tensor) -> torch.Tensor:
    """World points ``[..., 3]`` -> ``[...]`` bool: visible in frame j (z-depth ``z_j [H, W]``, ``pose_j``): in
    front of its camera, inside its image, and within ``tolerance`` (relative) of the valid depth it recorded at
    the nearest pixel. A recorded depth nearer than the point is an occluder; the point was behind it."""
    h, w = z_j.shape
    uv, z = project(points, K, pose_j)
    u, v = uv.unbind(-1)
    inside = (z > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)  # NaN/inf uv compare False
    ui = torch.where(inside, u, 0).floor().long()  # the pixel whose square holds (u, v): the nearest centre
    vi = torch.where(inside, v, 0).floor().long()
    recorded = z_j.to(z.dtype)[vi, ui]
    return inside & valid_j[vi, ui] & ((recorded - z).abs() <= tolerance * z)


def _checked(z: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return torch.ones_like(z, dtype=torch.bool)
    if valid.shape != z.shape:
        raise ValueError(f"valid {tuple(valid.shape)} must have the shape of z {tuple(z.shape)}")
    return valid.to(torch.bool)


def seen_before(z: torch.Tensor, poses: torch.Tensor, K: torch.Tensor, history: int, tolerance: float,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """z-depths ``[T, H, W]`` and poses ``[T, 3, 4]`` (same units) -> ``[T - history, H, W]`` bool: per pixel of
    each frame from ``history`` on, whether its point was visible in some given history frame j < ``history``.

    ``valid [T, H, W]`` marks usable depth (e.g. not sky): an invalid pixel is never seen before, and an invalid
    recorded depth never confirms a point. ``tolerance`` is relative; ViZDoom's depth is good to about ±4 map
    units, so it must cover 4 / Z at the nearest depths that matter."""
    if not 0 <= history <= len(z):
        raise ValueError(f"history must be in [0, {len(z)}], got {history}")
    valid = _checked(z, valid)
    points = backproject(z[history:], K, poses[history:])  # [T - history, H, W, 3]
    seen = torch.zeros_like(valid[history:])
    for j in range(history):
        seen |= _confirmed_in(points, z[j], poses[j], K, tolerance, valid[j])
    return seen & valid[history:]


def seen_by_earlier(z: torch.Tensor, poses: torch.Tensor, K: torch.Tensor, tolerance: float,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """z-depths ``[T, H, W]`` and poses ``[T, 3, 4]`` -> ``[T, H, W]`` bool: per pixel of frame t, whether its
    point was visible in any frame j < t (frame 0: all False). Its complement among valid pixels is what frame t
    shows new. ``valid`` as in ``seen_before``."""
    valid = _checked(z, valid)
    points = backproject(z, K, poses)  # [T, H, W, 3]
    seen = torch.zeros_like(valid)
    for j in range(len(z) - 1):
        seen[j + 1:] |= _confirmed_in(points[j + 1:], z[j], poses[j], K, tolerance, valid[j])
    return seen & valid

