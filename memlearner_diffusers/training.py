"""``memlearner-train`` with ``host = "diffusers"``: both recipes on diffusers' ``WanTransformer3DModel``.

The loop is the core's (``memlearner_core.training.trainer``: data order, optimizer, accelerate for processes,
mixed precision and gradient accumulation, checkpoints and exact resume) and so are the recipes (``memlearner_core.training.recipes``: what a
step draws, in what order, and the loss), shared with the ComfyUI host (``nodes/training_host.py``); this module
supplies the transformer, its latent space, its forward with the memories and the export layout. So the same
config, data and seed give the same losses on both hosts (to the hosts' own float32 difference). The exports are the files the ComfyUI nodes load (the Wan2.1 in ComfyUI's single-file layout, which
``transformer_from_comfy`` reads back; LoRA in ComfyUI's LoRA format; the query weights; the encoder), so a model
trained here runs in either host. Reads pre-encoded clips (``data_format = "latents"``); no ComfyUI import.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from memlearner_core.checkpoint_io import read_safetensors
from memlearner_core.model_family import WAN21, WanFamily
from memlearner_core.training import recipes as core
from memlearner_core.training.config import TrainConfig
from memlearner_core.training.recipes import LORA_EXPORT, WAN_EXPORT, QueryDraw, TrainableMemory

from . import convert
from . import wan_host as wh
from .memory import QueryMemory, apply_memory, remove_memory

# LoRA on every linear layer of the blocks (as the ComfyUI host): attention projections (self and cross), the MLP
LORA_TARGETS = r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|blocks\.\d+\.ffn\.net\.(0\.proj|2)"


def latent_in(latent: torch.Tensor, family: WanFamily = WAN21) -> torch.Tensor:
    """LATENT samples ``[..., C, T, H, W]`` (as the family's VAE encodes) -> the transformer's space
    ``(z - mean) / std`` with the family's per-channel statistics."""
    c = family.latent_channels
    if latent.ndim < 4 or latent.shape[-4] != c:
        raise ValueError(f"{family.label} latents must be [..., {c}, T, H, W], got {tuple(latent.shape)}")
    mean, std = (torch.tensor(v).view(c, 1, 1, 1).to(latent) for v in (family.latents_mean, family.latents_std))
    return (latent - mean) / std


def load_transformer(path: str | Path):
    """``model_file``: ComfyUI's single file (or the original Wan layout), a diffusers ``WanTransformer3DModel``
    folder (``config.json``), or a whole ``Wan2.1-T2V-*-Diffusers`` folder (its ``transformer/``). Local only."""
    from diffusers import WanTransformer3DModel

    path = Path(path)
    if path.is_dir():
        sub = "transformer" if (path / "transformer" / "config.json").is_file() else None
        return WanTransformer3DModel.from_pretrained(str(path), subfolder=sub, local_files_only=True)
    return convert.transformer_from_comfy(read_safetensors(path)[0])


class WanRecipe(core.WanRecipe):
    """What both recipes share on this host: the transformer and its forward with the memories installed."""

    def __init__(self, transformer, cfg: TrainConfig, device: str | torch.device = "cpu"):
        super().__init__(cfg, device)
        self.transformer = transformer
        self.family = wh.wan_family(transformer)
        self.model_family = self.family.name  # recorded in the query weights it exports
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()

    @property
    def dim(self) -> int:
        c = self.transformer.config
        return c.num_attention_heads * c.attention_head_dim

    def latent_in(self, latent: torch.Tensor) -> torch.Tensor:
        return latent_in(latent, self.family)

    def predict(self, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, seed: int,
                memory: TrainableMemory | None, query: QueryDraw | None) -> torch.Tensor:
        if query is not None:
            query = QueryMemory(query.query_layers, query.context, query.camera, query.chunk_poses,
                                cache_context=False, query_pool=query.query_pool, seed=seed,
                                route_frames=query.route_frames)
        # installed until the next step replaces it: a checkpointed block recomputed in the backward pass must
        # find the same memory as in the forward
        remove_memory(self.transformer)
        if memory is not None or query is not None:
            apply_memory(self.transformer, memory=memory, query=query)
        return self.transformer(hidden_states=x_t, timestep=timestep, encoder_hidden_states=text,
                                return_dict=False)[0]

    def release(self) -> None:
        """The last step's memory comes off the transformer: it leaves training plain."""
        remove_memory(self.transformer)


class QueryRecipe(WanRecipe, core.QueryRecipe):
    """MemLearner: the transformer (all of it, or LoRA adapters when ``lora_rank`` > 0) and a camera MLP, fine-tuned
    end to end with query layers (``memlearner_core.training.recipes.QueryRecipe``: items and draws as on the
    ComfyUI host). Exports the Wan2.1 in ComfyUI's single-file layout (or the LoRA adapters in ComfyUI's LoRA
    format) and the query weights: the files the nodes load, and ``transformer_from_comfy`` reads back."""

    def __init__(self, transformer, cfg: TrainConfig, device: str | torch.device = "cpu"):
        super().__init__(transformer, cfg, device)
        transformer.to(self.device).float().train()  # fp32 master weights; autocast for bf16
        if cfg.lora_rank:
            add_lora(transformer, cfg.lora_rank)
        else:
            transformer.requires_grad_(True)
        self.camera = core.camera_for(cfg, self.dim, True, self.model_family).to(self.device) \
            if cfg.query_layers else None

    def export_wan(self, folder: Path) -> Path:
        if self.cfg.lora_rank:
            wan = folder / LORA_EXPORT
            save_file(comfy_lora_state(self.transformer, self.cfg.lora_rank), str(wan))
        else:
            wan = folder / WAN_EXPORT
            sd = {k: v.detach().contiguous().cpu() for k, v in self.transformer.state_dict().items()}
            save_file(convert.diffusers_to_comfy(sd), str(wan))
        return wan


class EncoderRecipe(WanRecipe, core.EncoderRecipe):
    """DiT-Mem: a memory encoder trained against the frozen transformer
    (``memlearner_core.training.recipes.EncoderRecipe``: references, ``reference_pool``, ``encoder_window`` and,
    with ``query_file``, the frozen model's query memory, drawn as on the ComfyUI host)."""

    def __init__(self, transformer, cfg: TrainConfig, latent_shape: tuple[int, int, int],
                 device: str | torch.device = "cpu"):
        super().__init__(transformer, cfg, device)
        transformer.to(self.device, core.frozen_dtype(cfg, self.device)).eval().requires_grad_(False)
        self.encoder = core.make_encoder(cfg, self.dim, latent_shape, self.family.latent_channels).float() \
            .to(self.device).train().requires_grad_(True)
        self.camera = core.camera_for(cfg, self.dim, False, self.model_family).to(self.device) \
            if cfg.query_file is not None else None


def add_lora(transformer: torch.nn.Module, rank: int) -> None:
    """LoRA adapters (peft) of ``rank`` on the blocks' linear layers, ``alpha = rank``; the rest is frozen."""
    core.add_lora(transformer, rank, LORA_TARGETS)


def comfy_lora_state(transformer: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The adapters as ComfyUI reads a LoRA: ``diffusion_model.<ComfyUI layer>.lora_A/lora_B.weight``, ``.alpha``."""
    return core.comfy_lora_state(transformer, rank, convert.comfy_module_name)


def check_model_family(cfg: TrainConfig, transformer) -> WanFamily:
    """The family of the loaded ``model_file``, refused in one line when it has none or the config's frame size
    does not fit it (a multiple of the family's VAE stride times the 2x patch)."""
    try:
        family = wh.wan_family(transformer)
    except wh.UnsupportedModel as e:
        raise ValueError(f"model_file {Path(cfg.model_file).name}: {e}") from None
    core.check_frame_size(cfg, family)
    return family


def training_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device = \"{choice}\" but this machine has no usable CUDA GPU; use \"auto\" or \"cpu\"")
    return torch.device(choice)


def run_training(cfg: TrainConfig, text_fn=None):
    """Read the pre-encoded clips, load the transformer, train, export (the ComfyUI host's ``run_training`` for
    diffusers). ``text_fn(caption) -> [1, L, text_dim]`` gives the captions' embeddings; without it the config
    must say ``text = "none"`` (this host loads no text encoder)."""
    from memlearner_core.training.dataset import read_latent_folder
    from memlearner_core.training.distributed import Processes
    from memlearner_core.training.trainer import require_data

    if cfg.data_format != "latents":
        raise ValueError('host = "diffusers" trains on pre-encoded clips: set data_format = "latents"')
    if text_fn is None and cfg.text != "none":
        raise ValueError('host = "diffusers" loads no text encoder: set text = "none" (or train on the ComfyUI host)')
    procs = Processes.from_env()
    device = procs.device() if procs.world > 1 else training_device(cfg.device)
    files = {"model_file": cfg.model_file, "encoder_file": cfg.encoder_file if cfg.recipe == "encoder" else None,
             "query_file": cfg.query_file if cfg.recipe == "encoder" or cfg.query_layers else None}
    for key, path in files.items():
        if path is not None and not Path(path).exists():
            raise ValueError(f"{key} {path}: no such file; fix {key} in the config")
    transformer = load_transformer(cfg.model_file)
    family = check_model_family(cfg, transformer)
    encoded, skipped = read_latent_folder(cfg.data_dir, cfg.latent_frames, cfg.width, cfg.height,
                                          family.latent_channels, family.vae_stride)
    require_data(encoded)
    if text_fn is None:
        def text_fn(caption):
            return torch.zeros(1, 1, transformer.config.text_dim)
    texts = {e.caption: text_fn(e.caption).detach().float().cpu() for e, _, _ in encoded}
    if procs.is_main:
        print(f"training data: {len(encoded)} clips, {len(skipped)} skipped", file=sys.stderr)
    items, reference_shape = core.recipe_items(cfg, encoded, texts)
    recipe = QueryRecipe(transformer, cfg, device) if cfg.recipe == "query" else \
        EncoderRecipe(transformer, cfg, reference_shape, device)
    return core.train_with_progress(cfg, recipe, items, device, procs, f"memlearner-train {cfg.recipe} (diffusers)")
