"""Memory Rollout made of ComfyUI's sampling parts (noise, guider, sampler, sigmas) and Camera Path: the same video
as the legacy node and as Apply Query Memory + KSampler, any guider plugs in, and mistakes are refused when the
graph is queued, before anything runs."""

import json
import re
import sys

import pytest
import torch

import host

sys.path.insert(0, str(host.ROOT / "workflows"))
import build  # noqa: E402

SETTINGS = dict(seed=7, steps=2, cfg=2.0, sampler_name="euler", scheduler="simple", width=64, height=64,
                chunk_frames=5, chunks=3, policy="fov", context_frames=3, query_layers=2)


def legacy(comfy, model, text_cond, **kw):
    args = dict(model=model, positive=text_cond[0], negative=text_cond[1], **SETTINGS, camera="walk_and_revisit",
                trajectory='{"distance": 2}')
    args.update(kw)
    latent, report = comfy.run("MemLearnerMemoryRollout", **args)
    return latent["samples"], json.loads(report)


def parts(comfy, model, text_cond, s=SETTINGS, guider=None):
    """ComfyUI's own nodes, as a user wires them into Memory Rollout."""
    if guider is None:
        guider = comfy.run("CFGGuider", model=model, positive=text_cond[0], negative=text_cond[1], cfg=s["cfg"])[0]
    return dict(noise=comfy.run("RandomNoise", noise_seed=s["seed"])[0], guider=guider,
                sampler=comfy.run("KSamplerSelect", sampler_name=s["sampler_name"])[0],
                sigmas=comfy.run("BasicScheduler", model=model, scheduler=s["scheduler"], steps=s["steps"],
                                 denoise=1.0)[0],
                chunk_latent=comfy.run("EmptyHunyuanLatentVideo", width=s["width"], height=s["height"],
                                       length=s["chunk_frames"], batch_size=1)[0])


def rollout(comfy, model, text_cond, guider=None, **kw):
    camera = comfy.run("MemLearnerCameraPath", camera="walk_and_revisit", trajectory='{"distance": 2}')[0]
    args = dict(**parts(comfy, model, text_cond, guider=guider), chunks=SETTINGS["chunks"], policy="fov",
                context_frames=SETTINGS["context_frames"], query_layers=SETTINGS["query_layers"], camera_path=camera)
    args.update(kw)
    latent, report = comfy.run("MemLearnerRollout", **args)
    return latent["samples"], json.loads(report)


def test_the_parts_make_the_same_video_as_the_legacy_node(comfy, wan_model, text_cond):
    new, report = rollout(comfy, wan_model, text_cond)
    old, old_report = legacy(comfy, wan_model, text_cond)
    assert new.shape == (1, 16, 6, 8, 8) and torch.equal(new, old)
    assert [r["context"] for r in report] == [r["context"] for r in old_report] and report[2]["context"]


def test_both_nodes_roll_out_the_tiny_wan22_5b_in_its_48_channel_latents(comfy, wan22_5b, text_cond):
    """The legacy node sizes the 5B's chunks by its 16x VAE: 128x128 frames are 8x8 latents."""
    new, _ = rollout(comfy, wan22_5b, text_cond, chunk_latent={"samples": torch.zeros(1, 48, 2, 8, 8)})
    old, _ = legacy(comfy, wan22_5b, text_cond, width=128, height=128)
    assert new.shape == (1, 48, 6, 8, 8) and torch.isfinite(new).all()
    assert torch.equal(new, old)


def test_a_chunk_is_apply_query_memory_then_ksampler(comfy, wan_model, text_cond):
    """Chunk 1 of a rollout continued from 2 latent frames: query memory over those frames, seed + 1."""
    history = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    chunk, _ = legacy(comfy, wan_model, text_cond, chunks=1, policy="all", camera="none",
                      first_chunk={"samples": history})
    patched = comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context={"samples": history}, query_layers=2)[0]
    empty = comfy.run("EmptyHunyuanLatentVideo", width=64, height=64, length=5, batch_size=1)[0]
    expected = comfy.run("KSampler", model=patched, seed=SETTINGS["seed"] + 1, steps=2, cfg=2.0, sampler_name="euler",
                         scheduler="simple", positive=text_cond[0], negative=text_cond[1], latent_image=empty,
                         denoise=1.0)[0]["samples"]
    assert torch.equal(chunk[:, :, :2], history) and torch.equal(chunk[:, :, 2:], expected)


def test_any_guider_plugs_in(comfy, wan_model, text_cond):
    basic = comfy.run("BasicGuider", model=wan_model, conditioning=text_cond[0])[0]
    with_basic, _ = rollout(comfy, wan_model, text_cond, guider=basic, chunks=2)
    cfg1, _ = legacy(comfy, wan_model, text_cond, cfg=1.0, chunks=2)  # CFG at 1 reads the positive prompt only
    cfg2, _ = legacy(comfy, wan_model, text_cond, chunks=2)
    assert torch.equal(with_basic, cfg1) and not torch.allclose(with_basic, cfg2)


