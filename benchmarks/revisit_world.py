"""Does memory trained with this pack remember? Query memory on the revisit world, measured against ground truth.

The world (``memlearner_core.revisit_world``) is a panorama in Wan2.1's latent space with unique content at every
place, seen through a yaw (and walking) camera; every frame has exact ground truth. Three small Wan2.1-shaped models
(ComfyUI's ``WanModel``: dim 256, 2 heads, 4 blocks) are trained from the same random init with ``memlearner-train``
(configs in ``benchmarks/revisit/``): query memory (``query_pool`` 1), query memory pooled (``query_pool`` 2), and a
plain model without memory. They are evaluated on held-out worlds through Memory Rollout (the node's own code path,
in a real ComfyUI): the first frames of a path are given as ground-truth history (``first_chunk``), the rest is
generated chunk by chunk (2 latent frames, 10 euler steps, cfg 1) with the context each policy picks.

Metrics, in the model's latent space: ``PSNR = 10 log10(1 / MSE)`` (the world has unit variance per channel, so
0 dB is predicting the mean), capped at 40 dB so an exact copy has a number:
- ``revisit_psnr``: generated pixels whose whole footprint was visible in the ground-truth history (``pan_and_return``
  and ``walk_and_revisit`` paths);
- ``new_psnr``: generated pixels whose place no earlier frame showed (same paths);
- ``occluder_revisit_psnr``: a path that pans out (clear), back and out again behind a wall, and back (clear): the
  revisited pixels inside the wall's band. ``fov`` picks the frames with the same pose, which saw the wall;
- ``moving_object_psnr``: ``pan_and_return`` with a block moving at a steady speed: every generated pixel whose place
  was shown before (the object is elsewhere now);
- ``step_cost_x_plain``: median seconds per denoising step on the pan path over the no-memory model's.
``oracle`` copies the world wherever the history saw it and predicts the mean elsewhere: a check of the metric.

    python benchmarks/revisit_world.py all            # data, training (20-30 min per model, 2 at once), evaluation
    python benchmarks/revisit_world.py train-longer   # diagnosis: the query run resumed to twice its steps
    python benchmarks/revisit_world.py eval           # evaluation only, on the trained models in the work folder
    python benchmarks/revisit_world.py all --quick --work /tmp/rw --out /tmp/rw/out   # a minute-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK))

import torch  # noqa: E402

from memlearner_core import revisit_world as rw  # noqa: E402
from memlearner_core.training.config import load_config  # noqa: E402
from memlearner_core.training.dataset import write_latent_clip  # noqa: E402
from memlearner_core.trajectory import trajectory_json  # noqa: E402

CONFIGS = PACK / "benchmarks" / "revisit"
WORK = PACK / "benchmarks" / "results" / "tmp" / "revisit"
OUT = PACK / "benchmarks" / "results" / "revisit"
MODELS = ("query", "query_pool2", "no_memory")  # the equal-budget runs
LONGER = "query_10k"  # diagnosis: the query run resumed to twice its steps
LATENT = 8  # latent frame side (64 x 64 pixels)
CHUNK = 2  # latent frames per rollout chunk (5 video frames)
BUDGET = 4  # context_frames of the bounded policies (recent, fov, framepack)
STEPS, QUERY_LAYERS = 10, 2
TRAIN_SEED, EVAL_SEED = 0, 10_000_000
P_OCCLUDER = P_MOVING = 0.25
# configuration -> (model, policy, context_frames, query_pool); context_frames 0 = all history
CONFIGURATIONS = {
    "all": ("query", "all", 0, 1),
    "recent": ("query", "recent", BUDGET, 1),
    "fov": ("query", "fov", BUDGET, 1),
    "framepack": ("query", "framepack", BUDGET, 1),
    "all_pool2": ("query_pool2", "all", 0, 2),
    "no_memory": ("no_memory", "all", 0, 1),
    "all_10k": (LONGER, "all", 0, 1),  # evaluated when train-longer has run
}


# --- the world's data --------------------------------------------------------------------------------------------

def training_example(seed: int, n_frames: int) -> tuple[rw.World, torch.Tensor]:
    """A training world and a random trajectory through it; a quarter of the worlds have a wall that stands during a
    random stretch of the path, a quarter a moving object."""
    g = torch.Generator().manual_seed(seed)
    poses = rw.random_trajectory(n_frames, g)
    occluder, moving = bool(torch.rand((), generator=g) < P_OCCLUDER), bool(torch.rand((), generator=g) < P_MOVING)
    first = int(torch.randint(0, n_frames - 1, (), generator=g))
    last = int(torch.randint(first, n_frames, (), generator=g))
    return rw.make_world(seed, occluder=occluder, moving_object=moving, occluded_frames=(first, last)), poses


# --- steps ------------------------------------------------------------------------------------------------------

def boot(work: Path):
    """ComfyUI in-process (CPU unless MEMLEARNER_TEST_GPU=1) with the work folder's models."""
    from memlearner_host import server

    (work / "models").mkdir(parents=True, exist_ok=True)
    nodes, _ = server.boot_in_process(server.write_extra_paths(work / "models", work / "extra_model_paths.yaml"))
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # hundreds of short samplings: no bar each
    return nodes, server


