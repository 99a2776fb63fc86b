"""The one module that reaches into ComfyUI internals: Wan2.1 blocks (``comfy/ldm/wan/model.py``, 0.3.60+), VAE, model management.

Everything version-specific lives here: how a block modulates, projects and attends, how the model embeds
latents, timesteps and RoPE positions. Weights are always used through module calls (``block.self_attn.k(x)``),
so ComfyUI's ``comfy.ops`` casting and low-VRAM weight streaming keep working.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re

import comfy.ldm.common_dit
import comfy.ldm.wan.model as wan
import comfy.model_management
import torch
from comfy.ldm.flux.math import apply_rope1
from comfy_api.latest import io

from memlearner_core.attention import MemoryKV
from memlearner_core.model_family import SUPPORTED, WAN21, WAN22_TI2V_5B, WanFamily
from memlearner_core.query_layers import ContextKV


def _host_source_has(obj, text: str) -> bool:
    """Whether a host function's source mentions ``text`` (True when the source cannot be read: assume new)."""
    import inspect

    try:
        return text in inspect.getsource(obj)
    except (OSError, TypeError):
        return True


# ComfyUI 0.8+ (0.12.1 checked) sets ``transformer_options["block_index"]`` before each Wan block; 0.3.75 does not,
# so there the memory patch names the block itself, from a per-forward ``double_block`` patch on a copy of the
# options (``memory_patch.BlockSlot``).
HOST_SETS_BLOCK_INDEX = _host_source_has(wan.WanModel.forward_orig, '"block_index"')
# ComfyUI 0.8+ calls ``attn1_patch`` / ``attn2_patch`` in Wan's self-attention and block; 0.3.75 never does.
HOST_CALLS_ATTN_PATCHES = _host_source_has(wan.WanSelfAttention.forward, "attn1_patch")


@functools.cache
def host_checks_v3_combos() -> bool:
    """Whether ComfyUI checks a V3 combo's value when a prompt is queued (0.12.1 and later do); 0.3.75 checks only
    combos whose type is their list of choices, the V1 form."""
    import execution

    return _host_source_has(execution.validate_inputs, "Combo.io_type")


class _ListedCombo(io.Combo.Input):
    """A combo declared in the V1 form (its type is its list of choices), which every host checks at queue time."""

    def get_io_type(self):
        return list(self.options)


def combo_input(id: str, options: list, **kwargs) -> io.Combo.Input:
    """A COMBO input that ComfyUI itself refuses a wrong value of when the prompt is queued, on every host, once
    and under its own name, listing the choices: the V3 form where the host checks it, else the V1 form."""
    return (io.Combo.Input if host_checks_v3_combos() else _ListedCombo)(id, options=list(options), **kwargs)


class UnsupportedModel(ValueError):
    """The MODEL is not a Wan model of a family this pack can patch (``model_family.SUPPORTED``)."""


# ComfyUI's model class and latent channels of each family's text-to-video DiT (input channels = latent channels,
# patch 1x2x2): Wan2.2 T2V-A14B's experts are Wan2.1-14B shaped, so they are WAN21.
_FAMILIES = {("WAN21", 16): WAN21, ("WAN22", 48): WAN22_TI2V_5B}
# ComfyUI's Wan subclasses, none of which this pack can patch (extra inputs inside their blocks)
_VARIANTS = {"VaceWanModel": "VACE", "CameraWanModel": "Fun Camera", "WanModel_S2V": "S2V (sound-to-video)",
             "AnimateWanModel": "Animate", "HumoWanModel": "HuMo"}


