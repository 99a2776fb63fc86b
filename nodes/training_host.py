"""Training recipes on ComfyUI's own Wan2.1, so their outputs load in the nodes unchanged and train the exact
patches the nodes install (``apply_memory``, run by ``patched_forward``).

- ``QueryRecipe`` (MemLearner): the DiT itself, fully or through LoRA (peft), plus a camera MLP.
- ``EncoderRecipe`` (DiT-Mem): a memory encoder against the frozen DiT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from memlearner_core.camera import CameraEmbedding
from memlearner_core.checkpoint_io import (
    QueryWeights,
    load_memory_encoder,
    load_query_weights,
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

from . import comfy_adapter as wa
from .memory_patch import QueryMemory, RunState, TrainableMemory, apply_memory, patched_forward

WAN_EXPORT, LORA_EXPORT = "memlearner_wan21.safetensors", "memlearner_wan21_lora.safetensors"
QUERY_EXPORT, ENCODER_EXPORT = "memlearner_query.safetensors", "memlearner_encoder.safetensors"
# LoRA on every linear layer of the blocks: attention projections (self and cross) and the MLP.
LORA_TARGETS = r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)|blocks\.\d+\.ffn\.(0|2)"


class WanRecipe(torch.nn.Module):
    """What both recipes share: the Wan2.1 of a ComfyUI MODEL and one flow-matching step through the nodes'
    patches. Parameters with ``requires_grad`` are the trained ones."""

    def __init__(self, model_patcher, cfg: TrainConfig, device: str | torch.device = "cpu"):
        super().__init__()
        self.model, self.dm = model_patcher, wa.wan21_model(model_patcher)
        self.cfg, self.device = cfg, torch.device(device)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def checkpointed(self) -> dict[str, torch.Tensor]:
        return self.trainable()

    def denoise_loss(self, x0: torch.Tensor, text: torch.Tensor, generator: torch.Generator,
                     memory: TrainableMemory | None = None, query: QueryMemory | None = None) -> torch.Tensor:
        """Flow-matching loss of denoising ``x0 [1, 16, T, H, W]`` (model space) at a random sigma."""
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        sigma = sample_sigmas(1, generator).to(self.device)
        run = RunState(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)), self.cfg.gradient_checkpointing)
        patched = self.model if memory is None and query is None else apply_memory(self.model, memory=memory,
                                                                                     query=query)
        pred = patched_forward(patched, noisy_latents(x0, noise, sigma), timesteps(sigma), text.to(self.device),
                               run=run)
        return flow_loss(pred, velocity_target(x0, noise))


def query_weights_for(cfg: TrainConfig) -> QueryWeights:
    """``cfg.query_file``, refused in one line when it was fine-tuned with other query settings than ``cfg``'s."""
    weights = load_query_weights(cfg.query_file)
    for key in ("query_layers", "query_pool"):
        recorded = getattr(weights, key)
        if recorded is not None and recorded != getattr(cfg, key):
            raise ValueError(f"query_file {cfg.query_file.name} was fine-tuned with {key} = {recorded}, but the "
                             f"config says {getattr(cfg, key)}: set {key} = {recorded}")
    return weights


