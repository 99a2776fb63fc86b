"""ViZDoom geometry: Doom poses in OpenCV axes, the renderer's intrinsics and depth, and which pixels were seen before."""

import math

import pytest
import torch

from memlearner_core.doom_geometry import (
    backproject,
    depth_to_z,
    doom_pose,
    doom_poses,
    intrinsics,
    project,
    seen_before,
    seen_by_earlier,
    unit_scale,
)

W, H = 160, 120
K = intrinsics(W, H)
TOL = 0.01


def wall_z(yaw_deg, position=(0.0, 0.0, 0.0), wall_x=10.0):
    """Analytic z-depth ``[H, W]`` of the plane x = ``wall_x`` (east of the camera), independent of backproject:
    the ray of pixel centre (u + 0.5, v + 0.5) is forward + a right + b down, a = (u + 0.5 - 80) / 80,
    b = (v + 0.5 - 60) / 96, and its z-depth is the distance along forward to the plane."""
    yaw = math.radians(yaw_deg)
    a = (torch.arange(W, dtype=torch.float64) + 0.5 - 80) / 80
    ray_x = math.cos(yaw) + a * math.sin(yaw)  # right's x is sin(yaw); down has no x
    return ((wall_x - position[0]) / ray_x).expand(H, W).to(torch.float32)


def wall_points(yaw_deg, wall_x=10.0):
    """World y and z ``[H, W]`` of the wall point each pixel of a camera at the origin, turned ``yaw_deg``, sees."""
    yaw = math.radians(yaw_deg)
    a = ((torch.arange(W, dtype=torch.float64) + 0.5 - 80) / 80).expand(H, W)
    b = ((torch.arange(H, dtype=torch.float64) + 0.5 - 60) / 96)[:, None].expand(H, W)
    s = wall_x / (math.cos(yaw) + a * math.sin(yaw))
    return s * (math.sin(yaw) - a * math.cos(yaw)), -s * b


def axes(pose):
    return {"right": pose[:, 0], "down": pose[:, 1], "forward": pose[:, 2]}


def test_a_camera_at_yaw_0_looks_east_with_right_south_and_down_down():
    got = axes(doom_pose(1.0, 2.0, 3.0, 0.0))
    for name, want in {"forward": [1, 0, 0], "right": [0, -1, 0], "down": [0, 0, -1]}.items():
        torch.testing.assert_close(got[name], torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=0)


def test_the_translation_is_the_camera_position():
    torch.testing.assert_close(doom_pose(1.0, 2.0, 3.0, 37.0)[:, 3], torch.tensor([1.0, 2.0, 3.0]))


def test_a_camera_at_yaw_90_looks_north():
    torch.testing.assert_close(axes(doom_pose(0, 0, 0, 90.0))["forward"], torch.tensor([0.0, 1.0, 0.0]),
                               atol=1e-6, rtol=0)


def test_rotations_are_orthonormal_with_determinant_1_for_random_yaws():
    r = doom_poses(torch.randn(50, 3) * 100, torch.rand(50) * 720 - 360)[:, :, :3].double()
    torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand_as(r), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(50, dtype=torch.float64), atol=1e-6, rtol=0)


def test_doom_poses_stacks_doom_pose():
    xyz, yaw = torch.randn(4, 3), torch.rand(4) * 360
    want = torch.stack([doom_pose(*p.tolist(), a.item()) for p, a in zip(xyz, yaw, strict=True)])
    torch.testing.assert_close(doom_poses(xyz, yaw), want)


def test_intrinsics_at_160x120():
    torch.testing.assert_close(K, torch.tensor([[80.0, 0, 80], [0, 96, 60], [0, 0, 1]], dtype=torch.float64))


def horizontal_fov(width, height):
    k = intrinsics(width, height)
    return math.degrees(2 * math.atan(k[0, 2].item() / k[0, 0].item()))


def test_the_horizontal_fov_is_90_degrees_at_4_3():
    assert horizontal_fov(640, 480) == pytest.approx(90.0)


