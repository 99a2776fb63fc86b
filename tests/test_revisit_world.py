"""The revisit world (``memlearner_core.revisit_world``): exact ground truth, poses in the pack's convention, the
occluder and the moving object, and the labels the benchmark's metrics count."""

import pytest
import torch

from memlearner_core import revisit_world as rw
from memlearner_core.context_policy import frame_cost, select_context
from memlearner_core.trajectory import parse_trajectory, preset, preset_names, trajectory_json, validate_poses


@pytest.fixture
def world():
    return rw.make_world(3)


def test_the_same_seed_makes_the_same_world_and_another_seed_another():
    a, b, c = rw.make_world(1), rw.make_world(1), rw.make_world(2)
    assert torch.equal(a.panorama, b.panorama)
    assert (a.panorama - c.panorama).abs().mean() > 0.5


def test_the_panorama_has_unit_variance_per_channel_and_every_column_is_unique(world):
    pano = world.panorama
    assert pano.shape == (16, 8, 64)
    assert torch.allclose(pano.std(dim=(1, 2)), torch.ones(16), atol=0.01)
    columns = pano.permute(2, 0, 1).flatten(1)  # [64, 16*8]
    dist = torch.cdist(columns, columns) + torch.eye(64) * 1e9
    assert dist.min() > 1.0  # no two places look alike


def test_a_camera_at_the_origin_sees_the_panorama_window_its_yaw_points_at(world):
    frames = rw.render(world, rw.yaw_path([0.0, 90.0]), 8, 8).latent
    assert torch.equal(frames[:, 0], torch.cat([world.panorama[:, :, -4:], world.panorama[:, :, :4]], 2))
    assert torch.equal(frames[:, 1], world.panorama[:, :, 12:20])  # 90 degrees = column 16 at the centre


def test_pan_and_return_revisits_exactly_what_it_saw(world):
    poses = preset("pan_and_return", 8, degrees=120.0)
    frames = rw.render(world, poses).latent
    assert torch.equal(frames[:, 0], frames[:, 7]) and torch.equal(frames[:, 2], frames[:, 5])


def test_walking_towards_the_wall_zooms_in_around_the_view_centre(world):
    poses = preset("walk_and_revisit", 6, distance=4.0)
    r = rw.render(world, poses)
    assert r.scale[0] == pytest.approx(1.0) and r.scale[2] == pytest.approx(0.5)
    spread = r.u[:, 4, 7] - r.u[:, 4, 4]  # panorama columns between the centre and the right edge
    assert spread[2] == pytest.approx(spread[0] / 2)
    assert torch.equal(r.latent[:, 0], r.latent[:, 5])


def test_the_poses_are_the_packs_trajectories_and_survive_json():
    g = torch.Generator().manual_seed(0)
    poses = rw.random_trajectory(12, g)
    validate_poses(poses)
    assert torch.allclose(parse_trajectory(trajectory_json(poses)), poses, atol=1e-5)


def test_random_trajectories_come_back_to_where_they_were():
    g = torch.Generator().manual_seed(1)
    returns = 0
    for _ in range(20):
        centre, _ = rw.view_geometry(rw.make_world(0), rw.random_trajectory(16, g))
        first_half = centre[:8]
        gap = (centre[8:, None] - first_half[None]).remainder(64)
        returns += bool((torch.minimum(gap, 64 - gap) < 1).any())
    assert returns >= 15


def test_the_occluder_hides_its_band_only_while_it_stands():
    w = rw.make_world(0, occluder=True, occluded_frames=(1, 1), occluded_columns=(12.0, 8.0))
    r = rw.render(w, rw.yaw_path([90.0, 90.0, 90.0]))  # columns 12..20, all inside the band
    assert r.visible[0].all() and not r.visible[1].any() and r.visible[2].all()
    assert torch.equal(r.latent[:, 0], r.latent[:, 2])
    assert torch.allclose(r.latent[:, 1], w.occluder.colour[:, None, None].expand(16, 8, 8))


def test_fov_overlap_picks_the_frames_that_saw_the_wall():
    """The hard case by construction: the newest frames with the revisit's pose are the walled ones."""
    poses, (first, last), _ = rw.occluded_revisit_path()
    picks = select_context("fov", 13, 4 * frame_cost(8, 8), (8, 8), poses[:13], poses[13:15])
    assert all(first <= p.index <= last for p in picks)


