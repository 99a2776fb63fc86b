"""Both training recipes, host-free: what a step draws, in what order, and its loss.

A host (ComfyUI's Wan2.1 in ``nodes/training_host.py``, diffusers' ``WanTransformer3DModel`` in
``memlearner_diffusers/training.py``) subclasses ``WanRecipe`` with its model and supplies only:

- ``latent_in(latent)``: LATENT samples (as the VAE encodes them) -> the model's latent space;
- ``predict(x_t, timestep, text, seed, memory, query)``: the model's velocity prediction with the memories
  applied (``memory`` a ``TrainableMemory``, ``query`` a ``QueryDraw`` the host turns into its query memory,
  ``seed`` the query tokens' noise seed);
- ``export_wan(folder)`` (query recipe): the fine-tuned Wan2.1 in ComfyUI's layout; ``release()``: take the
  last step's memory off the model before export (a host that leaves it installed).

Everything random is drawn here from the step's generator in one order: the context (length, then policy) or
the references (``reference_pool``) and the window (``encoder_window``), then the noise, the sigma and the query
noise's seed. So one config, data and seed trains alike on both hosts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..camera import CameraEmbedding
from ..checkpoint_io import load_memory_encoder, load_query_weights, save_memory_encoder, save_query_weights
from ..context_policy import route_frames
from ..context_tokens import ContextSpec
from ..memory_encoder import EncoderConfig, MemoryEncoder, cnn_output_shape, fit_problem
from ..memory_tokens import MemoryTokens
from ..model_family import DEFAULT_FAMILY, WanFamily
from ..reference_video import resample_latent
from .config import TrainConfig
from .context_sampling import sample_context
from .flow_matching import flow_loss, noisy_latents, sample_sigmas, timesteps, velocity_target

WAN_EXPORT, LORA_EXPORT = "memlearner_wan21.safetensors", "memlearner_wan21_lora.safetensors"
QUERY_EXPORT, ENCODER_EXPORT = "memlearner_query.safetensors", "memlearner_encoder.safetensors"


@dataclass
class TrainableMemory:
    """Reference memory whose tokens keep their gradients (training a memory encoder against a frozen Wan), for
    either host's ``apply_memory``.

    ``latents [1, N, 16, T, H, W]`` in the model's latent space; ``encoder`` a plain ``MemoryEncoder`` owned by
    the trainer. Tokens are recomputed on every forward (dropout, shuffling) and never de-duplicated: the
    collapse is exact for a fixed encoder only."""

    latents: torch.Tensor
    encoder: MemoryEncoder
    strength: float = 1.0

    @property
    def width(self) -> int:
        return self.encoder.cfg.width

    def tokens(self) -> MemoryTokens:
        p = next(self.encoder.parameters())
        return MemoryTokens.full(self.encoder(self.latents.to(device=p.device)))

    def prepare(self) -> None:
        """Nothing to do ahead: the tokens are recomputed, with their gradients, in every forward."""

    def managed_models(self) -> list:
        """No model for a host's model management to load: the trainer owns the encoder."""
        return []


@dataclass
class QueryDraw:
    """One step's query memory, host-free: the host builds its ``QueryMemory`` from it (the context cache off:
    the weights change every step)."""

    query_layers: int
    context: ContextSpec
    camera: CameraEmbedding | None
    chunk_poses: torch.Tensor | None
    query_pool: int = 1
    route_frames: int = 0  # the learned policy's budget per query layer (0: read the whole context)


def check_frame_size(cfg: TrainConfig, family: WanFamily) -> None:
    """The config's ``width`` and ``height`` are frames the family's VAE and the 2x patch can make, else one line
    naming the key and the multiple."""
    for key in ("width", "height"):
        if getattr(cfg, key) % family.pixel_multiple:
            raise ValueError(f"'{key}' must be a multiple of {family.pixel_multiple} for {family.label} "
                             f"({family.vae_stride}x VAE, 2x patch), got {getattr(cfg, key)}; fix {key} in the config")


