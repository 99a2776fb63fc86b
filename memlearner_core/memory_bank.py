"""A memory bank of captioned reference videos, ranked against a prompt by text, as DiT-Mem picks its references.

The bank is a folder of videos with captions: a ``captions.json`` (``{"file name": "caption", ...}``) and/or a
``<video stem>.txt`` next to a video. Ranking is text to text: the cosine similarity of the prompt's embedding and
each caption's, from whichever text encoder the caller has loaded, top k kept. Encoded latents are cached on
disk, keyed by the file's identity and the encoding settings, so a bank is encoded once.

A bank folder is always inside one root folder (ComfyUI's input folder): ``confined_folder`` refuses absolute
paths, ``..`` and links that lead out of it, and the files of a bank that link outside it are skipped. Its files
are read through ``confined_files``, checked on the opened descriptor, so a link swapped in after these checks
is refused too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .confined_files import ConfinedFileError, is_inside, read_confined

VIDEO_EXTENSIONS = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"}
CAPTIONS_FILE = "captions.json"
CACHE_DIR = "bank_latents"  # the latent cache's folder inside the host's own cache folder
log = logging.getLogger("memlearner")


class MemoryBankError(ValueError):
    """A memory-bank folder that cannot be used; the message says why."""


@dataclass(frozen=True)
class BankEntry:
    path: Path
    caption: str


def confined_folder(text: str, root: str | Path, what: str = "folder") -> Path:
    """``root / text`` when that path, links resolved, stays inside ``root``; anything else (an absolute path,
    ``..``, a link leading out) is a ``MemoryBankError`` that says nothing about the path outside."""
    text = text.strip() if isinstance(text, str) else ""
    refused = MemoryBankError(f"{what} must be a folder inside ComfyUI's input folder, given relative to it (e.g. "
                              f"memory_bank); absolute paths, '..' and links that lead outside it are refused")
    if not text or "\0" in text or os.path.isabs(text) or text.startswith("~"):
        raise refused
    path = Path(root) / text
    if not is_inside(path, root):
        raise refused
    return path


def _read_text(path: Path, what: str, root: str | Path | None = None) -> str:
    """UTF-8 text of ``path``; with ``root``, read through ``read_confined`` (exactly the file checked)."""
    try:
        data = path.read_bytes() if root is None else read_confined(path, root, what)
        return data.decode("utf-8")
    except ConfinedFileError as e:
        raise MemoryBankError(str(e)) from None
    except UnicodeDecodeError as e:
        raise MemoryBankError(f"{what} {path.name} is not UTF-8 text ({e.reason} at byte {e.start}); save it "
                              "as UTF-8") from None


def read_captioned_folder(folder: str | Path, root: str | Path | None = None) -> list[BankEntry]:
    """Videos of ``folder`` that have a caption, sorted by name; videos without one are skipped with a warning.
    With ``root``, files whose links lead outside ``root`` are skipped (and never read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MemoryBankError(f"memory bank folder not found: {folder}")

    def readable(path: Path) -> bool:
        return path.is_file() and (root is None or is_inside(path, root))

    captions: dict[str, str] = {}
    index = folder / CAPTIONS_FILE
    if readable(index):
        try:
            captions = json.loads(_read_text(index, "the captions file", root))
        except (ValueError, RecursionError) as e:
            if isinstance(e, MemoryBankError):
                raise
            raise MemoryBankError(f"{index} is not valid JSON: {e}") from None
        if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
            raise MemoryBankError(f'{index} must map video file names to captions: {{"clip.mp4": "a caption"}}')
    entries, uncaptioned, outside = [], [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS):
        if root is not None and not is_inside(path, root):
            outside.append(path.name)
            continue
        side = path.with_suffix(".txt")
        caption = captions.get(path.name) or (_read_text(side, "the caption", root).strip() if readable(side) else "")
        if caption.strip():
            entries.append(BankEntry(path, caption.strip()))
        else:
            uncaptioned.append(path.name)
    if outside:
        log.warning("memory bank %s: %d file(s) linking outside the input folder skipped: %s", folder, len(outside),
                    ", ".join(outside[:5]))
    if uncaptioned:
        log.warning("memory bank %s: %d video(s) without a caption skipped: %s", folder, len(uncaptioned),
                    ", ".join(uncaptioned[:5]))
    if not entries:
        raise MemoryBankError(f"memory bank {folder} has no captioned videos ({', '.join(sorted(VIDEO_EXTENSIONS))}) "
                              f"- add {CAPTIONS_FILE} or a .txt caption next to each video")
    return entries


def pool_text_embedding(cond: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """One vector ``[D]`` for a prompt: the encoder's pooled output if it has one, else the mean of the token
    embeddings ``[1, L, D]`` that are not padding (umt5 zeroes its padded positions)."""
    if pooled is not None:
        return pooled.reshape(-1).float()
    tokens = cond.reshape(-1, cond.shape[-1]).float()
    real = tokens.norm(dim=-1) > 0
    return (tokens[real] if real.any() else tokens).mean(0)


def rank_by_text(prompt: torch.Tensor, captions: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """Top ``k`` of ``captions [N, D]`` by cosine similarity to ``prompt [D]``: ``[(index, score)]``, best first
    (ties: lower index first)."""
    scores = F.cosine_similarity(captions.float(), prompt.float().unsqueeze(0), dim=-1)
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return [(i, float(scores[i])) for i in order[:k]]


def latent_cache_path(video: Path, settings: str, cache_dir: str | Path = "") -> Path:
    """Where a video's encoded latent is cached: in ``cache_dir`` (never next to the video), keyed by the file's
    resolved path, size and modification time and by ``settings`` (latent shape, VAE), so an edited video is
    re-encoded."""
    stat = video.stat()
    key = f"{video.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{settings}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{video.stem}-{digest}.safetensors"


def caption_groups(captions: list[str]) -> torch.Tensor:
    """``[N, G]`` one-hot rows, one column per distinct caption: ranked with ``reference_sets``, the clips that share
    a caption (a scene or family tag) are each other's references when no text encoder is loaded."""
    columns = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    out = torch.zeros(len(captions), len(columns))
    out[torch.arange(len(captions)), torch.tensor([columns[c] for c in captions])] = 1.0
    return out


def reference_sets(captions: torch.Tensor, k: int) -> list[list[int]]:
    """For each of ``captions [N, D]``, the ``k`` other captions closest to it (cosine, best first): the
    reference videos a training clip gets from its memory bank, never itself."""
    if captions.shape[0] < 2:
        raise MemoryBankError("training a memory encoder needs at least 2 captioned videos (each clip's "
                              "references are other videos of the folder)")
    k = min(k, captions.shape[0] - 1)
    sets = []
    for i in range(captions.shape[0]):
        ranked = rank_by_text(captions[i], captions, k + 1)
        sets.append([j for j, _ in ranked if j != i][:k])
    return sets
