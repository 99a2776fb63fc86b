"""The training recipes' host-free part (memlearner_core.training.recipes): what a step draws and in what order,
checked on a toy host with no Wan at all, and both hosts running that one logic."""

from __future__ import annotations

import pytest
import torch

from memlearner_core.memory_encoder import EncoderConfig, MemoryEncoder
from memlearner_core.training import recipes
from memlearner_core.training.config import config_from_dict
from memlearner_core.training.context_sampling import sample_context
from memlearner_core.training.flow_matching import noisy_latents, sample_sigmas, timesteps

import host


def config(tmp_path, **kw):
    data = dict(recipe="query", data_dir="data", output_dir=str(tmp_path / "run"), model_file="m", steps=2,
                mixed_precision="fp32", query_layers=2, predict_latent_frames=2, max_context_multiple=1,
                clip_frames=17, width=64, height=64, data_format="latents")
    data.update(kw)
    return config_from_dict(data, tmp_path)


class ToyHost:
    """A host whose model is a fixed scale of its input: records what the core hands it."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def latent_in(self, latent):
        return latent * 2 + 1

    def predict(self, x_t, timestep, text, seed, memory, query):
        self.calls.append(dict(x_t=x_t, timestep=timestep, seed=seed, memory=memory, query=query))
        return self.scale * x_t


class ToyQuery(ToyHost, recipes.QueryRecipe):
    camera = None


class ToyEncoder(ToyHost, recipes.EncoderRecipe):
    def __init__(self, cfg):
        super().__init__(cfg)
        torch.manual_seed(0)
        self.encoder = MemoryEncoder(EncoderConfig(width=256, latent_shape=(13, 16, 16)))
        self.camera = None


def test_query_step_draws_context_then_noise_sigma_and_seed(tmp_path):
    cfg = config(tmp_path)
    g = torch.Generator().manual_seed(3)
    latent, text = torch.randn(16, 5, 4, 4, generator=g), torch.randn(1, 3, 8, generator=g)
    recipe = ToyQuery(cfg)
    recipe((latent, None, text), torch.Generator().manual_seed(7))
    (call,) = recipe.calls
    by_hand = torch.Generator().manual_seed(7)
    z = latent * 2 + 1
    context, target, _, _, _ = sample_context(z, None, 2, 1, cfg.context_policies, by_hand)
    noise = torch.randn((1, *target.shape), generator=by_hand)
    sigma = sample_sigmas(1, by_hand)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=by_hand))
    assert call["seed"] == seed and call["memory"] is None
    torch.testing.assert_close(call["timestep"], timesteps(sigma), rtol=0, atol=0)
    torch.testing.assert_close(call["x_t"], noisy_latents(target.unsqueeze(0), noise, sigma), rtol=0, atol=0)
    q = call["query"]
    assert (q.query_layers, q.query_pool, q.camera, q.chunk_poses) == (2, 1, None, None)
    assert [s.offset for s in q.context.segments] == [s.offset for s in context.segments]


def test_encoder_step_draws_references_then_window_then_noise(tmp_path):
    cfg = config(tmp_path, recipe="encoder", clip_frames=49, width=128, height=128, top_k_references=2,
                 reference_pool=4, encoder_window=3)
    g = torch.Generator().manual_seed(4)
    latent, text = torch.randn(16, 13, 16, 16, generator=g), torch.randn(1, 3, 8, generator=g)
    refs = [torch.full((16, 13, 16, 16), float(i)) for i in range(4)]
    recipe = ToyEncoder(cfg)
    recipe((latent, refs, text, None), torch.Generator().manual_seed(9))
    (call,) = recipe.calls
    by_hand = torch.Generator().manual_seed(9)
    picked = torch.randperm(4, generator=by_hand)[:2].tolist()
    start = int(torch.randint(0, 13 - 3 + 1, (1,), generator=by_hand))
    x0 = (latent * 2 + 1)[:, start:start + 3].unsqueeze(0)
    noise = torch.randn(x0.shape, generator=by_hand)
    sigma = sample_sigmas(1, by_hand)
    assert call["query"] is None and call["x_t"].shape == (1, 16, 3, 16, 16)
    torch.testing.assert_close(call["x_t"], noisy_latents(x0, noise, sigma), rtol=0, atol=0)
    memory = call["memory"]
    assert isinstance(memory, recipes.TrainableMemory) and memory.latents.shape == (1, 2, 16, 13, 16, 16)
    assert [float(r[0, 0, 0, 0]) for r in memory.latents[0]] == [2.0 * i + 1 for i in picked]


def test_both_hosts_run_the_core_recipes_and_one_trainable_memory(comfy):
    if host.use_gpu():  # the lent GPU machines carry no diffusers
        pytest.importorskip("diffusers", reason="diffusers is not installed on this GPU machine")
    from memlearner_diffusers import memory as dmemory
    from memlearner_diffusers import training as dtrain

    th, mp = host.pack("nodes.training_host"), host.pack("nodes.memory_patch")
    assert mp.TrainableMemory is recipes.TrainableMemory is dmemory.TrainableMemory
    for module in (th, dtrain):
        for name in ("QueryRecipe", "EncoderRecipe"):
            cls = getattr(module, name)
            assert issubclass(cls, getattr(recipes, name))
            for method in ("forward", "denoise_loss", "export", "checkpointed"):
                assert getattr(cls, method) is getattr(getattr(recipes, name), method), (module.__name__, name, method)
