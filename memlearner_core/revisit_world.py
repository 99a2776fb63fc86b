"""A toy world with exact ground truth, for measuring whether memory remembers: a panorama in Wan2.1's latent space.

The world is a cylinder of radius ``radius`` whose inside wall is a panorama ``[16, rows, columns]`` of smooth random
latents (unit variance per channel, in the model's normalized latent space, where the sampler denoises). Column
``c`` sits at world angle ``360 * c / columns`` degrees, measured from +z towards +x (the trajectory module's yaw).
Every place has its own content, so a place seen once can only be predicted later by remembering it.

A camera (one camera-to-world ``[R|t]`` per latent frame, OpenCV axes) sees an ``h x w`` latent frame: the ray
through the view's centre hits the wall at angle ``theta`` and distance ``lam``; the frame shows the panorama's
columns ``u = theta_col + (j - w/2) * s`` and rows ``v = (rows-1)/2 + (i - (h-1)/2) * s``, with ``s = lam / radius``
(walking towards the wall zooms in), bilinearly sampled. Yaw-only cameras (every trajectory preset) are exact; pitch
and roll are ignored.

Two switchable hard cases of rule-based retrieval:
- ``Occluder``: a wall that, during some frames, hides a band of world angles behind a flat colour: field-of-view
  overlap says those frames saw the band, but they saw the wall;
- ``MovingObject``: a block of flat colour that moves along the panorama at a steady speed: on a revisit it is
  elsewhere.

``render`` gives each frame's latent and, per latent pixel, where on the panorama it looked and whether the world
was visible there; ``labels`` sorts every generated pixel into exactly one of revisit (its place was visible in the
history), new (no earlier frame showed it) and unlabelled (neither).

Worlds can come in families (``Family``): each family has its own palette (a mean colour and a mixing of the
channels, so its own channel correlations) and texture scale, and every world of a family is a fresh panorama with
those statistics. A place never seen cannot be remembered, but the family's look can be learnt from other videos of
the same family: what DiT-Mem's reference videos are for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .context_policy import overlap_matrix
from .trajectory import pose_from_position

CHANNELS = 16
VIEWPOINT_JITTER = 12.0  # degrees: random_trajectory(new_viewpoints=True) turns every pose by up to this
COVERAGE_SUBDIV = 4  # sub-cells per panorama cell when recording which places a frame saw


@dataclass(frozen=True)
class Occluder:
    """A wall in front of world columns ``[start, start + width)`` (panorama units, wrapping) during frames
    ``[first_frame, last_frame]``; it shows one flat colour ``[16]``."""

    start: float
    width: float
    first_frame: int
    last_frame: int
    colour: torch.Tensor


@dataclass(frozen=True)
class MovingObject:
    """A ``height x width`` block (panorama units) of one flat colour ``[16]``, its centre at column
    ``start + speed * frame`` (wrapping) and rows ``[row, row + height)``."""

    start: float
    speed: float
    row: float
    width: float
    height: float
    colour: torch.Tensor


@dataclass(frozen=True)
class Family:
    """A family's statistics: its worlds' panoramas are ``mean [16] + mixing [16, 16] @ smooth(cutoff)``, with
    ``smooth`` unit-variance low-pass noise (``smooth_panorama``)."""

    mean: torch.Tensor
    mixing: torch.Tensor
    cutoff: float


def make_family(seed: int, mean_std: float = 1.0, within_std: float = 0.7,
                cutoffs: tuple[float, float] = (0.12, 0.35)) -> Family:
    """A seeded family: its mean colour ``N(0, mean_std^2)`` per channel, a random channel mixing scaled so every
    channel varies by ``within_std`` inside a world, and a texture cutoff uniform in ``cutoffs`` (cycles per
    cell). With the defaults, two families' means differ by about 1.4 per channel while a world varies by 0.7
    about its family's mean: a family is told apart at a glance, its worlds only by remembering them."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(CHANNELS, generator=g) * mean_std
    mixing = torch.randn(CHANNELS, CHANNELS, generator=g)
    mixing = mixing / mixing.pow(2).sum(1, keepdim=True).sqrt() * within_std  # row norm: each channel's std
    cutoff = cutoffs[0] + (cutoffs[1] - cutoffs[0]) * float(torch.rand((), generator=g))
    return Family(mean, mixing, cutoff)


