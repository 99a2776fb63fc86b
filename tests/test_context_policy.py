"""Context policies: which history frames (and how pooled) become the next chunk's context, on one budget."""

import itertools
import math

import pytest
import torch

from memlearner_core.context_policy import (
    POLICIES,
    ContextPolicyError,
    FramePick,
    frame_cost,
    select_context,
    view_overlap,
)
from memlearner_core.context_tokens import ContextSegment, frame_token_counts
from memlearner_core.trajectory import pose_from_position, preset

GRID = list(itertools.product([0, 1, 5, 40], [0, 1, 15, 16, 17, 100, 1000, 5000],
                              [(8, 8), (16, 16), (15, 26)]))


def poses_for(n, seed=0):
    """``n`` varied poses (positions and headings) for policies that need them."""
    g = torch.Generator().manual_seed(seed)
    pos, yaw = torch.randn(n, 3, generator=g), torch.rand(n, generator=g) * 360
    return torch.stack([pose_from_position(p, y) for p, y in zip(pos, yaw.tolist(), strict=True)]) \
        if n else torch.zeros(0, 3, 4)


def pick(policy, n, budget, hw=(16, 16), **kw):
    if policy == "fov":
        kw.setdefault("history_poses", poses_for(n))
        kw.setdefault("chunk_poses", poses_for(4, seed=1))
    return select_context(policy, n, budget, hw, **kw)


def cost(picks, hw):
    return sum(frame_cost(*hw, p.pool) for p in picks)


def by_age(picks):
    """Picks from the newest frame to the oldest."""
    return sorted(picks, key=lambda p: -p.index)


# --- frame cost ---------------------------------------------------------------------------------------------

def test_frame_cost_of_a_480p_latent_frame_is_1560_tokens():
    assert frame_cost(60, 104) == 30 * 52 == 1560


@pytest.mark.parametrize("pool", [1, 2, 3, 4, 8, 60])
def test_frame_cost_matches_the_tokens_of_a_pooled_context_segment(pool):
    seg = ContextSegment(torch.zeros(2, 1, 60, 104), torch.tensor([-1]), pool=pool)
    assert frame_cost(60, 104, pool) == frame_token_counts(seg)


def test_pool_larger_than_the_frame_is_an_error():
    with pytest.raises(ContextPolicyError, match="pool 32"):
        frame_cost(16, 40, 32)


# --- shared contract ----------------------------------------------------------------------------------------

# learned hands every frame over as a candidate: each query layer keeps the budget (tests/test_learned_policy.py)
@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "learned"])
def test_every_policy_respects_the_budget_exactly(policy):
    for n, budget, hw in GRID:
        picks = pick(policy, n, budget, hw)
        assert cost(picks, hw) <= budget, (n, budget, hw, picks)


def test_learned_hands_every_frame_to_the_query_layers_as_a_candidate():
    for n, budget, hw in GRID:
        assert [p.index for p in pick("learned", n, budget, hw)] == list(range(n))
        assert all(p.pool == 1 for p in pick("learned", n, budget, hw))


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_returns_distinct_history_indices_in_ascending_order(policy):
    for n, budget, hw in GRID:
        idx = [p.index for p in pick(policy, n, budget, hw)]
        assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx), (n, budget, hw, idx)


@pytest.mark.parametrize("policy", POLICIES)
def test_empty_history_gives_empty_context(policy):
    assert pick(policy, 0, 1000) == []


@pytest.mark.parametrize("policy", ["all", "recent", "fov"])
def test_budget_below_one_full_frame_gives_no_context_for_full_resolution_policies(policy):
    assert pick(policy, 10, frame_cost(16, 16) - 1) == []


@pytest.mark.parametrize("policy", ["recent", "fov", "framepack"])
def test_unlimited_budget_is_an_error_for_every_policy_but_all(policy):
    with pytest.raises(ContextPolicyError, match="needs a token budget"):
        pick(policy, 10, None)


def test_unknown_policy_is_an_error_listing_the_known_ones():
    with pytest.raises(ContextPolicyError, match="'nearest'.*all, recent, fov, framepack"):
        select_context("nearest", 10, 100, (16, 16))


