"""The DiT-Mem world-family benchmark end to end (not a quality test: ``benchmarks/results/dit_mem/`` holds the
figures): family clips, memlearner-train's four runs (two backbones, two encoders, one with query memory on),
their exports loaded by the nodes, and every configuration rolled out and scored."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATIONS = {"no_memory", "dit_mem_trained", "dit_mem_random", "dit_mem_wrong_family", "query", "both",
                  "family_mean", "oracle"}


@pytest.mark.server
def test_the_dit_mem_benchmark_trains_encoders_and_scores_every_configuration(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dit_mem_world.py"), "all", "--quick",
                          "--work", str(work), "--out", str(out)],
                         capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    configs = json.loads((out / "results.json").read_text())["configurations"]
    assert set(configs) == CONFIGURATIONS
    for name, row in configs.items():
        assert isinstance(row["new_psnr"], float) and isinstance(row["revisit_psnr"], float), name
    assert configs["oracle"]["revisit_psnr"] == 40.0
    assert configs["family_mean"]["new_psnr"] > configs["oracle"]["new_psnr"]  # the family's look is a real prior
    for encoder in ("dit_mem_encoder", "dit_mem_encoder_query", "dit_mem_random_encoder"):
        assert (work / "models" / "memory_encoders" / f"{encoder}.safetensors").is_file()
    assert (out / "dit_mem_side_by_side.png").stat().st_size > 0
