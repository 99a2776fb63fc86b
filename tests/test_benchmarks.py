"""The memory-cost benchmark (``benchmarks/memory_cost.py``): its CPU smoke run on the tiny model writes every
figure, and its FLOP counter gives the cost ratios the issue states for the 1.3B shape."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "memory_cost.py"


def load_benchmark():
    """The script as a module, without putting the repository root (and its ``nodes``) on ``sys.path``."""
    spec = importlib.util.spec_from_file_location("memlearner_benchmark_memory_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()


def test_flop_counter_gives_the_issue_ratios_for_1_3b():
    s, p = bench.Shape.of("1.3b"), bench.query_tokens(bench.SIZES["1.3b"]["latent"])
    assert p == 32760
    plain = bench.step_flops(s, p, "plain")["step"]
    generative = bench.layer_flops(s, 2 * p, p * p + p * 2 * p) / bench.layer_flops(s, p, p * p)
    query_9x = bench.step_flops(s, p, "query", 9 * p, query_layers=5, cache=True)
    concat_9x = bench.step_flops(s, p, "concat", 9 * p)["step"]
    assert generative == pytest.approx(2.7, rel=0.15)  # Q as large as P, per generative layer
    assert query_9x["step"] / plain == pytest.approx(3.8, rel=0.15)  # 5 query layers of 30, 9x history
    assert concat_9x / plain == pytest.approx(70, rel=0.15)
    assert query_9x["once"] > 0 and bench.step_flops(s, p, "query", 9 * p, 5, cache=False)["once"] == 0
    assert concat_9x / query_9x["step"] > 10  # the 10x target is within reach of the FLOPs
    assert bench.step_flops(s, p, "dit_mem", memory=1000)["step"] / plain < 1.03


def test_cpu_smoke_run_writes_every_figure(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a shared 2-core runner: no OpenMP spinning against others
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--device", "cpu", "--out", str(tmp_path), "--steps", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())

    assert res["environment"]["device_type"] == "cpu" and res["environment"]["torch"] and res["environment"]["comfyui"]
    assert res["matrix_rate"]["tflops"] > 0
    assert [c["name"] for c in res["configurations"]] == [c["name"] for c in bench.CONFIGURATIONS]
    assert set(res["rollout"]["policies"]) == set(bench.POLICIES)
    rollout_rows = [row for rows in res["rollout"]["policies"].values() for row in rows]
    for row in res["configurations"] + rollout_rows:
        for key in ("step_ms", "first_step_ms", "flops", "floor_ms", "achieved", "peak_mb"):
            assert math.isfinite(row[key]) and row[key] > 0, (row.get("name", row.get("chunk")), key, row[key])
    for rows in res["rollout"]["policies"].values():
        assert [row["chunk"] for row in rows] == list(range(1, 11))
        assert rows[0]["context_tokens"] == 0 and rows[-1]["context_tokens"] > 0
    dedup = next(c for c in res["configurations"] if c["name"] == "dit_mem_dedup")
    assert (dedup["memory_tokens"], dedup["memory_keys"]) == (1000, 10)

    targets = {t["id"]: t for t in res["targets"]}
    assert set(targets) == {"floor", "dit_mem_official", "dit_mem_dedup", "query_vs_concat_9x", "pooled_q_9x",
                            "rollout_all"}
    assert targets["pooled_q_9x"]["status"] in ("pass", "miss")
    pooled = next(c for c in res["configurations"] if c["name"] == "query_9x_pool2")
    assert pooled["query_tokens"] * 4 == pooled["chunk_tokens"] and pooled["output_diff_vs_full_q"] > 0
    for t in targets.values():
        assert t["status"] in ("pass", "miss", "not measured")
        if t["status"] == "miss":
            assert t["by"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "## Targets" in md and "query_9x_cache" in md and "### framepack" in md
    for png in ("step_time_vs_context.png", "rollout_step_time.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_skipped_and_said_so_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = {"configurations": []}
    assert bench.plots(res, tmp_path) == []
    assert "matplotlib" in res["plot_note"]
