"""The one module that reaches into diffusers' Wan internals (``WanTransformer3DModel``, diffusers 0.33+: Wan2.1,
the Wan2.2 A14B experts and Wan2.2 TI2V-5B).

Everything that depends on how diffusers lays out a Wan block lives here: the modulation table
(``scale_shift_table``), ``norm1``, the self-attention projections (``attn1.to_q/to_k/to_v``, ``norm_q/norm_k``),
the RoPE tables as ``(cos, sin)`` pairs, the timestep embedding. Tensors use the core's layout ``[B, L, H*D]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from memlearner_core.attention import MemoryKV
from memlearner_core.model_family import SUPPORTED, WanFamily, text_to_video_family
from memlearner_core.query_layers import ContextKV

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [1, L, 1, D] with every frequency repeated twice
ROPE_THETA = 10000.0  # WanRotaryPosEmbed's default, which every released Wan2.1 uses


class UnsupportedModel(ValueError):
    """The transformer is not a ``WanTransformer3DModel`` of a family the memories run on."""


def wan_family(transformer) -> WanFamily:
    """The family of a text-to-video ``WanTransformer3DModel`` (told by its input and output channels: 16 Wan2.1
    and each Wan2.2 T2V-A14B expert, 48 Wan2.2 TI2V-5B), else ``UnsupportedModel`` in one line naming what it
    is and what is supported."""
    if not isinstance(transformer, WanTransformer3DModel):
        raise UnsupportedModel(f"memory needs diffusers' WanTransformer3DModel, got {type(transformer).__name__}")
    cfg = transformer.config
    out = cfg.out_channels or cfg.in_channels
    family = text_to_video_family(cfg.in_channels, out)
    if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None:
        found = f"an image-to-video transformer (image_dim {cfg.image_dim}: a CLIP image embedding in cross-attention)"
    elif cfg.in_channels != out:
        found = (f"an image-to-video or control transformer ({cfg.in_channels} input channels for {out} latent "
                 f"channels: image or control channels concatenated)")
    elif family is None or tuple(cfg.patch_size) != (1, 2, 2):
        found = f"a transformer with {out} latent channels and patch {tuple(cfg.patch_size)}"
    else:
        return family
    raise UnsupportedModel(f"memory needs a Wan text-to-video WanTransformer3DModel of a supported family "
                           f"({SUPPORTED}); got {found}")


def patch_size(transformer) -> tuple[int, int, int]:
    return tuple(transformer.config.patch_size)


def block_modulation(block, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The block's six shift/scale/gate tensors ``[B, 1, C]`` (float32, as diffusers computes them) for the
    step's ``temb [B, 6, C]`` (``timestep_proj``, what every block receives)."""
    if temb.ndim != 3:  # per-token [B, L, 6, C] (Wan2.2 TI2V-5B): the caller takes the noisy tokens' level
        raise ValueError(f"block_modulation takes one modulation per sample [B, 6, C], got {tuple(temb.shape)}")
    return (block.scale_shift_table.to(temb.device) + temb.float()).chunk(6, dim=1)