def make_data(work: Path, clips: int, n_frames: int) -> None:
    """Training clips (LATENT samples + poses) and the shared random initial model."""
    from safetensors.torch import save_file

    from memlearner_host.tiny_models import tiny_wan

    _, server = boot(work)
    wa = server.pack("nodes.comfy_adapter")
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    began = time.time()
    for i in range(clips):
        path = data / f"clip_{i:06d}.safetensors"
        if not path.exists():
            world, poses = training_example(TRAIN_SEED + i, n_frames)
            latent = rw.render(world, poses, LATENT, LATENT).latent
            write_latent_clip(path, wa.wan21_latent_out(latent), poses)
    init = work / "models" / "diffusion_models" / "revisit_init.safetensors"
    init.parent.mkdir(parents=True, exist_ok=True)
    if not init.exists():
        save_file({k: v.contiguous() for k, v in tiny_wan(seed=TRAIN_SEED).state_dict().items()}, str(init))
    print(f"[revisit] {clips} training clips in {data} ({time.time() - began:.0f}s)", flush=True)


def train_config(work: Path, name: str, steps: int | None, configs: Path = CONFIGS,
                 paths: dict | None = None) -> Path:
    """The committed config ``configs/<name>.toml`` with the work folder's ``paths`` (default: this benchmark's data,
    run folder and initial model) and ``steps``, for a smoke run."""
    text = (configs / f"{name}.toml").read_text()
    subs = paths or {"data_dir": work / "data", "output_dir": work / "runs" / name,
                     "model_file": work / "models" / "diffusion_models" / "revisit_init.safetensors"}
    lines = []
    for line in text.splitlines():
        key = line.split("=")[0].strip()
        if key in subs:
            line = f'{key} = "{subs[key]}"'
        elif key == "steps" and steps is not None:
            line = f"steps = {steps}"
        elif key == "checkpoint_every" and steps is not None:
            line = f"checkpoint_every = {steps}"
        lines.append(line)
    path = work / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    load_config(path)  # checked before anything runs
    return path


