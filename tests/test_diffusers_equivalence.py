"""Two hosts, one set of weights: diffusers' WanTransformer3DModel and ComfyUI's WanModel agree, plain and with
both memories.

A tiny Wan2.1 is built with diffusers' own class from a config (no download), its weights converted to ComfyUI's
single-file layout and loaded by ComfyUI's own loader. The ComfyUI side of every memory comparison is the pack's
ComfyUI adapter (``nodes/memory_patch.apply_memory``), the diffusers side ``memlearner_diffusers``.

The one difference the hosts themselves have: the sinusoidal timestep embedding. ComfyUI computes
``cos/sin(t * 10000^(-i/128))`` with ``torch.pow``, diffusers ``cos/sin(t * exp(-ln(10000) i/128))``; in
float32 the arguments differ by a few ulps of ``t * freq``, which at t = 600..1000 is ~6e-5 in the embedding and
~5e-6 (relative) at the output. At t = 0 (and with ComfyUI's embedding put into diffusers) the hosts agree to
~3e-7. The RoPE layouts differ (ComfyUI: 2x2 rotation matrices per pair; diffusers: interleaved cos/sin
tables) but rotate the same adjacent pairs by the same angles.
"""

from __future__ import annotations

import pytest

import host

# The lent GPU machines get no diffusers (their image and the device bundle carry none): skip there. Anywhere
# else diffusers comes with the test extra, and a missing one must fail.
if host.use_gpu():
    pytest.importorskip("diffusers", reason="diffusers is not installed on this GPU machine")

import torch  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402

from memlearner_core.camera import CameraEmbedding  # noqa: E402
from memlearner_core.checkpoint_io import load_memory_encoder, save_query_weights  # noqa: E402
from memlearner_core.context_tokens import ContextSegment, ContextSpec  # noqa: E402
from memlearner_diffusers import (  # noqa: E402
    QueryMemory,
    ReferenceMemory,
    apply_memory,
    comfy_to_diffusers,
    diffusers_config,
    diffusers_to_comfy,
    load_camera,
    remove_memory,
    transformer_from_comfy,
)

import tiny_models  # noqa: E402
from forward import model_forward, rel_err  # noqa: E402

TINY_DIFFUSERS = dict(num_attention_heads=2, attention_head_dim=128, ffn_dim=512, num_layers=4, text_dim=4096,
                      freq_dim=256)  # the tiny ComfyUI fixture's shape (ComfyUI detects heads as dim // 128)
HOST_TOL = 1e-5  # fp32 rounding plus the timestep-embedding difference (module docstring)


def tiny_transformer(seed: int = 3) -> WanTransformer3DModel:
    model = WanTransformer3DModel(**TINY_DIFFUSERS)
    tiny_models.randomize(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def hosts(comfy):
    """(diffusers transformer, ComfyUI MODEL) holding the same weights."""
    import comfy.sd

    tr = tiny_transformer()
    model = comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in diffusers_to_comfy(tr.state_dict()).items()})
    return tr, model


@torch.no_grad()
def diffusers_forward(tr, x, t, txt):
    return tr(hidden_states=x, timestep=t, encoder_hidden_states=txt, return_dict=False)[0].float()


def inputs(batch=1, seed=0, frames=3, t=600.0, channels=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, frames, 8, 8, generator=g), torch.full((batch,), t),
            torch.randn(batch, 512, 4096, generator=g))


# --- weights --------------------------------------------------------------------------------------------------

def test_keys_convert_both_ways_exactly():
    tr = tiny_transformer()
    sd = tr.state_dict()
    comfy_sd = diffusers_to_comfy(sd)
    assert "blocks.0.self_attn.q.weight" in comfy_sd and "blocks.3.norm3.bias" in comfy_sd
    assert "head.modulation" in comfy_sd and len(comfy_sd) == len(sd)
    back = comfy_to_diffusers({"model.diffusion_model." + k: v for k, v in comfy_sd.items()})
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    cfg = diffusers_config(comfy_sd)  # read from the tensor shapes
    assert all(tuple(v) == tuple(tr.config[k]) if k == "patch_size" else v == tr.config[k] for k, v in cfg.items())


