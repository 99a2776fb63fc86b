"""Tiny Wan2.1-shaped checkpoints with random weights, built from ComfyUI's own model classes.

Written into a ComfyUI models folder (by the demo without the real weights, and once per test session), so they
load through ComfyUI's real loaders; their text conditioning is the custom node in ``TINY_NODES``. ComfyUI
detects Wan's head count as ``dim // 128``, so the tiny DiT is 256 wide with 2 heads. Call
``server.prepare_imports()`` before building them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_WAN = dict(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=4, in_dim=16, out_dim=16,
                text_dim=4096, freq_dim=256, text_len=512)
TINY_WAN22_5B = {**TINY_WAN, "in_dim": 48, "out_dim": 48}  # Wan2.2 TI2V-5B's shape: 48 latent channels in and out
TINY_VAE_DIM = 16
TINY_ENCODER = dict(hidden_channels=(32, 48), width=256, latent_shape=(13, 16, 16), tokens_per_video=100, heads=8)

WAN_FILE = "tiny_wan21_t2v.safetensors"
WAN22_5B_FILE = "tiny_wan22_ti2v_5b.safetensors"  # ComfyUI detects it as WAN22_T2V (model_base.WAN22, Wan22 latents)
VAE_FILE = "tiny_wan21_vae.safetensors"
ENCODER_FILE = "tiny_dit_mem.safetensors"
WAN22_ENCODER_FILE = "tiny_dit_mem_wan22.safetensors"  # 48 input channels, written by the tests that use it
TINY_NODES = Path(__file__).resolve().parent / "comfy_nodes"  # custom-node folder: random text conditioning


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Seeded weights with unit-variance outputs (fan-in scaling), small modulations, unit norm gains."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif "norm" in name or "gamma" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        for name, p in module.named_parameters():
            if name.endswith("modulation"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def tiny_wan(seed: int = 0):
    import comfy.ldm.wan.model
    import comfy.ops

    model = comfy.ldm.wan.model.WanModel(**TINY_WAN, operations=comfy.ops.disable_weight_init)
    randomize(model, seed)
    return model


def tiny_wan22_5b(seed: int = 5):
    """A tiny Wan2.2 TI2V-5B-shaped DiT: ComfyUI's own WanModel with 48 latent channels."""
    import comfy.ldm.wan.model
    import comfy.ops

    model = comfy.ldm.wan.model.WanModel(**TINY_WAN22_5B, operations=comfy.ops.disable_weight_init)
    randomize(model, seed)
    return model


def tiny_vae(seed: int = 1):
    import comfy.ldm.wan.vae

    vae = comfy.ldm.wan.vae.WanVAE(dim=TINY_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                   attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    randomize(vae, seed)
    return vae


def tiny_wan22_vae(seed: int = 3):
    """ComfyUI's Wan2.2 VAE (``vae2_2.WanVAE``: 48 channels, 16x spatial and 4x temporal compression) at 16 wide
    (3.9M parameters), loaded by ``comfy.sd.VAE`` as it loads the real one. ComfyUI builds that VAE at its fixed
    full width, so the load goes through a subclass that keeps the width of the tiny weights."""
    from unittest import mock

    import comfy.ldm.wan.vae2_2 as vae2_2
    import comfy.sd

    class TinyWan22VAE(vae2_2.WanVAE):
        def __init__(self, dim=160, dec_dim=256, **kw):
            super().__init__(dim=TINY_VAE_DIM, dec_dim=TINY_VAE_DIM, **kw)

    weights = TinyWan22VAE(z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], dropout=0.0)
    randomize(weights, seed)
    with mock.patch.object(vae2_2, "WanVAE", TinyWan22VAE):
        return comfy.sd.VAE(sd=weights.state_dict())


def tiny_encoder(seed: int = 2, **config):
    """The tiny DiT-Mem encoder (``TINY_ENCODER``, ``config`` overriding it: ``in_channels=48`` for Wan2.2)."""
    from memlearner_core.memory_encoder import EncoderConfig, MemoryEncoder

    enc = MemoryEncoder(EncoderConfig(**{**TINY_ENCODER, **config}))
    randomize(enc, seed)
    return enc


def write_official_encoder(enc, path: Path, prefix: str = "pipe.dit_mem.", dtype=torch.bfloat16) -> None:
    """The released file's layout: prefixed parameters only (no BatchNorm statistics, no metadata), bf16."""
    sd = {prefix + k: v.detach().to(dtype).contiguous() for k, v in enc.named_parameters()}
    save_file(sd, str(path))


def model_paths(models_dir: Path) -> dict[str, Path]:
    """Where the tiny checkpoints go in a ComfyUI-style models folder."""
    return {
        "wan": models_dir / "diffusion_models" / WAN_FILE,
        "wan22_5b": models_dir / "diffusion_models" / WAN22_5B_FILE,
        "vae": models_dir / "vae" / VAE_FILE,
        "encoder": models_dir / "memory_encoders" / ENCODER_FILE,
    }


def write_models(models_dir: Path) -> dict[str, Path]:
    """Write every tiny checkpoint into a ComfyUI-style models folder; returns their paths."""
    from memlearner_core.checkpoint_io import save_memory_encoder

    paths = model_paths(models_dir)
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tiny_wan().state_dict().items()}, str(paths["wan"]))
    save_file({k: v.contiguous() for k, v in tiny_wan22_5b().state_dict().items()}, str(paths["wan22_5b"]))
    save_file({k: v.contiguous() for k, v in tiny_vae().state_dict().items()}, str(paths["vae"]))
    save_memory_encoder(tiny_encoder(), paths["encoder"])
    for folder in ("memlearner", "loras"):
        (models_dir / folder).mkdir(exist_ok=True)
    copy_toy_model(models_dir)
    return paths


TOY_MODEL = Path(__file__).resolve().parent / "revisit_model"  # diffusion_models/, memlearner/ of the toy model
DOOM_MODEL = Path(__file__).resolve().parent / "doom_model"  # the Doom world's model: diffusion_models/, memlearner/, vae/


def copy_toy_model(models_dir: Path) -> None:
    """Put the small models shipped with the pack (the revisit world's toy model, the Doom world's model and VAE)
    into a ComfyUI models folder; a copy that differs from the shipped file in any byte (an older toy model has the
    same size) is replaced."""
    import filecmp
    import shutil

    shipped = [*TOY_MODEL.glob("*/*.safetensors")]
    for folder in ("diffusion_models", "memlearner", "vae"):
        shipped += DOOM_MODEL.glob(f"{folder}/*.safetensors")
    for src in shipped:
        dst = models_dir / src.parent.name / src.name
        if not dst.is_file() or not filecmp.cmp(src, dst, shallow=False):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)


def write_video(path, seed: int, frames: int = 6, size: int = 48) -> None:
    """A short random mp4, written by ComfyUI's own video writer."""
    from fractions import Fraction

    from comfy_api.latest import InputImpl, Types

    g = torch.Generator().manual_seed(seed)
    images = torch.rand(frames, size, size, 3, generator=g)
    InputImpl.VideoFromComponents(Types.VideoComponents(images=images, frame_rate=Fraction(8))).save_to(str(path))
