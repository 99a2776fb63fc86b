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
Baselines beside the trained configurations: ``oracle`` copies the world wherever the history saw it and predicts
the mean elsewhere (a check of the metric); ``copy_nearest`` copies, for each generated frame, the history frame of
highest view overlap, unshifted (a rule with no learning); ``query_no_context`` is the query model with its query
layers off, so no context reaches it (same weights, no memory); ``no_memory`` a plain model trained alike.

The offset sweep (``offset-sweep``) measures revisit PSNR against how far a revisit's pose is from the nearest
history pose (``memlearner_core.revisit_world.offset_revisit_path``: yaw offsets 0 to 22.5 degrees, the last midway
between two history poses), for the same configurations; it writes ``offset_sweep.{json,md,png}``.

    python benchmarks/revisit_world.py all            # data, training (20-30 min per model, 2 at once), evaluation
    python benchmarks/revisit_world.py train-longer   # diagnosis: the query run resumed to twice its steps
    python benchmarks/revisit_world.py eval           # evaluation only: the work folder's models, else the shipped one
    python benchmarks/revisit_world.py offset-sweep   # revisit PSNR over the pose offset (benchmarks/revisit/results)
    python benchmarks/revisit_world.py train-budget   # fine-tunes of the toy model: the learned policy, pooled queries
    python benchmarks/revisit_world.py all --quick --work /tmp/rw --out /tmp/rw/out   # a minute-long smoke run

``eval`` and ``offset-sweep`` run on whatever weights are present: the work folder's, and for ``query`` the toy model
shipped in ``memlearner_host/revisit_model`` (the 10,000-step query run, fp16) when the work folder has none. A
configuration whose weights are not present is skipped, and the results say which and the command that trains it.
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
SWEEP_OUT = CONFIGS / "results"  # the offset sweep's table and plot
TOY = PACK / "memlearner_host" / "revisit_model"  # the shipped toy model: diffusion_models/, memlearner/
MODELS = ("query", "query_pool2", "no_memory")  # the equal-budget runs
# the new-viewpoint recipe: the shipped model fine-tuned on returns that miss the poses of the way out, with the
# camera signal as it was, and with view-aligned RoPE (memlearner_core/view_rope.py); the same budget each
VIEWPOINT_MODELS = ("query_new_viewpoints", "query_view_rope", "query_view_rope_scratch")
LONGER = "query_10k"  # diagnosis: the query run resumed to twice its steps
# the context budget's runs, each a fine-tune of the shipped toy model (train-budget): trained for the learned policy,
# and full queries fine-tuned into pooled ones (2x2 and 4x4 cells)
BUDGET_MODELS = ("query_learned", "query_pool2_finetune", "query_pool4_finetune")
DATA_FOLDERS = {"data": False, "data_new_viewpoints": True}  # folder -> random_trajectory(new_viewpoints=)
SHIPPED_MODEL = "query_view_rope_scratch"  # the toy model shipped in memlearner_host/revisit_model/ (stage ship)
SHIPPED_FILES = ("revisit_query.safetensors", "revisit_query_query.safetensors")  # the names the workflows load
SHIPPED = {"query": "the toy model shipped in memlearner_host/revisit_model/ (query_view_rope_scratch: the query "
                    "recipe from scratch, 5,000 steps, with view-aligned RoPE on new-viewpoint returns; fp16), the "
                    "work folder having no revisit_query.safetensors"}
