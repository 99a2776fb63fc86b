"""MemLearner query layers on ComfyUI's Wan2.1: equivalence with the dense-mask reference, the context cache,
bad input, and a real sampling graph."""

import pytest
import torch

from memlearner_core.context_tokens import ContextSpec, segment_positions
from memlearner_core.query_layers import ContextKV, query_memory_attention

import host
import reference_wan
import tiny_models
from forward import model_forward, rel_err


def inputs(batch, seed=0, frames=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, frames, 8, 8, generator=g), torch.full((batch,), 600.0),
            torch.randn(batch, 512, 4096, generator=g))


def history(frames, seed=5):
    return {"samples": torch.randn(1, 16, frames, 8, 8, generator=torch.Generator().manual_seed(seed))}


def test_attention_pattern_equals_dense_mask_on_random_inputs(seeded):
    heads, d, nc, nq, npred = 2, 8, 6, 5, 5
    q, k, v = (torch.randn(2, nq + npred, heads * d) for _ in range(3))
    kc, vc = torch.randn(2, nc, heads * d), torch.randn(2, nc, heads * d)
    for query_layer in (True, False):
        out = query_memory_attention(q, k, v, heads, nq, ContextKV(kc, vc) if query_layer else None)
        # dense reference over [C; Q; P] (C rows only as keys)
        kk, vv = torch.cat([kc, k], 1), torch.cat([vc, v], 1)
        qq = torch.cat([torch.zeros(2, nc, heads * d), q], 1)
        mask = reference_wan.query_masks(nc, nq, npred, True) if query_layer else \
            torch.cat([torch.zeros(nc + nq + npred, nc, dtype=torch.bool),
                       torch.cat([torch.zeros(nc, nq + npred, dtype=torch.bool),
                                  reference_wan.query_masks(0, nq, npred, False)], 0)], 1)
        split = lambda t: t.view(2, -1, heads, d).transpose(1, 2)  # noqa: E731
        ref = torch.nn.functional.scaled_dot_product_attention(split(qq), split(kk), split(vv), attn_mask=mask)
        ref = ref.transpose(1, 2).reshape(2, -1, heads * d)[:, nc:]
        assert rel_err(out, ref) < 1e-5


def history_ids(frames: int, rows: int = 4, cols: int = 4) -> torch.Tensor:
    """RoPE ids (time, row, column) of ``frames`` history frames of ``rows x cols`` tokens, written out the
    obvious way: the last history frame sits at time -1, right before the chunk at 0."""
    return torch.tensor([[f, r, c] for f in range(-frames, 0) for r in range(rows) for c in range(cols)],
                        dtype=torch.float32)


def in_model_space(model, samples):
    """What a sampler does to a LATENT before denoising: the space the history must be read in."""
    return model.model.process_latent_in(samples)


def patched(comfy, model, frames, layers=2, cache=True, memory=None):
    ctx = history(frames) if frames is not None else None
    return comfy.run("MemLearnerApplyQueryMemory", model=model, context=ctx, query_layers=layers,
                     memory=memory, cache_context=cache)[0]


@pytest.mark.parametrize("context_frames", [0, 1, 3, 6])
@pytest.mark.parametrize("cond_or_uncond", [[0], [0, 1]], ids=["cfg1", "cfg_batch"])
def test_tiny_wan_equals_dense_mask_reference(comfy, wan_model, context_frames, cond_or_uncond):
    mp = host.pack("nodes.memory_patch")
    model = patched(comfy, wan_model, context_frames)
    x, t, txt = inputs(len(cond_or_uncond))
    out = model_forward(model, x, t, txt, cond_or_uncond, run_seed=11)
    q_noise = mp.RunState(11).query_noise(x.shape, len(cond_or_uncond), x.device, x.dtype, 600.0)
    dm = wan_model.model.diffusion_model
    ctx = in_model_space(wan_model, history(context_frames)["samples"])[0]
    freqs = dm.rope_embedder(history_ids(context_frames).unsqueeze(0)).movedim(1, 2) if context_frames else None
    ref = reference_wan.query_memory_reference(dm, x, t, txt, ctx if context_frames else None, freqs, q_noise, 2)
    assert rel_err(out, ref) < 1e-5