def train_all(work: Path, steps: int | None, parallel: int, models=MODELS, configs: Path = CONFIGS,
              paths=None, prefix: str = "revisit") -> dict:
    """``memlearner-train`` on each config, ``parallel`` at a time, one thread each; exports go to the models
    folder as ``<prefix>_<name>``. ``paths(name)``: the config's paths (``train_config``). Returns per model:
    seconds, steps, the last loss."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running, done = list(models), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            log = open(work / f"train_{name}.log", "w")
            config = train_config(work, name, steps, configs, None if paths is None else paths(name))
            cmd = [sys.executable, "-m", "memlearner_train", str(config)]
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=PACK, env=env), log,
                             time.time())
            print(f"[{prefix}] training {name}: {' '.join(cmd)}", flush=True)
        time.sleep(2)
        for name, (proc, log, began) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            text = (work / f"train_{name}.log").read_text()
            if proc.returncode:
                raise RuntimeError(f"training {name} failed ({proc.returncode}):\n{text[-3000:]}")
            done[name] = {"seconds": round(time.time() - began, 1),
                          "result": next(x for x in text.splitlines() if x.startswith("trained "))}
            print(f"[{prefix}] trained {name} in {done[name]['seconds']:.0f}s", flush=True)
    for name in models:
        export = work / "runs" / name / "export"
        for file, folder, suffix in (("memlearner_wan21", "diffusion_models", ""), ("memlearner_query", "memlearner",
                                     "_query"), ("memlearner_encoder", "memory_encoders", "")):
            if (export / f"{file}.safetensors").exists():
                (work / "models" / folder).mkdir(parents=True, exist_ok=True)
                shutil.copy(export / f"{file}.safetensors",
                            work / "models" / folder / f"{prefix}_{name}{suffix}.safetensors")
    record = work / "training.json"
    done = (json.loads(record.read_text()) if record.exists() else {}) | done
    record.write_text(json.dumps(done, indent=1))
    return done


def train_longer(work: Path, steps: int | None) -> dict:
    """The training-length diagnosis: ``query``'s run copied to ``query_10k`` and resumed to its config's steps."""
    src, dst = work / "runs" / "query", work / "runs" / LONGER
    if not dst.exists():
        shutil.copytree(src / "checkpoints", dst / "checkpoints")
    return train_all(work, None if steps is None else 2 * steps, 1, (LONGER,))


def evaluate(work: Path, worlds: int, steps: int = STEPS) -> tuple[dict, dict, object]:
    """Every configuration on ``worlds`` held-out worlds x 4 paths: the figures per configuration, the first pan's
    rollouts (for the video) and the adapter."""
    nodes, server = boot(work)
    if not torch.cuda.is_available():  # a 4.8M-parameter model: threads cost more per op than they save
        torch.set_num_threads(1)
    wa = server.pack("nodes.comfy_adapter")
    rollout = nodes.NODE_CLASS_MAPPINGS["MemLearnerMemoryRollout"]
    loader = nodes.NODE_CLASS_MAPPINGS["UNETLoader"]
    names = [n for n in (*MODELS, LONGER)
             if (work / "models" / "diffusion_models" / f"revisit_{n}.safetensors").is_file()]
    models = {name: server.run_node(loader, unet_name=f"revisit_{name}.safetensors", weight_dtype="default")[0]
              for name in names}
    sums: dict = {}
    seconds: dict = {}
    examples = {}
    began = time.time()
    for wi in range(worlds):
        print(f"[revisit] evaluating world {wi + 1} of {worlds} ({time.time() - began:.0f}s)", flush=True)
        for path in rw.EVALUATION_PATHS:
            case = rw.evaluation_case(path, EVAL_SEED + wi, LATENT, LATENT)
            preds = {"oracle": rw.oracle_prediction(case)}
            for cname, (mname, policy, budget, pool) in CONFIGURATIONS.items():
                if mname not in models:
                    continue
                latent, report = rollout_case(server, rollout, models[mname], case, wi, steps, policy, budget,
                                              0 if mname == "no_memory" else QUERY_LAYERS,
                                              "none" if mname == "no_memory" else f"revisit_{mname}_query.safetensors",
                                              pool, wa)
                if path == "pan_and_return":
                    seconds.setdefault(cname, []).extend(r["seconds"] / steps for r in json.loads(report))
                preds[cname] = wa.wan21_latent_in(latent["samples"][0].float())[:, case.history:]
            if path == "pan_and_return" and wi == 0:
                examples = whole_videos(preds, case)
            add_errors(sums, preds, case, wi, _metric_masks(case))
    plain = statistics.median(seconds["no_memory"]) if "no_memory" in seconds else None
    results = {}
    for cname, metrics in sums.items():
        row = {m: rw.psnr(*metrics.get(m, (0.0, 0))) for m in
               ("revisit_psnr", "new_psnr", "occluder_revisit_psnr", "moving_object_psnr")}
        sec = seconds.get(cname)
        row["step_cost_x_plain"] = None if sec is None or plain is None else round(statistics.median(sec) / plain, 2)
        row["by_path_psnr"] = {m: rw.psnr(*v) for m, v in metrics.items() if "@" in m}
        row["pixels"] = {m: c for m, (_, c) in metrics.items() if "@" not in m}
        results[cname] = row
    return results, examples, wa


def rollout_case(server, rollout, model, case: rw.RevisitCase, seed: int, steps: int, policy: str, budget: int,
                 query_layers: int, query_weights: str, pool: int, wa):
    """Memory Rollout over ``case``: its history given as the first chunk, the rest generated in chunks of
    ``CHUNK`` latent frames along its poses. Returns the node's (LATENT, report)."""
    text = [[torch.zeros(1, 1, 4096), {}]]
    return server.run_node(
        rollout, model=model, positive=text, negative=text, seed=seed, steps=steps, cfg=1.0,
        sampler_name="euler", scheduler="simple", width=LATENT * 8, height=LATENT * 8,
        chunk_frames=4 * CHUNK - 3, chunks=case.generated_frames // CHUNK, policy=policy,
        context_frames=budget, query_layers=query_layers, query_weights=query_weights,
        camera="custom JSON", trajectory=trajectory_json(case.poses), denoise=1.0,
        first_chunk={"samples": wa.wan21_latent_out(case.truth[:, :case.history]).unsqueeze(0)},
        query_pool=pool)


