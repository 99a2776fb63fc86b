"""The Doom world's narrow Wan2.1 VAE: ComfyUI's own class, loaded by ComfyUI as a Wan2.1 VAE, its latents scaled
to Wan2.1's statistics without changing what it reconstructs."""

import sys

import pytest
import torch

import host


@pytest.fixture(scope="module")
def doom_world(comfy):
    """The benchmark's module, imported once ComfyUI is (it puts the pack first on sys.path)."""
    sys.path.insert(0, str(host.ROOT / "benchmarks"))
    import doom_world

    return doom_world


def test_folding_the_latent_scale_keeps_the_reconstruction_and_gives_wan21_statistics(doom_world):
    import comfy.latent_formats

    torch.manual_seed(0)
    vae = doom_world.wan21_vae().eval()
    clips = torch.rand(4, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(clips))
        doom_world.fold_latent_scale(vae, clips)
        z = vae.encode(clips)
        after = vae.decode(z)
    assert torch.allclose(before, after, atol=1e-4)
    fmt = comfy.latent_formats.Wan21()
    zn = fmt.process_in(z)  # what the DiT sees
    assert torch.allclose(zn.mean((0, 2, 3, 4)), torch.zeros(16), atol=1e-3)
    assert torch.allclose(zn.std((0, 2, 3, 4)), torch.ones(16), atol=1e-3)


def test_comfyuis_loader_takes_it_as_a_wan21_vae(doom_world):
    import comfy.sd

    vae = doom_world.wan21_vae()
    loaded = comfy.sd.VAE(sd=vae.state_dict())
    host.pack("nodes.comfy_adapter").check_wan21_vae(loaded)  # what memlearner-train checks
    assert loaded.latent_channels == 16 and loaded.first_stage_model.dim == doom_world.VAE_DIM
    frames = torch.rand(5, 96, 128, 3)
    assert loaded.encode(frames).shape == (1, 16, 2, 12, 16)