def test_all_layers_as_query_layers_matches_reference(comfy, wan_model):
    mp = host.pack("nodes.memory_patch")
    model = patched(comfy, wan_model, 2, layers=4)
    x, t, txt = inputs(1)
    out = model_forward(model, x, t, txt, run_seed=3)
    dm = wan_model.model.diffusion_model
    ctx = in_model_space(wan_model, history(2)["samples"])[0]
    freqs = dm.rope_embedder(segment_positions(ContextSpec.from_history(ctx).segments[0]).unsqueeze(0)).movedim(1, 2)
    q_noise = mp.RunState(3).query_noise(x.shape, 1, x.device, x.dtype, 600.0)
    assert rel_err(out, reference_wan.query_memory_reference(dm, x, t, txt, ctx, freqs, q_noise, 4)) < 1e-5


def test_context_cache_gives_the_same_output_across_steps_and_branches(comfy, wan_model):
    mp = host.pack("nodes.memory_patch")
    cached, uncached = patched(comfy, wan_model, 3, cache=True), patched(comfy, wan_model, 3, cache=False)
    run_c, run_u = mp.RunState(7), mp.RunState(7)
    for step, t in enumerate((900.0, 500.0, 100.0)):
        x, _, txt = inputs(2, seed=step)
        tt = torch.full((2,), t)
        a = model_forward(cached, x, tt, txt, [0, 1], run=run_c)
        b = model_forward(uncached, x, tt, txt, [0, 1], run=run_u)
        assert rel_err(a, b) < 1e-6
    assert len(run_c.context_cache) == 2  # one entry per query layer, reused
    assert not run_u.context_cache and not run_u.context_tokens


def test_query_noise_is_reproducible_from_the_sampler_seed(comfy, wan_model):
    model = patched(comfy, wan_model, 2)
    x, t, txt = inputs(1)
    assert torch.equal(model_forward(model, x, t, txt, run_seed=5), model_forward(model, x, t, txt, run_seed=5))
    assert rel_err(model_forward(model, x, t, txt, run_seed=5), model_forward(model, x, t, txt, run_seed=6)) > 1e-4


def test_cfg_branches_read_the_same_queries_batched_or_one_forward_each(comfy, wan_model):
    """ComfyUI batches cond and uncond, or (low VRAM) runs them apart: the output must not depend on which."""
    model = patched(comfy, wan_model, 2)
    x, t, txt = inputs(2)
    batched = model_forward(model, x, t, txt, [0, 1], run_seed=8)
    run = host.pack("nodes.memory_patch").RunState(8)  # one run: the forwards follow each other as in a sampler
    apart = [model_forward(model, x[i:i + 1], t[i:i + 1], txt[i:i + 1], [i], run=run) for i in (0, 1)]
    assert rel_err(torch.cat(apart), batched) < 1e-5


def test_query_noise_is_fresh_at_each_step_and_the_same_for_each_branch():
    mp = host.pack("nodes.memory_patch")
    run = mp.RunState(3)
    a = run.query_noise((2, 16, 2, 4, 4), 2, "cpu", torch.float32, 900.0)
    assert torch.equal(a[0], a[1])  # the two batched CFG branches
    assert torch.equal(run.query_noise((1, 16, 2, 4, 4), 1, "cpu", torch.float32, 900.0)[0], a[0])
    assert not torch.equal(run.query_noise((1, 16, 2, 4, 4), 1, "cpu", torch.float32, 800.0)[0], a[0])


def test_query_layers_out_of_range_is_refused(comfy, wan_model):
    with pytest.raises(ValueError, match="query_layers must be between 1 and 4"):
        patched(comfy, wan_model, 2, layers=5)