@dataclass
class World:
    """A panorama ``[16, rows, columns]`` (model space) on a cylinder of ``radius``, with optional hard cases."""

    panorama: torch.Tensor
    radius: float = 8.0
    occluder: Occluder | None = None
    moving: MovingObject | None = None

    @property
    def rows(self) -> int:
        return self.panorama.shape[1]

    @property
    def columns(self) -> int:
        return self.panorama.shape[2]


@dataclass
class Rendering:
    """Frames ``latent [16, T, h, w]`` (model space) of a trajectory; per pixel ``u, v [T, h, w]`` (panorama
    coordinates it shows), ``scale [T]`` (panorama cells per pixel) and ``visible [T, h, w]`` (False where the
    wall or the moving object hides the world)."""

    latent: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    scale: torch.Tensor
    visible: torch.Tensor


def smooth_panorama(rows: int, columns: int, generator: torch.Generator, cutoff: float = 0.25) -> torch.Tensor:
    """``[16, rows, columns]`` low-pass Gaussian noise (frequencies above ``cutoff`` cycles per cell removed,
    wrapping around in columns), each channel scaled to zero mean and unit variance."""
    noise = torch.randn(CHANNELS, rows, columns, generator=generator, dtype=torch.float64)
    fy = torch.fft.fftfreq(rows, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(columns, dtype=torch.float64)[None, :]
    keep = (fy**2 + fx**2) <= cutoff**2
    smooth = torch.fft.irfft2(torch.fft.rfft2(noise) * keep, s=(rows, columns))
    smooth = smooth - smooth.mean(dim=(1, 2), keepdim=True)
    return (smooth / smooth.std(dim=(1, 2), keepdim=True)).float()


def flat_colour(generator: torch.Generator) -> torch.Tensor:
    """A random ``[16]`` colour of unit mean square, the same scale as the world's content."""
    c = torch.randn(CHANNELS, generator=generator)
    return c / c.pow(2).mean().sqrt()


def make_world(seed: int, rows: int = 8, columns: int = 64, radius: float = 8.0, occluder: bool = False,
               moving_object: bool = False, occluded_frames: tuple[int, int] = (0, 0),
               occluded_columns: tuple[float, float] | None = None, object_speed: float | None = None,
               family: Family | None = None) -> World:
    """A seeded world. ``occluder``: a wall over ``occluded_columns`` (start, width; default a random quarter of
    the panorama) during frames ``occluded_frames`` (first, last). ``moving_object``: a 3x4 block moving at
    ``object_speed`` columns per frame (default random, 1 to 2 either way). ``family``: the panorama has that
    family's statistics (default: zero mean, unit variance, independent channels, cutoff 0.25)."""
    g = torch.Generator().manual_seed(seed)
    if family is None:
        pano = smooth_panorama(rows, columns, g)
    else:
        smooth = smooth_panorama(rows, columns, g, cutoff=family.cutoff)
        pano = family.mean[:, None, None] + torch.einsum("oc,crw->orw", family.mixing, smooth)
    wall = obj = None
    if occluder:
        start, width = occluded_columns or (float(torch.rand((), generator=g)) * columns, columns / 4)
        wall = Occluder(start, width, occluded_frames[0], occluded_frames[1], flat_colour(g))
    if moving_object:
        speed = object_speed
        if speed is None:
            speed = (1 + float(torch.rand((), generator=g))) * (1 if torch.rand((), generator=g) < 0.5 else -1)
        row = float(torch.randint(0, max(rows - 3, 1), (), generator=g))
        obj = MovingObject(float(torch.rand((), generator=g)) * columns, speed, row, 4.0, 3.0, flat_colour(g))
    return World(pano, radius, wall, obj)


def view_geometry(world: World, poses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pose ``[T, 3, 4]``: the panorama column at the view's centre ``[T]`` and the zoom ``s = lam / radius``
    ``[T]`` (``lam`` the distance along the view to the wall). Cameras must be inside the cylinder."""
    p = poses[:, :, 3].double()
    d = F.normalize(poses[:, :, 2].double()[:, [0, 2]], dim=-1)  # viewing direction in the xz plane
    pxz = p[:, [0, 2]]
    r2 = world.radius**2
    if (pxz.pow(2).sum(-1) >= r2).any():
        raise ValueError(f"a camera is outside the world's cylinder (radius {world.radius})")
    pd = (pxz * d).sum(-1)
    lam = -pd + torch.sqrt(pd**2 - pxz.pow(2).sum(-1) + r2)
    hit = pxz + lam[:, None] * d
    theta = torch.rad2deg(torch.atan2(hit[:, 0], hit[:, 1]))
    return (theta / 360.0 * world.columns).float(), (lam / world.radius).float()


def _wrap_distance(a: torch.Tensor, b: float | torch.Tensor, period: float) -> torch.Tensor:
    """Signed ``a - b`` wrapped into ``[-period/2, period/2)``."""
    return torch.remainder(a - b + period / 2, period) - period / 2


def render(world: World, poses: torch.Tensor, h: int = 8, w: int = 8) -> Rendering:
    """The frames a camera sees along ``poses [T, 3, 4]``: ``Rendering.latent [16, T, h, w]`` in model space."""
    centre, scale = view_geometry(world, poses)
    t = poses.shape[0]
    j = torch.arange(w, dtype=torch.float32) - w / 2
    i = torch.arange(h, dtype=torch.float32) - (h - 1) / 2
    u = centre[:, None, None] + j[None, None, :] * scale[:, None, None]
    v = (world.rows - 1) / 2 + i[None, :, None] * scale[:, None, None]
    u, v = u.expand(t, h, w), v.expand(t, h, w)
    latent = _bilinear(world.panorama, u, v)
    visible = torch.ones(t, h, w, dtype=torch.bool)
    frame = torch.arange(t)[:, None, None]
    if world.occluder is not None:
        o = world.occluder
        inside = torch.remainder(u - o.start, world.columns) < o.width
        hidden = inside & (frame >= o.first_frame) & (frame <= o.last_frame)
        latent = torch.where(hidden[None], o.colour[:, None, None, None], latent)
        visible &= ~hidden
    if world.moving is not None:
        m = world.moving
        centre_now = m.start + m.speed * frame.float()
        offset = _wrap_distance(u, centre_now, world.columns)  # columns [centre - width/2, centre + width/2)
        on = (offset >= -m.width / 2) & (offset < m.width / 2) & (v >= m.row - 0.5) & (v < m.row + m.height - 0.5)
        latent = torch.where(on[None], m.colour[:, None, None, None], latent)
        visible &= ~on
    return Rendering(latent, u, v, scale, visible)


def _bilinear(pano: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sample ``pano [C, rows, columns]`` at ``u, v [...]`` (columns wrap, rows clamp) -> ``[C, ...]``."""
    rows, cols = pano.shape[1:]
    v = v.clamp(0, rows - 1)
    u0, v0 = torch.floor(u), torch.floor(v)
    fu, fv = u - u0, v - v0
    c0, c1 = torch.remainder(u0, cols).long(), torch.remainder(u0 + 1, cols).long()
    r0, r1 = v0.long(), (v0 + 1).clamp(max=rows - 1).long()

    def at(r, c):
        return pano[:, r, c]

    top = at(r0, c0) * (1 - fu) + at(r0, c1) * fu
    bottom = at(r1, c0) * (1 - fu) + at(r1, c1) * fu
    return top * (1 - fv) + bottom * fv


def _footprint(u: float, v: float, s: float, rows: int, cols: int) -> tuple[range, list[int]]:
    """Fine coverage cells a pixel at ``(u, v)`` of zoom ``s`` looks at: a row range and wrapped column list.

    Never empty. The panorama's rows span ``[-0.5, rows - 0.5]``; a view taller than that (an orbit looks across
    the cylinder, zoom > 1) has pixels whose rows lie wholly beyond an edge. Rendering clamps them to the edge row
    (``_bilinear``), so their footprint is the fine row at that edge, as for a pixel that overlaps the edge."""
    k = COVERAGE_SUBDIV
    r_lo = min(max(0, math.floor((v - s / 2 + 0.5) * k)), rows * k - 1)
    r_hi = min(rows * k, max(r_lo + 1, math.ceil((v + s / 2 + 0.5) * k)))
    c_lo = math.floor((u - s / 2 + 0.5) * k)
    c_hi = max(c_lo + 1, math.ceil((u + s / 2 + 0.5) * k))
    return range(r_lo, r_hi), [c % (cols * k) for c in range(c_lo, c_hi)]


def _footprints(world: World, rendering: Rendering) -> list[list[tuple[range, list[int]]]]:
    """Per frame, per pixel (row-major): the fine coverage cells it looks at (``_footprint``)."""
    u, v, s = rendering.u.tolist(), rendering.v.tolist(), rendering.scale.tolist()
    t, h, w = rendering.visible.shape
    return [[_footprint(u[f][i][j], v[f][i][j], s[f], world.rows, world.columns) for i in range(h) for j in range(w)]
            for f in range(t)]


def _coverage_grid(world: World) -> torch.Tensor:
    return torch.zeros(world.rows * COVERAGE_SUBDIV, world.columns * COVERAGE_SUBDIV, dtype=torch.bool)


def seen_before(world: World, rendering: Rendering, history: int) -> torch.Tensor:
    """``[T, h, w]`` bool: for frames at and after ``history``, the pixels whose whole footprint on the panorama
    was visible (not hidden by the wall or the object) in some frame before ``history``. Frames before it are
    False. Which places the history showed, whatever the later frames show there now."""
    cells, visible = _footprints(world, rendering), rendering.visible.flatten(1).tolist()
    covered = _coverage_grid(world)
    for f in range(min(history, len(cells))):
        for (rr, cc), vis in zip(cells[f], visible[f], strict=True):
            if vis:
                covered[rr.start:rr.stop, cc] = True
    out = torch.zeros(rendering.visible.shape, dtype=torch.bool)
    for f in range(history, len(cells)):
        out[f] = torch.tensor([_all(covered[rr.start:rr.stop, cc]) for rr, cc in cells[f]]).view(out.shape[1:])
    return out


def _all(cells: torch.Tensor) -> bool:
    """Every cell set, and at least one cell: an empty footprint is never a revisit (``labels``)."""
    return bool(cells.numel()) and bool(cells.all())


def _none(cells: torch.Tensor) -> bool:
    """No cell set, and at least one cell: an empty footprint is never new (``labels``)."""
    return bool(cells.numel()) and not bool(cells.any())


def first_sight(world: World, rendering: Rendering) -> torch.Tensor:
    """``[T, h, w]`` bool: pixels whose place no earlier frame showed at all (seen or hidden): new places. An empty
    footprint is never new (``labels``)."""
    covered = _coverage_grid(world)
    out = torch.zeros(rendering.visible.shape, dtype=torch.bool)
    for f, frame in enumerate(_footprints(world, rendering)):
        out[f] = torch.tensor([_none(covered[rr.start:rr.stop, cc]) for rr, cc in frame]).view(out.shape[1:])
        for rr, cc in frame:
            covered[rr.start:rr.stop, cc] = True
    return out


LABELS = ("revisit", "new", "unlabelled")  # a partition of the generated pixels


def labels(world: World, rendering: Rendering, history: int) -> dict:
    """Per generated pixel ``[T - history, h, w]`` bool, a partition (every pixel in exactly one of ``LABELS``):

    - ``revisit``: its whole footprint was visible in the history (``seen_before``);
    - ``new``: no earlier frame showed any of its place, seen or hidden (``first_sight``);
    - ``unlabelled``: neither: part of its place was shown before, but not all of it visible in the history
      (partly seen, seen by generated frames only, or only behind the wall); and any pixel without a footprint.

    Also ``shown`` = not ``new`` (the moving object's metric: the place was shown before, whatever by)."""
    revisit = seen_before(world, rendering, history)[history:]
    new = first_sight(world, rendering)[history:] & ~revisit
    return {"revisit": revisit, "new": new, "unlabelled": ~(revisit | new), "shown": ~new}


# --- trajectories for training -------------------------------------------------------------------------------

def random_trajectory(n_frames: int, generator: torch.Generator, radius: float = 8.0,
                      new_viewpoints: bool = False) -> torch.Tensor:
    """``[n, 3, 4]`` yaw-only camera poses that wander and come back: a yaw that sweeps out and returns (a
    triangle wave of random period, amplitude and start), sometimes with a walk towards the wall and back.

    ``new_viewpoints``: the returns do not land on the poses of the way out. The way back takes another number of
    frames than the way out (the rise is 25-75% of the period), every yaw is jittered by up to
    ``VIEWPOINT_JITTER`` degrees, and a fifth of the paths instead keep turning one way through a full turn or more
    (loop closures 360 degrees later), at a step that does not divide 360."""
    g = generator

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    start, amplitude = uniform(0, 360), uniform(30, 240) * (1 if torch.rand((), generator=g) < 0.5 else -1)
    period = int(torch.randint(4, max(5, n_frames + 1), (), generator=g))
    phase = int(torch.randint(0, period, (), generator=g))
    walk = uniform(0, 0.5 * radius) if torch.rand((), generator=g) < 0.3 else 0.0
    rise, loop_step = 0.5, None
    if new_viewpoints:
        rise = uniform(0.25, 0.75)
        if torch.rand((), generator=g) < 0.2:
            loop_step = uniform(1.0, 1.6) * 360 / n_frames * (1 if torch.rand((), generator=g) < 0.5 else -1)
    poses = []
    for f in range(n_frames):
        x = ((f + phase) % period) / period
        tri = x / rise if x < rise else (1 - x) / (1 - rise)  # 0 -> 1 -> 0 over a period
        yaw = start + amplitude * tri if loop_step is None else start + loop_step * f
        if new_viewpoints:
            yaw += uniform(-VIEWPOINT_JITTER, VIEWPOINT_JITTER)
        forward = walk * tri
        y = math.radians(yaw)
        poses.append(pose_from_position([forward * math.sin(y), 0.0, forward * math.cos(y)], yaw))
    return torch.stack(poses)


def yaw_path(yaws: list[float]) -> torch.Tensor:
    """``[len(yaws), 3, 4]`` poses of a camera at the origin turned to each yaw (degrees)."""
    return torch.stack([pose_from_position([0.0, 0.0, 0.0], y) for y in yaws])


def occluded_revisit_path(step: float = 22.5, legs_out: int = 4) -> tuple[torch.Tensor, tuple[int, int],
                                                                          tuple[float, float]]:
    """The occluder's hard case: pan out 0 -> ``legs_out * step`` degrees (the world clear), back and out again while
    a wall stands over the middle band, then back once more (clear). Returns the poses ``[4 * legs_out + 1, 3, 4]``,
    the wall's frames (first, last) and its band (start column, width) for a 64-column panorama. On the last leg
    the frames with the same pose are the two walled legs: the newest, and the ones view overlap ranks first."""
    out = [i * step for i in range(legs_out + 1)]
    yaws = out + out[-2::-1] + out[1:] + out[-2::-1]
    return yaw_path(yaws), (legs_out + 1, 3 * legs_out), (4.0, 8.0)


# --- evaluation paths and metrics -----------------------------------------------------------------------------

EVALUATION_PATHS = ("pan_and_return", "walk_and_revisit", "occluder", "moving_object")
PSNR_CAP = 40.0


@dataclass
class RevisitCase:
    """A path through a world for evaluation: the first ``history`` frames are given (ground truth), the rest is
    generated. ``truth [16, T, h, w]`` (model space); ``labels``: per generated pixel ``[T - history, h, w]``,
    the partition ``revisit`` (its whole place was visible in the history), ``new`` (no earlier frame showed its
    place) and ``unlabelled`` (neither), ``shown`` (not new), and for the occluder ``band`` (revisited places the
    wall hid on the later legs). See ``labels``."""

    path: str
    world: World
    poses: torch.Tensor
    history: int
    truth: torch.Tensor
    labels: dict
    rendering: Rendering

    @property
    def generated_frames(self) -> int:
        return self.poses.shape[0] - self.history


def evaluation_case(path: str, seed: int, h: int = 8, w: int = 8, family: Family | None = None) -> RevisitCase:
    """One of ``EVALUATION_PATHS`` through the world of ``seed``: ``pan_and_return`` (180 degrees, 16 frames, 4
    given), ``walk_and_revisit`` (4 units towards the wall and back, 16 frames, 4 given), ``occluder``
    (``occluded_revisit_path``, the first 13 frames given) and ``moving_object`` (``pan_and_return`` with a block
    moving 1.5 columns per frame, the outward 8 frames given). ``family``: the world is one of that family's."""
    from .trajectory import preset

    band = None
    if path == "pan_and_return":
        world, poses, history = make_world(seed, family=family), preset("pan_and_return", 16, degrees=180.0), 4
    elif path == "walk_and_revisit":
        world, poses, history = make_world(seed, family=family), preset("walk_and_revisit", 16, distance=4.0), 4
    elif path == "occluder":
        poses, frames, band = occluded_revisit_path()
        world, history = make_world(seed, occluder=True, occluded_frames=frames, occluded_columns=band,
                                    family=family), 13
    elif path == "moving_object":
        world = make_world(seed, moving_object=True, object_speed=1.5, family=family)
        poses, history = preset("pan_and_return", 16, degrees=180.0), 8
    else:
        raise ValueError(f"unknown evaluation path {path!r}; known: {', '.join(EVALUATION_PATHS)}")
    return revisit_case(path, world, poses, history, h, w, band)


def revisit_case(path: str, world: World, poses: torch.Tensor, history: int, h: int = 8, w: int = 8,
                 band: tuple[float, float] | None = None) -> RevisitCase:
    """Any camera path ``poses [T, 3, 4]`` through ``world`` as a case: the first ``history`` frames given, the
    rest to generate, each generated pixel labelled (``labels``); with the wall's ``band`` (start column, width)
    also ``band``: the revisited pixels inside it."""
    r = render(world, poses, h, w)
    found = labels(world, r, history)
    if band is not None:
        found["band"] = found["revisit"] & (torch.remainder(r.u[history:] - band[0], world.columns) < band[1])
    return RevisitCase(path, world, poses, history, r.latent, found, r)


# --- the offset sweep: revisits from viewpoints the history did not have exactly -----------------------------

OFFSET_HISTORY_YAWS = (0.0, 45.0, 90.0, 135.0)  # 45 degrees apart: a view's width (8 columns), so they tile
BETWEEN_OFFSET = 22.5  # midway between two history poses: the farthest any revisit of the covered band can be
SWEEP_OFFSETS = (0.0, 2.0, 4.0, 8.0, 13.0, 20.0, BETWEEN_OFFSET)


SWEEP_SHIFTS = (0.5, 1.0, 2.0)  # world units sideways (the cylinder's radius is 8): the position offsets
LOOP_STEP, LOOP_OFFSET = 30.0, 15.0  # the loop: a full turn in 30-degree steps, then back 15 degrees off


def offset_revisit_path(offset: float, shift: float = 0.0) -> tuple[torch.Tensor, int]:
    """The offset sweep's path: 4 given frames pan 0 -> 135 degrees in 45-degree steps (``OFFSET_HISTORY_YAWS``,
    columns -4 .. 28 of a 64-column panorama seen once each), then 6 generated frames come back to the history's
    poses turned by ``offset`` degrees (0 <= offset <= 22.5): 135 - o, 90 + o, 90 - o, 45 + o, 45 - o, o, and moved
    ``shift`` units sideways (along each camera's x axis: parallax, which no rotation explains). With no shift every
    generated frame is ``offset`` degrees from its nearest history pose and, at 8 x 8 and zoom 1, sees only places
    the history saw (straddling two history frames once offset > 0). Returns the poses ``[10, 3, 4]`` and the
    number of given frames (4)."""
    if not 0 <= offset <= BETWEEN_OFFSET:
        raise ValueError(f"offset must be in [0, {BETWEEN_OFFSET}] degrees (beyond, another history pose is nearer),"
                         f" got {offset}")
    a, b, c, d = OFFSET_HISTORY_YAWS
    later = [d - offset, c + offset, c - offset, b + offset, b - offset, a + offset]
    moved = [pose_from_position([shift * math.cos(math.radians(y)), 0.0, -shift * math.sin(math.radians(y))], y)
             for y in later]
    return torch.cat([yaw_path(list(OFFSET_HISTORY_YAWS)), torch.stack(moved)]), len(OFFSET_HISTORY_YAWS)


def loop_revisit_path() -> tuple[torch.Tensor, int]:
    """A loop closure: 12 given frames turn a full circle in ``LOOP_STEP`` (30) degree steps (0 .. 330), then 6
    generated frames come round again ``LOOP_OFFSET`` (15) degrees off the first turn's poses (375 .. 525, so 15 ..
    165): each midway between two history poses, 360 degrees after them. Returns the poses ``[18, 3, 4]`` and the
    number of given frames (12)."""
    given = [i * LOOP_STEP for i in range(int(360 / LOOP_STEP))]
    later = [360 + LOOP_OFFSET + i * LOOP_STEP for i in range(6)]
    return yaw_path(given + later), len(given)


def offset_case(seed: int, offset: float, h: int = 8, w: int = 8, shift: float = 0.0) -> RevisitCase:
    """The offset sweep's case (``offset_revisit_path``) through the world of ``seed`` (path ``offset_sweep``)."""
    poses, history = offset_revisit_path(offset, shift)
    return revisit_case("offset_sweep", make_world(seed), poses, history, h, w)


def loop_case(seed: int, h: int = 8, w: int = 8) -> RevisitCase:
    """The loop closure (``loop_revisit_path``) through the world of ``seed`` (path ``loop``)."""
    poses, history = loop_revisit_path()
    return revisit_case("loop", make_world(seed), poses, history, h, w)


# --- long rollouts: revisits long after, from new viewpoints, within a bounded context -------------------------

LONG_PATHS = ("long_pan", "long_occluder", "long_moving_object")
LONG_STEP = 22.5  # degrees between frames of a lap: 16 frames a turn, each place seen by about two frames
LONG_OFFSETS = (11.25, -5.0)  # the later laps' yaw offsets from the first lap's poses (the second midway)
OCCLUDER_THIRD_OFFSET = 14.25  # long_occluder's third lap: 3 degrees from the walled lap, 8.25 from the clear one


def lap(start: float, offset: float = 0.0, backwards: bool = False) -> list[float]:
    """The yaws (degrees) of one full turn in ``LONG_STEP`` steps from ``start + offset``, backwards or not."""
    n = int(round(360 / LONG_STEP))
    return [start + offset + (-i if backwards else i) * LONG_STEP for i in range(n)]


def long_case(path: str, seed: int, h: int = 8, w: int = 8) -> RevisitCase:
    """One of ``LONG_PATHS``, 48 frames (three turns) through the world of ``seed``, each place revisited 16 to
    32 frames after the history saw it (15 for the first generated frame) and never from a history pose (3 to
    11.25 degrees off, ``LONG_OFFSETS``):

    - ``long_pan``: the first turn given (16 frames), then a turn 11.25 degrees off (midway between two history
      poses) and one back the other way 5 degrees off; 32 generated frames;
    - ``long_occluder``: the first two turns given (32 frames), a wall over columns 4-12 during the second; the
      third turn, the wall gone, comes round 14.25 degrees off the first turn's poses, so the history frames
      whose view overlaps it most are the second turn's, which saw the wall (``band``: the revisited pixels in
      the wall's columns; view overlap ranks the wrong frames first, as on ``occluder``);
    - ``long_moving_object``: ``long_pan`` with a block moving 1.5 columns per frame (``shown``)."""
    first = lap(0.0)
    second, third = lap(360.0, LONG_OFFSETS[0]), lap(1080.0, LONG_OFFSETS[1], backwards=True)
    if path == "long_occluder":
        third = lap(720.0, OCCLUDER_THIRD_OFFSET)
    poses = yaw_path(first + second + third)
    band = None
    if path == "long_pan":
        world, history = make_world(seed), len(first)
    elif path == "long_occluder":
        band = (4.0, 8.0)
        world = make_world(seed, occluder=True, occluded_frames=(len(first), 2 * len(first) - 1),
                           occluded_columns=band)
        history = 2 * len(first)
    elif path == "long_moving_object":
        world, history = make_world(seed, moving_object=True, object_speed=1.5), len(first)
    else:
        raise ValueError(f"unknown long path {path!r}; known: {', '.join(LONG_PATHS)}")
    return revisit_case(path, world, poses, history, h, w, band)


def nearest_history_offset(case: RevisitCase) -> torch.Tensor:
    """``[T - history]``: degrees between each generated frame's viewing direction and the nearest history
    frame's."""
    d = F.normalize(case.poses[:, :, 2].double(), dim=-1)
    cos = (d[case.history:] @ d[:case.history].T).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos)).amin(1)


