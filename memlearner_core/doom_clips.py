"""Doom clips as a user's training data, and the camera paths they follow.

A clip is written as a user's video folder holds it: ``<name>.mp4`` (H.264, what a user's footage is), ``<name>.txt``
(its caption) and ``<name>.poses.json`` (one camera-to-world 3x4 per video frame, OpenCV axes, the first camera at
the origin, map units times ``POSE_SCALE``), so ``memlearner-train`` reads it through its video-folder path (VAE
encode, latent cache). Beside them ``<name>.geometry.safetensors`` keeps what only a renderer knows (z-depth, sky
and moving-object masks, the ground-truth RGB before compression), which the evaluation needs and training never
reads (the folder reader lists videos only).

Paths (``training_path``, ``evaluation_path``), ``FRAMES`` video frames each (``4k + 1``: Wan2.1's VAE makes 16
latent frames of them):
- ``turn``: stand and turn one way, then turn back a few degrees off the way out (a place seen before, from a new
  angle);
- ``retrace``: walk out facing the way, then come back along a line shifted sideways, still facing the way out (a
  place seen before, from a new position: parallax, occlusion);
- ``walk``: a random walk facing where it goes (no return: motion and new places).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from memlearner_core.doom_geometry import unit_scale
from memlearner_core.doom_world import PATH_CLEARANCE, SIDE_SHIFT, DoomClip, DoomRenderer
from memlearner_core.trajectory import trajectory_json

log = logging.getLogger("memlearner")

FRAMES = 61  # video frames a clip: 16 latent frames
POSE_SCALE = 1 / 256  # map units -> the pack's trajectory unit (256 map units, about 8 m, is 1)
WALK_STEP = 16.0  # map units a video frame when walking (a player runs about 16 a tic)
CAPTION = "a first-person walk through a Doom level"
GEOMETRY_SUFFIX = ".geometry.safetensors"
CRF = 12  # H.264 quality: visually lossless at this size; the geometry file keeps the exact render
RETRIES = 5  # paths drawn for a clip before its map is given up
TRAINING_KINDS = {"turn": 0.4, "retrace": 0.4, "walk": 0.2}  # kind -> share of the training clips


@dataclass(frozen=True)
class Path2D:
    """A camera path: integer map points and yaws (degrees from east), and the frames given as history when it is
    evaluated (the way out)."""

    points: list[tuple[float, float]]
    yaws: list[float]
    history: int


def relative_poses(poses: torch.Tensor) -> torch.Tensor:
    """Camera-to-world ``[T, 3, 4]`` in map units -> the same path seen from its first camera (which becomes the
    identity), translations times ``POSE_SCALE``: a user's recorded path starts where it starts."""
    full = torch.cat([poses.double(), torch.tensor([[[0, 0, 0, 1.0]]], dtype=torch.float64).expand(len(poses), 1, 4)],
                     1)
    rel = torch.linalg.inv(full[0]) @ full
    return unit_scale(rel[:, :3], POSE_SCALE).float()


def _turn(renderer: DoomRenderer, rng: torch.Generator, frames: int, out: int, speed: float, offset: float):
    x, y = float(round(renderer.start[0])), float(round(renderer.start[1]))
    sign = 1.0 if float(torch.rand((), generator=rng)) < 0.5 else -1.0
    start = renderer.start_yaw + 360.0 * float(torch.rand((), generator=rng))
    way_out = [start + sign * speed * i for i in range(out)]
    back = [way_out[-1] + offset - sign * speed * (i + 1) for i in range(frames - out)]
    return Path2D([(x, y)] * frames, [a % 360.0 for a in way_out + back], out)


def _retrace(renderer: DoomRenderer, rng: torch.Generator, frames: int, out: int, offset: float):
    pts = renderer.walkable_points(out, WALK_STEP, PATH_CLEARANCE, rng)
    yaws = _facing(pts, renderer.start_yaw)
    back_pts, back_yaws = [], []
    for i in range(frames - out):
        j = max(out - 2 - i, 0)  # back over the way out, one point a frame, and standing at its start after
        (x, y), yaw = pts[j], yaws[j]
        right = math.radians(yaw - 90.0)
        side = (float(round(x + SIDE_SHIFT * math.cos(right))), float(round(y + SIDE_SHIFT * math.sin(right))))
        back_pts.append(side if renderer.walkable((x, y), side, PATH_CLEARANCE) else (x, y))
        back_yaws.append((yaw + offset) % 360.0)
    return Path2D(pts + back_pts, yaws + back_yaws, out)


