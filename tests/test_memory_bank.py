"""Reference choice by text (DiT-Mem's memory bank) and fetching an encoder from the Hugging Face Hub."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from memlearner_core.hub import HubError, fetch_safetensors
from memlearner_core.memory_bank import (
    CACHE_DIR,
    MemoryBankError,
    pool_text_embedding,
    rank_by_text,
    read_captioned_folder,
)

import host
import tiny_models

CAPTIONS = {
    "car.mp4": "a red car drives along a coastal road",
    "cat.mp4": "a cat sleeps on a sofa",
    "waves.mp4": "waves crash on rocks at sunset",
    "fountain.mp4": "a stone courtyard with a fountain",
}


@pytest.fixture
def bank(tmp_path, comfy, monkeypatch):
    """A bank folder inside ComfyUI's input folder (here ``tmp_path``); the latent cache in its user folder."""
    monkeypatch.setattr(comfy.folder_paths, "get_input_directory", lambda: str(tmp_path))
    monkeypatch.setattr(comfy.folder_paths, "get_user_directory", lambda: str(tmp_path / "user"))
    folder = tmp_path / "bank"
    folder.mkdir()
    for i, name in enumerate(CAPTIONS):
        tiny_models.write_video(folder / name, i)
    (folder / "captions.json").write_text(json.dumps(CAPTIONS))
    return folder


# --- the folder and the ranking (pure) -------------------------------------------------------------------------

def test_captions_come_from_captions_json_or_a_sidecar_txt(tmp_path):
    for name in ("a.mp4", "b.webm", "c.mp4"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "captions.json").write_text(json.dumps({"a.mp4": "first"}))
    (tmp_path / "b.txt").write_text("second\n")
    entries = read_captioned_folder(tmp_path)
    assert [(e.path.name, e.caption) for e in entries] == [("a.mp4", "first"), ("b.webm", "second")]


def test_a_folder_without_captioned_videos_is_a_clear_error(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    with pytest.raises(MemoryBankError, match="no captioned videos"):
        read_captioned_folder(tmp_path)
    with pytest.raises(MemoryBankError, match="not found"):
        read_captioned_folder(tmp_path / "missing")
    (tmp_path / "captions.json").write_text("{not json")
    with pytest.raises(MemoryBankError, match="not valid JSON"):
        read_captioned_folder(tmp_path)


def test_ranking_is_cosine_top_k_best_first():
    captions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    ranked = rank_by_text(torch.tensor([2.0, 0.1]), captions, 2)
    assert [i for i, _ in ranked] == [0, 2]
    assert ranked[0][1] == pytest.approx(0.99875, abs=1e-4)


def test_prompt_embedding_ignores_zeroed_padding():
    cond = torch.zeros(1, 8, 3)
    cond[0, :2] = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    torch.testing.assert_close(pool_text_embedding(cond), torch.tensor([2.0, 2.0, 2.0]))
    torch.testing.assert_close(pool_text_embedding(cond, torch.ones(1, 3)), torch.ones(3))


# --- the node in ComfyUI --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(comfy):
    return comfy.run("MemLearnerTestTinyTextEncoder", seed=0)[0]


def rank(comfy, encoder, clip, vae, folder, prompt, top_k=2):
    positive = comfy.run("CLIPTextEncode", clip=clip, text=prompt)[0]
    return comfy.run("MemLearnerReferenceMemoryBank", memory_encoder=encoder, clip=clip, positive=positive, vae=vae,
                     folder=os.path.basename(folder), top_k=top_k)


def test_the_video_whose_caption_is_the_prompt_ranks_first(comfy, encoder, tiny_clip, wan_vae, bank):
    memory, chosen = rank(comfy, encoder, tiny_clip, wan_vae, bank, CAPTIONS["waves.mp4"])
    lines = chosen.splitlines()
    assert len(lines) == 2 and "waves.mp4" in lines[0] and lines[0].startswith("1.000")
    assert memory.latents.shape == (1, 2, 16, *encoder.model.cfg.latent_shape)
    assert torch.isfinite(memory.tokens().tokens).all()


def test_bank_latents_equal_encode_reference_video_of_the_same_file(comfy, encoder, tiny_clip, wan_vae, bank):
    memory, _ = rank(comfy, encoder, tiny_clip, wan_vae, bank, CAPTIONS["cat.mp4"], top_k=1)
    frames = host.pack("nodes.comfy_adapter").read_video(bank / "cat.mp4")
    direct = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, images=frames, vae=wan_vae)[0]
    torch.testing.assert_close(memory.latents, direct.latents)


