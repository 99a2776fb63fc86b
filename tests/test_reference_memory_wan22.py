"""DiT-Mem on Wan2.2 TI2V-5B: 48-channel encoders, the Wan2.2 VAE, and encoders refused on the other family."""

import shutil

import pytest
import torch

from memlearner_core.training.config import config_from_dict
from memlearner_core.training.trainer import train

import host
import tiny_models
from forward import model_forward, rel_err


def wan22_latents(seed, n=2, shape=(13, 13, 13)):
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(n, 48, *shape, generator=g)}


def inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 48, 3, 8, 8, generator=g), torch.tensor([700.0, 700.0][:batch]),
            torch.randn(batch, 512, 4096, generator=g))


# --- Encode Reference Video with the Wan2.2 VAE -------------------------------------------------------------------

def test_wan22_vae_is_accepted_and_reference_frames_become_48_channel_latents(comfy, wan22_encoder, wan22_vae):
    memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=wan22_encoder, images=torch.rand(9, 40, 40, 3),
                       vae=wan22_vae)[0]
    assert memory.latents.shape == (1, 1, 48, 13, 13, 13)
    assert torch.isfinite(memory.tokens().tokens).all()


def test_reference_frames_are_sized_by_the_vaes_own_spatial_stride(wan22_vae):
    encode_frames = host.pack("nodes.memory_nodes").encode_frames
    latent = encode_frames(wan22_vae, torch.rand(5, 30, 30, 3), (2, 4, 6))  # frames scaled to 64x96, 16x stride
    assert latent.shape == (48, 2, 4, 6)


def test_wan22_reference_latents_are_normalized_like_the_5b_samples(comfy, wan22_5b, wan22_encoder):
    latents = wan22_latents(4)
    memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=wan22_encoder, latent=latents)[0]
    torch.testing.assert_close(memory.latents[0], wan22_5b.model.process_latent_in(latents["samples"]))


def test_wan21_vae_with_a_48_channel_encoder_is_refused_naming_both(comfy, wan22_encoder, wan_vae):
    with pytest.raises(ValueError, match=r"the VAE makes Wan2.1 .*latents \(16 channels\) but the memory encoder "
                                         r"reads Wan2.2 TI2V-5B latents \(48 channels\)"):
        comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=wan22_encoder, images=torch.rand(5, 32, 32, 3),
                  vae=wan_vae)


def test_16_channel_latents_are_refused_by_a_48_channel_encoder(comfy, wan22_encoder):
    with pytest.raises(ValueError, match=r"latent must be Wan2.2 TI2V-5B video latents \[B, 48, T, H, W\]"):
        comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=wan22_encoder,
                  latent={"samples": torch.randn(1, 16, 13, 13, 13)})


def test_memory_bank_refuses_a_vae_of_the_other_family(comfy, encoder, wan22_vae, text_cond):
    with pytest.raises(ValueError, match=r"Reference Memory Bank: the VAE makes Wan2.2 TI2V-5B latents"):
        comfy.run("MemLearnerReferenceMemoryBank", memory_encoder=encoder, clip=None, positive=text_cond[0],
                  vae=wan22_vae, folder="memory_bank")


# --- Apply Reference Memory on the 5B -----------------------------------------------------------------------------

@pytest.mark.parametrize("cond_or_uncond", [[0], [0, 1]], ids=["cfg1", "cfg_batch"])
def test_injection_on_the_5b_equals_appending_tokens_in_every_block(comfy, wan22_5b, wan22_encoder, cond_or_uncond):
    import reference_wan

    def memory(deduplicate):
        return comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=wan22_encoder, latent=wan22_latents(0),
                         deduplicate=deduplicate)[0]

    x, t, txt = inputs(len(cond_or_uncond))
    every_token = memory(False).tokens().tokens.float().cpu()
    ref = reference_wan.dit_mem_reference(wan22_5b.model.diffusion_model, x, t, txt, every_token)
    patched = comfy.run("MemLearnerApplyReferenceMemory", model=wan22_5b, memory=memory(True))[0]
    assert rel_err(model_forward(patched, x, t, txt, cond_or_uncond), ref) < 1e-5
    assert rel_err(ref, model_forward(wan22_5b, x, t, txt)) > 1e-3  # the memory does change the output