class QueryRecipe(WanRecipe):
    """MemLearner: the DiT (all of it, or LoRA adapters when ``lora_rank`` > 0) and a camera MLP fine-tuned end to
    end with query layers. With ``query_layers = 0`` the same clips train a plain Wan2.1 (no memory: a baseline).

    An item is ``(latent [16, N, H, W] LATENT samples, poses [N, 3, 4] | None, text [1, L, 4096])``. Each step
    denoises the last ``predict_latent_frames`` frames; their context is picked from the frames before them by one
    of ``context_policies`` (as Memory Rollout picks it) within a budget uniform in ``0 .. max_context_multiple x
    P`` frames; the loss is the flow-matching loss on P only, Q is fresh noise. The camera MLP starts at zero
    ("no camera": a pretrained Wan's behaviour) or, from scratch, ``normal`` (zeros leave Q without a cue to
    learn from), or continues from ``query_file``."""

    def __init__(self, model_patcher, cfg: TrainConfig, device: str | torch.device = "cpu"):
        super().__init__(model_patcher, cfg, device)
        self.dm.to(self.device).float().train()  # fp32 master weights; autocast for bf16
        if cfg.lora_rank:
            add_lora(self.dm, cfg.lora_rank)  # freezes everything but the adapters
        else:
            self.dm.requires_grad_(True)
        self.camera = None
        if cfg.query_layers and cfg.query_file is not None:
            self.camera = query_weights_for(cfg).camera_embedding().to(self.device).requires_grad_(True)
        elif cfg.query_layers:
            self.camera = CameraEmbedding(self.dm.dim).to(self.device)
            if cfg.camera_init == "zeros":
                torch.nn.init.zeros_(self.camera.proj.weight)
            else:
                g = torch.Generator().manual_seed(cfg.seed)
                self.camera.proj.weight.data.copy_(torch.randn(self.camera.proj.weight.shape, generator=g)
                                                   * cfg.camera_init_std)
            torch.nn.init.zeros_(self.camera.proj.bias)

    def forward(self, item, generator: torch.Generator) -> torch.Tensor:
        latent, poses, text = (None if v is None else v.to(self.device) for v in item)
        latent = wa.wan21_latent_in(latent.float())
        p = self.cfg.predict_latent_frames
        if not self.cfg.query_layers:
            return self.denoise_loss(latent[:, -p:].unsqueeze(0), text, generator)
        context, target, _, _ = sample_context(latent, poses, p, self.cfg.max_context_multiple,
                                               self.cfg.context_policies, generator)
        chunk_poses = None if poses is None else poses[-p:]
        query = QueryMemory(self.cfg.query_layers, context, self.camera, chunk_poses, cache_context=False,
                            query_pool=self.cfg.query_pool)
        return self.denoise_loss(target.unsqueeze(0), text, generator, query=query)

    def export(self, folder: Path) -> list[Path]:
        """The query weights (camera MLP, for Apply Query Memory's ``query_weights``) and either the fine-tuned
        Wan2.1 state dict (for Load Diffusion Model) or, with LoRA, the adapters in ComfyUI's LoRA format (for
        LoraLoaderModelOnly on the stock Wan2.1). A plain baseline (``query_layers = 0``) has no query weights."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.cfg.lora_rank:
            wan = folder / LORA_EXPORT
            save_file(comfy_lora_state(self.dm, self.cfg.lora_rank), str(wan))
        else:
            wan = folder / WAN_EXPORT
            save_file({k: v.detach().contiguous().cpu() for k, v in self.dm.state_dict().items()}, str(wan))
        if self.camera is None:
            return [wan]
        query = folder / QUERY_EXPORT
        save_query_weights(query, self.camera.state_dict(), self.cfg.query_layers, self.cfg.query_pool)
        return [wan, query]


class EncoderRecipe(WanRecipe):
    """DiT-Mem: a memory encoder trained against the frozen DiT, whose every self-attention layer reads its tokens.

    An item is ``(latent [16, T, H, W], references [[16, T, H, W], ...], text [1, L, 4096])``, LATENT samples;
    the loss is the flow-matching loss on the whole clip (or a random window of ``encoder_window`` latent frames,
    to match a model that generates short chunks). References are brought to the encoder's shape the way Encode
    Reference Video brings them; with ``reference_pool`` the item holds the n best and each step draws
    ``top_k_references`` of them. ``encoder`` starts from ``cfg.encoder_file`` when set, else from a fresh encoder
    for ``latent_shape`` (T, H, W) in the DiT's width. With ``query_file`` the frozen model runs with its query
    memory, the context drawn as the query recipe draws it, so the encoder learns to help the model as it will run
    with both memories."""

    def __init__(self, model_patcher, cfg: TrainConfig, latent_shape: tuple[int, int, int],
                 device: str | torch.device = "cpu"):
        super().__init__(model_patcher, cfg, device)
        frozen = torch.bfloat16 if cfg.mixed_precision == "bf16" and self.device.type == "cuda" else torch.float32
        self.dm.to(self.device, frozen).eval().requires_grad_(False)
        if cfg.encoder_file is not None:
            encoder = load_memory_encoder(cfg.encoder_file)
        else:
            encoder = MemoryEncoder(EncoderConfig(width=self.dm.dim, latent_shape=tuple(latent_shape)))
        if min(cnn_output_shape(encoder.cfg)) < 1:
            raise ValueError(f"the encoder's reference shape {encoder.cfg.latent_shape} (latent T, H, W) is too small "
                             "for its two strided convolutions and poolings (each side needs at least 13 latent "
                             "frames / pixels: clip_frames >= 49, width and height >= 104; or set reference_clip_frames, "
                             "reference_width and reference_height)")
        if encoder.cfg.width != self.dm.dim:
            raise ValueError(f"encoder_file makes {encoder.cfg.width}-wide tokens but the model is {self.dm.dim} "
                             f"wide; use an encoder for this model, or leave encoder_file out to start a new one")
        self.encoder = encoder.float().to(self.device).train().requires_grad_(True)
        self.camera = None
        if cfg.query_file is not None:
            self.camera = query_weights_for(cfg).camera_embedding().to(self.device).requires_grad_(False)

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
        memory = TrainableMemory(wa.wan21_latent_in(refs).unsqueeze(0).to(self.device), self.encoder)
        latent = wa.wan21_latent_in(latent.float()).to(self.device)
        text = text.to(self.device)
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
        """The encoder, for Load Memory Encoder (``models/memory_encoders/``)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ENCODER_EXPORT
        save_memory_encoder(self.encoder, path)
        return [path]


