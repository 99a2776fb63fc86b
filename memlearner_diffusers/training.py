"""``memlearner-train`` with ``host = "diffusers"``: both recipes on diffusers' ``WanTransformer3DModel``.

The loop is the core's (``memlearner_core.training.trainer``: data order, optimizer, mixed precision, DDP under
``torchrun``, checkpoints and exact resume); the recipes mirror the ComfyUI host's (``nodes/training_host.py``)
draw for draw, so the same config, data and seed give the same losses on both hosts (to the hosts' own float32
difference). The exports are the files the ComfyUI nodes load (the Wan2.1 in ComfyUI's single-file layout, which
``transformer_from_comfy`` reads back; LoRA in ComfyUI's LoRA format; the query weights; the encoder), so a model
trained here runs in either host. Reads pre-encoded clips (``data_format = "latents"``); no ComfyUI import.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from memlearner_core.camera import CameraEmbedding
from memlearner_core.checkpoint_io import (
    load_memory_encoder,
    load_query_weights,
    read_safetensors,
    save_memory_encoder,
    save_query_weights,
)
from memlearner_core.memory_encoder import EncoderConfig, MemoryEncoder, cnn_output_shape
from memlearner_core.reference_video import resample_latent
from memlearner_core.training.config import TrainConfig
from memlearner_core.training.context_sampling import sample_context
from memlearner_core.training.flow_matching import (
    flow_loss,
    noisy_latents,
    sample_sigmas,
    timesteps,
    velocity_target,
)

from . import convert
from .memory import QueryMemory, TrainableMemory, apply_memory, remove_memory

WAN_EXPORT, LORA_EXPORT = "memlearner_wan21.safetensors", "memlearner_wan21_lora.safetensors"
QUERY_EXPORT, ENCODER_EXPORT = "memlearner_query.safetensors", "memlearner_encoder.safetensors"
# LoRA on every linear layer of the blocks (as the ComfyUI host): attention projections (self and cross), the MLP
LORA_TARGETS = r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|blocks\.\d+\.ffn\.net\.(0\.proj|2)"


def wan21_latent_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """Wan2.1's per-channel latent mean and std ``[16]``, as ``AutoencoderKLWan``'s config carries them."""
    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    return torch.tensor(params["latents_mean"].default), torch.tensor(params["latents_std"].default)


def latent_in(latent: torch.Tensor) -> torch.Tensor:
    """LATENT samples ``[..., 16, T, H, W]`` (as the VAE encodes) -> the transformer's space ``(z - mean) / std``."""
    mean, std = wan21_latent_stats()
    shape = (16, 1, 1, 1)
    return (latent - mean.view(shape).to(latent)) / std.view(shape).to(latent)


def load_transformer(path: str | Path):
    """``model_file``: ComfyUI's single file (or the original Wan layout), a diffusers ``WanTransformer3DModel``
    folder (``config.json``), or a whole ``Wan2.1-T2V-*-Diffusers`` folder (its ``transformer/``). Local only."""
    from diffusers import WanTransformer3DModel

    path = Path(path)
    if path.is_dir():
        sub = "transformer" if (path / "transformer" / "config.json").is_file() else None
        return WanTransformer3DModel.from_pretrained(str(path), subfolder=sub, local_files_only=True)
    return convert.transformer_from_comfy(read_safetensors(path)[0])


class WanRecipe(torch.nn.Module):
    """What both recipes share: the transformer and one flow-matching step through the memory patches."""

    def __init__(self, transformer, cfg: TrainConfig, device: str | torch.device = "cpu"):
        super().__init__()
        self.transformer, self.cfg, self.device = transformer, cfg, torch.device(device)
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()

    @property
    def dim(self) -> int:
        c = self.transformer.config
        return c.num_attention_heads * c.attention_head_dim

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def checkpointed(self) -> dict[str, torch.Tensor]:
        return self.trainable()

    def denoise_loss(self, x0: torch.Tensor, text: torch.Tensor, generator: torch.Generator,
                     memory: TrainableMemory | None = None, query: QueryMemory | None = None) -> torch.Tensor:
        """Flow-matching loss of denoising ``x0 [1, 16, T, H, W]`` (transformer space) at a random sigma; the
        draws (noise, sigma, the query noise's seed) come in the ComfyUI host's order."""
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        sigma = sample_sigmas(1, generator).to(self.device)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        if query is not None:
            query.seed = seed
        # installed until the next step replaces it: a checkpointed block recomputed in the backward pass must
        # find the same memory as in the forward
        remove_memory(self.transformer)
        if memory is not None or query is not None:
            apply_memory(self.transformer, memory=memory, query=query)
        pred = self.transformer(hidden_states=noisy_latents(x0, noise, sigma), timestep=timesteps(sigma),
                                encoder_hidden_states=text.to(self.device), return_dict=False)[0]
        return flow_loss(pred, velocity_target(x0, noise))


