"""Camera trajectories: poses from position and angles, the revisiting presets, and the JSON a user types."""

import json
import math

import pytest
import torch

from memlearner_core.trajectory import (
    PRESETS,
    TrajectoryError,
    parse_trajectory,
    pose_from_position,
    preset,
    preset_names,
    trajectory_json,
)

IDENTITY = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]


def forward(poses):
    """Viewing directions ``[..., 3]``: the third column of R."""
    return poses[..., :, 2]


def assert_rotations(poses):
    r = poses[:, :, :3].double()
    torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand_as(r),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(len(r), dtype=torch.float64),
                               atol=1e-5, rtol=0)


def raises(text, *words, n_frames=None):
    with pytest.raises(TrajectoryError) as e:
        parse_trajectory(text, n_frames)
    for word in words:
        assert word in str(e.value), str(e.value)


# --- poses from position and angles -------------------------------------------------------------------------

def test_pose_without_turning_looks_along_plus_z_from_its_position():
    pose = pose_from_position([1.0, 2.0, 3.0], 0.0)
    assert pose.shape == (3, 4) and pose.dtype == torch.float32
    torch.testing.assert_close(pose, torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 2], [0, 0, 1, 3]]))


def test_positive_yaw_turns_the_view_from_plus_z_towards_plus_x():
    torch.testing.assert_close(forward(pose_from_position([0, 0, 0], 90.0)), torch.tensor([1.0, 0, 0]),
                               atol=1e-6, rtol=0)
    f = forward(pose_from_position([0, 0, 0], 30.0))
    assert f[0] > 0 and f[2] > 0


def test_positive_pitch_looks_up_towards_minus_y():
    f = forward(pose_from_position([0, 0, 0], 0.0, 30.0))
    torch.testing.assert_close(f, torch.tensor([0.0, -0.5, math.sqrt(3) / 2]), atol=1e-6, rtol=0)


def test_yawing_keeps_the_camera_level():
    right = pose_from_position([0, 0, 0], 57.0)[:, 0]
    assert abs(right[1].item()) < 1e-7  # roll 0: the x axis stays horizontal


# --- presets ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("n", [1, 2, 7, 12])
def test_every_preset_returns_n_frames_of_rotations(name, n):
    poses = preset(name, n)
    assert poses.shape == (n, 3, 4) and poses.dtype == torch.float32
    assert_rotations(poses)


def test_preset_names_are_the_sorted_registry():
    assert preset_names() == sorted(PRESETS) == ["orbit", "pan_and_return", "walk_and_revisit"]


@pytest.mark.parametrize("n", [2, 5, 8])
def test_pan_and_return_ends_looking_where_it_started(n):
    poses = preset("pan_and_return", n)
    torch.testing.assert_close(poses[-1], poses[0], atol=1e-6, rtol=0)


def test_pan_and_return_stays_at_the_origin_and_reaches_its_angle_halfway():
    poses = preset("pan_and_return", 9, degrees=60.0)
    assert poses[:, :, 3].abs().max() == 0
    torch.testing.assert_close(forward(poses[4]), forward(pose_from_position([0, 0, 0], 60.0)))


@pytest.mark.parametrize("n", [6, 7, 16])
def test_walk_and_revisit_last_frames_have_the_first_frames_poses(n):
    poses = preset("walk_and_revisit", n)
    torch.testing.assert_close(poses.flip(0), poses, atol=0, rtol=0)  # frame n-1-i is frame i


def test_walk_and_revisit_walks_distance_along_plus_z_always_facing_plus_z():
    poses = preset("walk_and_revisit", 9, distance=2.0)
    torch.testing.assert_close(poses[:, :, 3], torch.tensor([[0, 0, z] for z in
                                                             [0, .5, 1, 1.5, 2, 1.5, 1, .5, 0]]))
    torch.testing.assert_close(forward(poses), torch.tensor([0.0, 0, 1]).expand(9, 3))


def test_orbit_always_looks_at_its_centre_from_its_radius():
    center = torch.tensor([1.0, -0.5, 2.0])
    poses = preset("orbit", 10, radius=2.5, center=center.tolist(), degrees=270)
    to_center = center - poses[:, :, 3]
    torch.testing.assert_close(to_center.norm(dim=1), torch.full((10,), 2.5))
    torch.testing.assert_close(forward(poses), to_center / 2.5, atol=1e-6, rtol=0)


def test_full_orbit_ends_where_it_started_and_a_quarter_orbit_turns_90_degrees():
    full = preset("orbit", 5)
    torch.testing.assert_close(full[-1], full[0], atol=1e-5, rtol=0)
    quarter = preset("orbit", 4, degrees=90)
    torch.testing.assert_close(forward(quarter[-1]), torch.tensor([1.0, 0, 0]), atol=1e-6, rtol=0)