TRAIN_COMMAND = {  # how to get each model's weights into the work folder
    "query": "python benchmarks/revisit_world.py data && python benchmarks/revisit_world.py train",
    "query_pool2": "python benchmarks/revisit_world.py data && python benchmarks/revisit_world.py train",
    "no_memory": "python benchmarks/revisit_world.py data && python benchmarks/revisit_world.py train",
    LONGER: "python benchmarks/revisit_world.py train-longer (after train: it resumes the query run)",
    "query_new_viewpoints": "python benchmarks/revisit_world.py train-viewpoints (after train and train-longer: "
                            "it fine-tunes query_10k)",
    "query_view_rope": "python benchmarks/revisit_world.py train-viewpoints (after train and train-longer: it "
                       "fine-tunes query_10k)",
    "query_view_rope_scratch": "python benchmarks/revisit_world.py data && python benchmarks/revisit_world.py "
                               "train-viewpoints",
    **{name: "python benchmarks/revisit_world.py data && python benchmarks/revisit_world.py train-budget"
       for name in BUDGET_MODELS},
}
LATENT = 8  # latent frame side (64 x 64 pixels)
CHUNK = 2  # latent frames per rollout chunk (5 video frames)
BUDGET = 4  # context_frames of the bounded policies (recent, fov, framepack)
STEPS, QUERY_LAYERS = 10, 2
TRAIN_SEED, EVAL_SEED = 0, 10_000_000
P_OCCLUDER = P_MOVING = 0.25
# configuration -> (model, policy, context_frames, query_pool, query_layers); context_frames 0 = all history
CONFIGURATIONS = {
    "all": ("query", "all", 0, 1, QUERY_LAYERS),
    "recent": ("query", "recent", BUDGET, 1, QUERY_LAYERS),
    "fov": ("query", "fov", BUDGET, 1, QUERY_LAYERS),
    "framepack": ("query", "framepack", BUDGET, 1, QUERY_LAYERS),
    "query_no_context": ("query", "all", 0, 1, 0),  # the same weights, query layers off: no context reaches it
    "all_pool2": ("query_pool2", "all", 0, 2, QUERY_LAYERS),
    "no_memory": ("no_memory", "all", 0, 1, 0),
    "all_10k": (LONGER, "all", 0, 1, QUERY_LAYERS),  # evaluated when train-longer has run
    "all_new_viewpoints": ("query_new_viewpoints", "all", 0, 1, QUERY_LAYERS),  # when train-viewpoints has run
    "all_view_rope": ("query_view_rope", "all", 0, 1, QUERY_LAYERS),
    "view_rope_no_context": ("query_view_rope", "all", 0, 1, 0),
    "all_view_rope_scratch": ("query_view_rope_scratch", "all", 0, 1, QUERY_LAYERS),
    "all_pool2_finetune": ("query_pool2_finetune", "all", 0, 2, QUERY_LAYERS),  # when train-budget has run
    "all_pool4_finetune": ("query_pool4_finetune", "all", 0, 4, QUERY_LAYERS),
}
RULES = ("oracle", "copy_nearest")  # predictions by rule from the ground truth, no model
SWEEP_CONFIGURATIONS = ("all", "fov", "query_no_context", "no_memory", "all_10k", "all_new_viewpoints",
                        "all_view_rope", "view_rope_no_context", "all_view_rope_scratch")  # the sweep's rollouts
SWEEP_WORLDS = 20  # the offset sweep's default: 7 offsets x 20 worlds x 3 rollouts of 3 chunks, ~6 CPU minutes


# --- the world's data --------------------------------------------------------------------------------------------

def training_example(seed: int, n_frames: int, new_viewpoints: bool = False) -> tuple[rw.World, torch.Tensor]:
    """A training world and a random trajectory through it; a quarter of the worlds have a wall that stands during a
    random stretch of the path, a quarter a moving object. ``new_viewpoints``: the returns miss the poses of the
    way out (``rw.random_trajectory``)."""
    g = torch.Generator().manual_seed(seed)
    poses = rw.random_trajectory(n_frames, g, new_viewpoints=new_viewpoints)
    occluder, moving = bool(torch.rand((), generator=g) < P_OCCLUDER), bool(torch.rand((), generator=g) < P_MOVING)
    first = int(torch.randint(0, n_frames - 1, (), generator=g))
    last = int(torch.randint(first, n_frames, (), generator=g))
    return rw.make_world(seed, occluder=occluder, moving_object=moving, occluded_frames=(first, last)), poses


# --- steps ------------------------------------------------------------------------------------------------------

def boot(work: Path, shipped: bool = False):
    """ComfyUI in-process (CPU unless MEMLEARNER_TEST_GPU=1) with the work folder's models, and with ``shipped`` the
    toy model's folder after them (a file of the same name in the work folder is found first)."""
    from memlearner_host import server

    (work / "models").mkdir(parents=True, exist_ok=True)
    extra = server.write_extra_paths(work / "models", work / "extra_model_paths.yaml")
    if shipped:
        with extra.open("a") as f:
            f.write(f"memlearner_toy_model:\n  base_path: {TOY}\n  diffusion_models: diffusion_models/\n"
                    "  memlearner: memlearner/\n")
    nodes, _ = server.boot_in_process(extra)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # hundreds of short samplings: no bar each
    return nodes, server


def check_training_seeds(clips: int) -> None:
    """Training worlds are seeds ``TRAIN_SEED .. TRAIN_SEED + clips - 1``, held-out worlds ``EVAL_SEED`` on: refuse a
    count that would reach them, so no evaluated world is ever trained on."""
    if TRAIN_SEED + clips > EVAL_SEED:
        raise SystemExit(f"--clips {clips}: training worlds would reach the held-out seeds ({EVAL_SEED} on); use at "
                         f"most {EVAL_SEED - TRAIN_SEED} clips")


