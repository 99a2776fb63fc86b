"""The diffusers API on a tiny WanPipeline (no download, no text encoder or VAE: prompt embeddings given, latents
out): chunk-by-chunk rollout with each context policy, the memory kept and restored around it, the context
cache, and gradients (training) through the patched transformer."""

from __future__ import annotations

import pytest

import host

# The lent GPU machines get no diffusers (their image and the device bundle carry none): skip there. Anywhere
# else diffusers comes with the test extra, and a missing one must fail.
if host.use_gpu():
    pytest.importorskip("diffusers", reason="diffusers is not installed on this GPU machine")

import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel  # noqa: E402

from memlearner_core.camera import CameraEmbedding  # noqa: E402
from memlearner_core.checkpoint_io import load_memory_encoder  # noqa: E402
from memlearner_core.context_tokens import ContextSpec  # noqa: E402
from memlearner_diffusers import (  # noqa: E402
    QueryMemory,
    ReferenceMemory,
    apply_memory,
    installed,
    query_noise,
    remove_memory,
)
from memlearner_diffusers.rollout import normalize_latents, rollout, to_vae_latents  # noqa: E402

import tiny_models  # noqa: E402

TINY = dict(num_attention_heads=2, attention_head_dim=128, ffn_dim=512, num_layers=4, text_dim=4096)


@pytest.fixture(scope="module")
def pipe():
    tr = WanTransformer3DModel(**TINY)
    tiny_models.randomize(tr, 3)
    p = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr.eval(),
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def pipe_5b(wan22_5b_diffusers):
    """A WanPipeline on the tiny Wan2.2 TI2V-5B as diffusers' Wan2.2 pipeline runs it: per-token timesteps
    (``expand_timesteps``) and the Wan2.2 VAE's 16x spatial stride (what its config would set; no VAE here)."""
    p = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=wan22_5b_diffusers,
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), expand_timesteps=True)
    p.vae_scale_factor_spatial = 16
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def text():
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(1, 8, 4096, generator=g),
                negative_prompt_embeds=torch.randn(1, 8, 4096, generator=g), num_inference_steps=2, guidance_scale=2.0)


def run(pipe, text, **kw):
    args = dict(chunks=3, chunk_frames=5, height=64, width=64, policy="recent", context_frames=2, query_layers=2)
    return rollout(pipe, **{**args, **kw}, **text)


def test_rollout_picks_context_by_policy_and_reports_it(pipe, text):
    res = run(pipe, text)
    assert res.latents.shape == (1, 16, 6, 8, 8) and torch.isfinite(res.latents).all()
    assert [r.context for r in res.records] == [[], [[0, 1], [1, 1]], [[2, 1], [3, 1]]]
    assert [r.first_frame for r in res.records] == [0, 2, 4] and res.records[1].context_tokens == 32
    packed = run(pipe, text, policy="framepack", context_frames=3)
    assert [r.context for r in packed.records][2] == [[0, 2], [1, 2], [2, 2], [3, 1]]
    assert installed(pipe.transformer) is None  # the transformer leaves as it came


def chunk_by_hand(pipe, text, history, seed):
    """One 5-frame chunk from the pipeline itself with query memory over ``history`` and ``seed`` (noise and Q)."""
    apply_memory(pipe.transformer, query=QueryMemory(2, ContextSpec.from_history(history), seed=seed))
    try:
        return pipe(num_frames=5, height=64, width=64, output_type="latent", return_dict=False,
                    generator=torch.Generator().manual_seed(seed), **text)[0]
    finally:
        remove_memory(pipe.transformer)


def test_each_chunk_is_the_pipeline_with_query_memory_over_the_picked_history(pipe, text):
    """Chunk 1 by hand: its history (the two frames of chunk 0) as query memory, seed + 1 for noise and queries."""
    res = run(pipe, text, seed=7)
    assert torch.equal(chunk_by_hand(pipe, text, res.latents[0, :, :2], seed=8)[0], res.latents[0, :, 2:4])
    assert torch.equal(run(pipe, text, seed=7).latents, res.latents)  # reproducible from the seed
    without = run(pipe, text, seed=7, query_layers=0)
    assert (without.latents[0, :, 2:4] - res.latents[0, :, 2:4]).abs().max() > 1e-3  # the history is read


