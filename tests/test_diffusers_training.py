"""``memlearner-train`` with ``host = "diffusers"``: the same config, data and seed train the same way as on the
ComfyUI host (losses equal to the hosts' float32 difference), and the exports load in the ComfyUI nodes."""

from __future__ import annotations

import pytest

import host

# The lent GPU machines get no diffusers (their image and the device bundle carry none): skip there. Anywhere
# else diffusers comes with the test extra, and a missing one must fail.
if host.use_gpu():
    pytest.importorskip("diffusers", reason="diffusers is not installed on this GPU machine")

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from memlearner_core.training.config import ConfigError, config_from_dict  # noqa: E402
from memlearner_core.training.trainer import train  # noqa: E402
from memlearner_diffusers import convert  # noqa: E402
from memlearner_diffusers import training as dtrain  # noqa: E402
from memlearner_train.cli import main  # noqa: E402

import tiny_models  # noqa: E402
from forward import model_forward, rel_err  # noqa: E402


def clip_items(n=2, frames=5, poses=False, channels=16, size=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(channels, frames, size, size, generator=g),
             torch.cat([torch.eye(3).expand(frames, 3, 3), torch.randn(frames, 3, 1, generator=g)], -1) if poses else None,
             torch.randn(1, 8, 4096, generator=g)) for _ in range(n)]


def config(tmp_path, name="run", **kw):
    data = dict(recipe="query", data_dir="data", output_dir=str(tmp_path / name), model_file="m", steps=3, lr=1e-4,
                checkpoint_every=10, mixed_precision="fp32", query_layers=2, predict_latent_frames=2,
                max_context_multiple=1, clip_frames=17, width=64, height=64, data_format="latents",
                camera_init="normal")
    data.update(kw)
    return config_from_dict(data, tmp_path)


def wan_file(models_dir):
    return models_dir / "diffusion_models" / tiny_models.WAN_FILE


def both_hosts(comfy, models_dir, tmp_path, recipe_kind, items, wan=tiny_models.WAN_FILE, **kw):
    """Train the tiny Wan (``wan``: its file) with the same config on both hosts; returns (diffusers recipe,
    result), (ComfyUI's)."""
    th = host.pack("nodes.training_host")
    model = comfy.run("UNETLoader", unet_name=wan, weight_dtype="default")[0]
    cfg_d, cfg_c = config(tmp_path, "d", **kw), config(tmp_path, "c", **kw)
    transformer = dtrain.load_transformer(models_dir / "diffusion_models" / wan)
    recipes = []
    for make in ((dtrain.QueryRecipe, dtrain.EncoderRecipe), (th.QueryRecipe, th.EncoderRecipe)):
        torch.manual_seed(0)  # a fresh encoder's init comes from torch's global generator
        args = (transformer, cfg_d) if not recipes else (model, cfg_c)
        recipes.append(make[0](*args) if recipe_kind == "query" else make[1](*args, (13, 16, 16)))
    rd, rc = recipes
    return (rd, train(cfg_d, rd, items)), (rc, train(cfg_c, rc, items))


@pytest.mark.parametrize("poses", [False, True], ids=["no_camera", "camera"])
def test_query_recipe_trains_alike_on_both_hosts(comfy, models_dir, tmp_path, poses):
    (rd, res_d), (rc, res_c) = both_hosts(comfy, models_dir, tmp_path, "query", clip_items(poses=poses))
    assert len(res_d.losses) == 3
    for a, b in zip(res_d.losses, res_c.losses, strict=True):
        assert abs(a - b) <= 2e-5 * abs(b)
    # the diffusers export is a ComfyUI Wan: loaded by ComfyUI, it computes what the trained transformer computes
    wan_export, query_export = res_d.exported
    assert query_export.name == "memlearner_query.safetensors"
    models = host.Path(comfy.folder_paths.get_folder_paths("diffusion_models")[0])
    shutil.copy(wan_export, models / "diffusers_trained.safetensors")
    try:
        tuned = comfy.run("UNETLoader", unet_name="diffusers_trained.safetensors", weight_dtype="default")[0]
        x, t, txt = torch.randn(1, 16, 2, 8, 8), torch.tensor([0.0]), torch.randn(1, 8, 4096)
        rd.transformer.eval()
        with torch.no_grad():
            out_d = rd.transformer(hidden_states=x, timestep=t, encoder_hidden_states=txt, return_dict=False)[0]
        assert rel_err(model_forward(tuned, x, t, txt), out_d) < 1e-5
    finally:
        (models / "diffusers_trained.safetensors").unlink()


