"""Training on ComfyUI's own Wan2.1 (tiny fixture): both recipes learn, and their outputs drive the nodes."""

import dataclasses
import math
import shutil

import pytest
import torch

from memlearner_core.checkpoint_io import load_query_weights
from memlearner_core.training import recipes
from memlearner_core.training.config import config_from_dict
from memlearner_core.training.trainer import train

import host
import tiny_models
from forward import model_forward


def clip_items(n=2, frames=5):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, frames, 8, 8, generator=g), None, torch.randn(1, 8, 4096, generator=g)) for _ in range(n)]


def query_config(tmp_path, **kw):
    data = dict(recipe="query", data_dir="data", output_dir=str(tmp_path / "run"), model_file="m", vae_file="v",
                steps=30, lr=1e-3, checkpoint_every=10, mixed_precision="fp32", query_layers=2,
                predict_latent_frames=2, max_context_multiple=1, clip_frames=17, width=64, height=64)
    data.update(kw)
    return config_from_dict(data, tmp_path)


def fresh_wan(comfy):
    return comfy.run("UNETLoader", unet_name=tiny_models.WAN_FILE, weight_dtype="default")[0]


def test_query_recipe_loss_falls_in_thirty_steps(comfy, tmp_path):
    recipe = host.pack("nodes.training_host").QueryRecipe(fresh_wan(comfy), query_config(tmp_path))
    result = train(query_config(tmp_path), recipe, clip_items())
    assert len(result.losses) == 30
    assert sum(result.losses[-10:]) < sum(result.losses[:10])


def test_query_recipe_trains_with_the_learned_policy_routing_in_each_query_layer(comfy, tmp_path, monkeypatch):
    th = host.pack("nodes.training_host")
    mp = host.pack("nodes.memory_patch")
    routes = []
    real = mp.routing.route
    monkeypatch.setattr(mp.routing, "route", lambda mass, budget: routes.append((len(mass), budget)) or
                        real(mass, budget))
    cfg = query_config(tmp_path, steps=12, context_policies=["learned"], max_context_multiple=4, clip_frames=33,
                       gradient_checkpointing=True)
    result = train(cfg, th.QueryRecipe(fresh_wan(comfy), cfg), clip_items(frames=9))
    assert len(result.losses) == 12 and all(math.isfinite(v) for v in result.losses)
    assert routes and all(budget < n for n, budget in routes)  # layers read fewer frames than they were handed


def test_query_fine_tune_loads_in_the_nodes(comfy, tmp_path):
    th = host.pack("nodes.training_host")
    cfg = query_config(tmp_path, steps=4)
    recipe = th.QueryRecipe(fresh_wan(comfy), cfg)
    result = train(cfg, recipe, clip_items())
    wan_file, query_file = result.exported
    models = host.Path(comfy.folder_paths.get_folder_paths("diffusion_models")[0])
    weights = host.Path(comfy.folder_paths.get_folder_paths("memlearner")[0])
    shutil.copy(wan_file, models / "trained_wan.safetensors")
    shutil.copy(query_file, weights / "trained_query.safetensors")
    try:
        tuned = comfy.run("UNETLoader", unet_name="trained_wan.safetensors", weight_dtype="default")[0]
        history = {"samples": torch.randn(1, 16, 3, 8, 8)}
        model = comfy.run("MemLearnerApplyQueryMemory", model=tuned, context=history, query_layers=2,
                          query_weights="trained_query.safetensors")[0]
        x, t, txt = torch.randn(1, 16, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 8, 4096)
        out = model_forward(model, x, t, txt, run_seed=1)
        recipe.dm.eval()  # the nodes run exactly what was trained
        query = model.get_attachment("memlearner").query
        trained = model_forward(host.pack("nodes.memory_patch").apply_memory(recipe.model, query=query), x, t, txt,
                                run_seed=1)
        torch.testing.assert_close(out, trained)
    finally:
        (models / "trained_wan.safetensors").unlink()
        (weights / "trained_query.safetensors").unlink()