def test_image_to_video_and_fused_keys_convert_too():
    i2v = WanTransformer3DModel(**{**TINY_DIFFUSERS, "num_layers": 1}, image_dim=32, added_kv_proj_dim=256)
    sd = i2v.state_dict()
    comfy_sd = diffusers_to_comfy(sd)
    assert {"img_emb.proj.1.weight", "blocks.0.cross_attn.k_img.weight", "blocks.0.cross_attn.norm_k_img.weight"} \
        <= comfy_sd.keys()
    assert comfy_to_diffusers(comfy_sd).keys() == sd.keys()
    i2v.fuse_qkv_projections()
    replaced = (".attn1.to_q.", ".attn1.to_k.", ".attn1.to_v.", ".attn2.to_k.", ".attn2.to_v.", "add_k_proj", "add_v_proj")
    fused = {k: v for k, v in i2v.state_dict().items() if not any(r in k for r in replaced)}
    assert any("to_qkv" in k for k in fused)
    assert all(torch.equal(diffusers_to_comfy(fused)[k], comfy_sd[k]) for k in comfy_sd)


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown keys blocks.0.mystery.weight"):
        comfy_to_diffusers({"blocks.0.mystery.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown keys lora_A.weight"):
        diffusers_to_comfy({"lora_A.weight": torch.zeros(1)})


def test_comfy_file_loads_as_diffusers_transformer(tmp_path):
    from safetensors.torch import save_file

    tr = tiny_transformer()
    path = tmp_path / "wan.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in diffusers_to_comfy(tr.state_dict()).items()},
              str(path))
    loaded = transformer_from_comfy(path)
    x, t, txt = inputs()
    assert torch.equal(diffusers_forward(loaded, x, t, txt), diffusers_forward(tr, x, t, txt))


# --- plain models -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 1.0, 600.0, 999.0])
def test_plain_models_agree_between_hosts(hosts, t):
    tr, model = hosts
    x, tt, txt = inputs(2, t=t)
    out_d, out_c = diffusers_forward(tr, x, tt, txt), model_forward(model, x, tt, txt)
    assert rel_err(out_d, out_c) < (1e-6 if t <= 1.0 else HOST_TOL)


def test_timestep_embedding_is_the_only_host_difference(hosts, monkeypatch):
    import comfy.ldm.wan.model as wan

    tr, model = hosts
    x, t, txt = inputs(1, t=999.0)
    out_c = model_forward(model, x, t, txt)
    before = rel_err(diffusers_forward(tr, x, t, txt), out_c)
    monkeypatch.setattr(tr.condition_embedder.timesteps_proj, "forward", lambda s: wan.sinusoidal_embedding_1d(256, s))
    after = rel_err(diffusers_forward(tr, x, t, txt), out_c)
    assert after < 1e-6 < before


# --- DiT-Mem -----------------------------------------------------------------------------------------------------

def reference_latents(seed, n=2):
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(n, 16, 13, 16, 16, generator=g)}


@pytest.fixture(scope="module")
def diffusers_encoder(models_dir):
    return load_memory_encoder(tiny_models.model_paths(models_dir)["encoder"])


