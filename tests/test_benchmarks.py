"""The memory-cost benchmark (``benchmarks/memory_cost.py``): its CPU smoke run on the tiny model writes every
figure, and its FLOP counter gives the cost ratios the issue states for the 1.3B shape. The revisit world's
benchmark (``benchmarks/revisit_world.py``): evaluation on a clean checkout, its targets, the offset sweep's files."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memlearner_core import revisit_world as rw

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


# --- the revisit world's benchmark (benchmarks/revisit_world.py) -------------------------------------------------

REVISIT = ROOT / "benchmarks" / "revisit_world.py"


def load_revisit_benchmark():
    """The revisit benchmark as a module; it puts the repository root on ``sys.path`` to import the pack, which is
    undone here, so ComfyUI's ``nodes`` stays the one later tests import."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("memlearner_benchmark_revisit_world", REVISIT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


revisit = load_revisit_benchmark()


def test_revisit_eval_with_only_the_shipped_model_scores_what_is_there_and_names_what_it_skipped(tmp_path):
    """A clean checkout: no work folder, only the toy model shipped in memlearner_host/revisit_model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REVISIT), "eval", "--quick", "--work", str(tmp_path / "work"), "--out",
           str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(res["configurations"]) == {"oracle", "copy_nearest", "all", "recent", "fov", "framepack",
                                          "query_no_context"}
    assert set(res["skipped"]) == {"all_pool2", "no_memory", "all_10k", "all_new_viewpoints", "all_view_rope",
                                   "view_rope_no_context", "all_view_rope_scratch", "all_pool2_finetune",
                                   "all_pool4_finetune"}
    assert all("train them with: python benchmarks/revisit_world.py" in why for why in res["skipped"].values())
    assert res["models"]["query"].startswith("shipped") and res["step_cost_reference"] == "query_no_context"
    assert res["targets"]["all >= no_memory + 6 dB on revisits"] is None  # not measured, not failed
    assert res["targets"]["oracle highest on revisits"] is True
    assert res["configurations"]["oracle"]["revisit_psnr"] == rw.PSNR_CAP
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Skipped (their weights are not present)" in md and "| not measured |" in md
    assert "skipped 9 configuration(s)" in r.stdout
    for name in ("psnr.png", "revisit_side_by_side.gif", "revisit_side_by_side.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_revisit_targets_without_their_configurations_are_not_measured():
    rows = {"oracle": {"revisit_psnr": 40.0}, "all": {"revisit_psnr": 6.0, "new_psnr": -1.0},
            "recent": {"revisit_psnr": None}}
    targets = revisit.check_targets(rows)
    assert targets["oracle highest on revisits"] is True
    assert targets["all >= recent + 6 dB on revisits"] is None  # recent has no figure
    assert targets["all >= no_memory + 6 dB on revisits"] is None  # no_memory not evaluated
    assert "train-longer" in revisit.skipped_configurations(Path("/w"), {"query": "shipped: x"})["all_10k"]


def test_training_worlds_never_reach_the_held_out_seeds():
    revisit.check_training_seeds(revisit.EVAL_SEED - revisit.TRAIN_SEED)
    with pytest.raises(SystemExit, match="would reach the held-out seeds"):
        revisit.check_training_seeds(revisit.EVAL_SEED - revisit.TRAIN_SEED + 1)


def sweep_doc():
    names = ["oracle", "copy_nearest", "all"]
    rows = [{"kind": "yaw", "offset_deg": o, "shift": 0.0, "between_two_history_poses": o == 22.5,
             "nearest_history_offset_deg": o, "nearest_history_distance": 0.0, "revisit_pixels": 384,
             "revisit_psnr": {"oracle": 40.0, "copy_nearest": 40.0 - o, "all": None},
             "per_world_revisit_psnr": {}} for o in (0.0, 8.0, 22.5)]
    rows.append({**rows[0], "kind": "position", "offset_deg": 0.0, "shift": 1.0, "nearest_history_distance": 1.0})
    rows.append({**rows[0], "kind": "loop", "offset_deg": 15.0, "between_two_history_poses": True})
    return {"configurations": names, "rows": rows, "seconds": 1.0, "models": {"query": "shipped: the toy model"},
            "skipped": {"no_memory": "weights not present; train them with: python benchmarks/revisit_world.py x"}}


def test_the_offset_sweep_writes_its_table_json_and_plot(tmp_path):
    meta = {**revisit.run_meta("revisit_world.py", ["offset-sweep"]), "worlds": 2, "steps": 10}
    revisit.write_sweep(tmp_path, sweep_doc(), meta)
    doc = json.loads((tmp_path / "offset_sweep.json").read_text())
    assert doc["command"] == "python benchmarks/revisit_world.py offset-sweep" and doc["plot"] == "offset_sweep.png"
    md = (tmp_path / "offset_sweep.md").read_text()
    assert "| yaw 22.5 (between two history poses) | 22.5 | 0 | 384 | 40 | 17.5 | - |" in md
    assert "cores" in md and "`no_memory`: weights not present" in md
    assert "| sideways 1 | 0 | 1 | 384 |" in md and "| loop: a full turn later, 15 deg off |" in md
    assert (tmp_path / "offset_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_offset_sweep_says_so_when_matplotlib_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    revisit.write_sweep(tmp_path, sweep_doc(), {**revisit.run_meta("revisit_world.py", []), "worlds": 2, "steps": 1})
    assert not (tmp_path / "offset_sweep.png").exists()
    assert "matplotlib is not installed" in json.loads((tmp_path / "offset_sweep.json").read_text())["plot"]


def test_the_long_rollout_benchmark_runs_every_policy_through_memory_rollout_and_writes_its_figures(tmp_path):
    """A clean checkout's smoke run: the shipped toy model, every long path, each bounded policy at budget 4."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "long_rollout.py"), "--quick", "--work", str(tmp_path / "work"),
           "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(res["psnr"]) == {"oracle", "copy_nearest", "all", "recent@4", "fov@4", "framepack@4", "learned@4",
                                "query_no_context"}
    assert res["psnr"]["oracle"]["revisit_psnr"] == rw.PSNR_CAP
    reads = {name: {frames for _, _, frames in rows} for name, rows in res["chunks"].items()}
    assert reads["learned@4"] == {4} and reads["recent@4"] == {4} and max(reads["all"]) == 46
    assert set(res["targets"]) >= {"learned@4 within 1 dB of all on revisits",
                                   "learned@4 step at the last chunk <= 1.2x the first"}
    assert "| learned@4 |" in (tmp_path / "out" / "results.md").read_text()
    computed = res["computed_step_cost_1_3b"]  # at 1.3B: all grows with history, learned stays flat
    assert computed[-1]["all_tflops"] > 2 * computed[0]["all_tflops"]
    assert computed[-1]["learned@8_tflops"] < 1.01 * computed[0]["learned@8_tflops"]
    assert (tmp_path / "out" / "long_rollout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