def test_training_resumes_from_its_last_checkpoint(comfy, tmp_path):
    th = host.pack("nodes.training_host")
    train(query_config(tmp_path, steps=10), th.QueryRecipe(fresh_wan(comfy), query_config(tmp_path)), clip_items())
    result = train(query_config(tmp_path, steps=14), th.QueryRecipe(fresh_wan(comfy), query_config(tmp_path)),
                   clip_items())
    assert result.start_step == 10 and len(result.losses) == 4


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_gradients(comfy, tmp_path):
    recipe = host.pack("nodes.training_host").QueryRecipe(fresh_wan(comfy), query_config(tmp_path))
    calls = []
    recipe.dm.blocks[0].self_attn.q.register_forward_hook(lambda *_: calls.append(1))
    grads, counts = [], []
    for checkpointing in (False, True):
        recipe.cfg = dataclasses.replace(recipe.cfg, gradient_checkpointing=checkpointing)
        calls.clear()
        recipe(clip_items()[0], torch.Generator().manual_seed(5)).backward()
        grads.append({n: p.grad.clone() for n, p in recipe.trainable().items() if p.grad is not None})
        recipe.zero_grad()
        counts.append(len(calls))
    assert counts[1] == 2 * counts[0]  # block 0 ran again in the backward pass
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_lora_trains_only_the_adapters_and_loads_with_comfyuis_lora_loader(comfy, tmp_path):
    th = host.pack("nodes.training_host")
    cfg = query_config(tmp_path, steps=4, lora_rank=4)
    recipe = th.QueryRecipe(fresh_wan(comfy), cfg)
    assert all(".lora_" in n or n.startswith("camera.") for n in recipe.trainable())
    before = recipe.dm.blocks[0].self_attn.q.base_layer.weight.clone()
    result = train(cfg, recipe, clip_items())
    assert torch.equal(recipe.dm.blocks[0].self_attn.q.base_layer.weight, before)
    lora_file, query_file = result.exported
    assert lora_file.name == recipes.LORA_EXPORT
    loras = host.Path(comfy.folder_paths.get_folder_paths("loras")[0])
    weights = host.Path(comfy.folder_paths.get_folder_paths("memlearner")[0])
    shutil.copy(lora_file, loras / "trained_lora.safetensors")
    shutil.copy(query_file, weights / "trained_lora_query.safetensors")
    try:
        tuned = comfy.run("LoraLoaderModelOnly", model=fresh_wan(comfy), lora_name="trained_lora.safetensors",
                          strength_model=1.0)[0]
        model = comfy.run("MemLearnerApplyQueryMemory", model=tuned, context={"samples": torch.randn(1, 16, 3, 8, 8)},
                          query_layers=2, query_weights="trained_lora_query.safetensors")[0]
        from comfy import model_management

        model_management.load_models_gpu([model])  # ComfyUI merges the LoRA into the weights on load
        x, t, txt = torch.randn(1, 16, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 8, 4096)
        out = model_forward(model, x, t, txt, run_seed=1)
        query = model.get_attachment("memlearner").query
        trained = model_forward(host.pack("nodes.memory_patch").apply_memory(recipe.model, query=query), x, t, txt,
                                run_seed=1)
        assert not torch.allclose(recipe.dm.blocks[0].self_attn.q(x.new_ones(1, 4, 256)),
                                  recipe.dm.blocks[0].self_attn.q.base_layer(x.new_ones(1, 4, 256)))
        torch.testing.assert_close(out, trained, rtol=1e-4, atol=1e-4)
    finally:
        (loras / "trained_lora.safetensors").unlink()
        (weights / "trained_lora_query.safetensors").unlink()


def encoder_items(n=3, k=2):
    """Clips long and large enough for the tiny encoder's convolutions (13 latent frames, 16x16)."""
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(16, 13, 16, 16, generator=g) for _ in range(n)]
    texts = [torch.randn(1, 8, 4096, generator=g) for _ in range(n)]
    return [(latents[i], [latents[j] for j in range(n) if j != i][:k], texts[i]) for i in range(n)]


def encoder_config(tmp_path, models_dir, **kw):
    kw = {"encoder_file": str(models_dir / "memory_encoders" / tiny_models.ENCODER_FILE), **kw}
    return query_config(tmp_path, recipe="encoder", clip_frames=49, width=128, height=128, **kw)


def test_encoder_recipe_loss_falls_in_thirty_steps(comfy, models_dir, tmp_path):
    cfg = encoder_config(tmp_path, models_dir)
    recipe = host.pack("nodes.training_host").EncoderRecipe(fresh_wan(comfy), cfg, (13, 16, 16))
    result = train(cfg, recipe, encoder_items())
    assert len(result.losses) == 30
    assert sum(result.losses[-10:]) < sum(result.losses[:10])