def make_data(work: Path, clips: int, n_frames: int) -> None:
    """Training clips (LATENT samples + poses) and the shared random initial model: ``data/`` (returns to the poses
    of the way out) and ``data_new_viewpoints/`` (returns that miss them), from the same training seeds."""
    from safetensors.torch import save_file

    from memlearner_host.tiny_models import tiny_wan

    check_training_seeds(clips)
    _, server = boot(work)
    wa = server.pack("nodes.comfy_adapter")
    began = time.time()
    for folder, new_viewpoints in DATA_FOLDERS.items():
        (work / folder).mkdir(parents=True, exist_ok=True)
        for i in range(clips):
            path = work / folder / f"clip_{i:06d}.safetensors"
            if not path.exists():
                world, poses = training_example(TRAIN_SEED + i, n_frames, new_viewpoints)
                latent = rw.render(world, poses, LATENT, LATENT).latent
                write_latent_clip(path, wa.wan21_latent_out(latent), poses)
    init = work / "models" / "diffusion_models" / "revisit_init.safetensors"
    init.parent.mkdir(parents=True, exist_ok=True)
    if not init.exists():
        save_file({k: v.contiguous() for k, v in tiny_wan(seed=TRAIN_SEED).state_dict().items()}, str(init))
    print(f"[revisit] {clips} training clips in each of {', '.join(DATA_FOLDERS)} in {work} "
          f"({time.time() - began:.0f}s)", flush=True)


def train_config(work: Path, name: str, steps: int | None, configs: Path = CONFIGS,
                 paths: dict | None = None) -> Path:
    """The committed config ``configs/<name>.toml`` with the work folder's ``paths`` (default: this benchmark's data,
    run folder and initial model) and ``steps``, for a smoke run."""
    text = (configs / f"{name}.toml").read_text()
    committed = load_config(configs / f"{name}.toml")
    subs = paths or {"data_dir": work / committed.data_dir.name, "output_dir": work / "runs" / name,
                     **{k: in_work(work, getattr(committed, k)) for k in ("model_file", "query_file")
                        if getattr(committed, k) is not None}}
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


def in_work(work: Path, path: Path) -> Path:
    """A config's path into this benchmark's default work folder, moved into ``work``; any other path as it is."""
    return work / path.relative_to(WORK) if WORK in path.parents else path


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


def viewpoint_models(work: Path, scratch_only: bool) -> tuple[str, ...]:
    """The new-viewpoint runs to train: the one from scratch always; the two that fine-tune ``query_10k`` when its
    weights are in the work folder (``train-longer``) and not ``scratch_only``, else each is named as skipped."""
    start = work / "models" / "diffusion_models" / f"revisit_{LONGER}.safetensors"
    runs = ["query_view_rope_scratch"]
    for name in ("query_new_viewpoints", "query_view_rope"):
        if not scratch_only and start.is_file():
            runs.append(name)
        else:
            print(f"[revisit] not training {name}: it fine-tunes {LONGER} "
                  f"({'train-viewpoints trains it' if scratch_only else 'run train and train-longer first'})",
                  flush=True)
    return tuple(runs)


def train_longer(work: Path, steps: int | None) -> dict:
    """The training-length diagnosis: ``query``'s run copied to ``query_10k`` and resumed to its config's steps."""
    src, dst = work / "runs" / "query", work / "runs" / LONGER
    if not dst.exists():
        shutil.copytree(src / "checkpoints", dst / "checkpoints")
    return train_all(work, None if steps is None else 2 * steps, 1, (LONGER,))


def ship(work: Path, name: str) -> None:
    """The work folder's model ``name`` as the toy model shipped in ``memlearner_host/revisit_model/``, under the
    names the shipped workflows load: the diffusion model in fp16 (half the size), the query weights as trained.
    Each file is written beside its place and moved in, so a failure leaves the shipped model whole."""
    from safetensors.torch import load_file, save_file

    dit = work / "models" / "diffusion_models" / f"revisit_{name}.safetensors"
    query = work / "models" / "memlearner" / f"revisit_{name}_query.safetensors"
    for src in (dit, query):
        if not src.is_file():
            raise SystemExit(f"ship: {_shown(src)} is not there; train {name} first ({TRAIN_COMMAND[name]})")
    half = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(dit)).items()}
    dit_dst, query_dst = TOY / "diffusion_models" / SHIPPED_FILES[0], TOY / "memlearner" / SHIPPED_FILES[1]
    save_file(half, str(dit_dst.with_suffix(".tmp")))
    shutil.copyfile(query, query_dst.with_suffix(".tmp"))
    for src, dst in ((dit, dit_dst), (query, query_dst)):
        os.replace(dst.with_suffix(".tmp"), dst)
        print(f"[revisit] shipped {_shown(src)} as {_shown(dst)}", flush=True)