def test_the_moving_object_is_elsewhere_on_a_revisit(world):
    block = rw.MovingObject(start=0.0, speed=4.0, row=2.0, width=4.0, height=3.0, colour=torch.ones(16))
    moving = rw.World(world.panorama, moving=block)
    r = rw.render(moving, rw.yaw_path([0.0, 0.0, 0.0]))  # a camera that never turns: columns -4..4
    assert (~r.visible[0]).sum() == 3 * 4  # the whole block, centred in the view
    assert (~r.visible[1]).sum() == 3 * 2  # half of it, 4 columns on
    assert r.visible[2].all()  # gone
    assert torch.equal(r.latent[:, 2], rw.render(world, rw.yaw_path([0.0])).latent[:, 0])


def test_seen_before_marks_the_revisited_pixels_and_first_sight_the_new_ones(world):
    r = rw.render(world, rw.yaw_path([0.0, 45.0, 90.0, 45.0, 0.0]))
    seen, new = rw.seen_before(world, r, 2), rw.first_sight(world, r)
    assert not seen[:2].any() and seen[3:].all()  # frames 3, 4 show what frames 0, 1 showed
    assert not seen[2].any() and new[2].all()  # frame 2 (90 degrees) shows columns 12..20 for the first time
    assert not new[3:].any()


def test_a_place_seen_only_behind_the_wall_does_not_count_as_seen():
    w = rw.make_world(0, occluder=True, occluded_frames=(0, 0), occluded_columns=(0.0, 4.0))
    r = rw.render(w, rw.yaw_path([0.0, 0.0]))
    seen = rw.seen_before(w, r, 1)[1]
    assert not seen[:, 4:].any() and seen[:, :4].all()  # columns 0..4 were behind the wall


def test_latents_render_to_rgb_through_linear_preview_factors():
    latent = torch.zeros(16, 2, 8, 8)
    factors, bias = torch.zeros(16, 3), torch.tensor([1.0, -1.0, 0.0])
    rgb = rw.latent_to_rgb(latent, factors, bias, upscale=4)
    assert rgb.shape == (2, 32, 32, 3)
    assert torch.allclose(rgb[0, 0, 0], torch.tensor([1.0, 0.0, 0.5]))


def test_worlds_of_a_family_share_its_look_and_differ_in_content():
    fam = rw.make_family(3)
    a, b = (rw.make_world(s, family=fam).panorama for s in (1, 2))
    other = rw.make_world(1, family=rw.make_family(4)).panorama
    for pano in (a, b):
        assert torch.allclose(pano.mean((1, 2)), fam.mean, atol=1e-4)  # the smooth noise is exactly zero-mean
        assert torch.allclose(pano.std((1, 2)), torch.full((16,), 0.7), rtol=0.35)
    assert (a - b).pow(2).mean() > 0.5  # new places in every world
    assert (a - other).pow(2).mean() > (a - b).pow(2).mean()  # another family looks different


def test_the_family_mean_scores_the_family_prior_on_new_places():
    fam = rw.make_family(0)
    case = rw.evaluation_case("pan_and_return", 5, family=fam)
    new = case.labels["new"]
    err_family = rw.squared_error(rw.family_mean_prediction(case, fam), case)[new].mean()
    err_zero = rw.squared_error(torch.zeros_like(case.truth[:, case.history:]), case)[new].mean()
    assert err_family < 0.6 < 1.0 < err_zero


# --- labels: a partition, whatever the view ---------------------------------------------------------------------

PRESET_CASES = [  # every trajectory preset, with views wider than the panorama (an orbit looks across the cylinder)
    ("orbit", {}), ("orbit", {"radius": 6.0, "degrees": 270.0}), ("orbit", {"radius": 1.0, "degrees": 90.0}),
    ("pan_and_return", {}), ("pan_and_return", {"degrees": 180.0}),
    ("walk_and_revisit", {}), ("walk_and_revisit", {"distance": 7.0}),
]


