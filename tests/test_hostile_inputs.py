"""Hostile inputs (issue 16): paths leading out of ComfyUI's folders, damaged files, non-finite values, shapes the
nodes do not support. Each is one clear error of the ValueError family naming the input, or, where the input is
fine, a result; nothing is read or written outside ComfyUI's folders and nothing finished is lost."""

import json
import logging
import math
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from memlearner_core.checkpoint_io import (
    CheckpointError,
    load_memory_encoder,
    load_query_weights,
    read_safetensors,
    save_memory_encoder,
    save_query_weights,
)
from memlearner_core.memory_bank import CACHE_DIR, MemoryBankError, confined_folder, read_captioned_folder
from memlearner_core.trajectory import TrajectoryError, parse_trajectory

import host
import tiny_models

SECRET = "the caption of a video outside the input folder"
T = 2  # latent frames per rollout chunk (5 video frames)


# --- a ComfyUI whose input, user and output folders are temporary ---------------------------------------------

@pytest.fixture
def folders(comfy_folders):
    """ComfyUI's input, user and output folders in ``tmp_path``, and a folder ``outside`` them with a captioned
    video whose caption must never come back."""
    d = comfy_folders
    tiny_models.write_video(d["outside"] / "secret.mp4", 7)
    (d["outside"] / "secret.txt").write_text(SECRET)
    (d["outside"] / "captions.json").write_text(json.dumps({"secret.mp4": SECRET}))
    return d


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def tiny_clip(comfy):
    return comfy.run("MemLearnerTestTinyTextEncoder", seed=0)[0]


def rank(comfy, encoder, clip, vae, folder: str, prompt="a cat sleeps on a sofa", top_k=1, **kw):
    positive = comfy.run("CLIPTextEncode", clip=clip, text=prompt)[0]
    return comfy.run("MemLearnerReferenceMemoryBank", memory_encoder=encoder, clip=clip, positive=positive, vae=vae,
                     folder=folder, top_k=top_k, **kw)


