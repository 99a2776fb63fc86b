"""Reference videos prepared as DiT-Mem's own preprocessing prepares them (latent_processing/vae_latent_processing.py
in the official code): frames picked with ``np.linspace(0, n - 1, k, dtype=int)``, a clip shorter than ``k`` frames
kept whole with its last frame repeated, frames stretched (``cv2.resize``) to the encoder's size without a crop."""

import numpy as np
import pytest
import torch

from memlearner_core.reference_video import resample_latent, sample_indices

import host


def numpy_floor_linspace(n: int, k: int) -> list[int]:
    """``np.linspace(0, n - 1, k, dtype=int)`` in plain Python, numpy's arithmetic step for step: ``i * step`` in
    float64, the last value set to ``n - 1``, truncated."""
    step = (n - 1) / (k - 1)
    return [int(i * step) for i in range(k - 1)] + [n - 1]


# --- frame indices (no host needed) ----------------------------------------------------------------------------

def test_official_indices_by_hand():
    # 10 frames -> 7: linspace is 0, 1.5, 3, 4.5, 6, 7.5, 9; DiT-Mem truncates, the trainer rounds (half to even)
    assert sample_indices(10, 7, official=True).tolist() == [0, 1, 3, 4, 6, 7, 9]
    assert sample_indices(10, 7).tolist() == [0, 2, 3, 4, 6, 8, 9]
    # 12 frames -> 9: linspace 0, 1.375, 2.75, 4.125, 5.5, 6.875, 8.25, 9.625, 11
    assert sample_indices(12, 9, official=True).tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 11]
    assert sample_indices(10, 4, official=True).tolist() == [0, 3, 6, 9]
    assert sample_indices(81, 81, official=True).tolist() == list(range(81))


@pytest.mark.parametrize("n, differ", [(97, 32), (150, 39)])
def test_official_indices_of_long_clips_are_floor_linspace(n, differ):
    official = sample_indices(n, 81, official=True).tolist()
    assert official == numpy_floor_linspace(n, 81)
    assert official == [(n - 1) * i // 80 for i in range(81)]  # exact floor; numpy's float64 agrees for these two
    rounded = sample_indices(n, 81)
    assert (torch.tensor(official) != rounded).sum().item() == differ  # what the trainer's rounding picks apart


def test_official_indices_follow_numpys_float_rounding():
    # 113 -> 81: exactly 112 * 45 / 80 = 63, but numpy's 45 * 1.4 is 62.99999999999999, so frame 62
    assert sample_indices(113, 81, official=True)[45].item() == 62
    assert sample_indices(113, 81, official=True).tolist() == numpy_floor_linspace(113, 81)
    # 62 -> 8: 7 * (61 / 7) is 60.99999999999999; numpy sets the last one to the last frame exactly
    assert sample_indices(62, 8, official=True).tolist() == [0, 8, 17, 26, 34, 43, 52, 61]
    for n, k in [(n, 81) for n in (82, 97, 113, 150, 165, 329, 1000)] + [(62, 8), (116, 8)]:
        assert sample_indices(n, k, official=True).tolist() == np.linspace(0, n - 1, k, dtype=int).tolist()


def test_short_clip_repeats_its_last_frame():
    assert sample_indices(5, 9, official=True).tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 4]
    assert sample_indices(60, 81, official=True).tolist() == list(range(60)) + [59] * 21
    # the trainer's clip sampling is unchanged: repeats spread over the clip
    assert sample_indices(5, 9).tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 4]


def test_latent_frames_are_picked_the_same_way():
    latent = torch.arange(3.0).view(1, 3, 1, 1).expand(16, 3, 2, 2)
    assert resample_latent(latent, (5, 2, 2))[0, :, 0, 0].tolist() == [0, 1, 2, 2, 2]
    latent = torch.arange(12.0).view(1, 12, 1, 1).expand(16, 12, 2, 2)
    assert resample_latent(latent, (9, 2, 2))[0, :, 0, 0].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 11]


# --- the resize, through ComfyUI's common_upscale ----------------------------------------------------------------

def striped(frames: int = 1, height: int = 16, width: int = 32) -> torch.Tensor:
    """A 2:1 clip: red in the 4 leftmost and 4 rightmost columns, black elsewhere; green = frame index / 100."""
    video = torch.zeros(frames, height, width, 3)
    video[:, :, :4, 0] = video[:, :, -4:, 0] = 1.0
    video[..., 1] = torch.arange(frames).view(-1, 1, 1) / 100
    return video