def test_non_wan_model_is_refused_and_left_alone(comfy):
    from comfy.model_patcher import ModelPatcher

    other = ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a Wan model of a supported family .* the MODEL is Linear"):
        comfy.run("MemLearnerApplyQueryMemory", model=other, context=history(1), query_layers=1)
    assert not other.wrappers and not other.model_options.get("transformer_options")


def save_tiny(models_dir, name, module):
    """Write a tiny ComfyUI diffusion model where UNETLoader finds it; returns the file name."""
    from safetensors.torch import save_file

    tiny_models.randomize(module, 9)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(models_dir / "diffusion_models" / name))
    return name


def wan(**overrides):
    from comfy.ldm.wan.model import WanModel
    from comfy.ops import disable_weight_init

    return WanModel(**{**tiny_models.TINY_WAN, **overrides}, operations=disable_weight_init)


def vace():
    from comfy.ldm.wan.model import VaceWanModel
    from comfy.ops import disable_weight_init

    return VaceWanModel(**tiny_models.TINY_WAN, vace_layers=2, vace_in_dim=96, operations=disable_weight_init)


UNSUPPORTED = [  # (id, tiny model, what the line names)
    ("wan22-i2v-a14b-style", lambda: wan(in_dim=36), r"36 input channels for 16 latent channels"),
    ("wan21-i2v", lambda: wan(model_type="i2v", in_dim=36), r"model_type i2v, 36 input channels"),
    ("fun-control", lambda: wan(in_dim=48), r"48 input channels for 16 latent channels"),
    ("vace", vace, r"a Wan VACE model \(WAN21_Vace, VaceWanModel\)"),
]


@pytest.mark.parametrize("build, found", [pytest.param(b, f, id=i) for i, b, f in UNSUPPORTED])
def test_unsupported_wan_variants_are_refused_in_one_line_naming_them(comfy, models_dir, build, found):
    name = save_tiny(models_dir, f"tiny_unsupported_{abs(hash(found))}.safetensors", build())
    model = comfy.run("UNETLoader", unet_name=name, weight_dtype="default")[0]
    with pytest.raises(ValueError, match=f"supported family .*Wan2.2 TI2V-5B.*; the MODEL is .*{found}") as e:
        comfy.run("MemLearnerApplyQueryMemory", model=model, context=history(1), query_layers=1)
    assert "\n" not in str(e.value)
    assert not model.wrappers


def history_5b(frames, seed=5):
    return {"samples": torch.randn(1, 48, frames, 8, 8, generator=torch.Generator().manual_seed(seed))}