def assert_partition(case: rw.RevisitCase) -> None:
    lab = case.labels
    shape = (case.generated_frames, *case.truth.shape[2:])
    assert all(lab[k].shape == shape and lab[k].dtype == torch.bool for k in rw.LABELS)
    assert not (lab["revisit"] & lab["new"]).any()  # no pixel is both remembered and never seen
    assert torch.equal(sum(lab[k].int() for k in rw.LABELS), torch.ones(shape, dtype=torch.int))  # exactly one
    assert torch.equal(lab["shown"], ~lab["new"])


def test_the_partition_test_covers_every_preset():
    assert {name for name, _ in PRESET_CASES} == set(preset_names())


@pytest.mark.parametrize("history", [1, 4, 9])
@pytest.mark.parametrize(("name", "params"), PRESET_CASES)
def test_revisit_new_and_unlabelled_partition_every_pixel_of_every_preset(world, name, params, history):
    assert_partition(rw.revisit_case(name, world, preset(name, 16, **params), history))


@pytest.mark.parametrize("path", rw.EVALUATION_PATHS)
def test_revisit_new_and_unlabelled_partition_every_pixel_of_every_evaluation_path(path):
    assert_partition(rw.evaluation_case(path, 10_000_001))


def test_an_orbit_sees_past_the_panoramas_edges_and_its_return_is_a_revisit_in_every_row(world):
    poses = preset("orbit", 9)  # 360 degrees: the last frame has the first frame's pose
    case = rw.revisit_case("orbit", world, poses, 1)
    r = case.rendering
    assert r.scale[0] > 1 and r.v.min() < -0.5 and r.v.max() > world.rows - 0.5  # rows beyond both edges
    assert case.labels["revisit"][-1].all() and not case.labels["new"][-1].any()  # the bottom row included
    new = case.labels["new"]
    assert new.any() and not rw.oracle_prediction(case)[:, new].any()  # the oracle guesses the mean on new places


@pytest.mark.parametrize("v", [-5.0, -0.6, 0.0, 3.5, 7.0, 7.6, 8.3125, 20.0])
@pytest.mark.parametrize("s", [0.25, 1.0, 1.375, 3.0])
def test_every_pixels_footprint_is_a_nonempty_part_of_the_panorama(v, s):
    rows, cols = rw._footprint(10.0, v, s, 8, 64)
    assert 0 <= rows.start < rows.stop <= 8 * rw.COVERAGE_SUBDIV and cols


# --- the offset sweep and the copy_nearest baseline -------------------------------------------------------------

def test_the_offset_sweep_revisits_from_the_offset_and_only_places_the_history_saw():
    for offset in rw.SWEEP_OFFSETS:
        case = rw.offset_case(10_000_002, offset)
        assert case.history == 4 and case.generated_frames % 2 == 0  # whole chunks of 2 latent frames
        gap = rw.nearest_history_offset(case)
        assert torch.allclose(gap, torch.full_like(gap, offset), atol=1e-4)
        assert case.labels["revisit"].all()
    assert rw.SWEEP_OFFSETS[-1] == rw.BETWEEN_OFFSET == (rw.OFFSET_HISTORY_YAWS[1] - rw.OFFSET_HISTORY_YAWS[0]) / 2
    with pytest.raises(ValueError, match="another history pose is nearer"):
        rw.offset_revisit_path(30.0)


def test_copy_nearest_copies_the_history_frame_of_highest_view_overlap_unshifted():
    exact = rw.offset_case(10_000_002, 0.0)
    assert torch.equal(rw.copy_nearest_prediction(exact), exact.truth[:, exact.history:])
    off = rw.offset_case(10_000_002, 13.0)  # generated yaws 122, 103, 77, 58, 32, 13
    assert torch.equal(rw.copy_nearest_prediction(off), off.truth[:, [3, 2, 2, 1, 1, 0]])
    between = rw.offset_case(10_000_002, rw.BETWEEN_OFFSET)  # 112.5, 112.5, 67.5, ...: two history poses tie
    assert torch.equal(rw.copy_nearest_prediction(between), between.truth[:, [3, 3, 2, 2, 1, 1]])  # the newer
    walled = rw.evaluation_case("occluder", 10_000_002)  # each revisited pose is in the history 2-3 times
    assert torch.equal(rw.copy_nearest_prediction(walled), walled.truth[:, [11, 10, 9, 8]])  # the newest: walled


