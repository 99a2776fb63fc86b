"""Camera trajectories for long videos: one camera-to-world pose ``[R|t]`` (3x4) per latent frame.

A memory model is only tested by a video that comes back to where it has been, so besides parsing poses typed
by a user (JSON) this module has presets that revisit: an orbit, a pan that returns, and a walk that comes
back. Axes are OpenCV's: x right, y down, z forward (the viewing direction is the third column of ``R``).
Yaw turns about the world y axis (positive yaw turns the view from +z towards +x); pitch turns about the
camera's x axis (positive looks up, towards -y); roll is 0.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Callable

import torch

ORTHONORMAL_TOL = 1e-3
POSE_KEYS = ("position", "yaw", "pitch")


class TrajectoryError(ValueError):
    """A trajectory that cannot be used; the message says why and what to write instead."""


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrajectoryError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise TrajectoryError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _vector3(value, what: str) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise TrajectoryError(f"{what} must be 3 numbers [x, y, z], got {value!r}")
    return [_number(v, f"{what}[{i}]") for i, v in enumerate(value)]


def pose_from_position(position, yaw_deg: float, pitch_deg: float = 0.0) -> torch.Tensor:
    """A camera at ``position [3]`` turned by yaw, pitch (degrees): ``[3, 4] = [Ry(yaw) Rx(pitch) | t]``."""
    t = torch.tensor(_vector3(position, "position"), dtype=torch.float64)
    y, p = math.radians(_number(yaw_deg, "yaw")), math.radians(_number(pitch_deg, "pitch"))
    ry = torch.tensor([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]],
                      dtype=torch.float64)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]],
                      dtype=torch.float64)
    return torch.cat([ry @ rx, t[:, None]], dim=1).float()


def validate_poses(poses: torch.Tensor, what: str = "trajectory") -> torch.Tensor:
    """Check ``[T, 3, 4]`` poses (T >= 1, finite, rotations orthonormal within 1e-3, det +1); returns them."""
    if poses.ndim != 3 or tuple(poses.shape[1:]) != (3, 4) or poses.shape[0] == 0:
        raise TrajectoryError(f"the {what} must be poses [T, 3, 4] with T >= 1, got {tuple(poses.shape)}")
    bad = (~torch.isfinite(poses)).flatten(1).any(1).nonzero()
    if len(bad):
        raise TrajectoryError(f"pose {bad[0].item()} of the {what} has a non-finite number (NaN or infinity)")
    r = poses[:, :, :3].double()
    err = (r @ r.transpose(1, 2) - torch.eye(3, dtype=torch.float64)).abs().flatten(1).amax(1)
    if (err > ORTHONORMAL_TOL).any():
        i = int((err > ORTHONORMAL_TOL).nonzero()[0])
        raise TrajectoryError(
            f"pose {i} of the {what}: its rotation (first 3 columns) is not orthonormal "
            f"(max |R R^T - I| = {err[i].item():.3g} > {ORTHONORMAL_TOL}); give a rotation matrix, "
            "or use the {\"position\", \"yaw\", \"pitch\"} form")
    det = torch.linalg.det(r)
    if (det < 0).any():
        i = int((det < 0).nonzero()[0])
        raise TrajectoryError(f"pose {i} of the {what}: its rotation has determinant -1 (a reflection, "
                              "not a rotation); flip the sign of one axis")
    return poses


# --- presets -----------------------------------------------------------------------------------------------

PRESETS: dict[str, Callable[..., torch.Tensor]] = {}


def _preset(fn):
    """Register ``fn(n_frames, **params)`` by name; unknown parameters and bad lengths are clear errors."""
    accepted = [p for p in inspect.signature(fn).parameters if p != "n_frames"]

    @functools.wraps(fn)
    def wrapper(n_frames, /, **params):
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise TrajectoryError(f"the preset '{fn.__name__}' has no parameter {', '.join(unknown)}; "
                                  f"its parameters are: {', '.join(accepted)}")
        if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 1:
            raise TrajectoryError(f"a preset needs n_frames >= 1 (latent frames), got {n_frames!r}")
        return fn(n_frames, **params)

    PRESETS[fn.__name__] = wrapper
    return wrapper


def _there_and_back(n: int, top: float) -> list[float]:
    """``n`` values from 0 up to ``top`` and back down, mirror-symmetric (value ``n-1-i`` is value ``i``)."""
    up = torch.linspace(0.0, top, (n + 1) // 2, dtype=torch.float64).tolist()
    return up + up[::-1][n % 2:]


@_preset
def orbit(n_frames: int, radius: float = 3.0, center=(0.0, 0.0, 0.0), degrees: float = 360.0) -> torch.Tensor:
    """``[n, 3, 4]``: a horizontal circle of ``radius`` around ``center``, always looking at the centre.

    The angle goes evenly from 0 to ``degrees`` (both included: a 360 degree orbit ends where it started).
    At angle 0 the camera is at ``center - radius * z`` looking along +z; the angle is also the yaw.
    """
    r, c = _number(radius, "radius"), _vector3(center, "center")
    if r <= 0:
        raise TrajectoryError(f"orbit needs radius > 0, got {r}")
    angles = torch.linspace(0.0, _number(degrees, "degrees"), n_frames, dtype=torch.float64).tolist()
    return torch.stack([pose_from_position([c[0] - r * math.sin(math.radians(a)), c[1],
                                            c[2] - r * math.cos(math.radians(a))], a) for a in angles])


@_preset
def pan_and_return(n_frames: int, degrees: float = 90.0) -> torch.Tensor:
    """``[n, 3, 4]``: a camera at the origin pans (yaw) 0 -> ``degrees`` over the first half, then back to 0.

    Mirror-symmetric: frame ``n-1-i`` looks where frame ``i`` did, so the last frame equals the first.
    """
    yaws = _there_and_back(n_frames, _number(degrees, "degrees"))
    return torch.stack([pose_from_position([0, 0, 0], a) for a in yaws])


@_preset
def walk_and_revisit(n_frames: int, distance: float = 4.0) -> torch.Tensor:
    """``[n, 3, 4]``: walk 0 -> ``distance`` along +z facing +z, then walk back to 0 still facing +z.

    The camera never turns around (it moves backwards on the way back), so the return leg sees what the
    outward leg saw: frame ``n-1-i`` has exactly the pose of frame ``i``, and the last frames revisit the
    first frames' viewpoints.
    """
    zs = _there_and_back(n_frames, _number(distance, "distance"))
    return torch.stack([pose_from_position([0, 0, z], 0.0) for z in zs])


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset(name: str, n_frames: int, /, **params) -> torch.Tensor:
    """The poses ``[n_frames, 3, 4]`` of a named preset."""
    if name not in PRESETS:
        raise TrajectoryError(f"unknown trajectory preset {name!r}; known presets: "
                              f"{', '.join(preset_names())}")
    return PRESETS[name](n_frames, **params)


# --- JSON ---------------------------------------------------------------------------------------------------

def _shape(x) -> str:
    if isinstance(x, list) and x and all(isinstance(r, list) for r in x):
        return "x".join([str(len(x)), "/".join(sorted({str(len(r)) for r in x}))])
    if isinstance(x, list) and not any(isinstance(v, list) for v in x):
        return f"{len(x)} numbers"
    return "an irregular nesting" if isinstance(x, list) else type(x).__name__


def _matrix(x, i: int) -> list[list[float]]:
    if isinstance(x, list) and len(x) == 12 and not any(isinstance(v, list) for v in x):
        x = [x[0:4], x[4:8], x[8:12]]
    if not (isinstance(x, list) and len(x) == 3 and all(isinstance(r, list) and len(r) == 4 for r in x)):
        raise TrajectoryError(f"pose {i} has shape {_shape(x)}; a pose matrix is 3x4 [[r00, r01, r02, tx], "
                              "[r10, r11, r12, ty], [r20, r21, r22, tz]] or a flat row of 12 numbers")
    return [[_number(v, f"pose {i}, entry [{a}][{b}]") for b, v in enumerate(r)] for a, r in enumerate(x)]


def _pose_object(x: dict, i: int) -> torch.Tensor:
    unknown = sorted(set(x) - set(POSE_KEYS))
    if unknown:
        raise TrajectoryError(f"pose {i} has unknown key(s) {', '.join(unknown)}; "
                              f"known keys: {', '.join(POSE_KEYS)}")
    if "position" not in x:
        raise TrajectoryError(f"pose {i} has no 'position' [x, y, z] (yaw and pitch default to 0)")
    return pose_from_position(_vector3(x["position"], f"pose {i} position"),
                              _number(x.get("yaw", 0.0), f"pose {i} yaw"),
                              _number(x.get("pitch", 0.0), f"pose {i} pitch"))


def _kind(x) -> str:
    if isinstance(x, (list, dict)):
        return "matrix" if isinstance(x, list) else "object"
    return f"JSON {type(x).__name__}"


def parse_trajectory(text: str, n_frames: int | None = None) -> torch.Tensor:
    """Poses ``[T, 3, 4]`` float32 from JSON: a list of 3x4 matrices (or rows of 12 numbers), a list of
    ``{"position": [x, y, z], "yaw": deg, "pitch": deg}``, or ``{"preset": name, ...params}``.

    With ``n_frames`` (latent frames of the video) a list must hold at least that many poses (extra poses are
    returned as given); a preset is exactly ``n_frames`` long and needs it.
    """
    if n_frames is not None and (isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 1):
        raise TrajectoryError(f"n_frames must be a positive number of latent frames, got {n_frames!r}")
    if not isinstance(text, str):
        raise TrajectoryError(f"the trajectory must be JSON text, got {type(text).__name__}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TrajectoryError(f"the trajectory is not valid JSON: {e}") from None
    except RecursionError:
        raise TrajectoryError("the trajectory JSON is nested too deeply; a pose is a 3x4 matrix or an object "
                              "{\"position\": [x, y, z], \"yaw\": deg, \"pitch\": deg}") from None
    if isinstance(data, dict):
        if "preset" not in data:
            raise TrajectoryError("a trajectory object needs a 'preset' key (one of: "
                                  f"{', '.join(preset_names())}); a list of poses is written as a JSON list")
        if not isinstance(data["preset"], str):
            raise TrajectoryError(f"'preset' must be a name, one of: {', '.join(preset_names())}")
        if n_frames is None:
            raise TrajectoryError(f"the preset '{data['preset']}' needs n_frames (the video's latent frames)")
        poses = preset(data["preset"], n_frames, **{k: v for k, v in data.items() if k != "preset"})
    elif isinstance(data, list):
        if not data:
            raise TrajectoryError("the trajectory is an empty list; give at least one pose")
        kind = _kind(data[0])
        for i, x in enumerate(data):
            if _kind(x) not in ("matrix", "object"):
                raise TrajectoryError(f"pose {i} is a {_kind(x)}; a pose is a 3x4 matrix, a row of 12 "
                                      "numbers or an object {\"position\": [x, y, z], \"yaw\": deg, "
                                      "\"pitch\": deg}")
            if _kind(x) != kind:
                names = {"matrix": "a matrix", "object": "an object"}
                raise TrajectoryError(f"mixed pose forms: pose 0 is {names[kind]} but pose {i} is "
                                      f"{names[_kind(x)]}; write every pose in the same form")
        if kind == "matrix":
            poses = torch.tensor([_matrix(x, i) for i, x in enumerate(data)], dtype=torch.float32)
        else:
            poses = torch.stack([_pose_object(x, i) for i, x in enumerate(data)])
    else:
        raise TrajectoryError(f"the trajectory is a JSON {type(data).__name__}; write a list of poses "
                              "or an object {\"preset\": name}")
    validate_poses(poses)
    if n_frames is not None and poses.shape[0] < n_frames:
        raise TrajectoryError(f"the trajectory has {poses.shape[0]} poses but the video needs {n_frames} "
                              "latent frames; add poses or use a preset")
    return poses


def trajectory_json(poses: torch.Tensor) -> str:
    """Poses ``[T, 3, 4]`` as JSON form (a), one 3x4 matrix per line, numbers rounded to 6 decimals."""
    if poses.ndim != 3 or tuple(poses.shape[1:]) != (3, 4):
        raise TrajectoryError(f"expected poses [T, 3, 4], got {tuple(poses.shape)}")
    rows = [json.dumps([[round(v, 6) + 0.0 for v in r] for r in p]) for p in poses.double().tolist()]
    return "[\n" + ",\n".join(rows) + "\n]"