def modulated_norm1(block, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """``norm1(x) * (1 + scale) + shift`` for tokens ``x [B, L, C]``: the self-attention input of ``block``."""
    shift, scale = block_modulation(block, temb)[:2]
    return (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)


def apply_rope(x: torch.Tensor, rope: Rope, heads: int) -> torch.Tensor:
    """RoPE on ``x [B, L, H*D]`` with tables ``(cos, sin) [1, L, 1, D]``: each adjacent pair ``(x[2i], x[2i+1])``
    rotated by its angle, as diffusers' Wan processor does."""
    cos, sin = rope
    xh = x.unflatten(2, (heads, -1))
    x1, x2 = xh.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.type_as(x).flatten(2)


def key_value(attn, h: torch.Tensor, rope: Rope | None):
    """Self-attention keys (RMSNorm, RoPE when given) and values of modulated states ``h [B, L, C]``."""
    k = attn.norm_k(attn.to_k(h))
    return (k if rope is None else apply_rope(k, rope, attn.heads)), attn.to_v(h)


def qkv(attn, h: torch.Tensor, rope: Rope | None):
    """``q, k, v [B, L, H*D]`` of modulated states, RoPE on q and k (the unfused projections: a fused ``to_qkv``
    holds the same weights)."""
    q = attn.norm_q(attn.to_q(h))
    return (q if rope is None else apply_rope(q, rope, attn.heads)), *key_value(attn, h, rope)


def memory_kv(block, tokens: torch.Tensor, temb: torch.Tensor, log_weight: torch.Tensor | None,
              dtype: torch.dtype) -> MemoryKV:
    """DiT-Mem keys/values of memory tokens ``[Bm, U, C]`` in ``block``: norm1 with this step's modulation, the
    block's frozen k/v projections and RMSNorm, no RoPE (their output rows would be dropped, so no q)."""
    b = temb.shape[0]
    tokens = tokens.to(device=temb.device, dtype=dtype)
    if tokens.shape[0] != b:
        tokens = tokens.expand(b, -1, -1)
    k, v = key_value(block.attn1, modulated_norm1(block, tokens, temb), None)
    lw = None if log_weight is None else log_weight.to(temb.device).expand(b, -1)
    return MemoryKV(k, v, lw)


def context_kv(block, tokens: torch.Tensor, temb_clean: torch.Tensor, rope: Rope) -> ContextKV:
    """Query-layer keys/values of history tokens ``[1, Nc, C]`` at their RoPE positions, modulated at t=0."""
    return ContextKV(*key_value(block.attn1, modulated_norm1(block, tokens, temb_clean), rope))


def pad_to_patch(latent: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """``[B, C, T, H, W]`` padded at the end of each axis to a multiple of the patch, circularly (how ComfyUI pads
    a partial patch; only pooled history frames can have one here)."""
    pad = []
    for size, p in zip(reversed(latent.shape[2:]), reversed(patch), strict=True):
        pad += [0, (p - size % p) % p]
    return F.pad(latent, pad, mode="circular") if any(pad) else latent


def embed_latent(transformer, latent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Patch-embed latents ``[B, C, T, H, W]`` -> tokens ``[B, T*h*w, C]`` (partial patches padded)."""
    w = transformer.patch_embedding.weight
    latent = pad_to_patch(latent.to(device=w.device, dtype=w.dtype), patch_size(transformer))
    return transformer.patch_embedding(latent).flatten(2).transpose(1, 2).to(dtype)


def time_modulation(transformer, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``timestep_proj [B, 6, C]`` for timesteps ``t [B]``, computed as the transformer's forward does."""
    ce = transformer.condition_embedder
    emb = ce.timesteps_proj(t.flatten())
    emb = emb.to(next(ce.time_embedder.parameters()).dtype)
    temb = ce.time_embedder(emb).to(dtype)
    return ce.time_proj(ce.act_fn(temb)).unflatten(1, (6, -1))


def rope_for_latent(transformer, latent: torch.Tensor) -> Rope:
    """The transformer's own RoPE tables for the tokens of ``latent [B, C, T, H, W]``."""
    return transformer.rope(latent)


def rope_from_ids(transformer, ids: torch.Tensor, device) -> Rope:
    """RoPE tables ``(cos, sin) [1, N, 1, D]`` for explicit (time, row, column) positions ``ids [N, 3]`` (negative
    or fractional allowed), through diffusers' own 1D table function in float64, split per axis as
    ``WanRotaryPosEmbed`` splits the head dimension."""
    rope = transformer.rope
    coss, sins = [], []
    for axis, dim in enumerate((rope.t_dim, rope.h_dim, rope.w_dim)):
        cos, sin = get_1d_rotary_pos_embed(dim, ids[:, axis].double(), ROPE_THETA, use_real=True,
                                           repeat_interleave_real=True, freqs_dtype=torch.float64)
        coss.append(cos)
        sins.append(sin)
    dtype = rope.freqs_cos.dtype
    return tuple(torch.cat(t, dim=1).to(device=device, dtype=dtype)[None, :, None, :] for t in (coss, sins))


def cat_rope(*tables: Rope) -> Rope:
    """Tables of consecutive token runs -> the tables of their concatenation."""
    return torch.cat([t[0] for t in tables], 1), torch.cat([t[1] for t in tables], 1)


def host_attention(backend=None):
    """``attn(q, k, v, heads) [B, L, H*D]`` through diffusers' attention dispatcher (the backend the processor
    was set to, e.g. by ``transformer.set_attention_backend``), for the core's attention functions."""

    def attn(q, k, v, heads, **_):
        qh, kh, vh = (t.unflatten(2, (heads, -1)) for t in (q, k, v))
        return dispatch_attention_fn(qh, kh, vh, backend=backend).flatten(2).type_as(q)

    return attn