def test_the_learned_policy_trains_alike_on_both_hosts(comfy, models_dir, tmp_path):
    (_, res_d), (_, res_c) = both_hosts(comfy, models_dir, tmp_path, "query", clip_items(frames=9),
                                        context_policies=["learned"], max_context_multiple=3, clip_frames=33)
    for a, b in zip(res_d.losses, res_c.losses, strict=True):
        assert abs(a - b) <= 2e-5 * abs(b)


@pytest.mark.parametrize("draws", [{}, {"reference_pool": 2, "top_k_references": 1, "encoder_window": 3}],
                         ids=["fixed_references", "pool_and_window"])
def test_encoder_recipe_trains_alike_on_both_hosts(comfy, models_dir, tmp_path, draws):
    g = torch.Generator().manual_seed(1)
    clips = [torch.randn(16, 5, 8, 8, generator=g) for _ in range(3)]
    refs = [torch.randn(16, 13, 16, 16, generator=g) for _ in range(3)]
    items = [(clips[i], [refs[j] for j in range(3) if j != i], torch.randn(1, 8, 4096, generator=g), None)
             for i in range(3)]
    (rd, res_d), (rc, res_c) = both_hosts(comfy, models_dir, tmp_path, "encoder", items,
                                          **{"recipe": "encoder", "steps": 2, "lr": 1e-3, "top_k_references": 2,
                                             **draws})
    for a, b in zip(res_d.losses, res_c.losses, strict=True):
        assert abs(a - b) <= 2e-5 * abs(b)
    assert not any(p.requires_grad for p in rd.transformer.parameters())


def write_latent_clips(data, n=3, frames=5, channels=16, size=8):
    data.mkdir()
    g = torch.Generator().manual_seed(3)
    for i in range(n):
        save_file({"latent": torch.randn(channels, frames, size, size, generator=g)}, str(data / f"clip{i}.safetensors"),
                  metadata={"caption": f"clip {i % 2}"})


def write_run(tmp_path, models_dir, steps, extra="", wan=tiny_models.WAN_FILE, channels=16, size=8):
    write_latent_clips(tmp_path / "data", channels=channels, size=size) if not (tmp_path / "data").exists() else None
    path = tmp_path / "run.toml"
    path.write_text(f'''recipe = "query"
host = "diffusers"
data_dir = "data"
output_dir = "run"
model_file = "{models_dir / 'diffusion_models' / wan}"
data_format = "latents"
text = "none"
steps = {steps}
checkpoint_every = 2
clip_frames = 17
width = 64
height = 64
query_layers = 2
predict_latent_frames = 2
max_context_multiple = 1
mixed_precision = "fp32"
lr = 1e-4
''' + extra)
    return path