def test_encoder_recipe_trains_the_encoder_against_a_frozen_wan(comfy, models_dir, tmp_path):
    cfg = encoder_config(tmp_path, models_dir, steps=3)
    recipe = host.pack("nodes.training_host").EncoderRecipe(fresh_wan(comfy), cfg, (13, 16, 16))
    wan_before = {k: v.clone() for k, v in recipe.dm.state_dict().items()}
    enc_before = {k: v.clone() for k, v in recipe.encoder.state_dict().items()}
    assert all(n.startswith("encoder.") for n in recipe.trainable())
    train(cfg, recipe, encoder_items())
    assert all(torch.equal(v, wan_before[k]) for k, v in recipe.dm.state_dict().items())
    assert not torch.equal(recipe.encoder.high_pass_module.feature_proj.weight,
                           enc_before["high_pass_module.feature_proj.weight"])


def test_trained_encoder_loads_in_the_nodes(comfy, models_dir, tmp_path):
    th, mp = host.pack("nodes.training_host"), host.pack("nodes.memory_patch")
    cfg = encoder_config(tmp_path, models_dir, steps=3)
    recipe = th.EncoderRecipe(fresh_wan(comfy), cfg, (13, 16, 16))
    (encoder_file,) = train(cfg, recipe, encoder_items()).exported
    folder = host.Path(comfy.folder_paths.get_folder_paths("memory_encoders")[0])
    shutil.copy(encoder_file, folder / "trained_encoder.safetensors")
    try:
        enc = comfy.run("MemLearnerLoadMemoryEncoder", encoder_name="trained_encoder.safetensors", dtype="fp32")[0]
        refs = encoder_items()[0][1]
        memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=enc,
                           latent={"samples": torch.stack(refs)}, deduplicate=True)[0]
        model = comfy.run("MemLearnerApplyReferenceMemory", model=fresh_wan(comfy), memory=memory)[0]
        x, t, txt = torch.randn(1, 16, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 8, 4096)
        out = model_forward(model, x, t, txt)
        recipe.encoder.eval()  # the nodes run the encoder in eval mode: no dropout, running statistics
        refs_in = host.pack("nodes.comfy_adapter").wan21_latent_in(torch.stack(refs)).unsqueeze(0)
        trained = model_forward(mp.apply_memory(recipe.model, memory=mp.TrainableMemory(refs_in, recipe.encoder)),
                                x, t, txt)
        torch.testing.assert_close(out, trained, rtol=1e-4, atol=1e-4)
    finally:
        (folder / "trained_encoder.safetensors").unlink()


def test_an_encoder_of_another_width_is_refused_naming_both(comfy, models_dir, tmp_path):
    from memlearner_core.checkpoint_io import save_memory_encoder
    from memlearner_core.memory_encoder import EncoderConfig, MemoryEncoder

    wide = tmp_path / "wide.safetensors"
    save_memory_encoder(MemoryEncoder(EncoderConfig(**{**tiny_models.TINY_ENCODER, "width": 512})), wide)
    cfg = encoder_config(tmp_path, models_dir, encoder_file=str(wide))
    with pytest.raises(ValueError, match="512-wide tokens but the model is 256 wide"):
        host.pack("nodes.training_host").EncoderRecipe(fresh_wan(comfy), cfg, (13, 16, 16))


def test_encoder_training_resumes_exactly(comfy, models_dir, tmp_path):
    th = host.pack("nodes.training_host")

    def run(folder, steps):
        cfg = encoder_config(folder, models_dir, steps=steps, checkpoint_every=2)
        recipe = th.EncoderRecipe(fresh_wan(comfy), cfg, (13, 16, 16))
        train(cfg, recipe, encoder_items())
        return recipe.encoder.state_dict()

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4)  # dropout, shuffling and BatchNorm statistics all carry over
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


def recording_denoise_loss(monkeypatch, th):
    """Each call of the recipe's denoise_loss, as (x0 shape, reference count, query memory or None)."""
    calls = []
    original = th.WanRecipe.denoise_loss

    def record(self, x0, text, generator, memory=None, query=None):
        calls.append((tuple(x0.shape), None if memory is None else memory.latents.shape[1], query))
        return original(self, x0, text, generator, memory=memory, query=query)

    monkeypatch.setattr(th.WanRecipe, "denoise_loss", record)
    return calls