def _walk(renderer: DoomRenderer, rng: torch.Generator, frames: int):
    pts = renderer.walkable_points(frames, WALK_STEP, PATH_CLEARANCE, rng)
    return Path2D(pts, _facing(pts, renderer.start_yaw), frames)


def _facing(points: list[tuple[float, float]], fallback: float) -> list[float]:
    """Each point's yaw toward the next, smoothed over three steps (a walk's heading, not its jitter)."""
    raw = [math.atan2(b[1] - a[1], b[0] - a[0]) for a, b in zip(points, points[1:], strict=False)]
    if not raw:
        return [fallback] * len(points)
    raw.append(raw[-1])
    out = []
    for i in range(len(raw)):
        near = raw[max(i - 1, 0):i + 2]
        out.append(math.degrees(math.atan2(sum(map(math.sin, near)), sum(map(math.cos, near)))) % 360.0)
    return out


def training_path(renderer: DoomRenderer, kind: str, rng: torch.Generator, frames: int = FRAMES) -> Path2D:
    """A random path of ``kind`` (``TRAINING_KINDS``): way outs of a third to two thirds of the clip, turns of 5 to
    10 degrees a frame, returns up to 12 degrees off the way out."""
    out = int(frames * (0.33 + 0.34 * float(torch.rand((), generator=rng))))
    offset = 12.0 * (2 * float(torch.rand((), generator=rng)) - 1)
    if kind == "turn":
        return _turn(renderer, rng, frames, out, 5.0 + 5.0 * float(torch.rand((), generator=rng)), offset)
    if kind == "retrace":
        return _retrace(renderer, rng, frames, out, offset)
    if kind == "walk":
        return _walk(renderer, rng, frames)
    raise ValueError(f"unknown path kind {kind!r}: expected one of {', '.join(TRAINING_KINDS)}")


def evaluation_path(renderer: DoomRenderer, kind: str, rng: torch.Generator, history: int,
                    frames: int = FRAMES) -> Path2D:
    """The evaluated return: ``history`` video frames out, the rest back. ``turn``: 7.5 degrees a frame, back 7
    degrees off; ``retrace``: back SIDE_SHIFT to the side, facing the way out."""
    if kind == "turn":
        return _turn(renderer, rng, frames, history, 7.5, 7.0)
    if kind == "retrace":
        return _retrace(renderer, rng, frames, history, 0.0)
    raise ValueError(f"unknown evaluation path {kind!r}: expected 'turn' or 'retrace'")


def render_path(renderer: DoomRenderer, path: Path2D) -> DoomClip:
    return renderer.render(path.points, path.yaws)


def write_evaluation_clip(folder: Path, name: str, map_name: str, kind: str, monsters: bool, seed: int,
                          history: int, frames: int = FRAMES) -> Path:
    """An ``evaluation_path`` clip with its geometry; a path that does not render is drawn again in a new game
    (``RETRIES`` times, seeds ``seed``, ``seed + 1``, ...)."""
    for attempt in range(RETRIES):
        with DoomRenderer(map_name, monsters=monsters, seed=seed + attempt) as r:
            try:
                path = evaluation_path(r, kind, torch.Generator().manual_seed(seed + attempt), history, frames)
                return write_clip(folder, name, render_path(r, path), path.history, geometry=True)
            except RuntimeError as e:
                log.warning("doom evaluation clip %s, try %d: %s", name, attempt + 1, e)
    raise RuntimeError(f"no renderable {kind} path on {map_name} in {RETRIES} tries")


