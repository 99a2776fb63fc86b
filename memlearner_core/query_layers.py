"""MemLearner's attention pattern, as separate fused calls over concatenated keys/values.

The DiT's sequence holds ``[Q; P]`` (query tokens first, then the predicted tokens). The context tokens C are
never queries, so their hidden state never changes: in each query layer only their keys/values exist, computed
once per chunk (``ContextKV``) and handed in here. Who reads what:

    query layer       Q reads [C; P]     P reads [Q; P]
    generative layer  Q reads P          P reads [Q; P]

Memory tokens (DiT-Mem), when present, are extra keys that every query reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import AttnFn, MemoryKV, attention_with_memory, sdpa_attention


@dataclass
class ContextKV:
    """Keys/values of the context tokens in one query layer: ``[B, Nc, H*D]`` each (RoPE applied to k)."""

    k: torch.Tensor
    v: torch.Tensor

    def expand_batch(self, batch: int) -> ContextKV:
        if self.k.shape[0] == batch:
            return self
        return ContextKV(self.k.expand(batch, -1, -1), self.v.expand(batch, -1, -1))


def query_memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    n_query: int,
    context: ContextKV | None,
    memory: MemoryKV | None = None,
    attn: AttnFn = sdpa_attention,
) -> torch.Tensor:
    """Self-attention of the sequence ``[Q; P]`` (``q, k, v: [B, Nq+Np, H*D]``) under MemLearner's pattern.

    ``context`` is the layer's C keys/values in a query layer and None in a generative layer (or with an empty
    history). Returns ``[B, Nq+Np, H*D]``.
    """
    q_q, q_p = q[:, :n_query], q[:, n_query:]
    k_p, v_p = k[:, n_query:], v[:, n_query:]
    if context is not None and context.k.shape[1] > 0:
        context = context.expand_batch(q.shape[0])
        k_p = torch.cat([context.k.to(k_p), k_p], 1)
        v_p = torch.cat([context.v.to(v_p), v_p], 1)
    out_q = attention_with_memory(q_q, k_p, v_p, heads, memory, attn)
    out_p = attention_with_memory(q_p, k, v, heads, memory, attn)
    return torch.cat([out_q, out_p], 1)