def wan_family(model_patcher) -> WanFamily:
    """The family of the Wan model inside a ComfyUI MODEL, or ``UnsupportedModel`` in one line naming what the
    MODEL is and what is supported."""
    base = getattr(model_patcher, "model", None)
    dm = getattr(base, "diffusion_model", None)
    name = type(base).__name__ if base is not None else type(model_patcher).__name__
    if not isinstance(dm, wan.WanModel):
        found = f"{name} with diffusion model {type(dm).__name__}, not ComfyUI's WanModel"
    elif type(dm) is not wan.WanModel:
        found = f"a Wan {_VARIANTS.get(type(dm).__name__, type(dm).__name__)} model ({name}, {type(dm).__name__})"
    elif dm.model_type != "t2v" or dm.in_dim != dm.out_dim:
        found = (f"an image-to-video, Fun or control model ({name}, model_type {dm.model_type}, {dm.in_dim} input "
                 f"channels for {dm.out_dim} latent channels: image or control channels concatenated)")
    else:
        family = _FAMILIES.get((type(base).__name__, dm.out_dim)) if tuple(dm.patch_size) == (1, 2, 2) else None
        if family is not None:
            return family
        found = f"{name} with {dm.out_dim} latent channels and patch {tuple(dm.patch_size)}"
    raise UnsupportedModel(f"this node needs a Wan model of a supported family ({SUPPORTED}); the MODEL is {found}")


def wan_model(model_patcher) -> wan.WanModel:
    """The Wan diffusion model inside a ComfyUI MODEL of a supported family (else ``UnsupportedModel``)."""
    wan_family(model_patcher)
    return model_patcher.model.diffusion_model


def model_latent_in(model_patcher, latent: torch.Tensor) -> torch.Tensor:
    """LATENT samples ``[..., C, T, H, W]`` -> the MODEL's own normalized latent space (its latent format, as the
    sampler converts a LATENT before denoising)."""
    flat = latent.reshape(-1, *latent.shape[-4:])
    return model_patcher.model.process_latent_in(flat).reshape(latent.shape)