@pytest.mark.parametrize("deduplicate", [True, False])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_dit_mem_agrees_between_hosts(comfy, hosts, encoder, diffusers_encoder, deduplicate, strength):
    tr, model = hosts
    memory_c = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent=reference_latents(0),
                         deduplicate=deduplicate, strength=strength)[0]
    patched = comfy.run("MemLearnerApplyReferenceMemory", model=model, memory=memory_c)[0]
    memory_d = ReferenceMemory.from_latents(memory_c.latents[0], diffusers_encoder, strength, deduplicate)
    x, t, txt = inputs(2)
    plain = diffusers_forward(tr, x, t, txt)
    apply_memory(tr, memory=memory_d)
    try:
        out_d = diffusers_forward(tr, x, t, txt)
    finally:
        remove_memory(tr)
    assert rel_err(out_d, model_forward(patched, x, t, txt, [0])) < HOST_TOL
    assert rel_err(out_d, plain) > 1e-3  # the memory does change the output
    assert torch.equal(diffusers_forward(tr, x, t, txt), plain)  # and is gone after remove_memory


def test_strength_zero_is_exactly_the_plain_transformer(hosts, diffusers_encoder):
    tr, _ = hosts
    x, t, txt = inputs()
    plain = diffusers_forward(tr, x, t, txt)
    memory = ReferenceMemory.from_latents(reference_latents(0)["samples"], diffusers_encoder, strength=0.0)
    assert apply_memory(tr, memory=memory) is None
    assert torch.equal(diffusers_forward(tr, x, t, txt), plain)


# --- query memory --------------------------------------------------------------------------------------------------

def channels(model) -> int:
    """The latent channels of a ComfyUI Wan MODEL (16 Wan2.1, 48 Wan2.2 TI2V-5B)."""
    return model.model.diffusion_model.out_dim


def history_spec(model, frames, poses=None, seed=5):
    """History frames just before the chunk, in the model's latent space (as the ComfyUI nodes read them)."""
    samples = torch.randn(1, channels(model), frames, 8, 8, generator=torch.Generator().manual_seed(seed))
    return ContextSpec.from_history(model.model.process_latent_in(samples)[0], poses)


def gapped_spec(model, poses=None):
    """Gapped, pooled history as Memory Rollout's framepack policy picks it: frames -7, -6 pooled 4x4 and 2x2,
    -2 and -1 at full resolution (tokens at the centres of their cells)."""
    g = torch.Generator().manual_seed(9)
    lat = model.model.process_latent_in(torch.randn(1, channels(model), 4, 8, 8, generator=g))[0]
    pose = (lambda i: None) if poses is None else (lambda i: poses[i])
    return ContextSpec([ContextSegment(lat[:, :1], torch.tensor([-7]), 4, pose(slice(0, 1))),
                        ContextSegment(lat[:, 1:2], torch.tensor([-6]), 2, pose(slice(1, 2))),
                        ContextSegment(lat[:, 2:], torch.tensor([-2, -1]), 1, pose(slice(2, 4)))])


def both_query_forwards(hosts, query_c, query_d, batch=1, memory=None, steps=(600.0,), seed=11):
    """The same query memory through both hosts' adapters: outputs per step (one run each)."""
    mp = host.pack("nodes.memory_patch")
    tr, model = hosts
    patched = mp.apply_memory(model, memory[0] if memory else None, query_c)
    apply_memory(tr, memory=memory[1] if memory else None, query=query_d)
    run = mp.RunState(seed)
    outs = []
    try:
        for i, step in enumerate(steps):
            x, t, txt = inputs(batch, seed=i, t=step, channels=channels(model))
            outs.append((diffusers_forward(tr, x, t, txt), model_forward(patched, x, t, txt, [0], run=run)))
    finally:
        remove_memory(tr)
    return outs


def queries(spec, layers=2, camera=None, chunk_poses=None, cache=True, pool=1, seed=11):
    mp = host.pack("nodes.memory_patch")
    return (mp.QueryMemory(layers, spec, camera, chunk_poses, cache, pool),
            QueryMemory(layers, spec, camera, chunk_poses, cache, pool, seed))