def test_preset_parameter_with_a_wrong_name_is_an_error_listing_its_parameters():
    with pytest.raises(TrajectoryError, match="no parameter radios.*radius, center, degrees"):
        preset("orbit", 4, radios=2.0)


def test_preset_parameter_that_is_not_a_number_is_an_error():
    with pytest.raises(TrajectoryError, match="degrees must be a number"):
        preset("pan_and_return", 4, degrees="ninety")


def test_unknown_preset_is_an_error_listing_the_known_ones():
    with pytest.raises(TrajectoryError, match="unknown trajectory preset 'spiral'.*orbit, pan_and_return"):
        preset("spiral", 4)


# --- JSON forms ---------------------------------------------------------------------------------------------

def test_list_of_3x4_matrices_parses():
    poses = parse_trajectory(json.dumps([IDENTITY, pose_from_position([0, 0, 1], 45).tolist()]))
    assert poses.shape == (2, 3, 4) and poses.dtype == torch.float32
    torch.testing.assert_close(poses[1], pose_from_position([0, 0, 1], 45))


def test_list_of_flat_12_number_rows_parses_row_major():
    poses = parse_trajectory(json.dumps([sum(IDENTITY, [])[:11] + [5]]))
    torch.testing.assert_close(poses[0, :, 3], torch.tensor([0.0, 0, 5]))


def test_list_of_position_yaw_pitch_objects_parses_with_angles_defaulting_to_0():
    objects = [{"position": [0, 0, 1]}, {"position": [1, 2, 3], "yaw": 30, "pitch": 10}]
    poses = parse_trajectory(json.dumps(objects))
    torch.testing.assert_close(poses[0], pose_from_position([0, 0, 1], 0))
    torch.testing.assert_close(poses[1], pose_from_position([1, 2, 3], 30, 10))


def test_preset_object_parses_to_exactly_n_frames_with_its_parameters():
    poses = parse_trajectory('{"preset": "orbit", "radius": 2, "degrees": 180}', n_frames=12)
    torch.testing.assert_close(poses, preset("orbit", 12, radius=2, degrees=180))


def test_more_poses_than_the_video_needs_are_returned_as_given():
    assert parse_trajectory(json.dumps([IDENTITY] * 5), n_frames=3).shape == (5, 3, 4)


def test_trajectory_json_round_trips_through_the_matrix_form():
    poses = preset("orbit", 7, center=[0.5, 0, 1])
    text = trajectory_json(poses)
    assert isinstance(json.loads(text), list)
    torch.testing.assert_close(parse_trajectory(text), poses, atol=1e-6, rtol=0)


def test_trajectory_json_rounds_to_6_decimals():
    numbers = sum(sum(json.loads(trajectory_json(preset("orbit", 3, degrees=100))), []), [])
    assert all(round(v, 6) == v for v in numbers)


# --- JSON errors --------------------------------------------------------------------------------------------

def test_invalid_json_is_an_error_quoting_jsons_message():
    raises("[[1, 0, 0", "not valid JSON", "Expecting")


def test_empty_list_is_an_error():
    raises("[]", "empty")


@pytest.mark.parametrize("pose", [[[1, 0, 0], [0, 1, 0], [0, 0, 1]], list(range(11)), [[1, 0, 0, 0]] * 4])
def test_matrix_of_the_wrong_shape_is_an_error_naming_the_expected_shape(pose):
    raises(json.dumps([IDENTITY, pose]), "pose 1", "3x4", "12 numbers")


def test_mixed_pose_forms_are_an_error():
    raises(json.dumps([IDENTITY, {"position": [0, 0, 0]}]), "mixed", "pose 1")


def test_unknown_key_in_a_pose_object_is_an_error_listing_the_known_keys():
    raises('[{"position": [0, 0, 0], "roll": 5}]', "roll", "position, yaw, pitch")


def test_pose_object_without_a_position_is_an_error():
    raises('[{"yaw": 5}]', "position")


def test_unknown_preset_in_json_is_an_error_listing_the_known_ones():
    raises('{"preset": "spiral"}', "spiral", "orbit, pan_and_return, walk_and_revisit", n_frames=4)


def test_unknown_preset_parameter_in_json_is_an_error():
    raises('{"preset": "walk_and_revisit", "distanse": 3}', "distanse", "distance", n_frames=4)


def test_object_without_a_preset_key_is_an_error_naming_the_presets():
    raises('{"poses": []}', "'preset'", "orbit", n_frames=4)


def test_preset_without_n_frames_is_an_error():
    raises('{"preset": "orbit"}', "n_frames")


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "1e999"])
def test_non_finite_number_is_an_error(bad):
    raises(f"[[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, {bad}]]", "finite")