def test_fov_rollout_with_camera_and_kept_reference_memory(pipe, text, models_dir):
    from memlearner_core.trajectory import parse_trajectory

    poses = parse_trajectory('{"preset": "pan_and_return", "degrees": 120}', 8)
    camera = CameraEmbedding(256)
    tiny_models.randomize(camera, 4)
    encoder = load_memory_encoder(tiny_models.model_paths(models_dir)["encoder"])
    refs = torch.randn(1, 16, 13, 16, 16, generator=torch.Generator().manual_seed(2))
    memory = ReferenceMemory.from_latents(refs, encoder)
    apply_memory(pipe.transformer, memory=memory)
    try:
        first = torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(3))
        res = run(pipe, text, policy="fov", context_frames=2, camera=camera, poses=poses, first_chunk=first)
        assert installed(pipe.transformer).memory is memory and installed(pipe.transformer).query is None
    finally:
        remove_memory(pipe.transformer)
    assert res.latents.shape == (1, 16, 8, 8, 8) and torch.equal(res.latents[0, :, :2], first)
    assert all(len(r.context) == 2 for r in res.records)
    with pytest.raises(ValueError, match="fov policy picks frames by camera view"):
        run(pipe, text, policy="fov")
    with pytest.raises(ValueError, match="needs a budget"):
        run(pipe, text, policy="recent", context_frames=0)


def test_latents_convert_to_and_from_the_vae_space():
    class Vae:
        class config:
            latents_mean = [0.5] * 16
            latents_std = [2.0] * 16

    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(normalize_latents(Vae, z), (z - 0.5) / 2)
    torch.testing.assert_close(to_vae_latents(Vae, normalize_latents(Vae, z)), z)  # float32 rounding allowed


def test_query_noise_is_the_comfyui_adapters_noise(comfy):
    mp = host.pack("nodes.memory_patch")
    shape = (1, 16, 2, 8, 8)
    for t in (999.0, 412.5):
        assert torch.equal(query_noise(9, shape, "cpu", torch.float32, t),
                           mp.RunState(9).query_noise(shape, 1, "cpu", torch.float32, t))


def test_history_is_cached_once_per_query_layer_and_reused(pipe):
    tr = pipe.transformer
    g = torch.Generator().manual_seed(1)
    history = torch.randn(16, 3, 8, 8, generator=g)
    x, txt = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 8, 4096, generator=g)
    outs = {}
    for cache in (True, False):
        adapter = apply_memory(tr, query=QueryMemory(3, ContextSpec.from_history(history), cache_context=cache))
        try:
            with torch.no_grad():
                outs[cache] = [tr(x, torch.full((1,), s), txt, return_dict=False)[0] for s in (900.0, 300.0)]
            assert len(adapter.context_cache) == (3 if cache else 0)
        finally:
            remove_memory(tr)
    for a, b in zip(outs[True], outs[False], strict=True):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()


