"""What the two memories add to a Wan2.1 forward's memory, for the host's memory estimate. Plain arithmetic.

ComfyUI plans model offload and the cond/uncond batch from ``memory_required(input_shape)``: activation memory
linear in the latent's area. The memories add, per forward of ``B`` samples (bytes, ``s`` bytes per element of the
compute dtype, ``d`` the model width):

- query memory: Q rides in the sequence ``[Q; P]`` of every block (in and out of the query layers alike), so
  every block's activations grow by ``Nq / Np`` of the stock figure; the history ``C`` (``Nc`` tokens, batch 1)
  is kept as tokens plus keys and values for each of the ``K`` query layers (``(2K + 1) Nc d s``; without the
  context cache one layer's keys/values at a time, ``3 Nc d s``), and a query layer joins the history's keys and
  values to P's for the batch, a copy (``2 B (Nc + Np) d s``); with the learned policy ``Nc`` is what one query
  layer reads (its budget), and the history's ``S`` summary tokens are kept with one layer's keys of them
  (``2 S d s``) beside the scores of a chunk of ``c`` query tokens (``2 B H c S`` fp32, ``c`` = 1024);
- DiT-Mem: each block projects the ``U`` memory tokens to keys and values for the batch (``2 B U d s``) and joins
  them to the sequence's ``N = Np + Nq`` keys and values, a copy (``2 B (N + U) d s``); with per-key weights
  (de-duplicated tokens or a strength other than 1) a per-key logit bias goes with them (``B (N + U) s``).

``python -m memlearner_core.memory_estimate`` prints the README's table (the Wan2.1-1.3B shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .context_routing import SCORE_CHUNK, summary_tokens


@dataclass(frozen=True)
class MemoryShape:
    """What the extra memory depends on, besides the latent being sampled.

    ``query_layers`` 0 means no query memory; ``context_tokens`` is ``Nc`` (after pooling and patching);
    ``memory_tokens`` is ``U`` (0: no DiT-Mem), ``weighted_memory`` whether its keys carry log-weights."""

    dim: int
    heads: int
    query_layers: int = 0
    query_pool: int = 1
    context_tokens: int = 0
    cache_context: bool = True
    memory_tokens: int = 0
    weighted_memory: bool = False
    patch: tuple[int, int, int] = (1, 2, 2)
    summary_tokens: int = 0  # the learned policy: S, the history's summary tokens (context_tokens: one layer's read)


def token_counts(input_shape, shape: MemoryShape) -> tuple[int, int, int]:
    """``(B, Np, Nq)`` for a latent ``input_shape [B, C, T, H, W]``: samples, P's tokens, Q's tokens (0 without
    query memory; one per ``pool x pool`` cell of P's token grid)."""
    b, t, h, w = input_shape[0], input_shape[2], input_shape[3], input_shape[4]
    ph, pw = -(-h // shape.patch[1]), -(-w // shape.patch[2])
    n_p = (t // shape.patch[0]) * ph * pw
    if not shape.query_layers:
        return b, n_p, 0
    qh, qw = -(-ph // shape.query_pool), -(-pw // shape.query_pool)
    return b, n_p, (t // shape.patch[0]) * qh * qw


def extra_bytes(stock: float, input_shape, shape: MemoryShape, dtype_bytes: int) -> dict[str, float]:
    """The extra memory, by part, of one forward over ``input_shape [B, C, T, H, W]`` whose stock estimate is
    ``stock`` bytes; ``total`` is their sum. See the module docstring for each part."""
    b, n_p, n_q = token_counts(input_shape, shape)
    d, s, nc = shape.dim, dtype_bytes, shape.context_tokens
    parts = {"query_sequence": stock * n_q / n_p if n_p else 0.0, "context": 0.0, "memory": 0.0}
    if shape.query_layers and nc:
        kept = (2 * shape.query_layers + 1) if shape.cache_context else 3
        parts["context"] = float(kept * nc * d * s + 2 * b * (nc + n_p) * d * s)
        if shape.summary_tokens:  # the summaries, one layer's keys of them, and the scores (fp32, in chunks)
            chunk = min(n_q, SCORE_CHUNK)
            parts["context"] += float(2 * shape.summary_tokens * d * s + 2 * b * shape.heads * chunk * shape.summary_tokens * 4)
    if shape.memory_tokens:
        u, n = shape.memory_tokens, n_p + n_q
        parts["memory"] = float(2 * b * u * d * s + 2 * b * (n + u) * d * s)
        if shape.weighted_memory:
            parts["memory"] += float(b * (n + u) * s)
    parts["total"] = sum(parts.values())
    return parts


def comfy_stock_estimate(input_shape, dim: int, dtype_bytes: int) -> float:
    """ComfyUI's own ``memory_required`` for Wan2.1 (0.3.75 and 0.12.1 alike) with xformers or PyTorch flash
    attention: ``area * dtype_bytes * 0.01 * memory_usage_factor`` MiB, ``area = B*T*H*W`` of the latent and
    ``memory_usage_factor = dim / 2222`` (``supported_models.WAN21_T2V``). For the README's table only: the hook
    always asks the host."""
    area = input_shape[0] * math.prod(input_shape[2:])
    return area * dtype_bytes * 0.01 * (dim / 2222) * 2**20


@dataclass(frozen=True)
class TableShape:
    """A model and one chunk for the README's table: ``latent [B, C, T, H, W]`` (cond + uncond batched, B = 2)."""

    label: str
    dim: int
    heads: int
    latent: tuple[int, int, int, int, int]


TABLE_SHAPES = {
    "wan2.1-1.3b": TableShape("Wan2.1-1.3B (dim 1536, 12 heads, 30 blocks), one 81-frame 480x832 chunk "
                              "(21 x 60 x 104 latent)", 1536, 12, (2, 16, 21, 60, 104)),
    "wan2.2-ti2v-5b": TableShape("Wan2.2-TI2V-5B (dim 3072, 24 heads, 30 blocks), one 121-frame 1280x704 chunk "
                                 "(48 channels, 31 x 44 x 80 latent: the Wan2.2 VAE's 16x16 and 4x)", 3072, 24,
                                 (2, 48, 31, 44, 80)),
}


def readme_table(shape: str = "wan2.1-1.3b") -> str:
    """Extra memory per option at a ``TABLE_SHAPES`` shape, cond + uncond batched, bf16, computed by
    ``extra_bytes``."""
    t = TABLE_SHAPES[shape]
    latent, dim, heads = t.latent, t.dim, t.heads
    stock = comfy_stock_estimate(latent, dim, 2)
    chunk = token_counts(latent, MemoryShape(dim, heads))[1]  # one chunk of history (1.3B: 32,760 tokens)
    rows = [
        ("query memory, 5 query layers, no history", MemoryShape(dim, heads, 5)),
        ("query memory, 5 query layers, 1 chunk of history, context cache",
         MemoryShape(dim, heads, 5, context_tokens=chunk)),
        ("query memory, 5 query layers, 1 chunk of history, no cache",
         MemoryShape(dim, heads, 5, context_tokens=chunk, cache_context=False)),
        ("query memory, 5 query layers, 3 chunks of history, context cache",
         MemoryShape(dim, heads, 5, context_tokens=3 * chunk)),
        ("query memory, query_pool 2, 1 chunk of history, context cache",
         MemoryShape(dim, heads, 5, query_pool=2, context_tokens=chunk)),
        ("query memory, learned policy: each query layer reads 8 of 210 history frames, context cache",
         MemoryShape(dim, heads, 5, context_tokens=8 * chunk // latent[2],
                     summary_tokens=210 * summary_tokens(latent[3], latent[4]))),
        ("DiT-Mem, 5 references, official tokens (1000)", MemoryShape(dim, heads, memory_tokens=1000)),
        ("DiT-Mem, 5 references, de-duplicated (10 weighted)",
         MemoryShape(dim, heads, memory_tokens=10, weighted_memory=True)),
    ]
    mib = 2**20
    out = [f"{t.label}:", "", f"| option (stock estimate {stock / mib:,.0f} MiB) | extra | of which Q in the sequence | "
           f"history | DiT-Mem keys |", "|---|---|---|---|---|"]
    for name, shape_ in rows:
        p = extra_bytes(stock, latent, shape_, 2)
        out.append(f"| {name} | {p['total'] / mib:,.0f} MiB | {p['query_sequence'] / mib:,.0f} MiB | "
                   f"{p['context'] / mib:,.0f} MiB | {p['memory'] / mib:,.1f} MiB |")
    return "\n".join(out)


if __name__ == "__main__":
    print("\n\n".join(readme_table(name) for name in TABLE_SHAPES))