def test_tiny_wan22_5b_equals_dense_mask_reference(comfy, wan22_5b):
    mp = host.pack("nodes.memory_patch")
    model = comfy.run("MemLearnerApplyQueryMemory", model=wan22_5b, context=history_5b(2), query_layers=2)[0]
    x, txt = torch.randn(2, 48, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(2, 512, 4096)
    t = torch.full((2,), 600.0)
    out = model_forward(model, x, t, txt, [0, 1], run_seed=11)
    dm = wan22_5b.model.diffusion_model
    ctx = in_model_space(wan22_5b, history_5b(2)["samples"])[0]
    freqs = dm.rope_embedder(history_ids(2).unsqueeze(0)).movedim(1, 2)
    q_noise = mp.RunState(11).query_noise(x.shape, 2, x.device, x.dtype, 600.0)
    assert rel_err(out, reference_wan.query_memory_reference(dm, x, t, txt, ctx, freqs, q_noise, 2)) < 1e-5


def test_the_history_is_read_in_the_wan22_latent_space(comfy, wan22_5b):
    """Wan2.2's own per-channel statistics, not Wan2.1's, put the history where the 5B denoises."""
    from comfy.latent_formats import Wan22

    model = comfy.run("MemLearnerApplyQueryMemory", model=wan22_5b, context=history_5b(2), query_layers=2)[0]
    latent = model.get_attachment("memlearner").query.context.segments[0].latent
    expected = Wan22().process_in(history_5b(2)["samples"])[0]
    assert torch.allclose(latent, expected, atol=1e-6)


@pytest.mark.parametrize("pool", [1, 2])
def test_per_frame_timesteps_equal_the_dense_mask_reference(comfy, wan22_5b, pool):
    """Wan2.2 image-to-video gives each latent frame its own timestep (0 for the given first frame): P's frames
    keep theirs, Q runs at the noisy frames' timestep."""
    mp = host.pack("nodes.memory_patch")
    model = comfy.run("MemLearnerApplyQueryMemory", model=wan22_5b, context=history_5b(2), query_layers=2,
                      query_pool=pool)[0]
    x, txt = torch.randn(2, 48, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.randn(2, 512, 4096)
    t = torch.tensor([[0.0, 700.0, 700.0], [0.0, 700.0, 700.0]])
    out = model_forward(model, x, t, txt, [0, 1], run_seed=6)
    dm = wan22_5b.model.diffusion_model
    ctx = in_model_space(wan22_5b, history_5b(2)["samples"])[0]
    freqs = dm.rope_embedder(history_ids(2).unsqueeze(0)).movedim(1, 2)
    side = 4 // pool  # Q's token grid per frame
    q_noise = mp.RunState(6).query_noise((2, 48, 3, 2 * side, 2 * side), 2, x.device, x.dtype, 700.0)
    centres = torch.arange(side) * pool + (pool - 1) / 2
    ids = torch.stack(torch.meshgrid(torch.arange(3.0), centres, centres, indexing="ij"), -1).reshape(-1, 3)
    q_freqs = dm.rope_embedder(ids.unsqueeze(0)).movedim(1, 2)
    ref = reference_wan.query_memory_reference(dm, x, t, txt, ctx, freqs, q_noise, 2, q_freqs=q_freqs,
                                               t_query=torch.full((2,), 700.0))
    assert rel_err(out, ref) < 1e-5


def test_image_to_video_keeps_the_given_first_frame_through_the_sampler(comfy, wan22_5b, text_cond):
    """A LATENT as Wan22ImageToVideoLatent makes it: the start image's latent frame, and a noise_mask of 0 there."""
    model = comfy.run("MemLearnerApplyQueryMemory", model=wan22_5b, context=history_5b(2), query_layers=2)[0]
    samples = torch.zeros(1, 48, 3, 8, 8)
    samples[:, :, :1] = torch.randn(1, 48, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(1, 1, 3, 8, 8)
    mask[:, :, :1] = 0.0
    out = comfy.run("KSampler", model=model, seed=3, steps=2, cfg=2.0, sampler_name="euler", scheduler="simple",
                    positive=text_cond[0], negative=text_cond[1], latent_image={"samples": samples, "noise_mask": mask},
                    denoise=1.0)[0]["samples"]
    assert out.shape == samples.shape and torch.isfinite(out).all()
    assert torch.allclose(out[:, :, :1], samples[:, :, :1], atol=1e-4)
    assert not torch.allclose(out[:, :, 1:], samples[:, :, 1:])


def test_a_wan21_latent_on_the_5b_is_refused_before_sampling(comfy, wan22_5b, text_cond):
    model = comfy.run("MemLearnerApplyQueryMemory", model=wan22_5b, context=history_5b(2), query_layers=2)[0]
    with pytest.raises(ValueError, match=r"Wan2.2 TI2V-5B needs a video latent \[B, 48, T, H, W\], got \(1, 16"):
        comfy.run("KSampler", model=model, seed=1, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple",
                  positive=text_cond[0], negative=text_cond[1], latent_image={"samples": torch.ones(1, 16, 2, 8, 8)},
                  denoise=1.0)  # not all zeros: ComfyUI gives an empty latent the model's channels itself


def test_a_wan21_context_on_the_5b_is_refused(comfy, wan22_5b):
    with pytest.raises(ValueError, match=r"context must be one Wan2.2 TI2V-5B video latent \[1, 48, T, H, W\]"):
        comfy.run("MemLearnerApplyQueryMemory", model=wan22_5b, context=history(2), query_layers=2)


def test_context_of_another_size_fails_before_sampling(comfy, wan_model, text_cond):
    model = patched(comfy, wan_model, 2)
    latent = {"samples": torch.zeros(1, 16, 2, 12, 12)}
    with pytest.raises(ValueError, match="context is 8x8 latent pixels but the latent being sampled is 12x12"):
        comfy.run("KSampler", model=model, seed=1, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple",
                  positive=text_cond[0], negative=text_cond[1], latent_image=latent, denoise=1.0)


def test_both_memories_together_run_in_the_real_sampler(comfy, wan_model, text_cond):
    enc = comfy.run("MemLearnerLoadMemoryEncoder", encoder_name=tiny_models.ENCODER_FILE, dtype="fp32")[0]
    refs = {"samples": torch.randn(1, 16, 13, 16, 16)}
    memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=enc, latent=refs)[0]
    model = patched(comfy, wan_model, 3, memory=memory)
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}

    def sample():
        return comfy.run("KSampler", model=model, seed=4, steps=2, cfg=2.5, sampler_name="euler",
                         scheduler="simple", positive=text_cond[0], negative=text_cond[1], latent_image=latent,
                         denoise=1.0)[0]["samples"]

    a = sample()
    assert a.shape == (1, 16, 2, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, sample())  # deterministic for a fixed seed
    assert "memlearner" not in str(wan_model.wrappers)


def test_chaining_reference_then_query_memory_keeps_both(comfy, wan_model, encoder):
    refs = {"samples": torch.randn(1, 16, 13, 16, 16, generator=torch.Generator().manual_seed(3))}
    memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent=refs)[0]
    chained = patched(comfy, comfy.run("MemLearnerApplyReferenceMemory", model=wan_model, memory=memory)[0], 3)
    together = patched(comfy, wan_model, 3, memory=memory)
    x, t, txt = inputs(1)
    assert torch.equal(model_forward(chained, x, t, txt, run_seed=1), model_forward(together, x, t, txt, run_seed=1))
    assert len(chained.get_wrappers("diffusion_model", "memlearner")) == 1