def test_gradients_flow_through_both_memories_with_checkpointing(pipe, models_dir):
    tr = pipe.transformer
    g = torch.Generator().manual_seed(5)
    x, txt = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 8, 4096, generator=g)
    encoder = load_memory_encoder(tiny_models.model_paths(models_dir)["encoder"])
    memory = ReferenceMemory.from_latents(torch.randn(1, 16, 13, 16, 16, generator=g), encoder)
    query = QueryMemory(2, ContextSpec.from_history(torch.randn(16, 2, 8, 8, generator=g)))
    apply_memory(tr, memory=memory, query=query)
    try:
        with torch.no_grad():
            ref = tr(x, torch.full((1,), 500.0), txt, return_dict=False)[0]
        grads = {}
        for ckpt in (False, True):
            tr.train()
            if ckpt:
                tr.enable_gradient_checkpointing()
            tr.zero_grad()
            out = tr(x, torch.full((1,), 500.0), txt, return_dict=False)[0]
            out.square().mean().backward()
            grads[ckpt] = tr.blocks[0].attn1.to_k.weight.grad.clone()
            assert (out.detach() - ref).abs().max() <= 1e-5 * ref.abs().max()
    finally:
        tr.disable_gradient_checkpointing()
        tr.eval().zero_grad()
        remove_memory(tr)
    assert grads[False].abs().max() > 0
    assert torch.allclose(grads[True], grads[False], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_both_memories_in_half_precision_stay_near_float32(pipe, models_dir, dtype):
    """A pipeline in bf16/fp16 (as users run Wan2.1): the memories add no more error than the plain model's own
    rounding (the ComfyUI host's bound for bf16 and fp16 weights: 5% and 2% max-norm relative error)."""
    import copy

    g = torch.Generator().manual_seed(6)
    x, txt = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 8, 4096, generator=g)
    encoder = load_memory_encoder(tiny_models.model_paths(models_dir)["encoder"])
    memory = ReferenceMemory.from_latents(torch.randn(1, 16, 13, 16, 16, generator=g), encoder)
    spec = ContextSpec.from_history(torch.randn(16, 3, 8, 8, generator=g))
    half = copy.deepcopy(pipe.transformer).to(dtype)
    outs = {}
    for name, tr, dt in (("full", pipe.transformer, torch.float32), ("half", half, dtype)):
        with torch.no_grad():
            plain = tr(x.to(dt), torch.full((1,), 700.0), txt.to(dt), return_dict=False)[0].float()
            apply_memory(tr, memory=memory, query=QueryMemory(2, spec, query_pool=2, seed=3))
            try:
                patched = tr(x.to(dt), torch.full((1,), 700.0), txt.to(dt), return_dict=False)[0]
            finally:
                remove_memory(tr)
        assert patched.dtype == dt
        outs[name] = plain, patched.float()
    err = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    bound = 0.05 if dtype == torch.bfloat16 else 0.02
    plain_err, patched_err = err(outs["half"][0], outs["full"][0]), err(outs["half"][1], outs["full"][1])
    assert patched_err < bound and patched_err < 3 * plain_err + 1e-3


def test_rollout_on_the_5b_reads_the_history_in_48_channel_latents(pipe_5b, text):
    """Per-token timesteps and 16x latents (64x64 frames: 4x4): each chunk is the pipeline with query memory over
    the picked history, and the history changes what comes out."""
    res = run(pipe_5b, text, seed=7)
    assert res.latents.shape == (1, 48, 6, 4, 4) and torch.isfinite(res.latents).all()
    assert [r.context for r in res.records] == [[], [[0, 1], [1, 1]], [[2, 1], [3, 1]]]
    assert res.records[1].context_tokens == 8  # two 4x4 latent frames in 2x2 patches
    assert torch.equal(chunk_by_hand(pipe_5b, text, res.latents[0, :, :2], seed=8)[0], res.latents[0, :, 2:4])
    without = run(pipe_5b, text, seed=7, query_layers=0)
    assert (without.latents[0, :, 2:4] - res.latents[0, :, 2:4]).abs().max() > 1e-3


def test_rollout_on_the_5b_refuses_a_pipeline_with_another_vae_stride(pipe_5b, text, monkeypatch):
    monkeypatch.setattr(pipe_5b, "vae_scale_factor_spatial", 8)
    with pytest.raises(ValueError, match=r"^the pipeline's VAE compresses 8x but Wan2.2 TI2V-5B latents are 16x the "
                                         r"frames; give the pipeline this model's VAE$"):
        run(pipe_5b, text)


def test_rollout_on_the_5b_refuses_a_wan21_first_chunk(pipe_5b, text):
    with pytest.raises(ValueError, match=r"^first_chunk must be a Wan2.2 TI2V-5B latent \[48, T, 4, 4\], got "
                                         r"\(16, 2, 4, 4\)$"):
        run(pipe_5b, text, first_chunk=torch.zeros(16, 2, 4, 4))


def test_the_learned_policy_reads_the_budget_in_each_query_layer(pipe, text):
    res = run(pipe, text, chunks=4, policy="learned", context_frames=3)
    assert torch.isfinite(res.latents).all()
    for r in res.records[1:]:
        assert sorted(r.routed) == ["0", "1"]
        assert all(len(f) == min(3, r.first_frame) and set(f) <= set(range(r.first_frame))
                   for f in r.routed.values())