def test_the_horizontal_fov_is_wider_at_16_9_as_2_atan_of_0_75_w_over_h():
    assert horizontal_fov(640, 360) == pytest.approx(math.degrees(2 * math.atan(0.75 * 640 / 360)))
    assert horizontal_fov(640, 360) > 90


def test_a_point_straight_ahead_projects_to_the_image_centre_at_its_distance():
    pose = doom_pose(5.0, -3.0, 41.0, 30.0)
    uv, z = project(pose[:, 3] + 250.0 * pose[:, 2], K, pose)
    torch.testing.assert_close(uv, torch.tensor([W / 2, H / 2]), atol=1e-4, rtol=0)
    assert z.item() == pytest.approx(250.0)


def test_a_point_to_the_cameras_right_projects_right_of_the_centre():
    pose = doom_pose(0, 0, 0, 120.0)
    uv, _ = project(100 * pose[:, 2] + 20 * pose[:, 0], K, pose)
    assert uv[0] > W / 2


def test_a_point_above_projects_above_the_centre():
    pose = doom_pose(0, 0, 0, 120.0)
    uv, _ = project(100 * pose[:, 2] + torch.tensor([0.0, 0.0, 20.0]), K, pose)
    assert uv[1] < H / 2


def test_backproject_then_project_returns_every_pixel_centre_and_its_depth():
    pose = doom_pose(*(torch.randn(3) * 300).tolist(), 360 * torch.rand(()).item())
    z = 10 + 500 * torch.rand(H, W)
    uv, z_back = project(backproject(z, K, pose), K, pose)
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    torch.testing.assert_close(uv, torch.stack([u, v], dim=-1), atol=1e-3, rtol=0)
    torch.testing.assert_close(z_back, z, atol=1e-3, rtol=1e-5)


def test_depth_to_z_is_7_14_times_the_step_centre_plus_3():
    z = depth_to_z(torch.tensor([[0, 10]], dtype=torch.uint8))
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, torch.tensor([[6.57, 77.97]]))


def test_unit_scale_scales_the_translation_and_keeps_the_rotation():
    poses = doom_poses(torch.randn(3, 3) * 64, torch.rand(3) * 360)
    scaled = unit_scale(poses, 1 / 64)
    torch.testing.assert_close(scaled[..., :3], poses[..., :3])
    torch.testing.assert_close(scaled[..., 3], poses[..., 3] / 64)


def test_wall_points_inside_the_first_view_are_seen_before_and_those_beyond_its_edge_are_not():
    z = torch.stack([wall_z(0.0), wall_z(10.0)])  # turned left (towards north) by 10 degrees
    seen = seen_before(z, doom_poses(torch.zeros(2, 3), torch.tensor([0.0, 10.0])), K, 1, TOL)[0]
    y, up = wall_points(10.0)  # the first view sees |y| < 10 and |up| < 10 * 60 / 96 of the wall
    assert seen[(y.abs() < 9.5) & (up.abs() < 6.0)].all()
    assert not seen[y > 10.5].any()
    assert seen.any() and not seen.all()


def test_a_repeated_frame_is_seen_before_everywhere():
    pose = doom_pose(*(torch.randn(3) * 300).tolist(), 360 * torch.rand(()).item())
    z = (10 + 500 * torch.rand(H, W)).expand(2, H, W)
    assert seen_before(z, pose.expand(2, 3, 4), K, 1, TOL).all()


def sidestep():
    """Frame 0 at the origin, frame 1 one map unit south (its right), both looking east at the wall x = 10: a
    frame-1 pixel sees what frame 0 shows 8 pixels (fx / 10) further right, at the same depth 10."""
    return torch.full((2, H, W), 10.0), doom_poses(torch.tensor([[0.0, 0, 0], [0, -1, 0]]), torch.zeros(2))


def expected_sidestep(blocked=None):
    want = torch.ones(H, W, dtype=torch.bool)
    want[:, W - 8:] = False  # beyond frame 0's right edge
    if blocked is not None:
        want[blocked] = False
    return want


BLOCK, BLOCK_SEEN_FROM_1 = (slice(30, 70), slice(50, 90)), (slice(30, 70), slice(42, 82))


