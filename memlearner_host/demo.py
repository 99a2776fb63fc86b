"""The main job (``bash scripts/run.sh``): start ComfyUI with the pack and run the shipped memory workflows headless.

1. ``both_memories`` on the real Wan2.1 T2V 1.3B files when they are in ComfyUI's models folders (see README),
   otherwise on the tiny random-weight fixtures, so the whole path runs on any machine;
2. ``revisit_world`` on the toy model trained on the revisit world (shipped in ``revisit_model/``): memory that
   remembers, measured against ground truth, in seconds on a CPU.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

from memlearner_host import tiny_models
from memlearner_host.server import ROOT, ComfyServer, comfy_path, prepare_imports, use_gpu, write_extra_paths


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


def saved_files(server: ComfyServer, entry: dict) -> list[Path]:
    return [server.output_dir / v["subfolder"] / v["filename"]
            for out in entry["outputs"].values() for v in out.get("images", [])]


def revisit_reports(graph: dict, entry: dict) -> dict[str, dict]:
    """The Revisit Score reports of a finished ``revisit_world`` run, by policy."""
    reports = {}
    for nid, out in entry["outputs"].items():
        title = graph[nid].get("_meta", {}).get("title", "")
        if title.startswith("Revisit Score (") and out.get("text"):
            reports[title[len("Revisit Score ("):-1]] = json.loads(out["text"][0])
    return reports


def run_demo(workdir: Path | None = None, timeout: float = 3600, tiny: bool | None = None) -> list[Path]:
    """Run ``workflows/api/both_memories.json`` and ``revisit_world.json`` on a fresh ComfyUI server (always
    stopped); returns the saved videos. ``tiny``: None picks the real weights when present, else the tiny
    fixtures."""
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
              f"{' (tiny fixtures)' if tiny else ''}")
        t0 = time.time()
        files = saved_files(server, server.run_prompt(build.both_memories(tiny=tiny), timeout=timeout))
        print(f"[demo] done in {time.time() - t0:.1f}s")
        print("[demo] running workflows/api/revisit_world.json (the toy model trained on the revisit world)")
        t0 = time.time()
        graph = build.revisit_world()
        entry = server.run_prompt(graph, timeout=timeout)
        print(f"[demo] done in {time.time() - t0:.1f}s; a held-out world, the camera turns 180 degrees and back:")
        for policy, r in revisit_reports(graph, entry).items():
            print(f"[demo]   {policy:>6}: PSNR {r['revisit_psnr']} dB on revisited places, {r['new_psnr']} dB on new "
                  f"ones (0 dB = guessing the mean)")
        return files + saved_files(server, entry)
    finally:
        server.stop()
        print(f"[demo] server log: {server.log_path}")


def main() -> int:
    files = run_demo()
    print("[demo] output files:")
    for f in files:
        print(f"[demo]   {f}")
    return 0 if files else 1


if __name__ == "__main__":
    raise SystemExit(main())
