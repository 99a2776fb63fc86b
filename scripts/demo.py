"""The main job: start ComfyUI with the pack and run the shipped memory workflow headless.

Uses the real Wan2.1 T2V 1.3B files when they are in ComfyUI's models folders (see README), otherwise the tiny
random-weight fixtures, so the whole path runs on any machine. Prints where the videos went.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "workflows")]

import build  # noqa: E402
import host  # noqa: E402


def real_models_present(comfy: Path) -> bool:
    f = build.REAL
    wanted = [("diffusion_models", f["unet"]), ("text_encoders", f["clip"]), ("vae", f["vae"]),
              ("memory_encoders", f["encoder"])]
    return all((comfy / "models" / folder / name).is_file() for folder, name in wanted)


def main() -> int:
    comfy = host.comfy_path()
    workdir = ROOT / "output" / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    tiny = not real_models_present(comfy)
    extra = None
    if tiny:
        print("[demo] no real Wan2.1 weights in ComfyUI's models folder: using the tiny random-weight fixtures")
        host.prepare_imports()
        import tiny_models

        models = ROOT / ".host" / "demo_models"
        if not (models / "diffusion_models" / tiny_models.WAN_FILE).is_file():
            tiny_models.write_models(models)
        extra = host.write_extra_paths(models, workdir / "extra_model_paths.yaml")
    import torch

    server = host.ComfyServer(workdir, extra, cpu=not torch.cuda.is_available())
    try:
        server.wait_ready()
        print(f"[demo] ComfyUI {server.url} is up; running workflows/api/both_memories.json"
              f"{' (tiny fixtures)' if tiny else ''}")
        t0 = time.time()
        entry = server.run_prompt(build.both_memories(tiny=tiny), timeout=3600)
        files = [server.output_dir / img["subfolder"] / img["filename"]
                 for out in entry["outputs"].values() for img in out.get("images", [])]
        print(f"[demo] done in {time.time() - t0:.1f}s:")
        for f in files:
            print(f"[demo]   {f}")
        print(f"[demo] server log: {server.log_path}")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
