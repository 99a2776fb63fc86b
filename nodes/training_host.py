"""Training recipes on ComfyUI's own Wan2.1, so their outputs load in the nodes unchanged and train the exact
patches the nodes install (``apply_memory``, run by ``patched_forward``).

- ``QueryRecipe`` (MemLearner): the DiT itself, fully or through LoRA (peft), plus a camera MLP.
- ``EncoderRecipe`` (DiT-Mem): a memory encoder against the frozen DiT.

What a step draws and its loss are the core's (``memlearner_core.training.recipes``, shared with the diffusers
host); this module supplies ComfyUI's model, its latent space, the forward through the nodes' patches and the
export layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from memlearner_core.model_family import WAN21, WanFamily
from memlearner_core.training import recipes as core
from memlearner_core.training.config import TrainConfig
from memlearner_core.training.recipes import LORA_EXPORT, WAN_EXPORT, QueryDraw, TrainableMemory

from . import comfy_adapter as wa
from .memory_patch import QueryMemory, RunState, apply_memory, patched_forward

# LoRA on every linear layer of the blocks: attention projections (self and cross) and the MLP.
LORA_TARGETS = r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)|blocks\.\d+\.ffn\.(0|2)"


class WanRecipe(core.WanRecipe):
    """What both recipes share on this host: the Wan of a ComfyUI MODEL (``self.model``, its diffusion model
    ``self.dm``, its family's name ``self.model_family``), its latent space and its forward through the nodes'
    patches."""

    def __init__(self, model_patcher, cfg: TrainConfig, device: str | torch.device = "cpu"):
        super().__init__(cfg, device)
        self.model, self.dm = model_patcher, wa.wan_model(model_patcher)
        self.model_family = wa.wan_family(model_patcher).name

    def latent_in(self, latent: torch.Tensor) -> torch.Tensor:
        return wa.model_latent_in(self.model, latent)

    def predict(self, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, seed: int,
                memory: TrainableMemory | None, query: QueryDraw | None) -> torch.Tensor:
        run = RunState(seed, self.cfg.gradient_checkpointing)
        if query is not None:
            query = QueryMemory(query.query_layers, query.context, query.camera, query.chunk_poses,
                                cache_context=False, query_pool=query.query_pool, route_frames=query.route_frames)
        patched = self.model if memory is None and query is None else apply_memory(self.model, memory=memory,
                                                                                     query=query)
        return patched_forward(patched, x_t, timestep, text, run=run)


class QueryRecipe(WanRecipe, core.QueryRecipe):
    """MemLearner on ComfyUI's Wan2.1 (see ``memlearner_core.training.recipes.QueryRecipe``); exports the
    fine-tuned Wan2.1 state dict (for Load Diffusion Model) or, with LoRA, the adapters in ComfyUI's LoRA format
    (for LoraLoaderModelOnly on the stock Wan2.1), and the query weights."""

    def __init__(self, model_patcher, cfg: TrainConfig, device: str | torch.device = "cpu"):
        super().__init__(model_patcher, cfg, device)
        self.dm.to(self.device).float().train()  # fp32 master weights; autocast for bf16
        if cfg.lora_rank:
            add_lora(self.dm, cfg.lora_rank)  # freezes everything but the adapters
        else:
            self.dm.requires_grad_(True)
        self.camera = core.camera_for(cfg, self.dm.dim, True, self.model_family).to(self.device) \
            if cfg.query_layers else None

    def export_wan(self, folder: Path) -> Path:
        if self.cfg.lora_rank:
            wan = folder / LORA_EXPORT
            save_file(comfy_lora_state(self.dm, self.cfg.lora_rank), str(wan))
        else:
            wan = folder / WAN_EXPORT
            save_file({k: v.detach().contiguous().cpu() for k, v in self.dm.state_dict().items()}, str(wan))
        return wan


class EncoderRecipe(WanRecipe, core.EncoderRecipe):
    """DiT-Mem on ComfyUI's Wan2.1 (see ``memlearner_core.training.recipes.EncoderRecipe``). ``encoder`` starts
    from ``cfg.encoder_file`` when set, else from a fresh encoder for ``latent_shape`` (T, H, W) in the DiT's
    width."""

    def __init__(self, model_patcher, cfg: TrainConfig, latent_shape: tuple[int, int, int],
                 device: str | torch.device = "cpu"):
        super().__init__(model_patcher, cfg, device)
        self.dm.to(self.device, core.frozen_dtype(cfg, self.device)).eval().requires_grad_(False)
        self.encoder = core.make_encoder(cfg, self.dm.dim, latent_shape, self.dm.out_dim).float().to(self.device) \
            .train().requires_grad_(True)
        self.camera = core.camera_for(cfg, self.dm.dim, False, self.model_family).to(self.device) \
            if cfg.query_file is not None \
            else None


def add_lora(dm: torch.nn.Module, rank: int) -> None:
    """LoRA adapters (peft) of ``rank`` on the blocks' linear layers, ``alpha = rank``; the rest is frozen."""
    core.add_lora(dm, rank, LORA_TARGETS)


def comfy_lora_state(dm: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The adapters as ComfyUI reads a LoRA: ``diffusion_model.<layer>.lora_A/lora_B.weight`` and ``.alpha``."""
    return core.comfy_lora_state(dm, rank)


def training_device(choice: str) -> torch.device:
    """The config's ``device``; ``auto`` is ComfyUI's compute device (CUDA when present, else the CPU)."""
    import comfy.model_management

    if choice == "auto":
        return comfy.model_management.get_torch_device()
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device = \"{choice}\" but this machine has no usable CUDA GPU; use \"auto\" or \"cpu\"")
    return torch.device(choice)


def check_files(cfg: TrainConfig, text_fn=None) -> None:
    """The config's folder and files exist (one line naming the key otherwise), before anything is loaded."""
    if not cfg.data_dir.is_dir():
        raise ValueError(f"data_dir {cfg.data_dir}: no such folder; point data_dir at the folder of training "
                         f"{'latent clips' if cfg.data_format == 'latents' else 'videos'}")
    files = {"model_file": cfg.model_file}
    if cfg.data_format == "videos":
        files["vae_file"] = cfg.vae_file
    if text_fn is None and cfg.text != "none" and cfg.text_encoder_file is not None:
        files["text_encoder_file"] = cfg.text_encoder_file
    if cfg.recipe == "encoder" and cfg.encoder_file is not None:
        files["encoder_file"] = cfg.encoder_file
    if cfg.query_file is not None and (cfg.recipe == "encoder" or cfg.query_layers):
        files["query_file"] = cfg.query_file
    for key, path in files.items():
        if not Path(path).is_file():
            raise ValueError(f"{key} {path}: no such file; fix {key} in the config")


def check_model_family(cfg: TrainConfig, model) -> WanFamily:
    """The family of the loaded ``model_file``, refused in one line when the config's clips do not fit it."""
    try:
        family = wa.wan_family(model)
    except wa.UnsupportedModel as e:
        raise ValueError(f"model_file {Path(cfg.model_file).name}: {e}") from None
    core.check_frame_size(cfg, family)
    if cfg.data_format == "videos" and family is not WAN21:
        raise ValueError(f"training {family.label} reads pre-encoded clips: set data_format = \"latents\" "
                         f"(LATENT samples of its VAE, see read_latent_folder)")
    return family


def run_training(cfg: TrainConfig, text_fn=None):
    """Load the model, VAE and text encoder with ComfyUI, encode the clips once (cached), train, export.

    Under ``accelerate launch`` or ``torchrun`` every process trains on its own GPU (see ``training.distributed``);
    the first one encodes the clips into the cache, the others read them from it. ``text_fn(caption) -> [1, L, 4096]`` replaces
    loading ``cfg.text_encoder_file`` (tests)."""
    import comfy.sd
    import comfy.utils

    from memlearner_core.training.dataset import ClipFolder, LatentCache, encode_all, read_latent_folder
    from memlearner_core.training.distributed import Processes
    from memlearner_core.training.trainer import preflight, require_data

    procs = Processes.from_env()
    device = procs.device() if procs.world > 1 else training_device(cfg.device)
    check_files(cfg, text_fn)  # everything cheap is checked before a model is loaded
    preflight(cfg, procs.world)  # data_dir, output_dir, and the checkpoint it would resume
    if cfg.data_format == "videos":  # reads the captions and every poses file, checked
        clips = ClipFolder(cfg.data_dir, cfg.clip_frames, cfg.width, cfg.height)
        if not clips.entries:  # every video a FIFO, a device, ...: nothing to load a model for
            require_data([], clips.skipped)
    model = comfy.sd.load_diffusion_model(str(cfg.model_file))
    family = check_model_family(cfg, model)
    if cfg.data_format == "latents":  # the latents' channels and size are the model family's
        encoded, skipped = read_latent_folder(cfg.data_dir, cfg.latent_frames, cfg.width, cfg.height,
                                              family.latent_channels, family.vae_stride)
        require_data(encoded, skipped)
    if text_fn is None and cfg.text == "none":
        def text_fn(caption):
            return torch.zeros(1, 1, wa.wan_model(model).text_dim)
    elif text_fn is None:
        if cfg.text_encoder_file is None:
            raise ValueError("the config needs text_encoder_file (umt5_xxl, to encode the captions), "
                             "or text = \"none\" to train without text")
        clip = comfy.sd.load_clip([str(cfg.text_encoder_file)], clip_type=comfy.sd.CLIPType.WAN)

        def text_fn(caption):
            return clip.encode_from_tokens(clip.tokenize(caption))

    if cfg.data_format == "videos":
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(cfg.vae_file)))
        wa.check_wan21_vae(vae)
        for turn in (True, False):  # the first process fills the latent cache, then the others read it
            if procs.is_main == turn:
                encoded, skipped = encode_all(clips, wa.read_video, lambda frames: vae.encode(frames).detach().cpu(),
                                              LatentCache(cfg.cache_dir), wa.vae_fingerprint(vae))
            procs.barrier()
    texts = {e.caption: text_fn(e.caption).detach().float().cpu() for e, _, _ in encoded}
    if procs.is_main:
        print(f"training data: {len(encoded)} clips, {len(skipped)} skipped", file=sys.stderr)
    require_data(encoded, skipped)
    items, reference_shape = core.recipe_items(cfg, encoded, texts)
    recipe = QueryRecipe(model, cfg, device) if cfg.recipe == "query" else EncoderRecipe(model, cfg, reference_shape,
                                                                                        device)
    with wa.host_training_mode():
        return core.train_with_progress(cfg, recipe, items, device, procs, f"memlearner-train {cfg.recipe}")