def write_query_weights(comfy, name, version="1", dim=256):
    from safetensors.torch import save_file

    from memlearner_core.camera import CameraEmbedding

    cam = CameraEmbedding(dim)
    tiny_models.randomize(cam, 4)
    folder = comfy.folder_paths.get_folder_paths("memlearner")[0]
    sd = {f"camera.{k}": v.detach().contiguous() for k, v in cam.state_dict().items()}
    save_file(sd, f"{folder}/{name}", metadata={"memlearner.format": "query-memory", "memlearner.version": version,
                                                "memlearner.query_layers": "2"})


def poses_json(n, shift=0.0):
    import json

    return json.dumps([[[1, 0, 0, shift * i], [0, 1, 0, 0], [0, 0, 1, 0]] for i in range(n)])


def test_camera_poses_condition_the_output(comfy, wan_model):
    write_query_weights(comfy, "cam_v1.safetensors")
    x, t, txt = inputs(1)

    def run(poses):
        model = comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(2), query_layers=2,
                          query_weights="cam_v1.safetensors", camera_poses=poses)[0]
        return model_forward(model, x, t, txt, run_seed=1)

    still, moving = run(poses_json(5)), run(poses_json(5, shift=0.5))
    assert torch.isfinite(moving).all() and rel_err(moving, still) > 1e-4
    assert torch.equal(run(poses_json(5, shift=0.5)), moving)


