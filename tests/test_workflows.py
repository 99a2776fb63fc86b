"""The shipped workflows: API and UI format from one source, each runs headless on the tiny fixtures."""

import io
import json
import shutil
import sys
import urllib.request

import pytest

from memlearner_client.ui_workflow import input_specs, to_api

import host
import tiny_models

sys.path.insert(0, str(host.ROOT / "workflows"))
import thumbnails  # noqa: E402
import ui_format  # noqa: E402

import build  # noqa: E402

pytestmark = pytest.mark.server
NAMES = sorted(build.WORKFLOWS)


def shipped(folder, name):
    return json.loads((build.FOLDERS[folder] / f"{name}.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_api_file_is_the_built_graph(name):
    assert shipped("api", name) == build.WORKFLOWS[name]()


def test_template_browser_lists_every_ui_workflow(server):
    """ComfyUI's /workflow_templates lists the ``example_workflows/*.json`` of each installed pack."""
    templates = server.get("/workflow_templates")
    ours = [names for names in templates.values() if "both_memories" in names]
    assert ours and sorted(ours[0]) == NAMES


def test_every_template_has_a_current_thumbnail():
    """``example_workflows/<name>.jpg`` beside each workflow, none left over, each what thumbnails.py draws now."""
    from PIL import Image, ImageChops

    assert sorted(p.stem for p in thumbnails.FOLDER.glob("*.jpg")) == NAMES == sorted(thumbnails.thumbnails())
    for name, drawn in thumbnails.thumbnails().items():
        shipped_image = Image.open(thumbnails.FOLDER / f"{name}.jpg")
        assert shipped_image.format == "JPEG" and shipped_image.size == thumbnails.SIZE
        drawn = Image.open(io.BytesIO(thumbnails.jpeg(drawn)))  # as written: another Pillow may encode a little apart
        diff = ImageChops.difference(shipped_image.convert("L"), drawn.convert("L"))
        changed = sum(diff.point(lambda v: 255 if v > 40 else 0).histogram()[255:])
        assert changed <= 20, f"{name}.jpg is stale ({changed} pixels differ): run python workflows/thumbnails.py"


def test_template_browser_serves_the_thumbnails(server):
    """The frontend asks for ``/api/workflow_templates/<pack>/<name>.jpg`` (its media type for pack templates)."""
    from PIL import Image

    pack = next(k for k, names in server.get("/workflow_templates").items() if "both_memories" in names)
    for name in NAMES:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{pack}/{name}.jpg", timeout=30) as r:
            body = r.read()
            assert r.headers["Content-Type"] == "image/jpeg"
        assert body == (thumbnails.FOLDER / f"{name}.jpg").read_bytes()
        assert Image.open(io.BytesIO(body)).size == thumbnails.SIZE


def recorded_definitions() -> dict:
    return json.loads(build.DEFINITIONS.read_text())


@pytest.mark.parametrize("name", NAMES)
def test_ui_file_is_generated_from_the_same_graph(name):
    """For the node definitions the UI files are written for (``workflows/definitions/node_definitions.json``)."""
    defs = recorded_definitions()["nodes"]
    assert shipped("ui", name) == json.loads(json.dumps(ui_format.to_ui(build.WORKFLOWS[name](), defs,
                                                                        build.NOTES[name])))


def widget_layout(info: dict) -> dict:
    """What a UI file depends on in a node definition: its inputs' keys, types, defaults and seed controls in
    widget order, and its outputs."""
    inputs = [(key, kind, opts.get("default"), bool(opts.get("control_after_generate")), bool(opts.get("forceInput")))
              for key, kind, opts in input_specs(info)]
    return {"inputs": inputs, "outputs": list(zip(info["output"], info["output_name"], strict=True))}


def test_recorded_node_definitions_are_this_hosts(server):
    """The definitions the UI files are written for are this host's, for every node on the host they came from
    (the UI files are regenerated when a node changes: ``python workflows/build.py``), and for the pack's own nodes
    on every host (the stock nodes of newer hosts differ; their frontends load the files: ``test_browser.py``)."""
    recorded = recorded_definitions()
    live, version = server.get("/object_info"), server.get("/system_stats")["system"]["comfyui_version"]
    names = [c for c in recorded["nodes"] if version == recorded["comfyui"] or c.startswith("MemLearner")]
    assert any(c.startswith("MemLearner") for c in names)
    stale = [c for c in names if widget_layout(recorded["nodes"][c]) != widget_layout(live[c])]
    assert not stale, f"node definitions changed since the UI files were written: {stale}; run python workflows/build.py"


def test_a_dynamic_combo_is_its_value_then_its_chosen_options_widgets():
    """ComfyUI 0.30+ SaveVideo: ``format`` chooses which inputs follow it (``format.codec``); a hidden legacy
    ``codec`` keeps its widget. Widget values as the 0.33 frontend (1.49.6) saves a new SaveVideo node."""
    codec = ["COMFY_DYNAMICCOMBO_V3", {"options": [{"key": "auto", "inputs": {"required": {}}},
                                                   {"key": "h264", "inputs": {"required": {"crf": ["FLOAT", {"default": 23.0}]}}}]}]
    info = {"input": {"required": {"video": ["VIDEO", {}], "filename_prefix": ["STRING", {"default": "video/ComfyUI"}],
                                   "format": ["COMFY_DYNAMICCOMBO_V3", {"options": [
                                       {"key": "auto", "inputs": {"required": {"codec": codec}}},
                                       {"key": "webm", "inputs": {"required": {}}}]}]},
                      "optional": {"codec": [codec[0], {**codec[1], "hidden": True}]}},
            "input_order": {"required": ["video", "filename_prefix", "format"], "optional": ["codec"]},
            "output": ["VIDEO"], "output_name": ["video"]}
    graph = {"v": {"class_type": "LoadVideo", "inputs": {}},
             "save": {"class_type": "SaveVideo", "inputs": {"video": ["v", 0], "filename_prefix": "x", "format": "auto",
                                                            "codec": "auto"}}}
    defs = {"SaveVideo": info, "LoadVideo": {"input": {}, "output": ["VIDEO"], "output_name": ["VIDEO"]}}
    ui = ui_format.to_ui(graph, defs)
    assert ui["nodes"][1]["widgets_values"] == ["x", "auto", "auto", "auto"]  # format, format.codec, codec
    assert [k for k, *_ in input_specs(info, lambda key, default: {"format": "auto", "format.codec": "h264"}.get(key, default))] \
        == ["video", "filename_prefix", "format", "format.codec", "format.codec.crf", "codec"]
    assert to_api(ui, defs)["2"]["inputs"] == {"video": ["1", 0], "filename_prefix": "x", "format": "auto",
                                               "format.codec": "auto", "codec": "auto"}


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("revisit_world", "wan22_a14b_rollout",
                                                                  "wan22_5b_query_memory", "doom_return")])