def model_sources(work: Path) -> dict:
    """Each model whose weights are present -> where they are: the work folder's export, else (``query`` only) the
    shipped toy model."""
    out = {}
    for name in (*MODELS, LONGER, *VIEWPOINT_MODELS, *BUDGET_MODELS):
        file = f"revisit_{name}.safetensors"
        if (work / "models" / "diffusion_models" / file).is_file():
            out[name] = f"work folder: {_shown(work / 'models' / 'diffusion_models' / file)}"
        elif name in SHIPPED and (TOY / "diffusion_models" / file).is_file():
            out[name] = f"shipped: {SHIPPED[name]}"
    return out


def _shown(path: Path) -> str:
    """``path`` relative to the pack when inside it (results read the same on every checkout), else absolute."""
    try:
        return str(path.resolve().relative_to(PACK))
    except ValueError:
        return str(path)


def skipped_configurations(work: Path, present, configurations=CONFIGURATIONS) -> dict:
    """Each configuration whose model's weights are not present (``present``: ``model_sources``) -> why, and the
    command that trains them."""
    out = {}
    for c in configurations:
        m = CONFIGURATIONS[c][0]
        if m in present:
            continue
        out[c] = (f"weights revisit_{m}.safetensors not in {_shown(work / 'models' / 'diffusion_models')}; train "
                  f"them with: {TRAIN_COMMAND[m]}")
    return out


class Evaluator:
    """Memory Rollout of any case with any configuration whose weights are present, through the nodes in an
    in-process ComfyUI."""

    def __init__(self, work: Path, steps: int = STEPS):
        self.nodes, self.server = boot(work, shipped=True)
        if not torch.cuda.is_available():  # a 4.8M-parameter model: threads cost more per op than they save
            torch.set_num_threads(1)
        self.steps = steps
        self.wa = self.server.pack("nodes.comfy_adapter")
        self.rollout = self.nodes.NODE_CLASS_MAPPINGS["MemLearnerMemoryRollout"]
        loader = self.nodes.NODE_CLASS_MAPPINGS["UNETLoader"]
        self.sources = model_sources(work)
        self.models = {name: self.server.run_node(loader, unet_name=f"revisit_{name}.safetensors",
                                                  weight_dtype="default")[0] for name in self.sources}

    def available(self, configurations) -> list[str]:
        return [c for c in configurations if CONFIGURATIONS[c][0] in self.models]

    def predict(self, cname: str, case: rw.RevisitCase, seed: int) -> tuple[torch.Tensor, list]:
        """Configuration ``cname``'s generated frames ``[16, T - history, h, w]`` (model space) and chunk
        reports."""
        mname, policy, budget, pool, layers = CONFIGURATIONS[cname]
        latent, report = rollout_case(self.server, self.rollout, self.models[mname], case, seed, self.steps, policy,
                                      budget, layers, f"revisit_{mname}_query.safetensors" if layers else "none",
                                      pool, self.wa)
        return self.wa.wan21_latent_in(latent["samples"][0].float())[:, case.history:], json.loads(report)


def rule_predictions(case: rw.RevisitCase) -> dict:
    """The baselines by rule: ``oracle`` and ``copy_nearest``."""
    return {"oracle": rw.oracle_prediction(case), "copy_nearest": rw.copy_nearest_prediction(case)}


def evaluate(work: Path, worlds: int, steps: int = STEPS) -> tuple[dict, dict, object, dict]:
    """Every configuration whose weights are present on ``worlds`` held-out worlds x 4 paths: the figures per
    configuration, the first pan's rollouts (for the video), the adapter, and ``info`` (where each model came from,
    the configurations skipped and why, the step-cost reference)."""
    ev = Evaluator(work, steps)
    names = ev.available(CONFIGURATIONS)
    skipped = skipped_configurations(work, ev.sources)
    for cname, why in skipped.items():
        print(f"[revisit] skipping {cname}: {why}", flush=True)
    sums: dict = {}
    seconds: dict = {}
    examples = {}
    began = time.time()
    for wi in range(worlds):
        print(f"[revisit] evaluating world {wi + 1} of {worlds} ({time.time() - began:.0f}s)", flush=True)
        for path in rw.EVALUATION_PATHS:
            case = rw.evaluation_case(path, EVAL_SEED + wi, LATENT, LATENT)
            preds = rule_predictions(case)
            for cname in names:
                preds[cname], report = ev.predict(cname, case, wi)
                if path == "pan_and_return":
                    seconds.setdefault(cname, []).extend(r["seconds"] / steps for r in report)
            if path == "pan_and_return" and wi == 0:
                examples = whole_videos(preds, case)
            add_errors(sums, preds, case, wi, _metric_masks(case))
    reference = next((c for c in ("no_memory", "query_no_context") if c in seconds), None)
    plain = statistics.median(seconds[reference]) if reference else None
    results = {}
    for cname, metrics in sums.items():
        row = {m: rw.psnr(*metrics.get(m, (0.0, 0))) for m in
               ("revisit_psnr", "new_psnr", "occluder_revisit_psnr", "moving_object_psnr")}
        sec = seconds.get(cname)
        row["step_cost_x_plain"] = None if sec is None or plain is None else round(statistics.median(sec) / plain, 2)
        row["by_path_psnr"] = {m: rw.psnr(*v) for m, v in metrics.items() if "@" in m}
        row["pixels"] = {m: c for m, (_, c) in metrics.items() if "@" not in m}
        results[cname] = row
    info = {"models": ev.sources, "skipped": skipped, "step_cost_reference": reference}
    return results, examples, ev.wa, info