@pytest.mark.parametrize("version", ["1", "2"])
def test_camera_goes_on_history_queries_and_video_as_the_weights_version_says(comfy, wan_model, version):
    """Version 2 (the published default) adds the camera to C, Q and P; version 1 files keep C and P only."""
    from memlearner_core.checkpoint_io import load_query_weights
    from memlearner_core.trajectory import parse_trajectory

    mp = host.pack("nodes.memory_patch")
    name = f"cam_ref_v{version}.safetensors"
    write_query_weights(comfy, name, version)
    poses = poses_json(5, shift=0.3)  # 2 history frames, then the 3 being generated
    model = comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(2), query_layers=2,
                      query_weights=name, camera_poses=poses)[0]
    x, t, txt = inputs(1)
    out = model_forward(model, x, t, txt, run_seed=3)

    weights = load_query_weights(comfy.folder_paths.get_full_path("memlearner", name))
    cam = torch.nn.Linear(12, 256)
    cam.load_state_dict({k.removeprefix("proj."): v for k, v in weights.camera.items()})
    with torch.no_grad():
        per_token = cam(parse_trajectory(poses).reshape(5, 12)).repeat_interleave(16, 0)  # 16 tokens per frame
    c_cam, p_cam = per_token[:32], per_token[32:]
    q_cam = p_cam if version == "2" else 0
    dm = wan_model.model.diffusion_model
    ctx = in_model_space(wan_model, history(2)["samples"])[0]
    freqs = dm.rope_embedder(segment_positions(ContextSpec.from_history(ctx).segments[0]).unsqueeze(0)).movedim(1, 2)
    q_noise = mp.RunState(3).query_noise(x.shape, 1, x.device, x.dtype, 600.0)
    ref = reference_wan.query_memory_reference(dm, x, t, txt, ctx, freqs, q_noise, 2, camera=(c_cam, q_cam, p_cam))
    assert rel_err(out, ref) < 1e-5


def test_view_aligned_rope_places_each_frame_where_its_camera_looks(comfy, wan_model):
    """Version-3 weights (``view_rope_fov`` 45): every frame of C, Q and P sits its yaw from the chunk's first camera
    away, in columns of 45 / 4 degrees (P is 4 tokens wide); the reference builds those positions by hand."""
    from memlearner_core.checkpoint_io import load_query_weights, save_query_weights
    from memlearner_core.revisit_world import yaw_path
    from memlearner_core.trajectory import trajectory_json

    mp = host.pack("nodes.memory_patch")
    folder = comfy.folder_paths.get_folder_paths("memlearner")[0]
    cam = torch.nn.Linear(12, 256)
    tiny_models.randomize(cam, 4)
    save_query_weights(f"{folder}/view_rope.safetensors", {f"proj.{k}": v for k, v in cam.state_dict().items()}, 2,
                       view_rope_fov=45.0)
    assert load_query_weights(f"{folder}/view_rope.safetensors").view_rope_fov == 45.0
    yaws = [0.0, 30.0, 10.0, 20.0, -15.0]  # 2 history frames, then the 3 being generated (the first at 10)
    poses = yaw_path(yaws)
    model = comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(2), query_layers=2,
                      query_weights="view_rope.safetensors", camera_poses=trajectory_json(poses))[0]
    x, t, txt = inputs(1)
    out = model_forward(model, x, t, txt, run_seed=3)

    def ids(frames, frame_yaws):
        grid = torch.stack(torch.meshgrid(torch.tensor(frames, dtype=torch.float32), torch.arange(4.0),
                                          torch.arange(4.0), indexing="ij"), -1)
        grid[..., 2] += torch.tensor([(y - 10.0) / 11.25 for y in frame_yaws])[:, None, None]
        return grid.reshape(-1, 3)

    dm = wan_model.model.diffusion_model
    rope = lambda i: dm.rope_embedder(i.unsqueeze(0)).movedim(1, 2)  # noqa: E731
    with torch.no_grad():
        per_token = cam(poses.reshape(5, 12)).repeat_interleave(16, 0)
    ctx = in_model_space(wan_model, history(2)["samples"])[0]
    q_noise = mp.RunState(3).query_noise(x.shape, 1, x.device, x.dtype, 600.0)
    p_freqs = rope(ids([0, 1, 2], yaws[2:]))
    ref = reference_wan.query_memory_reference(dm, x, t, txt, ctx, rope(ids([-2, -1], yaws[:2])), q_noise, 2,
                                               camera=(per_token[:32], per_token[32:], per_token[32:]),
                                               p_freqs=p_freqs)
    assert rel_err(out, ref) < 1e-5


