"""A memory bank of captioned reference videos, ranked against a prompt by text, as DiT-Mem picks its references.

The bank is a folder of videos with captions: a ``captions.json`` (``{"file name": "caption", ...}``) and/or a
``<video stem>.txt`` next to a video. Ranking is text to text: the cosine similarity of the prompt's embedding and
each caption's, from whichever text encoder the caller has loaded, top k kept. Encoded latents are cached on
disk, keyed by the file's identity and the encoding settings, so a bank is encoded once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

VIDEO_EXTENSIONS = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"}
CAPTIONS_FILE = "captions.json"
CACHE_DIR = ".memlearner_cache"
log = logging.getLogger("memlearner")


class MemoryBankError(ValueError):
    """A memory-bank folder that cannot be used; the message says why."""


@dataclass(frozen=True)
class BankEntry:
    path: Path
    caption: str


def read_captioned_folder(folder: str | Path) -> list[BankEntry]:
    """Videos of ``folder`` that have a caption, sorted by name; videos without one are skipped with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MemoryBankError(f"memory bank folder not found: {folder}")
    captions: dict[str, str] = {}
    index = folder / CAPTIONS_FILE
    if index.is_file():
        try:
            captions = json.loads(index.read_text(encoding="utf-8"))
        except ValueError as e:
            raise MemoryBankError(f"{index} is not valid JSON: {e}") from e
        if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
            raise MemoryBankError(f'{index} must map video file names to captions: {{"clip.mp4": "a caption"}}')
    entries, uncaptioned = [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS):
        side = path.with_suffix(".txt")
        caption = captions.get(path.name) or (side.read_text(encoding="utf-8").strip() if side.is_file() else "")
        if caption.strip():
            entries.append(BankEntry(path, caption.strip()))
        else:
            uncaptioned.append(path.name)
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


def latent_cache_path(video: Path, settings: str) -> Path:
    """Where a video's encoded latent is cached: the bank's cache folder, keyed by the file's resolved path,
    size and modification time and by ``settings`` (latent shape, VAE), so an edited video is re-encoded."""
    stat = video.stat()
    key = f"{video.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{settings}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return video.parent / CACHE_DIR / f"{video.stem}-{digest}.safetensors"


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
