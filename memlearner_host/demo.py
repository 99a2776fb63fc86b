"""The main job (``bash scripts/run.sh``): start ComfyUI with the pack and run the shipped memory workflows headless.

1. ``both_memories`` on the real Wan2.1 T2V 1.3B files when they are in ComfyUI's models folders (see README),
   otherwise on the tiny random-weight fixtures, so the whole path runs on any machine;
2. ``revisit_world`` on the toy model trained on the revisit world (shipped in ``revisit_model/``): memory that
   remembers, measured against ground truth, in seconds on a CPU. The demo adds a third rollout with memory off
   (``query_layers`` 0) and saves the three rollouts' latents, and draws them (``contact_sheet``) as one labelled
   side-by-side video and a PNG sheet, ground truth | no memory | window | all history, revisit frames marked;
3. ``doom_return`` on the small model trained on ViZDoom renders (shipped in ``doom_model/``): a held-out map's
   clip re-rendered with memory on and off, in RGB, scored against the video (``doom_demo``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

from memlearner_host import doom_demo, tiny_models
from memlearner_host.server import ROOT, ComfyServer, comfy_path, prepare_imports, use_gpu, write_extra_paths

DOOM_TURN = "210 degrees"  # doom_clips.evaluation_path("turn"): 29 frames at 7.5 degrees


def workflows():
    """``workflows/build.py``, the source of the shipped graphs (a script, not a package)."""
    name = "memlearner_workflows_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "workflows" / "build.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def real_models_present(models_dir: Path) -> bool:
    """Whether a ComfyUI models folder holds the real files of the demo workflow."""
    f = workflows().REAL
    wanted = [("diffusion_models", f["unet"]), ("text_encoders", f["clip"]), ("vae", f["vae"]),
              ("memory_encoders", f["encoder"])]
    return all((models_dir / folder / name).is_file() for folder, name in wanted)


def tiny_extra_paths(workdir: Path) -> Path:
    """The tiny fixtures and the toy revisit-world model under ``workdir/tiny_models`` (written once) and the
    extra_model_paths.yaml for them."""
    models = workdir / "tiny_models"
    if not all(p.is_file() for p in tiny_models.model_paths(models).values()):
        prepare_imports()  # the fixtures are built from ComfyUI's model classes
        tiny_models.write_models(models)
    tiny_models.copy_toy_model(models)
    return write_extra_paths(models, workdir / "extra_model_paths.yaml", [tiny_models.TINY_NODES])


def saved_files(server: ComfyServer, entry: dict, kind: str = "images") -> list[Path]:
    return [server.output_dir / v["subfolder"] / v["filename"]
            for out in entry["outputs"].values() for v in out.get(kind, [])]


NO_MEMORY = "none"  # the demo's extra rollout: the same model and seed, query memory off
POLICIES = (NO_MEMORY, "recent", "all")  # the columns after the ground truth
POLICY_NAMES = {NO_MEMORY: "no memory", "recent": "window", "all": "all history"}


def with_comparison(graph: dict) -> dict:
    """``revisit_world`` plus what the side-by-side needs: a third rollout that reads no memory (``query_layers``
    0: chunks do not see the given frames or each other) with its Revisit Score, and Save Latent of each rollout."""
    build = workflows()
    g = copy.deepcopy(graph)
    g[f"rollout_{NO_MEMORY}"] = copy.deepcopy(g["rollout_all"])
    g[f"rollout_{NO_MEMORY}"]["inputs"].update(query_layers=0, query_weights="none")
    g[f"rollout_{NO_MEMORY}"]["_meta"] = {"title": f"Memory Rollout ({NO_MEMORY})"}
    g[f"score_{NO_MEMORY}"] = build.node("MemLearnerRevisitScore", f"Revisit Score ({NO_MEMORY})", world=["world", 0],
                                         latent=[f"rollout_{NO_MEMORY}", 0])
    for policy in POLICIES:
        g[f"latent_{policy}"] = build.node("SaveLatent", f"Save latent ({policy})", samples=[f"rollout_{policy}", 0],
                                           filename_prefix=f"memlearner/latents/revisit_{policy}")
    return g


def comparison(graph: dict, latents: dict[str, Path]):
    """The rollouts of a finished ``with_comparison`` run (their saved latents, in the model's space) beside the
    ground truth of its world: a ``contact_sheet.Comparison``."""
    prepare_imports()
    import comfy.latent_formats
    from safetensors.torch import load_file

    from memlearner_core import revisit_world as rw

    from . import contact_sheet

    fmt = comfy.latent_formats.Wan21()
    generated = {p: fmt.process_in(load_file(str(latents[p]))["latent_tensor"].float())[0] for p in POLICIES}
    world = graph["world"]["inputs"]
    h, w = generated["all"].shape[-2:]
    case = rw.evaluation_case(world["path"], int(world["seed"]), h, w)
    budget = graph["rollout_recent"]["inputs"]["context_frames"]
    titles = {**dict(contact_sheet.COLUMNS), "recent": f"window (last {budget})"}
    return case, contact_sheet.Comparison(case.truth, generated, case.history, contact_sheet.revisit_frames(case),
                                          titles)


def frame_ranges(frames: list[int]) -> str:
    """``[4, 5, 6, 9]`` -> ``4-6, 9``."""
    runs: list[list[int]] = []
    for t in frames:
        if runs and t == runs[-1][-1] + 1:
            runs[-1].append(t)
        else:
            runs.append([t])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def write_comparison(server: ComfyServer, graph: dict, entry: dict, reports: dict[str, dict]) -> tuple[Path, Path, object]:
    """``output/memlearner/revisit_compare.png`` (the contact sheet) and ``revisit_compare.mp4`` (every frame,
    labelled, 4x), from the rollouts' saved latents; checked against the Revisit Score reports."""
    from . import contact_sheet

    latents = {p: next(f for f in saved_files(server, entry, "latents") if f.name.startswith(f"revisit_{p}_"))
               for p in POLICIES}
    case, comp = comparison(graph, latents)
    for policy in POLICIES:  # the drawn rollouts are the ones Revisit Score measured
        mine, theirs = comp.region_psnr(policy, case.labels["revisit"]), reports[policy]["revisit_psnr"]
        if mine is None or theirs is None or abs(mine - theirs) > 0.05:
            raise RuntimeError(f"the saved {policy} latent scores {mine} dB on revisits, Revisit Score said {theirs}")
    factors, bias = comfy_preview_factors()
    summary = {p: f"revisit {reports[p]['revisit_psnr']:.2f} dB" for p in POLICIES}
    subtitle = (f"toy revisit model (shipped), held-out world seed {case_seed(graph)}: the camera turns 180 degrees "
                f"and back over {comp.frames} frames. no memory = the same model and noise, memory off (query_layers 0).")
    folder = server.output_dir / "memlearner"
    sheet, video = folder / "revisit_compare.png", folder / "revisit_compare.mp4"
    contact_sheet.sheet(comp, factors, bias, summary=summary, subtitle=subtitle).save(sheet)
    contact_sheet.write_video(contact_sheet.video_frames(comp, factors, bias), video)
    return sheet, video, comp


def case_seed(graph: dict) -> int:
    return int(graph["world"]["inputs"]["seed"])


def comfy_preview_factors():
    """ComfyUI's Wan2.1 latent-to-RGB preview factors ``[16, 3]`` and bias ``[3]`` (as Revisit Score renders)."""
    prepare_imports()
    import comfy.latent_formats
    import torch

    fmt = comfy.latent_formats.Wan21()
    return torch.tensor(fmt.latent_rgb_factors), torch.tensor(fmt.latent_rgb_factors_bias)


def revisit_reports(graph: dict, entry: dict) -> dict[str, dict]:
    """The Revisit Score reports of a finished ``revisit_world`` run, by policy."""
    reports = {}
    for nid, out in entry["outputs"].items():
        title = graph[nid].get("_meta", {}).get("title", "")
        if title.startswith("Revisit Score (") and out.get("text"):
            reports[title[len("Revisit Score ("):-1]] = json.loads(out["text"][0])
    return reports


def benchmark_no_memory() -> str:
    """Where the benchmark's model trained without memory stands on revisits (``benchmarks/results/revisit/``)."""
    where = "benchmarks/results/revisit/results.md"
    try:
        results = json.loads((ROOT / "benchmarks" / "results" / "revisit" / "results.json").read_text())
        return (f"{results['configurations']['no_memory']['revisit_psnr']:.2f} dB on revisits over "
                f"{results['worlds']} worlds ({where})")
    except (OSError, KeyError, TypeError, ValueError):
        return f"see {where}"


def guide(sheet: Path, video: Path, comp, seed: int, reports: dict[str, dict], chunks: list[Path],
          revisit_videos: list[Path], tiny: bool) -> list[str]:
    """The printout's last block: which file to open, what its columns and marks are, what the numbers mean."""
    r = {p: reports[p]["revisit_psnr"] for p in POLICIES}
    new = {p: reports[p]["new_psnr"] for p in POLICIES}
    last = comp.history - 1
    lines = [
        "",
        "what to look at:",
        f"  open first: {sheet}",
        f"    the same as a video, every frame labelled and 4x upscaled: {video}",
        "  columns (in the video; rows in the PNG): ground truth | no memory | "
        f"{comp.titles['recent']} | all history",
        f"  frames 0-{last} are given: ground truth handed to every policy (blue, GIVEN); the rest are generated "
        "chunk by chunk while the camera turns 180 degrees and back",
        f"  revisit frames: {frame_ranges(comp.revisit)} (orange, REVISIT): every place in them was shown in frames "
        f"0-{last}: a model that remembers can redraw them, one without that memory can only guess",
        "  dB: PSNR against ground truth, 10 log10(1/MSE) in the latent space (0 dB = guessing the mean, 40 dB = an "
        "exact copy); under each frame in the PNG and video: that frame's PSNR alone",
        f"  on revisited places: no memory {r[NO_MEMORY]:.2f} dB, window {r['recent']:.2f} dB, all history "
        f"{r['all']:.2f} dB: all history gains {r['all'] - r[NO_MEMORY]:+.2f} dB over no memory and "
        f"{r['all'] - r['recent']:+.2f} dB over the window (Revisit Score, over every revisited pixel of the video)",
        f"  on new places (nothing to remember, no policy should win): no memory {new[NO_MEMORY]:.2f} dB, window "
        f"{new['recent']:.2f} dB, all history {new['all']:.2f} dB",
        "  from: the toy revisit model shipped in memlearner_host/revisit_model/ (a small Wan2.1-shaped DiT trained "
        f"with memlearner-train on the latent panorama world), on held-out world seed {seed}",
        "  no memory here = the same model and noise with memory off (query_layers 0); it was trained with memory"
        f"{' and without it lands below guessing' if r[NO_MEMORY] < 0 else ''}; a model trained without memory: "
        f"{benchmark_no_memory()}",
        "",
        "also written:",
    ]
    if tiny:
        lines.append("  plumbing check: random weights, noise expected (both_memories.json on the tiny fixtures; "
                     "it shows the workflow runs, not what it makes):")
    else:
        lines.append("  both_memories.json on Wan2.1 T2V 1.3B: the first chunk, then the next chunk reading it as "
                     "query and DiT-Mem memory:")
    lines += [f"    {f}" for f in chunks]
    lines.append("  the revisit workflow's own Save Video outputs, one per policy, 64 px: ground truth (left) | "
                 "generated (right):")
    lines += [f"    {f}" for f in revisit_videos]
    return [f"[demo] {line}" if line else "[demo]" for line in lines]


def run_demo(workdir: Path | None = None, timeout: float = 3600, tiny: bool | None = None) -> list[Path]:
    """Run ``workflows/api/both_memories.json`` and ``revisit_world.json`` (with a no-memory rollout beside it,
    ``with_comparison``) on a fresh ComfyUI server (always stopped), draw the revisit comparison and print where to
    look. Returns the files to look at: the sheet and the labelled video, then the workflows' own videos. ``tiny``:
    None picks the real weights when present, else the tiny fixtures."""
    build = workflows()
    workdir = Path(workdir) if workdir is not None else ROOT / "output" / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    if tiny is None:
        tiny = not real_models_present(comfy_path() / "models")
    if tiny:
        print("[demo] no real Wan2.1 weights in ComfyUI's models folder: using the tiny random-weight fixtures")
    extra = tiny_extra_paths(workdir)  # the tiny fixtures, and the toy revisit-world model either way
    import torch

    # On the GPU when there is one; MEMLEARNER_TEST_GPU=1 (and MEMLEARNER_TEST_VRAM) choose the flags as for tests.
    flags = None if use_gpu() or not torch.cuda.is_available() else []
    server = ComfyServer(workdir, extra, flags)
    try:
        server.wait_ready()
        print(f"[demo] ComfyUI {server.url} is up; running workflows/api/both_memories.json"
              f"{' (tiny fixtures: random weights, a plumbing check)' if tiny else ''}")
        t0 = time.time()
        chunks = saved_files(server, server.run_prompt(build.both_memories(tiny=tiny), timeout=timeout))
        print(f"[demo] done in {time.time() - t0:.1f}s")
        print("[demo] running workflows/api/revisit_world.json (the toy model trained on the revisit world), plus a "
              "rollout with memory off")
        t0 = time.time()
        graph = with_comparison(build.revisit_world())
        entry = server.run_prompt(graph, timeout=timeout)
        print(f"[demo] done in {time.time() - t0:.1f}s; a held-out world, the camera turns 180 degrees and back:")
        reports = revisit_reports(graph, entry)
        for policy in POLICIES:
            r = reports[policy]
            print(f"[demo]   {POLICY_NAMES[policy]:>12}: PSNR {r['revisit_psnr']} dB on revisited places, "
                  f"{r['new_psnr']} dB on new ones (0 dB = guessing the mean)")
        revisit_videos = saved_files(server, entry)
        sheet, video, comp = write_comparison(server, graph, entry, reports)
        print("[demo] running workflows/api/doom_return.json (the small model trained on ViZDoom renders of "
              "MAP01-20) on a held-out MAP21 clip, memory on and off")
        t0 = time.time()
        doom_reports, doom_videos = doom_demo.run(server, build, timeout)
        print(f"[demo] done in {time.time() - t0:.1f}s")
    finally:
        server.stop()
        print(f"[demo] server log: {server.log_path}")
    for line in guide(sheet, video, comp, case_seed(graph), reports, chunks, revisit_videos, tiny):
        print(line)
    for line in doom_guide(doom_reports, doom_videos):
        print(line)
    return [sheet, video, *chunks, *revisit_videos, *doom_videos]


def doom_guide(reports: dict[str, dict], videos: list[Path]) -> list[str]:
    """The Doom return's block of the printout: its figures, and where its videos are."""
    on, off = reports["all"], reports["no_memory"]
    lines = [
        "",
        "a real 3D world (ViZDoom, Freedoom 2 MAP21, held out: the model trained on MAP01-20 only):",
        f"  the camera turns {DOOM_TURN} and comes back 7 degrees off; the way out ({workflows().DOOM['history']} "
        "frames) is "
        "given, the way back is generated along the recorded camera path",
        f"  RGB PSNR against the video on revisited pixels (seen on the way out, from the render's depth): memory "
        f"on {on['revisit_psnr']:.2f} dB, memory off {off['revisit_psnr']:.2f} dB "
        f"({on['revisit_psnr'] - off['revisit_psnr']:+.2f} dB); on new pixels: {on['new_psnr']:.2f} vs "
        f"{off['new_psnr']:.2f} dB",
        f"  every generated pixel (Video Score): memory on {on['psnr']:.2f} dB SSIM {on['ssim']:.3f}, memory off "
        f"{off['psnr']:.2f} dB SSIM {off['ssim']:.3f}",
        "  memory off = the same model and noise with query_layers 0; every held-out clip, policy and baseline: "
        "benchmarks/results/doom/results.md",
        "  video | generated, side by side (memory on, then off):",
    ]
    lines += [f"    {f}" for f in videos]
    return [f"[demo] {line}" if line else "[demo]" for line in lines]


def main() -> int:
    return 0 if run_demo() else 1


if __name__ == "__main__":
    raise SystemExit(main())