def test_released_16_channel_encoder_is_refused_on_the_5b_naming_both(comfy, wan22_5b, encoder):
    memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder,
                       latent={"samples": torch.randn(1, 16, 13, 16, 16)})[0]
    with pytest.raises(ValueError, match=r"the memory encoder is for Wan2.1 .*\(16 latent channels, 256-wide tokens\) "
                                         r"but this model is Wan2.2 TI2V-5B \(48 latent channels, 256 wide\)"):
        comfy.run("MemLearnerApplyReferenceMemory", model=wan22_5b, memory=memory)


def test_48_channel_encoder_is_refused_on_wan21_naming_both(comfy, wan_model, wan22_encoder):
    memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=wan22_encoder, latent=wan22_latents(1))[0]
    with pytest.raises(ValueError, match=r"the memory encoder is for Wan2.2 TI2V-5B \(48 latent channels, 256-wide "
                                         r"tokens\) but this model is Wan2.1 .*\(16 latent channels, 256 wide\)"):
        comfy.run("MemLearnerApplyReferenceMemory", model=wan_model, memory=memory)


# --- the encoder recipe on the 5B ---------------------------------------------------------------------------------

def encoder_items(n=3, k=2):
    """48-channel clips large enough for the encoder's convolutions, each with the next ``k`` as references."""
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(48, 13, 13, 13, generator=g) for _ in range(n)]
    texts = [torch.randn(1, 8, 4096, generator=g) for _ in range(n)]
    return [(latents[i], [latents[(i + j) % n] for j in range(1, k + 1)], texts[i]) for i in range(n)]


def encoder_config(tmp_path, **kw):
    data = dict(recipe="encoder", data_dir="data", output_dir=str(tmp_path / "run"), model_file="m", vae_file="v",
                steps=12, lr=1e-3, checkpoint_every=100, mixed_precision="fp32", clip_frames=49, width=208,
                height=208)
    return config_from_dict({**data, **kw}, tmp_path)


def fresh_wan22(comfy):
    return comfy.run("UNETLoader", unet_name=tiny_models.WAN22_5B_FILE, weight_dtype="default")[0]


def test_encoder_recipe_on_the_5b_trains_a_48_channel_encoder_whose_loss_falls(comfy, tmp_path):
    cfg = encoder_config(tmp_path)
    recipe = host.pack("nodes.training_host").EncoderRecipe(fresh_wan22(comfy), cfg, (13, 13, 13))
    assert recipe.encoder.cfg.in_channels == 48
    losses = train(cfg, recipe, encoder_items()).losses
    assert sum(losses[-4:]) < sum(losses[:4])


def test_encoder_trained_on_the_5b_loads_in_the_nodes_and_runs_as_trained(comfy, tmp_path):
    mp = host.pack("nodes.memory_patch")
    cfg = encoder_config(tmp_path, steps=2)
    recipe = host.pack("nodes.training_host").EncoderRecipe(fresh_wan22(comfy), cfg, (13, 13, 13))
    (encoder_file,) = train(cfg, recipe, encoder_items()).exported
    folder = host.Path(comfy.folder_paths.get_folder_paths("memory_encoders")[0])
    shutil.copy(encoder_file, folder / "trained_wan22_encoder.safetensors")
    try:
        enc = comfy.run("MemLearnerLoadMemoryEncoder", encoder_name="trained_wan22_encoder.safetensors",
                        dtype="fp32")[0]
        refs = torch.stack(encoder_items()[0][1])
        memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=enc, latent={"samples": refs},
                           deduplicate=False)[0]
        model = comfy.run("MemLearnerApplyReferenceMemory", model=recipe.model, memory=memory)[0]
        x, t, txt = inputs(1)
        recipe.encoder.eval()  # the nodes run the encoder in eval mode: no dropout, running statistics
        trained = mp.apply_memory(recipe.model, memory=mp.TrainableMemory(memory.latents, recipe.encoder))
        torch.testing.assert_close(model_forward(model, x, t, txt), model_forward(trained, x, t, txt))
    finally:
        (folder / "trained_wan22_encoder.safetensors").unlink()


def test_encoder_file_of_the_other_family_is_refused_for_training_naming_both(comfy, models_dir, tmp_path):
    cfg = encoder_config(tmp_path, encoder_file=str(models_dir / "memory_encoders" / tiny_models.ENCODER_FILE))
    with pytest.raises(ValueError, match=r"encoder_file tiny_dit_mem.safetensors: the memory encoder is for Wan2.1 "
                                         r".*but this model is Wan2.2 TI2V-5B"):
        host.pack("nodes.training_host").EncoderRecipe(fresh_wan22(comfy), cfg, (13, 16, 16))
