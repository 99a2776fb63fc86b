"""Training groundwork, host-free: config, flow-matching target, context sampling, clips, checkpoints."""

import json
import logging
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from memlearner_core.context_policy import frame_cost, select_context
from memlearner_core.reference_video import sample_indices
from memlearner_core.training.checkpointing import (
    TrainCheckpointError,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    rng_snapshot,
    save_checkpoint,
)
from memlearner_core.training.config import ConfigError, config_from_dict, example_config, load_config
from memlearner_core.training.context_sampling import (
    ContextSamplingError,
    clip_windows,
    sample_context,
    sample_context_length,
    split_clip,
)
from memlearner_core.training.dataset import (
    ClipFolder,
    DatasetError,
    LatentCache,
    encode_all,
    read_latent_folder,
    resize_and_crop,
    write_latent_clip,
)
from memlearner_core.training.flow_matching import (
    FlowMatchingError,
    flow_loss,
    noisy_latents,
    sample_sigmas,
    timesteps,
    velocity_target,
)
from memlearner_core.training.trainer import warmup_factor
from memlearner_core.trajectory import orbit, trajectory_json

REQUIRED = {"recipe": "query", "data_dir": "d", "output_dir": "o", "model_file": "m.safetensors",
            "vae_file": "v.safetensors"}


# --- config -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["query", "encoder"])
def test_example_config_loads_with_paths_relative_to_the_file(tmp_path, recipe):
    (tmp_path / "run.toml").write_text(example_config(recipe))
    cfg = load_config(tmp_path / "run.toml")
    assert cfg.recipe == recipe and cfg.lr == 1e-5 and cfg.query_layers == 5 and cfg.max_context_multiple == 9
    assert cfg.clip_frames == 81 and cfg.latent_frames == 21 and cfg.top_k_references == 5
    base = tmp_path.resolve()
    assert cfg.data_dir == base / "data" and cfg.output_dir == base / "runs" / recipe
    assert cfg.cache_dir == cfg.output_dir / "latent_cache" and cfg.encoder_file is None
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing is True and cfg.lora_rank == 0


def test_config_defaults_and_absolute_paths(tmp_path):
    cfg = config_from_dict({**REQUIRED, "recipe": "encoder", "encoder_file": "/abs/enc.safetensors", "lr": 2},
                           tmp_path)
    assert cfg.lr == 2.0 and isinstance(cfg.lr, float) and cfg.encoder_file == Path("/abs/enc.safetensors")
    assert cfg.model_file == tmp_path.resolve() / "m.safetensors"


@pytest.mark.parametrize("extra, words", [
    ({"setps": 10}, ["unknown key 'setps'", "did you mean 'steps'"]),
    ({"steps": "10"}, ["'steps'", "whole number"]),
    ({"batch_size": True}, ["'batch_size'", "whole number"]),
    ({"lr": "1e-5"}, ["'lr'", "number"]),
    ({"lr": 0.0}, ["'lr'", "> 0"]),
    ({"gradient_checkpointing": 1}, ["'gradient_checkpointing'", "true or false"]),
    ({"mixed_precision": "fp16"}, ["'mixed_precision'", "'bf16'"]),
    ({"recipe": "lora"}, ["'recipe'", "'query'"]),
    ({"data_dir": 3}, ["'data_dir'", "path"]),
    ({"clip_frames": 80}, ["'clip_frames'", "4k+1", "77"]),
    ({"width": 840}, ["'width'", "multiple of 16"]),
    ({"steps": 0}, ["'steps'", ">= 1"]),
    ({"predict_latent_frames": 21}, ["'predict_latent_frames'", "21 latent frames"]),
    ({"context_policies": ["all", "nearest"]}, ["'context_policies'", "'framepack'"]),
    ({"context_policies": []}, ["'context_policies'", "non-empty list"]),
    ({"device": "gpu"}, ["'device'", '"cuda:N"']),
    ({"camera_init": "ones"}, ["'camera_init'", "'normal'"]),
    ({"recipe": "encoder", "reference_pool": 3}, ["'reference_pool'", "top_k_references (5)"]),
    ({"recipe": "encoder", "encoder_window": 22}, ["'encoder_window'", "21 latent frames"]),
    ({"reference_width": 100}, ["'reference_width'", "multiple of 8"]),
    ({"reference_clip_frames": 40}, ["'reference_clip_frames'", "4k+1"]),
])
def test_config_errors_name_the_key(tmp_path, extra, words):
    with pytest.raises(ConfigError) as e:
        config_from_dict({**REQUIRED, **extra}, tmp_path)
    for w in words:
        assert w in str(e.value)


