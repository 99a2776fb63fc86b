"""Camera conditioning: a per-frame pose ``[R|t]`` (3x4) through one linear layer, added to that frame's tokens.

Frames without a pose use zeros, as in training on datasets that have none. The embedding goes on the history C
and the predicted tokens P, and, with ``on_query`` (query-weights version 2, the published default), on the query
tokens Q too: Q's only cue for which history frames show the place it is asked about. ``view_rope_fov``
(query-weights version 3) also places every frame's tokens by where its camera looks (``view_rope``).
"""

from __future__ import annotations

import torch
from torch import nn


class CameraEmbedding(nn.Module):
    """``poses [T, 3, 4] -> [T, dim]``, one vector per latent frame."""

    def __init__(self, dim: int, on_query: bool = True, view_rope_fov: float | None = None):
        super().__init__()
        self.proj = nn.Linear(12, dim)
        self.on_query = on_query
        self.view_rope_fov = view_rope_fov  # degrees of horizontal view: view-aligned RoPE; None: stock positions

    def forward(self, poses: torch.Tensor) -> torch.Tensor:
        """Poses ``[..., 3, 4]`` on any device -> ``[..., dim]`` on the poses' device. The MLP runs where its weights
        are (it is tiny, and nobody's model management moves it)."""
        w = self.proj.weight
        return self.proj(poses.reshape(*poses.shape[:-2], 12).to(device=w.device, dtype=w.dtype)).to(poses.device)


def frame_embedding_to_tokens(frame_emb: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """``[T, dim] -> [T * tokens_per_frame, dim]``: each frame's vector on each of its tokens."""
    return frame_emb.repeat_interleave(tokens_per_frame, dim=0)