def test_a_scheduler_plugs_in_and_the_noise_seed_counts_per_chunk(comfy, wan_model, text_cond):
    karras = comfy.run("KarrasScheduler", steps=3, sigma_max=1.0, sigma_min=0.01, rho=7.0)[0]
    a, report = rollout(comfy, wan_model, text_cond, sigmas=karras, chunks=2)
    b, _ = rollout(comfy, wan_model, text_cond, chunks=2)
    assert len(report) == 2 and torch.isfinite(a).all() and not torch.allclose(a, b)
    seeded = rollout(comfy, wan_model, text_cond, noise=comfy.run("RandomNoise", noise_seed=8)[0], chunks=1)[0]
    assert not torch.equal(seeded, b[:, :, :2])  # the first chunk draws with the noise's own seed
    continued, _ = rollout(comfy, wan_model, text_cond, chunks=1, first_chunk={"samples": b[:, :, :2]})
    assert torch.equal(continued, b)  # chunk 1 draws with seed + 1, however it is reached


def test_camera_path_gives_the_trajectory_poses(comfy):
    from memlearner_core.trajectory import parse_trajectory, preset

    path = comfy.run("MemLearnerCameraPath", camera="orbit", trajectory='{"degrees": 90}')[0]
    assert torch.equal(path.poses(6), preset("orbit", 6, degrees=90))
    poses = json.dumps([{"position": [0, 0, z], "yaw": 10 * z} for z in range(4)])
    custom = comfy.run("MemLearnerCameraPath", camera="custom JSON", trajectory=poses)[0]
    assert torch.equal(custom.poses(3), parse_trajectory(poses))


def test_camera_path_preview_draws_the_path_from_above(comfy):
    def lit(camera):  # the pixels off the background, and the columns and rows they fill
        image = comfy.run("MemLearnerCameraPath", camera=camera, trajectory="")[1]
        assert image.shape == (1, 256, 256, 3) and image.min() >= 0 and image.max() <= 1
        on = (image[0] - image[0, 0, 0]).abs().sum(-1) > 0.1
        return on.any(0).nonzero().flatten(), on.any(1).nonzero().flatten()

    cols, rows = lit("walk_and_revisit")  # straight ahead along z: a vertical line up the image
    assert cols.max() - cols.min() < 8 and rows.max() - rows.min() > 150
    cols, rows = lit("orbit")  # a circle
    assert cols.max() - cols.min() > 150 and rows.max() - rows.min() > 150
    cols, rows = lit("pan_and_return")  # turning on the spot, 0 to 90 degrees: a fan up and to the right
    assert 100 < cols.max() - cols.min() < 128 and 100 < rows.max() - rows.min() < 128 and cols.min() >= 124


@pytest.mark.parametrize("node, values, message", [
    ("MemLearnerCameraPath", dict(camera="orbit", trajectory='{"radius": -1}'), "radius > 0"),
    ("MemLearnerCameraPath", dict(camera="custom JSON", trajectory="[[1, 2"), "not valid JSON"),
    ("MemLearnerCameraPath", dict(camera="pan_and_return", trajectory='{"distance": 2}'), "has no parameter distance"),
    ("MemLearnerRollout", dict(policy="fov", input_types={}), "fov policy .* Camera Path"),
    ("MemLearnerRollout", dict(policy="recent", context_frames=0, query_layers=2), "needs a budget"),
    ("MemLearnerRollout", dict(policy="sideways"), "unknown policy 'sideways'"),
    ("MemLearnerRollout", dict(query_pool=0), "query_pool must be a whole number from 1 to 8"),
])
def test_validate_inputs_names_the_mistake(comfy, node, values, message):
    result = comfy.node(node).validate_inputs(**values)
    assert isinstance(result, str) and re.search(message, result), result


def test_validate_inputs_passes_what_runs(comfy):
    assert comfy.node("MemLearnerCameraPath").validate_inputs(camera="walk_and_revisit", trajectory="") is True
    assert comfy.node("MemLearnerCameraPath").validate_inputs(camera="custom JSON") is True  # trajectory linked
    assert comfy.node("MemLearnerRollout").validate_inputs(
        policy="fov", context_frames=3, query_layers=2, query_weights="none", query_pool=1,
        input_types={"camera_path": "MEMLEARNER_CAMERA_PATH"}) is True
    assert comfy.node("MemLearnerRollout").validate_inputs(policy="recent", context_frames=0, query_layers=0) is True


@pytest.mark.server
def test_the_server_refuses_a_mistake_when_queued_before_anything_runs(server):
    graph = build.memory_rollout(tiny=True)
    graph["rollout"]["inputs"]["policy"] = "recent"
    graph["rollout"]["inputs"]["context_frames"] = 0
    graph["camera"]["inputs"]["trajectory"] = '{"distance": "far"}'
    status, body = server.post("/prompt", {"prompt": graph, "client_id": "memlearner-test"})
    assert status == 400, body
    errors = json.dumps(body["node_errors"])
    assert "needs a budget" in errors and "distance must be a number" in errors
    assert set(body["node_errors"]) == {"rollout", "camera"}


def test_the_legacy_node_is_kept_but_deprecated(comfy):
    schema = comfy.node("MemLearnerMemoryRollout").define_schema()
    assert schema.is_deprecated and "Camera Path" in schema.description
