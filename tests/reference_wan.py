"""Straightforward reference implementations of both methods on a ComfyUI WanModel, for equivalence tests.

Written the obvious way: the whole sequence in one tensor, per-token time modulation, dense boolean attention
masks, tokens appended and rows dropped. Slow and memory-hungry on purpose; never used by the pack.
"""

from __future__ import annotations

import copy

import comfy.ldm.wan.model as wan
import torch
import torch.nn.functional as F
from comfy.ldm.flux.math import apply_rope1
from einops import rearrange


def on_cpu_float32(dm):
    """The model itself when it is all float32 on the CPU, else a float32 CPU copy: the references run there,
    whatever device and dtype ComfyUI loaded the model to (inputs ``[B, ...]`` on the CPU)."""
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in dm.parameters()):
        return dm
    return copy.deepcopy(dm).to("cpu", torch.float32)


def embed(dm, latent):
    return dm.patch_embedding(latent.float()).flatten(2).transpose(1, 2)


def time_mod(dm, t):
    """Per-sample ``e [B, 1, C]`` (head) and ``e0 [B, 1, 6, C]`` (blocks) for timesteps ``t [B]``."""
    e = dm.time_embedding(wan.sinusoidal_embedding_1d(dm.freq_dim, t).float()).unsqueeze(1)
    return e, dm.time_projection(e).unflatten(2, (6, dm.dim))


def dense_block(block, x, e0_tok, freqs, ctx, mask=None, rope_rows=None):
    """One Wan block on ``x [B, L, C]`` with per-token modulation ``e0_tok [B, L, 6, C]`` and an optional dense
    boolean mask ``[L, L]`` (True = may attend). RoPE on the first ``rope_rows`` rows only (all by default)."""
    e = (block.modulation.unsqueeze(0) + e0_tok).unbind(2)
    sa = block.self_attn
    h = block.norm1(x) * (1 + e[1]) + e[0]
    q, k, v = sa.norm_q(sa.q(h)), sa.norm_k(sa.k(h)), sa.v(h)
    n = rope_rows if rope_rows is not None else x.shape[1]
    b, heads, d = x.shape[0], sa.num_heads, sa.head_dim
    q = torch.cat([apply_rope1(q[:, :n].view(b, n, heads, d), freqs).view(b, n, -1), q[:, n:]], 1)
    k = torch.cat([apply_rope1(k[:, :n].view(b, n, heads, d), freqs).view(b, n, -1), k[:, n:]], 1)
    qh, kh, vh = (rearrange(t, "b l (h d) -> b h l d", h=heads) for t in (q, k, v))
    a = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    y = sa.o(rearrange(a, "b h l d -> b l (h d)"))
    x = x + y * e[2]
    x = x + block.cross_attn(block.norm3(x), ctx, context_img_len=None)
    return x + block.ffn(block.norm2(x) * (1 + e[4]) + e[3]) * e[5]