def make_bank(folder: Path, captions: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    for i, name in enumerate(captions):
        tiny_models.write_video(folder / name, i)
    (folder / "captions.json").write_text(json.dumps(captions))
    return folder


# --- Security: the bank folder is confined to ComfyUI's input folder -------------------------------------------

def test_bank_folders_leading_outside_the_input_folder_are_refused_alike_whether_they_exist_or_not(
        comfy, encoder, tiny_clip, wan_vae, folders):
    make_bank(folders["input"] / "ok", {"cat.mp4": "a cat"})
    os.symlink(folders["outside"], folders["input"] / "link_out")
    os.symlink(folders["outside"] / "missing", folders["input"] / "link_missing")
    os.symlink(folders["outside"], folders["input"] / "ok" / "nested_link")
    outside = str(folders["outside"])
    hostile = [outside, outside + "/missing", "../outside", "../missing", "ok/../../outside", "ok/../../missing",
               "..", "/", "~", "~/x", "link_out", "link_missing", "ok/nested_link", "ok/nested_link/../outside",
               "ok\0", ""]
    before = files_under(folders["outside"])
    messages = set()
    for text in hostile:
        with pytest.raises(MemoryBankError) as e:
            rank(comfy, encoder, tiny_clip, wan_vae, text)
        messages.add(str(e.value))
    assert len(messages) == 1, messages  # the same words for a path that exists and one that does not
    (message,) = messages
    assert "input folder" in message and "outside" not in message.replace("outside it", "")
    assert str(folders["outside"].parent) not in message
    assert files_under(folders["outside"]) == before  # no cache or anything else written there


def test_confined_folder_keeps_paths_that_stay_inside_the_input_folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    os.symlink(tmp_path / "a" / "b", tmp_path / "inner_link")
    assert confined_folder("a/b", tmp_path) == tmp_path / "a" / "b"
    assert confined_folder(" a/../a/b ", tmp_path) == tmp_path / "a" / "../a/b"
    assert confined_folder("inner_link", tmp_path) == tmp_path / "inner_link"


def test_bank_files_linking_outside_the_input_folder_are_never_read(comfy, encoder, tiny_clip, wan_vae, folders):
    bank = make_bank(folders["input"] / "bank", {"cat.mp4": "a cat sleeps on a sofa"})
    os.symlink(folders["outside"] / "secret.mp4", bank / "secret.mp4")  # a linked video with a local caption
    captions = json.loads((bank / "captions.json").read_text())
    (bank / "captions.json").write_text(json.dumps({**captions, "secret.mp4": SECRET}))
    tiny_models.write_video(bank / "dog.mp4", 3)
    os.symlink(folders["outside"] / "secret.txt", bank / "dog.txt")  # a local video with a linked caption
    entries = read_captioned_folder(bank, folders["input"])
    assert [e.path.name for e in entries] == ["cat.mp4"]
    _, chosen = rank(comfy, encoder, tiny_clip, wan_vae, "bank", prompt=SECRET, top_k=5)
    assert SECRET not in chosen and "secret" not in chosen and "cat.mp4" in chosen


def test_a_linked_captions_file_outside_the_input_folder_is_never_read(folders):
    bank = folders["input"] / "bank"
    bank.mkdir()
    (bank / "secret.mp4").write_bytes(b"")
    os.symlink(folders["outside"] / "captions.json", bank / "captions.json")
    with pytest.raises(MemoryBankError, match="no captioned videos"):
        read_captioned_folder(bank, folders["input"])


# --- Links and FIFOs swapped in after the checks: what is opened is what is checked ------------------------------

def swap_video_for_outside_link(folders, video):
    video.unlink()
    os.symlink(folders["outside"] / "secret.mp4", video)


def swap_video_for_fifo(folders, video):
    video.unlink()
    os.mkfifo(video)


def swap_video_for_outside_fifo(folders, video):
    os.mkfifo(folders["outside"] / "pipe")
    video.unlink()
    os.symlink(folders["outside"] / "pipe", video)


def swap_video_for_device(folders, video):
    video.unlink()
    os.symlink("/dev/zero", video)


def swap_bank_folder_for_outside_link(folders, video):
    bank = video.parent
    bank.rename(bank.with_name("moved"))
    tiny_models.write_video(folders["outside"] / video.name, 9)
    os.symlink(folders["outside"], bank)


@pytest.mark.parametrize("swap, message", [
    (swap_video_for_outside_link, "leads outside its folder"),
    (swap_video_for_fifo, "not a regular file"),
    (swap_video_for_outside_fifo, "not a regular file"),
    (swap_video_for_device, "not a regular file"),
    (swap_bank_folder_for_outside_link, "leads outside its folder"),
])
def test_a_bank_video_swapped_after_the_folder_check_is_refused_without_reading_it(
        comfy, encoder, tiny_clip, wan_vae, folders, monkeypatch, swap, message):
    """The swap happens between listing the bank (links checked) and opening the chosen video."""
    bank = make_bank(folders["input"] / "bank", {"cat.mp4": "a cat sleeps on a sofa"})
    node = host.pack("nodes.memory_bank_node")
    listed = node.read_captioned_folder

    def list_then_swap(folder, root):
        entries = listed(folder, root)
        swap(folders, bank / "cat.mp4")
        return entries

    monkeypatch.setattr(node, "read_captioned_folder", list_then_swap)
    with pytest.raises(MemoryBankError, match=f"memory bank video cat.mp4 .*{message}") as e:
        rank(comfy, encoder, tiny_clip, wan_vae, "bank")
    assert str(folders["outside"]) not in str(e.value) and "\n" not in str(e.value)
    assert cache_files(folders) == []  # nothing encoded, nothing cached


def test_a_bank_video_linked_to_a_file_inside_the_input_folder_is_read(comfy, encoder, tiny_clip, wan_vae, folders):
    bank = make_bank(folders["input"] / "bank", {"cat.mp4": "a cat sleeps on a sofa"})
    tiny_models.write_video(folders["input"] / "real.mp4", 0)
    (bank / "cat.mp4").unlink()
    os.symlink(folders["input"] / "real.mp4", bank / "cat.mp4")
    memory, chosen = rank(comfy, encoder, tiny_clip, wan_vae, "bank")
    assert "cat.mp4" in chosen and memory.latents.shape[1] == 1


# --- Nothing lost: the bank's latent cache ----------------------------------------------------------------------

def cache_files(folders) -> list[Path]:
    return sorted((folders["user"] / "__memlearner" / CACHE_DIR).glob("*"))


def test_bank_cache_is_written_only_in_comfyuis_user_folder_and_atomically(
        comfy, encoder, tiny_clip, wan_vae, folders):
    make_bank(folders["input"] / "bank", {"cat.mp4": "a cat sleeps on a sofa", "car.mp4": "a red car"})
    input_before = files_under(folders["input"])
    rank(comfy, encoder, tiny_clip, wan_vae, "bank", top_k=2)
    assert files_under(folders["input"]) == input_before  # nothing written next to the videos
    cached = cache_files(folders)
    assert len(cached) == 2 and all(p.suffix == ".safetensors" and not p.name.startswith(".tmp") for p in cached)
    assert files_under(folders["output"]) == set()


@pytest.mark.parametrize("damage", ["truncated", "wrong_shape", "nan", "no_latent_key"])
def test_a_bad_bank_cache_entry_is_rebuilt_with_a_warning_naming_it(
        comfy, encoder, tiny_clip, wan_vae, folders, caplog, damage):
    make_bank(folders["input"] / "bank", {"cat.mp4": "a cat sleeps on a sofa"})
    good, _ = rank(comfy, encoder, tiny_clip, wan_vae, "bank")
    (entry,) = cache_files(folders)
    latent = load_file(str(entry))["latent"].clone()  # not backed by the file about to be damaged
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:100])
    elif damage == "wrong_shape":
        save_file({"latent": torch.zeros(16, 1, 2, 2)}, str(entry))
    elif damage == "nan":
        save_file({"latent": torch.full_like(latent, math.nan)}, str(entry))
    else:
        save_file({"other": latent}, str(entry))
    with caplog.at_level(logging.WARNING, logger="memlearner"):
        again, _ = rank(comfy, encoder, tiny_clip, wan_vae, "bank")
    assert entry.name in caplog.text
    torch.testing.assert_close(again.latents, good.latents)
    torch.testing.assert_close(load_file(str(entry))["latent"], latent)  # the entry is whole again


