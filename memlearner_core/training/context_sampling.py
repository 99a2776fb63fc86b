"""How a training clip becomes MemLearner's context C and prediction P.

A clip of N latent frames is cut into the last ``p`` frames, P, which the model denoises and the loss counts,
and the ``n_context`` frames right before them, C, which the model reads clean. MemLearner samples the context
length uniformly from 0 to 9x the length of P, so the model learns to use no history, a little, and a lot; a
clip shorter than that caps it at what the clip holds.
"""

from __future__ import annotations

import torch


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
