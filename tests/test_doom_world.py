"""The Doom world: ViZDoom renders at exact read-back poses, clean frames, plausible depth, revisit paths."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from memlearner_core.doom_geometry import doom_poses, intrinsics, seen_before
from memlearner_core.doom_world import (
    HEIGHT,
    HELD_OUT_MAPS,
    TRAIN_MAPS,
    WIDTH,
    DoomRenderer,
    revisit_path,
    wrap180,
)

SKIP = "the Doom world needs vizdoom: pip install 'comfyui-memlearner[doom]'"
K = intrinsics(WIDTH, HEIGHT)
TOLERANCE = 0.1  # relative depth tolerance of seen_before: 4 units of quantisation at Z = 40, floors' ~10 at 100


@pytest.fixture(scope="module")
def map01():
    pytest.importorskip("vizdoom", reason=SKIP)
    with DoomRenderer("MAP01") as renderer:
        yield renderer


def test_maps_split_map01_to_map32():
    assert not set(TRAIN_MAPS) & set(HELD_OUT_MAPS)
    assert sorted(TRAIN_MAPS + HELD_OUT_MAPS) == [f"MAP{i:02d}" for i in range(1, 33)]


def test_clip_shapes_and_read_back_poses(map01):
    points = map01.walkable_points(5, 24.0, 40.0, torch.Generator().manual_seed(1))
    yaws = [10.0, 100.5, 200.25, 300.0, 359.0]
    clip = map01.render(points, yaws)
    t = len(points)
    for name, shape, dtype in (("rgb", (t, HEIGHT, WIDTH, 3), torch.uint8), ("depth", (t, HEIGHT, WIDTH), torch.float32),
                               ("labels", (t, HEIGHT, WIDTH), torch.uint8), ("moving", (t, HEIGHT, WIDTH), torch.bool),
                               ("sky", (t, HEIGHT, WIDTH), torch.bool), ("positions", (t, 3), torch.float64),
                               ("yaws", (t,), torch.float64), ("poses", (t, 3, 4), torch.float32)):
        value = getattr(clip, name)
        assert (tuple(value.shape), value.dtype) == (shape, dtype), name
    assert clip.map_name == "MAP01"
    assert clip.positions[:, :2].tolist() == [[int(x), int(y)] for x, y in points]
    assert max(abs(wrap180(got - want)) for got, want in zip(clip.yaws.tolist(), yaws, strict=True)) < 0.01
    assert torch.equal(clip.poses, doom_poses(clip.positions, clip.yaws))
    assert not clip.moving.any()  # monsters off


class HudRenderer(DoomRenderer):
    def _configure(self, game):
        game.set_render_hud(True)
        game.set_render_weapon(True)


def test_no_hud_in_the_bottom_rows(map01):
    """The same pose with the status bar and weapon on differs in most of the bottom 20 rows (the status bar also
    shrinks the 3D view, so everything differs); without them those rows show the floor (label 1)."""
    pose = ([map01.start], [45.0])
    clip = map01.render(*pose)
    clean = clip.rgb[0]
    with HudRenderer("MAP01") as hud_renderer:
        hud = hud_renderer.render(*pose).rgb[0]
    differs = (clean != hud).any(-1)
    assert differs[-20:].float().mean() > 0.5
    assert (clip.labels[0, -20:] == 1).float().mean() > 0.9


def test_same_pose_twice_renders_the_same(map01):
    points = map01.walkable_points(4, 24.0, 40.0, torch.Generator().manual_seed(2))
    clip = map01.render(points + points[:1], [30.0, 120.0, 250.0, 330.0, 30.0])
    assert (clip.rgb[0] == clip.rgb[-1]).all(-1).float().mean() >= 0.999
    assert torch.equal(clip.depth[0], clip.depth[-1])


def ray_distance(obstacles, x, y, yaw_deg):
    """Distance from (x, y) along yaw to the nearest blocking segment (inf if none)."""
    dx, dy = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    x1, y1, x2, y2 = obstacles.T
    ex, ey = x2 - x1, y2 - y1
    denom = dx * ey - dy * ex
    with np.errstate(divide="ignore", invalid="ignore"):
        t = ((x1 - x) * ey - (y1 - y) * ex) / denom  # along the ray
        s = ((x1 - x) * dy - (y1 - y) * dx) / denom  # along the segment
    hits = t[(np.abs(denom) > 1e-9) & (t > 0) & (s >= 0) & (s <= 1)]
    return float(hits.min()) if hits.size else math.inf


def test_depth_is_plausible(map01):
    """All depth finite and positive; facing the nearest wall (by ray-casting the map's blocking lines) the centre
    pixel is a wall at that distance (within 16 units: ±4 quantisation plus the ray hitting a line's endpoint
    region) and nearer than the centre of the frame turned 180 degrees, whose wall is at least twice as far."""
    x, y = map01.start
    yaws = [22.5 * i for i in range(16)]
    distances = [ray_distance(map01.obstacles, x, y, yaw) for yaw in yaws]
    near = min(range(16), key=lambda i: distances[i] / min(distances[(i + 8) % 16], 1e4))
    assert distances[(near + 8) % 16] > 2 * distances[near]
    clip = map01.render([map01.start] * 2, [yaws[near], yaws[(near + 8) % 16]])
    assert torch.isfinite(clip.depth).all() and (clip.depth > 0).all()
    centre = clip.depth[:, HEIGHT // 2, WIDTH // 2]
    assert clip.labels[0, HEIGHT // 2, WIDTH // 2] == 0
    assert abs(centre[0].item() - distances[near]) < 16
    assert centre[0] < centre[1]


def test_seen_before_on_a_turn(map01):
    """Coming back over the first quarter of a circle 7 degrees off shows what the circle saw; the frame at 180
    degrees shares nothing with the frame at 0 (90 degree field of view)."""
    n = 16
    points, yaws = revisit_path(map01, "turn", n, torch.Generator().manual_seed(0))
    assert len(points) == n + n // 4 and len(set(points)) == 1
    clip = map01.render(points, yaws)
    valid = ~clip.sky
    seen = seen_before(clip.depth, clip.poses, K, n, TOLERANCE, valid)
    assert (seen.sum((1, 2)) / valid[n:].sum((1, 2))).min() > 0.7
    pair = [0, n // 2]
    alone = seen_before(clip.depth[pair], clip.poses[pair], K, 1, TOLERANCE, valid[pair])
    assert alone.sum() / valid[n // 2].sum() < 0.2


def test_out_and_back_returns_beside_its_way_out(map01):
    n = 10
    points, yaws = revisit_path(map01, "out_and_back", n, torch.Generator().manual_seed(3))
    assert len(points) == len(yaws) == 2 * n
    out, back = np.array(points[:n]), np.array(points[n:][::-1])
    assert (np.hypot(*(out - back).T) <= 8 + 1).all()  # 8 units sideways, both ends rounded to integers


def test_point_outside_the_map_is_refused(map01):
    with pytest.raises(ValueError, match=r"100000.*MAP01"):
        map01.render([(100000.0, 100000.0)], [0.0])


def test_import_does_not_import_vizdoom():
    code = "import sys, memlearner_core.doom_world; assert 'vizdoom' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