def test_encoder_recipe_draws_top_k_references_from_the_pool_each_step(comfy, models_dir, tmp_path, monkeypatch):
    th = host.pack("nodes.training_host")
    calls = recording_denoise_loss(monkeypatch, th)
    drawn = []
    monkeypatch.setattr(recipes, "resample_latent", lambda r, shape: drawn.append(r) or r)
    cfg = encoder_config(tmp_path, models_dir, steps=4, top_k_references=2, reference_pool=4)
    recipe = th.EncoderRecipe(fresh_wan(comfy), cfg, (13, 16, 16))
    pool = encoder_items(n=5, k=4)
    train(cfg, recipe, pool)
    assert [refs for _, refs, _ in calls] == [2] * 4
    sets = [frozenset(id(r) for r in drawn[i:i + 2]) for i in range(0, len(drawn), 2)]
    assert len(set(sets)) > 1  # not always the same two


def test_encoder_window_denoises_a_window_of_the_clip(comfy, models_dir, tmp_path, monkeypatch):
    th = host.pack("nodes.training_host")
    calls = recording_denoise_loss(monkeypatch, th)
    cfg = encoder_config(tmp_path, models_dir, steps=2, encoder_window=2)
    train(cfg, th.EncoderRecipe(fresh_wan(comfy), cfg, (13, 16, 16)), encoder_items())
    assert [shape for shape, _, _ in calls] == [(1, 16, 2, 16, 16)] * 2


def test_query_recipe_continues_from_a_query_file(comfy, tmp_path):
    th = host.pack("nodes.training_host")
    cfg = query_config(tmp_path / "first", steps=2)
    _, query_file = train(cfg, th.QueryRecipe(fresh_wan(comfy), cfg), clip_items()).exported
    again = th.QueryRecipe(fresh_wan(comfy), query_config(tmp_path, query_file=str(query_file)))
    saved = load_query_weights(query_file).camera
    assert torch.equal(again.camera.proj.weight.detach(), saved["proj.weight"])
    assert again.camera.proj.weight.requires_grad
    with pytest.raises(ValueError, match="query_layers = 2, but the config says 3: set query_layers = 2"):
        th.QueryRecipe(fresh_wan(comfy), query_config(tmp_path, query_file=str(query_file), query_layers=3))


def test_full_query_weights_may_be_fine_tuned_into_pooled_ones_and_not_back(comfy, tmp_path):
    th = host.pack("nodes.training_host")
    cfg = query_config(tmp_path / "full", steps=1)
    _, full = train(cfg, th.QueryRecipe(fresh_wan(comfy), cfg), clip_items()).exported
    pooled_cfg = query_config(tmp_path / "pooled", steps=1, query_file=str(full), query_pool=2)
    _, pooled = train(pooled_cfg, th.QueryRecipe(fresh_wan(comfy), pooled_cfg), clip_items()).exported
    assert load_query_weights(pooled).query_pool == 2
    with pytest.raises(ValueError, match="query_pool = 2, but the config says 1: set query_pool = 2"):
        th.QueryRecipe(fresh_wan(comfy), query_config(tmp_path, query_file=str(pooled)))


def fresh_wan22_5b(comfy):
    return comfy.run("UNETLoader", unet_name=tiny_models.WAN22_5B_FILE, weight_dtype="default")[0]


def test_the_training_command_trains_the_tiny_wan22_5b_on_its_own_latents(comfy, models_dir, tmp_path):
    """48-channel clips at 16x the VAE (64x64 frames: 4x4 latents) in the 5B's own latent space; the query
    weights record the family."""
    from memlearner_core.training.dataset import write_latent_clip

    g = torch.Generator().manual_seed(0)
    (tmp_path / "data").mkdir()
    for name in ("a", "b"):
        write_latent_clip(tmp_path / "data" / f"{name}.safetensors", torch.randn(48, 5, 4, 4, generator=g))
    cfg = query_config(tmp_path, steps=3, data_format="latents", text="none", predict_latent_frames=2,
                       model_file=str(models_dir / "diffusion_models" / tiny_models.WAN22_5B_FILE))
    result = host.pack("nodes.training_host").run_training(cfg)
    assert len(result.losses) == 3 and all(map(math.isfinite, result.losses))
    assert load_query_weights(result.exported[1]).model_family == "wan2.2-ti2v-5b"