def test_a_bank_cache_entry_linked_outside_the_user_folder_is_never_read(
        comfy, encoder, tiny_clip, wan_vae, folders, caplog):
    make_bank(folders["input"] / "bank", {"cat.mp4": "a cat sleeps on a sofa"})
    good, _ = rank(comfy, encoder, tiny_clip, wan_vae, "bank")
    (entry,) = cache_files(folders)
    planted = folders["outside"] / "planted.safetensors"
    save_file({"latent": torch.full_like(load_file(str(entry))["latent"], 0.5)}, str(planted))
    entry.unlink()
    os.symlink(planted, entry)
    with caplog.at_level(logging.WARNING, logger="memlearner"):
        again, _ = rank(comfy, encoder, tiny_clip, wan_vae, "bank")
    assert entry.name in caplog.text and "leads outside" in caplog.text
    torch.testing.assert_close(again.latents, good.latents)
    assert not entry.is_symlink() and load_file(str(planted))["latent"].eq(0.5).all()  # replaced, not written through


# --- Wrong results reported as success --------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [math.nan, math.inf, -math.inf, -0.5])
def test_a_non_finite_or_negative_strength_is_refused(comfy, encoder, tiny_clip, wan_vae, folders, strength):
    latent = {"samples": torch.randn(1, 16, 3, 8, 8)}
    with pytest.raises(ValueError, match=r"strength (must be a finite number|takes a finite number|is -0\.5, outside 0\.0\.\.4\.0)"):
        comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent=latent, strength=strength)
    make_bank(folders["input"] / "bank", {"cat.mp4": "a cat"})
    with pytest.raises(ValueError, match=r"strength (must be a finite number|takes a finite number|is -0\.5, outside 0\.0\.\.4\.0)"):
        rank(comfy, encoder, tiny_clip, wan_vae, "bank", strength=strength)