def test_negative_budget_is_an_error():
    with pytest.raises(ContextPolicyError, match="budget_tokens must be >= 0"):
        select_context("all", 10, -1, (16, 16))


# --- all and recent -----------------------------------------------------------------------------------------

def test_all_without_a_budget_keeps_every_frame_at_full_resolution():
    assert select_context("all", 7, None, (60, 104)) == [FramePick(i, 1) for i in range(7)]


def test_all_over_budget_drops_the_oldest_frames():
    assert select_context("all", 10, 3 * 64 + 63, (16, 16)) == [FramePick(7), FramePick(8), FramePick(9)]


def test_recent_keeps_the_newest_frames_that_fit_the_budget():
    assert select_context("recent", 10, 2 * 64, (16, 16)) == [FramePick(8), FramePick(9)]


def test_all_and_recent_coincide_under_a_budget():
    for n, budget, hw in GRID:
        assert pick("all", n, budget, hw) == pick("recent", n, budget, hw)


# --- fov ----------------------------------------------------------------------------------------------------

def test_view_overlap_of_identical_poses_is_1():
    pose = pose_from_position([1, 2, 3], 40, 10)
    assert view_overlap(pose, pose) == pytest.approx(1.0)


def test_view_overlap_is_0_once_the_views_diverge_by_the_fov():
    a = pose_from_position([0, 0, 0], 0)
    assert view_overlap(a, pose_from_position([0, 0, 0], 60), fov_deg=60) == pytest.approx(0, abs=1e-6)
    assert view_overlap(a, pose_from_position([0, 0, 0], 61), fov_deg=60) == 0
    assert view_overlap(a, pose_from_position([0, 0, 0], 180), fov_deg=60) == 0
    assert view_overlap(a, pose_from_position([0, 0, 0], 59), fov_deg=60) > 0


def test_view_overlap_falls_with_the_angle_between_views():
    a = pose_from_position([0, 0, 0], 0)
    values = [view_overlap(a, pose_from_position([0, 0, 0], yaw)) for yaw in [0, 10, 20, 40, 59]]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)


def test_view_overlap_falls_with_the_distance_between_cameras():
    a = pose_from_position([0, 0, 0], 0)
    values = [view_overlap(a, pose_from_position([d, 0, 0], 0)) for d in [0, 0.5, 1, 2, 8]]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)


def test_view_overlap_is_angle_factor_times_distance_factor():
    a, b = pose_from_position([0, 0, 0], 0), pose_from_position([0, 1, 0], 30)
    assert view_overlap(a, b, fov_deg=60) == pytest.approx((1 - 30 / 60) / (1 + 1.0))


def test_view_overlap_is_symmetric():
    a, b = pose_from_position([0.3, 0, 1], 12, 5), pose_from_position([1, -1, 0], 30)
    assert view_overlap(a, b) == pytest.approx(view_overlap(b, a))


def test_fov_picks_the_frames_a_revisit_came_from_not_the_most_recent_ones():
    walk = preset("walk_and_revisit", 16)  # frame 15-i has the pose of frame i
    elsewhere = torch.stack([pose_from_position([0, 0, 4], yaw) for yaw in [90, 120, 150, 180, 210, 240]])
    history = torch.cat([walk[:8], elsewhere])  # the outward walk, then 6 frames looking away
    picks = select_context("fov", 14, 4 * 64, (16, 16), history_poses=history, chunk_poses=walk[12:])
    assert picks == [FramePick(i) for i in range(4)]  # frames 0..3, whose poses the chunk revisits
    assert select_context("recent", 14, 4 * 64, (16, 16)) == [FramePick(i) for i in range(10, 14)]


def test_fov_on_pan_and_return_picks_the_views_the_pan_comes_back_to():
    pan = preset("pan_and_return", 20, degrees=180)  # frame 19-i looks where frame i did
    picks = select_context("fov", 10, 3 * 64, (16, 16), history_poses=pan[:10], chunk_poses=pan[17:])
    assert picks == [FramePick(0), FramePick(1), FramePick(2)]