def test_pre_encoded_latents_need_no_vae_and_videos_do(tmp_path):
    cfg = config_from_dict({k: v for k, v in REQUIRED.items() if k != "vae_file"} | {"data_format": "latents",
                                                                                      "text": "none"}, tmp_path)
    assert cfg.vae_file is None and cfg.context_policies == ("all", "recent", "fov", "framepack")
    with pytest.raises(ConfigError, match="vae_file"):
        config_from_dict({k: v for k, v in REQUIRED.items() if k != "vae_file"}, tmp_path)


def test_warmup_rises_linearly_then_holds():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing required key"):
        config_from_dict({"recipe": "query"})
    bad = tmp_path / "bad.toml"
    bad.write_text('recipe = "query"\nsteps = \n')
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    bad.write_text(example_config("query") + "warmup = 5\n")
    with pytest.raises(ConfigError, match="bad.toml: unknown key 'warmup'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


# --- flow matching ------------------------------------------------------------------------------------------

def test_noisy_latents_interpolate_endpoints_exactly(seeded):
    x0, noise = torch.randn(3, 16, 4, 6, 8, generator=seeded), torch.randn(3, 16, 4, 6, 8, generator=seeded)
    xt = noisy_latents(x0, noise, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    torch.testing.assert_close(xt[2], 0.75 * x0[2] + 0.25 * noise[2])
    # the target is the velocity along sigma
    v = velocity_target(x0, noise)
    s = torch.full((3,), 0.4)
    torch.testing.assert_close((noisy_latents(x0, noise, s + 0.1) - noisy_latents(x0, noise, s)) / 0.1, v,
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(FlowMatchingError, match=r"\[B\] with B = 3"):
        noisy_latents(x0, noise, torch.zeros(2))


def test_loss_of_the_exact_target_is_zero_and_mask_counts_predicted_frames_only(seeded):
    x0, noise = torch.randn(2, 16, 5, 4, 4, generator=seeded), torch.randn(2, 16, 5, 4, 4, generator=seeded)
    target = velocity_target(x0, noise)
    assert flow_loss(target, target).item() == 0.0
    mask = torch.tensor([False, False, True, True, True])  # C C P P P
    pred = target.clone()
    pred[:, :, :2] += 100.0  # errors outside P do not count
    assert flow_loss(pred, target, mask).item() == 0.0
    pred[:, :, 2:] += 1.0
    assert flow_loss(pred, target, mask).item() == pytest.approx(1.0)
    assert flow_loss(pred, target).item() == pytest.approx((2 * 100.0**2 + 3 * 1.0) / 5)
    with pytest.raises(FlowMatchingError, match="selects no frame"):
        flow_loss(pred, target, torch.zeros(5, dtype=torch.bool))
    with pytest.raises(FlowMatchingError, match="bool"):
        flow_loss(pred, target, torch.ones(4, dtype=torch.bool))


def test_sigmas_shift_one_is_uniform_and_shift_follows_wan():
    u = torch.rand(1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample_sigmas(1000, torch.Generator().manual_seed(3), shift=1.0), u)
    s = sample_sigmas(1000, torch.Generator().manual_seed(3), shift=5.0)
    torch.testing.assert_close(s, 5 * u / (1 + 4 * u))
    assert s.shape == (1000,) and (s >= 0).all() and (s < 1).all() and s.mean() > u.mean()
    assert torch.equal(timesteps(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.0, 500.0, 1000.0]))


# --- context sampling ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("p, multiple, available, top",
                         [(2, 9, 30, 18), (2, 9, 7, 7), (3, 0, 10, 0), (1, 9, 0, 0)])
def test_context_length_is_uniform_over_its_bounds(p, multiple, available, top):
    g = torch.Generator().manual_seed(0)
    draws = Counter(sample_context_length(p, multiple, available, g) for _ in range(4000))
    assert set(draws) == set(range(top + 1))  # every value reachable, none outside
    expected = 4000 / (top + 1)
    assert all(abs(c - expected) < 0.25 * expected + 5 for c in draws.values())


def test_training_context_is_picked_by_each_rollout_policy_within_the_sampled_budget():
    from memlearner_core import revisit_world as rw

    g = torch.Generator().manual_seed(0)
    poses = rw.random_trajectory(12, g)
    latent = torch.arange(12.0).reshape(1, 12, 1, 1).expand(16, 12, 8, 8)  # frame i holds the value i
    drawn = Counter()
    for _ in range(200):
        spec, target, policy, picks, _ = sample_context(latent, poses, 2, 5, ("all", "recent", "fov", "framepack"), g)
        drawn[policy] += 1
        assert target[0, :, 0, 0].tolist() == [10, 11]  # P: the last frames
        tokens = sum(frame_cost(8, 8, pk.pool) for pk in picks)
        budget = next(b for b in range(11) if select_context(policy, 10, b * frame_cost(8, 8), (8, 8), poses[:10],
                                                             poses[10:]) == picks)
        assert tokens <= budget * frame_cost(8, 8)
        for seg in spec.segments:  # history at its true offset before P, its own poses
            assert (seg.frame_index < 0).all()
            assert torch.equal(seg.latent[0, :, 0, 0], seg.frame_index.float() + 10)
            assert torch.equal(seg.poses, poses[seg.frame_index + 10])
    assert set(drawn) == {"all", "recent", "fov", "framepack"} and min(drawn.values()) > 25


def test_the_learned_policy_hands_training_every_earlier_frame_and_the_budget_for_each_query_layer():
    g = torch.Generator().manual_seed(2)
    latent = torch.arange(12.0).reshape(1, 12, 1, 1).expand(16, 12, 8, 8)
    budgets = set()
    for _ in range(40):
        spec, _, policy, picks, budget = sample_context(latent, None, 2, 5, ("learned",), g)
        assert policy == "learned" and 0 <= budget <= 10
        assert [p.index for p in picks] == (list(range(10)) if budget else [])
        assert sum(seg.latent.shape[1] for seg in spec.segments) == (10 if budget else 0)
        budgets.add(budget)
    assert len(budgets) > 5  # the budget is drawn like every policy's


def test_training_context_without_poses_never_uses_fov():
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(16, 8, 4, 4)
    assert {sample_context(latent, None, 2, 3, ("fov",), g)[2] for _ in range(20)} == {"recent"}


def test_split_clip_takes_the_frames_right_before_the_prediction():
    latent = torch.arange(10.0).reshape(1, 10, 1, 1).expand(16, 10, 2, 3)  # frame i holds the value i
    context, target = split_clip(latent, p=3, n_context=4)
    assert context.shape == (16, 4, 2, 3) and target.shape == (16, 3, 2, 3)
    assert context[0, :, 0, 0].tolist() == [3, 4, 5, 6] and target[0, :, 0, 0].tolist() == [7, 8, 9]
    context, target = split_clip(latent, p=3, n_context=0)
    assert context.shape == (16, 0, 2, 3) and target[0, :, 0, 0].tolist() == [7, 8, 9]
    assert clip_windows(10, 3, 7) == (slice(0, 7), slice(7, 10))
    with pytest.raises(ContextSamplingError, match="at most 7 context"):
        split_clip(latent, p=3, n_context=8)
    with pytest.raises(ContextSamplingError, match="cannot predict 11"):
        split_clip(latent, p=11, n_context=0)
    with pytest.raises(ContextSamplingError, match="p >= 1"):
        sample_context_length(0, 9, 5)


# --- dataset ------------------------------------------------------------------------------------------------

CLIP, W, H = 9, 32, 16
LENGTHS = {"a_good.mp4": 20, "b_corrupt.mp4": 0, "c_empty.mp4": 0, "d_short.mp4": 5, "e_posed.mp4": 12}


class FakeHost:
    """decode_fn/encode_fn as the host would give them, counting their calls."""

    def __init__(self):
        self.decoded, self.encoded = Counter(), 0

    def decode(self, path: Path) -> torch.Tensor:
        self.decoded[path.name] += 1
        if path.name == "b_corrupt.mp4":
            raise RuntimeError("moov atom not found")
        n = LENGTHS[path.name]
        g = torch.Generator().manual_seed(n)
        return torch.rand(n, 24, 40, 3, generator=g)  # 24x40 is resized to cover 16x32, then cropped

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        self.encoded += 1
        assert frames.shape == (CLIP, H, W, 3)
        x = frames.permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W]; frame 0 alone, then 4 frames per latent frame
        first = nn.functional.avg_pool3d(x[:, :, :1], (1, 8, 8))
        rest = nn.functional.avg_pool3d(x[:, :, 1:], (4, 8, 8))
        return torch.cat([first, rest], dim=2).repeat(1, 6, 1, 1, 1)[:, :16]  # [1, 16, 3, 2, 4]


