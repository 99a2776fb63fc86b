"""Patching a ComfyUI Wan2.1 MODEL with memory, always on a clone.

Three ModelPatcher hooks, all keyed ``memlearner`` so they stay on the clone that carries them:
- OUTER_SAMPLE wrapper: checks shapes before sampling starts and owns the per-run state (the sampler's seed for
  the query tokens' noise, the context key/value cache), dropped when the run ends or is interrupted;
- DIFFUSION_MODEL wrapper: per forward, makes the query tokens Q (at P's RoPE positions, or pooled) and their
  RoPE tables; with DiT-Mem only it just hands the memory to the blocks;
- a ``double_block`` replace on every block: runs the block with the memory-aware self-attention; block 0 puts Q
  in front of the sequence and the last block takes it out, so the model's head sees P alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import comfy.patcher_extension
import torch
import torch.utils.checkpoint

from memlearner_core.attention import attention_with_memory
from memlearner_core.camera import CameraEmbedding, frame_embedding_to_tokens
from memlearner_core.context_tokens import (
    ContextSpec,
    frame_token_counts,
    pooled_grid,
    pooled_query_positions,
    segment_positions,
    tokens_per_frame,
)
from memlearner_core.memory_encoder import MemoryEncoder
from memlearner_core.memory_tokens import MemoryTokens
from memlearner_core.query_layers import ContextKV, query_memory_attention

from . import comfy_adapter as wa
from . import memory_estimate

KEY = "memlearner"
RUN_KEY = "memlearner_run"
FORWARD_KEY = "memlearner_forward"
log = logging.getLogger("memlearner")


@dataclass
class ReferenceMemory:
    """The MEMORY type: reference-video latents ``[1, N, 16, T, H, W]`` and the encoder that turns them into
    tokens. Tokens are computed once, on whatever device ComfyUI's model management put the encoder, and kept:
    the encoder's weights never change, and the blocks move the tokens to their own device and dtype."""

    latents: torch.Tensor
    encoder: object  # comfy.model_patcher.ModelPatcher wrapping a MemoryEncoder
    strength: float = 1.0
    deduplicate: bool = True
    _tokens: MemoryTokens | None = field(default=None, repr=False)

    @classmethod
    def from_latents(cls, videos: list[torch.Tensor], encoder, strength: float = 1.0, deduplicate: bool = True):
        """Reference videos as LATENT samples ``[16, T, H, W]`` each (already in the encoder's shape)."""
        refs = wa.wan21_latent_in(torch.stack(videos).float()).unsqueeze(0)  # [1, N, 16, T, H, W]
        return cls(refs, encoder, float(strength), bool(deduplicate))

    @property
    def width(self) -> int:
        return self.encoder.model.cfg.width

    def tokens(self) -> MemoryTokens:
        if self._tokens is None:
            # Whole, never split between GPU and CPU by a low-VRAM partial load: the encoder's layers are plain
            # torch modules, which ComfyUI cannot stream weight by weight.
            wa.load_whole(self.encoder)
            enc: MemoryEncoder = self.encoder.model
            p = next(enc.parameters())
            with torch.no_grad():
                raw = enc(self.latents.to(device=p.device, dtype=p.dtype))
            self._tokens = MemoryTokens.deduplicated(raw) if self.deduplicate else MemoryTokens.full(raw)
        return self._tokens if self.strength == 1.0 else self._tokens.with_strength(self.strength)

    def prepare(self) -> None:
        """Compute the tokens before sampling loads the diffusion model, so the encoder's turn on the GPU comes
        first instead of in the middle of the first step."""
        self.tokens()

    def managed_models(self) -> list:
        """Modules ComfyUI loads and offloads with the patched model."""
        return [self.encoder]