def test_rotation_that_is_not_orthonormal_is_an_error():
    raises(json.dumps([IDENTITY, [[1, 0, 0, 0], [0, 1.01, 0, 0], [0, 0, 1, 0]]]), "pose 1", "orthonormal")


def test_rotation_orthonormal_within_the_1e_3_tolerance_is_accepted():
    assert parse_trajectory(json.dumps([[[1, 0, 0, 0], [0, 1.0002, 0, 0], [0, 0, 1, 0]]])).shape == (1, 3, 4)


def test_reflection_is_an_error():
    raises(json.dumps([[[-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]]), "reflection")


def test_fewer_poses_than_the_video_needs_is_an_error_giving_both_counts():
    raises(json.dumps([IDENTITY] * 5), "the trajectory has 5 poses but the video needs 12 latent frames",
           n_frames=12)


def test_json_that_is_neither_list_nor_object_is_an_error():
    raises("3", "list of poses")


# --- edges of the input checks (found by the mutation run: see README, Tests) ---------------------------------

def test_a_preset_of_one_frame_is_valid_and_zero_frames_or_a_bool_are_not():
    assert parse_trajectory('{"preset": "orbit"}', 1).shape == (1, 3, 4)
    for n in (0, True, 2.0):
        with pytest.raises(TrajectoryError, match="n_frames must be a positive number of latent frames"):
            parse_trajectory('{"preset": "orbit"}', n)


def test_preset_names_only_its_own_parameters():
    with pytest.raises(TrajectoryError, match="has no parameter speed; its parameters are: radius, center, degrees"):
        preset("orbit", 3, speed=2)
    with pytest.raises(TrajectoryError, match="has no parameter n_frames"):
        PRESETS["orbit"](3, n_frames=4)


@pytest.mark.parametrize("poses, message", [
    (torch.zeros(0, 3, 4), r"poses \[T, 3, 4\] with T >= 1, got \(0, 3, 4\)"),
    (torch.zeros(2, 4, 4), r"poses \[T, 3, 4\] with T >= 1, got \(2, 4, 4\)"),
])
def test_poses_of_the_wrong_shape_or_none_at_all_are_an_error(poses, message):
    from memlearner_core.trajectory import validate_poses

    with pytest.raises(TrajectoryError, match=message):
        validate_poses(poses)


def test_a_non_finite_pose_is_named_by_its_index():
    rows = [IDENTITY] * 4
    rows[2] = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, "NaN"]]
    text = json.dumps(rows).replace('"NaN"', "NaN")
    with pytest.raises(TrajectoryError, match="pose 2, entry \\[2\\]\\[3\\] must be a finite number"):
        parse_trajectory(text)
    from memlearner_core.trajectory import validate_poses

    poses = torch.eye(3, 4).repeat(4, 1, 1)
    poses[2, 1, 3] = float("inf")
    with pytest.raises(TrajectoryError, match="pose 2 of the trajectory has a non-finite number"):
        validate_poses(poses)


def test_a_reflection_is_named_by_its_index():
    from memlearner_core.trajectory import validate_poses

    poses = torch.eye(3, 4).repeat(3, 1, 1)
    poses[1, 0, 0] = -1
    with pytest.raises(TrajectoryError, match="pose 1 of the trajectory: its rotation has determinant -1"):
        validate_poses(poses)


@pytest.mark.parametrize("pose, shape", [([1, 2, 3], "3 numbers"), ([[1, 2], 3], "an irregular nesting"),
                                         ([[1, 2, 3, 4], [5, 6]], "2x2/4"), (list(range(11)), "11 numbers")])
def test_a_pose_of_the_wrong_shape_says_what_shape_it_has(pose, shape):
    with pytest.raises(TrajectoryError, match=f"pose 0 has shape {shape};"):
        parse_trajectory(json.dumps([pose]))


def test_position_needs_three_numbers_and_names_what_is_wrong():
    with pytest.raises(TrajectoryError, match=r"position must be 3 numbers \[x, y, z\], got \[1, 2\]"):
        pose_from_position([1, 2], 0)
    with pytest.raises(TrajectoryError, match=r"pose 1 position\[2\] must be a number"):
        parse_trajectory(json.dumps([{"position": [0, 0, 0]}, {"position": [0, 0, "x"]}]))
    with pytest.raises(TrajectoryError, match="pose 0 yaw must be a number"):
        parse_trajectory(json.dumps([{"position": [0, 0, 0], "yaw": "left"}]))
    with pytest.raises(TrajectoryError, match="pitch must be a finite number"):
        pose_from_position([0, 0, 0], 0, float("nan"))


def test_trajectory_json_refuses_poses_that_are_not_3x4():
    with pytest.raises(TrajectoryError, match=r"expected poses \[T, 3, 4\], got \(2, 3, 3\)"):
        trajectory_json(torch.zeros(2, 3, 3))