def test_the_5b_reads_its_clips_in_the_wan22_latent_space(comfy, tmp_path):
    from comfy.latent_formats import Wan22

    recipe = host.pack("nodes.training_host").QueryRecipe(fresh_wan22_5b(comfy), query_config(tmp_path))
    latent = torch.randn(48, 2, 4, 4)
    assert torch.allclose(recipe.latent_in(latent), Wan22().process_in(latent[None])[0], atol=1e-6)


def test_a_width_the_5b_cannot_make_is_refused_in_one_line(comfy, tmp_path):
    th = host.pack("nodes.training_host")
    with pytest.raises(ValueError, match=r"^'width' must be a multiple of 32 for Wan2.2 TI2V-5B \(16x VAE, 2x "
                                         r"patch\), got 80; fix width in the config$"):
        th.check_model_family(query_config(tmp_path, width=80), fresh_wan22_5b(comfy))


def test_a_query_file_of_another_model_family_is_refused(comfy, tmp_path):
    th = host.pack("nodes.training_host")
    cfg = query_config(tmp_path / "first", steps=1)
    _, query_file = train(cfg, th.QueryRecipe(fresh_wan(comfy), cfg), clip_items()).exported
    assert load_query_weights(query_file).model_family == "wan2.1"
    with pytest.raises(ValueError, match="query_file memlearner_query.safetensors was fine-tuned on wan2.1, but "
                                         "model_file is wan2.2-ti2v-5b; use the query file fine-tuned for this"):
        th.QueryRecipe(fresh_wan22_5b(comfy), query_config(tmp_path, query_file=str(query_file)))


def test_view_aligned_rope_is_trained_recorded_and_kept_when_continuing(comfy, tmp_path):
    """A run with ``view_rope_fov`` writes version-3 query weights that record it; continuing them needs the same
    field of view, while weights trained without it may start using it."""
    th = host.pack("nodes.training_host")
    cfg = query_config(tmp_path / "first", steps=2, view_rope_fov=45.0)
    recipe = th.QueryRecipe(fresh_wan(comfy), cfg)
    assert recipe.camera.view_rope_fov == 45.0
    _, query_file = train(cfg, recipe, clip_items()).exported
    assert load_query_weights(query_file).view_rope_fov == 45.0
    with pytest.raises(ValueError, match="view_rope_fov = 45, but the config says 60: set view_rope_fov = 45"):
        th.QueryRecipe(fresh_wan(comfy), query_config(tmp_path, query_file=str(query_file), view_rope_fov=60.0))
    plain = query_config(tmp_path / "plain", steps=2)
    _, plain_file = train(plain, th.QueryRecipe(fresh_wan(comfy), plain), clip_items()).exported
    assert load_query_weights(plain_file).view_rope_fov is None
    switched = th.QueryRecipe(fresh_wan(comfy), query_config(tmp_path, query_file=str(plain_file), view_rope_fov=45.0))
    assert switched.camera.view_rope_fov == 45.0


def test_encoder_trains_with_the_frozen_models_query_memory(comfy, models_dir, tmp_path, monkeypatch):
    th = host.pack("nodes.training_host")
    qcfg = query_config(tmp_path / "first", steps=2)
    _, query_file = train(qcfg, th.QueryRecipe(fresh_wan(comfy), qcfg), clip_items()).exported
    calls = recording_denoise_loss(monkeypatch, th)
    cfg = encoder_config(tmp_path, models_dir, steps=3, query_file=str(query_file), max_context_multiple=2)
    recipe = th.EncoderRecipe(fresh_wan(comfy), cfg, (13, 16, 16))
    camera_before = recipe.camera.proj.weight.clone()
    assert all(n.startswith("encoder.") for n in recipe.trainable())
    before = recipe.encoder.high_pass_module.feature_proj.weight.clone()
    train(cfg, recipe, encoder_items())
    assert all(q is not None and q.query_layers == 2 for _, _, q in calls)
    assert [shape[2] for shape, _, _ in calls] == [2] * 3  # P, the last predict_latent_frames
    assert torch.equal(recipe.camera.proj.weight, camera_before)
    assert not torch.equal(recipe.encoder.high_pass_module.feature_proj.weight, before)