def add_lora(dm: torch.nn.Module, rank: int) -> None:
    """LoRA adapters (peft) of ``rank`` on the blocks' linear layers, ``alpha = rank``; the rest is frozen."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("lora_rank needs peft: pip install 'comfyui-memlearner[train]' "
                          "(or set lora_rank = 0 for a full fine-tune)") from None
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), dm)


def comfy_lora_state(dm: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The adapters as ComfyUI reads a LoRA: ``diffusion_model.<layer>.lora_A/lora_B.weight`` and ``.alpha``."""
    out = {}
    for name, module in dm.named_modules():
        if "default" in getattr(module, "lora_A", {}):
            key = f"diffusion_model.{name}"
            out[f"{key}.lora_A.weight"] = module.lora_A["default"].weight.detach().contiguous().cpu()
            out[f"{key}.lora_B.weight"] = module.lora_B["default"].weight.detach().contiguous().cpu()
            out[f"{key}.alpha"] = torch.tensor(float(rank))
    return out


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


def run_training(cfg: TrainConfig, text_fn=None):
    """Load the model, VAE and text encoder with ComfyUI, encode the clips once (cached), train, export.

    Under ``torchrun`` every process trains on its own GPU (see ``training.distributed``); the first one encodes
    the clips into the cache, the others read them from it. ``text_fn(caption) -> [1, L, 4096]`` replaces
    loading ``cfg.text_encoder_file`` (tests)."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    from tqdm import tqdm

    from memlearner_core.memory_bank import caption_groups, pool_text_embedding, reference_sets
    from memlearner_core.training.dataset import ClipFolder, LatentCache, encode_all, read_latent_folder
    from memlearner_core.training.distributed import Processes
    from memlearner_core.training.trainer import require_data, train

    procs = Processes.from_env()
    device = procs.device() if procs.world > 1 else training_device(cfg.device)
    check_files(cfg, text_fn)  # everything cheap is checked before a model is loaded
    if cfg.data_format == "latents":
        encoded, skipped = read_latent_folder(cfg.data_dir, cfg.latent_frames, cfg.width, cfg.height)
        require_data(encoded)
    else:  # reads the captions and every poses file, checked
        clips = ClipFolder(cfg.data_dir, cfg.clip_frames, cfg.width, cfg.height)
    model = comfy.sd.load_diffusion_model(str(cfg.model_file))
    if text_fn is None and cfg.text == "none":
        def text_fn(caption):
            return torch.zeros(1, 1, wa.wan21_model(model).text_dim)
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
    require_data(encoded)
    if cfg.recipe == "query":
        items = [(latent, poses, texts[entry.caption]) for entry, latent, poses in encoded]
        recipe = QueryRecipe(model, cfg, device)
    else:
        if cfg.text == "none":  # no text encoder: clips with the same caption are each other's references
            captions = caption_groups([e.caption for e, _, _ in encoded])
        else:
            captions = torch.stack([pool_text_embedding(texts[e.caption]) for e, _, _ in encoded])
        latents = [latent for _, latent, _ in encoded]
        items = [(latents[i], [latents[j] for j in refs], texts[encoded[i][0].caption], encoded[i][2])
                 for i, refs in enumerate(reference_sets(captions, cfg.reference_pool or cfg.top_k_references))]
        recipe = EncoderRecipe(model, cfg, cfg.reference_latent_shape or tuple(latents[0].shape[1:]), device)
    with tqdm(total=cfg.steps, desc=f"memlearner-train {cfg.recipe}", file=sys.stderr,
              disable=not procs.is_main) as bar:
        def on_step(step, loss):
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.refresh()

        return train(cfg, recipe, items, device, on_step=on_step, processes=procs)