def _camera_for(cfg: TrainConfig, dim: int, trainable: bool) -> CameraEmbedding:
    if cfg.query_file is not None:
        weights = load_query_weights(cfg.query_file)
        for key in ("query_layers", "query_pool"):
            recorded = getattr(weights, key)
            if recorded is not None and recorded != getattr(cfg, key):
                raise ValueError(f"query_file {Path(cfg.query_file).name} was fine-tuned with {key} = {recorded}, "
                                 f"but the config says {getattr(cfg, key)}: set {key} = {recorded}")
        return weights.camera_embedding().requires_grad_(trainable)
    camera = CameraEmbedding(dim)
    if cfg.camera_init == "zeros":
        torch.nn.init.zeros_(camera.proj.weight)
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        camera.proj.weight.data.copy_(torch.randn(camera.proj.weight.shape, generator=g) * cfg.camera_init_std)
    torch.nn.init.zeros_(camera.proj.bias)
    return camera


class QueryRecipe(WanRecipe):
    """MemLearner: the transformer (all of it, or LoRA adapters when ``lora_rank`` > 0) and a camera MLP, fine-tuned
    end to end with query layers; items and draws as the ComfyUI host's ``QueryRecipe``."""

    def __init__(self, transformer, cfg: TrainConfig, device: str | torch.device = "cpu"):
        super().__init__(transformer, cfg, device)
        transformer.to(self.device).float().train()  # fp32 master weights; autocast for bf16
        if cfg.lora_rank:
            add_lora(transformer, cfg.lora_rank)
        else:
            transformer.requires_grad_(True)
        self.camera = _camera_for(cfg, self.dim, True).to(self.device) if cfg.query_layers else None

    def forward(self, item, generator: torch.Generator) -> torch.Tensor:
        latent, poses, text = (None if v is None else v.to(self.device) for v in item)
        latent = latent_in(latent.float())
        p = self.cfg.predict_latent_frames
        if not self.cfg.query_layers:
            return self.denoise_loss(latent[:, -p:].unsqueeze(0), text, generator)
        context, target, _, _ = sample_context(latent, poses, p, self.cfg.max_context_multiple,
                                               self.cfg.context_policies, generator)
        query = QueryMemory(self.cfg.query_layers, context, self.camera, None if poses is None else poses[-p:],
                            cache_context=False, query_pool=self.cfg.query_pool)
        return self.denoise_loss(target.unsqueeze(0), text, generator, query=query)

    def export(self, folder: Path) -> list[Path]:
        """The Wan2.1 in ComfyUI's single-file layout (or the LoRA adapters in ComfyUI's LoRA format) and the query
        weights: the files the nodes load, and ``transformer_from_comfy`` reads back. The last step's memory comes
        off the transformer: it leaves training plain."""
        remove_memory(self.transformer)
        folder.mkdir(parents=True, exist_ok=True)
        if self.cfg.lora_rank:
            wan = folder / LORA_EXPORT
            save_file(comfy_lora_state(self.transformer, self.cfg.lora_rank), str(wan))
        else:
            wan = folder / WAN_EXPORT
            sd = {k: v.detach().contiguous().cpu() for k, v in self.transformer.state_dict().items()}
            save_file(convert.diffusers_to_comfy(sd), str(wan))
        if self.camera is None:
            return [wan]
        query = folder / QUERY_EXPORT
        save_query_weights(query, self.camera.state_dict(), self.cfg.query_layers, self.cfg.query_pool)
        return [wan, query]


