"""Camera Path: the camera of a long video, one pose per latent frame, from a preset or custom JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from memlearner_core.trajectory import parse_trajectory, preset_names

from . import comfy_adapter as ca

CUSTOM = "custom JSON"
CAMERA_PATH = io.Custom("MEMLEARNER_CAMERA_PATH")
PREVIEW_FRAMES, PREVIEW_SIZE = 32, 256  # a preset is drawn with 32 poses (its shape does not depend on the count)


def trajectory_text(camera: str, trajectory: str) -> str:
    """The JSON ``parse_trajectory`` reads: a preset (``trajectory`` may hold its parameters as a JSON object)
    or the custom JSON itself."""
    if camera == CUSTOM:
        if not trajectory.strip():
            raise ValueError("camera is 'custom JSON' but the trajectory is empty")
        return trajectory
    params = {}
    if trajectory.strip():
        try:
            params = json.loads(trajectory)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"trajectory: the {camera} preset's parameters are not valid JSON "
                             f"({e if isinstance(e, ValueError) else 'nested too deeply'})") from None
        if not isinstance(params, dict):
            raise ValueError(f'trajectory: the {camera} preset takes a JSON object of parameters, e.g. {{"degrees": 90}}')
        if params.get("preset", camera) != camera:
            raise ValueError(f"trajectory names the preset {params['preset']!r} but camera is {camera!r}: choose "
                             f"that preset as camera (or 'custom JSON'), or remove \"preset\" from the trajectory")
    return json.dumps({**params, "preset": camera})


@dataclass(frozen=True)
class CameraPathSpec:
    """A camera path as the user gave it; a preset only gets its poses once the video's length is known."""

    text: str  # what parse_trajectory reads

    @classmethod
    def from_inputs(cls, camera: str, trajectory: str) -> CameraPathSpec:
        if camera not in (*preset_names(), CUSTOM):
            raise ValueError(f"camera must be one of {', '.join([*preset_names(), CUSTOM])}, got {camera!r}")
        spec = cls(trajectory_text(camera, trajectory or ""))
        parse_trajectory(spec.text, None if camera == CUSTOM else 1)  # every mistake but the length shows now
        return spec

    def poses(self, n_frames: int) -> torch.Tensor:
        """``[>= n_frames, 3, 4]``: a preset made for ``n_frames`` latent frames, or the custom poses (refused when
        fewer than ``n_frames``)."""
        return parse_trajectory(self.text, n_frames)


def preview(poses: torch.Tensor, size: int = PREVIEW_SIZE) -> torch.Tensor:
    """IMAGE ``[1, size, size, 3]``: the path seen from above (x right, z up the image), a dot per pose from blue
    (first) to orange (last), each with a tick along its viewing direction."""
    from PIL import Image, ImageDraw

    xz = poses[:, [0, 2], 3].double()
    look = F.normalize(poses[:, [0, 2], 2].double(), dim=1)  # the viewing direction (third column of R), from above
    lo, hi = xz.amin(0), xz.amax(0)
    spread = float((hi - lo).max())
    span = max(spread, 1e-6) * 1.3  # room for the ticks
    tick = 10 if spread > 1e-6 else size * 0.4  # a camera that only turns: long ticks, a fan of views
    centre, margin = (lo + hi) / 2, 16

    def px(p: torch.Tensor) -> tuple[float, float]:
        u = (p - centre) / span * (size - 2 * margin)
        return size / 2 + float(u[0]), size / 2 - float(u[1])

    im = Image.new("RGB", (size, size), (24, 26, 30))
    d = ImageDraw.Draw(im)
    if len(xz) > 1:
        d.line([px(p) for p in xz], fill=(90, 96, 104), width=1)
    n = len(xz)
    for i, (p, v) in enumerate(zip(xz, look, strict=True)):
        a = i / max(n - 1, 1)
        colour = (round(70 + 185 * a), round(150 - 20 * a), round(240 - 210 * a))
        x, y = px(p)
        d.line([(x, y), (x + tick * float(v[0]), y - tick * float(v[1]))], fill=colour, width=1)
        d.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
    return torch.from_numpy(numpy.asarray(im, dtype=numpy.float32) / 255.0)[None]


class CameraPath(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerCameraPath",
            display_name="Camera Path",
            category="memlearner",
            description="The camera of a long video for Memory Rollout: one camera-to-world pose [R|t] per latent "
                        "frame, OpenCV axes (x right, y down, z forward). A preset that comes back to where it has "
                        "been (its length follows the video), or custom JSON.",
            inputs=[
                ca.combo_input("camera", options=[*preset_names(), CUSTOM], default="walk_and_revisit",
                               tooltip="orbit (radius, center, degrees), pan_and_return (degrees), walk_and_revisit "
                                       "(distance), or custom JSON poses."),
                io.String.Input("trajectory", default="", multiline=True,
                                tooltip="For a preset, an optional JSON object of its parameters (e.g. "
                                        "{\"degrees\": 90}). For custom JSON: [[3x4 [R|t]], ...], rows of 12 "
                                        "numbers, or [{\"position\": [x,y,z], \"yaw\": deg, \"pitch\": deg}, ...], "
                                        "at least one pose per latent frame of the video."),
            ],
            outputs=[CAMERA_PATH.Output(display_name="camera_path"),
                     io.Image.Output(display_name="preview", tooltip="The path from above: blue first, orange last, "
                                                                     "a tick along each view.")],
        )

    @classmethod
    def validate_inputs(cls, camera: str | None = None, trajectory: str | None = None):
        if camera is None:  # linked: checked when the run starts
            return True
        try:
            if trajectory is None:
                if camera not in (*preset_names(), CUSTOM):
                    raise ValueError(f"camera must be one of {', '.join([*preset_names(), CUSTOM])}, got {camera!r}")
            else:
                CameraPathSpec.from_inputs(camera, trajectory)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, camera: str, trajectory: str = "") -> io.NodeOutput:
        spec = CameraPathSpec.from_inputs(camera, trajectory)
        poses = parse_trajectory(spec.text, None if camera == CUSTOM else PREVIEW_FRAMES)
        return io.NodeOutput(spec, preview(poses))