def test_view_aligned_weights_without_camera_poses_say_the_frames_keep_stock_positions(comfy, wan_model, caplog):
    from memlearner_core.checkpoint_io import save_query_weights

    folder = comfy.folder_paths.get_folder_paths("memlearner")[0]
    save_query_weights(f"{folder}/view_rope_np.safetensors", {"proj.weight": torch.zeros(256, 12),
                                                             "proj.bias": torch.zeros(256)}, 2, view_rope_fov=45.0)
    with caplog.at_level("WARNING", logger="memlearner"):
        comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(2), query_layers=2,
                  query_weights="view_rope_np.safetensors")
    assert "trained with view-aligned RoPE" in caplog.text and "stock positions" in caplog.text


def test_query_weights_trained_with_other_layers_or_pool_are_refused(comfy, wan_model):
    from memlearner_core.camera import CameraEmbedding
    from memlearner_core.checkpoint_io import save_query_weights

    folder = comfy.folder_paths.get_folder_paths("memlearner")[0]
    save_query_weights(f"{folder}/cam_l2_p2.safetensors", CameraEmbedding(256).state_dict(), 2, 2)
    with pytest.raises(ValueError, match="fine-tuned with query_layers = 2, but the node says 3"):
        comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(2), query_layers=3,
                  query_weights="cam_l2_p2.safetensors", query_pool=2)
    with pytest.raises(ValueError, match="fine-tuned with query_pool = 2, but the node says 1"):
        comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(2), query_layers=2,
                  query_weights="cam_l2_p2.safetensors", query_pool=1)


def test_query_weights_record_their_model_family_and_files_without_one_are_wan21(comfy, tmp_path):
    from memlearner_core.camera import CameraEmbedding
    from memlearner_core.checkpoint_io import load_query_weights, save_query_weights

    save_query_weights(tmp_path / "q5b.safetensors", CameraEmbedding(256).state_dict(), 2,
                       model_family="wan2.2-ti2v-5b")
    assert load_query_weights(tmp_path / "q5b.safetensors").model_family == "wan2.2-ti2v-5b"
    write_query_weights(comfy, "cam_no_family.safetensors")  # a file from before families were recorded
    folder = comfy.folder_paths.get_folder_paths("memlearner")[0]
    assert load_query_weights(f"{folder}/cam_no_family.safetensors").model_family == "wan2.1"


def test_query_weights_of_another_model_family_are_refused(comfy, wan22_5b):
    write_query_weights(comfy, "cam_no_family.safetensors")
    with pytest.raises(ValueError, match="query_weights cam_no_family.safetensors was fine-tuned on wan2.1, but the "
                                         "model is wan2.2-ti2v-5b; load the query weights fine-tuned for this model"):
        comfy.run("MemLearnerApplyQueryMemory", model=wan22_5b, context=history_5b(2), query_layers=2,
                  query_weights="cam_no_family.safetensors")


def test_poses_covering_only_part_of_the_chunk_are_refused_before_sampling(comfy, wan_model, text_cond):
    write_query_weights(comfy, "cam_v1.safetensors")
    model = comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(2), query_layers=2,
                      query_weights="cam_v1.safetensors", camera_poses=poses_json(3))[0]  # 2 history + 1 of 3
    latent = {"samples": torch.zeros(1, 16, 3, 8, 8)}
    with pytest.raises(ValueError, match="camera_poses cover the history and 1 of the 3 latent frames"):
        comfy.run("KSampler", model=model, seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple",
                  positive=text_cond[0], negative=text_cond[1], latent_image=latent, denoise=1.0)


def test_unknown_weights_version_is_refused(comfy, wan_model):
    write_query_weights(comfy, "cam_v9.safetensors", version="9")
    with pytest.raises(ValueError, match="version '9' is not supported"):
        comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(2), query_layers=2,
                  query_weights="cam_v9.safetensors")


def test_poses_without_weights_are_refused(comfy, wan_model):
    with pytest.raises(ValueError, match="camera_poses need query_weights"):
        comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(2), query_layers=2,
                  camera_poses=poses_json(5))