def test_a_point_behind_an_occluder_the_history_frame_recorded_is_not_seen_before():
    z, poses = sidestep()
    z[0][BLOCK] = 6.0  # something nearer than the wall stood there
    seen = seen_before(z, poses, K, 1, TOL)[0]
    assert torch.equal(seen, expected_sidestep(BLOCK_SEEN_FROM_1))


def test_without_the_occluder_the_same_points_are_seen_before():
    z, poses = sidestep()
    assert torch.equal(seen_before(z, poses, K, 1, TOL)[0], expected_sidestep())


def test_a_recorded_depth_farther_than_the_point_beyond_tolerance_does_not_confirm_it():
    z, poses = sidestep()
    z[0][BLOCK] = 10.0 * (1 + 2 * TOL)
    assert torch.equal(seen_before(z, poses, K, 1, TOL)[0], expected_sidestep(BLOCK_SEEN_FROM_1))


def test_a_recorded_depth_within_tolerance_confirms_the_point():
    z, poses = sidestep()
    z[0][BLOCK] = 10.0 * (1 + TOL / 2)
    assert torch.equal(seen_before(z, poses, K, 1, TOL)[0], expected_sidestep())


def test_points_behind_the_history_camera_are_never_seen_before():
    z = torch.stack([torch.full((H, W), 10.0), wall_z(180.0, wall_x=-10.0)])  # frame 1 looks west
    assert not seen_before(z, doom_poses(torch.zeros(2, 3), torch.tensor([0.0, 180.0])), K, 1, TOL).any()


def test_points_projecting_outside_the_history_image_are_never_seen_before():
    z = torch.stack([torch.full((H, W), 10.0), torch.full((H, W), 30.0)])  # frame 1 looks north at the wall y = 30
    assert not seen_before(z, doom_poses(torch.zeros(2, 3), torch.tensor([0.0, 90.0])), K, 1, TOL).any()


def test_only_frames_of_the_given_history_confirm_a_point():
    z, poses = torch.full((3, H, W), 10.0), torch.zeros(3, 3, 4)
    z[:2], poses[:2] = sidestep()
    z[0] = 6.0  # frame 0 saw something nearer everywhere; frame 1 (generated, not history) saw the wall
    poses[2] = poses[1]
    seen = seen_before(z, poses, K, 1, TOL)
    assert seen.shape == (2, H, W) and not seen.any()


def test_invalid_pixels_are_never_seen_before():
    z, poses = sidestep()
    valid = torch.ones(2, H, W, dtype=torch.bool)
    valid[1][BLOCK] = False
    assert torch.equal(seen_before(z, poses, K, 1, TOL, valid)[0], expected_sidestep(BLOCK))


def test_an_invalid_recorded_depth_never_confirms():
    z, poses = sidestep()
    valid = torch.ones(2, H, W, dtype=torch.bool)
    valid[0][BLOCK] = False  # e.g. sky in frame 0
    assert torch.equal(seen_before(z, poses, K, 1, TOL, valid)[0], expected_sidestep(BLOCK_SEEN_FROM_1))


def test_seen_by_earlier_is_all_false_in_frame_0():
    z, poses = sidestep()
    assert not seen_by_earlier(z, poses, K, TOL)[0].any()


def test_seen_by_earlier_is_all_true_in_a_repeated_frame():
    z = wall_z(25.0).expand(3, H, W)
    seen = seen_by_earlier(z, doom_pose(0, 0, 0, 25.0).expand(3, 3, 4), K, TOL)
    assert seen[1:].all()


def test_seen_by_earlier_is_seen_before_with_all_earlier_frames_as_history():
    yaws = torch.tensor([0.0, 10.0, -15.0, 30.0])
    z = torch.stack([wall_z(a.item()) for a in yaws])
    poses = doom_poses(torch.zeros(4, 3), yaws)
    earlier = seen_by_earlier(z, poses, K, TOL)
    for t in range(1, 4):
        assert torch.equal(earlier[t], seen_before(z[:t + 1], poses[:t + 1], K, t, TOL)[0])
    assert earlier[3].any() and not earlier[3].all()
