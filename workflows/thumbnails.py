"""Thumbnails for ComfyUI's template browser: ``example_workflows/<name>.jpg`` beside each UI workflow.

The frontend shows a pack's template with the image ``/api/workflow_templates/<pack>/<name>.jpg``, which ComfyUI
serves from the pack's ``example_workflows/`` folder. Each thumbnail draws the workflow's main path (the pack's
nodes highlighted); the revisit world's shows its measured result instead: ground truth beside the generated
frames (``benchmarks/results/revisit/revisit_side_by_side.png``). ``python workflows/thumbnails.py`` (also run by
``build.py``) rewrites them; no ComfyUI needed.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
FOLDER = HERE.parent / "example_workflows"
SIZE = (480, 360)
SIDE_BY_SIDE = HERE.parent / "benchmarks" / "results" / "revisit" / "revisit_side_by_side.png"
BACKGROUND, BOX, PACK_BOX, TEXT, MUTED = "#1d2025", "#3a3f47", "#2f6f9f", "#f2f2f2", "#a8b0ba"

# name -> (title, main path; a step starting with "*" is one of this pack's nodes)
DIAGRAMS = {
    "dit_mem_reference": ("DiT-Mem: a reference video as memory",
                          ["Load Video (input/reference.mp4)", "*Encode Reference Video", "*Apply Reference Memory",
                           "KSampler (Wan2.1 T2V 1.3B)", "Save Video"]),
    "query_memory": ("Query memory: the next chunk reads the first",
                     ["KSampler: first chunk", "*Apply Query Memory (history = first chunk)", "KSampler: next chunk",
                      "Save Video x2"]),
    "memory_rollout": ("Memory Rollout: a long video that revisits",
                       ["Noise, CFG Guider, Sampler, Scheduler", "*Camera Path (walk_and_revisit)",
                        "*Memory Rollout (6 chunks, fov policy)",
                        "VAE Decode", "Save Video"]),
    "wan22_a14b_rollout": ("Memory Rollout on Wan2.2 A14B's two experts",
                           ["2 experts (high / low noise): Load, Shift 8, CFG Guider", "*Camera Path (walk_and_revisit)",
                            "*Memory Rollout (low-noise expert from step 10)", "VAE Decode", "Save Video"]),
    "wan22_5b_query_memory": ("Memory Rollout on Wan2.2 TI2V-5B",
                              ["Wan2.2 TI2V-5B: Load, Shift 8, CFG Guider", "*Camera Path (walk_and_revisit)",
                               "*Memory Rollout (48-channel Wan2.2 chunks, fov)", "VAE Decode (Wan2.2 VAE)",
                               "Save Video"]),
    "doom_return": ("A held-out Doom return, memory on and off",
                    ["Load Video (held-out MAP21 clip), Image Scale", "VAE Encode: the way out (first chunk)",
                     "*Camera Path (the recorded poses)", "*Memory Rollout: all history / memory off",
                     "VAE Decode, *Video Score, Save Video"]),
    "both_memories": ("Both memories on one chunk",
                      ["KSampler: first chunk", "*Encode Reference Video (the first chunk)",
                       "*Apply Query Memory (+ reference memory)", "KSampler: next chunk", "Save Video x2"]),
}
REVISIT = ("revisit_world", "Revisit world: does the memory remember?")
REVISIT_PANELS = ["ground truth", "no memory", "recent", "all history"]


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def diagram(title: str, steps: list[str]) -> Image.Image:
    """The title, then the steps top to bottom as boxes joined by arrows."""
    im = Image.new("RGB", SIZE, BACKGROUND)
    d = ImageDraw.Draw(im)
    d.text((20, 16), title, font=font(20), fill=TEXT)
    d.text((20, 44), "ComfyUI-MemLearner", font=font(13), fill=MUTED)
    box_h, gap = 36, 16
    top = 76 + (SIZE[1] - 76 - len(steps) * box_h - (len(steps) - 1) * gap - 12) // 2
    for i, step in enumerate(steps):
        ours, label = step.startswith("*"), step.lstrip("*")
        y = top + i * (box_h + gap)
        d.rounded_rectangle((40, y, SIZE[0] - 40, y + box_h), radius=8, fill=PACK_BOX if ours else BOX)
        d.text((SIZE[0] // 2, y + box_h // 2), label, font=font(15), fill=TEXT, anchor="mm")
        if i:
            x = SIZE[0] // 2
            d.line((x, y - gap, x, y - 3), fill=MUTED, width=2)
            d.polygon([(x - 5, y - 8), (x + 5, y - 8), (x, y - 2)], fill=MUTED)
    return im


def side_by_side(title: str, source: Path = SIDE_BY_SIDE) -> Image.Image:
    """The benchmark's sheet (a row per frame: ground truth | no memory | recent | all, 64 px panels 4 px apart,
    rows 2 px apart) laid out as a row per panel over the last frames: the way back, where memory counts."""
    sheet = Image.open(source).convert("RGB")
    n_frames, shown, cell = (sheet.height + 2) // 66, 8, 38
    im = Image.new("RGB", SIZE, BACKGROUND)
    d = ImageDraw.Draw(im)
    d.text((20, 16), title, font=font(20), fill=TEXT)
    d.text((20, 44), f"the way back (frames {n_frames - shown}-{n_frames - 1}) of a held-out world, toy model",
           font=font(13), fill=MUTED)
    for row, label in enumerate(REVISIT_PANELS):
        y = 84 + row * (cell + 28)
        d.text((20, y + cell // 2), label, font=font(15), fill=TEXT, anchor="lm")
        for i, t in enumerate(range(n_frames - shown, n_frames)):
            panel = sheet.crop((row * 68, t * 66, row * 68 + 64, t * 66 + 64)).resize((cell, cell), Image.Resampling.NEAREST)
            im.paste(panel, (140 + i * (cell + 3), y))
    return im


def thumbnails() -> dict[str, Image.Image]:
    images = {name: diagram(title, steps) for name, (title, steps) in DIAGRAMS.items()}
    images[REVISIT[0]] = side_by_side(REVISIT[1])
    return images


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85, optimize=True)
    return out.getvalue()


def write_all(folder: Path = FOLDER) -> list[Path]:
    written = []
    for name, image in thumbnails().items():
        path = folder / f"{name}.jpg"
        path.write_bytes(jpeg(image))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all():
        print(f"wrote {p.relative_to(HERE.parent)}")
