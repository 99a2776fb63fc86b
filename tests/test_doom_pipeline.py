"""The Doom world end to end on tiny settings: rendered clips as a user's video folder, the narrow Wan2.1 VAE,
memlearner-train through its video path, the exports, a ComfyUI server running the nodes, VAE Decode, RGB scores.
The quality figures are the benchmark's (benchmarks/results/doom/); this checks the path runs and measures."""

import json
import math
import os
import subprocess
import sys

import pytest

import host

SKIP = "the Doom world needs vizdoom: pip install 'comfyui-memlearner[doom]'"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("vizdoom", reason=SKIP)
    work = tmp_path_factory.mktemp("doom")
    out = work / "out"
    proc = subprocess.run([sys.executable, str(host.ROOT / "benchmarks" / "doom_world.py"), "all", "--quick",
                           "--work", str(work), "--out", str(out)], capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, out, json.loads((out / "results.json").read_text())


def test_training_went_through_the_video_folder_and_the_vae(quick_run):
    work, _, results = quick_run
    assert sorted(p.suffix for p in (work / "data").glob("doom_00000.*")) == [".json", ".mp4", ".txt"]
    assert len(list((work / "latent_cache").glob("*.safetensors"))) == results["training_videos"]
    for name in ("query", "query_view_rope", "no_memory"):
        assert (work / "models" / "diffusion_models" / f"doom_{name}.safetensors").is_file()
    assert (work / "models" / "memlearner" / "doom_query_query.safetensors").is_file()


def test_every_configuration_was_scored_in_rgb_on_held_out_maps(quick_run):
    _, out, results = quick_run
    from memlearner_core.doom_world import HELD_OUT_MAPS

    assert results["eval_clips"] and all(c.split("_")[0] in HELD_OUT_MAPS for c in results["eval_clips"])
    configs = results["configurations"]
    assert set(configs) == {"all_view_rope", "recent_view_rope", "no_memory", "oracle", "copy_nearest"}
    for name, row in configs.items():
        for key in ("revisit_psnr", "new_psnr", "revisit_ssim"):
            assert row[key] is None or math.isfinite(row[key]), (name, key)
    assert configs["oracle"]["revisit_pixels"] == configs["all_view_rope"]["revisit_pixels"] > 0  # the same pixels
    best = configs["all_view_rope"]
    assert best["seconds_per_step"] > 0 and best["video_score_psnr_mean"] is not None
    for f in ("results.md", "psnr.png", "psnr_by_offset.png"):
        assert (out / f).is_file()


def test_the_side_by_side_video_is_written(quick_run):
    _, out, _ = quick_run
    assert (out / "return_side_by_side.mp4").stat().st_size > 0
