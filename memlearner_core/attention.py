"""Attention primitives shared by both memories.

All functions take and return ComfyUI's layout, ``[B, L, H*D]`` with ``heads=H``, so that the host's own
attention selection (ComfyUI's ``optimized_attention``, with any ``optimized_attention_override`` a node installed)
can be passed in as ``attn``. Patterns are composed from separate calls over concatenated keys/values: no dense
``L x L`` mask is ever built.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

AttnFn = Callable[..., torch.Tensor]
log = logging.getLogger("memlearner")


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None,
                   **_) -> torch.Tensor:
    """Plain fused attention, ``[B, Lq, H*D] x [B, Lk, H*D] -> [B, Lq, H*D]``; ``mask`` an additive float bias
    broadcastable to ``[B, H, Lq, Lk]`` (ComfyUI's convention)."""
    q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=heads) for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "b h l d -> b l (h d)")


@dataclass
class MemoryKV:
    """Keys/values of memory tokens for one attention layer.

    k, v: ``[B, U, H*D]``; log_weight: ``[B, U]`` or None. A key with log_weight ``w`` counts as ``exp(w)``
    identical copies of itself (``ln`` of its multiplicity plus ``ln`` of the memory strength); None means
    every key counts once, and then memory keys can simply join the main fused call.
    """

    k: torch.Tensor
    v: torch.Tensor
    log_weight: torch.Tensor | None = None

    def expand_batch(self, batch: int) -> MemoryKV:
        if self.k.shape[0] == batch:
            return self
        if batch % self.k.shape[0]:
            raise ValueError(f"memory batch {self.k.shape[0]} does not divide the attention batch {batch}")
        r = batch // self.k.shape[0]
        lw = None if self.log_weight is None else self.log_weight.repeat(r, 1)
        return MemoryKV(self.k.repeat(r, 1, 1), self.v.repeat(r, 1, 1), lw)


def key_bias(log_weight: torch.Tensor, n_main: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive logit bias ``[B, 1, 1, n_main + U]`` for keys ``[k; k_mem]``: 0 on the main keys, the memory
    keys' log-weights on theirs. A per-key row broadcast over heads and queries: never an ``Lq x Lk`` tensor.
    In half precision the bias is rounded like the logits it is added to."""
    b, u = log_weight.shape
    bias = torch.zeros(b, 1, 1, n_main + u, device=log_weight.device, dtype=dtype)
    bias[:, 0, 0, n_main:] = log_weight.to(dtype)
    return bias


def exact_weighted_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                             bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D) + bias) v`` in float32 math, chunked over queries: the exact fallback for an
    attention function that cannot take a mask. ``bias [B, 1, 1, Lk]``; returns ``[B, Lq, H*D]``."""
    qh, kh, vh = (rearrange(t, "b l (h d) -> b h l d", h=heads).float() for t in (q, k, v))
    scale = 1.0 / math.sqrt(qh.shape[-1])
    outs = [((qc @ kh.transpose(-1, -2)) * scale + bias.float()).softmax(-1) @ vh for qc in qh.split(4096, dim=2)]
    return rearrange(torch.cat(outs, 2), "b h l d -> b l (h d)").to(q.dtype)


def attention_with_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    memory: MemoryKV | None = None,
    attn: AttnFn = sdpa_attention,
) -> torch.Tensor:
    """``softmax(q [k; k_mem]^T) [v; v_mem]`` with memory keys weighted by their log-weights, one ``attn`` call.

    Unweighted memory joins the call as plain keys (the official DiT-Mem injection). Weighted memory
    (de-duplicated tokens, or a strength other than 1) joins it too, with its log-weights as an additive key
    bias (``mask``): exact, since a key counted ``n`` times adds ``n exp(s)`` to the softmax sum. An ``attn``
    without a ``mask`` parameter, or one that refuses it, falls back to ``exact_weighted_attention``.
    """
    if memory is None:
        return attn(q, k, v, heads=heads)
    memory = memory.expand_batch(q.shape[0])
    k, v = torch.cat([k, memory.k.to(k)], 1), torch.cat([v, memory.v.to(v)], 1)
    if memory.log_weight is None:
        return attn(q, k, v, heads=heads)
    bias = key_bias(memory.log_weight.to(q.device), k.shape[1] - memory.k.shape[1], q.dtype)
    if takes_mask(attn):
        try:
            return attn(q, k, v, heads=heads, mask=bias)
        except (TypeError, NotImplementedError) as e:
            log.warning("memlearner: the attention function refused a mask (%s); weighted memory computed exactly "
                        "in float32 math instead", e)
    return exact_weighted_attention(q, k, v, heads, bias)


def takes_mask(attn: AttnFn) -> bool:
    """Whether ``attn`` names a ``mask`` parameter (one that swallows ``**kwargs`` could silently drop it)."""
    try:
        return "mask" in inspect.signature(attn).parameters
    except (TypeError, ValueError):
        return False
