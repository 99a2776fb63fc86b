"""The revisit world end to end: its nodes hand Memory Rollout a held-out world and score what comes back, and the
benchmark's short run goes through world, memlearner-train, export, the nodes and the rollout (not a quality test:
``benchmarks/results/revisit/`` holds the figures)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memlearner_core import revisit_world as rw
from memlearner_core.checkpoint_io import load_query_weights
from memlearner_core.trajectory import parse_trajectory

import host

ROOT = Path(__file__).resolve().parents[1]
SEED = 10_000_003


@pytest.fixture(scope="module")
def world(comfy):
    return comfy.run("MemLearnerRevisitWorld", seed=SEED, path="pan_and_return")


def test_revisit_world_gives_the_rollout_its_history_camera_and_chunks(comfy, world):
    case, history, trajectory, chunks, conditioning = world
    truth = rw.evaluation_case("pan_and_return", SEED).truth
    samples = history["samples"]
    assert samples.shape == (1, 16, 4, 8, 8)
    wa = host.pack("nodes.comfy_adapter")
    assert torch.allclose(wa.wan21_latent_in(samples[0]), truth[:, :4], atol=1e-5)
    assert torch.allclose(parse_trajectory(trajectory), case.poses, atol=1e-5)
    assert chunks == 6 and conditioning[0][0].shape == (1, 1, 4096) and not conditioning[0][0].any()


def test_revisit_score_of_the_truth_is_the_cap_and_of_the_mean_is_zero(comfy, world):
    case = world[0]
    wa = host.pack("nodes.comfy_adapter")
    exact = {"samples": wa.wan21_latent_out(case.truth).unsqueeze(0)}
    report, frames = comfy.run("MemLearnerRevisitScore", world=case, latent=exact)
    report = json.loads(report)
    assert report["revisit_psnr"] == rw.PSNR_CAP and report["new_psnr"] == rw.PSNR_CAP
    assert report["revisit_pixels"] > 0 and report["new_pixels"] > 0
    assert frames.shape == (16, 64, 64 + 4 + 64, 3)
    mean = torch.cat([case.truth[:, :4], torch.zeros(16, 12, 8, 8)], 1)
    report = json.loads(comfy.run("MemLearnerRevisitScore", world=case,
                                  latent={"samples": wa.wan21_latent_out(mean).unsqueeze(0)})[0])
    assert abs(report["revisit_psnr"]) < 1.5 and abs(report["new_psnr"]) < 1.5


def test_revisit_score_refuses_a_latent_that_is_not_this_worlds_rollout(comfy, world):
    with pytest.raises(ValueError, match=r"latent must be the whole rollout of this world \[1, 16, 16, 8, 8\]"):
        comfy.run("MemLearnerRevisitScore", world=world[0], latent={"samples": torch.zeros(1, 16, 12, 8, 8)})
    nan = {"samples": torch.full((1, 16, 16, 8, 8), float("nan"))}
    with pytest.raises(ValueError, match="NaN"):
        comfy.run("MemLearnerRevisitScore", world=world[0], latent=nan)


@pytest.mark.server
def test_the_revisit_benchmark_trains_exports_and_rolls_out_end_to_end(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "revisit_world.py"), "all", "--quick",
                          "--work", str(tmp_path / "work"), "--out", str(out)],
                         capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    configs = results["configurations"]
    assert set(configs) == {"all", "recent", "fov", "framepack", "no_memory", "oracle", "all_pool2", "copy_nearest",
                            "query_no_context", "all_view_rope_scratch"}
    for row in configs.values():
        assert {"revisit_psnr", "new_psnr", "occluder_revisit_psnr", "moving_object_psnr",
                "step_cost_x_plain"} <= set(row)
    assert configs["oracle"]["revisit_psnr"] == rw.PSNR_CAP and configs["no_memory"]["step_cost_x_plain"] == 1
    for name in ("results.md", "psnr.png", "quality_vs_cost.png", "revisit_side_by_side.gif",
                 "revisit_side_by_side.png"):
        assert (out / name).stat().st_size > 0
    for model in ("query", "query_pool2"):  # the trainer's exports, loaded by the nodes
        assert (tmp_path / "work" / "models" / "memlearner" / f"revisit_{model}_query.safetensors").is_file()
    scratch = tmp_path / "work" / "models" / "memlearner" / "revisit_query_view_rope_scratch_query.safetensors"
    assert load_query_weights(scratch).view_rope_fov == 45.0  # the shipped recipe: view-aligned RoPE
    assert "not training query_view_rope: it fine-tunes query_10k" in run.stdout
