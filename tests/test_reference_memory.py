"""DiT-Mem: the memory encoder, its checkpoint format, exact de-duplication and the injection into Wan2.1."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from memlearner_core.attention import MemoryKV, attention_with_memory
from memlearner_core.checkpoint_io import CheckpointError, load_memory_encoder
from memlearner_core.memory_encoder import EncoderConfig, MemoryEncoder
from memlearner_core.memory_tokens import MemoryTokens

import tiny_models
from forward import model_forward, rel_err

# --- encoder and checkpoints (no host needed) -----------------------------------------------------------------

def count_params(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in MemoryEncoder(cfg).parameters())


def test_released_480p_config_has_38_tensors_and_78_8m_parameters():
    with torch.device("meta"):
        enc = MemoryEncoder(EncoderConfig())
    assert len(list(enc.named_parameters())) == 38
    assert round(count_params(EncoderConfig()) / 1e6, 1) == 78.8


def test_720p_config_is_the_papers_154m_encoder():
    assert round(count_params(EncoderConfig(latent_shape=(21, 90, 160))) / 1e6) == 154


def official_tiny_encoder():
    """Tiny channels, but the released 480p latent shape, so the file carries no metadata at all."""
    enc = MemoryEncoder(EncoderConfig(hidden_channels=(8, 12), width=256, latent_shape=(21, 60, 104)))
    tiny_models.randomize(enc, 5)
    return enc


@pytest.mark.parametrize("prefix", ["pipe.dit_mem.", "dit_mem.", ""])
def test_official_key_layout_loads_every_parameter(tmp_path, prefix):
    enc = official_tiny_encoder()
    tiny_models.write_official_encoder(enc, tmp_path / "m.safetensors", prefix=prefix)
    loaded = load_memory_encoder(tmp_path / "m.safetensors")
    assert loaded.cfg.latent_shape == (21, 60, 104) and loaded.cfg.width == 256
    for name, p in enc.named_parameters():
        torch.testing.assert_close(dict(loaded.named_parameters())[name], p.to(torch.bfloat16).float())


def test_14b_width_encoder_loads(tmp_path):
    enc = MemoryEncoder(EncoderConfig(hidden_channels=(4, 8), width=5120, heads=8, latent_shape=(21, 60, 104)))
    tiny_models.write_official_encoder(enc, tmp_path / "m.safetensors")
    assert load_memory_encoder(tmp_path / "m.safetensors").cfg.width == 5120


def test_missing_parameter_is_named(tmp_path):
    enc = official_tiny_encoder()
    sd = {"dit_mem." + k: v.detach() for k, v in enc.named_parameters() if k != "self_attention.norm_k.weight"}
    save_file(sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="missing parameters: self_attention.norm_k.weight"):
        load_memory_encoder(tmp_path / "m.safetensors")


def test_unexpected_tensor_is_named(tmp_path):
    sd = {k: v.detach() for k, v in official_tiny_encoder().named_parameters()}
    sd["extra.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensors: extra.weight"):
        load_memory_encoder(tmp_path / "m.safetensors")


def test_wrong_shape_is_named(tmp_path):
    sd = {k: v.detach() for k, v in official_tiny_encoder().named_parameters()}
    sd["self_attention.q.bias"] = torch.zeros(7)
    save_file(sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="wrong shapes: self_attention.q.bias"):
        load_memory_encoder(tmp_path / "m.safetensors")


def test_pickled_checkpoint_is_refused_with_conversion_hint(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "enc.pt")
    with pytest.raises(CheckpointError, match="pickled.*safetensors"):
        load_memory_encoder(tmp_path / "enc.pt")
    (tmp_path / "enc.safetensors").write_bytes((tmp_path / "enc.pt").read_bytes())
    with pytest.raises(CheckpointError, match="pickled"):
        load_memory_encoder(tmp_path / "enc.safetensors")


def test_corrupt_file_is_refused(tmp_path):
    tiny_models.write_official_encoder(official_tiny_encoder(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_memory_encoder(tmp_path / "m.safetensors")


def test_same_file_always_gives_the_same_tokens(tmp_path):
    tiny_models.write_official_encoder(official_tiny_encoder(), tmp_path / "m.safetensors")
    x = torch.randn(1, 2, 16, 21, 60, 104)
    a = load_memory_encoder(tmp_path / "m.safetensors")(x)
    b = load_memory_encoder(tmp_path / "m.safetensors")(x)
    assert torch.equal(a, b)


def test_released_shape_gives_one_distinct_token_per_video_and_branch():
    enc = official_tiny_encoder().eval()
    tokens = enc(torch.randn(1, 5, 16, 21, 60, 104))
    assert tokens.shape == (1, 1000, 256)
    assert MemoryTokens.deduplicated(tokens).tokens.shape[1] == 10


# --- exact de-duplication ---------------------------------------------------------------------------------------

def test_deduplicated_memory_attention_equals_full_token_attention(seeded):
    heads, d = 4, 16
    q, k, v = (torch.randn(2, 37, heads * d, dtype=torch.float64).float() for _ in range(3))
    distinct = torch.randn(2, 3, heads * d)
    tokens = distinct.repeat_interleave(torch.tensor([5, 1, 9]), dim=1)  # 15 tokens, 3 distinct
    mk, mv = torch.randn(heads * d, heads * d) / 8, torch.randn(heads * d, heads * d) / 8
    full = attention_with_memory(q, k, v, heads, MemoryKV(tokens @ mk, tokens @ mv))
    dedup = MemoryTokens.deduplicated(tokens)
    assert dedup.tokens.shape[1] == 3
    fast = attention_with_memory(q, k, v, heads, MemoryKV(dedup.tokens @ mk, dedup.tokens @ mv, dedup.log_weight))
    assert rel_err(fast, full) < 1e-5


def test_strength_scales_memory_like_duplicated_keys(seeded):
    heads, d = 2, 8
    q, k, v = (torch.randn(1, 11, heads * d) for _ in range(3))
    mem = torch.randn(1, 2, heads * d)
    doubled = attention_with_memory(q, k, v, heads, MemoryKV(mem.repeat(1, 2, 1), mem.repeat(1, 2, 1)))
    strength2 = MemoryTokens.full(mem).with_strength(2.0)
    out = attention_with_memory(q, k, v, heads, MemoryKV(mem, mem, strength2.log_weight))
    assert rel_err(out, doubled) < 1e-5


# --- injection into ComfyUI's Wan -------------------------------------------------------------------------------

def test_reference_latents_are_normalized_like_the_sampled_latent(comfy, wan_model, encoder):
    latents = reference_latents(4)
    memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent=latents)[0]
    torch.testing.assert_close(memory.latents[0], wan_model.model.process_latent_in(latents["samples"]))


def reference_latents(seed, n=2):
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(n, 16, 13, 16, 16, generator=g)}


@pytest.fixture(scope="module")
def memory(comfy, encoder):
    return comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent=reference_latents(0))[0]


def inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 3, 8, 8, generator=g), torch.tensor([700.0, 700.0][:batch]),
            torch.randn(batch, 512, 4096, generator=g))


@pytest.mark.parametrize("deduplicate", [True, False])
@pytest.mark.parametrize("cond_or_uncond", [[0], [0, 1]], ids=["cfg1", "cfg_batch"])
def test_injection_equals_appending_tokens_in_every_block(comfy, wan_model, encoder, deduplicate, cond_or_uncond):
    import reference_wan

    memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent=reference_latents(0),
                       deduplicate=deduplicate)[0]
    patched = comfy.run("MemLearnerApplyReferenceMemory", model=wan_model, memory=memory)[0]
    x, t, txt = inputs(len(cond_or_uncond))
    out = model_forward(patched, x, t, txt, cond_or_uncond)
    with torch.no_grad():
        tokens = encoder.model(memory.latents.to(next(encoder.model.parameters()).device)).float().cpu()
    ref = reference_wan.dit_mem_reference(wan_model.model.diffusion_model, x, t, txt, tokens)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out, model_forward(wan_model, x, t, txt)) > 1e-3  # the memory does change the output


def test_strength_zero_is_exactly_the_unpatched_model(comfy, wan_model, encoder):
    memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent=reference_latents(0),
                       strength=0.0)[0]
    patched = comfy.run("MemLearnerApplyReferenceMemory", model=wan_model, memory=memory)[0]
    x, t, txt = inputs(1)
    assert torch.equal(model_forward(patched, x, t, txt), model_forward(wan_model, x, t, txt))


def test_input_model_stays_unpatched(comfy, wan_model, memory):
    x, t, txt = inputs(1)
    before = model_forward(wan_model, x, t, txt)
    comfy.run("MemLearnerApplyReferenceMemory", model=wan_model, memory=memory)
    assert torch.equal(model_forward(wan_model, x, t, txt), before)
    assert "memlearner" not in str(wan_model.model_options) + str(wan_model.wrappers)


def test_two_memories_do_not_see_each_other(comfy, wan_model, encoder):
    mem_a = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent=reference_latents(1))[0]
    mem_b = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent=reference_latents(2))[0]
    a = comfy.run("MemLearnerApplyReferenceMemory", model=wan_model, memory=mem_a)[0]
    b = comfy.run("MemLearnerApplyReferenceMemory", model=wan_model, memory=mem_b)[0]
    x, t, txt = inputs(1)
    out_a, out_b = model_forward(a, x, t, txt), model_forward(b, x, t, txt)
    assert rel_err(out_a, out_b) > 1e-3
    assert torch.equal(model_forward(a, x, t, txt), out_a)


def test_memory_width_must_match_the_model(comfy, wan_model, tmp_path):
    enc = MemoryEncoder(EncoderConfig(hidden_channels=(8, 12), width=128, latent_shape=(13, 16, 16)))
    from memlearner_core.checkpoint_io import save_memory_encoder

    path = Path(comfy.folder_paths.get_folder_paths("memory_encoders")[0]) / "narrow.safetensors"
    save_memory_encoder(enc, path)
    try:
        narrow = comfy.run("MemLearnerLoadMemoryEncoder", encoder_name="narrow.safetensors", dtype="fp32")[0]
        memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=narrow, latent=reference_latents(0))[0]
        with pytest.raises(ValueError, match="128-wide tokens but this Wan model is 256 wide"):
            comfy.run("MemLearnerApplyReferenceMemory", model=wan_model, memory=memory)
    finally:
        path.unlink()


def test_reference_images_are_encoded_through_the_wan_vae(comfy, encoder, wan_vae):
    frames = torch.rand(9, 40, 40, 3)
    memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, images=frames, vae=wan_vae)[0]
    assert memory.latents.shape == (1, 1, 16, 13, 16, 16)
    assert torch.isfinite(memory.tokens().tokens).all()


def test_empty_videos_are_refused(comfy, encoder, wan_vae):
    with pytest.raises(ValueError, match="at least one frame"):
        comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, images=torch.rand(0, 32, 32, 3), vae=wan_vae)


def test_non_wan21_vae_is_refused(comfy, encoder):
    sd_vae = type("FakeVAE", (), {"first_stage_model": torch.nn.Identity(), "latent_channels": 4,  # an SD VAE
                                   "encode": lambda self, x: x, "decode": lambda self, z: z})()
    with pytest.raises(ValueError, match="needs the Wan2.1 VAE"):
        comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, images=torch.rand(5, 32, 32, 3), vae=sd_vae)


def test_memory_graph_runs_in_the_real_sampler(comfy, wan_model, memory, text_cond):
    patched = comfy.run("MemLearnerApplyReferenceMemory", model=wan_model, memory=memory)[0]
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    out = comfy.run("KSampler", model=patched, seed=3, steps=2, cfg=2.0, sampler_name="euler", scheduler="simple",
                    positive=text_cond[0], negative=text_cond[1], latent_image=latent, denoise=1.0)[0]
    assert out["samples"].shape == (1, 16, 2, 8, 8) and torch.isfinite(out["samples"]).all()