def test_the_sideways_sweep_moves_the_cameras_and_keeps_their_directions():
    for shift in rw.SWEEP_SHIFTS:
        case = rw.offset_case(10_000_002, 0.0, shift=shift)
        assert torch.allclose(rw.nearest_history_distance(case), torch.full((6,), shift, dtype=torch.float64))
        assert rw.nearest_history_offset(case).max() < 1e-3
        assert case.labels["revisit"].float().mean() > 0.9  # parallax leaves a sliver the history did not see


def test_the_loop_comes_round_a_full_turn_later_midway_between_history_poses():
    case = rw.loop_case(10_000_002)
    assert case.history == 12 and case.generated_frames == 6
    gap = rw.nearest_history_offset(case)
    assert torch.allclose(gap, torch.full_like(gap, rw.LOOP_OFFSET), atol=1e-3)
    assert bool(case.labels["revisit"].all())  # a full turn saw every place


def test_copy_nearest_is_exact_at_offset_0_and_falls_off_as_the_pose_moves():
    scores = []
    for offset in (0.0, 2.0, 8.0, 20.0):
        case = rw.offset_case(10_000_003, offset)
        err = rw.squared_error(rw.copy_nearest_prediction(case), case)
        scores.append(rw.psnr(float(err.sum()), err.numel()))
    assert scores[0] == rw.PSNR_CAP and scores == sorted(scores, reverse=True) and scores[-1] < 0


def test_new_viewpoint_trajectories_come_back_off_the_poses_of_the_way_out():
    """``new_viewpoints``: over 50 paths, under 10% of frames look within half a degree of an earlier frame (by
    chance); without it, over half do (the returns of a symmetric triangle wave land on the way out's poses)."""
    def share_on_an_earlier_pose(new_viewpoints):
        close = []
        for seed in range(50):
            poses = rw.random_trajectory(16, torch.Generator().manual_seed(seed), new_viewpoints=new_viewpoints)
            d = poses[:, :, 2][:, [0, 2]].double()
            angle = torch.rad2deg(torch.arccos((d @ d.T).clamp(-1, 1)))
            close += [bool(angle[f, :f].min() < 0.5) for f in range(1, 16)]
        return sum(close) / len(close)

    assert share_on_an_earlier_pose(True) < 0.1 < 0.5 < share_on_an_earlier_pose(False)


EXPECTED_YAWS_SEED_7 = [168.6559, 144.7397, 120.8235, 144.7397, 168.6559, -167.4279]  # before new_viewpoints existed


def test_default_trajectories_are_those_of_the_committed_data():
    """``new_viewpoints`` draws nothing when off: the training data of the committed figures stays the same."""
    g = torch.Generator().manual_seed(7)
    yaws = torch.rad2deg(torch.atan2(*rw.random_trajectory(6, g)[:, [0, 2], 2].T))
    assert torch.allclose(yaws, torch.tensor(EXPECTED_YAWS_SEED_7), atol=1e-3)


@pytest.mark.parametrize("path", rw.LONG_PATHS)
def test_long_paths_revisit_every_place_long_after_and_never_from_a_history_pose(path):
    case = rw.long_case(path, 10_000_000)
    assert case.poses.shape[0] == 48 and case.generated_frames % 2 == 0
    assert float(rw.nearest_history_offset(case).min()) >= 2.9  # 3 (long_occluder), 5 or 11.25 degrees off
    assert case.labels["revisit"].float().mean() > 0.9  # the history saw (nearly) every place
    # the first generated frame comes 15 frames or more after the history frames nearest it
    d = torch.nn.functional.normalize(case.poses[:, :, 2], dim=-1)
    nearest = (d[case.history] @ d[:case.history].T).argmax()
    assert case.history - int(nearest) >= 15


def test_the_long_occluders_band_was_seen_clear_once_and_behind_the_wall_by_the_frames_fov_ranks_first():
    case = rw.long_case("long_occluder", 10_000_000)
    assert case.history == 32 and case.labels["band"].sum() > 0
    wall = case.world.occluder
    assert (wall.first_frame, wall.last_frame) == (16, 31)
    picks = select_context("fov", 32, 2 * frame_cost(8, 8), (8, 8), case.poses[:32], case.poses[32:34])
    assert all(wall.first_frame <= p.index <= wall.last_frame for p in picks)  # fov's first two saw the wall
