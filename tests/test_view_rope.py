"""View-aligned RoPE (memlearner_core/view_rope.py): a frame's tokens sit where its view falls in the view of the
chunk's first camera, checked against the revisit world's own renderer."""

import pytest
import torch

from memlearner_core import revisit_world as rw
from memlearner_core.trajectory import pose_from_position
from memlearner_core.view_rope import aligned_positions, shift_positions, view_offsets

DEG_PER_TOKEN = 45.0 / 4  # an 8 x 8 latent view of a 64-column panorama: 45 degrees over 4 token columns


@pytest.mark.parametrize("yaw", [0.0, 4.0, 13.0, 45.0, -30.0, 200.0])
def test_a_view_aligned_column_shows_what_the_reference_shows_there(yaw):
    """The world column a frame's pixel ``j`` sees is the one the reference frame's pixel ``j + 2 * offset`` sees
    (2 latent pixels per token), on a yaw-only path at zoom 1."""
    world = rw.make_world(3)
    reference, frame = rw.yaw_path([10.0]), rw.yaw_path([10.0 + yaw])
    offset = float(view_offsets(frame, reference[0], DEG_PER_TOKEN)[0, 1])
    u_frame, u_ref = rw.render(world, frame).u[0, 0], rw.render(world, reference).u[0, 0]
    expected = u_ref + 2 * offset  # u is linear in the pixel column at zoom 1
    wrapped = torch.remainder(u_frame - expected + world.columns / 2, world.columns) - world.columns / 2
    assert wrapped.abs().max() < 1e-3


def test_looking_up_moves_the_rows_up():
    """OpenCV axes: y points down, so a camera pitched up by one token's angle sits one row higher."""
    reference = pose_from_position([0.0, 0.0, 0.0], 0.0)
    up = pose_from_position([0.0, 0.0, 0.0], 0.0, DEG_PER_TOKEN)[None]
    assert torch.allclose(view_offsets(up, reference, DEG_PER_TOKEN), torch.tensor([[-1.0, 0.0]]), atol=1e-5)


def test_yaw_wraps_the_short_way_round():
    offsets = view_offsets(rw.yaw_path([350.0]), rw.yaw_path([10.0])[0], DEG_PER_TOKEN)
    assert offsets[0, 1].item() == pytest.approx(-20.0 / DEG_PER_TOKEN, abs=1e-4)


def test_translation_does_not_move_the_grid():
    """Parallax is left to the camera embedding: a camera that only moves keeps the reference's grid."""
    moved = pose_from_position([1.0, -2.0, 3.0], 0.0)[None]
    assert view_offsets(moved, pose_from_position([0.0, 0.0, 0.0], 0.0), DEG_PER_TOKEN).abs().max() < 1e-6


def test_each_frame_moves_only_its_own_rows_and_columns():
    ids = torch.stack(torch.meshgrid(torch.arange(2.0), torch.arange(2.0), torch.arange(3.0), indexing="ij"),
                      -1).reshape(-1, 3)
    moved = shift_positions(ids, torch.tensor([[0.0, 0.0], [0.5, -2.0]])).reshape(2, 6, 3)
    assert torch.equal(moved[0], ids.reshape(2, 6, 3)[0])
    assert torch.equal(moved[1, :, 0], torch.ones(6))
    assert torch.equal(moved[1, :, 1:] - ids.reshape(2, 6, 3)[1, :, 1:], torch.tensor([0.5, -2.0]).expand(6, 2))


def test_without_a_field_of_view_or_poses_the_positions_stay():
    ids = torch.randn(8, 3)
    poses = rw.yaw_path([0.0, 30.0])
    assert aligned_positions(ids, poses, poses[0], None, 4) is ids
    assert aligned_positions(ids, None, poses[0], 45.0, 4) is ids