def test_latents_are_cached_and_refreshed_when_the_video_changes(comfy, encoder, tiny_clip, wan_vae, bank):
    rank(comfy, encoder, tiny_clip, wan_vae, bank, CAPTIONS["car.mp4"], top_k=1)
    cache_dir = host.pack("nodes.comfy_adapter").cache_directory(CACHE_DIR)
    assert cache_dir.startswith(str(bank.parent / "user"))  # in ComfyUI's user folder, never next to the videos
    (cached,) = Path(cache_dir).glob("car-*.safetensors")
    marker = torch.full_like(load_file(str(cached))["latent"], 0.5)
    save_file({"latent": marker}, str(cached))
    memory, _ = rank(comfy, encoder, tiny_clip, wan_vae, bank, CAPTIONS["car.mp4"], top_k=1)
    marked = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent={"samples": marker[None]})[0]
    torch.testing.assert_close(memory.latents, marked.latents)  # read back from the cache, not encoded again
    tiny_models.write_video(bank / "car.mp4", 99)
    os.utime(bank / "car.mp4", ns=(1, 1))
    memory, _ = rank(comfy, encoder, tiny_clip, wan_vae, bank, CAPTIONS["car.mp4"], top_k=1)
    assert not torch.allclose(memory.latents, marked.latents)


def test_relative_bank_folder_is_inside_comfyui_input(comfy, encoder, tiny_clip, wan_vae, bank):
    _, chosen = rank(comfy, encoder, tiny_clip, wan_vae, "bank", CAPTIONS["fountain.mp4"], top_k=1)
    assert "fountain.mp4" in chosen


# --- Load Memory Encoder from the Hub (never online in tests) --------------------------------------------------

@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_repo_already_in_the_models_folder_loads_offline(comfy, offline):
    import shutil

    root = comfy.folder_paths.get_folder_paths("memory_encoders")[0]
    dest = os.path.join(root, "Owner--tiny-dit-mem")
    os.makedirs(dest, exist_ok=True)
    try:
        shutil.copy(os.path.join(root, tiny_models.ENCODER_FILE), os.path.join(dest, "model.safetensors"))
        enc = comfy.run("MemLearnerLoadMemoryEncoder", encoder_name="(from hf_repo)", dtype="fp32",
                        hf_repo="Owner/tiny-dit-mem")[0]
        assert enc.model.cfg.width == 256
    finally:
        shutil.rmtree(dest)


def test_an_unreachable_repo_says_where_to_put_the_file(tmp_path, offline):
    with pytest.raises(HubError, match="download its .safetensors file into .*Thrcle--DiT-Mem-1.3B by hand"):
        fetch_safetensors("Thrcle/DiT-Mem-1.3B", tmp_path)
    with pytest.raises(HubError, match="not a Hugging Face repo id"):
        fetch_safetensors("not a repo", tmp_path)


def test_without_text_clips_sharing_a_caption_are_each_others_references():
    from memlearner_core.memory_bank import caption_groups, reference_sets

    groups = caption_groups(["forest", "desert", "forest", "forest", "desert"])
    assert reference_sets(groups, 2) == [[2, 3], [4, 0], [0, 3], [0, 2], [1, 0]]
