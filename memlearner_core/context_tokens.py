"""Context (history) for query memory: clean latent frames, where they sit in time, and their camera poses.

Positions (a documented choice; the paper does not publish one): context frames keep their true frame index
relative to the chunk being generated, so history sits at negative temporal RoPE positions (the frame just
before the chunk is -1), and the query tokens Q share the positions of the predicted tokens P. A segment
pooled ``s x s`` spatially (FramePack-style compression of old frames) keeps the spatial extent of the image:
its token at row ``i`` sits at position ``i*s + (s-1)/2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class ContextSegment:
    """Clean latent frames ``[C, T, H, W]`` at frame indices ``[T]`` (relative to the chunk's first frame).

    ``pool`` is the spatial average-pooling factor applied before patch embedding (1 = full resolution);
    ``poses`` are per-frame camera extrinsics ``[T, 3, 4]`` or None.
    """

    latent: torch.Tensor
    frame_index: torch.Tensor
    pool: int = 1
    poses: torch.Tensor | None = None

    def pooled_latent(self) -> torch.Tensor:
        if self.pool == 1:
            return self.latent
        return F.avg_pool3d(self.latent.unsqueeze(0), (1, self.pool, self.pool)).squeeze(0)


@dataclass
class ContextSpec:
    """All context of one chunk, as segments in temporal order."""

    segments: list[ContextSegment] = field(default_factory=list)

    @classmethod
    def from_history(cls, latent: torch.Tensor, poses: torch.Tensor | None = None) -> ContextSpec:
        """History frames ``[C, T, H, W]`` that end right before the chunk: indices ``-T .. -1``."""
        if latent.shape[1] == 0:
            return cls([])
        index = torch.arange(-latent.shape[1], 0)
        return cls([ContextSegment(latent, index, 1, poses)])

    def spatial_size(self) -> tuple[int, int] | None:
        return None if not self.segments else tuple(self.segments[0].latent.shape[-2:])


def cell_positions(frames: torch.Tensor, h: int, w: int, pool: int) -> torch.Tensor:
    """RoPE ids ``[T*h*w, 3]`` of an ``h x w`` token grid per frame of ``frames [T]`` whose tokens each stand for a
    ``pool x pool`` cell of full-resolution tokens: at the cell's centre, row ``i*pool + (pool-1)/2``."""
    centre = (pool - 1) / 2
    rows = torch.arange(h, dtype=torch.float32) * pool + centre
    cols = torch.arange(w, dtype=torch.float32) * pool + centre
    grid = torch.stack(torch.meshgrid(frames.float(), rows, cols, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def segment_positions(seg: ContextSegment, patch: tuple[int, int, int] = (1, 2, 2)) -> torch.Tensor:
    """RoPE ids ``[T*h*w, 3]`` (time, row, column) of a segment's tokens, in patch units."""
    lat = seg.pooled_latent()
    t, h, w = lat.shape[1] // patch[0], -(-lat.shape[2] // patch[1]), -(-lat.shape[3] // patch[2])
    return cell_positions(seg.frame_index[:t], h, w, seg.pool)


def tokens_per_frame(h: int, w: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Tokens of one ``h x w`` latent frame after patching (partial patches are padded)."""
    return (-(-h // patch[1])) * (-(-w // patch[2]))


def frame_token_counts(seg: ContextSegment, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Tokens per latent frame of a segment (after pooling and patching)."""
    lat = seg.pooled_latent()
    return tokens_per_frame(lat.shape[2], lat.shape[3], patch)


def pooled_grid(h: int, w: int, pool: int) -> tuple[int, int]:
    """Token rows and columns left of an ``h x w`` token grid pooled ``pool x pool`` (partial cells count)."""
    return -(-h // pool), -(-w // pool)


def pooled_query_positions(t: int, h: int, w: int, pool: int) -> torch.Tensor:
    """RoPE ids ``[t*h'*w', 3]`` of query tokens pooled ``pool x pool`` over P's ``t x h x w`` token grid: frame
    ``f`` and the centre of the cell they stand for, like a pooled context segment."""
    return cell_positions(torch.arange(t), *pooled_grid(h, w, pool), pool)
