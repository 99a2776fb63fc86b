"""Doom clips as a user's training data: videos, captions and poses that memlearner-train's video-folder path reads."""

import math

import pytest
import torch

from memlearner_core import doom_clips as dc
from memlearner_core.doom_geometry import doom_poses
from memlearner_core.doom_world import HEIGHT, WIDTH, DoomClip
from memlearner_core.training.dataset import ClipFolder, load_poses

import host

SKIP = "the Doom world needs vizdoom: pip install 'comfyui-memlearner[doom]'"


def synthetic_clip(frames: int = 9) -> DoomClip:
    """A clip with a known path (a walk east while turning left 10 degrees a frame) and a smooth picture."""
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([[100.0 + 16 * i, 50.0, 41.0] for i in range(frames)], dtype=torch.float64)
    yaws = torch.tensor([10.0 * i for i in range(frames)], dtype=torch.float64)
    base = torch.rand(1, 3, 12, 16, generator=g)
    rgb = torch.nn.functional.interpolate(base, size=(HEIGHT, WIDTH), mode="bilinear")
    rgb = (rgb.permute(0, 2, 3, 1).expand(frames, -1, -1, -1) * 255).round().to(torch.uint8).contiguous()
    zeros = torch.zeros(frames, HEIGHT, WIDTH)
    return DoomClip(rgb=rgb, depth=zeros + 100, labels=zeros.to(torch.uint8), moving=zeros.bool(), sky=zeros.bool(),
                    positions=positions, yaws=yaws, poses=doom_poses(positions, yaws), map_name="MAP01")


def test_relative_poses_put_the_first_camera_at_the_origin_and_scale_the_translation():
    clip = synthetic_clip()
    rel = dc.relative_poses(clip.poses)
    assert torch.allclose(rel[0], torch.eye(3, 4), atol=1e-6)
    # frame 1: 16 map units east of frame 0, which faces east (OpenCV z forward): 16 / 256 straight ahead
    assert torch.allclose(rel[1, :, 3], torch.tensor([0.0, 0.0, 16 * dc.POSE_SCALE]), atol=1e-6)
    # and turned 10 degrees left: its forward axis, seen from frame 0, points 10 degrees to the left (-x)
    forward = rel[1, :, 2]
    assert math.degrees(math.atan2(-float(forward[0]), float(forward[2]))) == pytest.approx(10.0, abs=1e-4)


def test_a_written_clip_is_a_captioned_video_with_one_pose_per_frame(tmp_path, comfy):
    clip = synthetic_clip()
    video = dc.write_clip(tmp_path, "walk", clip, history=4)
    frames = host.pack("nodes.comfy_adapter").read_video(video)  # ComfyUI's own reader
    assert frames.shape == (9, HEIGHT, WIDTH, 3)
    assert (frames - clip.rgb.float() / 255).abs().mean() < 0.02  # H.264 at crf 12
    assert (tmp_path / "walk.txt").read_text().strip() == dc.CAPTION
    assert torch.allclose(load_poses(tmp_path / "walk.poses.json"), dc.relative_poses(clip.poses), atol=1e-5)
    assert not (tmp_path / f"walk{dc.GEOMETRY_SUFFIX}").exists()  # training clips carry no geometry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["walk.mp4", "walk.poses.json", "walk.txt"]


def test_an_evaluated_clip_keeps_its_exact_render_and_geometry(tmp_path):
    clip = synthetic_clip()
    video = dc.write_clip(tmp_path, "eval", clip, history=5, geometry=True)
    geom = dc.read_geometry(video)
    assert torch.equal(geom.rgb, clip.rgb) and torch.equal(geom.depth, clip.depth)
    assert torch.equal(geom.poses, clip.poses) and (geom.map_name, geom.history) == ("MAP01", 5)


def test_the_training_reader_takes_the_folder_with_latent_frame_poses(tmp_path):
    dc.write_clip(tmp_path, "a", synthetic_clip(9), history=4)
    clips = ClipFolder(tmp_path, 9, 128, 96)
    assert [e.path.name for e in clips] == ["a.mp4"]
    assert clips.clip_poses(clips[0], 9).shape == (3, 3, 4)  # video frames 0, 4, 8


def test_a_failed_video_write_leaves_no_file(tmp_path):
    import av

    bad = torch.zeros(3, 7, 9, 3, dtype=torch.uint8)  # odd sizes: yuv420p refuses them
    with pytest.raises(av.error.FFmpegError):
        dc.write_video(tmp_path / "bad.mp4", bad)
    assert list(tmp_path.iterdir()) == []


def test_the_training_plan_draws_only_from_the_maps_it_is_given():
    plan = dc.training_plan(("MAP01", "MAP02"), 50, seed=3)
    assert {p["map"] for p in plan} == {"MAP01", "MAP02"}
    assert {p["kind"] for p in plan} == set(dc.TRAINING_KINDS)
    assert plan == dc.training_plan(("MAP01", "MAP02"), 50, seed=3)


@pytest.fixture(scope="module")
def map01():
    pytest.importorskip("vizdoom", reason=SKIP)
    from memlearner_core.doom_world import DoomRenderer

    with DoomRenderer("MAP01") as renderer:
        yield renderer


def test_a_turn_comes_back_off_the_way_out(map01):
    path = dc.evaluation_path(map01, "turn", torch.Generator().manual_seed(0), history=29)
    assert len(path.points) == dc.FRAMES and len(set(path.points)) == 1
    step = (path.yaws[1] - path.yaws[0]) % 360
    assert step in (pytest.approx(7.5), pytest.approx(352.5))
    # the return frame k passes the way-out frame history - 1 - k, 7 degrees further along the way out
    k = 5
    back, out = path.yaws[path.history + k], path.yaws[path.history - 2 - k]
    assert abs((back - out + 180) % 360 - 180) == pytest.approx(7.0, abs=1e-6)


def test_a_retrace_walks_back_beside_the_way_out_facing_the_way_out(map01):
    path = dc.evaluation_path(map01, "retrace", torch.Generator().manual_seed(0), history=29)
    assert len(path.points) == dc.FRAMES
    out, back = path.points[:path.history], path.points[path.history:]
    k = 3
    twin = out[path.history - 2 - k]
    assert math.dist(back[k], twin) <= dc.SIDE_SHIFT + 1.5  # beside it, not on it or far away
    assert path.yaws[path.history + k] == pytest.approx(path.yaws[path.history - 2 - k])


def test_write_plan_renders_each_clip_once(tmp_path, map01):
    plan = dc.training_plan(("MAP01",), 2, seed=0)
    written, given_up = dc.write_plan(tmp_path, plan, frames=9)
    assert (written, given_up) == (2, [])
    assert dc.write_plan(tmp_path, plan, frames=9) == (0, [])
    assert len(list(tmp_path.glob("*.mp4"))) == 2