def whole_videos(preds: dict, case: rw.RevisitCase) -> dict:
    """Each configuration's generated frames after the given history ``[16, T, h, w]``, and the ground truth."""
    videos = {k: torch.cat([case.truth[:, :case.history], v], 1) for k, v in preds.items()}
    videos["ground_truth"] = case.truth
    return videos


def add_errors(sums: dict, preds: dict, case: rw.RevisitCase, world: int, masks: dict) -> None:
    """Each configuration's squared error on ``case`` added to ``sums[name][metric]`` and ``sums[name][kind@path]``
    (error sum, pixel count) for every ``masks`` metric; a non-finite prediction stops the run, never scores."""
    for cname, pred in preds.items():
        if not torch.isfinite(pred).all():
            raise RuntimeError(f"{cname} produced a non-finite latent on {case.path}, world {world}")
        err = rw.squared_error(pred, case)
        for metric, mask in masks.items():
            for key in (metric, f"{metric.removesuffix('_psnr')}@{case.path}"):  # overall and per path
                s = sums.setdefault(cname, {}).setdefault(key, [0.0, 0])
                s[0] += float(err[mask].sum())
                s[1] += int(mask.sum())


def _metric_masks(case: rw.RevisitCase) -> dict:
    labels = case.labels
    if case.path in ("pan_and_return", "walk_and_revisit"):
        return {"revisit_psnr": labels["revisit"], "new_psnr": labels["new"]}
    if case.path == "occluder":
        return {"occluder_revisit_psnr": labels["band"]}
    return {"moving_object_psnr": labels["shown"]}


# --- results -------------------------------------------------------------------------------------------------------

TARGETS = (
    ("all >= recent + 6 dB on revisits", lambda c: c["all"]["revisit_psnr"] >= c["recent"]["revisit_psnr"] + 6),
    ("all >= no_memory + 6 dB on revisits", lambda c: c["all"]["revisit_psnr"] >= c["no_memory"]["revisit_psnr"] + 6),
    ("all >= no_memory - 0.5 dB on new places", lambda c: c["all"]["new_psnr"] >= c["no_memory"]["new_psnr"] - 0.5),
    ("occluder: all > fov", lambda c: c["all"]["occluder_revisit_psnr"] > c["fov"]["occluder_revisit_psnr"]),
    ("moving object: all > fov", lambda c: c["all"]["moving_object_psnr"] > c["fov"]["moving_object_psnr"]),
    ("moving object: all > recent", lambda c: c["all"]["moving_object_psnr"] > c["recent"]["moving_object_psnr"]),
    ("oracle highest on revisits", lambda c: c["oracle"]["revisit_psnr"] >= max(v["revisit_psnr"] for v in c.values())),
)