def test_workflow_uses_the_real_wan21_files(name):
    values = json.dumps(shipped("api", name))
    for f in ("wan2.1_t2v_1.3B_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors"):
        assert f in values


def test_a14b_workflow_uses_the_real_wan22_experts_as_comfyuis_template_does():
    """The high-noise expert's guider samples steps 0-9 of 20, the low-noise expert's the rest."""
    graph = shipped("api", "wan22_a14b_rollout")
    values = json.dumps(graph)
    for f in ("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
              "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors"):
        assert f in values
    rollout = graph["rollout"]["inputs"]
    assert graph[rollout["guider"][0]]["inputs"]["model"] == ["shift", 0]
    assert graph[rollout["guider_low"][0]]["inputs"]["model"] == ["shift_low", 0]
    assert graph["shift"]["inputs"]["model"] == ["unet", 0] and graph["shift_low"]["inputs"]["model"] == ["unet_low", 0]
    assert graph["unet"]["inputs"]["unet_name"].startswith("wan2.2_t2v_high_noise")
    assert (rollout["switch_step"], graph["sigmas"]["inputs"]["steps"]) == (10, 20)


def test_the_tiny_a14b_workflow_runs_two_different_tiny_experts(wan_low_expert_file):
    graph = build.wan22_a14b_rollout(tiny=True)
    assert graph["unet_low"]["inputs"]["unet_name"] == wan_low_expert_file != graph["unet"]["inputs"]["unet_name"]