@pytest.mark.parametrize("context_frames", [0, 1, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_query_memory_agrees_between_hosts(hosts, context_frames, batch):
    spec = history_spec(hosts[1], context_frames)
    (out_d, out_c), = both_query_forwards(hosts, *queries(spec), batch=batch)
    assert rel_err(out_d, out_c) < HOST_TOL
    assert rel_err(out_d, diffusers_forward(hosts[0], *inputs(batch))) > 1e-3


@pytest.mark.parametrize("layers", [1, 4])
def test_query_layer_count_agrees_between_hosts(hosts, layers):
    (out_d, out_c), = both_query_forwards(hosts, *queries(history_spec(hosts[1], 2), layers=layers))
    assert rel_err(out_d, out_c) < HOST_TOL


@pytest.mark.parametrize("cache", [True, False])
def test_cached_history_agrees_across_steps(hosts, cache):
    outs = both_query_forwards(hosts, *queries(gapped_spec(hosts[1]), cache=cache), steps=(900.0, 500.0, 100.0))
    for out_d, out_c in outs:
        assert rel_err(out_d, out_c) < HOST_TOL


@pytest.mark.parametrize("cache", [True, False])
def test_the_learned_policy_routes_alike_on_both_hosts(hosts, cache):
    spec = history_spec(hosts[1], 6)
    query_c, query_d = queries(spec, cache=cache)
    query_c.route_frames = query_d.route_frames = 2
    outs = both_query_forwards(hosts, query_c, query_d, batch=2, steps=(900.0, 300.0))
    for out_d, out_c in outs:
        assert rel_err(out_d, out_c) < HOST_TOL
    assert query_c.routed == query_d.routed and all(len(f) == 2 for f in query_d.routed.values())


def test_pooled_queries_agree_between_hosts(hosts):
    (out_d, out_c), = both_query_forwards(hosts, *queries(gapped_spec(hosts[1]), pool=2))
    assert rel_err(out_d, out_c) < HOST_TOL


def camera_file(tmp_path, version=2):
    cam = CameraEmbedding(256)
    tiny_models.randomize(cam, 21)
    with torch.no_grad():
        cam.proj.weight.mul_(3.0)  # a camera that visibly moves the output
    path = tmp_path / "query.safetensors"
    save_query_weights(path, cam.state_dict(), query_layers=2, query_pool=1)
    return path


def poses(n, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.eye(3).expand(n, 3, 3) + 0.1 * torch.randn(n, 3, 3, generator=g),
                      torch.randn(n, 3, 1, generator=g)], -1)


def test_camera_and_memory_together_agree_between_hosts(comfy, hosts, encoder, diffusers_encoder, tmp_path):
    camera, layers, pool = load_camera(camera_file(tmp_path))
    assert (layers, pool) == (2, 1) and camera.on_query
    history_poses, chunk_poses = poses(4), poses(3, seed=6)
    memory_c = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent=reference_latents(1))[0]
    memory_d = ReferenceMemory.from_latents(memory_c.latents[0], diffusers_encoder)
    spec = gapped_spec(hosts[1], history_poses)
    (out_d, out_c), = both_query_forwards(hosts, *queries(spec, camera=camera, chunk_poses=chunk_poses),
                                          memory=(memory_c, memory_d))
    assert rel_err(out_d, out_c) < HOST_TOL
    (no_cam, _), = both_query_forwards(hosts, *queries(spec), memory=(memory_c, memory_d))
    assert rel_err(out_d, no_cam) > 1e-3


@pytest.mark.parametrize("pool", [1, 2])
def test_view_aligned_rope_agrees_between_hosts(hosts, tmp_path, pool):
    """Version-3 weights on gapped, pooled history turned away from the chunk: both hosts place every frame alike,
    and the positions change the output."""
    from memlearner_core.revisit_world import yaw_path

    camera, _, _ = load_camera(camera_file(tmp_path))
    turned = CameraEmbedding(256, view_rope_fov=45.0)
    turned.load_state_dict(camera.state_dict())
    spec = gapped_spec(hosts[1], yaw_path([-60.0, -30.0, 15.0, 40.0]))
    chunk_poses = yaw_path([20.0, 25.0, 50.0])
    (out_d, out_c), = both_query_forwards(hosts, *queries(spec, camera=turned, chunk_poses=chunk_poses, pool=pool))
    assert rel_err(out_d, out_c) < HOST_TOL
    (stock, _), = both_query_forwards(hosts, *queries(spec, camera=camera, chunk_poses=chunk_poses, pool=pool))
    assert rel_err(out_d, stock) > 1e-3