def nearest_history_distance(case: RevisitCase) -> torch.Tensor:
    """``[T - history]``: world units between each generated frame's camera and the nearest history camera."""
    p = case.poses[:, :, 3].double()
    return torch.cdist(p[case.history:], p[:case.history]).amin(1)


def oracle_prediction(case: RevisitCase) -> torch.Tensor:
    """``[16, T - history, h, w]``: the world itself wherever the history saw the place, the mean (0) elsewhere;
    what a perfect memory and no imagination would give. A check of the metric: it must score highest on
    revisits."""
    r, k = case.rendering, case.history
    world = _bilinear(case.world.panorama, r.u[k:], r.v[k:])
    return torch.where(case.labels["revisit"][None], world, torch.zeros_like(world))


def copy_nearest_prediction(case: RevisitCase) -> torch.Tensor:
    """``[16, T - history, h, w]``: each generated frame is a copy of the history frame whose view overlaps its
    pose most (``context_policy.overlap_matrix``, the ``fov`` policy's measure; ties: the newest), unshifted. A
    rule with no learning: exact on a revisit of a history pose, and no better than what overlaps by chance once
    the pose moves."""
    k = case.history
    if k == 0:
        raise ValueError("copy_nearest needs at least one history frame")
    score = overlap_matrix(case.poses[:k], case.poses[k:]).round(decimals=6)  # [k, T - k]; equal poses tie exactly
    newest_first = score.flip(0).argmax(0)  # argmax takes the first of equal maxima: the newest
    return case.truth[:, (k - 1 - newest_first).tolist()].clone()


