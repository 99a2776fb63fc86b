"""The ``learned`` context policy: each query layer reads only the history frames its own queries rank highest.

Every history frame is a candidate. Before a query layer reads history, it scores each frame by the attention mass
its query tokens Q give the frame's *summary*: the frame average-pooled to whole patches, as coarse as the frame
allows (``summary_pool``: 1 token of an 8x8 latent, 2 of a 60x104 one), embedded with its camera and placed by RoPE like any context token,
projected by the layer's own keys. The ``budget`` frames of highest mass are then read at full resolution; the
others' full-resolution keys are never computed. This is Mixture of Contexts' routing over mean-pooled keys, made
per frame, per query layer and per CFG branch (each branch with its own queries, so batching the branches or not
reads the same frames), decided when the layer's context keys are made: once per chunk with the context cache
(inference, at the first step), every forward without it (training). The score is the model's own attention
logit; no loss trains it apart.

Cost per query layer and chunk, for ``n`` history frames of ``s`` summary tokens, ``Nq`` query tokens, width ``d``:
the summaries' keys (with their values, which the host's context projection makes too) ``n * s * 4 d^2`` and the
scores ``2 * Nq * n * s * d`` FLOPs, both growing with the number of frames, not with their tokens; reading is then
``budget`` full frames, as ``recent`` at the same budget.
"""

from __future__ import annotations

import torch

from .context_tokens import ContextSegment, ContextSpec, tokens_per_frame

SCORE_CHUNK = 1024  # query tokens scored at once: the scores' memory is B * H * SCORE_CHUNK * S floats, twice


def summary_pool(h: int, w: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """The pooling of a summary frame: the largest that leaves an ``h x w`` latent frame a whole number of patches a
    side (so nothing is padded; average pooling drops the remainder rows and columns, at most ``pool - 1``): 8x8 ->
    4 (1 token), 60x104 -> 26 (2 tokens, 8 rows dropped), 44x80 -> 20 (2 tokens); 1 when no pool qualifies."""
    top = max(1, min(h // patch[1], w // patch[2]))
    return next((p for p in range(top, 0, -1) if (h // p) % patch[1] == 0 and (w // p) % patch[2] == 0), 1)


def summary_tokens(h: int, w: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Tokens of one summary frame (what the scoring reads per history frame)."""
    pool = summary_pool(h, w, patch)
    return tokens_per_frame(h // pool, w // pool, patch)


def single_frames(spec: ContextSpec) -> list[ContextSegment]:
    """The context's frames in order, one segment each (pool, index and pose kept)."""
    frames = []
    for seg in spec.segments:
        for j in range(seg.latent.shape[1]):
            poses = None if seg.poses is None else seg.poses[j:j + 1]
            frames.append(ContextSegment(seg.latent[:, j:j + 1], seg.frame_index[j:j + 1], seg.pool, poses))
    return frames


def summaries(spec: ContextSpec, patch: tuple[int, int, int] = (1, 2, 2)) -> ContextSpec:
    """The context with every frame pooled to its summary (full-resolution frames only)."""
    out = []
    for seg in spec.segments:
        if seg.pool != 1:
            raise ValueError("the learned policy routes over full-resolution frames; got a pooled context segment")
        h, w = seg.latent.shape[-2:]
        out.append(ContextSegment(seg.latent, seg.frame_index, summary_pool(h, w, patch), seg.poses))
    return ContextSpec(out)


def picked(spec: ContextSpec, frames: list[int]) -> ContextSpec:
    """The context holding only ``frames`` (positions in ``single_frames`` order), in that order."""
    every = single_frames(spec)
    return ContextSpec([every[i] for i in frames])


def frame_mass(q: torch.Tensor, k: torch.Tensor, token_frame: torch.Tensor, n_frames: int, heads: int) -> torch.Tensor:
    """Attention mass ``[n_frames]`` (summing to 1) that the query tokens ``q [B, Nq, H*D]`` give each frame's
    summary tokens ``k [B or 1, Ns, H*D]`` (RoPE applied to both), token ``i`` belonging to frame
    ``token_frame[i]``: softmax over all summary tokens per query token and head, averaged over tokens, heads and
    the rows given (the hosts hand one CFG branch's rows at a time)."""
    b, nq, dim = q.shape
    d = dim // heads
    with torch.no_grad():  # a decision, not a path for gradients; in chunks of query tokens to bound its memory
        kh = k.float().expand(b, -1, -1).reshape(b, -1, heads, d).transpose(1, 2) / d**0.5  # [B, H, Ns, D]
        weights = torch.zeros(kh.shape[2], device=q.device)
        for start in range(0, nq, SCORE_CHUNK):
            qh = q[:, start:start + SCORE_CHUNK].float().reshape(b, -1, heads, d).transpose(1, 2)  # [B, H, n, D]
            weights += torch.softmax(qh @ kh.transpose(-1, -2), dim=-1).sum(dim=(0, 1, 2))
        weights /= b * heads * nq
        return torch.zeros(n_frames, device=q.device).index_add_(0, token_frame.to(q.device), weights)


def ranked_frames(q: torch.Tensor, k: torch.Tensor, n_frames: int, heads: int, budget: int) -> list[int]:
    """The learned policy's pick in one query layer: the ``budget`` frames whose summaries ``k [1, n_frames * s,
    H*D]`` (``s`` tokens a frame, in order) get most mass from the query tokens ``q [B, Nq, H*D]``."""
    token_frame = torch.arange(n_frames).repeat_interleave(k.shape[1] // n_frames)
    return route(frame_mass(q, k, token_frame, n_frames, heads), budget)


def route(mass: torch.Tensor, budget: int) -> list[int]:
    """The ``budget`` frames of highest mass (ties: the newer frame), in temporal order."""
    score = [round(v, 9) for v in mass.tolist()]
    best = sorted(range(len(score)), key=lambda i: (-score[i], -i))[:budget]
    return sorted(best)


def scoring_flops(n_frames: int, summary: int, n_query: int, dim: int) -> int:
    """Multiply-adds x 2 of one query layer's scoring: the summaries' keys and values (``4 d^2`` a token: the host's
    context projection makes both) and the query-summary logits."""
    return n_frames * summary * 4 * dim * dim + 2 * n_query * n_frames * summary * dim