def test_non_finite_reference_latents_or_images_are_refused(comfy, encoder, wan_vae):
    with pytest.raises(ValueError, match="latent has NaN"):
        comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder,
                  latent={"samples": torch.full((1, 16, 3, 8, 8), math.nan)})
    images = torch.rand(5, 32, 32, 3)
    images[2, 3, 4, 0] = math.inf
    with pytest.raises(ValueError, match="images have NaN"):
        comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, images=images, vae=wan_vae)


@pytest.mark.parametrize("inputs", [
    {"images": torch.rand(1, 32, 32, 3)},  # one frame is a video (a still)
    {"latent": {"samples": torch.randn(1, 16, 1, 8, 8)}},
    {"images": torch.rand(1, 8, 8, 4)},  # RGBA: the alpha channel is dropped
    {"latent": {"samples": torch.randn(2, 16, 1, 3, 5)}},
], ids=["one_frame_image", "one_frame_latent", "rgba_pixel_image", "two_tiny_latents"])
def test_the_smallest_valid_reference_videos_are_encoded(comfy, encoder, wan_vae, inputs):
    memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, vae=wan_vae, **inputs)[0]
    assert memory.latents.shape[2:] == (16, *encoder.model.cfg.latent_shape)
    assert torch.isfinite(memory.tokens().tokens).all()


@pytest.mark.parametrize("inputs, name", [
    ({"images": torch.rand(0, 32, 32, 3)}, "images"), ({"images": torch.rand(5, 0, 32, 3)}, "images"),
    ({"images": torch.rand(5, 32, 0, 3)}, "images"), ({"images": torch.rand(5, 32, 32)}, "images"),
    ({"images": torch.rand(5, 32, 32, 2)}, "images"),
    ({"latent": {"samples": torch.randn(1, 16, 0, 8, 8)}}, "latent"),
    ({"latent": {"samples": torch.randn(1, 16, 2, 0, 8)}}, "latent"),
    ({"latent": {"samples": torch.randn(0, 16, 2, 8, 8)}}, "latent"),
    ({"latent": {"samples": torch.randn(1, 16, 2, 8)}}, "latent"),
])
def test_a_reference_video_with_an_empty_dimension_is_one_line_naming_the_input(comfy, encoder, wan_vae, inputs,
                                                                                name):
    with pytest.raises(ValueError, match=f"^Encode Reference Video: {name} must be .* got \\[[0-9, ]+\\]$"):
        comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, vae=wan_vae, **inputs)


@pytest.mark.parametrize("value", [3e38, -3e38, 1e20, 1e-30])
def test_revisit_score_reports_a_finite_psnr_for_any_finite_latent(comfy, value):
    case = comfy.run("MemLearnerRevisitWorld", seed=1, path="pan_and_return")[0]
    samples = torch.full((1, 16, *case.truth.shape[1:]), value)
    report = json.loads(comfy.run("MemLearnerRevisitScore", world=case, latent={"samples": samples})[0])
    assert all(math.isfinite(report[k]) and -300 <= report[k] <= 40 for k in ("revisit_psnr", "new_psnr"))


def encoder_file(path: Path, edit=None, meta_edit=None) -> Path:
    """The tiny encoder saved with its metadata, its tensors changed by ``edit(sd)``, its metadata by
    ``meta_edit(meta)``."""
    save_memory_encoder(tiny_models.tiny_encoder(), path)
    sd, meta = read_safetensors(path)
    if edit:
        edit(sd)
    if meta_edit:
        meta_edit(meta)
    save_file(sd, str(path), metadata=meta)
    return path


def set_tensor(key, fn):
    def edit(sd):
        sd[key] = fn(sd[key])

    return edit


@pytest.mark.parametrize("edit, message", [
    (set_tensor("self_attention.q.weight", lambda t: t.index_fill(0, torch.tensor([0]), math.nan)), "NaN"),
    (set_tensor("high_pass_module.feature_proj.bias", lambda t: t.index_fill(0, torch.tensor([1]), math.inf)), "NaN"),
    (set_tensor("self_attention.o.weight", lambda t: t.to(torch.int32)), "int32, not floating point"),
    (set_tensor("self_attention.norm_q.weight", lambda t: t > 0), "bool, not floating point"),
])
def test_non_finite_or_non_float_encoder_weights_are_refused(tmp_path, edit, message):
    path = encoder_file(tmp_path / "enc.safetensors", edit)
    with pytest.raises(CheckpointError, match=f"enc.safetensors: tensor .* {message}"):
        load_memory_encoder(path)