@dataclass
class TrainableMemory:
    """Reference memory whose tokens keep their gradients (training a memory encoder against a frozen Wan).

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
        return []


def context_in_model_space(spec: ContextSpec) -> ContextSpec:
    """History as handed out by samplers and VAE Encode -> the normalized space of the latent being denoised."""
    return ContextSpec([replace(seg, latent=wa.wan21_latent_in(seg.latent.float())) for seg in spec.segments])


@dataclass
class QueryMemory:
    """Query-memory settings: the first ``query_layers`` blocks are query layers; ``context`` is the history.

    ``query_pool`` > 1 is a query budget beyond the published method: one query token per ``pool x pool`` cell
    of P's token grid instead of one per token, so Q costs ``1/pool^2`` of P in every layer. A model must be
    fine-tuned with the pool it runs with."""

    query_layers: int
    context: ContextSpec
    camera: CameraEmbedding | None = None
    chunk_poses: torch.Tensor | None = None  # [T, 3, 4] poses of the frames being generated
    cache_context: bool = True
    query_pool: int = 1


class RunState:
    """State of one sampling run: the sampler's seed (for the query tokens' noise), the context K/V cache.

    ``gradient_checkpointing`` (training): each block's activations are recomputed in the backward pass instead
    of kept, trading about one extra forward for memory that no longer grows with the number of blocks."""

    def __init__(self, seed: int | None, gradient_checkpointing: bool = False):
        self.seed = int(seed or 0)
        self.gradient_checkpointing = gradient_checkpointing
        self.context_tokens: dict = {}  # (device, dtype) -> history tokens, RoPE tables, t=0 modulation
        self.context_cache: dict = {}  # (layer, device, dtype) -> ContextKV

    def query_noise(self, shape, groups: int, device, dtype, timestep: float) -> torch.Tensor:
        """Gaussian noise for Q ``[B, C, T, H, W]``, fresh at every denoising step and a function of the run's
        seed and the step's ``timestep`` alone: every CFG branch reads the same Q, whether ComfyUI batches the
        ``groups`` branches in one forward or (low VRAM) runs them one forward each."""
        b = shape[0]
        per = b // groups if groups and b % groups == 0 else b
        key = (self.seed * 1_000_003 + round(float(timestep) * 1000)) & 0xFFFF_FFFF_FFFF
        n = torch.randn((per, *shape[1:]), generator=torch.Generator().manual_seed(key))
        return n.repeat(b // per, 1, 1, 1, 1).to(device=device, dtype=dtype)


@dataclass
class ForwardState:
    dm: object
    memory: MemoryTokens | None
    query: QueryMemory | None
    run: RunState
    n_query: int = 0
    q_tokens: torch.Tensor | None = None  # [B, Nq, dim] query tokens, prepended to the sequence in block 0
    p_camera: torch.Tensor | None = None  # [Np, dim] camera vectors of P's tokens
    context_tokens: dict = field(default_factory=dict)  # this forward's history tokens when nothing is cached

    def context_kv(self, index: int, x: torch.Tensor) -> ContextKV | None:
        """This query layer's history keys/values; from the run's cache when ``cache_context`` is on."""
        q = self.query
        if index >= q.query_layers or not q.context.segments:
            return None
        where = (str(x.device), x.dtype)
        if q.cache_context and (index, *where) in self.run.context_cache:
            return self.run.context_cache[(index, *where)]
        tokens, freqs, e0_clean = self.history_tokens(x)
        kv = wa.context_kv(self.dm.blocks[index], tokens, e0_clean, freqs)
        if q.cache_context:
            self.run.context_cache[(index, *where)] = kv
        return kv

    def history_tokens(self, x: torch.Tensor):
        """The history's tokens, RoPE tables and clean modulation, made once per run (cached) or per forward."""
        where = (str(x.device), x.dtype)
        cache = self.run.context_tokens if self.query.cache_context else self.context_tokens
        if where not in cache:
            cache[where] = context_tokens(self.dm, self.query, x.device, x.dtype)
        return cache[where]

    def block(self, index: int, args: dict) -> torch.Tensor:
        """Block ``index`` on ``[Q; P]``: Q joins the sequence before block 0 and leaves it after the last block,
        so the model's head and unpatchify see P alone."""
        x = args["img"]
        if index == 0 and self.q_tokens is not None:
            x = torch.cat([self.q_tokens.to(x), x], 1)
        if index == 0 and self.p_camera is not None:
            cam = self.p_camera.to(x)
            x = torch.cat([x[:, : self.n_query], x[:, self.n_query:] + cam], 1)
        if self.query is not None and index < self.query.query_layers and self.query.context.segments:
            self.history_tokens(x)  # shared by the query layers: made outside any checkpointed region
        if self.run.gradient_checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(self._block, index, x, args, use_reentrant=False)
        else:
            x = self._block(index, x, args)
        return x[:, self.n_query:] if index == len(self.dm.blocks) - 1 else x

    def _block(self, index: int, x: torch.Tensor, args: dict) -> torch.Tensor:
        e0, block = args["vec"], self.dm.blocks[index]
        mem = None
        if self.memory is not None:
            lw = None if self.memory.is_plain else self.memory.log_weight
            mem = wa.memory_kv(block, self.memory.tokens, e0, lw)
        if self.query is not None:
            ctx = self.context_kv(index, x)

            def attention(q, k, v, heads):
                return query_memory_attention(q, k, v, heads, self.n_query, ctx, mem, wa.host_attention)
        else:

            def attention(q, k, v, heads):
                return attention_with_memory(q, k, v, heads, mem, wa.host_attention)

        return wa.run_block(block, x, e0, args["pe"], args["txt"], args["transformer_options"], attention)


