"""Rollout scheduling: a long video as chunks, each conditioned on a context chosen from everything before it.

The memory bank holds the clean latent frames ``[C, N, H, W]`` of all chunks so far (and their camera poses).
Before each chunk a policy (``context_policy``) picks frames and their pooling; the bank turns the picks into the
chunk's ``ContextSpec``, frames at their true offset before the chunk (negative frame indices).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .context_policy import FramePick, frame_cost
from .context_tokens import ContextSegment, ContextSpec


def latent_frames(pixel_frames: int) -> int:
    """Wan2.1's VAE maps ``4k+1`` video frames to ``k+1`` latent frames."""
    if pixel_frames < 1 or (pixel_frames - 1) % 4:
        raise ValueError(f"chunk length must be 4k+1 video frames (5, 9, ..., 81), got {pixel_frames}")
    return (pixel_frames - 1) // 4 + 1


class MemoryBank:
    """Every latent frame generated so far, ``[C, N, H, W]``, with per-frame poses ``[N, 3, 4]`` (or None)."""

    def __init__(self, poses: torch.Tensor | None = None):
        self.frames: torch.Tensor | None = None
        self.all_poses = poses  # the whole trajectory: frame i's pose is all_poses[i]

    @property
    def n_frames(self) -> int:
        return 0 if self.frames is None else self.frames.shape[1]

    def poses(self, start: int, stop: int) -> torch.Tensor | None:
        return None if self.all_poses is None else self.all_poses[start:stop]

    def append(self, chunk: torch.Tensor) -> None:
        """Add a chunk's clean latent ``[C, T, H, W]``."""
        chunk = chunk.detach().cpu()
        self.frames = chunk if self.frames is None else torch.cat([self.frames, chunk], 1)

    def context(self, picks: list[FramePick], chunk_start: int) -> ContextSpec:
        """Picked frames as segments (runs of consecutive frames with the same pooling), indices relative to
        the chunk starting at ``chunk_start``."""
        segments, run = [], []
        for p in sorted(picks, key=lambda p: p.index):
            if run and (p.pool != run[-1].pool or p.index != run[-1].index + 1):
                segments.append(self._segment(run, chunk_start))
                run = []
            run.append(p)
        if run:
            segments.append(self._segment(run, chunk_start))
        return ContextSpec(segments)

    def _segment(self, run: list[FramePick], chunk_start: int) -> ContextSegment:
        idx = torch.tensor([p.index for p in run])
        poses = None if self.all_poses is None else self.all_poses[idx]
        return ContextSegment(self.frames[:, idx], idx - chunk_start, run[0].pool, poses)


@dataclass
class ChunkRecord:
    """What one chunk of a rollout used and cost; the node reports these as JSON."""

    chunk: int
    first_frame: int  # absolute latent-frame index of the chunk's first frame
    context: list[list[int]] = field(default_factory=list)  # [[frame index, pool], ...]
    context_tokens: int = 0
    seconds: float = 0.0
    peak_memory_mb: float | None = None
    memory_kind: str = ""  # "cuda_allocated" (this chunk) or "process_peak_rss" (the process so far, on CPU)

    def as_dict(self) -> dict:
        return asdict(self)


def context_tokens(picks: list[FramePick], hw: tuple[int, int]) -> int:
    return sum(frame_cost(hw[0], hw[1], p.pool) for p in picks)