def write_results(out: Path, results: dict, examples: dict, wa, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    targets = {name: bool(check(results)) for name, check in TARGETS}
    doc = {**meta, "configurations": results, "targets": targets}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    cols = ("revisit_psnr", "new_psnr", "occluder_revisit_psnr", "moving_object_psnr", "step_cost_x_plain")
    lines = [f"# Revisit world: {meta['command']}", "",
             f"{meta['date']}, commit {meta['commit']}, {meta['machine']}; {meta['worlds']} held-out worlds, "
             f"PSNR = 10 log10(1/MSE) in latent space, capped at {rw.PSNR_CAP:g} dB.", "",
             "| configuration | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join("-" if row[c] is None else f"{row[c]:g}" for c in cols) + " |")
    lines += ["", "| target | met |", "|---|---|"] + [f"| {k} | {'yes' if v else 'NO'} |" for k, v in targets.items()]
    lines += ["", "Training (memlearner-train, " + meta["training_note"] + "):", ""]
    lines += [f"- {k}: {v['seconds']:.0f} s; {v['result']}" for k, v in meta["training"].items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(out, results)
    _video(out, examples, wa)


def _plot(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metrics in zip(axes, (("revisit_psnr", "new_psnr"), ("occluder_revisit_psnr", "moving_object_psnr")),
                           strict=True):
        for k, m in enumerate(metrics):
            vals = [results[n][m] or 0 for n in names]
            ax.bar([i + 0.4 * k for i in range(len(names))], vals, width=0.4, label=m)
        ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=30)
        ax.set_ylabel("PSNR (dB, latent space)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "psnr.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        if results[n]["step_cost_x_plain"] is not None:
            ax.scatter(results[n]["step_cost_x_plain"], results[n]["revisit_psnr"])
            ax.annotate(n, (results[n]["step_cost_x_plain"], results[n]["revisit_psnr"]))
    ax.set_xlabel("seconds per step / no_memory's")
    ax.set_ylabel("revisit PSNR (dB)")
    fig.tight_layout()
    fig.savefig(out / "quality_vs_cost.png", dpi=100)
    plt.close(fig)


def _video(out: Path, examples: dict, wa) -> None:
    """ground truth | no memory | recent | all, side by side per frame, through ComfyUI's Wan2.1 preview factors:
    an animated GIF and a PNG sheet (a row per frame)."""
    from PIL import Image

    factors, bias = wa.wan21_preview_factors()
    panels = ["ground_truth", "no_memory", "recent", "all"]
    frames = rw.side_by_side([examples[p] for p in panels], factors, bias)  # [T, 64, W, 3]
    images = [Image.fromarray((f.numpy() * 255).round().astype("uint8")) for f in frames]
    images[0].save(out / "revisit_side_by_side.gif", save_all=True, append_images=images[1:], duration=400, loop=0)
    save_sheet(frames, out / "revisit_side_by_side.png")


def save_sheet(frames: torch.Tensor, path: Path) -> None:
    """RGB frames ``[T, H, W, 3]`` in ``[0, 1]`` as one PNG, a row per frame, white lines between rows."""
    from PIL import Image

    sheet = torch.cat([torch.cat([f, torch.ones(2, f.shape[1], 3)], 0) for f in frames], 0)
    Image.fromarray((sheet.numpy() * 255).round().astype("uint8")).save(path)


def run_meta(script: str, argv) -> dict:
    """Where and when a benchmark ran: its command line, the UTC date, the commit and the machine."""
    return {"command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": _commit(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"torch {torch.__version__}"}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PACK, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["data", "train", "train-longer", "eval", "all"])
    ap.add_argument("--work", type=Path, default=WORK, help="data, runs and models (not committed)")
    ap.add_argument("--out", type=Path, default=OUT, help="results.json, results.md, plots, video")
    ap.add_argument("--clips", type=int, default=2000, help="training clips (one world each)")
    ap.add_argument("--worlds", type=int, default=6, help="held-out worlds")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the configs')")
    ap.add_argument("--parallel", type=int, default=2, help="trainings at once")
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 clips, 3 steps, 1 world")
    args = ap.parse_args(argv)
    if args.quick:
        args.clips, args.steps, args.worlds = 16, 3, 1
    args.work.mkdir(parents=True, exist_ok=True)
    n_frames = load_config(CONFIGS / "query.toml").latent_frames
    if args.stage in ("data", "all"):
        make_data(args.work, args.clips, n_frames)
    if args.stage in ("train", "all"):
        train_all(args.work, args.steps, args.parallel)
    if args.stage == "train-longer":
        train_longer(args.work, args.steps)
    if args.stage in ("eval", "all"):
        results, examples, wa = evaluate(args.work, args.worlds, 2 if args.quick else STEPS)
        training = json.loads((args.work / "training.json").read_text())
        steps = args.steps or load_config(CONFIGS / "query.toml").steps
        meta = {**run_meta("revisit_world.py", argv), "worlds": args.worlds, "clips": args.clips, "training_steps": steps, "training": training,
                "training_note": f"{args.clips} clips, {steps} steps each, batch 4, CPU, one thread per run"}
        write_results(args.out, results, examples, wa, meta)
        print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
