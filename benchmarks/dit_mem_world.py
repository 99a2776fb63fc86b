"""Does a memory encoder trained with this pack help where query memory cannot? DiT-Mem on world families.

The revisit world (``memlearner_core.revisit_world``) in families: each family has its own palette (a mean colour
and a mixing of the 16 channels) and texture scale, every world is a fresh panorama of one family. A place never
seen cannot be remembered, so query memory cannot predict it; but videos of other worlds of the same family show
what such places look like: DiT-Mem's reference videos.

Models (ComfyUI's ``WanModel``, dim 256, 4 blocks), all trained with ``memlearner-train`` on the same clips of 8
families mixed (configs in ``benchmarks/dit_mem/``), all continuing from the shipped toy model
(``memlearner_host/revisit_model``):
- ``backbone``: a plain Wan2.1 (no query memory), then frozen;
- ``encoder``: the DiT-Mem encoder recipe against the frozen backbone; a clip's references are 3 other clips of
  its family (drawn each step from up to 100);
- ``query_backbone``: query memory (2 query layers) fine-tuned on the families;
- ``encoder_query``: the encoder recipe against the frozen query backbone run with its query memory.

Evaluated on held-out worlds (one family each, in turn) through the nodes in a real ComfyUI (Load Memory Encoder,
Encode Reference Video, Apply Reference Memory, Memory Rollout), on the revisit world's ``pan_and_return`` and
``walk_and_revisit`` paths (4 frames given, 12 generated in chunks of 2 latent frames, 10 euler steps, cfg 1). The
references are 3 training clips of the world's family (the memory bank's role), never of the world itself.

Configurations: ``no_memory`` (backbone alone), ``dit_mem_trained`` (backbone + trained encoder, references of
the family), ``dit_mem_random`` (an untrained encoder, same references), ``dit_mem_wrong_family`` (trained
encoder, references of another family), ``query`` (query backbone, all history), ``both`` (query backbone, all
history, + its encoder), ``family_mean`` (the family's mean colour everywhere: the best a prior alone can do
under squared error) and ``oracle`` (the revisit world's: the world where the history saw it, 0 elsewhere).

Metrics as the revisit world's, PSNR = 10 log10(1 / MSE) in latent space: ``new_psnr`` on never-seen places,
``revisit_psnr`` on revisited ones.

    python benchmarks/dit_mem_world.py all      # data, training (2 at once, one thread each), evaluation
    python benchmarks/dit_mem_world.py eval     # evaluation only, on the trained models in the work folder
    python benchmarks/dit_mem_world.py all --quick --work /tmp/dm --out /tmp/dm/out   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK))
sys.path.insert(0, str(PACK / "benchmarks"))

import revisit_world as rwb  # noqa: E402
import torch  # noqa: E402

from memlearner_core import revisit_world as rw  # noqa: E402
from memlearner_core.training.config import load_config  # noqa: E402
from memlearner_core.training.dataset import write_latent_clip  # noqa: E402

CONFIGS = PACK / "benchmarks" / "dit_mem"
WORK = PACK / "benchmarks" / "results" / "tmp" / "dit_mem"
OUT = PACK / "benchmarks" / "results" / "dit_mem"
TOY = PACK / "memlearner_host" / "revisit_model"
FAMILIES = 8
FAMILY_SEED, TRAIN_SEED, EVAL_SEED = 500, 1_000_000, 20_000_000
REFERENCES = 3
PATHS = ("pan_and_return", "walk_and_revisit")
PREFIX = "dit_mem"
BACKBONES = ("backbone", "query_backbone")
ENCODERS = ("encoder", "encoder_query")
RANDOM_ENCODER = f"{PREFIX}_random_encoder.safetensors"  # the trained encoders' starting point
# The DiT-Mem encoder's structure (two FFT-filtered conv branches, a shared self-attention) at toy scale: the
# released widths (512, 768 channels, 100 tokens per video) cost 14x more per step on a CPU for 8x8 latents.
ENCODER = {"hidden_channels": (64, 128), "tokens_per_video": 4}
# configuration -> (model, encoder or None, reference family offset, query memory)
CONFIGURATIONS = {
    "no_memory": ("backbone", None, 0, False),
    "dit_mem_trained": ("backbone", f"{PREFIX}_encoder.safetensors", 0, False),
    "dit_mem_random": ("backbone", RANDOM_ENCODER, 0, False),
    "dit_mem_wrong_family": ("backbone", f"{PREFIX}_encoder.safetensors", 1, False),
    "query": ("query_backbone", None, 0, True),
    "both": ("query_backbone", f"{PREFIX}_encoder_query.safetensors", 0, True),
}


def families() -> list[rw.Family]:
    return [rw.make_family(FAMILY_SEED + f) for f in range(FAMILIES)]


def caption(family: int) -> str:
    return f"world family {family}"


def training_clip(seed: int, family: rw.Family, n_frames: int) -> torch.Tensor:
    """A training world of ``family`` and a random path through it (a quarter with a wall, a quarter with a moving
    block, as the revisit world's): latent ``[16, n_frames, 8, 8]`` (model space) and poses."""
    g = torch.Generator().manual_seed(seed)
    poses = rw.random_trajectory(n_frames, g)
    occluder, moving = bool(torch.rand((), generator=g) < 0.25), bool(torch.rand((), generator=g) < 0.25)
    first = int(torch.randint(0, n_frames - 1, (), generator=g))
    last = int(torch.randint(first, n_frames, (), generator=g))
    world = rw.make_world(seed, occluder=occluder, moving_object=moving, occluded_frames=(first, last),
                          family=family)
    return rw.render(world, poses, rwb.LATENT, rwb.LATENT).latent, poses


def make_data(work: Path, clips_per_family: int, n_frames: int) -> None:
    """Clips of every family (captioned with the family's name), and the untrained encoder both encoder runs
    start from."""
    from memlearner_core.checkpoint_io import save_memory_encoder
    from memlearner_core.memory_encoder import EncoderConfig, MemoryEncoder

    _, server = rwb.boot(work)
    wa = server.pack("nodes.comfy_adapter")
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    began = time.time()
    for f, fam in enumerate(families()):
        for i in range(clips_per_family):
            path = data / f"family{f}_clip{i:05d}.safetensors"
            if not path.exists():
                latent, poses = training_clip(TRAIN_SEED + f * 100_000 + i, fam, n_frames)
                write_latent_clip(path, wa.wan21_latent_out(latent), poses, caption=caption(f))
    cfg = load_config(CONFIGS / "encoder.toml")
    torch.manual_seed(0)
    enc = MemoryEncoder(EncoderConfig(width=256, latent_shape=cfg.reference_latent_shape, **ENCODER))
    (work / "models" / "memory_encoders").mkdir(parents=True, exist_ok=True)
    save_memory_encoder(enc, work / "models" / "memory_encoders" / RANDOM_ENCODER)
    print(f"[dit_mem] {FAMILIES} x {clips_per_family} clips in {data} ({time.time() - began:.0f}s)", flush=True)


def config_paths(work: Path):
    """Each config's paths in the work folder: its run folder, the data, and where its model comes from."""
    models = work / "models"

    def paths(name: str) -> dict:
        out = {"data_dir": work / "data", "output_dir": work / "runs" / name}
        if name in BACKBONES:
            out["model_file"] = TOY / "diffusion_models" / "revisit_query.safetensors"
        if name == "query_backbone":
            out["query_file"] = TOY / "memlearner" / "revisit_query_query.safetensors"
        if name in ENCODERS:
            out["encoder_file"] = models / "memory_encoders" / RANDOM_ENCODER
            backbone = "backbone" if name == "encoder" else "query_backbone"
            out["model_file"] = models / "diffusion_models" / f"{PREFIX}_{backbone}.safetensors"
            if name == "encoder_query":
                out["query_file"] = models / "memlearner" / f"{PREFIX}_{backbone}_query.safetensors"
        return out

    return paths


def train(work: Path, steps: int | None, parallel: int) -> None:
    """The backbones, then the encoders against them; a run whose export is already there is skipped, so an
    interrupted stage picks up where it stopped."""
    paths = config_paths(work)
    for group in (BACKBONES, ENCODERS):
        todo = [n for n in group if not (work / "runs" / n / "export").is_dir()]
        if todo:
            rwb.train_all(work, steps, parallel, todo, CONFIGS, paths, PREFIX)


def references(nodes, server, wa, encoder_name: str, family: int, clips_per_family: int, work: Path, seed: int):
    """A MEMORY from ``REFERENCES`` training clips of ``family`` (picked by ``seed``) through the nodes."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(clips_per_family, generator=g)[:REFERENCES].tolist()
    clips = [load_file(str(work / "data" / f"family{family}_clip{i:05d}.safetensors"))["latent"] for i in picks]
    run = server.run_node
    enc = run(nodes.NODE_CLASS_MAPPINGS["MemLearnerLoadMemoryEncoder"], encoder_name=encoder_name, dtype="fp32")[0]
    return run(nodes.NODE_CLASS_MAPPINGS["MemLearnerEncodeReferenceVideo"], memory_encoder=enc,
               latent={"samples": torch.stack(clips)}, deduplicate=True)[0]


def evaluate(work: Path, worlds: int, clips_per_family: int, steps: int) -> tuple[dict, dict, object]:
    """Every configuration on ``worlds`` held-out worlds x ``PATHS``: PSNR per configuration and metric, the
    first pan's rollouts (for the video) and the adapter."""
    nodes, server = rwb.boot(work)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    wa = server.pack("nodes.comfy_adapter")
    rollout = nodes.NODE_CLASS_MAPPINGS["MemLearnerMemoryRollout"]
    apply = nodes.NODE_CLASS_MAPPINGS["MemLearnerApplyReferenceMemory"]
    models = {name: server.run_node(nodes.NODE_CLASS_MAPPINGS["UNETLoader"],
                                    unet_name=f"{PREFIX}_{name}.safetensors", weight_dtype="default")[0]
              for name in BACKBONES}
    fams = families()
    sums: dict = {}
    examples = {}
    began = time.time()
    for wi in range(worlds):
        f = wi % FAMILIES
        print(f"[dit_mem] evaluating world {wi + 1} of {worlds}, family {f} ({time.time() - began:.0f}s)", flush=True)
        for path in PATHS:
            case = rw.evaluation_case(path, EVAL_SEED + wi, rwb.LATENT, rwb.LATENT, family=fams[f])
            preds = {"oracle": rw.oracle_prediction(case), "family_mean": rw.family_mean_prediction(case, fams[f])}
            for cname, (mname, encoder, offset, query) in CONFIGURATIONS.items():
                model = models[mname]
                if encoder is not None:
                    memory = references(nodes, server, wa, encoder, (f + offset) % FAMILIES, clips_per_family,
                                        work, seed=wi)
                    model = server.run_node(apply, model=model, memory=memory)[0]
                latent, _ = rwb.rollout_case(
                    server, rollout, model, case, wi, steps, "all", 0, rwb.QUERY_LAYERS if query else 0,
                    f"{PREFIX}_{mname}_query.safetensors" if query else "none", 1, wa)
                preds[cname] = wa.wan21_latent_in(latent["samples"][0].float())[:, case.history:]
            if path == "pan_and_return" and wi == 0:
                examples = rwb.whole_videos(preds, case)
            rwb.add_errors(sums, preds, case, wi, {"revisit_psnr": case.labels["revisit"],
                                                   "new_psnr": case.labels["new"]})
            for cname, pred in preds.items():
                _family_diagnosis(sums[cname], pred, case, fams[f])
    results = {}
    for cname, metrics in sums.items():
        results[cname] = {m: rw.psnr(*metrics[m]) for m in ("new_psnr", "revisit_psnr")}
        results[cname]["by_path_psnr"] = {m: rw.psnr(*v) for m, v in metrics.items() if "@" in m}
        for key in ("new_family_bias", "new_spread"):
            total, count = metrics[key]
            results[cname][key] = round(total / count, 3)
    return results, examples, wa


def _family_diagnosis(sums: dict, pred: torch.Tensor, case: rw.RevisitCase, family: rw.Family) -> None:
    """Where new-place error comes from, per channel in model space: ``new_family_bias``, the squared distance of
    the prediction's average colour over the new places from the family's mean (wrong family look), and
    ``new_spread``, the predictions' mean squared distance from their own average (sampling spread; a world's own
    content varies by ``within_std^2`` = 0.49 about the family mean). The error against the truth is about
    bias + spread + 0.49 when the content drawn is independent of the world's."""
    new = case.labels["new"]
    if not new.any():
        return
    values = pred.float()[:, new]  # [16, n]
    average = values.mean(1)
    for key, value in (("new_family_bias", float((average - family.mean).pow(2).mean())),
                       ("new_spread", float((values - average[:, None]).pow(2).mean()))):
        s = sums.setdefault(key, [0.0, 0])
        s[0] += value
        s[1] += 1


TARGETS = (
    ("dit_mem_trained >= no_memory + 2 dB on new places",
     lambda c: c["dit_mem_trained"]["new_psnr"] >= c["no_memory"]["new_psnr"] + 2),
    ("dit_mem_trained > dit_mem_random on new places",
     lambda c: c["dit_mem_trained"]["new_psnr"] > c["dit_mem_random"]["new_psnr"]),
    ("dit_mem_trained > dit_mem_wrong_family on new places",
     lambda c: c["dit_mem_trained"]["new_psnr"] > c["dit_mem_wrong_family"]["new_psnr"]),
    ("both keeps query memory's revisit PSNR (within 0.5 dB of query)",
     lambda c: c["both"]["revisit_psnr"] >= c["query"]["revisit_psnr"] - 0.5),
    ("both keeps DiT-Mem's new-place PSNR (within 0.5 dB of dit_mem_trained)",
     lambda c: c["both"]["new_psnr"] >= c["dit_mem_trained"]["new_psnr"] - 0.5),
)


def write_results(out: Path, results: dict, examples: dict, wa, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    targets = {name: bool(check(results)) for name, check in TARGETS}
    (out / "results.json").write_text(json.dumps({**meta, "configurations": results, "targets": targets},
                                                 indent=1) + "\n")
    lines = [f"# DiT-Mem on world families: {meta['command']}", "",
             f"{meta['date']}, commit {meta['commit']}, {meta['machine']}; {meta['worlds']} held-out worlds "
             f"({FAMILIES} families), PSNR = 10 log10(1/MSE) in latent space, capped at {rw.PSNR_CAP:g} dB.", "",
             "| configuration | new_psnr | revisit_psnr | new_family_bias | new_spread |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['new_psnr']:g} | {v['revisit_psnr']:g} | {v['new_family_bias']:g} | {v['new_spread']:g} |"
              for k, v in results.items()]
    lines += ["", "| target | met |", "|---|---|"] + [f"| {k} | {'yes' if v else 'NO'} |" for k, v in targets.items()]
    lines += ["", "Training (memlearner-train, " + meta["training_note"] + "):", ""]
    lines += [f"- {k}: {v['seconds']:.0f} s; {v['result']}" for k, v in meta["training"].items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _video(out, examples, wa)


def _video(out: Path, examples: dict, wa) -> None:
    """ground truth | no memory | DiT-Mem trained | DiT-Mem, wrong family | both, per frame: a PNG sheet."""

    factors, bias = wa.wan21_preview_factors()
    panels = ["ground_truth", "no_memory", "dit_mem_trained", "dit_mem_wrong_family", "both"]
    rwb.save_sheet(rw.side_by_side([examples[p] for p in panels], factors, bias), out / "dit_mem_side_by_side.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["data", "train", "eval", "all"])
    ap.add_argument("--work", type=Path, default=WORK, help="data, runs and models (not committed)")
    ap.add_argument("--out", type=Path, default=OUT, help="results.json, results.md, side-by-side sheet")
    ap.add_argument("--clips", type=int, default=150, help="training clips per family (one world each)")
    ap.add_argument("--worlds", type=int, default=8, help="held-out worlds (one family each, in turn)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the configs')")
    ap.add_argument("--parallel", type=int, default=2, help="trainings at once")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 clips per family, 3 steps, 2 worlds")
    args = ap.parse_args(argv)
    if args.quick:
        args.clips, args.steps, args.worlds = 8, 3, 2
    args.work.mkdir(parents=True, exist_ok=True)
    n_frames = load_config(CONFIGS / "backbone.toml").latent_frames
    if args.stage in ("data", "all"):
        make_data(args.work, args.clips, n_frames)
    if args.stage in ("train", "all"):
        train(args.work, args.steps, args.parallel)
    if args.stage in ("eval", "all"):
        results, examples, wa = evaluate(args.work, args.worlds, args.clips, 2 if args.quick else rwb.STEPS)
        training = json.loads((args.work / "training.json").read_text())
        steps = args.steps or load_config(CONFIGS / "encoder.toml").steps
        meta = {**rwb.run_meta("dit_mem_world.py", argv), "worlds": args.worlds, "clips_per_family": args.clips, "families": FAMILIES, "training": training,
                "training_note": f"{FAMILIES} x {args.clips} clips, {steps} steps each, batch 4, CPU, one thread "
                                 "per run"}
        write_results(args.out, results, examples, wa, meta)
        print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