def context_tokens(dm, q: QueryMemory, device, dtype):
    """Context tokens ``[1, Nc, dim]`` (+ camera), their RoPE tables, and the clean (t=0) time modulation."""
    tokens, ids = [], []
    for seg in q.context.segments:
        lat = seg.pooled_latent().unsqueeze(0).to(device)
        tok = wa.embed_latent(dm, lat, dtype)
        if q.camera is not None:
            poses = seg.poses if seg.poses is not None else torch.zeros(seg.latent.shape[1], 3, 4)
            emb = q.camera(poses.to(device)).to(dtype)
            tok = tok + frame_embedding_to_tokens(emb, frame_token_counts(seg, dm.patch_size)).unsqueeze(0)
        tokens.append(tok)
        ids.append(segment_positions(seg, tuple(dm.patch_size)))
    tokens = torch.cat(tokens, 1)
    freqs = wa.rope_from_ids(dm, torch.cat(ids, 0), device, dtype)
    e0_clean = wa.time_modulation(dm, torch.zeros(1, device=device), dtype)
    return tokens, freqs, e0_clean


class _Shared:
    """Patch objects are immutable settings: a clone of the patched MODEL shares them instead of deep-copying
    the encoder and tensors they hold."""

    def __deepcopy__(self, memo):
        return self


