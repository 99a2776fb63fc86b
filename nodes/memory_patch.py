"""Patching a ComfyUI Wan MODEL (Wan2.1 T2V or Wan2.2 TI2V-5B) with memory, always on a clone.

The settings sit in the clone's attachments (``memlearner``, shared by reference by later clones); two wrappers
keyed ``memlearner`` use them, and ComfyUI's stock Wan blocks run everything else:
- OUTER_SAMPLE wrapper: checks shapes before sampling starts and puts the per-run state (the sampler's seed for
  the query tokens' noise, the context key/value cache) on a copy of the sampling options, dropped when the run
  ends or is interrupted;
- DIFFUSION_MODEL wrapper: per forward, on a copy of the transformer options, installs an
  ``optimized_attention_override`` (chained to one a node already set) that turns each block's self-attention
  call into the memory-aware one; with query memory it also puts the query tokens Q in front of the video as
  extra latent frames, so every block, the head and ``grid_sizes`` see ``[Q; P]`` and the output is cropped.
  Per-forward ``double_block`` patches (chained to any already there) are used only to name the block on hosts
  that do not (0.3.75), to add camera vectors before block 0, and for gradient checkpointing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import comfy.patcher_extension
import torch
import torch.utils.checkpoint

from memlearner_core import context_routing as routing
from memlearner_core.attention import attention_with_memory
from memlearner_core.camera import CameraEmbedding, frame_embedding_to_tokens
from memlearner_core.context_tokens import (
    ContextSpec,
    cell_positions,
    frame_token_counts,
    pooled_grid,
    pooled_query_positions,
    segment_positions,
    tokens_per_frame,
)
from memlearner_core.memory_encoder import MemoryEncoder, fit_problem
from memlearner_core.memory_tokens import MemoryTokens
from memlearner_core.model_family import WanFamily
from memlearner_core.query_layers import ContextKV, query_memory_attention
from memlearner_core.training.recipes import TrainableMemory
from memlearner_core.view_rope import chunk_aligned

from . import comfy_adapter as wa
from . import memory_estimate

KEY = "memlearner"
RUN_KEY = "memlearner_run"
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
        """Reference videos as LATENT samples ``[C, T, H, W]`` each (already in the encoder's shape and channels)."""
        refs = wa.reference_latent_in(torch.stack(videos).float()).unsqueeze(0)  # [1, N, C, T, H, W]
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


def context_in_model_space(spec: ContextSpec, model=None) -> ContextSpec:
    """History as handed out by samplers and VAE Encode -> the normalized space of the latent ``model`` (a MODEL)
    denoises, by its own latent format (None: Wan2.1's)."""
    to_model = wa.wan21_latent_in if model is None else lambda z: wa.model_latent_in(model, z)
    return ContextSpec([replace(seg, latent=to_model(seg.latent.float())) for seg in spec.segments])


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
    route_frames: int = 0  # > 0: the learned policy, each query layer reads the frames its queries rank highest
    routed: dict = field(default_factory=dict)  # layer -> the frames (single_frames order) it read, last run (cond)


@dataclass(frozen=True)
class MemorySettings:
    """What a patched MODEL carries (its ``memlearner`` attachment): the reference memory and/or query memory."""

    memory: ReferenceMemory | TrainableMemory | None
    query: QueryMemory | None


class RunState:
    """State of one sampling run: the sampler's seed (for the query tokens' noise), the context K/V cache.

    ``gradient_checkpointing`` (training): each block's activations are recomputed in the backward pass instead
    of kept, trading about one extra forward for memory that no longer grows with the number of blocks."""

    def __init__(self, seed: int | None, gradient_checkpointing: bool = False):
        self.seed = int(seed or 0)
        self.gradient_checkpointing = gradient_checkpointing
        self.context_tokens: dict = {}  # (device, dtype, rope options) -> history tokens, RoPE tables, t=0 modulation
        self.context_cache: dict = {}  # (layer, device, dtype, rope options) -> ContextKV

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
    """One forward of the patched model: which memory each block's self-attention reads.

    The sequence is ``[Q; pad; P]``: ``n_query`` query tokens, ``n_pad`` inert tokens that round Q up to whole
    latent frames (pooled queries only), then the video's tokens."""

    dm: object
    memory: MemoryTokens | None
    query: QueryMemory | None
    run: RunState
    timestep: torch.Tensor
    dtype: torch.dtype
    transformer_options: dict
    n_query: int = 0
    n_pad: int = 0
    token_offset: torch.Tensor | None = None  # [B or 1, Nq+pad+Np, dim] camera vectors, added before block 0
    context_tokens: dict = field(default_factory=dict)  # this forward's history tokens when nothing is cached
    _e0: torch.Tensor | None = None
    _seen: tuple = (None, 0)  # (block index, attention calls seen in it)

    def e0(self) -> torch.Tensor:
        """The step's time modulation ``[B, 1, 6, dim]`` at its noise level (per-frame timesteps ``[B, T]``: their
        largest, a clean first frame's 0 aside), for the reference-memory tokens."""
        if self._e0 is None:
            self._e0 = wa.time_modulation(self.dm, noise_level(self.timestep), self.dtype)
        return self._e0

    def self_attention_block(self, transformer_options: dict) -> int | None:
        """The index of the block whose self-attention this attention call is, or None (cross-attention or a call
        outside the blocks). Stock Wan blocks call self-attention first, then cross-attention."""
        index = transformer_options.get("block_index")
        if index is None:
            return None
        last, calls = self._seen
        calls = calls + 1 if index == last else 1
        self._seen = (index, calls)
        return index if calls == 1 else None

    def block_started(self) -> None:
        """A block begins (again, when a checkpointed block is recomputed): its first attention call is self."""
        self._seen = (None, 0)

    def cache_key(self, x: torch.Tensor) -> tuple:
        return str(x.device), x.dtype, repr(self.transformer_options.get("rope_options"))

    def context_kv(self, index: int, x: torch.Tensor, q_query: torch.Tensor | None = None,
                   heads: int = 1) -> ContextKV | None:
        """This query layer's history keys/values; from the run's cache when ``cache_context`` is on. With
        ``route_frames`` (the learned policy) only the frames that the layer's query tokens ``q_query
        [B, Nq, H*D]`` rank highest, decided when the keys are made (once per run with the cache on)."""
        q = self.query
        if index >= q.query_layers or not q.context.segments:
            return None
        if q.route_frames:
            return self.routed_kv(index, x, q_query, heads)
        where = self.cache_key(x)
        if q.cache_context and (index, *where) in self.run.context_cache:
            return self.run.context_cache[(index, *where)]
        tokens, freqs, e0_clean = self.history_tokens(x)
        kv = wa.context_kv(self.dm.blocks[index], tokens, e0_clean, freqs)
        if q.cache_context:
            self.run.context_cache[(index, *where)] = kv
        return kv

    def routed_kv(self, index: int, x: torch.Tensor, q_query: torch.Tensor, heads: int) -> ContextKV:
        """The learned policy in query layer ``index``, per CFG branch (``cond_or_uncond``): each branch's rows of
        ``q_query`` pick their frames, so batching the branches or not reads the same. Kept in the run's cache
        (context cache on) or this forward's (off: a checkpointed block recomputed finds the same frames)."""
        q = self.query
        branches = list(self.transformer_options.get("cond_or_uncond") or [0])
        if q_query.shape[0] % len(branches):
            branches = branches[:1]
        per = q_query.shape[0] // len(branches)
        batch_key = ("routed", index, tuple(branches), per, *self.cache_key(x))
        if q.cache_context and batch_key in self.run.context_cache:  # every later step of a batched run
            return self.run.context_cache[batch_key]
        parts = []
        for branch in branches:
            key = ("routed", index, branch, *self.cache_key(x))
            if q.cache_context and key in self.run.context_cache:
                parts.append(self.run.context_cache[key].expand_batch(per))
                continue
            frames = self.context_tokens.get(key)  # without the cache: decided once per forward, keys made each
            if frames is None:                     # time (a checkpointed block's recomputation saves the same)
                rows = torch.cat([q_query[g * per:(g + 1) * per] for g, b in enumerate(branches) if b == branch])
                frames = self.context_tokens[key] = self.ranked(index, x, rows, heads)
                if branch == 0 or index not in q.routed:  # the report gives the cond branch's frames
                    q.routed[index] = frames
            spec = routing.picked(q.context, frames)
            tokens, freqs, e0_clean = context_tokens(self.dm, replace(q, context=spec), x.device, x.dtype,
                                                     self.transformer_options)
            kv = wa.context_kv(self.dm.blocks[index], tokens, e0_clean, freqs)
            if q.cache_context:
                self.run.context_cache[key] = kv
            parts.append(kv.expand_batch(per))
        kv = parts[0] if len(parts) == 1 else ContextKV(torch.cat([p.k for p in parts]), torch.cat([p.v for p in parts]))
        if q.cache_context:
            self.run.context_cache[batch_key] = kv
        return kv

    def ranked(self, index: int, x: torch.Tensor, q_query: torch.Tensor, heads: int) -> list[int]:
        """The ``route_frames`` history frames (``single_frames`` order) whose summaries ``q_query`` gives most mass
        in query layer ``index`` (``context_routing``); every frame when there are no more."""
        q = self.query
        n = len(routing.single_frames(q.context))
        if n <= q.route_frames:
            return list(range(n))
        tokens, freqs, e0_clean = self.history_tokens(x, "summary")
        with torch.no_grad():
            k = wa.context_kv(self.dm.blocks[index], tokens, e0_clean, freqs).k
        return routing.ranked_frames(q_query, k, n, heads, q.route_frames)

    def history_tokens(self, x: torch.Tensor, kind: str = "full"):
        """The history's tokens, RoPE tables and clean modulation, made once per run (cached) or per forward;
        ``kind`` "summary": every frame pooled to its summary (the learned policy's scoring)."""
        where = (kind, *self.cache_key(x))
        cache = self.run.context_tokens if self.query.cache_context else self.context_tokens
        if where not in cache:
            query = self.query
            if kind == "summary":
                query = replace(query, context=routing.summaries(query.context, tuple(self.dm.patch_size)))
            cache[where] = context_tokens(self.dm, query, x.device, x.dtype, self.transformer_options)
        return cache[where]

    def self_attention(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       attn) -> torch.Tensor:
        """Block ``index``'s self-attention with memory, ``q, k, v [B, L, H*D]`` (RoPE applied) -> ``[B, L, H*D]``;
        every attention call goes through ``attn`` (the host's selection)."""
        mem = None
        if self.memory is not None:
            lw = None if self.memory.is_plain else self.memory.log_weight
            mem = wa.memory_kv(self.dm.blocks[index], self.memory.tokens, self.e0(), lw)
        if self.query is None:
            return attention_with_memory(q, k, v, heads, mem, attn)
        nq, npad = self.n_query, self.n_pad
        ctx = self.context_kv(index, q, q[:, :nq], heads)
        if not npad:
            return query_memory_attention(q, k, v, heads, nq, ctx, mem, attn)
        q, k, v = (torch.cat([t[:, :nq], t[:, nq + npad:]], 1) for t in (q, k, v))  # the pad reads and is read by nothing
        out = query_memory_attention(q, k, v, heads, nq, ctx, mem, attn)
        return torch.cat([out[:, :nq], out.new_zeros(out.shape[0], npad, out.shape[2]), out[:, nq:]], 1)


class AttentionOverride:
    """``transformer_options["optimized_attention_override"]`` of one memory forward. ComfyUI calls it for every
    attention call as ``(func, q, k, v, heads=..., transformer_options=..., ...)``, ``func`` the selected kernel.
    A block's self-attention call becomes the memory-aware one, whose own calls go to ``previous`` (an override a
    node such as a SageAttention patch installed) or to ``func`` with the same keyword arguments; every other call
    passes through unchanged."""

    def __init__(self, state: ForwardState, previous=None):
        self.state, self.previous = state, previous

    def call(self, func, *args, **kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        index = self.state.self_attention_block(kwargs.get("transformer_options") or {})
        if index is None:
            return self.call(func, *args, **kwargs)
        q, k, v, *rest = args
        heads = kwargs.pop("heads") if "heads" in kwargs else rest.pop(0)
        if rest or kwargs.get("mask") is not None:
            raise ValueError("memlearner: Wan's self-attention was called with a mask or extra arguments this "
                             "memory patch does not know; the host is newer than the pack supports")

        def attn(q, k, v, heads, mask=None):
            kw = {**kwargs, "heads": heads}
            if mask is not None:
                kw["mask"] = mask
            return self.call(func, q, k, v, **kw)

        return self.state.self_attention(index, q, k, v, heads, attn)


class BlockSlot:
    """A per-forward ``double_block`` patch (on a copy of the options) for block ``index``: names the block where
    the host does not, adds the camera vectors before block 0, and checkpoints the block when training asks for
    it; then runs the patch that held the slot (``previous``, e.g. skip-layer guidance) or the stock block."""

    def __init__(self, index: int, state: ForwardState, previous=None):
        self.index, self.state, self.previous = index, state, previous

    def __call__(self, args, extra):
        if self.index == 0 and self.state.token_offset is not None:
            args = {**args, "img": args["img"] + self.state.token_offset.to(args["img"])}

        checkpointed = self.state.run.gradient_checkpointing and torch.is_grad_enabled()
        if checkpointed:  # recomputed after the blocks' loop has ended: the host's original_block would be stale
            extra = {**extra, "original_block": wa.stock_block(self.state.dm.blocks[self.index])}

        def run(img):  # what a checkpointed block recomputes in the backward pass, naming the block again
            args["transformer_options"]["block_index"] = self.index
            self.state.block_started()
            a = {**args, "img": img}
            return (self.previous(a, extra) if self.previous is not None else extra["original_block"](a))["img"]

        if checkpointed:
            return {"img": torch.utils.checkpoint.checkpoint(run, args["img"], use_reentrant=False)}
        return {"img": run(args["img"])}


def with_block_slots(opts: dict, st: ForwardState, n_blocks: int) -> dict:
    """``opts`` with ``BlockSlot`` patches where this forward needs them (a new ``patches_replace``, never the
    caller's)."""
    every = not wa.HOST_SETS_BLOCK_INDEX or st.run.gradient_checkpointing
    wanted = range(n_blocks) if every else range(1 if st.token_offset is not None else 0)
    if not wanted:
        return opts
    replace = dict(opts.get("patches_replace", {}))
    dit = dict(replace.get("dit", {}))
    for i in wanted:
        dit[("double_block", i)] = BlockSlot(i, st, dit.get(("double_block", i)))
    replace["dit"] = dit
    return {**opts, "patches_replace": replace}


def context_tokens(dm, q: QueryMemory, device, dtype, transformer_options=None):
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
        ids.append(chunk_aligned(segment_positions(seg, tuple(dm.patch_size)), seg.poses, q.camera, q.chunk_poses,
                                 -(-seg.latent.shape[3] // dm.patch_size[2])))
    tokens = torch.cat(tokens, 1)
    freqs = wa.rope_from_ids(dm, torch.cat(ids, 0), device, dtype, transformer_options)
    e0_clean = wa.time_modulation(dm, torch.zeros(1, device=device), dtype)
    return tokens, freqs, e0_clean


def tokens_as_frames(latent: torch.Tensor, patch: tuple, grid_hw: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """A latent ``[B, C, T, h*ph, w*pw]`` re-laid as whole frames of another token grid ``grid_hw = (H, W)``:
    its patches in token order, zero patches after them up to the next whole frame. The patch embedding of the
    result gives the latent's own tokens first, then the pad. Returns the latent ``[B, C, F, H*ph, W*pw]`` and the
    number of pad tokens."""
    b, c, t, hh, ww = latent.shape
    pt, ph, pw = patch
    h, w = hh // ph, ww // pw
    gh, gw = grid_hw
    n = t * h * w
    f = -(-n // (gh * gw))
    p = latent.reshape(b, c, t, h, ph, w, pw).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, n, c, ph, pw)
    p = torch.cat([p, p.new_zeros(b, f * gh * gw - n, c, ph, pw)], 1)
    out = p.reshape(b, f, gh, gw, c, ph, pw).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, gh * ph, gw * pw)
    return out, f * gh * gw - n


def noise_level(timestep: torch.Tensor) -> torch.Tensor:
    """``[B]``: the step's timestep, or for per-frame timesteps ``[B, T]`` (Wan2.2 with a denoise mask: 0 for a
    given frame) the noisy frames' one, their largest."""
    return timestep.amax(1) if timestep.ndim == 2 else timestep


def diffusion_model_wrapper(executor, x, timestep, context, clip_fea=None, time_dim_concat=None,
                            transformer_options=None, **kwargs):
    """DIFFUSION_MODEL wrapper: one forward of the stock Wan with the memory read through the attention override."""
    topts = transformer_options or {}
    settings: MemorySettings | None = topts.get(KEY)
    if settings is None:
        raise RuntimeError("memlearner: this MODEL's memory settings are missing from the run; it must be sampled "
                           "through ComfyUI's samplers (or memory_patch.patched_forward)")
    dm = executor.class_obj
    run = topts.get(RUN_KEY) or RunState(0)
    memory = settings.memory.tokens() if settings.memory is not None else None
    query = settings.query
    opts = dict(topts)
    st = ForwardState(dm, memory, query, run, timestep, x.dtype, opts)
    if memory is not None:
        st.e0()  # made outside any checkpointed block, so a recomputed block saves what the first pass saved
    opts["optimized_attention_override"] = AttentionOverride(st, topts.get("optimized_attention_override"))
    if query is None:
        opts = st.transformer_options = with_block_slots(opts, st, len(dm.blocks))
        return executor(x, timestep, context, clip_fea, time_dim_concat, opts, **kwargs)
    if time_dim_concat is not None:
        raise ValueError("query memory does not support time_dim_concat inputs")
    appended = sorted(k for k in ("context_latents", "reference_latent") if kwargs.get(k) is not None)
    if appended:  # tokens the host appends after the video (0.3x in-context references), outside [Q; P]'s RoPE
        raise ValueError(f"query memory does not support {' or '.join(appended)} inputs (tokens appended to the "
                         f"video); remove the node that sets them, or use reference memory alone")
    patches = topts.get("patches", {})
    if wa.HOST_CALLS_ATTN_PATCHES and (patches.get("attn1_patch") or patches.get("attn2_patch")):
        raise ValueError("query memory cannot run with a node's attn1_patch/attn2_patch: Wan would call them on "
                         "the query tokens as if they were video; remove that node, or use reference memory alone")

    b, _, t, h, w = x.shape
    xp = wa.pad_latent(dm, x)
    ph, pw = xp.shape[-2] // dm.patch_size[1], xp.shape[-1] // dm.patch_size[2]
    groups = len(topts.get("cond_or_uncond", [])) or 1
    t_query = noise_level(timestep)  # Q shares the noisy frames' timestep, as in training
    step = float(t_query.flatten()[0])
    if getattr(query.camera, "view_rope_fov", None) is not None and query.chunk_poses is not None:
        ids_p = chunk_aligned(cell_positions(torch.arange(t), ph, pw, 1), query.chunk_poses, query.camera,
                              query.chunk_poses, pw)
        freqs_p = wa.rope_from_ids(dm, ids_p, x.device, x.dtype, opts)
    else:
        freqs_p = wa.rope_for_latent(dm, t, h, w, x.device, x.dtype, opts)
    pool = query.query_pool
    if pool == 1:  # one query token per predicted token, at the same positions
        q_latent, freqs_q = run.query_noise(xp.shape, groups, x.device, x.dtype, step), freqs_p
        st.n_query = t * ph * pw
    else:
        qh, qw = pooled_grid(ph, pw, pool)
        shape = (b, xp.shape[1], t, qh * dm.patch_size[1], qw * dm.patch_size[2])
        q_latent, st.n_pad = tokens_as_frames(run.query_noise(shape, groups, x.device, x.dtype, step),
                                              tuple(dm.patch_size), (ph, pw))
        ids_q = chunk_aligned(pooled_query_positions(t, ph, pw, pool), query.chunk_poses, query.camera,
                              query.chunk_poses, pw)
        freqs_q = wa.rope_from_ids(dm, ids_q, x.device, x.dtype, opts)
        freqs_q = torch.cat([freqs_q, freqs_q[:, :1].expand(-1, st.n_pad, *freqs_q.shape[2:])], 1)
        st.n_query = t * qh * qw
    camera = query.camera
    if camera is not None:
        poses = query.chunk_poses if query.chunk_poses is not None else torch.zeros(t, 3, 4)
        emb = camera(poses[:t].to(x.device)).to(x.dtype)  # [t, dim]
        cam_q = frame_embedding_to_tokens(emb, st.n_query // t) if camera.on_query else emb.new_zeros(st.n_query, emb.shape[1])
        cam_p = frame_embedding_to_tokens(emb, tokens_per_frame(h, w, tuple(dm.patch_size)))
        st.token_offset = torch.cat([cam_q, emb.new_zeros(st.n_pad, emb.shape[1]), cam_p], 0).unsqueeze(0)
    if query.context.segments:
        # shared by the query layers: made outside any checkpointed block (the learned policy's frame summaries; the
        # frames a layer routes to are embedded in that layer)
        st.history_tokens(xp, "summary" if query.route_frames else "full")
    opts = with_block_slots(opts, st, len(dm.blocks))
    st.transformer_options = opts
    n_frames = q_latent.shape[2]
    if timestep.ndim == 2:  # per-frame timesteps of P, after Q's (and the pad's) frames
        timestep = torch.cat([t_query[:, None].expand(-1, n_frames), timestep], 1)
    out = wa.forward_with_positions(executor, torch.cat([q_latent, xp], 2), timestep, context,
                                    torch.cat([freqs_q, freqs_p], 1), opts, clip_fea=clip_fea, **kwargs)
    return out[:, :, n_frames:][:, :, :t, :h, :w]


def outer_sample_wrapper(executor, noise, *args, **kwargs):
    """OUTER_SAMPLE wrapper: checks before sampling, and the run's state on a copy of the sampling options."""
    guider = executor.class_obj
    settings: MemorySettings | None = guider.model_patcher.get_attachment(KEY)
    if settings is None:  # a clone whose memory was removed keeps no wrapper; be safe anyway
        return executor(noise, *args, **kwargs)
    if settings.query is not None:
        check_context_matches(settings.query.context, noise, wa.wan_family(guider.model_patcher))
        check_chunk_poses(settings.query.chunk_poses, noise)
    if settings.memory is not None:
        settings.memory.prepare()
    seed = kwargs.get("seed", args[6] if len(args) > 6 else None)
    original = guider.model_options
    topts = {**original.get("transformer_options", {}), KEY: settings, RUN_KEY: RunState(seed)}
    guider.model_options = {**original, "transformer_options": topts}
    try:
        return executor(noise, *args, **kwargs)
    finally:
        guider.model_options = original


def check_context_matches(context: ContextSpec, noise: torch.Tensor, family: WanFamily) -> None:
    size = context.spatial_size()
    if size is not None and tuple(noise.shape[-2:]) != size:
        raise ValueError(
            f"the query-memory context is {size[0]}x{size[1]} latent pixels but the latent being sampled is "
            f"{noise.shape[-2]}x{noise.shape[-1]}; encode the history at the same width and height as the video")
    c = family.latent_channels
    if noise.ndim != 5 or noise.shape[1] != c:
        raise ValueError(f"query memory on {family.label} needs a video latent [B, {c}, T, H, W], got "
                         f"{tuple(noise.shape)}; use an empty latent of this model's VAE")


def check_chunk_poses(poses: torch.Tensor | None, noise: torch.Tensor) -> None:
    """Camera poses of the frames being generated, when given, must cover every one of them."""
    frames = noise.shape[2]  # a [B, C, T, H, W] latent: check_context_matches ran first
    if poses is not None and poses.shape[0] < frames:
        raise ValueError(f"camera_poses cover the history and {poses.shape[0]} of the {frames} latent frames being "
                         f"generated; give one pose per history frame and per generated frame "
                         f"({frames - poses.shape[0]} more)")


def patched_forward(model, x, t, context, cond_or_uncond=None, run: RunState | None = None, **model_kwargs):
    """One forward of a (patched) MODEL's Wan2.1 outside a sampler (training, tests): its transformer options and
    wrappers merged the way the sampler merges them, the memory settings and ``run`` put where the OUTER_SAMPLE
    wrapper puts them. ``x [B, C, T, H, W]`` in the model's latent space, ``t [B]`` timesteps (or ``[B, T]``),
    ``context [B, L, 4096]`` text; gradients flow when enabled. ``model_kwargs`` go to the diffusion model as the
    sampler's extra conds do."""
    opts = comfy.patcher_extension.copy_nested_dicts(model.model_options.get("transformer_options", {}))
    for wrapper_type, keyed in model.wrappers.items():
        for key, wrappers in keyed.items():
            for w in wrappers:
                comfy.patcher_extension.add_wrapper_with_key(wrapper_type, key, w, opts)
    opts["cond_or_uncond"] = cond_or_uncond or [0] * x.shape[0]
    settings = installed_patch(model)
    if settings is not None:
        opts[KEY], opts[RUN_KEY] = settings, run or RunState(0)
    return model.model.diffusion_model(x, t, context, transformer_options=opts, **model_kwargs)


def installed_patch(model) -> MemorySettings | None:
    """The memory settings a MODEL already carries (from an earlier Apply node), or None."""
    return model.get_attachment(KEY)


def apply_memory(model, memory: ReferenceMemory | TrainableMemory | None = None, query: QueryMemory | None = None):
    """A clone of ``model`` with the memories applied; the input model is never modified.

    A memory the model already carries is kept unless replaced (Apply Reference Memory then Apply Query Memory
    gives both). All checks run before cloning, so a bad input leaves nothing behind.
    """
    dm = wa.wan_model(model)
    if memory is None and query is None:
        raise ValueError("nothing to apply: connect a MEMORY, a query-memory context, or both")
    prev = installed_patch(model)
    if prev is not None:
        memory = memory if memory is not None else prev.memory
        query = query if query is not None else prev.query
    misfit = memory is not None and fit_problem(memory.width, memory.latents.shape[2], dm.dim, dm.out_dim)
    if misfit:
        raise ValueError(misfit)
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
        m.remove_attachments(KEY)
    if memory is None and query is None:
        return m
    m.set_attachments(KEY, MemorySettings(memory, query))
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY, diffusion_model_wrapper)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    memory_estimate.install(m, KEY, dm, memory, query)  # the memories' cost in ComfyUI's memory estimate
    if memory is not None and memory.managed_models():
        m.set_additional_models(KEY, memory.managed_models())
    return m