def test_an_integer_batchnorm_counter_is_still_accepted(tmp_path):
    key = "high_pass_module.conv_block1.fft_filter.norm.num_batches_tracked"
    path = encoder_file(tmp_path / "enc.safetensors", lambda sd: sd.__setitem__(key, torch.tensor(3)))
    assert load_memory_encoder(path).cfg.width == 256


def query_file(path: Path, weight=None, bias=None, **meta) -> Path:
    save_query_weights(path, {"proj.weight": torch.randn(256, 12) if weight is None else weight,
                              "proj.bias": torch.zeros(256) if bias is None else bias}, 2)
    if meta:
        sd, old = read_safetensors(path)
        save_file(sd, str(path), metadata={**old, **{f"memlearner.{k}": v for k, v in meta.items()}})
    return path


@pytest.mark.parametrize("weight, bias, message", [
    (torch.full((256, 12), math.nan), None, "camera.proj.weight has NaN"),
    (None, torch.full((256,), -math.inf), "camera.proj.bias has NaN"),
    (torch.ones(256, 12, dtype=torch.int64), None, "int64, not floating point"),
    (None, torch.zeros(256, dtype=torch.bool), "bool, not floating point"),
    (torch.ones(256, 11), None, r"must be \[dim, 12\]"),
])
def test_non_finite_non_float_or_misshaped_query_weights_are_refused(tmp_path, weight, bias, message):
    with pytest.raises(CheckpointError, match=f"q.safetensors: .*{message}"):
        load_query_weights(query_file(tmp_path / "q.safetensors", weight, bias))


@pytest.mark.parametrize("meta, message", [
    ({"version": "2", "view_rope_fov": "45.0"}, "view_rope_fov needs query-weights version 3, the file says '2'"),
    ({"version": "3"}, "view_rope_fov must be degrees in \\(0, 360\\], got None"),
    ({"version": "3", "view_rope_fov": "nan"}, "view_rope_fov must be degrees in .*got 'nan'"),
    ({"version": "3", "view_rope_fov": "0"}, "view_rope_fov must be degrees in .*got '0'"),
    ({"version": "3", "view_rope_fov": "720"}, "view_rope_fov must be degrees in .*got '720'"),
])
def test_a_wrong_or_missing_view_rope_field_of_view_is_refused(tmp_path, meta, message):
    with pytest.raises(CheckpointError, match=f"q.safetensors: metadata memlearner.{message}"):
        load_query_weights(query_file(tmp_path / "q.safetensors", **meta))


def test_query_weights_of_a_model_family_this_pack_does_not_know_are_refused(tmp_path):
    path = query_file_with(tmp_path / "q.safetensors", "memlearner.model_family", "wan3.0")
    with pytest.raises(CheckpointError, match="q.safetensors: metadata memlearner.model_family 'wan3.0' is not a "
                                              "model family this pack knows \\(wan2.1, wan2.2-ti2v-5b\\)"):
        load_query_weights(path)


# --- Errors of bounded size: ComfyUI stores a node's message and sends it to every client -------------------------

HUGE = "x" * 10_000_000
HUGE_JSON = json.dumps(list(range(1_000_000)))
QUERY_KEYS = ["format", "version", "query_layers", "query_pool", "model_family"]
ENCODER_KEYS = ["latent_shape", "tokens_per_video", "heads"]


def query_file_with(path: Path, key: str, value: str) -> Path:
    save_query_weights(path, {"proj.weight": torch.randn(256, 12), "proj.bias": torch.zeros(256)}, 2)
    sd, meta = read_safetensors(path)
    save_file(sd, str(path), metadata={**meta, key: value})
    return path


def extra_tensors(sd):
    sd.update({f"extra.{'y' * 200}.{i}": torch.zeros(1) for i in range(50_000)})


