"""Memory tokens: what an encoder hands to the DiT, and their exact de-duplication.

The official DiT-Mem encoder repeats each video's token when the CNN's temporal size is 1 (21 latent frames):
1000 tokens hold only 10 distinct vectors. Attention over ``n`` identical keys (with identical values) equals
attention over one of them with ``ln(n)`` added to its logit, so the DiT only ever sees the unique rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class MemoryTokens:
    """Unique memory tokens ``[B, U, C]`` and the log of each one's weight ``[B, U]``.

    ``log_weight`` is ``ln(multiplicity) + ln(strength)``; padding rows (when batch rows have different numbers of
    unique tokens) carry ``-inf`` and so never receive attention.
    """

    tokens: torch.Tensor
    log_weight: torch.Tensor
    total: int  # tokens before de-duplication, per batch row

    @property
    def width(self) -> int:
        return self.tokens.shape[-1]

    @cached_property
    def is_plain(self) -> bool:
        """True when every row counts exactly once (nothing collapsed, strength 1). Read once per object: on a GPU
        the check waits for the device, and every block of every step asks."""
        return bool((self.log_weight == 0).all())

    def with_strength(self, strength: float) -> MemoryTokens:
        if strength <= 0:
            raise ValueError("memory strength must be > 0 (strength 0 means: do not apply the memory)")
        return MemoryTokens(self.tokens, self.log_weight + math.log(strength), self.total)

    def to(self, device=None, dtype=None) -> MemoryTokens:
        return MemoryTokens(self.tokens.to(device=device, dtype=dtype), self.log_weight.to(device=device), self.total)

    @classmethod
    def full(cls, tokens: torch.Tensor) -> MemoryTokens:
        """Every token kept as it is (the official layout, ``[B, M, C]``)."""
        return cls(tokens, tokens.new_zeros(tokens.shape[:2], dtype=torch.float32), tokens.shape[1])

    @classmethod
    def deduplicated(cls, tokens: torch.Tensor) -> MemoryTokens:
        """Collapse bit-identical rows of ``tokens [B, M, C]`` to unique rows with ``ln(count)`` weights."""
        uniques, counts = [], []
        for row in tokens:
            u, c = torch.unique(row, dim=0, return_counts=True)
            uniques.append(u)
            counts.append(c)
        n = max(u.shape[0] for u in uniques)
        out = tokens.new_zeros(tokens.shape[0], n, tokens.shape[-1])
        logw = torch.full((tokens.shape[0], n), float("-inf"), device=tokens.device)
        for i, (u, c) in enumerate(zip(uniques, counts, strict=True)):
            out[i, : u.shape[0]] = u
            logw[i, : u.shape[0]] = c.float().log()
        return cls(out, logw, tokens.shape[1])