@pytest.mark.parametrize("kwarg", ["context_latents", "reference_latent"])
def test_tokens_the_host_appends_after_the_video_are_refused(comfy, wan_model, kwarg):
    """ComfyUI 0.3x appends in-context reference tokens after the video, where query memory's RoPE does not reach."""
    import comfy.model_management as mm

    mp = host.pack("nodes.memory_patch")
    model = comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(2), query_layers=2)[0]
    mm.load_models_gpu([model])
    x, txt = torch.randn(1, 16, 2, 8, 8), torch.randn(1, 512, 4096)
    with pytest.raises(ValueError, match=f"query memory does not support {kwarg} inputs"):
        mp.patched_forward(model, x, torch.full((1,), 500.0), txt, **{kwarg: [torch.randn(1, 16, 1, 8, 8)]})


def test_too_few_poses_are_refused(comfy, wan_model):
    write_query_weights(comfy, "cam_v1.safetensors")
    with pytest.raises(ValueError, match="1 poses but the video needs 2 latent frames"):
        comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(2), query_layers=2,
                  query_weights="cam_v1.safetensors", camera_poses=poses_json(1))


def test_interrupted_sampling_leaves_the_model_unpatched(comfy, wan_model, text_cond):
    import comfy.model_management as mm

    model = patched(comfy, wan_model, 2)
    x, t, txt = inputs(1)
    before = model_forward(wan_model, x, t, txt)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            comfy.run("KSampler", model=model, seed=1, steps=3, cfg=1.0, sampler_name="euler", scheduler="simple",
                      positive=text_cond[0], negative=text_cond[1],
                      latent_image={"samples": torch.zeros(1, 16, 2, 8, 8)}, denoise=1.0)
    finally:
        mm.interrupt_current_processing(False)
    assert torch.equal(model_forward(wan_model, x, t, txt), before)
    assert "memlearner" not in str(wan_model.wrappers) + str(wan_model.model_options)
    assert "memlearner_run" not in str(model.model_options)  # no per-run state survives on the patched clone


@pytest.mark.parametrize("context_frames", [0, 3])
def test_pooled_queries_equal_the_dense_mask_reference(comfy, wan_model, context_frames):
    mp = host.pack("nodes.memory_patch")
    model = comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(context_frames),
                      query_layers=2, query_pool=2)[0]
    x, t, txt = inputs(2)
    out = model_forward(model, x, t, txt, [0, 1], run_seed=4)
    # P is 3 frames of 4x4 tokens; pooled 2x2, Q is 3 frames of 2x2 tokens centred on their cells
    q_noise = mp.RunState(4).query_noise((2, 16, 3, 4, 4), 2, x.device, x.dtype, 600.0)
    ids = torch.stack(torch.meshgrid(torch.arange(3.0), torch.tensor([0.5, 2.5]), torch.tensor([0.5, 2.5]),
                                     indexing="ij"), -1).reshape(-1, 3)
    dm = wan_model.model.diffusion_model
    q_freqs = dm.rope_embedder(ids.unsqueeze(0)).movedim(1, 2)
    ctx = in_model_space(wan_model, history(context_frames)["samples"])[0] if context_frames else None
    freqs = dm.rope_embedder(segment_positions(ContextSpec.from_history(ctx).segments[0]).unsqueeze(0)).movedim(1, 2) \
        if context_frames else None
    ref = reference_wan.query_memory_reference(dm, x, t, txt, ctx, freqs, q_noise, 2, q_freqs=q_freqs)
    assert rel_err(out, ref) < 1e-5


def test_pooled_queries_change_the_output_but_not_its_shape(comfy, wan_model):
    x, t, txt = inputs(1)
    outs = [model_forward(comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(3),
                                    query_layers=2, query_pool=pool)[0], x, t, txt, run_seed=4) for pool in (1, 2)]
    assert outs[0].shape == outs[1].shape == x.shape
    assert not torch.allclose(outs[0], outs[1])