def test_memories_stack_and_come_off(hosts, diffusers_encoder):
    tr, model = hosts
    x, t, txt = inputs()
    plain = diffusers_forward(tr, x, t, txt)
    memory = ReferenceMemory.from_latents(reference_latents(0)["samples"], diffusers_encoder)
    apply_memory(tr, memory=memory)
    dit_mem = diffusers_forward(tr, x, t, txt)
    adapter = apply_memory(tr, query=QueryMemory(2, history_spec(model, 2)))
    assert adapter.memory is memory and adapter.query is not None  # DiT-Mem kept under query memory
    both = diffusers_forward(tr, x, t, txt)
    assert rel_err(both, dit_mem) > 1e-3
    remove_memory(tr)
    assert torch.equal(diffusers_forward(tr, x, t, txt), plain)
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in tr.blocks)


def test_bad_settings_are_refused_before_anything_changes(hosts, diffusers_encoder):
    tr, model = hosts
    spec = history_spec(model, 1)
    with pytest.raises(ValueError, match="query_layers must be between 1 and 4"):
        apply_memory(tr, query=QueryMemory(5, spec))
    with pytest.raises(ValueError, match="query_pool must be 1"):
        apply_memory(tr, query=QueryMemory(2, spec, query_pool=0))
    with pytest.raises(ValueError, match="nothing to apply"):
        apply_memory(tr)
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        apply_memory(torch.nn.Linear(2, 2), query=QueryMemory(1, spec))
    assert not hasattr(tr, "_memlearner_memory")
    apply_memory(tr, query=QueryMemory(2, spec))
    try:
        with pytest.raises(ValueError, match="context is 8x8 latent pixels"):
            diffusers_forward(tr, torch.randn(1, 16, 3, 4, 4), torch.full((1,), 500.0), torch.randn(1, 8, 4096))
    finally:
        remove_memory(tr)


# --- Wan2.2 TI2V-5B (48 latent channels) ---------------------------------------------------------------------------

P_TOKENS_PER_FRAME = 16  # an 8x8 latent frame in 2x2 patches


@pytest.fixture(scope="module")
def hosts_5b(wan22_5b_diffusers, wan22_5b):
    """(diffusers transformer, ComfyUI MODEL): the tiny 5B's one file, converted by the pack's key conversion."""
    return wan22_5b_diffusers, wan22_5b


@pytest.fixture(scope="module")
def diffusers_encoder_5b(wan22_encoder_file):
    return load_memory_encoder(wan22_encoder_file)


def timesteps_5b(kind, batch=2):
    """Scalar timesteps, or per-frame ones as Wan2.2 image-to-video gives them (0 for the given first frame)."""
    return torch.full((batch,), 700.0) if kind == "scalar" else torch.tensor([[0.0, 700.0, 700.0]] * batch)


def forwards_5b(pair, t, query=(None, None), memory=(None, None), batch=2):
    """One forward of the tiny 5B on both hosts with the same memories. Per-frame timesteps ``t [B, T]`` go to
    ComfyUI as they are and to diffusers per token, as diffusers' Wan2.2 pipeline gives them."""
    mp = host.pack("nodes.memory_patch")
    tr, model = pair
    g = torch.Generator().manual_seed(1)
    x, txt = torch.randn(batch, 48, 3, 8, 8, generator=g), torch.randn(batch, 512, 4096, generator=g)
    patched = mp.apply_memory(model, memory[0], query[0]) if memory[0] or query[0] else model
    if memory[1] or query[1]:
        apply_memory(tr, memory=memory[1], query=query[1])
    try:
        out_d = diffusers_forward(tr, x, t if t.ndim == 1 else t.repeat_interleave(P_TOKENS_PER_FRAME, 1), txt)
    finally:
        remove_memory(tr)
    return out_d, model_forward(patched, x, t, txt, [0], run=mp.RunState(11))


