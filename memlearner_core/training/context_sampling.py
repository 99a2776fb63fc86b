"""How a training clip becomes MemLearner's context C and prediction P.

A clip of N latent frames is cut into the last ``p`` frames, P, which the model denoises and the loss counts,
and the ``n_context`` frames right before them, C, which the model reads clean. MemLearner samples the context
length uniformly from 0 to 9x the length of P, so the model learns to use no history, a little, and a lot; a
clip shorter than that caps it at what the clip holds.

``sample_context`` draws the context the way Memory Rollout hands it to the model: the sampled length becomes a
token budget and a policy (``all``/``recent``: the newest frames; ``fov``: the frames whose view overlaps P's;
``framepack``: older frames pooled coarser; ``learned``: every earlier frame, of which each query layer reads the
budget it ranks highest, as Memory Rollout's learned policy does) picks frames from everything before P, so gapped
and pooled contexts, and the model's own choices, are seen in training too.
"""

from __future__ import annotations

import torch

from ..context_policy import FramePick, frame_cost, select_context
from ..context_tokens import ContextSpec
from ..rollout import MemoryBank


class ContextSamplingError(ValueError):
    """A context/prediction split that the clip cannot give; the message says why."""


def sample_context_length(p: int, max_multiple: int, available: int,
                          generator: torch.Generator | None = None) -> int:
    """Context frames for ``p`` predicted frames: uniform over ``0 .. min(max_multiple * p, available)``."""
    if p < 1 or max_multiple < 0 or available < 0:
        raise ContextSamplingError(f"need p >= 1, max_multiple >= 0 and available >= 0, got p={p}, "
                                   f"max_multiple={max_multiple}, available={available}")
    top = min(max_multiple * p, available)
    return int(torch.randint(0, top + 1, (1,), generator=generator))


def clip_windows(n: int, p: int, n_context: int) -> tuple[slice, slice]:
    """Frame slices of C and P in a clip of ``n`` frames (also for per-frame poses ``[N, 3, 4]``)."""
    if not 1 <= p <= n:
        raise ContextSamplingError(f"cannot predict {p} frames from a clip of {n} latent frames "
                                   f"(need 1 <= p <= {n})")
    if not 0 <= n_context <= n - p:
        raise ContextSamplingError(f"a clip of {n} latent frames predicting {p} holds at most {n - p} "
                                   f"context frames, asked for {n_context}")
    return slice(n - p - n_context, n - p), slice(n - p, n)


def split_clip(latent: torch.Tensor, p: int, n_context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``latent [C, N, H, W]`` -> context ``[C, n_context, H, W]`` (the frames right before P, in order) and
    target ``[C, p, H, W]`` (the last ``p`` frames)."""
    if latent.ndim != 4:
        raise ContextSamplingError(f"expected a clip latent [C, N, H, W], got {tuple(latent.shape)}")
    context, target = clip_windows(latent.shape[1], p, n_context)
    return latent[:, context], latent[:, target]


def sample_context(latent: torch.Tensor, poses: torch.Tensor | None, p: int, max_multiple: int,
                   policies: tuple[str, ...], generator: torch.Generator | None = None
                   ) -> tuple[ContextSpec, torch.Tensor, str, list[FramePick], int]:
    """A training example from ``latent [C, N, H, W]`` (poses ``[N, 3, 4]`` or None): the context (a
    ``ContextSpec``, frames at their offsets before P), the target P ``[C, p, H, W]`` (the last ``p`` frames), the
    policy drawn (uniformly from ``policies``; ``fov`` becomes ``recent`` for a clip without poses), its picks and
    the budget in frames. The budget is ``sample_context_length`` full-resolution frames of tokens; ``learned``
    hands over every earlier frame (none for a budget of 0), each query layer keeping the budget."""
    n = latent.shape[1]
    start = clip_windows(n, p, 0)[1].start
    n_ctx = sample_context_length(p, max_multiple, start, generator)
    policy = policies[int(torch.randint(0, len(policies), (1,), generator=generator))]
    if policy == "fov" and poses is None:
        policy = "recent"
    hw = tuple(latent.shape[-2:])
    history = None if poses is None else poses[:start]
    chunk = None if poses is None else poses[start:]
    picks = select_context(policy, start, n_ctx * frame_cost(*hw), hw, history, chunk) if n_ctx else []
    bank = MemoryBank(poses)
    bank.append(latent[:, :start])
    return bank.context(picks, start), latent[:, start:], policy, picks, n_ctx