class BlockPatch(_Shared):
    """``double_block`` replacement for block ``index``; outside a memory forward it runs the original block."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, args, extra):
        st = args["transformer_options"].get(FORWARD_KEY)
        if st is None:
            return extra["original_block"](args)
        return {"img": st.block(self.index, args)}


class DiffusionModelWrapper(_Shared):
    def __init__(self, memory: ReferenceMemory | TrainableMemory | None, query: QueryMemory | None):
        self.memory, self.query = memory, query

    def __call__(self, executor, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options=None, **kwargs):
        transformer_options = transformer_options or {}
        dm = executor.class_obj
        run = transformer_options.get(RUN_KEY) or RunState(0)
        memory = self.memory.tokens() if self.memory is not None else None
        st = ForwardState(dm, memory, self.query, run)
        opts = {**transformer_options, FORWARD_KEY: st}
        if self.query is None:
            return executor(x, timestep, context, clip_fea, time_dim_concat, opts, **kwargs)

        b, _, t, h, w = x.shape
        xp = wa.pad_latent(dm, x)
        groups = len(transformer_options.get("cond_or_uncond", [])) or 1
        step = float(timestep.flatten()[0])
        freqs_p = wa.rope_for_latent(dm, t, h, w, x.device, x.dtype, transformer_options)
        pool = self.query.query_pool
        if pool == 1:  # one query token per predicted token, at the same positions
            noise_q, freqs_q = run.query_noise(xp.shape, groups, x.device, x.dtype, step), freqs_p
        else:
            ph, pw = xp.shape[-2] // dm.patch_size[1], xp.shape[-1] // dm.patch_size[2]
            qh, qw = pooled_grid(ph, pw, pool)
            shape = (b, xp.shape[1], t, qh * dm.patch_size[1], qw * dm.patch_size[2])
            noise_q = run.query_noise(shape, groups, x.device, x.dtype, step)
            freqs_q = wa.rope_from_ids(dm, pooled_query_positions(t, ph, pw, pool), x.device, x.dtype)
        st.q_tokens = wa.embed_latent(dm, noise_q, x.dtype)
        st.n_query = st.q_tokens.shape[1]
        camera = self.query.camera
        if camera is not None:
            poses = self.query.chunk_poses if self.query.chunk_poses is not None else torch.zeros(t, 3, 4)
            emb = camera(poses[:t].to(x.device)).to(x.dtype)  # [t, dim]
            st.p_camera = frame_embedding_to_tokens(emb, tokens_per_frame(h, w, tuple(dm.patch_size)))
            if camera.on_query:
                st.q_tokens = st.q_tokens + frame_embedding_to_tokens(emb, st.n_query // t)
        out = dm.forward_orig(xp, timestep, context, clip_fea=clip_fea, freqs=torch.cat([freqs_q, freqs_p], 1),
                              transformer_options=opts, **kwargs)
        return out[:, :, :t, :h, :w]


class OuterSampleWrapper(_Shared):
    def __init__(self, memory: ReferenceMemory | TrainableMemory | None, query: QueryMemory | None):
        self.memory, self.query = memory, query

    def __call__(self, executor, noise, *args, **kwargs):
        if self.query is not None:
            check_context_matches(self.query.context, noise)
            check_chunk_poses(self.query.chunk_poses, noise)
        if self.memory is not None:
            self.memory.prepare()
        seed = kwargs.get("seed", args[6] if len(args) > 6 else None)
        guider = executor.class_obj
        topts = guider.model_options.setdefault("transformer_options", {})
        topts[RUN_KEY] = RunState(seed)
        try:
            return executor(noise, *args, **kwargs)
        finally:
            topts.pop(RUN_KEY, None)


def check_context_matches(context: ContextSpec, noise: torch.Tensor) -> None:
    size = context.spatial_size()
    if size is not None and tuple(noise.shape[-2:]) != size:
        raise ValueError(
            f"the query-memory context is {size[0]}x{size[1]} latent pixels but the latent being sampled is "
            f"{noise.shape[-2]}x{noise.shape[-1]}; encode the history at the same width and height as the video")
    if noise.ndim != 5 or noise.shape[1] != 16:
        raise ValueError(f"query memory needs a Wan2.1 video latent [B, 16, T, H, W], got {tuple(noise.shape)}")


def check_chunk_poses(poses: torch.Tensor | None, noise: torch.Tensor) -> None:
    """Camera poses of the frames being generated, when given, must cover every one of them."""
    frames = noise.shape[2]  # a [B, 16, T, H, W] latent: check_context_matches ran first
    if poses is not None and poses.shape[0] < frames:
        raise ValueError(f"camera_poses cover the history and {poses.shape[0]} of the {frames} latent frames being "
                         f"generated; give one pose per history frame and per generated frame "
                         f"({frames - poses.shape[0]} more)")


def patched_forward(model, x, t, context, cond_or_uncond=None, run: RunState | None = None):
    """One forward of a (patched) MODEL's Wan2.1 outside a sampler (training, tests): its transformer options and
    wrappers merged the way the sampler merges them. ``x [B, 16, T, H, W]`` in the model's latent space, ``t [B]``
    timesteps, ``context [B, L, 4096]`` text; gradients flow when enabled."""
    opts = comfy.patcher_extension.copy_nested_dicts(model.model_options.get("transformer_options", {}))
    for wrapper_type, keyed in model.wrappers.items():
        for key, wrappers in keyed.items():
            for w in wrappers:
                comfy.patcher_extension.add_wrapper_with_key(wrapper_type, key, w, opts)
    opts["cond_or_uncond"] = cond_or_uncond or [0] * x.shape[0]
    if run is not None:
        opts[RUN_KEY] = run
    return model.model.diffusion_model(x, t, context, transformer_options=opts)


def installed_patch(model) -> DiffusionModelWrapper | None:
    """The memory patch a MODEL already carries (from an earlier Apply node), or None."""
    found = model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY)
    return found[-1] if found else None


def apply_memory(model, memory: ReferenceMemory | TrainableMemory | None = None, query: QueryMemory | None = None):
    """A clone of ``model`` with the memories applied; the input model is never modified.

    A memory the model already carries is kept unless replaced (Apply Reference Memory then Apply Query Memory
    gives both). All checks run before cloning, so a bad input leaves nothing behind.
    """
    dm = wa.wan21_model(model)
    if memory is None and query is None:
        raise ValueError("nothing to apply: connect a MEMORY, a query-memory context, or both")
    prev = installed_patch(model)
    if prev is not None:
        memory = memory if memory is not None else prev.memory
        query = query if query is not None else prev.query
    if memory is not None and memory.width != dm.dim:
        raise ValueError(f"the memory encoder makes {memory.width}-wide tokens but this Wan model is {dm.dim} wide "
                         f"(1.3B: 1536, 14B: 5120); load the encoder trained for this model")
    if query is not None:
        n = len(dm.blocks)
        if not 1 <= query.query_layers <= n:
            raise ValueError(f"query_layers must be between 1 and {n} (this model has {n} blocks), got {query.query_layers}")
        if query.query_pool < 1:
            raise ValueError(f"query_pool must be 1 (one query token per predicted token) or more, got {query.query_pool}")
        if query.camera is not None and query.camera.proj.out_features != dm.dim:
            raise ValueError(f"the camera MLP is {query.camera.proj.out_features} wide but the model is {dm.dim} wide")
    if memory is not None and memory.strength == 0:
        memory = None  # strength 0: exactly the unpatched model

    m = model.clone()
    if prev is not None:
        for kind in (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, comfy.patcher_extension.WrappersMP.OUTER_SAMPLE):
            m.remove_wrappers_with_key(kind, KEY)
        m.remove_additional_models(KEY)
    if memory is None and query is None:
        dit = m.model_options.get("patches_replace", {}).get("dit", {})
        for i in range(len(dm.blocks)):  # ours only fall back to the original block now: drop them
            if isinstance(dit.get(("double_block", i)), BlockPatch):
                del dit[("double_block", i)]
        return m
    for i in range(len(dm.blocks)):
        m.set_model_patch_replace(BlockPatch(i), "dit", "double_block", i)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY, DiffusionModelWrapper(memory, query))
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, OuterSampleWrapper(memory, query))
    memory_estimate.install(m, KEY, dm, memory, query)  # the memories' cost in ComfyUI's memory estimate
    if memory is not None and memory.managed_models():
        m.set_additional_models(KEY, memory.managed_models())
    return m