def test_fov_breaks_ties_in_favour_of_more_recent_frames():
    same = pose_from_position([0, 0, 0], 0).expand(6, 3, 4)
    picks = select_context("fov", 6, 2 * 64, (16, 16), history_poses=same, chunk_poses=same[:1])
    assert picks == [FramePick(4), FramePick(5)]


@pytest.mark.parametrize("missing", ["history_poses", "chunk_poses"])
def test_fov_without_poses_is_an_error_naming_what_is_missing(missing):
    kw = {"history_poses": poses_for(5), "chunk_poses": poses_for(2), missing: None}
    with pytest.raises(ContextPolicyError, match=f"'fov' policy needs {missing}"):
        select_context("fov", 5, 1000, (16, 16), **kw)


def test_fov_with_history_poses_not_one_per_history_frame_is_an_error():
    with pytest.raises(ContextPolicyError, match=r"history_poses must be \[5, 3, 4\].*\(4, 3, 4\)"):
        select_context("fov", 5, 1000, (16, 16), history_poses=poses_for(4), chunk_poses=poses_for(2))


def test_fov_with_chunk_poses_of_the_wrong_shape_is_an_error():
    with pytest.raises(ContextPolicyError, match="chunk_poses must be"):
        select_context("fov", 5, 1000, (16, 16), history_poses=poses_for(5), chunk_poses=torch.zeros(2, 4, 4))


# --- framepack ----------------------------------------------------------------------------------------------

FRAMEPACK_GRID = list(itertools.product([1, 2, 7, 30, 200], [1, 16, 40, 64, 100, 127, 128, 500, 4000],
                                        [(16, 16), (15, 26), (60, 104)]))


def test_framepack_pools_are_powers_of_two_within_the_frame():
    for n, budget, hw in FRAMEPACK_GRID:
        for p in pick("framepack", n, budget, hw):
            assert p.pool & (p.pool - 1) == 0 and p.pool <= min(hw), (n, budget, hw, p)


def test_framepack_never_keeps_an_older_frame_finer_than_a_newer_one():
    for n, budget, hw in FRAMEPACK_GRID:
        pools = [p.pool for p in by_age(pick("framepack", n, budget, hw))]
        assert pools == sorted(pools), (n, budget, hw, pools)


def test_framepack_keeps_the_most_recent_frame_at_full_resolution_when_one_fits():
    for n, budget, hw in FRAMEPACK_GRID:
        if budget >= frame_cost(*hw):
            assert by_age(pick("framepack", n, budget, hw))[0] == FramePick(n - 1, 1), (n, budget, hw)


def test_framepack_compresses_older_frames_instead_of_dropping_them():
    picks = select_context("framepack", 200, 4 * 64, (16, 16))
    assert {p.pool for p in picks} == {1, 2, 4, 8, 16}
    assert len(picks) > 4  # more frames than a full-resolution window of the same budget


def test_framepack_fits_pooled_frames_under_a_budget_below_one_full_frame():
    picks = select_context("framepack", 10, 40, (16, 16))
    assert picks and all(p.pool > 1 for p in picks) and cost(picks, (16, 16)) <= 40


