"""Wan2.1 weights between ComfyUI's single-file layout and diffusers' ``WanTransformer3DModel`` layout.

ComfyUI's single file (``wan2.1_t2v_1.3B_fp16.safetensors``) uses the original Wan keys (``blocks.0.self_attn.q``),
sometimes under a ``model.diffusion_model.`` prefix; diffusers (``Wan2.1-T2V-1.3B-Diffusers/transformer``) renames
every module (``blocks.0.attn1.to_q``). The tensors are the same, one for one, with the same shapes: the
conversion is a renaming, exact both ways. Two names swap meaning: ComfyUI's ``norm3`` (the affine norm before
cross-attention) is diffusers' ``norm2``; the norms before self-attention and the MLP have no weights in either.
"""

from __future__ import annotations

import math
import os
import re

import torch

from memlearner_core.checkpoint_io import read_safetensors

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# Whole-model keys, ComfyUI -> diffusers (module paths: ".weight"/".bias" follow).
_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    # image-to-video: CLIP image embedding
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}

# Per-block keys, ComfyUI -> diffusers, after ``blocks.N.``.
_BLOCK = {
    "modulation": "scale_shift_table",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
for _ours, _theirs in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    for _a, _b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"),
                   ("norm_k", "norm_k")):
        _BLOCK[f"{_ours}.{_a}"] = f"{_theirs}.{_b}"
_BLOCK.update({"cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
               "cross_attn.norm_k_img": "attn2.norm_added_k"})

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(key: str, top: dict[str, str], block: dict[str, str]) -> str | None:
    m = _BLOCK_KEY.match(key)
    table, rest, prefix = (block, m.group(2), f"blocks.{m.group(1)}.") if m else (top, key, "")
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return prefix + dst + rest[len(src):]
    return None


def strip_comfy_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for p in COMFY_PREFIXES:
        if any(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return dict(sd)


def _convert(sd: dict[str, torch.Tensor], top: dict[str, str], block: dict[str, str], what: str):
    out, unknown = {}, []
    for k, v in sd.items():
        new = _rename(k, top, block)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise ValueError(f"not {what}: unknown keys {', '.join(sorted(unknown)[:8])}")
    return out


def comfy_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ComfyUI / original-Wan state dict -> diffusers' ``WanTransformer3DModel`` keys (same tensors).

    Unknown keys are refused by name, so a file of another architecture never loads half-converted."""
    return _convert(strip_comfy_prefix(sd), _TOP, _BLOCK, "a Wan2.1 state dict in ComfyUI's layout")


_TOP_BACK = {v: k for k, v in _TOP.items()}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}


def comfy_module_name(name: str) -> str:
    """A diffusers module path (``blocks.0.attn1.to_q``) -> ComfyUI's (``blocks.0.self_attn.q``)."""
    new = _rename(name, _TOP_BACK, _BLOCK_BACK)
    if new is None:
        raise ValueError(f"{name}: not a module of diffusers' WanTransformer3DModel that ComfyUI's Wan has")
    return new


def diffusers_to_comfy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' ``WanTransformer3DModel`` state dict -> ComfyUI's single-file keys (no prefix; ComfyUI's
    loaders accept both). Fused projections (``to_qkv``/``to_kv``) are split back into q, k, v."""
    return _convert(_unfuse(sd), _TOP_BACK, _BLOCK_BACK, "a diffusers WanTransformer3DModel state dict")


def _unfuse(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        m = re.match(r"^(.*)\.(to_qkv|to_kv|to_added_kv)\.(weight|bias)$", k)
        if m is None:
            out[k] = v
            continue
        names = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
                 "to_added_kv": ("add_k_proj", "add_v_proj")}[m.group(2)]
        for name, part in zip(names, v.chunk(len(names), dim=0), strict=True):
            out.setdefault(f"{m.group(1)}.{name}.{m.group(3)}", part)
    return out


def diffusers_config(sd: dict[str, torch.Tensor]) -> dict:
    """``WanTransformer3DModel`` config for a ComfyUI-layout Wan2.1 state dict, read from its tensor shapes.

    Every released Wan2.1 has 128-wide heads (ComfyUI assumes the same: ``num_heads = dim // 128``)."""
    sd = strip_comfy_prefix(sd)
    pe = sd["patch_embedding.weight"]  # [dim, in, pt, ph, pw]
    dim, patch = pe.shape[0], tuple(pe.shape[2:])
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k)))
    image_dim = sd["img_emb.proj.0.weight"].shape[0] if "img_emb.proj.0.weight" in sd else None
    pos = sd.get("img_emb.emb_pos")
    return dict(
        patch_size=patch, num_attention_heads=dim // 128, attention_head_dim=128, in_channels=pe.shape[1],
        out_channels=sd["head.head.weight"].shape[0] // math.prod(patch), text_dim=sd["text_embedding.0.weight"].shape[1],
        freq_dim=sd["time_embedding.0.weight"].shape[1], ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], num_layers=layers,
        cross_attn_norm="blocks.0.norm3.weight" in sd, qk_norm="rms_norm_across_heads", eps=1e-6,
        image_dim=image_dim, added_kv_proj_dim=dim if "blocks.0.cross_attn.k_img.weight" in sd else None,
        pos_embed_seq_len=None if pos is None else pos.shape[1],
    )


def transformer_from_comfy(sd_or_path: dict[str, torch.Tensor] | str | os.PathLike):
    """A ``WanTransformer3DModel`` holding a ComfyUI-layout Wan2.1 (a state dict, or a safetensors file read
    without unpickling anything): every tensor must find its place (strict). The tensors keep the file's dtype;
    ``.to(dtype)`` as with any diffusers model. Unlike ``WanTransformer3DModel.from_single_file`` nothing is
    downloaded: the config is read from the tensor shapes."""
    from diffusers import WanTransformer3DModel

    sd = sd_or_path if isinstance(sd_or_path, dict) else read_safetensors(sd_or_path)[0]
    with torch.device("meta"):
        model = WanTransformer3DModel(**diffusers_config(sd))
    model.load_state_dict(comfy_to_diffusers(sd), strict=True, assign=True)
    # the RoPE tables are buffers outside the state dict: made again, on the CPU, as the constructor makes them
    model.rope = type(model.rope)(model.rope.attention_head_dim, model.rope.patch_size, model.rope.max_seq_len)
    return model.eval()