def head(dm, x, e, latent_shape):
    grid = [n // p for n, p in zip(latent_shape, dm.patch_size, strict=True)]
    return dm.unpatchify(dm.head(x, e), grid)


@torch.no_grad()
def dit_mem_reference(dm, x, t, txt, memory):
    """Official DiT-Mem: memory tokens ``[B, M, C]`` appended to the sequence in every block (norm1, modulation,
    q/k/v, no RoPE), their output rows dropped."""
    grid = x.shape[2:]
    tok = embed(dm, x)
    L = tok.shape[1]
    e, e0 = time_mod(dm, t)
    ctx = dm.text_embedding(txt)
    freqs = dm.rope_encode(*grid, device=x.device, dtype=x.dtype)
    mem = memory.expand(x.shape[0], -1, -1)
    for block in dm.blocks:
        seq = torch.cat([tok, mem], 1)
        e_tok = e0.expand(-1, seq.shape[1], -1, -1)
        tok = dense_block(block, seq, e_tok, freqs, ctx, rope_rows=L)[:, :L]
    return head(dm, tok, e, grid)


def query_masks(nc, nq, npred, query_layer: bool):
    """Dense masks of MemLearner's pattern over ``[C; Q; P]`` (query layer) or ``[Q; P]`` (generative layer)."""
    if query_layer:
        L = nc + nq + npred
        m = torch.zeros(L, L, dtype=torch.bool)
        c, q, p = slice(0, nc), slice(nc, nc + nq), slice(nc + nq, L)
        m[c, c] = True  # C rows are discarded; any non-empty row keeps softmax finite
        m[q, c] = True
        m[q, p] = True
        m[p, q] = True
        m[p, p] = True
        return m
    L = nq + npred
    m = torch.zeros(L, L, dtype=torch.bool)
    m[:nq, nq:] = True
    m[nq:, :] = True
    return m


@torch.no_grad()
def query_memory_reference(dm, x, t, txt, context_latent, context_freqs, q_noise, query_layers, q_freqs=None,
                           camera=(0, 0, 0), p_freqs=None, t_query=None):
    """MemLearner on ``[C; Q; P]`` with dense masks: C at t=0 and unchanged through the query layers, dropped
    after them; Q at P's positions (or ``q_freqs``) and timestep; only P reaches the head. ``camera``: per-token
    camera vectors ``[N, C]`` added to the embedded C, Q and P tokens (0 for none). ``p_freqs``: P's RoPE tables
    (default the regular grid). ``t`` may be per frame of P, ``[B, T]``; Q's timestep is then ``t_query [B]``."""
    dm = on_cpu_float32(dm)
    grid = x.shape[2:]
    b = x.shape[0]
    c_cam, q_cam, p_cam = camera
    p = embed(dm, x) + p_cam
    qtok = embed(dm, q_noise) + q_cam
    c = embed(dm, context_latent.unsqueeze(0)).expand(b, -1, -1) + c_cam if context_latent is not None else p[:, :0]
    nc, nq, npred = c.shape[1], qtok.shape[1], p.shape[1]
    if t.ndim == 1:  # per sample: e [B, 1, C], e0 [B, 1, 6, C]
        e, e0 = time_mod(dm, t)
        e0_q = e0
    else:  # one timestep per frame of P: each frame's modulation on its tokens
        e, e0 = time_mod(dm, t.flatten())
        per_frame = npred // t.shape[1]
        e = e.reshape(b, -1, e.shape[-1]).repeat_interleave(per_frame, 1)
        e0 = e0.reshape(b, -1, 6, e0.shape[-1]).repeat_interleave(per_frame, 1)
        e0_q = time_mod(dm, t_query)[1]
    _, e0_clean = time_mod(dm, torch.zeros(1))
    ctx = dm.text_embedding(txt)
    fp = dm.rope_encode(*grid, device=x.device, dtype=x.dtype) if p_freqs is None else p_freqs
    fq = fp if q_freqs is None else q_freqs
    seq = torch.cat([c, qtok, p], 1)
    for i, block in enumerate(dm.blocks):
        if i < query_layers:
            e_tok = torch.cat([e0_clean.expand(b, nc, -1, -1), e0_q.expand(-1, nq, -1, -1),
                               e0.expand(-1, npred, -1, -1)], 1)
            freqs = torch.cat([context_freqs, fq, fp], 1) if nc else torch.cat([fq, fp], 1)
            out = dense_block(block, seq, e_tok, freqs, ctx, query_masks(nc, nq, npred, True))
            seq = torch.cat([seq[:, :nc], out[:, nc:]], 1)  # C is never a query: unchanged
        else:
            if i == query_layers:
                seq = seq[:, nc:]
            e_tok = torch.cat([e0_q.expand(-1, nq, -1, -1), e0.expand(-1, npred, -1, -1)], 1)
            seq = dense_block(block, seq, e_tok, torch.cat([fq, fp], 1), ctx, query_masks(0, nq, npred, False))
    if query_layers >= len(dm.blocks):
        seq = seq[:, nc:]
    return head(dm, seq[:, nq:], e, grid)