class EncoderRecipe(WanRecipe):
    """DiT-Mem: a memory encoder trained against the frozen transformer; items and draws as the ComfyUI host's
    ``EncoderRecipe`` (references resampled to the encoder's shape, ``reference_pool``, ``encoder_window``, and with
    ``query_file`` the frozen model's query memory on)."""

    def __init__(self, transformer, cfg: TrainConfig, latent_shape: tuple[int, int, int],
                 device: str | torch.device = "cpu"):
        super().__init__(transformer, cfg, device)
        frozen = torch.bfloat16 if cfg.mixed_precision == "bf16" and self.device.type == "cuda" else torch.float32
        transformer.to(self.device, frozen).eval().requires_grad_(False)
        if cfg.encoder_file is not None:
            encoder = load_memory_encoder(cfg.encoder_file)
        else:
            encoder = MemoryEncoder(EncoderConfig(width=self.dim, latent_shape=tuple(latent_shape)))
        if min(cnn_output_shape(encoder.cfg)) < 1:
            raise ValueError(f"the encoder's reference shape {encoder.cfg.latent_shape} (latent T, H, W) is too small "
                             "for its two strided convolutions and poolings (each side needs at least 13 latent "
                             "frames / pixels)")
        if encoder.cfg.width != self.dim:
            raise ValueError(f"encoder_file makes {encoder.cfg.width}-wide tokens but the model is {self.dim} "
                             f"wide; use an encoder for this model, or leave encoder_file out to start a new one")
        self.encoder = encoder.float().to(self.device).train().requires_grad_(True)
        self.camera = _camera_for(cfg, self.dim, False).to(self.device) if cfg.query_file is not None else None

    def checkpointed(self) -> dict[str, torch.Tensor]:
        return {f"encoder.{k}": v for k, v in self.encoder.state_dict(keep_vars=True).items()}

    def forward(self, item, generator: torch.Generator) -> torch.Tensor:
        latent, references, text = item[:3]
        poses = item[3] if len(item) > 3 else None
        k = self.cfg.top_k_references
        if self.cfg.reference_pool and len(references) > k:
            references = [references[i] for i in torch.randperm(len(references), generator=generator)[:k].tolist()]
        shape = self.encoder.cfg.latent_shape
        refs = torch.stack([resample_latent(r, shape) for r in references]).float()
        memory = TrainableMemory(latent_in(refs).unsqueeze(0).to(self.device), self.encoder)
        latent = latent_in(latent.float()).to(self.device)
        if self.camera is not None:
            p = self.cfg.predict_latent_frames
            context, target, _, _ = sample_context(latent, poses, p, self.cfg.max_context_multiple,
                                                   self.cfg.context_policies, generator)
            query = QueryMemory(self.cfg.query_layers, context, self.camera,
                                None if poses is None else poses[-p:].to(self.device), cache_context=False,
                                query_pool=self.cfg.query_pool)
            return self.denoise_loss(target.unsqueeze(0), text, generator, memory=memory, query=query)
        window = self.cfg.encoder_window
        if window and window < latent.shape[1]:
            start = int(torch.randint(0, latent.shape[1] - window + 1, (1,), generator=generator))
            latent = latent[:, start:start + window]
        return self.denoise_loss(latent.unsqueeze(0), text, generator, memory=memory)

    def export(self, folder: Path) -> list[Path]:
        """The encoder, for Load Memory Encoder and ``load_memory_encoder``; the transformer leaves plain."""
        remove_memory(self.transformer)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ENCODER_EXPORT
        save_memory_encoder(self.encoder, path)
        return [path]


def add_lora(transformer: torch.nn.Module, rank: int) -> None:
    """LoRA adapters (peft) of ``rank`` on the blocks' linear layers, ``alpha = rank``; the rest is frozen."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("lora_rank needs peft: pip install 'comfyui-memlearner[train]' "
                          "(or set lora_rank = 0 for a full fine-tune)") from None
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), transformer)


def comfy_lora_state(transformer: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The adapters as ComfyUI reads a LoRA: ``diffusion_model.<ComfyUI layer>.lora_A/lora_B.weight``, ``.alpha``."""
    out = {}
    for name, module in transformer.named_modules():
        if "default" in getattr(module, "lora_A", {}):
            key = "diffusion_model." + convert.comfy_module_name(name)
            out[f"{key}.lora_A.weight"] = module.lora_A["default"].weight.detach().contiguous().cpu()
            out[f"{key}.lora_B.weight"] = module.lora_B["default"].weight.detach().contiguous().cpu()
            out[f"{key}.alpha"] = torch.tensor(float(rank))
    return out


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
    from tqdm import tqdm

    from memlearner_core.memory_bank import caption_groups, pool_text_embedding, reference_sets
    from memlearner_core.training.dataset import read_latent_folder
    from memlearner_core.training.distributed import Processes
    from memlearner_core.training.trainer import require_data, train

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
    encoded, skipped = read_latent_folder(cfg.data_dir, cfg.latent_frames, cfg.width, cfg.height)
    require_data(encoded)
    transformer = load_transformer(cfg.model_file)
    if text_fn is None:
        def text_fn(caption):
            return torch.zeros(1, 1, transformer.config.text_dim)
    texts = {e.caption: text_fn(e.caption).detach().float().cpu() for e, _, _ in encoded}
    if procs.is_main:
        print(f"training data: {len(encoded)} clips, {len(skipped)} skipped", file=sys.stderr)
    if cfg.recipe == "query":
        items = [(latent, poses, texts[entry.caption]) for entry, latent, poses in encoded]
        recipe = QueryRecipe(transformer, cfg, device)
    else:
        if cfg.text == "none":
            captions = caption_groups([e.caption for e, _, _ in encoded])
        else:
            captions = torch.stack([pool_text_embedding(texts[e.caption]) for e, _, _ in encoded])
        latents = [latent for _, latent, _ in encoded]
        items = [(latents[i], [latents[j] for j in refs], texts[encoded[i][0].caption], encoded[i][2])
                 for i, refs in enumerate(reference_sets(captions, cfg.reference_pool or cfg.top_k_references))]
        recipe = EncoderRecipe(transformer, cfg, cfg.reference_latent_shape or tuple(latents[0].shape[1:]), device)
    with tqdm(total=cfg.steps, desc=f"memlearner-train {cfg.recipe} (diffusers)", file=sys.stderr,
              disable=not procs.is_main) as bar:
        def on_step(step, loss):
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.refresh()

        return train(cfg, recipe, items, device, on_step=on_step, processes=procs)