def test_train_command_on_diffusers_exports_what_both_hosts_load(comfy, models_dir, tmp_path, capsys):
    assert main([str(write_run(tmp_path, models_dir, steps=3))]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps (from 0)" in out
    wan_export = tmp_path / "run" / "export" / "memlearner_wan21.safetensors"
    assert str(wan_export) in out and (tmp_path / "run" / "export" / "memlearner_query.safetensors").is_file()
    reloaded = dtrain.load_transformer(wan_export)  # and back into diffusers
    assert convert.diffusers_to_comfy(reloaded.state_dict()).keys() == \
        convert.diffusers_to_comfy(dtrain.load_transformer(wan_file(models_dir)).state_dict()).keys()


def test_diffusers_run_resumes_exactly(comfy, models_dir, tmp_path, capsys):
    once = tmp_path / "once"
    once.mkdir()
    assert main([str(write_run(once, models_dir, steps=4))]) == 0
    split = tmp_path / "split"
    split.mkdir()
    assert main([str(write_run(split, models_dir, steps=2))]) == 0
    assert main([str(write_run(split, models_dir, steps=4))]) == 0
    assert "trained 4 steps (from 2)" in capsys.readouterr().out
    a = dtrain.load_transformer(once / "run" / "export" / "memlearner_wan21.safetensors").state_dict()
    b = dtrain.load_transformer(split / "run" / "export" / "memlearner_wan21.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(torch.cuda.is_available(), reason="two processes need two GPUs here; on the CPU they share it")
def test_accelerate_launch_trains_on_two_processes(models_dir, tmp_path):
    """``accelerate launch -m memlearner_train`` starts two processes (gloo on the CPU) that train one run: the
    first process alone exports, the checkpoint records both processes' random states, and one process refuses
    to resume it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = write_run(tmp_path, models_dir, steps=2)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(port), "-m", "memlearner_train", str(run)]
    out = subprocess.run(launch, capture_output=True, text=True, timeout=600, cwd=host.ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("trained 2 steps (from 0)") == 2
    assert out.stdout.count("memlearner_wan21.safetensors") == 1  # only the first process exports
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["meta"]["processes"] == 2 and len(state["rng"]["ranks"]) == 2
    assert main([str(write_run(tmp_path, models_dir, steps=3))]) == 2  # one process cannot resume two


def test_lora_export_has_comfyuis_lora_keys(comfy, models_dir, tmp_path):
    th = host.pack("nodes.training_host")
    cfg = config(tmp_path, lora_rank=4, steps=1)
    rd = dtrain.QueryRecipe(dtrain.load_transformer(wan_file(models_dir)), cfg)
    assert all("lora_" in n or n.startswith("camera.") for n in rd.trainable())
    rc = th.QueryRecipe(comfy.run("UNETLoader", unet_name=tiny_models.WAN_FILE, weight_dtype="default")[0], cfg)
    ours, theirs = dtrain.comfy_lora_state(rd.transformer, 4), th.comfy_lora_state(rc.dm, 4)
    assert ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)


def test_diffusers_host_needs_pre_encoded_clips():
    with pytest.raises(ConfigError, match='host = "diffusers" trains on pre-encoded clips'):
        config_from_dict(dict(recipe="query", data_dir="d", output_dir="o", model_file="m", vae_file="v",
                              host="diffusers"))
    with pytest.raises(ConfigError, match="'host' must be one of 'comfyui', 'diffusers'"):
        config_from_dict(dict(recipe="query", data_dir="d", output_dir="o", model_file="m", host="torch"))


def test_latent_space_matches_comfyuis(comfy):
    import comfy.latent_formats

    z = torch.randn(16, 2, 4, 4)
    torch.testing.assert_close(dtrain.latent_in(z), comfy.latent_formats.Wan21().process_in(z[None])[0])


def test_model_file_may_be_a_diffusers_folder(tmp_path):
    from diffusers import WanTransformer3DModel

    tr = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=128, ffn_dim=512, num_layers=2, text_dim=64)
    tr.save_pretrained(str(tmp_path / "Wan-Diffusers" / "transformer"))  # a whole pipeline folder's layout
    for folder in (tmp_path / "Wan-Diffusers", tmp_path / "Wan-Diffusers" / "transformer"):
        loaded = dtrain.load_transformer(folder).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in tr.state_dict().items())


def test_training_flow_matches_diffusers_scheduler():
    """The core's flow-matching target (memlearner_core.training.flow_matching) is the flow diffusers' Wan
    scheduler samples: the same shifted sigmas and timesteps, the same noising, and an Euler step along the
    velocity target moves exactly along the straight line."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from memlearner_core.training.flow_matching import (
        noisy_latents,
        sample_sigmas,
        shift_sigma,
        timesteps,
        velocity_target,
    )

    sched = FlowMatchEulerDiscreteScheduler(shift=5.0)
    unshifted = torch.linspace(1.0, 0.05, 10)  # a grid of sigmas before the scheduler's shift
    sched.set_timesteps(sigmas=unshifted.tolist())
    torch.testing.assert_close(sched.sigmas[:-1], shift_sigma(unshifted, 5.0))
    torch.testing.assert_close(sched.timesteps, timesteps(sched.sigmas[:-1]))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 16, 2, 4, 4, generator=g)
    t = sched.timesteps[3:4]
    sigma = sched.sigmas[3:4]
    xt = noisy_latents(x0, noise, sigma)
    torch.testing.assert_close(sched.scale_noise(x0, t, noise), xt)
    sched.set_begin_index(3)
    stepped = sched.step(velocity_target(x0, noise), t, xt, return_dict=False)[0]
    torch.testing.assert_close(stepped, noisy_latents(x0, noise, sched.sigmas[4:5]))
    # the sigma draw: diffusers' uniform density ("none" weighting, as Wan trains), shifted as the scheduler shifts
    u = compute_density_for_timestep_sampling("none", 6, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(sample_sigmas(6, torch.Generator().manual_seed(4)), shift_sigma(u, 5.0), rtol=0, atol=0)


# --- Wan2.2 TI2V-5B: 48-channel clips at 16x the VAE (64x64 frames: 4x4 latents) ----------------------------------

def test_query_recipe_on_the_5b_trains_alike_on_both_hosts(comfy, models_dir, tmp_path):
    from memlearner_core.checkpoint_io import load_query_weights

    items = clip_items(poses=True, channels=48, size=4)
    (rd, res_d), (_, res_c) = both_hosts(comfy, models_dir, tmp_path, "query", items, wan=tiny_models.WAN22_5B_FILE)
    assert len(res_d.losses) == 3
    for a, b in zip(res_d.losses, res_c.losses, strict=True):
        assert abs(a - b) <= 2e-5 * abs(b)
    assert load_query_weights(res_d.exported[1]).model_family == "wan2.2-ti2v-5b"


def test_train_command_on_diffusers_trains_the_5b_on_its_48_channel_clips(comfy, models_dir, tmp_path, capsys):
    from memlearner_core.checkpoint_io import load_query_weights

    run = write_run(tmp_path, models_dir, steps=3, wan=tiny_models.WAN22_5B_FILE, channels=48, size=4)
    assert main([str(run)]) == 0
    assert "trained 3 steps (from 0)" in capsys.readouterr().out
    exported = load_query_weights(tmp_path / "run" / "export" / "memlearner_query.safetensors")
    assert exported.model_family == "wan2.2-ti2v-5b"


def test_the_5b_reads_its_clips_in_the_wan22_latent_space(comfy, models_dir, tmp_path):
    import comfy.latent_formats

    transformer = dtrain.load_transformer(models_dir / "diffusion_models" / tiny_models.WAN22_5B_FILE)
    recipe = dtrain.QueryRecipe(transformer, config(tmp_path, query_layers=0))
    z = torch.randn(48, 2, 4, 4)
    torch.testing.assert_close(recipe.latent_in(z), comfy.latent_formats.Wan22().process_in(z[None])[0])


def test_a_width_the_5b_cannot_make_is_refused_in_one_line(wan22_5b_diffusers, tmp_path):
    with pytest.raises(ValueError, match=r"^'width' must be a multiple of 32 for Wan2.2 TI2V-5B \(16x VAE, 2x "
                                         r"patch\), got 80; fix width in the config$"):
        dtrain.check_model_family(config(tmp_path, width=80), wan22_5b_diffusers)