def family_mean_prediction(case: RevisitCase, family: Family) -> torch.Tensor:
    """``[16, T - history, h, w]``: the family's mean colour everywhere; the best guess under squared error that
    knows the family and nothing of this world (a ceiling for a prior alone on new places)."""
    shape = case.truth[:, case.history:].shape
    return family.mean[:, None, None, None].expand(shape).clone()


def squared_error(prediction: torch.Tensor, case: RevisitCase) -> torch.Tensor:
    """Per generated pixel ``[T - history, h, w]``: squared error averaged over the 16 channels (model space)."""
    return (prediction.float() - case.truth[:, case.history:]).pow(2).mean(0)


def psnr(error_sum: float, count: int, cap: float = PSNR_CAP) -> float | None:
    """``10 log10(1 / MSE)`` (the world has unit variance: 0 dB is predicting the mean), capped so an exact copy
    has a number, and floored at -300 dB so an error that overflows (a latent of 3e38) still has one; None when
    no pixel counted."""
    if count == 0:
        return None
    mse = error_sum / count
    mse = min(max(mse, 1e-30), 1e30) if math.isfinite(mse) else 1e30
    return round(min(cap, 10 * math.log10(1 / mse)), 2)


def side_by_side(latents: list[torch.Tensor], factors: torch.Tensor, bias: torch.Tensor, gap: int = 4) -> torch.Tensor:
    """Model-space latents ``[16, T, h, w]`` each -> RGB frames ``[T, 8h, n*8w + (n-1)*gap, 3]``: the videos next
    to each other (``latent_to_rgb``), white ``gap`` columns between them."""
    rgb = [latent_to_rgb(x, factors, bias) for x in latents]
    white = torch.ones(*rgb[0].shape[:2], gap, 3)
    return torch.cat([part for x in rgb for part in (x, white)][:-1], 2)


def latent_to_rgb(latent: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor, upscale: int = 8) -> torch.Tensor:
    """Model-space latents ``[16, T, h, w]`` -> RGB frames ``[T, h*upscale, w*upscale, 3]`` in ``[0, 1]`` through
    linear preview factors ``[16, 3]`` and ``bias [3]`` (a host's latent-to-RGB preview), nearest upscaled so one
    latent pixel is a visible square."""
    rgb = torch.einsum("cthw,cr->thwr", latent.float(), factors.float()) + bias.float()
    rgb = ((rgb + 1) / 2).clamp(0, 1)
    return rgb.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