@pytest.mark.parametrize("load, make", [
    *[(load_query_weights, lambda p, k=k, v=v: query_file_with(p, f"memlearner.{k}", v))
      for k in QUERY_KEYS for v in (HUGE, HUGE_JSON)],
    *[(load_memory_encoder, lambda p, k=k, v=v: encoder_file(p, meta_edit=lambda m: m.update(
        {f"memlearner.encoder.{k}": v}))) for k in ENCODER_KEYS for v in (HUGE, HUGE_JSON)],
    (load_query_weights, lambda p: query_file_with(p, "memlearner.format", "memlearner-query-weights")
     and save_file({f"camera.{i}": torch.zeros(1) for i in range(50_000)}, str(p),
                   metadata=read_safetensors(p)[1]) or p),
    (load_memory_encoder, lambda p: encoder_file(p, extra_tensors)),
    (load_memory_encoder, lambda p: encoder_file(p, lambda sd: sd.update(
        {"high_pass_module.conv_block1.conv.weight": torch.zeros([1] * 5), "y" * 10_000_000: torch.zeros(1)}))),
], ids=lambda v: getattr(v, "__name__", "file"))
def test_a_file_that_quotes_megabytes_gives_a_message_of_bounded_size(tmp_path, load, make):
    path = make(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError) as e:
        load(path)
    message = str(e.value)
    assert len(message) <= 1100 and "\n" not in message, (len(message), message[:200])
    assert "w.safetensors" in message or "not a DiT-Mem memory encoder" in message


def test_a_pack_node_never_raises_a_message_of_megabytes(comfy, encoder, monkeypatch):
    nodes = host.pack("nodes.memory_nodes")

    def huge(*args, **kwargs):
        raise ValueError("Encode Reference Video: " + HUGE)

    monkeypatch.setattr(nodes.ReferenceMemory, "from_latents", huge)
    with pytest.raises(ValueError, match="^Encode Reference Video: x+\\.\\.\\. \\(message cut, 10000024 characters\\)$"):
        comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder,
                  latent={"samples": torch.randn(1, 16, 3, 8, 8)})


@pytest.mark.parametrize("samples, message", [
    (torch.randn(2, 16, 2, 8, 8), "a batch of 1"),
    (torch.randn(1, 4, 2, 8, 8), "16 channels"),
    (torch.randn(1, 16, 2, 0, 8), r"\[1, 16, T, H, W\]"),
    (torch.full((1, 16, 2, 8, 8), math.nan), "NaN or infinite"),
])
def test_a_context_that_is_not_one_finite_wan21_latent_is_refused(comfy, wan_model, samples, message):
    with pytest.raises(ValueError, match=message):
        comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context={"samples": samples}, query_layers=2)


def test_a_trajectory_naming_another_preset_than_the_camera_is_refused(comfy):
    trajectory_text = host.pack("nodes.camera_path_node").trajectory_text
    with pytest.raises(ValueError, match="names the preset 'pan_and_return' but camera is 'orbit'"):
        trajectory_text("orbit", '{"preset": "pan_and_return"}')
    same = json.loads(trajectory_text("orbit", '{"preset": "orbit", "degrees": 90}'))
    assert same == {"preset": "orbit", "degrees": 90}
    assert json.loads(trajectory_text("custom JSON", '{"preset": "orbit"}')) == {"preset": "orbit"}


def test_a_rollout_whose_trajectory_names_another_preset_is_refused_before_sampling(comfy, wan_model, text_cond):
    with pytest.raises(ValueError, match="names the preset"):
        rollout(comfy, wan_model, text_cond, camera="walk_and_revisit", trajectory='{"preset": "orbit"}')


@pytest.mark.parametrize("key, value, message", [
    ("tokens_per_video", "0", "tokens_per_video must be a whole number >= 1, got 0"),
    ("tokens_per_video", "true", "tokens_per_video must be a whole number >= 1, got True"),
    ("heads", "0", "heads must be a whole number >= 1, got 0"),
    ("heads", '"8"', "heads must be a whole number >= 1, got '8'"),
    ("heads", "3", "not divisible by 3 heads"),
    ("heads", "{not json", "heads is not valid JSON"),
    ("latent_shape", "[13, 16]", r"latent_shape must be \[T, H, W\]"),
    ("latent_shape", "[13, 16, -1]", "latent_shape must be a whole number >= 1"),
    ("latent_shape", "7", r"latent_shape must be \[T, H, W\]"),
    ("latent_shape", "[1, 2, 3]", r"latent_shape \[1, 2, 3\] is too small"),
    ("latent_shape", "[" * 100000, "latent_shape is not valid JSON"),
])
def test_bad_encoder_metadata_is_one_error_naming_the_file_and_key(tmp_path, key, value, message):
    path = encoder_file(tmp_path / "enc.safetensors",
                        meta_edit=lambda meta: meta.__setitem__(f"memlearner.encoder.{key}", value))
    with pytest.raises(CheckpointError, match=f"enc.safetensors: .*{message}"):
        load_memory_encoder(path)


