"""The main job's Doom return: a held-out ViZDoom clip re-rendered by the small model shipped in ``doom_model/``.

``workflows/api/doom_return.json`` loads the clip (MAP21, never trained on: the model saw MAP01-20 only), gives
its way out to Memory Rollout as the first chunk, and generates the way back along the clip's recorded camera path
twice: reading all history (memory on) and with the query layers off (memory off, the same weights and noise).
VAE Decode and Video Score compare both with the video; the job also scores the revisited pixels (seen in the
way out, from geometry at ship time: ``clip/*.labels.safetensors``) and writes one side-by-side video.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from memlearner_host.tiny_models import DOOM_MODEL  # diffusion_models/, memlearner/, vae/ (copied), clip/

ROLLOUTS = ("all", "no_memory")  # memory on (all history), memory off (query_layers 0)


def clip_files(video_name: str) -> dict[str, Path]:
    clip = DOOM_MODEL / "clip"
    stem = Path(video_name).stem
    return {"video": clip / video_name, "poses": clip / f"{stem}.poses.json",
            "labels": clip / f"{stem}.labels.safetensors"}


def graph(build) -> dict:
    """The shipped workflow, saving each rollout's frames losslessly too (for the revisit figure)."""
    return build.doom_return_workflow(save=("video", "webp"))


def revisit_labels(video_name: str):
    """The shipped clip's revisit and new masks ``[generated frames, H, W]`` bool (bits packed at ship time)."""
    import numpy as np
    import torch
    from safetensors import safe_open

    path = clip_files(video_name)["labels"]
    with safe_open(str(path), "pt") as f:
        shape = json.loads(f.metadata()["shape"])
        return {k: torch.from_numpy(np.unpackbits(f.get_tensor(k).numpy())[:int(np.prod(shape))]
                                    .reshape(shape).astype(bool)) for k in ("revisit", "new")}


def run(server, build, timeout: float) -> tuple[dict, list[Path]]:
    """Run the Doom return on ``server``; returns per rollout its Video Score report with ``revisit_psnr`` and
    ``new_psnr`` added, and the saved side-by-side videos."""
    from memlearner_core import image_metrics as im

    f = build.DOOM
    shutil.copy(clip_files(f["video"])["video"], server.input_dir / f["video"])
    g = graph(build)
    entry = server.run_prompt(g, timeout=timeout)
    labels = revisit_labels(f["video"])
    reports, videos = {}, []
    for name in ROLLOUTS:
        reports[name] = json.loads(entry["outputs"][f"score_{name}"]["text"][0])
        frames = read_webp(saved(server, entry, f"save_{name}_frames")[0])[f["history"]:]
        truth = read_webp(saved(server, entry, "save_reference_frames")[0])[f["history"]:]
        for label, mask in labels.items():
            reports[name][f"{label}_psnr"] = im.frame_scores(frames, truth, mask)["psnr"]
        videos += [p for p in saved(server, entry, f"save_{name}", "images") if p.suffix == ".mp4"]
    return reports, videos


def saved(server, entry: dict, node_id: str, kind: str = "images") -> list[Path]:
    return [server.output_dir / v["subfolder"] / v["filename"] for v in entry["outputs"].get(node_id, {}).get(kind, [])]


def read_webp(path: Path):
    """An animated WEBP -> ``[T, H, W, 3]`` float in ``[0, 1]``."""
    import numpy as np
    import torch
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        return torch.from_numpy(np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
                                ).float() / 255