def test_stretch_keeps_the_edges_and_crop_cuts_them(comfy):
    ca = host.pack("nodes.comfy_adapter")
    stretched = ca.resize_frames(striped(), 32, 32, crop="disabled")
    cropped = ca.resize_frames(striped(), 32, 32, crop="center")
    assert stretched.shape == cropped.shape == (1, 32, 32, 3)
    # stretched: every column kept, 32 wide to 32 wide, so the edge columns are exactly the red stripes
    assert (stretched[0, :, :4, 0] == 1).all() and (stretched[0, :, -4:, 0] == 1).all()
    assert (stretched[0, :, 4:-4, 0] == 0).all()
    # cropped to 1:1: the middle 16 columns (8..23) scaled up, no red left anywhere
    assert (cropped[..., 0] == 0).all()


class PassThroughVAE:
    """Stands in for the Wan2.1 VAE (8x spatial stride): ``encode`` hands back the prepared frames, so the test sees
    what it would get."""

    def spacial_compression_encode(self):
        return 8

    def encode(self, frames):
        return frames[None]


@pytest.mark.parametrize("n, picked", [(12, [0, 1, 2, 4, 5, 6, 8, 9, 11]), (5, [0, 1, 2, 3, 4, 4, 4, 4, 4])])
def test_encode_frames_prepares_images_as_dit_mem_does(comfy, n, picked):
    mn = host.pack("nodes.memory_nodes")
    shape = (3, 4, 4)  # 9 frames at 32x32
    out = mn.encode_frames(PassThroughVAE(), striped(n), shape)
    assert out.shape == (9, 32, 32, 3)
    torch.testing.assert_close(out[:, 0, 0, 1], torch.tensor(picked) / 100)
    assert (out[:, :, :4, 0] == 1).all() and (out[:, :, -4:, 0] == 1).all()  # stretched by default
    cropped = mn.encode_frames(PassThroughVAE(), striped(n), shape, "crop")
    assert (cropped[..., 0] == 0).all()
    torch.testing.assert_close(cropped[:, 0, 0, 1], torch.tensor(picked) / 100)
    with pytest.raises(ValueError, match="resize must be one of"):
        mn.encode_frames(PassThroughVAE(), striped(n), shape, "center")


def test_node_defaults_to_the_official_stretch(comfy, encoder, wan_vae):
    mn = host.pack("nodes.memory_nodes")
    (resize,) = [i for i in mn.EncodeReferenceVideo.define_schema().inputs if i.id == "resize"]
    assert resize.default == "stretch (official)" and resize.options == ["stretch (official)", "crop"]
    frames = striped(9, 40, 80)
    run = lambda **kw: comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, images=frames,  # noqa: E731
                                 vae=wan_vae, **kw)[0].latents
    default, stretched, cropped = run(), run(resize="stretch (official)"), run(resize="crop")
    torch.testing.assert_close(default, stretched)
    assert not torch.allclose(default, cropped)


def test_memory_bank_prepares_videos_as_the_node_does_by_default(comfy, encoder, wan_vae, tmp_path, monkeypatch):
    """A 2:1 video (the tiny encoder wants a square) in a bank: its latents are Encode Reference Video's default
    (stretch), not its crop."""
    from fractions import Fraction

    from comfy_api.latest import InputImpl, Types

    monkeypatch.setattr(comfy.folder_paths, "get_input_directory", lambda: str(tmp_path))
    monkeypatch.setattr(comfy.folder_paths, "get_user_directory", lambda: str(tmp_path / "user"))
    (tmp_path / "bank").mkdir()
    video = striped(7, 40, 80)
    video[..., 2] = torch.rand(7, 40, 80, generator=torch.Generator().manual_seed(0))
    components = Types.VideoComponents(images=video, frame_rate=Fraction(8))
    InputImpl.VideoFromComponents(components).save_to(str(tmp_path / "bank" / "wide.mp4"))
    (tmp_path / "bank" / "wide.txt").write_text("a wide striped clip")
    clip = comfy.run("MemLearnerTestTinyTextEncoder", seed=0)[0]
    positive = comfy.run("CLIPTextEncode", clip=clip, text="a wide striped clip")[0]
    banked = comfy.run("MemLearnerReferenceMemoryBank", memory_encoder=encoder, clip=clip, positive=positive,
                       vae=wan_vae, folder="bank", top_k=1)[0].latents
    frames = host.pack("nodes.comfy_adapter").read_video(tmp_path / "bank" / "wide.mp4")
    run = lambda **kw: comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, images=frames,  # noqa: E731
                                 vae=wan_vae, **kw)[0].latents
    torch.testing.assert_close(banked, run())
    assert not torch.allclose(banked, run(resize="crop"))
