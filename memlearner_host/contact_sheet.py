"""The main job's revisit comparison, drawn so it reads on its own: ground truth | no memory | window | all history.

A ``Comparison`` holds one revisit-world rollout per memory policy (model-space latents ``[16, T, h, w]``, the first
``history`` frames given as ground truth) and the world's truth. ``video_frames`` lays every frame out as labelled
columns, nearest-upscaled, revisit frames framed in orange with a REVISIT tag; ``sheet`` is a PNG contact sheet
(a row per policy, a column per chosen frame, each frame's PSNR against ground truth under it). Pure torch and
Pillow (the default font): the preview factors come from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from memlearner_core import revisit_world as rw

# (key, column title): the ground truth, then the policies from no memory to all history
COLUMNS = (("truth", "ground truth"), ("none", "no memory"), ("recent", "window (recent)"), ("all", "all history"))
BACKGROUND, TEXT, MUTED = (29, 32, 37), (242, 242, 242), (168, 176, 186)
REVISIT_COLOUR = (255, 140, 0)  # orange: the frame looks again at places the given frames showed
GIVEN_COLOUR = (70, 130, 200)  # blue: ground truth handed to every policy
BAND = 8  # width of the coloured band around a video frame (the revisit / given marker)
VIDEO_SCALE, SHEET_SCALE = 4, 3  # nearest upscale of the 64 px renderings


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@dataclass
class Comparison:
    """``truth`` and each policy's rollout ``generated[key]`` (model space ``[16, T, h, w]``), ``history`` given
    frames, ``revisit``: the frames whose every place the given frames showed. ``titles``: column titles by key."""

    truth: torch.Tensor
    generated: dict[str, torch.Tensor]
    history: int
    revisit: list[int]
    titles: dict[str, str] = field(default_factory=lambda: dict(COLUMNS))

    @property
    def frames(self) -> int:
        return self.truth.shape[1]

    @property
    def keys(self) -> list[str]:
        return ["truth", *self.generated]

    def kind(self, t: int) -> str:
        """``given`` (ground truth for every policy), ``revisit`` or ``new``."""
        return "given" if t < self.history else "revisit" if t in self.revisit else "new"

    def frame_psnr(self, key: str) -> list[float | None]:
        """Per frame, PSNR of the whole frame against ground truth (``rw.psnr``: latent space, 0 dB = guessing the
        mean, capped at 40); None for the given frames and for the truth itself."""
        if key == "truth":
            return [None] * self.frames
        err = (self.generated[key].float() - self.truth.float()).pow(2).mean(0)  # [T, h, w]
        n = err[0].numel()
        return [None if t < self.history else rw.psnr(float(err[t].sum()), n) for t in range(self.frames)]

    def region_psnr(self, key: str, mask: torch.Tensor) -> float | None:
        """PSNR over the generated pixels of ``mask [T - history, h, w]``, as Revisit Score computes it."""
        err = (self.generated[key].float()[:, self.history:] - self.truth.float()[:, self.history:]).pow(2).mean(0)
        return rw.psnr(float(err[mask].sum()), int(mask.sum()))


def revisit_frames(case: rw.RevisitCase) -> list[int]:
    """The frames (indices into the whole video) whose every pixel shows a place the given history showed."""
    return [case.history + i for i, m in enumerate(case.labels["revisit"]) if bool(m.all())]


def renderings(comp: Comparison, factors: torch.Tensor, bias: torch.Tensor, scale: int) -> dict[str, np.ndarray]:
    """Per column key, uint8 RGB frames ``[T, 8h*scale, 8w*scale, 3]``: ComfyUI's Wan2.1 preview colours
    (``rw.latent_to_rgb``), nearest-upscaled."""
    latents = {"truth": comp.truth, **comp.generated}
    return {k: to_uint8(rw.latent_to_rgb(latents[k], factors, bias, upscale=8 * scale)) for k in comp.keys}


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    return (rgb.float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest upscale of ``[..., H, W, 3]`` frames."""
    return frames.repeat(scale, -3).repeat(scale, -2)


def db(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} dB"


def frame_status(comp: Comparison, t: int) -> tuple[str, tuple[int, int, int]]:
    last = comp.history - 1
    return {"given": (f"GIVEN: ground truth, the same in every column (frames 0-{last})", GIVEN_COLOUR),
            "revisit": (f"REVISIT: back where the given frames 0-{last} looked; memory should bring them back",
                        REVISIT_COLOUR),
            "new": ("new: generated, places the given frames never showed (no right answer to remember)", MUTED),
            }[comp.kind(t)]