def test_misshaped_encoder_tensors_are_one_error_naming_the_file(tmp_path):
    path = encoder_file(tmp_path / "enc.safetensors", set_tensor("high_pass_module.feature_proj.weight",
                                                                  lambda t: t.flatten()))
    with pytest.raises(CheckpointError, match="enc.safetensors: high_pass_module.feature_proj.weight has shape"):
        load_memory_encoder(path)


@pytest.mark.parametrize("raw", ["abc", "\u00b2", "0", "-1", "2.0", ""])
def test_query_layers_metadata_that_is_not_a_whole_number_is_refused(tmp_path, raw):
    with pytest.raises(CheckpointError, match="memlearner.query_layers must be a whole number >= 1"):
        load_query_weights(query_file(tmp_path / "q.safetensors", query_layers=raw))


# --- checkpoint_io: safetensors decides, pickles are refused ----------------------------------------------------

def test_a_valid_safetensors_file_whose_header_length_ends_in_0x80_loads(tmp_path):
    path = tmp_path / "enc.safetensors"
    for pad in range(300):
        encoder_file(path, meta_edit=lambda meta: meta.__setitem__("note", "x" * pad))  # noqa: B023
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert load_memory_encoder(path).cfg.width == 256


def test_a_file_safetensors_refuses_is_named_a_pickle_only_by_its_suffix_or_start(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="pickled"):
        read_safetensors(tmp_path / "a.bin")
    (tmp_path / "b.safetensors").write_bytes(b"\x80\x04" + b"\x00" * 30)  # pickle protocol 4 at the start
    with pytest.raises(CheckpointError, match="pickled"):
        read_safetensors(tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"garbage" * 5)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_safetensors(tmp_path / "c.safetensors")


# --- raw errors become one line naming the input ----------------------------------------------------------------