def block_modulation(block, e0: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The block's six shift/scale/gate tensors, each ``[B, 1 or L, C]``."""
    mod = comfy.model_management.cast_to(block.modulation, dtype=x.dtype, device=x.device)
    if e0.ndim < 4:
        return (mod + e0).chunk(6, dim=1)
    return (mod.unsqueeze(0) + e0).unbind(2)


def _modulated_norm1(block, x: torch.Tensor, e) -> torch.Tensor:
    return torch.addcmul(wan.repeat_e(e[0], x), block.norm1(x), 1 + wan.repeat_e(e[1], x))


def rope_with_grad(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``apply_rope1`` in plain torch, with gradients: ``x [B, L, H, D]``, ``freqs [1 or B, L, 1, D/2, 2, 2]``.

    The same operations as ComfyUI's own ``apply_rope1`` before 0.8.0 and comfy-kitchen's eager backend, so the
    value is bit-identical to the host's on CPU. Needed because from 0.8.0 on the host's ``apply_rope1`` is
    comfy-kitchen's custom op, which has no autograd formula."""
    x_ = x.to(dtype=freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = torch.addcmul(freqs[..., 0] * x_[..., 0], freqs[..., 1], x_[..., 1])
    return out.reshape(*x.shape).type_as(x)


def _rope(x: torch.Tensor, freqs: torch.Tensor, heads: int) -> torch.Tensor:
    """RoPE on ``[B, L, H*D]``: the host's kernel for inference, ``rope_with_grad`` when autograd records it."""
    b, s = x.shape[:2]
    xh = x.view(b, s, heads, -1)
    if torch.is_grad_enabled() and (x.requires_grad or freqs.requires_grad):
        return rope_with_grad(xh, freqs).view(b, s, -1)
    return apply_rope1(xh, freqs).view(b, s, -1)


def rope_backward_error(rope) -> RuntimeError | None:
    """Autograd's error for a backward through ``rope(x [B, L, H, D], freqs)``, probed on a tiny CPU tensor, or
    None when the backward works."""
    x = torch.zeros(1, 1, 1, 2, requires_grad=True)
    freqs = torch.eye(2).expand(1, 1, 1, 1, 2, 2)
    try:
        with torch.enable_grad():
            rope(x, freqs).sum().backward()
    except RuntimeError as e:
        return e
    return None


# autograd's words for a custom op with no backward: "Trying to backward through ns.name.overload but no autograd
# formula was registered"
_NO_FORMULA = re.compile(r"backward through (\w+)\.(\w+)\.\w+ but no autograd formula")


def give_rope_a_backward(rope) -> bool:
    """Make autograd go through ``rope``, decided by behaviour: when a backward through it fails because the
    custom op it calls has no autograd formula (comfy-kitchen's ``apply_rope1`` from ComfyUI 0.8.0 on, called
    directly or, from 0.14.0, through ComfyUI's own wrapper), register one for that op, named by autograd's error,
    and probe again. RoPE rotates each pair of ``x``, so ``x``'s gradient is the output gradient rotated back
    (``rope_with_grad`` with the transposed tables); the tables get none (they never require grad). The forward
    stays the host's kernel. Returns whether it registered; a backward that still fails is logged (inference is
    unaffected, training through the stock blocks then fails with autograd's error)."""
    error = rope_backward_error(rope)
    if error is None:
        return False
    found = _NO_FORMULA.search(str(error))
    log = logging.getLogger("memlearner")
    if not found:
        log.warning("a backward through the host's apply_rope1 fails, and not for a missing formula: %s", error)
        return False

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def backward(ctx, grad):
        (freqs,) = ctx.saved_tensors
        return rope_with_grad(grad, freqs.transpose(-1, -2)), None

    op = f"{found[1]}::{found[2]}"
    try:
        torch.library.register_autograd(op, backward, setup_context=setup_context)
    except Exception as e:  # an op defined otherwise: inference is unaffected, training fails
        log.warning("could not give %s (the host's apply_rope1) a backward: %s", op, e)
        return False
    error = rope_backward_error(rope)
    if error is not None:
        log.warning("a backward through the host's apply_rope1 still fails after registering one for %s: %s", op, error)
        return False
    return True


HOST_ROPE_BACKWARD_ADDED = give_rope_a_backward(apply_rope1)


@contextlib.contextmanager
def host_training_mode():
    """ComfyUI's own switch for training, ``comfy.model_management.in_training`` (0.3x), set while the pack trains:
    while it is set the host's RoPE, and on newer hosts its fused adaLN and int8 kernels (comfy-kitchen's, without a
    backward), take their plain-torch paths. A host without the switch is unaffected."""
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):
        yield
        return
    before, mm.in_training = mm.in_training, True
    try:
        yield
    finally:
        mm.in_training = before


def key_value(block, h: torch.Tensor, freqs: torch.Tensor | None):
    """Self-attention keys (RMSNorm, RoPE when ``freqs`` is given) and values of modulated states ``[B, L, C]``."""
    sa = block.self_attn
    k = sa.norm_k(sa.k(h))
    return (k if freqs is None else _rope(k, freqs, sa.num_heads)), sa.v(h)


def memory_kv(block, tokens: torch.Tensor, e0: torch.Tensor, log_weight: torch.Tensor | None) -> MemoryKV:
    """DiT-Mem keys/values of memory tokens ``[Bm, U, C]`` in this block: norm1 + this step's modulation, the
    block's k/v projections and RMSNorm, no RoPE. ``e0`` is the step's ``[B, 1, 6, C]`` time modulation."""
    b = e0.shape[0]
    tokens = tokens.to(device=e0.device, dtype=e0.dtype if e0.dtype.is_floating_point else tokens.dtype)
    if tokens.shape[0] != b:
        tokens = tokens.expand(b, -1, -1)
    e = block_modulation(block, e0[:, :1] if e0.ndim == 4 else e0, tokens)
    k, v = key_value(block, _modulated_norm1(block, tokens, e), None)
    lw = None if log_weight is None else log_weight.to(e0.device).expand(b, -1)
    return MemoryKV(k, v, lw)


def context_kv(block, tokens: torch.Tensor, e0_clean: torch.Tensor, freqs: torch.Tensor) -> ContextKV:
    """Query-layer keys/values of context tokens ``[1, Nc, C]`` at their RoPE positions, modulated at t=0."""
    e = block_modulation(block, e0_clean, tokens)
    return ContextKV(*key_value(block, _modulated_norm1(block, tokens, e), freqs))  # C is never a query: no q


def stock_block(block):
    """``forward_orig``'s ``original_block`` for one block (t2v: no image context), bound to that block.

    Re-implemented because the host's ``block_wrap`` reads the loop variable ``block`` when called, so a
    checkpointed block recomputed in the backward pass, after the loop ended, would run the last block instead."""

    def original_block(args):
        return {"img": block(args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"], context_img_len=None,
                             transformer_options=args["transformer_options"])}

    return original_block


def embed_latent(dm: wan.WanModel, latent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Patch-embed clean latents ``[B, C, T, H, W]`` -> tokens ``[B, T*h*w, dim]``."""
    latent = comfy.ldm.common_dit.pad_to_patch_size(latent, dm.patch_size)
    return dm.patch_embedding(latent.float()).to(dtype).flatten(2).transpose(1, 2)


def time_modulation(dm: wan.WanModel, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample time modulation ``[B, 1, 6, dim]`` for timesteps ``t [B]`` (what blocks receive as ``e0``)."""
    e = dm.time_embedding(wan.sinusoidal_embedding_1d(dm.freq_dim, t.flatten()).to(dtype=dtype))
    e = e.reshape(t.shape[0], -1, e.shape[-1])
    return dm.time_projection(e).unflatten(2, (6, dm.dim))


def rope_from_ids(dm: wan.WanModel, ids: torch.Tensor, device, dtype, transformer_options=None) -> torch.Tensor:
    """RoPE tables for explicit (t, h, w) positions ``[N, 3]`` -> ``[1, N, 1, D/2, 2, 2]``.

    ``transformer_options["rope_options"]`` (ScaleROPE and the like) map every position as ``rope_encode`` maps
    the video's grid: ``p * scale + shift`` per axis, so history and pooled query positions move with the video's."""
    ids = ids.to(device=device, dtype=dtype)
    ro = (transformer_options or {}).get("rope_options")
    if ro is not None:
        scale = torch.tensor([ro.get("scale_t", 1.0), ro.get("scale_y", 1.0), ro.get("scale_x", 1.0)], dtype=dtype)
        shift = torch.tensor([ro.get("shift_t", 0.0), ro.get("shift_y", 0.0), ro.get("shift_x", 0.0)], dtype=dtype)
        ids = ids * scale.to(device) + shift.to(device)
    return dm.rope_embedder(ids.unsqueeze(0)).movedim(1, 2)


def rope_for_latent(dm: wan.WanModel, t: int, h: int, w: int, device, dtype, transformer_options) -> torch.Tensor:
    return dm.rope_encode(t, h, w, device=device, dtype=dtype, transformer_options=transformer_options)


def forward_with_positions(executor, x: torch.Tensor, timestep, context, freqs: torch.Tensor,
                           transformer_options: dict, clip_fea=None, **kwargs) -> torch.Tensor:
    """The rest of a DIFFUSION_MODEL wrapper chain (``executor``: the wrappers installed after this one still run),
    ending in ``WanModel._forward`` with the RoPE tables given: stock ``forward_orig`` (embedding, every block,
    head, unpatchify) on a patch-padded latent ``x [B, C, T, H, W]``. Re-implemented because the host offers no
    hook for positions: ``_forward`` always builds a regular grid, and query tokens sit at the video's positions."""
    import comfy.patcher_extension

    dm = executor.class_obj

    def forward(x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):  # noqa: B006
        return dm.forward_orig(x, timestep, context, clip_fea=clip_fea, freqs=freqs,
                               transformer_options=transformer_options, **kwargs)

    rest = comfy.patcher_extension.WrapperExecutor.new_class_executor(forward, dm, executor.wrappers, executor.idx)
    return rest(x, timestep, context, clip_fea, None, transformer_options, **kwargs)


def pad_latent(dm: wan.WanModel, x: torch.Tensor) -> torch.Tensor:
    return comfy.ldm.common_dit.pad_to_patch_size(x, dm.patch_size)



# --- VAE and model management ---------------------------------------------------------------------------------

def wan_vae_channels(vae, what: str = "Encode Reference Video") -> int:
    """The latent channels of ComfyUI's Wan2.1 VAE (16) or Wan2.2 VAE (48, ``vae2_2``); any other VAE is one
    ``ValueError`` naming ``what``."""
    import comfy.ldm.wan.vae
    import comfy.ldm.wan.vae2_2

    fsm = getattr(vae, "first_stage_model", None)
    channels = getattr(vae, "latent_channels", None)
    if not ((isinstance(fsm, comfy.ldm.wan.vae.WanVAE) and channels == 16)
            or (isinstance(fsm, comfy.ldm.wan.vae2_2.WanVAE) and channels == 48)):
        raise ValueError(f"{what} needs the Wan2.1 VAE (wan_2.1_vae.safetensors) or, for Wan2.2 TI2V-5B, the "
                         f"Wan2.2 VAE (wan2.2_vae.safetensors); the connected VAE is {type(fsm).__name__} with "
                         f"{channels or '?'} latent channels")
    return channels


def check_wan21_vae(vae) -> None:
    """Raise unless ``vae`` is ComfyUI's Wan2.1 VAE (16 latent channels; Wan2.2's has 48)."""
    if wan_vae_channels(vae, "training") != 16:
        raise ValueError("training needs the Wan2.1 VAE (wan_2.1_vae.safetensors); the connected VAE is Wan2.2's "
                         "(48 latent channels)")


def vae_spatial_stride(vae) -> int:
    """How many pixels of a frame one latent pixel covers, per side (8 for the Wan2.1 VAE, 16 for Wan2.2's)."""
    return int(vae.spacial_compression_encode())


def reference_latent_in(latent: torch.Tensor) -> torch.Tensor:
    """Reference LATENT samples ``[..., C, T, H, W]`` -> the model's normalized space, ``(z - mean) / std`` per
    channel in the latent format their channel count names (16: Wan2.1's, 48: Wan2.2's): a MEMORY is made
    without the model, so the latents themselves say which VAE made them."""
    import comfy.latent_formats

    formats = {16: comfy.latent_formats.Wan21, 48: comfy.latent_formats.Wan22}
    channels = latent.shape[-4]
    if channels not in formats:
        raise ValueError(f"reference latents must have 16 (Wan2.1) or 48 (Wan2.2) channels, got {channels}")
    flat = latent.reshape(-1, *latent.shape[-4:])
    return formats[channels]().process_in(flat).reshape(latent.shape)


def managed_module(module: torch.nn.Module):
    """Wrap a torch module in a ModelPatcher so ComfyUI loads, offloads and accounts for it like any model."""
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(
        module, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def load_whole(patcher) -> None:
    """Load a model onto ComfyUI's compute device in full (or, under ``--novram``, leave all of it offloaded), so
    its weights are never split between two devices; ComfyUI accounts for it like any loaded model."""
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)


def default_dtype(choice: str) -> torch.dtype:
    """fp32/fp16/bf16 by name; ``default`` is what ComfyUI would pick for a diffusion model on this device."""
    named = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if choice in named:
        return named[choice]
    return comfy.model_management.unet_dtype()


def resize_frames(frames: torch.Tensor, width: int, height: int, crop: str = "center") -> torch.Tensor:
    """IMAGE ``[F, H, W, 3]`` scaled (bilinear) to ``width x height``: ``crop`` "center" crops the frames to that
    aspect first, "disabled" stretches them whole (ComfyUI's ``common_upscale`` crop values)."""
    import comfy.utils

    if crop not in ("center", "disabled"):
        raise ValueError(f"resize_frames: crop must be 'center' or 'disabled', got {crop!r}")
    return comfy.utils.common_upscale(frames.movedim(-1, 1), width, height, "bilinear", crop).movedim(1, -1)


def read_video(source) -> torch.Tensor:
    """A video decoded by ComfyUI's own reader (PyAV): IMAGE frames ``[F, H, W, 3]`` in [0, 1]. ``source`` is a
    path or an ``io.BytesIO`` of the file's bytes (a file read through ``confined_files``)."""
    import io

    from comfy_api.latest import InputImpl

    return InputImpl.VideoFromFile(source if isinstance(source, io.BytesIO) else str(source)).get_components().images


def text_embedding(clip, text: str) -> torch.Tensor:
    """``[D]``: ``text`` through the user's loaded text encoder, pooled as a prompt's CONDITIONING is."""
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return conditioning_embedding([[cond, {"pooled_output": pooled}]])


def conditioning_embedding(conditioning) -> torch.Tensor:
    """``[D]`` for a CONDITIONING (its first entry): the encoder's pooled output, else ``pool_text_embedding``."""
    from memlearner_core.memory_bank import pool_text_embedding

    if not conditioning:
        raise ValueError("the prompt conditioning is empty")
    cond, extra = conditioning[0][0], conditioning[0][1]
    pooled = extra.get("pooled_output")
    return pool_text_embedding(cond.cpu(), pooled.cpu() if torch.is_tensor(pooled) else None)


def vae_fingerprint(vae) -> str:
    """A short digest of the VAE's first weight, so cached latents of another VAE are never reused."""
    import hashlib

    p = next(vae.first_stage_model.parameters()).detach().float().cpu()
    return hashlib.sha1(p.numpy().tobytes()).hexdigest()[:12]


class Progress:
    """One ComfyUI progress bar over all chunks and steps, with a latent preview of the current chunk."""

    def __init__(self, model, total: int):
        import comfy.utils
        import latent_preview

        self.total = total
        self.bar = comfy.utils.ProgressBar(total)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

    def callback(self, offset: int):
        """A sampler callback whose steps count from ``offset`` on the shared bar."""

        def on_step(step, x0, x, total_steps):
            preview = self.previewer.decode_latent_to_preview_image("JPEG", x0) if self.previewer else None
            self.bar.update_absolute(offset + step + 1, self.total, preview)

        return on_step


def is_interrupt(error: BaseException) -> bool:
    return isinstance(error, comfy.model_management.InterruptProcessingException)


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> tuple[str, float]:
    """Peak memory since ``reset_peak_memory``: CUDA allocated on a GPU, else the process's peak RSS."""
    if torch.device(device).type == "cuda":
        return "cuda_allocated", torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return "process_peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_latent(samples: torch.Tensor, prefix: str) -> str:
    """Write a LATENT to ComfyUI's output folder in the ``.latent`` format Load Latent reads; returns the path."""
    import folder_paths
    from safetensors.torch import save_file

    folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, folder_paths.get_output_directory())
    path = f"{folder}/{name}_{counter:05}_.latent"
    save_file({"latent_tensor": samples.contiguous(), "latent_format_version_0": torch.tensor([])}, path)
    return path


def wan21_latent_in(latent: torch.Tensor) -> torch.Tensor:
    """A LATENT's samples (what VAE Encode and the samplers hand out) -> the model's normalized latent space,
    where the sampler denoises and where the released DiT-Mem encoder was trained: ``(z - mean) / std`` per
    channel. Works on ``[16, T, H, W]`` and ``[..., 16, T, H, W]``."""
    import comfy.latent_formats

    fmt = comfy.latent_formats.Wan21()
    flat = latent.reshape(-1, *latent.shape[-4:])
    return fmt.process_in(flat).reshape(latent.shape)


def wan21_latent_out(latent: torch.Tensor) -> torch.Tensor:
    """The inverse of ``wan21_latent_in``: model-space latents -> a LATENT's samples."""
    import comfy.latent_formats

    fmt = comfy.latent_formats.Wan21()
    flat = latent.reshape(-1, *latent.shape[-4:])
    return fmt.process_out(flat).reshape(latent.shape)


def wan21_preview_factors() -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's Wan2.1 latent-to-RGB preview factors ``[16, 3]`` and bias ``[3]`` (applied to model-space latents)."""
    import comfy.latent_formats

    fmt = comfy.latent_formats.Wan21()
    return torch.tensor(fmt.latent_rgb_factors), torch.tensor(fmt.latent_rgb_factors_bias)


# --- the pack's own folders ------------------------------------------------------------------------------------

def model_file(folder: str, name: str, what: str) -> str:
    """The path of ``name`` in ComfyUI's model folder ``folder`` (``models/<folder>`` and extra paths); a missing
    file is one ``ValueError`` naming ``what`` and listing the files that are there."""
    import folder_paths

    from memlearner_core.bounded_text import listed

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        there = folder_paths.get_filename_list(folder)
        raise ValueError(f"{what}: no file {name!r} in ComfyUI's models/{folder} folder; "
                         + (f"the files there: {listed(there, 12)}" if there else "it has no files")
                         + "; put the file there, then refresh (R) or restart ComfyUI")
    return path


def input_directory() -> str:
    """ComfyUI's input folder: the only place user-given folders (a memory bank) are read from."""
    import folder_paths

    return folder_paths.get_input_directory()


def cache_directory(name: str) -> str:
    """A cache folder of this pack inside ComfyUI's user folder: ``user/__memlearner/<name>``, a system-user
    folder that ComfyUI's HTTP endpoints never serve (``user/memlearner_cache/<name>`` on a ComfyUI without
    system users)."""
    import os

    import folder_paths

    if hasattr(folder_paths, "get_system_user_directory"):
        return os.path.join(folder_paths.get_system_user_directory("memlearner"), name)
    return os.path.join(folder_paths.get_user_directory(), "memlearner_cache", name)


# --- sampling from ComfyUI's parts (NOISE, GUIDER, SAMPLER, SIGMAS), as SamplerCustomAdvanced does ----------------

def ksampler_parts(model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
                   denoise: float) -> tuple:
    """KSampler's settings as (noise, guider, sampler, sigmas): sampling with these parts is what KSampler does
    (a CFG guider over the model, its sampler by name, its sigmas for ``steps`` and ``denoise``)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
    return Noise_RandomNoise(seed), guider, comfy.samplers.sampler_object(sampler_name), sigmas.cpu()


def guider_on(guider, model):
    """A copy of ``guider`` (its conditioning, cfg and settings) that samples ``model`` instead of its own."""
    import copy

    g = copy.copy(guider)
    g.model_patcher, g.model_options = model, model.model_options
    return g


def reseeded(noise, seed: int):
    """A copy of a NOISE that draws with ``seed`` (a noise without a seed, such as custom noise, is kept)."""
    import copy

    if not hasattr(noise, "seed"):
        return noise
    n = copy.copy(noise)
    n.seed = seed
    return n


def empty_noise():
    """ComfyUI's NOISE of Disable Noise (all zeros): a pass that continues a latent already noised."""
    from comfy_extras.nodes_custom_sampler import Noise_EmptyNoise

    return Noise_EmptyNoise()


def sample_with(guider, noise, sampler, sigmas: torch.Tensor, latent: torch.Tensor, callback,
                seed: int | None = None) -> torch.Tensor:
    """One sampling run from ComfyUI's parts, as SamplerCustomAdvanced runs it: noise drawn for ``latent``. The
    sampler gets ``seed``, or else the noise's (as SamplerCustomAdvanced passes it); KSamplerAdvanced passes its
    noise_seed even with add_noise off."""
    import comfy.utils

    seed = getattr(noise, "seed", None) if seed is None else seed
    samples = guider.sample(noise.generate_noise({"samples": latent}), latent, sampler, sigmas, callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return samples.to(comfy.model_management.intermediate_device())