def camera_for(cfg: TrainConfig, dim: int, trainable: bool, model_family: str | None = None) -> CameraEmbedding:
    """The camera MLP: from ``cfg.query_file`` (refused in one line when fine-tuned with other query settings
    than ``cfg``'s or on another ``model_family`` than the model's), else new: zeros, or normal with
    ``camera_init_std`` drawn from ``cfg.seed``. Trained (``trainable``), it takes ``cfg.view_rope_fov``; weights
    trained with view-aligned RoPE must be given the same field of view, weights trained without it may start
    using it; weights trained with full queries (``query_pool`` 1) may be fine-tuned into pooled ones. Frozen
    (encoder recipe), it keeps what the file records."""
    if cfg.query_file is not None:
        weights = load_query_weights(cfg.query_file)
        wrong = weights.mismatch(cfg.query_layers, cfg.query_pool, model_family)
        if wrong is not None and wrong[0] == "model_family":
            raise ValueError(f"query_file {Path(cfg.query_file).name} was fine-tuned on {wrong[1]}, but model_file "
                             f"is {wrong[2]}; use the query file fine-tuned for this model")
        if trainable and wrong is not None and wrong[0] == "query_pool" and wrong[1] == 1:
            wrong = None  # full queries fine-tuned into pooled ones: the camera MLP reads poses, not Q's grid
        if trainable and wrong is None and weights.view_rope_fov not in (None, cfg.view_rope_fov):
            wrong = "view_rope_fov", f"{weights.view_rope_fov:g}", f"{cfg.view_rope_fov:g}"
        if wrong is not None:
            key, recorded, given = wrong
            raise ValueError(f"query_file {Path(cfg.query_file).name} was fine-tuned with {key} = {recorded}, "
                             f"but the config says {given}: set {key} = {recorded}")
        camera = weights.camera_embedding()
        if trainable and cfg.view_rope_fov:  # weights trained without view-aligned RoPE may go on with it
            camera.view_rope_fov = cfg.view_rope_fov
        return camera.requires_grad_(trainable)
    camera = CameraEmbedding(dim, view_rope_fov=cfg.view_rope_fov or None)
    if cfg.camera_init == "zeros":
        torch.nn.init.zeros_(camera.proj.weight)
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        camera.proj.weight.data.copy_(torch.randn(camera.proj.weight.shape, generator=g) * cfg.camera_init_std)
    torch.nn.init.zeros_(camera.proj.bias)
    return camera.requires_grad_(trainable)


def make_encoder(cfg: TrainConfig, dim: int, latent_shape: tuple[int, int, int], latent_channels: int
                 ) -> MemoryEncoder:
    """The encoder to train: ``cfg.encoder_file``, or a fresh one for references of ``latent_shape`` (T, H, W)
    with the model's ``latent_channels`` (16 Wan2.1, 48 Wan2.2 TI2V-5B) in its width ``dim`` (its initialisation
    drawn from torch's global generator)."""
    if cfg.encoder_file is not None:
        encoder = load_memory_encoder(cfg.encoder_file)
        if encoder.cfg.in_channels != latent_channels:
            raise ValueError(f"encoder_file {Path(cfg.encoder_file).name}: "
                             + fit_problem(encoder.cfg.width, encoder.cfg.in_channels, dim, latent_channels)
                             + ", or leave encoder_file out to start a new one")
    else:
        encoder = MemoryEncoder(EncoderConfig(in_channels=latent_channels, width=dim,
                                              latent_shape=tuple(latent_shape)))
    if min(cnn_output_shape(encoder.cfg)) < 1:
        raise ValueError(f"the encoder's reference shape {encoder.cfg.latent_shape} (latent T, H, W) is too small "
                         "for its two strided convolutions and poolings (each side needs at least 13 latent "
                         "frames / pixels: clip_frames >= 49, width and height >= 104; or set reference_clip_frames, "
                         "reference_width and reference_height)")
    if encoder.cfg.width != dim:
        raise ValueError(f"encoder_file makes {encoder.cfg.width}-wide tokens but the model is {dim} "
                         f"wide; use an encoder for this model, or leave encoder_file out to start a new one")
    return encoder


def frozen_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The frozen model's weights in the encoder recipe: bf16 on CUDA under bf16 mixed precision, else float32."""
    return torch.bfloat16 if cfg.mixed_precision == "bf16" and device.type == "cuda" else torch.float32


def query_draw(cfg: TrainConfig, latent: torch.Tensor, poses: torch.Tensor | None, camera: CameraEmbedding | None,
               generator: torch.Generator) -> tuple[QueryDraw, torch.Tensor]:
    """A query step's context and target from ``latent [16, N, H, W]`` (model space): the context drawn as Memory
    Rollout picks it (``sample_context``: its length, then its policy), the target P the last
    ``predict_latent_frames`` frames."""
    p = cfg.predict_latent_frames
    context, target, policy, _, budget = sample_context(latent, poses, p, cfg.max_context_multiple,
                                                        cfg.context_policies, generator)
    chunk_poses = None if poses is None else poses[-p:].to(latent.device)
    return QueryDraw(cfg.query_layers, context, camera, chunk_poses, cfg.query_pool, route_frames(policy, budget)), target


def draw_references(cfg: TrainConfig, references: list[torch.Tensor], generator: torch.Generator
                    ) -> list[torch.Tensor]:
    """The step's references: with ``reference_pool`` the item holds the n best, and ``top_k_references`` of them
    are drawn (one ``randperm``); else all of them, fixed."""
    k = cfg.top_k_references
    if cfg.reference_pool and len(references) > k:
        return [references[i] for i in torch.randperm(len(references), generator=generator)[:k].tolist()]
    return list(references)


