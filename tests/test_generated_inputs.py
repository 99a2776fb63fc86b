"""Generated hostile inputs (hypothesis) thrown at the nodes in-process: every input either gives a clear error of
the ValueError family or a result whose numbers are all finite, and nothing is read or written outside ComfyUI's
folders. Examples are derandomized (the same every run) and kept few: each one runs real ComfyUI nodes."""

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from safetensors.torch import save_file

from memlearner_core.checkpoint_io import load_memory_encoder, read_safetensors, save_memory_encoder
from memlearner_core.trajectory import parse_trajectory, preset_names

import host
import tiny_models

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "memlearner-hypothesis")  # nothing written in the checkout
SECRET = "the caption of a video outside the input folder"
FEW = settings(max_examples=25, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
strengths = st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 0.0, 1.0, 2.5]) | floats


@pytest.fixture
def folders(comfy_folders):
    """ComfyUI's folders in ``tmp_path``; a captioned bank inside the input folder, one outside, a link out."""
    d = comfy_folders
    for folder, caption in ((d["input"] / "bank", "a cat"), (d["outside"], SECRET)):
        folder.mkdir(exist_ok=True)
        tiny_models.write_video(folder / "clip.mp4", 0)
        (folder / "clip.txt").write_text(caption)
    os.symlink(d["outside"], d["input"] / "link")
    return d


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def tiny_clip(comfy):
    return comfy.run("MemLearnerTestTinyTextEncoder", seed=0)[0]


def finite_memory(memory) -> bool:
    """Finite tokens and weights (padding rows weigh ``-inf``: never attended); strength 0 is no memory."""
    if memory.strength == 0:
        return True
    tokens = memory.tokens()
    weights_ok = not (tokens.log_weight.isnan() | tokens.log_weight.isposinf()).any()
    return bool(torch.isfinite(tokens.tokens).all() and weights_ok)


path_parts = st.sampled_from(["bank", "..", ".", "link", "outside", "input", "\0", "clip.mp4"])
prefixes = st.sampled_from(["", "", "", "/", "~/", "INPUT/", "OUTSIDE/", "OUTSIDE/../input/"])


@settings(FEW, max_examples=80)
@example(prefix="", parts=["link"], strength=1.0).via("a link out of the input folder")
@example(prefix="", parts=["..", "outside"], strength=1.0).via("'..' out of the input folder")
@example(prefix="", parts=["bank"], strength=math.nan).via("NaN strength")
@given(prefix=prefixes, parts=st.lists(path_parts, min_size=1, max_size=3), strength=strengths)
def test_generated_bank_folders_and_strengths_stay_inside_and_finite(comfy, encoder, tiny_clip, wan_vae, folders,
                                                                    prefix, parts, strength):
    outside = snapshot(folders["outside"])
    prefix = prefix.replace("INPUT", str(folders["input"])).replace("OUTSIDE", str(folders["outside"]))
    positive = comfy.run("CLIPTextEncode", clip=tiny_clip, text="a cat")[0]
    try:
        memory, chosen = comfy.run("MemLearnerReferenceMemoryBank", memory_encoder=encoder, clip=tiny_clip,
                                   positive=positive, vae=wan_vae, folder=prefix + "/".join(parts),
                                   strength=strength)
    except ValueError as e:
        assert str(folders["outside"]) not in str(e) and SECRET not in str(e)
    else:
        assert SECRET not in chosen and math.isfinite(strength) and finite_memory(memory)
    assert snapshot(folders["outside"]) == outside


latent_shapes = st.tuples(st.integers(1, 2), st.sampled_from([4, 16]), st.integers(1, 4), st.integers(1, 12),
                          st.integers(1, 12))


@FEW
@given(shape=latent_shapes, fill=st.one_of(st.none(), floats), strength=strengths, frames=st.integers(0, 6))
def test_generated_reference_latents_give_a_clear_error_or_finite_memory(comfy, encoder, shape, fill, strength,
                                                                         frames):
    samples = torch.randn(shape) if fill is None else torch.full(shape, fill)
    try:
        memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent={"samples": samples},
                           strength=strength, frames_per_video=frames)[0]
    except ValueError:
        return
    assert math.isfinite(strength) and finite_memory(memory)


@FEW
@given(shape=latent_shapes, fill=st.one_of(st.none(), floats), query_layers=st.integers(1, 6))
def test_generated_contexts_give_a_clear_error_or_a_patched_model(comfy, wan_model, shape, fill, query_layers):
    samples = torch.randn(shape) if fill is None else torch.full(shape, fill)
    try:
        model = comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context={"samples": samples},
                          query_layers=query_layers)[0]
    except ValueError:
        return
    assert shape[0] == 1 and shape[1] == 16 and torch.isfinite(samples).all() and model is not wan_model


json_values = st.recursive(
    st.none() | st.booleans() | floats.map(float) | st.integers(-10, 10) | st.text(max_size=8)
    | st.sampled_from(preset_names()),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(
        st.sampled_from(["preset", "degrees", "radius", "distance", "center", "position", "yaw", "pitch", "x"]),
        inner, max_size=4)),
    max_leaves=20)


preset_objects = st.fixed_dictionaries({"preset": st.sampled_from(preset_names())},
                                       optional={"degrees": floats.map(float), "radius": st.integers(-1, 5)})


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(camera=st.sampled_from(["custom JSON", *preset_names()]),
       trajectory=st.one_of(json_values, preset_objects).map(lambda v: json.dumps(v, allow_nan=True))
       | st.text(max_size=20),
       n_frames=st.integers(1, 12))
def test_generated_trajectories_give_a_clear_error_or_finite_poses(comfy, camera, trajectory, n_frames):
    trajectory_text = host.pack("nodes.camera_path_node").trajectory_text
    try:
        text = trajectory_text(camera, trajectory)
        poses = parse_trajectory(text, n_frames)
    except ValueError:
        return
    assert poses.ndim == 3 and poses.shape[0] >= n_frames and torch.isfinite(poses).all()
    if camera in preset_names():
        assert json.loads(text)["preset"] == camera  # the node's camera is the one used


metadata_values = st.one_of(st.integers(-3, 300).map(str), st.sampled_from(["true", "null", "[]", "{", '"8"', "1e9"]),
                            st.lists(st.integers(-2, 40), max_size=4).map(json.dumps), st.text(max_size=6))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(key=st.sampled_from(["tokens_per_video", "heads", "latent_shape"]), value=metadata_values)
def test_generated_encoder_metadata_gives_a_clear_error_or_a_working_encoder(tmp_path_factory, key, value):
    path = tmp_path_factory.mktemp("enc") / "enc.safetensors"
    save_memory_encoder(tiny_models.tiny_encoder(), path)
    sd, meta = read_safetensors(path)
    save_file(sd, str(path), metadata={**meta, f"memlearner.encoder.{key}": value})
    try:
        enc = load_memory_encoder(path)
    except ValueError:
        return
    cfg = enc.cfg
    assert cfg.tokens_per_video >= 1 and cfg.heads >= 1 and cfg.width % cfg.heads == 0
    assert len(cfg.latent_shape) == 3 and min(cfg.latent_shape) >= 1