def sweep_cases(offsets=rw.SWEEP_OFFSETS, shifts=rw.SWEEP_SHIFTS, loop: bool = True) -> list[tuple[str, float]]:
    """The sweep's revisits as ``(kind, value)``: ``yaw`` turned by ``value`` degrees from the history's poses,
    ``position`` moved ``value`` units sideways from them, ``loop`` a full turn later ``value`` degrees off."""
    return ([("yaw", o) for o in offsets] + [("position", s) for s in shifts]
            + ([("loop", rw.LOOP_OFFSET)] if loop else []))


def sweep_case(kind: str, value: float, seed: int) -> rw.RevisitCase:
    if kind == "loop":
        return rw.loop_case(seed, LATENT, LATENT)
    return rw.offset_case(seed, value if kind == "yaw" else 0.0, LATENT, LATENT, value if kind == "position" else 0.0)


def offset_sweep(work: Path, worlds: int, steps: int = STEPS, cases=None) -> dict:
    """Revisit PSNR over the pose offset from the nearest history pose (``sweep_cases``: yaw offsets, sideways
    shifts and a loop closure): per case, on ``worlds`` held-out worlds, the rules and every
    ``SWEEP_CONFIGURATIONS`` whose weights are present. The same worlds and rollout seeds in every case, so the
    curve compares like with like."""
    ev = Evaluator(work, steps)
    names = ev.available(SWEEP_CONFIGURATIONS)
    skipped = skipped_configurations(work, ev.sources, SWEEP_CONFIGURATIONS)
    for cname, why in skipped.items():
        print(f"[revisit] offset sweep: skipping {cname}: {why}", flush=True)
    rows, began = [], time.time()
    for kind, value in cases or sweep_cases():
        print(f"[revisit] offset sweep: {kind} {value:g} ({time.time() - began:.0f}s)", flush=True)
        sums: dict = {}
        per_world: dict = {}
        nearest, distance = [], []
        for wi in range(worlds):
            case = sweep_case(kind, value, EVAL_SEED + wi)
            nearest.append(float(rw.nearest_history_offset(case).max()))
            distance.append(float(rw.nearest_history_distance(case).max()))
            preds = rule_predictions(case)
            for cname in names:
                preds[cname] = ev.predict(cname, case, wi)[0]
            mask = case.labels["revisit"]
            for cname, pred in preds.items():
                if not torch.isfinite(pred).all():
                    raise RuntimeError(f"{cname} produced a non-finite latent on the offset sweep, world {wi}")
                err, count = float(rw.squared_error(pred, case)[mask].sum()), int(mask.sum())
                total = sums.setdefault(cname, [0.0, 0])
                total[0] += err
                total[1] += count
                per_world.setdefault(cname, []).append(rw.psnr(err, count))
        rows.append({"kind": kind, "offset_deg": value if kind != "position" else 0.0,
                     "shift": value if kind == "position" else 0.0,
                     "between_two_history_poses": kind == "loop" or (kind == "yaw" and value == rw.BETWEEN_OFFSET),
                     "nearest_history_offset_deg": round(max(nearest), 3),
                     "nearest_history_distance": round(max(distance), 3),
                     "revisit_pixels": sums["oracle"][1],
                     "revisit_psnr": {c: rw.psnr(*v) for c, v in sums.items()},
                     "per_world_revisit_psnr": per_world})
    return {"configurations": [*RULES, *names], "rows": rows, "seconds": round(time.time() - began, 1),
            "models": ev.sources, "skipped": skipped}


def _sweep_label(row: dict) -> str:
    kind = row.get("kind", "yaw")
    if kind == "position":
        return f"sideways {row['shift']:g}"
    if kind == "loop":
        return f"loop: a full turn later, {row['offset_deg']:g} deg off"
    return f"yaw {row['offset_deg']:g}" + (" (between two history poses)" if row["between_two_history_poses"] else "")