def test_framepack_gives_each_level_at_most_half_of_the_budget_left():
    picks = by_age(select_context("framepack", 500, 1000, (16, 16)))
    left = 1000
    for pool in [1, 2, 4, 8]:  # every level but the last (pool 16)
        spent = sum(frame_cost(16, 16, p.pool) for p in picks if p.pool == pool)
        assert 0 < spent <= max(left // 2, frame_cost(16, 16, pool)), (pool, spent, left)
        left -= spent


@pytest.mark.parametrize("hw,budget", [((16, 16), 1000), ((15, 26), 777), ((60, 104), 3 * 1560)])
def test_framepack_length_is_constant_once_the_history_is_long_enough(hw, budget):
    totals = [cost(select_context("framepack", n, budget, hw), hw) for n in range(1, 400)]
    saturated = totals[-1]
    assert totals[0] < saturated <= budget
    first = totals.index(saturated)
    assert first < 300 and totals[first:] == [saturated] * (len(totals) - first)


def test_framepack_picks_the_same_pattern_relative_to_the_newest_frame_for_every_long_history():
    def pattern(n):
        return [(n - 1 - p.index, p.pool) for p in by_age(select_context("framepack", n, 1000, (16, 16)))]
    assert all(pattern(n) == pattern(300) for n in range(200, 300))
    assert math.isclose(sum(frame_cost(16, 16, pool) for _, pool in pattern(300)), 1000, rel_tol=0.01)


# --- edges of the input checks (found by the mutation run: see README, Tests) ---------------------------------

@pytest.mark.parametrize("fov_deg, ok", [(0, False), (0.5, True), (180, True), (180.5, False), (-10, False)])
def test_fov_angle_is_taken_in_the_half_open_interval_0_to_180(fov_deg, ok):
    if ok:
        assert len(pick("fov", 5, 3 * frame_cost(16, 16), fov_deg=fov_deg)) == 3
    else:
        with pytest.raises(ContextPolicyError, match=r"fov_deg must be in \(0, 180\]"):
            pick("fov", 5, 3 * frame_cost(16, 16), fov_deg=fov_deg)


def test_a_wider_fov_changes_which_frames_overlap():
    """fov_deg reaches the overlap score: a pose 70 degrees off shares no view at 60 degrees but does at 120."""
    history = torch.stack([pose_from_position([0, 0, 0], a) for a in (70, 0, 0)])  # frame 0 turned away
    chunk = pose_from_position([0, 0, 0], 0)[None]
    assert [p.index for p in pick("fov", 3, frame_cost(16, 16), history_poses=history, chunk_poses=chunk)] == [2]
    wide = pick("fov", 3, 3 * frame_cost(16, 16), history_poses=history, chunk_poses=chunk, fov_deg=120)
    narrow = pick("fov", 3, 3 * frame_cost(16, 16), history_poses=history, chunk_poses=chunk)
    assert [p.index for p in wide] == [p.index for p in narrow] == [0, 1, 2]  # the budget fits all three
    history2 = torch.stack([pose_from_position([0, 0, 0], a) for a in (70, 100, 0)])
    two = dict(history_poses=history2, chunk_poses=chunk)
    assert [p.index for p in pick("fov", 3, 2 * frame_cost(16, 16), **two)] == [1, 2]  # no overlap: newest first
    assert [p.index for p in pick("fov", 3, 2 * frame_cost(16, 16), fov_deg=120, **two)] == [0, 2]


@pytest.mark.parametrize("hw", [(1, 8), (8, 1)])
def test_a_latent_one_token_row_or_column_wide_is_a_valid_size(hw):
    assert [p.index for p in select_context("recent", 3, 2 * frame_cost(*hw), hw)] == [1, 2]


@pytest.mark.parametrize("hw, n", [((0, 8), 3), ((8, 0), 3), ((8, 8), -1)])
def test_an_empty_latent_or_negative_history_is_an_error(hw, n):
    with pytest.raises(ContextPolicyError, match="latent size >= 1x1 and n_history >= 0"):
        select_context("recent", n, 100, hw)


def test_view_overlap_refuses_either_pose_of_the_wrong_shape():
    good = pose_from_position([0, 0, 0], 0)
    for a, b in ((good, torch.zeros(4, 4)), (torch.zeros(3, 3), good)):
        with pytest.raises(ContextPolicyError, match=r"two poses \[3, 4\]"):
            view_overlap(a, b)


def test_chunk_poses_must_hold_at_least_one_pose():
    with pytest.raises(ContextPolicyError, match=r"chunk_poses must be \[T, 3, 4\] with T >= 1, got \(0, 3, 4\)"):
        pick("fov", 3, 100, chunk_poses=torch.zeros(0, 3, 4))
    with pytest.raises(ContextPolicyError, match=r"history_poses must be \[3, 3, 4\] \(one per history frame\)"):
        pick("fov", 3, 100, history_poses=poses_for(2))