def references_5b(comfy, wan22_encoder, encoder_d):
    g = torch.Generator().manual_seed(3)
    memory_c = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=wan22_encoder,
                         latent={"samples": torch.randn(2, 48, 13, 13, 13, generator=g)})[0]
    return memory_c, ReferenceMemory.from_latents(memory_c.latents[0], encoder_d)


@pytest.mark.parametrize("kind", ["scalar", "per_frame"])
def test_the_5b_is_the_same_model_on_both_hosts(hosts_5b, kind):
    out_d, out_c = forwards_5b(hosts_5b, timesteps_5b(kind))
    assert rel_err(out_d, out_c) < HOST_TOL


@pytest.mark.parametrize("pool", [1, 2])
def test_query_memory_on_the_5b_agrees_between_hosts(hosts_5b, pool):
    out_d, out_c = forwards_5b(hosts_5b, timesteps_5b("scalar"), query=queries(history_spec(hosts_5b[1], 2), pool=pool))
    assert rel_err(out_d, out_c) < HOST_TOL
    assert rel_err(out_d, forwards_5b(hosts_5b, timesteps_5b("scalar"))[0]) > 1e-3  # the history is read


@pytest.mark.parametrize("pool", [1, 2])
def test_per_frame_timesteps_on_the_5b_run_the_queries_at_the_noisy_level_on_both_hosts(hosts_5b, pool):
    """A clean first frame (t = 0) and noisy ones: P keeps its per-token timesteps, Q runs at the noisy frames'."""
    out_d, out_c = forwards_5b(hosts_5b, timesteps_5b("per_frame"), query=queries(gapped_spec(hosts_5b[1]), pool=pool))
    assert rel_err(out_d, out_c) < HOST_TOL


@pytest.mark.parametrize("kind", ["scalar", "per_frame"])
def test_reference_memory_on_the_5b_agrees_between_hosts(comfy, hosts_5b, wan22_encoder, diffusers_encoder_5b, kind):
    memory = references_5b(comfy, wan22_encoder, diffusers_encoder_5b)
    out_d, out_c = forwards_5b(hosts_5b, timesteps_5b(kind), memory=memory)
    assert rel_err(out_d, out_c) < HOST_TOL
    assert rel_err(out_d, forwards_5b(hosts_5b, timesteps_5b(kind))[0]) > 1e-3  # the memory is read


def test_both_memories_on_the_5b_agree_between_hosts(comfy, hosts_5b, wan22_encoder, diffusers_encoder_5b):
    memory = references_5b(comfy, wan22_encoder, diffusers_encoder_5b)
    query = queries(gapped_spec(hosts_5b[1]), pool=2)
    for kind in ("scalar", "per_frame"):
        out_d, out_c = forwards_5b(hosts_5b, timesteps_5b(kind), query=query, memory=memory)
        assert rel_err(out_d, out_c) < HOST_TOL


VARIANTS = [
    ("wan2.1-i2v", dict(in_channels=36, out_channels=16, image_dim=32, added_kv_proj_dim=256),
     r"an image-to-video transformer \(image_dim 32"),
    ("wan2.2-i2v-a14b", dict(in_channels=36, out_channels=16), r"an image-to-video or control transformer \(36 input channels for 16 latent channels: image or control "
     r"channels concatenated\)$"),
    ("unknown-channels", dict(in_channels=32, out_channels=32), r"a transformer with 32 latent channels"),
]