def write_sweep(out: Path, sweep: dict, meta: dict) -> None:
    """``offset_sweep.json``, ``offset_sweep.md`` and, with matplotlib, ``offset_sweep.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plot = _sweep_plot(out, sweep)
    doc = {**meta, **sweep, "plot": plot}
    (out / "offset_sweep.json").write_text(json.dumps(doc, indent=1) + "\n")
    names = sweep["configurations"]
    yaws = ", ".join(f"{y:g}" for y in rw.OFFSET_HISTORY_YAWS)
    lines = [f"# Revisit world, offset sweep: `{meta['command']}`", "",
             f"{meta['date']}, commit {meta['commit']}, {meta['machine']}; {meta['worlds']} held-out worlds (seeds "
             f"{EVAL_SEED} to {EVAL_SEED + meta['worlds'] - 1}), {meta['steps']} euler steps, chunks of {CHUNK} "
             f"latent frames; {sweep['seconds']:.0f} s.", "",
             f"Paths: `offset_revisit_path`: 4 given frames at yaw {yaws} degrees (45 degrees apart, a view's width), "
             "then 6 generated frames at the history's poses turned by the yaw offset o (135 - o, 90 + o, 90 - o, "
             "45 + o, 45 - o, o), or at those poses moved sideways (along the camera's x axis) by the shift, in world "
             "units (the world is a cylinder of radius 8); `loop_revisit_path`: 12 given frames turn a full circle in "
             f"{rw.LOOP_STEP:g}-degree steps, then 6 generated frames come round again {rw.LOOP_OFFSET:g} degrees off "
             "(midway between two history poses). Revisit PSNR = 10 log10(1/MSE) in latent space over the generated "
             f"pixels whose place the history saw, pooled over the worlds, capped at {rw.PSNR_CAP:g} dB.", ""]
    lines += _model_lines(meta | sweep)
    lines += ["| revisit | nearest history pose (deg) | nearest history camera (units) | revisit pixels | "
              + " | ".join(names) + " |", "|---" * (len(names) + 4) + "|"]
    for row in sweep["rows"]:
        cells = ["-" if row["revisit_psnr"][n] is None else f"{row['revisit_psnr'][n]:g}" for n in names]
        lines.append(f"| {_sweep_label(row)} | {row['nearest_history_offset_deg']:g} | "
                     f"{row.get('nearest_history_distance', 0.0):g} | {row['revisit_pixels']} | " + " | ".join(cells)
                     + " |")
    lines += ["", "Per world (the same worlds and rollout seeds in every case): revisit PSNR median [min, max]:", "",
              "| revisit | " + " | ".join(names[1:]) + " |", "|---" * len(names) + "|"]
    for row in sweep["rows"]:
        cells = []
        for n in names[1:]:
            v = [x for x in row["per_world_revisit_psnr"].get(n, []) if x is not None]
            cells.append(f"{statistics.median(v):g} [{min(v):g}, {max(v):g}]" if v else "-")
        lines.append(f"| {_sweep_label(row)} | " + " | ".join(cells) + " |")
    lines += ["", "Configurations: " + "; ".join(f"`{n}`: {SWEEP_WHAT[n]}" for n in names if n in SWEEP_WHAT) + ".",
              "", f"Plot: {plot}."]
    (out / "offset_sweep.md").write_text("\n".join(lines) + "\n")


SWEEP_WHAT = {
    "oracle": "the world wherever the history saw it (a check of the metric)",
    "copy_nearest": "the history frame of highest view overlap, unshifted (no learning)",
    "all": "query model, all history as context",
    "fov": f"query model, the {BUDGET} history frames of highest view overlap",
    "query_no_context": "query model's weights, query layers off (no context)",
    "no_memory": "plain model trained alike",
    "all_10k": "query run resumed to 10,000 steps, all history",
    "all_new_viewpoints": "all_10k fine-tuned 3,000 steps on new-viewpoint returns, camera as before, all history",
    "all_view_rope": "all_10k fine-tuned 3,000 steps on new-viewpoint returns with view-aligned RoPE, all history",
    "view_rope_no_context": "all_view_rope's weights, query layers off (no context)",
    "all_view_rope_scratch": "query run's recipe from scratch (5,000 steps) on new-viewpoint returns with "
                             "view-aligned RoPE, all history",
}


def _sweep_plot(out: Path, sweep: dict) -> str:
    """``offset_sweep.png``: revisit PSNR against the offset, a line per configuration; what was written, or why
    not."""
    try:
        import matplotlib
    except ImportError:
        return "not drawn: matplotlib is not installed"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yaw = [r for r in sweep["rows"] if r.get("kind", "yaw") == "yaw"]
    sideways = [r for r in sweep["rows"] if r.get("kind") == "position"]
    fig, axes = plt.subplots(1, 2 if sideways else 1, figsize=(11 if sideways else 7, 4.5), squeeze=False)
    styles = ["-o", "--s", "-.^", ":v", "-D", "--x", "-P", ":*", "-.h"]
    panels = [(axes[0, 0], yaw, "offset_deg", "yaw offset of the revisit from the nearest history pose (degrees)")]
    if sideways:
        panels.append((axes[0, 1], sideways, "shift", "sideways shift of the revisit from the history's poses (units)"))
    for ax, rows, key, label in panels:
        xs = [r[key] for r in rows]
        for i, name in enumerate(sweep["configurations"]):
            ys = [float("nan") if r["revisit_psnr"][name] is None else r["revisit_psnr"][name] for r in rows]
            if name == "oracle":
                ax.plot(xs, ys, color="grey", ls="--", lw=1, label="oracle (the cap)")
            else:
                ax.plot(xs, ys, styles[i % len(styles)], label=name, markersize=5)
        ax.set_xlabel(label)
        ax.set_ylabel("revisit PSNR (dB, latent space)")
    ax = axes[0, 0]
    if rw.BETWEEN_OFFSET in [r["offset_deg"] for r in yaw]:
        ax.axvline(rw.BETWEEN_OFFSET, color="grey", lw=0.8, ls=":")
        ax.annotate("between two\nhistory poses", (rw.BETWEEN_OFFSET, 0.5), xycoords=("data", "axes fraction"),
                    ha="right", va="center", fontsize=8, color="grey")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "offset_sweep.png", dpi=100)
    plt.close(fig)
    return "offset_sweep.png"


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

def _m(c: dict, name: str, metric: str) -> float:
    """``c[name][metric]``; a KeyError when the configuration or its figure is missing (the target is then not
    measured)."""
    v = c[name][metric]
    if v is None:
        raise KeyError(f"{name}.{metric}")
    return v


TARGETS = (
    ("all >= recent + 6 dB on revisits", lambda c: _m(c, "all", "revisit_psnr") >= _m(c, "recent", "revisit_psnr") + 6),
    ("all >= no_memory + 6 dB on revisits",
     lambda c: _m(c, "all", "revisit_psnr") >= _m(c, "no_memory", "revisit_psnr") + 6),
    ("all >= no_memory - 0.5 dB on new places",
     lambda c: _m(c, "all", "new_psnr") >= _m(c, "no_memory", "new_psnr") - 0.5),
    ("occluder: all > fov", lambda c: _m(c, "all", "occluder_revisit_psnr") > _m(c, "fov", "occluder_revisit_psnr")),
    ("moving object: all > fov", lambda c: _m(c, "all", "moving_object_psnr") > _m(c, "fov", "moving_object_psnr")),
    ("moving object: all > recent",
     lambda c: _m(c, "all", "moving_object_psnr") > _m(c, "recent", "moving_object_psnr")),
    ("oracle highest on revisits", lambda c: _m(c, "oracle", "revisit_psnr") >= max(
        v["revisit_psnr"] for v in c.values() if v["revisit_psnr"] is not None)),
)


def check_targets(results: dict) -> dict:
    """Each target -> True (met), False (missed) or None (not measured: a configuration it compares is missing)."""
    out = {}
    for name, check in TARGETS:
        try:
            out[name] = bool(check(results))
        except KeyError:
            out[name] = None
    return out


def write_results(out: Path, results: dict, examples: dict, wa, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    targets = check_targets(results)
    doc = {**meta, "configurations": results, "targets": targets}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    cols = ("revisit_psnr", "new_psnr", "occluder_revisit_psnr", "moving_object_psnr", "step_cost_x_plain")
    lines = [f"# Revisit world: {meta['command']}", "",
             f"{meta['date']}, commit {meta['commit']}, {meta['machine']}; {meta['worlds']} held-out worlds, "
             f"PSNR = 10 log10(1/MSE) in latent space, capped at {rw.PSNR_CAP:g} dB; step cost relative to "
             f"{meta.get('step_cost_reference') or 'no plain model (none evaluated)'}.", ""]
    lines += _model_lines(meta)
    lines += ["| configuration | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join("-" if row[c] is None else f"{row[c]:g}" for c in cols) + " |")
    said = {True: "yes", False: "NO", None: "not measured"}
    lines += ["", "| target | met |", "|---|---|"] + [f"| {k} | {said[v]} |" for k, v in targets.items()]
    if meta["training"]:
        lines += ["", "Training (memlearner-train, " + meta["training_note"] + "):", ""]
        lines += [f"- {k}: {v['seconds']:.0f} s; {v['result']}" for k, v in meta["training"].items()]
    else:
        lines += ["", "Training: none in this work folder (no training.json)."]
    shipped = [k for k, v in meta.get("models", {}).items() if v.startswith("shipped") and k not in meta["training"]]
    lines += [""] * (bool(shipped) and not meta["training"])
    lines += [f"- {k}: not trained here; {meta['models'][k].removeprefix('shipped: ')}" for k in shipped]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(out, results)
    _video(out, examples, wa)


def _model_lines(meta: dict) -> list[str]:
    """Markdown: the weights each model came from, and the configurations skipped for want of weights."""
    lines = [f"- model `{k}`: {v}" for k, v in meta.get("models", {}).items()]
    if meta.get("skipped"):
        lines += ["", "Skipped (their weights are not present):", ""]
        lines += [f"- `{k}`: {v}" for k, v in meta["skipped"].items()]
    return lines + [""] if lines else []


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
    an animated GIF and a PNG sheet (a row per frame). Without the plain model, the query model with no context
    stands for no memory; a configuration not evaluated is left out."""
    from PIL import Image

    factors, bias = wa.wan21_preview_factors()
    plain = next((p for p in ("no_memory", "query_no_context") if p in examples), None)
    panels = [p for p in ("ground_truth", plain, "recent", "all") if p in examples]
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
    """The short HEAD commit, with ``+modified`` when the working tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PACK, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PACK,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+modified" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["data", "train", "train-longer", "train-viewpoints", "train-budget", "eval",
                                      "offset-sweep", "all", "ship"])
    ap.add_argument("--model", default=SHIPPED_MODEL, choices=[*MODELS, LONGER, *VIEWPOINT_MODELS, *BUDGET_MODELS],
                    help="ship: the work folder's model to ship as the toy model")
    ap.add_argument("--work", type=Path, default=WORK, help="data, runs and models (not committed)")
    ap.add_argument("--out", type=Path, default=OUT, help="results.json, results.md, plots, video")
    ap.add_argument("--sweep-out", type=Path, default=SWEEP_OUT, help="offset_sweep.json, .md, .png")
    ap.add_argument("--clips", type=int, default=2000, help="training clips (one world each)")
    ap.add_argument("--worlds", type=int, default=None, help=f"held-out worlds (default 6; offset-sweep "
                                                               f"{SWEEP_WORLDS})")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the configs')")
    ap.add_argument("--parallel", type=int, default=2, help="trainings at once")
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 clips, 3 steps, 1 world")
    args = ap.parse_args(argv)
    if args.quick:
        args.clips, args.steps, args.worlds = 16, 3, 1
    worlds = args.worlds or (SWEEP_WORLDS if args.stage == "offset-sweep" else 6)
    args.work.mkdir(parents=True, exist_ok=True)
    n_frames = load_config(CONFIGS / "query.toml").latent_frames
    if args.stage in ("data", "all"):
        make_data(args.work, args.clips, n_frames)
    if args.stage in ("train", "all"):
        train_all(args.work, args.steps, args.parallel)
    if args.stage == "train-longer":
        train_longer(args.work, args.steps)
    if args.stage in ("train-viewpoints", "all"):
        train_all(args.work, args.steps, args.parallel, viewpoint_models(args.work, args.stage == "all"))
    if args.stage == "train-budget":  # fine-tunes of the shipped toy model (benchmarks/long_rollout.py reads them)
        train_all(args.work, args.steps, args.parallel, BUDGET_MODELS)
    if args.stage in ("eval", "all"):
        results, examples, wa, info = evaluate(args.work, worlds, 2 if args.quick else STEPS)
        record = args.work / "training.json"
        training = json.loads(record.read_text()) if record.exists() else {}
        steps = args.steps or load_config(CONFIGS / "query.toml").steps
        meta = {**run_meta("revisit_world.py", argv), "worlds": worlds, "clips": args.clips, "training_steps": steps,
                "training": training, **info,
                "training_note": f"{args.clips} clips, {steps} steps each, batch 4, CPU, one thread per run"}
        write_results(args.out, results, examples, wa, meta)
        print((args.out / "results.md").read_text())
        _say_skipped(info["skipped"])
    if args.stage == "ship":
        ship(args.work, args.model)
    if args.stage == "offset-sweep":
        steps = 2 if args.quick else STEPS
        sweep = offset_sweep(args.work, worlds, steps)
        write_sweep(args.sweep_out, sweep, {**run_meta("revisit_world.py", argv), "worlds": worlds, "steps": steps})
        print((args.sweep_out / "offset_sweep.md").read_text())
        _say_skipped(sweep["skipped"])
    return 0


def _say_skipped(skipped: dict) -> None:
    if skipped:
        print(f"[revisit] skipped {len(skipped)} configuration(s), their weights not present: "
              + "; ".join(f"{k} ({v})" for k, v in skipped.items()), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