def test_a_non_utf8_caption_file_is_named(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(MemoryBankError, match="a.txt is not UTF-8"):
        read_captioned_folder(tmp_path)
    (tmp_path / "a.txt").unlink()
    (tmp_path / "captions.json").write_bytes(b'{"a.mp4": "caf\xe9"}')
    with pytest.raises(MemoryBankError, match="captions.json is not UTF-8"):
        read_captioned_folder(tmp_path)


def test_deeply_nested_trajectory_json_is_a_clear_error(comfy):
    with pytest.raises(TrajectoryError, match="nested too deeply"):
        parse_trajectory("[" * 100000 + "]" * 100000, 3)
    trajectory_text = host.pack("nodes.camera_path_node").trajectory_text
    with pytest.raises(ValueError, match="nested too deeply"):
        trajectory_text("orbit", '{"a": ' * 100000)


# --- Nothing lost: Memory Rollout ------------------------------------------------------------------------------

def rollout(comfy, model, text_cond, **kw):
    args = dict(model=model, positive=text_cond[0], negative=text_cond[1], seed=7, steps=2, cfg=1.0,
                sampler_name="euler", scheduler="simple", width=64, height=64, chunk_frames=5, chunks=2,
                policy="all", context_frames=3, query_layers=2, camera="walk_and_revisit")
    args.update(kw)
    latent, report = comfy.run("MemLearnerMemoryRollout", **args)
    return latent["samples"], json.loads(report)


def test_chunk_seeds_wrap_into_the_range_comfyuis_noise_takes(comfy):
    chunk_seed = host.pack("nodes.rollout_node").chunk_seed
    assert [chunk_seed(2**64 - 2, k) for k in range(3)] == [2**64 - 2, 2**64 - 1, 0]
    assert chunk_seed(7, 3) == 10


def test_a_rollout_with_the_largest_seed_finishes_every_chunk(comfy, wan_model, text_cond, folders):
    samples, report = rollout(comfy, wan_model, text_cond, seed=2**64 - 1, chunks=3)
    assert samples.shape == (1, 16, 3 * T, 8, 8) and torch.isfinite(samples).all() and len(report) == 3


def failing_in_second_chunk(failure):
    """A model wrapper that lets chunk 0's 2 steps run, then fails with ``failure(output)``."""
    calls = []

    def wrapper(executor, *args, **kwargs):
        calls.append(1)
        out = executor(*args, **kwargs)
        return failure(out) if len(calls) > 2 else out

    return wrapper


def raise_error(out):
    raise RuntimeError("the GPU fell off the bus")


@pytest.mark.parametrize("failure, error", [(raise_error, RuntimeError),
                                            (lambda out: out * math.nan, ValueError)])
def test_a_failure_after_a_finished_chunk_saves_the_finished_chunks(comfy, wan_model, text_cond, folders, failure,
                                                                    error):
    from comfy.patcher_extension import WrappersMP

    whole, _ = rollout(comfy, wan_model, text_cond)
    model = wan_model.clone()
    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test", failing_in_second_chunk(failure))
    with pytest.raises(error):
        rollout(comfy, model, text_cond)
    (saved,) = (folders["output"] / "memlearner").glob("rollout_interrupted*.latent")
    torch.testing.assert_close(load_file(str(saved))["latent_tensor"], whole[:, :, :T])


# --- The trainer: cheap checks first, one line, exit 2, nothing written -----------------------------------------

def train_config(tmp_path, models_dir, **override) -> Path:
    """A query run on the tiny models (``data/`` -> ``run/``); ``override`` replaces or adds TOML lines."""
    settings = {"recipe": '"query"', "data_dir": '"data"', "output_dir": '"run"',
                "model_file": f'"{models_dir / "diffusion_models" / tiny_models.WAN_FILE}"',
                "vae_file": f'"{models_dir / "vae" / tiny_models.VAE_FILE}"', "steps": "1", "clip_frames": "9",
                "width": "64", "height": "64", "query_layers": "2", "predict_latent_frames": "1",
                "mixed_precision": '"fp32"', **override}
    path = tmp_path / "run.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    return path


def bad_data(kind: str, data: Path) -> None:
    if kind == "missing data folder":
        return
    data.mkdir()
    if kind in ("bad poses", "missing model file", "missing vae file"):
        tiny_models.write_video(data / "a.mp4", 0, frames=12, size=64)
        (data / "a.txt").write_text("a walk")
    if kind == "bad poses":
        (data / "a.poses.json").write_text("[[1, 2, 3]]")


@pytest.mark.parametrize("kind, override, message", [
    ("missing data folder", {}, "data_dir .*data: no such folder"),
    ("empty data folder", {}, "has no captioned videos"),
    ("bad poses", {}, r"a\.poses\.json"),
    ("missing model file", {"model_file": '"missing_wan.safetensors"'}, "model_file .*missing_wan.*: no such file"),
    ("missing vae file", {"vae_file": '"missing_vae.safetensors"'}, "vae_file .*missing_vae.*: no such file"),
])
def test_the_trainer_checks_data_and_files_before_loading_a_model(comfy, models_dir, tmp_path, capsys, monkeypatch,
                                                                  kind, override, message):
    from memlearner_train.cli import main

    def no_model_loads(*args, **kwargs):
        raise AssertionError("a model was loaded before the cheap checks")

    monkeypatch.setattr("comfy.sd.load_diffusion_model", no_model_loads)
    bad_data(kind, tmp_path / "data")
    assert main([str(train_config(tmp_path, models_dir, **override))]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("memlearner-train:")]
    assert re.search(message, line) and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_non_utf8_training_config_is_exit_2(tmp_path, capsys):
    from memlearner_train.cli import main

    (tmp_path / "run.toml").write_bytes(b'recipe = "query"\n# caf\xe9\n')
    assert main([str(tmp_path / "run.toml")]) == 2
    assert "not UTF-8" in capsys.readouterr().err
