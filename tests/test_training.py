"""Training on ComfyUI's own Wan2.1 (tiny fixture): the query recipe learns, and its output drives the nodes."""

import shutil

import torch

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
        query = model.get_wrappers("diffusion_model", "memlearner")[0].query
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