def test_5b_workflow_uses_the_real_wan22_files_as_comfyuis_template_does():
    """Wan2.2 TI2V-5B, its text encoder and Wan2.2 VAE through ComfyUI's own loaders, shift 8, the chunk latent
    from Wan22ImageToVideoLatent on that VAE."""
    graph = shipped("api", "wan22_5b_query_memory")
    assert graph["unet"] == build.node("UNETLoader", unet_name="wan2.2_ti2v_5B_fp16.safetensors", weight_dtype="default")
    assert graph["clip"]["inputs"] == {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                       "device": "default"}
    assert graph["vae"] == build.node("VAELoader", vae_name="wan2.2_vae.safetensors")
    assert graph["shift"]["inputs"] == {"model": ["unet", 0], "shift": 8.0}
    assert graph["guider"]["inputs"]["model"] == graph["sigmas"]["inputs"]["model"] == ["shift", 0]
    assert graph["chunk"]["class_type"] == "Wan22ImageToVideoLatent" and graph["chunk"]["inputs"]["vae"] == ["vae", 0]
    assert graph["rollout"]["inputs"]["chunk_latent"] == ["chunk", 0]


def test_the_tiny_5b_workflow_runs_the_tiny_wan22_5b_and_its_vae():
    graph = build.wan22_5b_query_memory(tiny=True)
    assert graph["unet"]["inputs"]["unet_name"] == tiny_models.WAN22_5B_FILE
    assert graph["vae"]["class_type"] == "MemLearnerTestTinyWan22VAE"  # Load VAE builds the Wan2.2 VAE full width
    assert {n["class_type"] for n in graph.values()} - {"MemLearnerTestTinyWan22VAE", "MemLearnerTestRandomConditioning"} \
        <= {n["class_type"] for n in build.wan22_5b_query_memory().values()}


def test_revisit_workflow_uses_the_shipped_toy_model():
    from memlearner_host.tiny_models import TOY_MODEL

    values = json.dumps(shipped("api", "revisit_world"))
    for folder, key in (("diffusion_models", "unet"), ("memlearner", "query_weights")):
        assert build.TOY[key] in values and (TOY_MODEL / folder / build.TOY[key]).is_file()


def test_doom_workflow_uses_the_shipped_model_vae_and_held_out_clip():
    from memlearner_host.tiny_models import DOOM_MODEL

    graph = shipped("api", "doom_return")
    values = json.dumps(graph)
    for folder, key in (("diffusion_models", "unet"), ("memlearner", "query_weights"), ("vae", "vae")):
        assert build.DOOM[key] in values and (DOOM_MODEL / folder / build.DOOM[key]).is_file()
    assert graph["video"]["inputs"]["file"] == build.DOOM["video"] and "MAP21" in build.DOOM["video"]
    assert (build.DOOM_CLIP / build.DOOM["video"]).is_file()
    assert graph["rollout_all"]["inputs"]["camera_path"] == ["camera", 0]
    assert graph["camera"]["inputs"]["trajectory"] == build.doom_trajectory()


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_headless_on_the_tiny_fixtures(server, wan_low_expert_file, name):
    tiny_models.write_video(server.output_dir.parent / "input" / build.TINY["reference"], 0, frames=6, size=64)
    shutil.copy(build.DOOM_CLIP / build.DOOM["video"], server.output_dir.parent / "input" / build.DOOM["video"])
    entry = server.run_prompt(build.WORKFLOWS[name](tiny=True))
    videos = [v for out in entry["outputs"].values() for v in out.get("images", [])]
    assert videos, "the workflow saved no video"
    from comfy_api.latest import InputImpl

    for v in videos:
        frames = InputImpl.VideoFromFile(str(server.output_dir / v["subfolder"] / v["filename"])).get_components()
        if name == "doom_return":  # the held-out video | generated, 128x96
            assert frames.images.shape == (61, 96, 2 * 128, 3)
            continue
        width = 64 + 4 + 64 if name == "revisit_world" else 64  # ground truth | generated
        assert frames.images.shape[0] > 1 and frames.images.shape[1:] == (64, width, 3)


@pytest.mark.parametrize("policy", ["all", "recent", "fov", "framepack"])
def test_rollout_graph_runs_every_policy_through_the_server(server, policy):
    graph = build.memory_rollout(tiny=True)
    graph["rollout"]["inputs"]["policy"] = policy
    entry = server.run_prompt(graph)
    assert entry["outputs"]["save_rollout"]["images"]