def write_video(path: Path, rgb: torch.Tensor, fps: int = 16, crf: int = CRF) -> None:
    """``uint8 [T, H, W, 3]`` -> an H.264 mp4 (yuv420p, what players and ComfyUI's reader take), written to a
    temporary file beside ``path`` and renamed over it, so a failure leaves no half-written video."""
    import av

    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=".mp4", dir=path.parent)
    os.close(fd)
    try:
        with av.open(tmp, "w") as box:
            stream = box.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = rgb.shape[2], rgb.shape[1], "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for frame in rgb.numpy():
                box.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            box.mux(stream.encode())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the video from the user's other tools
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_clip(folder: Path, name: str, clip: DoomClip, history: int, caption: str = CAPTION,
               geometry: bool = False) -> Path:
    """``clip`` as ``folder/<name>.mp4`` with its caption and poses, and with ``geometry`` its geometry file (for
    the clips evaluated: 10 MB each); returns the video's path."""
    folder.mkdir(parents=True, exist_ok=True)
    video = folder / f"{name}.mp4"
    if geometry:
        save_file({"rgb": clip.rgb.contiguous(), "depth": clip.depth.contiguous(),
                   "moving": clip.moving.contiguous(), "sky": clip.sky.contiguous(),
                   "poses_map_units": clip.poses.contiguous()}, str(folder / f"{name}{GEOMETRY_SUFFIX}"),
                  metadata={"map": clip.map_name, "history": str(history), "pose_scale": str(POSE_SCALE)})
    (folder / f"{name}.poses.json").write_text(trajectory_json(relative_poses(clip.poses)))
    (folder / f"{name}.txt").write_text(caption + "\n")
    write_video(video, clip.rgb)
    return video


@dataclass
class Geometry:
    """A written clip's render: rgb ``uint8 [T, H, W, 3]``, depth ``[T, H, W]`` map units, moving and sky masks,
    poses ``[T, 3, 4]`` in map units, the map and the history (way-out) length in video frames."""

    rgb: torch.Tensor
    depth: torch.Tensor
    moving: torch.Tensor
    sky: torch.Tensor
    poses: torch.Tensor
    map_name: str
    history: int


def read_geometry(video: Path) -> Geometry:
    path = video.with_name(video.stem + GEOMETRY_SUFFIX)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    return Geometry(t["rgb"], t["depth"], t["moving"], t["sky"], t["poses_map_units"], meta["map"],
                    int(meta["history"]))


def training_plan(maps: tuple[str, ...], clips: int, seed: int, moving_share: float = 0.25) -> list[dict]:
    """``clips`` clips spread over ``maps`` in turn: each one's name, map, path kind, monsters on or off, seed."""
    g = torch.Generator().manual_seed(seed)
    kinds, weights = list(TRAINING_KINDS), torch.tensor(list(TRAINING_KINDS.values()))
    plan = []
    for i in range(clips):
        kind = kinds[int(torch.multinomial(weights, 1, generator=g))]
        plan.append({"name": f"doom_{i:05d}", "map": maps[i % len(maps)], "kind": kind,
                     "monsters": bool(torch.rand((), generator=g) < moving_share), "seed": seed * 100_003 + i})
    return plan


def write_plan(folder: Path, plan: list[dict], frames: int = FRAMES, progress=None) -> tuple[int, list[str]]:
    """Render and write every clip of ``plan`` not yet in ``folder`` (one game per map and monster setting, a new
    one after a path that did not render: a warp onto a lift or a crusher can leave the game's view unsettled);
    returns how many were written and the names given up after ``RETRIES`` paths. On a map whose start no random
    walk leaves, every clip turns instead. ``progress(done, total)`` after each clip."""
    todo = [p for p in plan if not (folder / f"{p['name']}.mp4").exists()]
    written, given_up = 0, []
    groups: dict = {}
    for p in todo:
        groups.setdefault((p["map"], p["monsters"]), []).append(p)
    for (map_name, monsters), items in groups.items():
        r = DoomRenderer(map_name, monsters=monsters, seed=items[0]["seed"])
        try:
            enclosed = False  # the start is shut in (closed doors): no walk gets out, so the map's clips turn
            for p in items:
                rng = torch.Generator().manual_seed(p["seed"])
                for attempt in range(RETRIES):
                    kind = "turn" if enclosed else p["kind"]
                    try:
                        path = training_path(r, kind, rng, frames)
                        clip = render_path(r, path)
                        break
                    except RuntimeError as e:
                        log.warning("doom clip %s on %s, try %d: %s", p["name"], map_name, attempt + 1, e)
                        enclosed = enclosed or "random walk stuck" in str(e)
                        r.close()
                        r = DoomRenderer(map_name, monsters=monsters, seed=p["seed"] + attempt + 1)
                else:
                    given_up.append(p["name"])
                    continue
                write_clip(folder, p["name"], clip, path.history)
                written += 1
                if progress:
                    progress(written, len(todo))
        finally:
            r.close()
    (folder / "plan.json").write_text(json.dumps({"clips": plan, "given_up": given_up}, indent=0))
    return written, given_up
