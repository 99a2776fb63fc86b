"""Attention primitives shared by both memories.

All functions take and return ComfyUI's layout, ``[B, L, H*D]`` with ``heads=H``, so that the host's own
attention kernel (ComfyUI's ``optimized_attention``) can be passed in as ``attn``. Patterns are composed from
separate calls over concatenated keys/values: no dense ``L x L`` mask is ever built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

AttnFn = Callable[..., torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, **_) -> torch.Tensor:
    """Plain fused attention, ``[B, Lq, H*D] x [B, Lk, H*D] -> [B, Lq, H*D]``."""
    q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=heads) for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)")


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int):
    """Fused attention that also returns the log-sum-exp of the logits.

    Returns ``out [B, Lq, H*D]`` and ``lse [B, H, Lq]`` (float32). The log-sum-exp lets a second, small
    attention (memory keys with per-key biases) be merged exactly without re-running this one.
    """
    qh, kh, vh = (rearrange(t, "b l (h d) -> b h l d", h=heads) for t in (q, k, v))
    out = lse = None
    if qh.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh)[:2]
    elif qh.device.type == "cuda":
        if qh.dtype in (torch.float16, torch.bfloat16) and qh.shape[-1] <= 256 and qh.shape[-1] % 8 == 0:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qh, kh, vh, None, True)[:2]
        lse = lse[..., : qh.shape[2]]  # the efficient kernel pads the query axis
    if out is None:  # any other device: exact math, chunked over queries to bound memory
        scale = 1.0 / math.sqrt(qh.shape[-1])
        outs, lses = [], []
        for qc in qh.split(4096, dim=2):
            s = (qc.float() @ kh.float().transpose(-1, -2)) * scale
            lses.append(torch.logsumexp(s, dim=-1))
            outs.append((s.softmax(-1) @ vh.float()).to(qh.dtype))
        out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    return rearrange(out, "b h l d -> b l (h d)"), lse.float()


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


def _weighted_memory_attention(q: torch.Tensor, mem: MemoryKV, heads: int):
    """Explicit attention over a few memory keys with per-key log-weights: out ``[B,H,Lq,D]``, lse ``[B,H,Lq]``."""
    qh = rearrange(q, "b l (h d) -> b h l d", h=heads).float()
    kh = rearrange(mem.k, "b u (h d) -> b h u d", h=heads).float()
    vh = rearrange(mem.v, "b u (h d) -> b h u d", h=heads).float()
    s = (qh @ kh.transpose(-1, -2)) / math.sqrt(qh.shape[-1])
    if mem.log_weight is not None:
        s = s + mem.log_weight.float()[:, None, None, :]
    return s.softmax(-1) @ vh, torch.logsumexp(s, dim=-1)


def attention_with_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    memory: MemoryKV | None = None,
    attn: AttnFn = sdpa_attention,
) -> torch.Tensor:
    """``softmax(q [k; k_mem]^T) [v; v_mem]`` with memory keys weighted by their log-weights.

    Unweighted memory joins the one fused call (the official DiT-Mem injection). Weighted memory (de-duplicated
    tokens, or a strength other than 1) is attended separately and merged through the log-sum-exp, which is
    exact: ``out = sigmoid(lse_main - lse_mem) * out_main + sigmoid(lse_mem - lse_main) * out_mem``.
    """
    if memory is None:
        return attn(q, k, v, heads=heads)
    memory = memory.expand_batch(q.shape[0])
    if memory.log_weight is None:
        return attn(q, torch.cat([k, memory.k.to(k)], 1), torch.cat([v, memory.v.to(v)], 1), heads=heads)
    out_main, lse_main = attention_with_lse(q, k, v, heads)
    out_mem, lse_mem = _weighted_memory_attention(q, memory, heads)
    w_main = torch.sigmoid(lse_main - lse_mem).unsqueeze(-1)  # [B, H, Lq, 1]
    out_main = rearrange(out_main, "b l (h d) -> b h l d", h=heads).float()
    out = w_main * out_main + (1.0 - w_main) * out_mem
    return rearrange(out, "b h l d -> b l (h d)").to(q.dtype)