# --- the video ---------------------------------------------------------------------------------------------------

VIDEO_MARGIN, VIDEO_GAP, VIDEO_TOP, VIDEO_TITLE, VIDEO_CAPTION = 16, 8, 30, 22, 24


def video_layout(comp: Comparison, scale: int = VIDEO_SCALE) -> tuple[int, int, int]:
    """(panel side, frame width, frame height) of ``video_frames``, both even (H.264 wants even sides)."""
    side = 8 * comp.truth.shape[-1] * scale
    width = 2 * VIDEO_MARGIN + len(comp.keys) * side + (len(comp.keys) - 1) * VIDEO_GAP
    height = 2 * VIDEO_MARGIN + VIDEO_TOP + VIDEO_TITLE + side + VIDEO_CAPTION
    return side, width + width % 2, height + height % 2


def panel_origin(comp: Comparison, column: int, scale: int = VIDEO_SCALE) -> tuple[int, int]:
    """Top-left (x, y) of a column's panel in a video frame."""
    side, _, _ = video_layout(comp, scale)
    return VIDEO_MARGIN + column * (side + VIDEO_GAP), VIDEO_MARGIN + VIDEO_TOP + VIDEO_TITLE


def video_frames(comp: Comparison, factors: torch.Tensor, bias: torch.Tensor, scale: int = VIDEO_SCALE) -> np.ndarray:
    """uint8 RGB frames ``[T, H, W, 3]``: per frame a status line, the columns side by side under their titles,
    each generated frame's PSNR under it; revisit frames in an orange band, given frames in a blue one."""
    side, width, height = video_layout(comp, scale)
    panels = renderings(comp, factors, bias, scale)
    psnr = {k: comp.frame_psnr(k) for k in comp.keys}
    out = []
    for t in range(comp.frames):
        status, colour = frame_status(comp, t)
        im = Image.new("RGB", (width, height), BACKGROUND)
        d = ImageDraw.Draw(im)
        if comp.kind(t) != "new":
            d.rectangle((0, 0, width - 1, height - 1), outline=colour, width=BAND)
        d.text((VIDEO_MARGIN, VIDEO_MARGIN + 2), f"frame {t}/{comp.frames - 1}", font=font(16), fill=TEXT)
        d.text((VIDEO_MARGIN + 110, VIDEO_MARGIN + 2), status, font=font(16), fill=colour)
        for c, key in enumerate(comp.keys):
            x, y = panel_origin(comp, c, scale)
            d.text((x + side // 2, y - VIDEO_TITLE // 2), comp.titles[key], font=font(16), fill=TEXT, anchor="mm")
            im.paste(Image.fromarray(panels[key][t]), (x, y))
            caption = "given" if t < comp.history else "truth" if key == "truth" else db(psnr[key][t])
            d.text((x + side // 2, y + side + VIDEO_CAPTION // 2), caption, font=font(15), fill=MUTED, anchor="mm")
        out.append(np.asarray(im))
    return np.stack(out)


def write_video(frames: np.ndarray, path, fps: float = 2.0) -> None:
    """An H.264 mp4, written by ComfyUI's own video writer (what Save Video uses)."""
    from fractions import Fraction

    from comfy_api.latest import InputImpl, Types

    images = torch.from_numpy(frames.astype(np.float32) / 255)
    InputImpl.VideoFromComponents(Types.VideoComponents(images=images, frame_rate=Fraction(fps))).save_to(str(path))


# --- the contact sheet -------------------------------------------------------------------------------------------

SHEET_MARGIN, SHEET_LABEL, SHEET_GAP, SHEET_HEAD, SHEET_TITLE, SHEET_CAPTION, SHEET_FOOT = 20, 170, 12, 40, 64, 22, 86
SHEET_BORDER = 4


def chosen_frames(comp: Comparison) -> list[int]:
    """The last given frame, two new ones on the way out and back, and every revisit frame."""
    first = comp.revisit[0] if comp.revisit else comp.frames
    new = sorted({comp.history + (first - comp.history) * i // 3 for i in (1, 2)} - set(comp.revisit))
    return [comp.history - 1, *[t for t in new if comp.history <= t < comp.frames], *comp.revisit]


def sheet_layout(comp: Comparison, frames: list[int], scale: int = SHEET_SCALE) -> tuple[int, int, int]:
    """(cell side, sheet width, sheet height)."""
    side = 8 * comp.truth.shape[-1] * scale
    width = 2 * SHEET_MARGIN + SHEET_LABEL + len(frames) * (side + SHEET_GAP) - SHEET_GAP
    height = SHEET_MARGIN + SHEET_TITLE + SHEET_HEAD + len(comp.keys) * (side + SHEET_CAPTION + SHEET_GAP) + SHEET_FOOT
    return side, width, height


def cell_origin(comp: Comparison, frames: list[int], row: int, column: int,
                scale: int = SHEET_SCALE) -> tuple[int, int]:
    """Top-left (x, y) of the cell of row ``row`` (a column key's index) and chosen frame ``column``."""
    side, _, _ = sheet_layout(comp, frames, scale)
    return (SHEET_MARGIN + SHEET_LABEL + column * (side + SHEET_GAP),
            SHEET_MARGIN + SHEET_TITLE + SHEET_HEAD + row * (side + SHEET_CAPTION + SHEET_GAP))


def sheet(comp: Comparison, factors: torch.Tensor, bias: torch.Tensor, frames: list[int] | None = None,
          summary: dict[str, str] | None = None, subtitle: str = "", scale: int = SHEET_SCALE) -> Image.Image:
    """Rows: ground truth, then each policy; columns: ``frames`` (default ``chosen_frames``), revisit frames framed
    in orange and tagged REVISIT; each generated frame's PSNR against ground truth under it. ``summary``: a line
    under each row's title (e.g. its revisit PSNR)."""
    frames = chosen_frames(comp) if frames is None else frames
    side, width, height = sheet_layout(comp, frames, scale)
    panels = renderings(comp, factors, bias, scale)
    psnr = {k: comp.frame_psnr(k) for k in comp.keys}
    im = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(im)
    d.text((SHEET_MARGIN, SHEET_MARGIN), "Revisit world: does the memory remember?", font=font(22), fill=TEXT)
    d.text((SHEET_MARGIN, SHEET_MARGIN + 30), subtitle, font=font(14), fill=MUTED)
    for c, t in enumerate(frames):
        x, y0 = cell_origin(comp, frames, 0, c, scale)
        kind = comp.kind(t)
        colour = {"given": GIVEN_COLOUR, "revisit": REVISIT_COLOUR, "new": MUTED}[kind]
        d.text((x + side // 2, y0 - SHEET_HEAD + 10), f"frame {t}", font=font(16), fill=TEXT, anchor="mm")
        d.text((x + side // 2, y0 - SHEET_HEAD + 28), kind.upper(), font=font(14), fill=colour, anchor="mm")
    for r, key in enumerate(comp.keys):
        _, y = cell_origin(comp, frames, r, 0, scale)
        d.text((SHEET_MARGIN, y + side // 2 - 10), comp.titles[key], font=font(17), fill=TEXT, anchor="lm")
        if summary and summary.get(key):
            d.text((SHEET_MARGIN, y + side // 2 + 12), summary[key], font=font(14), fill=MUTED, anchor="lm")
        for c, t in enumerate(frames):
            x, y = cell_origin(comp, frames, r, c, scale)
            if comp.kind(t) == "revisit":
                b = SHEET_BORDER
                d.rectangle((x - b, y - b, x + side + b - 1, y + side + b - 1), outline=REVISIT_COLOUR, width=b)
            im.paste(Image.fromarray(panels[key][t]), (x, y))
            caption = "given" if t < comp.history else "" if key == "truth" else db(psnr[key][t])
            d.text((x + side // 2, y + side + SHEET_CAPTION // 2 + 2), caption, font=font(15), fill=MUTED, anchor="mm")
    y = height - SHEET_FOOT + 4
    last = comp.history - 1
    for line in (f"Frames 0-{last} are given (ground truth, the same in every row); the rest are generated chunk by "
                 "chunk, each policy choosing which earlier frames the model reads.",
                 f"REVISIT (orange): every place in the frame was shown in frames 0-{last}, so a model that remembers "
                 "can bring it back; NEW places have no right answer to remember.",
                 "dB: PSNR of the frame against ground truth, 10 log10(1/MSE) in the model's latent space; 0 dB = "
                 "guessing the mean, 40 dB = an exact copy (the cap). Colours: ComfyUI's Wan2.1 latent preview."):
        d.text((SHEET_MARGIN, y), line, font=font(14), fill=MUTED)
        y += 24
    return im