@pytest.mark.parametrize("config,found", [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_other_wan_variants_are_refused_in_one_line_naming_what_is_supported(config, found):
    model = WanTransformer3DModel(**{**TINY_DIFFUSERS, "num_layers": 1, **config})
    with pytest.raises(ValueError, match=r"^memory needs a Wan text-to-video WanTransformer3DModel of a supported "
                                         r"family \(Wan2.1 T2V .*Wan2.2 TI2V-5B \(48 latent channels\)\); got " + found):
        apply_memory(model, query=QueryMemory(1, ContextSpec([])))
    assert not hasattr(model, "_memlearner_memory")


def query_file_of(tmp_path, family):
    cam = CameraEmbedding(256)
    path = tmp_path / f"query_{family}.safetensors"
    save_query_weights(path, cam.state_dict(), query_layers=2, query_pool=1, model_family=family)
    return path


def test_5b_query_weights_run_on_the_5b(hosts_5b, tmp_path):
    tr, model = hosts_5b
    camera, _, _ = load_camera(query_file_of(tmp_path, "wan2.2-ti2v-5b"), transformer=tr)
    apply_memory(tr, query=QueryMemory(2, history_spec(model, 1), camera))
    remove_memory(tr)


def test_query_weights_of_the_other_family_are_refused(hosts, hosts_5b, tmp_path):
    for weights, family, tr in (("wan2.2-ti2v-5b", "wan2.1", hosts[0]), ("wan2.1", "wan2.2-ti2v-5b", hosts_5b[0])):
        path = query_file_of(tmp_path, weights)
        refusal = f"was fine-tuned on {weights}, but the transformer is {family}; load the query weights fine-tuned"
        with pytest.raises(ValueError, match=refusal):
            load_camera(path, transformer=tr)
        camera, _, _ = load_camera(path)  # loaded without the transformer: refused where it is applied
        with pytest.raises(ValueError, match="the query weights \\(camera\\) " + refusal):
            apply_memory(tr, query=QueryMemory(2, ContextSpec([]), camera))
        assert not hasattr(tr, "_memlearner_memory")


def test_a_wan21_encoder_is_refused_on_the_5b(hosts_5b, diffusers_encoder):
    memory = ReferenceMemory.from_latents(reference_latents(0)["samples"], diffusers_encoder)
    with pytest.raises(ValueError, match=r"^the memory encoder is for Wan2.1 text-to-video \(16 latent channels, "
                                         r"256-wide tokens\) but this model is Wan2.2 TI2V-5B"):
        apply_memory(hosts_5b[0], memory=memory)


def test_wan21_latents_are_refused_on_the_5b(hosts_5b, diffusers_encoder_5b):
    tr, model = hosts_5b
    with pytest.raises(ValueError, match=r"^reference latents must be \[N, 48, T, H, W\] \(the channels the memory "
                                         r"encoder reads\), got \(2, 16, 13, 16, 16\)"):
        ReferenceMemory.from_latents(reference_latents(0)["samples"], diffusers_encoder_5b)
    apply_memory(tr, query=QueryMemory(2, history_spec(model, 1)))
    try:
        with pytest.raises(ValueError, match=r"^query memory on Wan2.2 TI2V-5B needs a video latent \[B, 48, T, H, "
                                             r"W\], got \(1, 16, 3, 8, 8\)"):
            diffusers_forward(tr, *inputs())
    finally:
        remove_memory(tr)
    wan21_history = ContextSpec.from_history(torch.randn(16, 2, 8, 8))
    apply_memory(tr, query=QueryMemory(2, wan21_history))
    try:
        with pytest.raises(ValueError, match=r"^the query-memory history must be Wan2.2 TI2V-5B latents \[48, T, H, "
                                             r"W\], got \(16, 2, 8, 8\)"):
            diffusers_forward(tr, *inputs(channels=48))
    finally:
        remove_memory(tr)