@pytest.fixture
def video_folder(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in LENGTHS:
        (folder / name).write_bytes(b"not really a video " + name.encode())
    (folder / "captions.json").write_text(json.dumps({n: f"caption of {n}" for n in LENGTHS}))
    (folder / "e_posed.poses.json").write_text(trajectory_json(orbit(12)))
    return folder


def test_encode_all_skips_bad_videos_and_hits_the_cache(video_folder, tmp_path, caplog):
    clips, cache, host = ClipFolder(video_folder, CLIP, W, H), LatentCache(tmp_path / "cache"), FakeHost()
    assert len(clips) == 5 and clips[4].poses.shape == (12, 3, 4) and clips[0].poses is None
    with caplog.at_level(logging.WARNING, logger="memlearner"):
        items, skipped = encode_all(clips, host.decode, host.encode, cache, vae_id="tiny")
    assert [e.path.name for e, _, _ in items] == ["a_good.mp4", "e_posed.mp4"]
    reasons = {p.name: why for p, why in skipped}
    assert set(reasons) == {"b_corrupt.mp4", "c_empty.mp4", "d_short.mp4"}
    assert "could not be decoded" in reasons["b_corrupt.mp4"] and "moov atom" in reasons["b_corrupt.mp4"]
    assert "empty" in reasons["c_empty.mp4"] and "5 frames, fewer than the 9" in reasons["d_short.mp4"]
    assert "3 of 5 video(s) skipped" in caplog.text and "b_corrupt.mp4" in caplog.text
    assert host.encoded == 2 and all(lat.shape == (16, 3, 2, 4) for _, lat, _ in items)
    assert items[0][2] is None
    posed = items[1][2]  # one pose per latent frame: clip frames 0, 4, 8 of the 12-frame video
    torch.testing.assert_close(posed, orbit(12)[sample_indices(12, CLIP)][::4], atol=1e-5, rtol=0)

    again = FakeHost()  # a second pass: nothing valid is decoded or encoded again
    clips2 = ClipFolder(video_folder, CLIP, W, H)
    items2, skipped2 = encode_all(clips2, again.decode, again.encode, cache, vae_id="tiny")
    assert again.encoded == 0 and again.decoded["a_good.mp4"] == 0 and again.decoded["e_posed.mp4"] == 0
    assert len(skipped2) == 3 and all(torch.equal(a[1], b[1]) for a, b in zip(items, items2, strict=True))
    assert torch.equal(items2[1][2], posed)
    # other settings (another VAE) or an edited video miss the cache
    assert cache.get(video_folder / "a_good.mp4", clips.settings_key("other")) is None
    (video_folder / "a_good.mp4").write_bytes(b"edited, and longer than before")
    assert cache.get(video_folder / "a_good.mp4", clips.settings_key("tiny")) is None


def test_wrong_poses_file_is_an_error_naming_it(video_folder):
    poses_file = video_folder / "e_posed.poses.json"
    bad = orbit(12)
    bad[3, :, :3] *= 2  # not a rotation
    poses_file.write_text(trajectory_json(bad))
    with pytest.raises(DatasetError, match=r"e_posed\.poses\.json.*pose 3.*not orthonormal"):
        ClipFolder(video_folder, CLIP, W, H)
    poses_file.write_text("[[1, 0, 0")
    with pytest.raises(DatasetError, match=r"e_posed\.poses\.json.*not valid JSON"):
        ClipFolder(video_folder, CLIP, W, H)
    poses_file.write_text(trajectory_json(orbit(10)))  # 10 poses for a 12-frame video
    clips, host = ClipFolder(video_folder, CLIP, W, H), FakeHost()
    with pytest.raises(DatasetError, match=r"e_posed\.poses\.json: 10 poses, but the video has 12 frames"):
        encode_all(clips, host.decode, host.encode)
    assert host.encoded == 1  # checked before the video is encoded


def test_latent_folder_reads_clips_with_poses_and_captions_and_skips_unfit_files(tmp_path, caplog):
    from safetensors.torch import save_file

    poses = orbit(6)
    write_latent_clip(tmp_path / "a.safetensors", torch.randn(16, 6, 4, 4), poses, "a caption")
    write_latent_clip(tmp_path / "b.safetensors", torch.randn(16, 5, 4, 4))  # more frames than a clip: cut
    write_latent_clip(tmp_path / "short.safetensors", torch.randn(16, 2, 4, 4))
    write_latent_clip(tmp_path / "nan.safetensors", torch.full((16, 5, 4, 4), float("nan")))
    write_latent_clip(tmp_path / "size.safetensors", torch.randn(16, 5, 8, 8))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with caplog.at_level(logging.WARNING, logger="memlearner"):
        items, skipped = read_latent_folder(tmp_path, latent_frames=4, width=32, height=32)
    assert [e.path.name for e, _, _ in items] == ["a.safetensors", "b.safetensors"]
    (entry, latent, clip_poses), (_, _, none) = items
    assert entry.caption == "a caption" and latent.shape == (16, 4, 4, 4) and none is None
    assert torch.equal(clip_poses, poses[:4])
    assert {p.name for p, _ in skipped} == {"short.safetensors", "nan.safetensors", "size.safetensors",
                                           "other.safetensors", "broken.safetensors"}
    assert "5 of 7 latent file(s) skipped" in caplog.text


def test_latent_folder_poses_that_do_not_fit_are_an_error_naming_the_file(tmp_path):
    write_latent_clip(tmp_path / "bad.safetensors", torch.randn(16, 4, 4, 4), torch.randn(4, 3, 4))
    with pytest.raises(DatasetError, match="bad.safetensors.*not orthonormal"):
        read_latent_folder(tmp_path, 4, 32, 32)
    write_latent_clip(tmp_path / "bad.safetensors", torch.randn(16, 4, 4, 4), orbit(2))
    with pytest.raises(DatasetError, match="bad.safetensors: poses must be"):
        read_latent_folder(tmp_path, 4, 32, 32)


def test_resize_and_crop_covers_then_crops_the_centre():
    frames = torch.arange(4 * 8.0).reshape(1, 4, 8, 1).expand(2, 4, 8, 3) / 32
    out = resize_and_crop(frames, width=4, height=4)  # already covers 4x4: centre columns only
    assert out.shape == (2, 4, 4, 3) and torch.equal(out, frames[:, :, 2:6])
    assert resize_and_crop(torch.rand(3, 360, 640, 3), 832, 480).shape == (3, 480, 832, 3)
    assert resize_and_crop(torch.full((1, 10, 10, 3), 255, dtype=torch.uint8), 16, 8).max() == 1.0
    with pytest.raises(DatasetError, match="4k\\+1"):
        ClipFolder(".", 8, W, H)


# --- checkpoints --------------------------------------------------------------------------------------------

def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def _train(model, opt, data_gen, first: int, last: int, position: int, ckpt: Path | None = None) -> int:
    """Steps ``first .. last-1``: data drawn from ``data_gen``, dropout from torch's global RNG, a per-step
    batch size from Python's ``random``; a checkpoint every 3 steps done."""
    fixed = torch.Generator().manual_seed(9)
    xs, ys = torch.randn(64, 4, generator=fixed), torch.randn(64, 1, generator=fixed)
    for step in range(first, last):
        idx = torch.randint(0, 64, (random.randint(2, 6),), generator=data_gen)
        loss = (model(xs[idx]) - ys[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        position += len(idx)
        if ckpt is not None and (step + 1) % 3 == 0:
            trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
            save_checkpoint(ckpt, step + 1, trainable, opt, rng_snapshot(data_gen, position),
                            {"loss": loss.item()})
    return position


def _fresh(seed: int):
    model = _model(seed)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), torch.Generator()


def test_resume_after_a_crash_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    model, opt, gen = _fresh(0)
    random.seed(5)
    gen.manual_seed(7)
    _train(model, opt, gen, 0, 10, 0)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, gen = _fresh(0)
    random.seed(5)
    gen.manual_seed(7)
    _train(model, opt, gen, 0, 7, 0, tmp_path)  # crashes during step 8, after the step-6 checkpoint
    random.seed(123)
    torch.manual_seed(123)  # the crash loses every random state

    model, opt, gen = _fresh(99)  # a new process: other init, fresh optimizer
    path = latest_checkpoint(tmp_path)
    assert path.name == "step-00000006"
    step, weights, state = load_checkpoint(path, opt)
    assert step == 6 and set(weights) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    model.load_state_dict(weights)
    position = restore_rng(state["rng"], gen)
    assert position > 0 and isinstance(state["meta"]["loss"], float)
    _train(model, opt, gen, step, 10, position)
    for k, v in model.state_dict().items():
        assert torch.equal(v, straight[k]), k


def test_keep_prunes_old_checkpoints_and_a_half_written_one_is_ignored(tmp_path):
    model, opt, gen = _fresh(0)
    trainable = dict(model.named_parameters())
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / "absent") is None
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, trainable, opt, rng_snapshot(gen), {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000006"]
    crashed = tmp_path / ".tmp-step-00000008-4242"  # a crash mid-write
    crashed.mkdir()
    (crashed / "weights.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / "step-00000009").mkdir()  # no state.json: not a checkpoint
    assert latest_checkpoint(tmp_path).name == "step-00000006"
    save_checkpoint(tmp_path, 6, trainable, opt, rng_snapshot(gen), keep=2)  # the same step again replaces it
    save_checkpoint(tmp_path, 8, trainable, opt, rng_snapshot(gen), keep=2)
    assert latest_checkpoint(tmp_path).name == "step-00000008" and not crashed.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-0000000")) == \
        ["step-00000006", "step-00000008", "step-00000009"]
    with pytest.raises(TrainCheckpointError, match="missing state.json"):
        load_checkpoint(tmp_path / "step-00000009")
    with pytest.raises(TrainCheckpointError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 10, trainable, opt, rng_snapshot(gen), {"bad": object()})


def test_training_core_imports_no_comfyui():
    code = ("import sys, memlearner_core.training.config, memlearner_core.training.dataset, "
            "memlearner_core.training.checkpointing, memlearner_core.training.flow_matching, "
            "memlearner_core.training.context_sampling; "
            "print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'nodes')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "[]"
