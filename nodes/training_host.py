"""Training recipes on ComfyUI's own Wan2.1 model, so a fine-tune loads in the nodes unchanged and trains the
exact patches the nodes install (``apply_memory``, run by ``patched_forward``)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from memlearner_core.camera import CameraEmbedding
from memlearner_core.checkpoint_io import save_query_weights
from memlearner_core.context_tokens import ContextSpec
from memlearner_core.training.config import TrainConfig
from memlearner_core.training.context_sampling import clip_windows, sample_context_length
from memlearner_core.training.flow_matching import (
    flow_loss,
    noisy_latents,
    sample_sigmas,
    timesteps,
    velocity_target,
)

from . import comfy_adapter as wa
from .memory_patch import QueryMemory, RunState, apply_memory, patched_forward

WAN_EXPORT, QUERY_EXPORT = "memlearner_wan21.safetensors", "memlearner_query.safetensors"


class QueryRecipe:
    """MemLearner: the whole DiT (and a zero-initialised camera MLP) fine-tuned end to end with query layers.

    An item is ``(latent [16, N, H, W] LATENT samples, poses [N, 3, 4] | None, text [1, L, 4096])``. Each step
    denoises the last ``predict_latent_frames`` frames with a context of the frames right before them, its length
    uniform in ``0 .. max_context_multiple x P``; the loss is the flow-matching loss on P only, Q is fresh noise.
    """

    def __init__(self, model_patcher, cfg: TrainConfig, device: str | torch.device = "cpu"):
        self.model, self.dm = model_patcher, wa.wan21_model(model_patcher)
        self.cfg, self.device = cfg, torch.device(device)
        self.dm.to(self.device).float().train().requires_grad_(True)  # fp32 master weights; autocast for bf16
        self.camera = CameraEmbedding(self.dm.dim).to(self.device)
        torch.nn.init.zeros_(self.camera.proj.weight)  # starts as "no camera": the stock model's behaviour
        torch.nn.init.zeros_(self.camera.proj.bias)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        params = {f"dm.{n}": p for n, p in self.dm.named_parameters()}
        params.update({f"camera.{n}": p for n, p in self.camera.named_parameters()})
        return params

    def loss(self, item, generator: torch.Generator) -> torch.Tensor:
        latent, poses, text = (None if v is None else v.to(self.device) for v in item)
        latent = wa.wan21_latent_in(latent.float())
        p = self.cfg.predict_latent_frames
        n_ctx = sample_context_length(p, self.cfg.max_context_multiple, latent.shape[1] - p, generator)
        c_slice, p_slice = clip_windows(latent.shape[1], p, n_ctx)
        pose = (lambda s: None) if poses is None else (lambda s: poses[s])
        history = ContextSpec.from_history(latent[:, c_slice], pose(c_slice))
        query = QueryMemory(self.cfg.query_layers, history, self.camera, pose(p_slice), cache_context=False)
        x0 = latent[:, p_slice].unsqueeze(0)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        sigma = sample_sigmas(1, generator).to(self.device)
        run = RunState(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        patched = apply_memory(self.model, query=query)
        pred = patched_forward(patched, noisy_latents(x0, noise, sigma), timesteps(sigma), text, run=run)
        return flow_loss(pred, velocity_target(x0, noise))

    def export(self, folder: Path) -> list[Path]:
        """The fine-tuned Wan2.1 state dict (load it with Load Diffusion Model) and the query weights (camera
        MLP, for Apply Query Memory's ``query_weights``)."""
        folder.mkdir(parents=True, exist_ok=True)
        wan, query = folder / WAN_EXPORT, folder / QUERY_EXPORT
        save_file({k: v.detach().contiguous().cpu() for k, v in self.dm.state_dict().items()}, str(wan))
        save_query_weights(query, self.camera.state_dict(), self.cfg.query_layers)
        return [wan, query]


def run_training(cfg: TrainConfig, text_fn=None):
    """Load the model, VAE and text encoder with ComfyUI, encode the clips once (cached), train, export.

    ``text_fn(caption) -> [1, L, 4096]`` replaces loading ``cfg.text_encoder_file`` (tests)."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    from tqdm import tqdm

    from memlearner_core.training.dataset import ClipFolder, LatentCache, encode_all
    from memlearner_core.training.trainer import train

    if cfg.lora_rank:
        raise ValueError("lora_rank: LoRA training is not available yet; set lora_rank = 0 (full fine-tune)")
    if cfg.gradient_checkpointing:
        print("memlearner-train: gradient_checkpointing is not available yet and is ignored", file=sys.stderr)
    model = comfy.sd.load_diffusion_model(str(cfg.model_file))
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(cfg.vae_file)))
    wa.check_wan21_vae(vae)
    if text_fn is None:
        if cfg.text_encoder_file is None:
            raise ValueError("the config needs text_encoder_file (umt5_xxl, to encode the captions)")
        clip = comfy.sd.load_clip([str(cfg.text_encoder_file)], clip_type=comfy.sd.CLIPType.WAN)

        def text_fn(caption):
            return clip.encode_from_tokens(clip.tokenize(caption))

    clips = ClipFolder(cfg.data_dir, cfg.clip_frames, cfg.width, cfg.height)
    encoded, skipped = encode_all(clips, wa.read_video, lambda frames: vae.encode(frames).detach().cpu(),
                                  LatentCache(cfg.cache_dir), wa.vae_fingerprint(vae))
    texts = {e.caption: text_fn(e.caption).detach().float().cpu() for e, _, _ in encoded}
    items = [(latent, poses, texts[entry.caption]) for entry, latent, poses in encoded]
    print(f"training data: {len(items)} clips, {len(skipped)} skipped", file=sys.stderr)
    device = comfy.model_management.get_torch_device()
    recipe = QueryRecipe(model, cfg, device)
    with tqdm(total=cfg.steps, desc="memlearner-train", file=sys.stderr) as bar:
        def on_step(step, loss):
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.refresh()

        return train(cfg, recipe, items, device, on_step=on_step)