def draw_window(cfg: TrainConfig, latent: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``latent [16, T, H, W]`` cut to a random window of ``encoder_window`` frames (the whole clip when 0 or when
    the clip is no longer)."""
    window = cfg.encoder_window
    if window and window < latent.shape[1]:
        start = int(torch.randint(0, latent.shape[1] - window + 1, (1,), generator=generator))
        latent = latent[:, start:start + window]
    return latent


class WanRecipe(torch.nn.Module):
    """What both recipes share on any host: one flow-matching step. Parameters with ``requires_grad`` are the
    trained ones (in registration order, which the optimizer follows)."""

    model_family: str = DEFAULT_FAMILY  # the Wan family trained (``model_family.FAMILIES``), set by the host

    def __init__(self, cfg: TrainConfig, device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg, self.device = cfg, torch.device(device)

    # -- what the host supplies
    def latent_in(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, seed: int,
                memory: TrainableMemory | None, query: QueryDraw | None) -> torch.Tensor:
        raise NotImplementedError

    def release(self) -> None:
        """Take the last step's memory off the model (before export); nothing by default."""

    # -- shared
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def checkpointed(self) -> dict[str, torch.Tensor]:
        return self.trainable()

    def denoise_loss(self, x0: torch.Tensor, text: torch.Tensor, generator: torch.Generator,
                     memory: TrainableMemory | None = None, query: QueryDraw | None = None) -> torch.Tensor:
        """Flow-matching loss of denoising ``x0 [1, 16, T, H, W]`` (model space) at a random sigma; draws the
        noise, the sigma, then the query noise's seed."""
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        sigma = sample_sigmas(1, generator).to(self.device)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        pred = self.predict(noisy_latents(x0, noise, sigma), timesteps(sigma), text.to(self.device), seed,
                            memory, query)
        return flow_loss(pred, velocity_target(x0, noise))


class QueryRecipe(WanRecipe):
    """MemLearner: the DiT (all of it, or LoRA adapters when ``lora_rank`` > 0) and a camera MLP fine-tuned end to
    end with query layers. With ``query_layers = 0`` the same clips train a plain Wan2.1 (no memory: a baseline).

    An item is ``(latent [16, N, H, W] LATENT samples, poses [N, 3, 4] | None, text [1, L, D])``. Each step
    denoises the last ``predict_latent_frames`` frames; their context is picked from the frames before them by one
    of ``context_policies`` (as Memory Rollout picks it) within a budget uniform in ``0 .. max_context_multiple x
    P`` frames; the loss is the flow-matching loss on P only, Q is fresh noise. The camera MLP (the host sets
    ``self.camera`` with ``camera_for``) starts at zero ("no camera": a pretrained Wan's behaviour) or, from
    scratch, ``normal`` (zeros leave Q without a cue to learn from), or continues from ``query_file``."""

    camera: CameraEmbedding | None

    def export_wan(self, folder: Path) -> Path:
        """The fine-tuned Wan2.1 (or its LoRA adapters) in ComfyUI's layout; the host writes it."""
        raise NotImplementedError

    def forward(self, item, generator: torch.Generator) -> torch.Tensor:
        latent, poses, text = (None if v is None else v.to(self.device) for v in item)
        latent = self.latent_in(latent.float())
        if not self.cfg.query_layers:
            return self.denoise_loss(latent[:, -self.cfg.predict_latent_frames:].unsqueeze(0), text, generator)
        query, target = query_draw(self.cfg, latent, poses, self.camera, generator)
        return self.denoise_loss(target.unsqueeze(0), text, generator, query=query)

    def export(self, folder: Path) -> list[Path]:
        """The Wan2.1 (``export_wan``) and the query weights (camera MLP, for Apply Query Memory's
        ``query_weights``); a plain baseline (``query_layers = 0``) has no query weights."""
        self.release()
        folder.mkdir(parents=True, exist_ok=True)
        wan = self.export_wan(folder)
        if self.camera is None:
            return [wan]
        query = folder / QUERY_EXPORT
        save_query_weights(query, self.camera.state_dict(), self.cfg.query_layers, self.cfg.query_pool,
                           self.camera.view_rope_fov, self.model_family)
        return [wan, query]


class EncoderRecipe(WanRecipe):
    """DiT-Mem: a memory encoder trained against the frozen DiT, whose every self-attention layer reads its tokens.

    An item is ``(latent [16, T, H, W], references [[16, T, H, W], ...], text [1, L, D], poses | None)``, LATENT
    samples; the loss is the flow-matching loss on the whole clip (or a random window of ``encoder_window`` latent
    frames, to match a model that generates short chunks). References are brought to the encoder's shape the way
    Encode Reference Video brings them; with ``reference_pool`` the item holds the n best and each step draws
    ``top_k_references`` of them. The host sets ``self.encoder`` (``make_encoder``) and, with ``query_file``,
    ``self.camera`` (frozen): then the frozen model runs with its query memory, the context drawn as the query
    recipe draws it, so the encoder learns to help the model as it will run with both memories."""

    encoder: MemoryEncoder
    camera: CameraEmbedding | None

    def checkpointed(self) -> dict[str, torch.Tensor]:
        return {f"encoder.{k}": v for k, v in self.encoder.state_dict(keep_vars=True).items()}

    def forward(self, item, generator: torch.Generator) -> torch.Tensor:
        latent, references, text = item[:3]
        poses = item[3] if len(item) > 3 else None
        shape = self.encoder.cfg.latent_shape
        refs = torch.stack([resample_latent(r, shape) for r in draw_references(self.cfg, references, generator)])
        memory = TrainableMemory(self.latent_in(refs.float()).unsqueeze(0).to(self.device), self.encoder)
        latent = self.latent_in(latent.float()).to(self.device)
        if self.camera is not None:
            query, target = query_draw(self.cfg, latent, poses, self.camera, generator)
            return self.denoise_loss(target.unsqueeze(0), text, generator, memory=memory, query=query)
        latent = draw_window(self.cfg, latent, generator)
        return self.denoise_loss(latent.unsqueeze(0), text, generator, memory=memory)

    def export(self, folder: Path) -> list[Path]:
        """The encoder, for Load Memory Encoder (``models/memory_encoders/``) and ``load_memory_encoder``."""
        self.release()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ENCODER_EXPORT
        save_memory_encoder(self.encoder, path)
        return [path]


def recipe_items(cfg: TrainConfig, encoded: list, texts: dict[str, torch.Tensor]
                 ) -> tuple[list, tuple[int, int, int] | None]:
    """The training items of ``encoded`` (``(entry, latent, poses)`` as the dataset gives them) and, for the
    encoder recipe, the references' latent shape (T, H, W): each clip's references are the
    ``reference_pool or top_k_references`` other clips whose captions are closest (cosine of the pooled text
    embeddings; with ``text = "none"`` the clips that share a caption)."""
    from ..memory_bank import caption_groups, pool_text_embedding, reference_sets

    if cfg.recipe == "query":
        return [(latent, poses, texts[entry.caption]) for entry, latent, poses in encoded], None
    if cfg.text == "none":  # no text encoder: clips with the same caption are each other's references
        captions = caption_groups([e.caption for e, _, _ in encoded])
    else:
        captions = torch.stack([pool_text_embedding(texts[e.caption]) for e, _, _ in encoded])
    latents = [latent for _, latent, _ in encoded]
    items = [(latents[i], [latents[j] for j in refs], texts[encoded[i][0].caption], encoded[i][2])
             for i, refs in enumerate(reference_sets(captions, cfg.reference_pool or cfg.top_k_references))]
    return items, cfg.reference_latent_shape or tuple(latents[0].shape[1:])


def train_with_progress(cfg: TrainConfig, recipe: WanRecipe, items: list, device, processes, label: str):
    """``trainer.train`` with a progress bar on the first process's stderr."""
    from tqdm import tqdm

    from .trainer import train

    with tqdm(total=cfg.steps, desc=label, file=sys.stderr, disable=not processes.is_main) as bar:
        def on_step(step, loss):
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.refresh()

        return train(cfg, recipe, items, device, on_step=on_step, processes=processes)


def add_lora(model: torch.nn.Module, rank: int, targets: str) -> None:
    """LoRA adapters (peft) of ``rank`` on the layers matching ``targets`` (a regex), ``alpha = rank``; the rest is
    frozen."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("lora_rank needs peft: pip install 'comfyui-memlearner[train]' "
                          "(or set lora_rank = 0 for a full fine-tune)") from None
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model)


def comfy_lora_state(model: torch.nn.Module, rank: int, comfy_name=lambda name: name) -> dict[str, torch.Tensor]:
    """The adapters as ComfyUI reads a LoRA: ``diffusion_model.<ComfyUI layer>.lora_A/lora_B.weight`` and
    ``.alpha``; ``comfy_name`` maps the host's module names to ComfyUI's."""
    out = {}
    for name, module in model.named_modules():
        if "default" in getattr(module, "lora_A", {}):
            key = "diffusion_model." + comfy_name(name)
            out[f"{key}.lora_A.weight"] = module.lora_A["default"].weight.detach().contiguous().cpu()
            out[f"{key}.lora_B.weight"] = module.lora_B["default"].weight.detach().contiguous().cpu()
            out[f"{key}.alpha"] = torch.tensor(float(rank))
    return out
