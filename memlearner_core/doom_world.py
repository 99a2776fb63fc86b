"""A rendered 3D world for measuring video memory: ViZDoom (Freedoom 2) clips at exact, read-back camera poses.

``DoomRenderer`` warps the camera to integer map points, turns it to exact yaws and captures RGB, z-depth, labels
and masks (``DoomClip``); ``revisit_path`` builds paths that come back to places already seen. Measured behaviour
of ViZDoom 1.3.2 is in ``benchmarks/doom/NOTES.md``. ``vizdoom`` is imported only inside the functions that render,
so importing this module never needs it.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from memlearner_core.doom_geometry import depth_to_z, doom_poses

WAD = "freedoom2.wad"
TRAIN_MAPS = tuple(f"MAP{i:02d}" for i in range(1, 21))
HELD_OUT_MAPS = tuple(f"MAP{i:02d}" for i in range(21, 33))
WIDTH, HEIGHT = 160, 120  # ViZDoom's smallest resolution: downscale for smaller clips

EYE_HEIGHT = 41.0  # CAMERA_POSITION_Z - POSITION_Z once the view has settled after a warp
MAX_STEP = 24.0  # a floor step higher than this blocks the player
MIN_OPENING = 64.0  # an opening lower than this (closed doors: 0) is treated as a wall
PATH_STEP, PATH_CLEARANCE, SIDE_SHIFT = 24.0, 40.0, 8.0  # revisit_path's walks, map units
SETTLE_TICS = 12  # a warp onto a lower floor lands (the view dips, then recovers) before it settles

# Doom 2 monster classes as ZDoom names them (Freedoom replaces their art, not their class names).
MONSTERS = frozenset({
    "ZombieMan", "ShotgunGuy", "ChaingunGuy", "WolfensteinSS", "DoomImp", "Demon", "Spectre", "LostSoul",
    "Cacodemon", "HellKnight", "BaronOfHell", "Arachnotron", "PainElemental", "Revenant", "Fatso", "Archvile",
    "SpiderMastermind", "Cyberdemon", "CommanderKeen", "BossBrain",
})


def wrap180(angle: float) -> float:
    """Degrees -> the same angle in [-180, 180)."""
    return (angle + 180.0) % 360.0 - 180.0


@dataclass
class DoomClip:
    """T frames of one map at their read-back poses (H, W = HEIGHT, WIDTH).

    rgb ``uint8 [T, H, W, 3]``; depth ``float32 [T, H, W]`` z-depth in map units (``depth_to_z``); labels
    ``uint8 [T, H, W]`` (0 walls and sky, 1 floors and ceilings, >= 2 one value per visible object); moving
    ``bool [T, H, W]``: pixels of objects whose class is in ``MONSTERS`` (by class, not by motion: a sleeping
    monster is masked too; items that animate in place are not); sky ``bool [T, H, W]``: label-0 pixels at the
    clip's largest label-0 depth value (sky reads one constant far value per map; a clip that shows no sky marks
    its farthest wall pixels instead, which only makes a depth mask more conservative); positions ``float64
    [T, 3]`` (CAMERA_POSITION_X/Y/Z), yaws ``float64 [T]`` (ANGLE, degrees), poses ``float32 [T, 3, 4]``
    (``doom_poses`` of those, camera-to-world in OpenCV axes)."""

    rgb: torch.Tensor
    depth: torch.Tensor
    labels: torch.Tensor
    moving: torch.Tensor
    sky: torch.Tensor
    positions: torch.Tensor
    yaws: torch.Tensor
    poses: torch.Tensor
    map_name: str


def _obstacles(sectors) -> np.ndarray:
    """ViZDoom sectors -> blocking segments ``[N, 4]`` (x1, y1, x2, y2): one-sided lines, floor steps over
    MAX_STEP and openings under MIN_OPENING (a two-sided line is listed in both its sectors)."""
    users: dict[tuple, set[int]] = {}
    heights = {}
    for sector in sectors:
        heights[sector.id] = (sector.floor_height, sector.ceiling_height)
        for line in sector.lines:
            key = tuple(sorted([(line.x1, line.y1), (line.x2, line.y2)]))
            users.setdefault(key, set()).add(sector.id)
    blocking = []
    for key, ids in users.items():
        if len(ids) >= 2:
            (fa, ca), (fb, cb) = (heights[i] for i in list(ids)[:2])
            if abs(fa - fb) <= MAX_STEP and min(ca, cb) - max(fa, fb) >= MIN_OPENING:
                continue
        blocking.append([key[0][0], key[0][1], key[1][0], key[1][1]])
    return np.asarray(blocking, dtype=np.float64).reshape(-1, 4)


class DoomRenderer:
    """One headless ViZDoom game on ``map_name`` (Freedoom 2), monsters off unless asked; use as a context manager.

    Runs in its own temporary directory (ViZDoom writes ``_vizdoom/`` and ``_vizdoom.ini`` to its working
    directory), removed on ``close``."""

    def __init__(self, map_name: str, monsters: bool = False, seed: int = 0):
        import vizdoom as vzd

        self.map_name = map_name
        self._vzd = vzd
        self._dir = tempfile.mkdtemp(prefix="memlearner_doom_")
        game = vzd.DoomGame()
        game.set_doom_game_path(os.path.join(os.path.dirname(vzd.__file__), WAD))
        game.set_doom_map(map_name)
        game.set_doom_config_path(os.path.join(self._dir, "_vizdoom.ini"))
        game.set_seed(seed)
        game.set_doom_skill(3)
        game.set_screen_resolution(vzd.ScreenResolution.RES_160X120)
        game.set_screen_format(vzd.ScreenFormat.RGB24)
        game.set_window_visible(False)
        game.set_sound_enabled(False)
        game.set_audio_buffer_enabled(False)
        for part in ("hud", "minimal_hud", "weapon", "crosshair", "messages", "decals", "particles",
                     "effects_sprites", "screen_flashes", "corpses"):
            getattr(game, f"set_render_{part}")(False)
        for info in ("depth_buffer", "labels_buffer", "objects_info", "sectors_info"):
            getattr(game, f"set_{info}_enabled")(True)
        game.set_mode(vzd.Mode.PLAYER)
        game.set_episode_timeout(0)
        game.set_available_buttons([vzd.Button.TURN_LEFT_RIGHT_DELTA])
        game.add_game_args("+sv_cheats 1" + ("" if monsters else " -nomonsters"))
        self._configure(game)
        self.game = game
        cwd = os.getcwd()
        try:  # the engine process inherits this working directory and writes there
            os.chdir(self._dir)
            game.init()
        except BaseException:
            os.chdir(cwd)
            self.close()
            raise
        os.chdir(cwd)
        game.advance_action(8)  # input is ignored for the first 7 tics after init
        game.send_game_command("god")
        state = game.get_state()
        self.sectors = state.sectors
        self.obstacles = _obstacles(state.sectors)  # [N, 4] blocking segments
        self.start = (self._var("POSITION_X"), self._var("POSITION_Y"))
        self.start_yaw = self._var("ANGLE")

    def _configure(self, game) -> None:
        """Hook for subclasses (e.g. tests) to change settings before ``init``."""

    def _var(self, name: str) -> float:
        return float(self.game.get_game_variable(getattr(self._vzd.GameVariable, name)))

    def __enter__(self) -> DoomRenderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        game = getattr(self, "game", None)
        if game is not None:
            game.close()
            self.game = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def contains(self, x: float, y: float) -> bool:
        """Whether (x, y) lies inside some sector (even-odd rule on each sector's lines)."""
        for sector in self.sectors:
            inside = False
            for line in sector.lines:
                if (line.y1 > y) != (line.y2 > y) and x < line.x1 + (y - line.y1) * (line.x2 - line.x1) / (
                        line.y2 - line.y1):
                    inside = not inside
            if inside:
                return True
        return False

    def clearance(self, x: float, y: float) -> float:
        """Distance (map units) from (x, y) to the nearest blocking segment."""
        x1, y1, x2, y2 = self.obstacles.T
        ex, ey = x2 - x1, y2 - y1
        t = np.clip(((x - x1) * ex + (y - y1) * ey) / np.maximum(ex * ex + ey * ey, 1e-9), 0, 1)
        return float(np.hypot(x1 + t * ex - x, y1 + t * ey - y).min(initial=math.inf))

    def crosses(self, a: tuple[float, float], b: tuple[float, float]) -> bool:
        """Whether the segment a -> b properly crosses a blocking segment."""
        (ax, ay), (bx, by) = a, b
        x1, y1, x2, y2 = self.obstacles.T
        d1 = (bx - ax) * (y1 - ay) - (by - ay) * (x1 - ax)
        d2 = (bx - ax) * (y2 - ay) - (by - ay) * (x2 - ax)
        d3 = (x2 - x1) * (ay - y1) - (y2 - y1) * (ax - x1)
        d4 = (x2 - x1) * (by - y1) - (y2 - y1) * (bx - x1)
        return bool(np.any((d1 * d2 < 0) & (d3 * d4 < 0)))

    def walkable(self, a: tuple[float, float], b: tuple[float, float], clearance: float) -> bool:
        """Whether b is a walkable step from a: inside a sector, ``clearance`` from walls, not through one."""
        return self.clearance(*b) >= clearance and not self.crosses(a, b) and self.contains(*b)

    def render(self, xy: list[tuple[float, float]], yaws: list[float]) -> DoomClip:
        """Poses (x, y map units, truncated to integers as ``warp`` does; yaw degrees from east) -> ``DoomClip``.

        Raises ValueError for a point no sector contains (``warp`` would put the camera in the void)."""
        if len(xy) != len(yaws):
            raise ValueError(f"{len(xy)} points but {len(yaws)} yaws")
        for x, y in xy:
            if not self.contains(int(x), int(y)):
                raise ValueError(f"point ({x}, {y}) is outside every sector of {self.map_name}")
        game = self.game
        frames, positions, angles = [], [], []
        for (x, y), yaw in zip(xy, yaws, strict=True):
            game.send_game_command(f"warp {int(x)} {int(y)}")
            game.make_action([wrap180(self._var("ANGLE") - yaw)], 1)  # positive turns right; from the read-back
            previous = None
            for _ in range(SETTLE_TICS):  # the first tics after a warp render from a squashed eye height
                game.make_action([0.0], 1)  # explicit zeros: delta buttons persist otherwise
                eye = self._var("CAMERA_POSITION_Z") - self._var("POSITION_Z")
                if eye == previous == EYE_HEIGHT:
                    break
                previous = eye
            else:
                raise RuntimeError(f"eye height at ({x}, {y}) on {self.map_name} did not settle: {eye}")
            state = game.get_state()
            moving = np.zeros(state.labels_buffer.shape, dtype=bool)
            for label in state.labels:
                if label.object_name in MONSTERS:
                    moving |= state.labels_buffer == label.value
            frames.append((state.screen_buffer.copy(), state.depth_buffer.copy(), state.labels_buffer.copy(),
                           moving))
            positions.append([self._var(f"CAMERA_POSITION_{axis}") for axis in "XYZ"])
            angles.append(self._var("ANGLE"))
        rgb, raw, labels, moving = (torch.from_numpy(np.stack(parts)) for parts in zip(*frames, strict=True))
        wall = labels == 0
        far = raw[wall].max() if wall.any() else None
        sky = wall & (raw == far) if far is not None else torch.zeros_like(wall)
        positions_t = torch.tensor(positions, dtype=torch.float64)
        yaws_t = torch.tensor(angles, dtype=torch.float64)
        return DoomClip(rgb=rgb, depth=depth_to_z(raw), labels=labels, moving=moving, sky=sky,
                        positions=positions_t, yaws=yaws_t, poses=doom_poses(positions_t, yaws_t),
                        map_name=self.map_name)

    def walkable_points(self, n: int, step: float, clearance: float,
                        rng: torch.Generator) -> list[tuple[float, float]]:
        """A random walk of ``n`` integer points from the player start, about ``step`` apart (rounding), each
        ``clearance`` from any blocking line, inside a sector, no step through a wall. The heading wanders by
        N(0, 20 degrees) a step and turns 45 degrees on a blocked step; RuntimeError if it gets stuck."""
        x, y = float(round(self.start[0])), float(round(self.start[1]))
        heading = self.start_yaw
        points = [(x, y)]
        tries = 0
        while len(points) < n:
            tries += 1
            if tries > 200 * n:
                raise RuntimeError(f"random walk stuck at ({x}, {y}) on {self.map_name} after {len(points)} points")
            turned = heading + 20.0 * float(torch.randn((), generator=rng))
            nx = float(round(x + step * math.cos(math.radians(turned))))
            ny = float(round(y + step * math.sin(math.radians(turned))))
            if not self.walkable((x, y), (nx, ny), clearance):
                heading += 45.0 if float(torch.rand((), generator=rng)) < 0.5 else -45.0
                continue
            x, y, heading = nx, ny, turned % 360.0
            points.append((x, y))
        return points


def _headings(points: list[tuple[float, float]], fallback: float) -> list[float]:
    """Yaw (degrees) from each point toward the next; the last keeps the previous heading."""
    yaws = [math.degrees(math.atan2(b[1] - a[1], b[0] - a[0])) % 360.0
            for a, b in zip(points, points[1:], strict=False)]
    return yaws + [yaws[-1] if yaws else fallback]


def revisit_path(renderer: DoomRenderer, kind: str, n: int,
                 rng: torch.Generator) -> tuple[list[tuple[float, float]], list[float]]:
    """A path that comes back to what it saw -> (points, yaws in degrees).

    "turn": stand at the start and turn a full circle in ``n`` steps from the start yaw, then come back over the
    first quarter (its ``n // 4`` yaws in reverse) 7 degrees off: ``n + n // 4`` poses. "out_and_back": ``n``
    ``walkable_points`` out (PATH_STEP apart, PATH_CLEARANCE from walls), then the same points in reverse, each
    shifted SIDE_SHIFT to the right of the return direction where that is still walkable: ``2 n`` poses, each
    facing its direction of travel."""
    if kind == "turn":
        start = (float(round(renderer.start[0])), float(round(renderer.start[1])))
        circle = [(renderer.start_yaw + 360.0 * i / n) % 360.0 for i in range(n)]
        back = [(yaw + 7.0) % 360.0 for yaw in reversed(circle[:n // 4])]
        return [start] * (n + n // 4), circle + back
    if kind == "out_and_back":
        out = renderer.walkable_points(n, PATH_STEP, PATH_CLEARANCE, rng)
        back = list(reversed(out))
        back_yaws = _headings(back, (renderer.start_yaw + 180.0) % 360.0)
        shifted = []
        for (x, y), yaw in zip(back, back_yaws, strict=True):
            right = math.radians(yaw - 90.0)
            side = (float(round(x + SIDE_SHIFT * math.cos(right))), float(round(y + SIDE_SHIFT * math.sin(right))))
            shifted.append(side if renderer.walkable((x, y), side, PATH_CLEARANCE) else (x, y))
        return out + shifted, _headings(out, renderer.start_yaw) + back_yaws
    raise ValueError(f"unknown path kind {kind!r}: expected 'turn' or 'out_and_back'")
