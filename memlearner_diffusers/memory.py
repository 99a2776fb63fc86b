"""Both memories on diffusers' ``WanTransformer3DModel``, through hooks diffusers and torch offer.

What is installed on the transformer (``apply_memory``; ``remove_memory`` takes it all off again):
- a forward pre-hook on the transformer: per forward, takes the memory tokens (DiT-Mem) and makes the query
  tokens Q (fresh noise, at P's RoPE positions or pooled) and the RoPE tables of ``[Q; P]``;
- a forward pre-hook on every block: hands the block's ``temb`` to its self-attention, puts Q in front of the
  sequence (block 0) and the ``[Q; P]`` tables in place of P's; a forward hook on the last block takes Q out,
  so ``norm_out``/``proj_out`` see P alone;
- an attention processor on every block's ``attn1`` (self-attention): the memory-aware attention of
  ``memlearner_core`` (memory keys/values in every block; MemLearner's pattern in the query layers).

The semantics are those of the ComfyUI adapter (``nodes/memory_patch.py``): the tests check the two hosts agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from memlearner_core import context_routing as routing
from memlearner_core.attention import attention_with_memory
from memlearner_core.camera import CameraEmbedding, frame_embedding_to_tokens
from memlearner_core.checkpoint_io import load_query_weights
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
from memlearner_core.memory_settings import check_memory_settings
from memlearner_core.memory_tokens import MemoryTokens
from memlearner_core.model_family import WanFamily
from memlearner_core.query_layers import ContextKV, query_memory_attention
from memlearner_core.training.recipes import TrainableMemory
from memlearner_core.view_rope import chunk_aligned

from . import wan_host as wh

ATTR = "_memlearner_memory"  # where the installed adapter lives on the transformer


@dataclass
class ReferenceMemory:
    """DiT-Mem memory: reference-video latents ``[1, N, C, T, H, W]`` in the transformer's (normalized) latent
    space and the encoder that turns them into tokens. The tokens are computed once, on the encoder's device,
    and kept (the encoder is frozen); ``strength`` weights the memory keys as if each were repeated that many
    times (0: no memory at all); ``deduplicate`` collapses identical tokens exactly (see ``MemoryTokens``)."""

    latents: torch.Tensor
    encoder: MemoryEncoder
    strength: float = 1.0
    deduplicate: bool = True
    _tokens: MemoryTokens | None = field(default=None, repr=False)

    @classmethod
    def from_latents(cls, videos, encoder: MemoryEncoder, strength: float = 1.0, deduplicate: bool = True):
        """``videos``: a list of ``[C, T, H, W]`` latents or one ``[N, C, T, H, W]`` tensor (``C`` the channels the
        encoder reads: 16 Wan2.1, 48 Wan2.2 TI2V-5B), already in the encoder's shape and in the transformer's
        latent space (``normalize_latents`` of VAE-encoded clips)."""
        refs = torch.stack(list(videos)) if isinstance(videos, (list, tuple)) else videos
        c = encoder.cfg.in_channels
        if refs.ndim != 5 or refs.shape[1] != c:
            raise ValueError(f"reference latents must be [N, {c}, T, H, W] (the channels the memory encoder reads), "
                             f"got {tuple(refs.shape)}; encode the references with this model's VAE")
        return cls(refs.float().unsqueeze(0), encoder, float(strength), bool(deduplicate))

    @property
    def width(self) -> int:
        return self.encoder.cfg.width

    def tokens(self) -> MemoryTokens:
        if self._tokens is None:
            p = next(self.encoder.parameters())
            with torch.no_grad():
                raw = self.encoder(self.latents.to(device=p.device, dtype=p.dtype))
            self._tokens = MemoryTokens.deduplicated(raw) if self.deduplicate else MemoryTokens.full(raw)
        return self._tokens if self.strength == 1.0 else self._tokens.with_strength(self.strength)


@dataclass
class QueryMemory:
    """MemLearner query memory: the first ``query_layers`` blocks are query layers, ``context`` the history (in
    the transformer's latent space, frames at their index relative to the chunk: ``ContextSpec.from_history``).

    ``camera`` (the query-weights file's camera MLP) with ``chunk_poses [T, 3, 4]`` for the frames being
    generated; ``cache_context`` computes the history's keys/values once (they do not depend on the step: the
    history is clean, at t=0) and reuses them while the weights are frozen (never while gradients are
    recorded); ``query_pool`` > 1: one query token per ``pool x pool`` cell of P's token grid; ``seed``: the
    query tokens' noise is a function of it and the step's timestep alone, as in the ComfyUI nodes (there the
    sampler's seed), so both CFG branches read the same Q."""

    query_layers: int
    context: ContextSpec
    camera: CameraEmbedding | None = None
    chunk_poses: torch.Tensor | None = None
    cache_context: bool = True
    query_pool: int = 1
    seed: int = 0
    route_frames: int = 0  # > 0: the learned policy, each query layer reads the frames its queries rank highest
    routed: dict = field(default_factory=dict)  # layer -> the frames (single_frames order) it read, last forward


def query_noise(seed: int, shape, device, dtype, timestep: float) -> torch.Tensor:
    """Gaussian noise for Q ``[B, C, T, H, W]`` drawn on the CPU from ``seed`` and the step's ``timestep``: the
    same numbers the ComfyUI adapter draws for one CFG branch with the same seed and step."""
    key = (int(seed) * 1_000_003 + round(float(timestep) * 1000)) & 0xFFFF_FFFF_FFFF
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(key)).to(device=device, dtype=dtype)


def load_camera(path, query_layers: int | None = None, query_pool: int | None = None,
                transformer=None) -> tuple[CameraEmbedding, int, int]:
    """The camera MLP of a query-weights file, with the ``query_layers`` and ``query_pool`` it was fine-tuned
    with. Given values that differ from the file's are refused: the model would run untrained. So are weights
    fine-tuned on another model family than ``transformer``'s, here when it is given, else when the camera is
    applied (the camera keeps the file's ``model_family``)."""
    weights = load_query_weights(path)
    family = None if transformer is None else wh.wan_family(transformer).name
    wrong = weights.mismatch(query_layers, query_pool, family)
    if wrong is not None:
        key, recorded, given = wrong
        if key == "model_family":
            raise ValueError(family_refusal(path, recorded, given))
        raise ValueError(f"{path} was fine-tuned with {key} = {recorded}, not {given}")
    camera = weights.camera_embedding().requires_grad_(False)
    camera.model_family = weights.model_family
    return camera, weights.query_layers, query_pool or weights.query_pool or 1


def family_refusal(what, recorded: str, family: str) -> str:
    return (f"{what} was fine-tuned on {recorded}, but the transformer is {family}; load the query weights "
            f"fine-tuned for this model")


def noise_level(timestep: torch.Tensor) -> torch.Tensor:
    """``[B]``: the step's timestep, or for per-token timesteps ``[B, L]`` (Wan2.2 TI2V-5B's pipeline; 0 on a given
    first frame) the noisy tokens' one, their largest (as the ComfyUI adapter takes per-frame timesteps)."""
    return timestep.amax(1) if timestep.ndim == 2 else timestep.flatten()


@dataclass
class _Forward:
    """What one forward of the patched transformer shares between its hooks and processors."""

    memory: MemoryTokens | None
    n_query: int = 0
    q_tokens: torch.Tensor | None = None  # [B, Nq, C], put in front of the sequence in block 0
    p_camera: torch.Tensor | None = None  # [Np, C] camera vectors of P's tokens
    rope: wh.Rope | None = None  # tables of [Q; P]
    noisy_temb: torch.Tensor | None = None  # per-token timesteps: [B, 6, C] at the noisy tokens' level
    temb: dict = field(default_factory=dict)  # block index -> the step's timestep_proj [B, 6, C]
    history: dict = field(default_factory=dict)  # this forward's history tokens when nothing is cached
    branch: int = 0  # forwards before this one at the same timestep: WanPipeline runs cond (0), then uncond (1)


class MemoryAdapter:
    """The memories installed on one transformer: its hooks, processors and the history cache."""

    def __init__(self, transformer, memory: ReferenceMemory | TrainableMemory | None, query: QueryMemory | None):
        self.transformer, self.memory, self.query = transformer, memory, query
        self.family = wh.wan_family(transformer)
        self.forward: _Forward | None = None
        self.history_cache: dict = {}  # (device, dtype) -> history tokens, RoPE tables, t=0 modulation
        self.context_cache: dict = {}  # (layer, device, dtype) -> ContextKV
        self._handles: list = []
        self._processors: list = []
        self._last_step: tuple = (None, 0)  # (timestep, forwards at it): the CFG branch, for the learned policy

    # --- installing ---------------------------------------------------------------------------------------
    def install(self) -> None:
        tr = self.transformer
        self._handles.append(tr.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        for i, block in enumerate(tr.blocks):
            self._processors.append(block.attn1.processor)
            block.attn1.set_processor(MemoryAttnProcessor(self, i, block, block.attn1.processor))
            self._handles.append(block.register_forward_pre_hook(self._block_hook(i), with_kwargs=True))
        if self.query is not None:
            self._handles.append(tr.blocks[-1].register_forward_hook(self._after_last_block))
        setattr(tr, ATTR, self)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for block, proc in zip(self.transformer.blocks, self._processors, strict=False):
            block.attn1.set_processor(proc)
        self._handles, self._processors, self.forward = [], [], None
        if getattr(self.transformer, ATTR, None) is self:
            delattr(self.transformer, ATTR)

    # --- hooks ----------------------------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        st = _Forward(self.memory.tokens() if self.memory is not None else None)
        step = round(float(noise_level(timestep).flatten()[0]), 6)
        last, count = self._last_step
        st.branch = count + 1 if last == step else 0
        self._last_step = (step, st.branch)
        self.forward = st
        if timestep.ndim == 2:  # per-token timesteps: the memories and Q run at the noisy tokens' level
            text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
            st.noisy_temb = wh.time_modulation(self.transformer, noise_level(timestep), text.dtype)
        if self.query is not None:
            self._make_queries(st, x, timestep)
        return None

    def _make_queries(self, st: _Forward, x: torch.Tensor, timestep: torch.Tensor) -> None:
        """Q ``[B, Nq, C]`` from noise of the step, its RoPE tables, and the camera vectors of Q and P."""
        tr, q = self.transformer, self.query
        check_context_matches(q.context, x, self.family)
        check_chunk_poses(q.chunk_poses, x)
        b, _, t, h, w = x.shape
        patch = wh.patch_size(tr)
        step = float(noise_level(timestep)[0])
        if getattr(q.camera, "view_rope_fov", None) is not None and q.chunk_poses is not None:
            ph, pw = h // patch[1], w // patch[2]
            ids_p = chunk_aligned(cell_positions(torch.arange(t), ph, pw, 1), q.chunk_poses, q.camera, q.chunk_poses,
                                  pw)
            rope_p = wh.rope_from_ids(tr, ids_p, x.device)
        else:
            rope_p = wh.rope_for_latent(tr, x)
        if q.query_pool == 1:  # one query token per predicted token, at the same positions
            noise, rope_q = query_noise(q.seed, x.shape, x.device, x.dtype, step), rope_p
        else:
            ph, pw = h // patch[1], w // patch[2]
            qh, qw = pooled_grid(ph, pw, q.query_pool)
            noise = query_noise(q.seed, (b, x.shape[1], t, qh * patch[1], qw * patch[2]), x.device, x.dtype, step)
            ids_q = chunk_aligned(pooled_query_positions(t, ph, pw, q.query_pool), q.chunk_poses, q.camera,
                                  q.chunk_poses, pw)
            rope_q = wh.rope_from_ids(tr, ids_q, x.device)
        st.rope = wh.cat_rope(rope_q, rope_p)
        if q.context.segments:  # made here, outside any checkpointed block, so a recomputation finds them made
            self.history_tokens(x, q.cache_context and not torch.is_grad_enabled(),
                                "summary" if q.route_frames else "full")
        st.q_tokens = wh.embed_latent(tr, noise, x.dtype)
        st.n_query = st.q_tokens.shape[1]
        if q.camera is not None:
            poses = q.chunk_poses if q.chunk_poses is not None else torch.zeros(t, 3, 4)
            emb = q.camera(poses[:t].to(x.device)).to(x.dtype)  # [t, C]
            st.p_camera = frame_embedding_to_tokens(emb, tokens_per_frame(h, w, patch))
            if q.camera.on_query:
                st.q_tokens = st.q_tokens + frame_embedding_to_tokens(emb, st.n_query // t)

    def _block_hook(self, index: int):
        names = ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb")

        def hook(module, args, kwargs):
            st = self.forward
            if st is None:
                return None
            bound = {**dict(zip(names, args, strict=False)), **kwargs}
            temb = bound["temb"]
            st.temb[index] = temb if st.noisy_temb is None else st.noisy_temb.to(temb)
            if self.query is not None:
                x = bound["hidden_states"]
                if index == 0:
                    x = torch.cat([st.q_tokens.to(x), x], 1)
                    if st.p_camera is not None:
                        x = torch.cat([x[:, : st.n_query], x[:, st.n_query:] + st.p_camera.to(x)], 1)
                    bound["hidden_states"] = x
                bound["rotary_emb"] = st.rope
                if temb.ndim == 4:  # per-token modulation [B, L, 6, C]: Q's tokens at the noisy level, P keeps its own
                    q_temb = st.noisy_temb.to(temb)[:, None].expand(-1, st.n_query, -1, -1)
                    bound["temb"] = torch.cat([q_temb, temb], 1)
            return (), bound

        return hook

    def _after_last_block(self, module, args, output):
        st = self.forward
        return output if st is None else output[:, st.n_query:]

    # --- history (query memory) -----------------------------------------------------------------------------
    def context_kv(self, index: int, block, x: torch.Tensor, q_query: torch.Tensor | None = None,
                   heads: int = 1) -> ContextKV | None:
        """Query layer ``index``'s history keys/values: from the cache when allowed, else computed now. With
        ``route_frames`` (the learned policy) only the frames the layer's query tokens ``q_query [B, Nq, H*D]``
        rank highest (``context_routing``), as on the ComfyUI host."""
        q = self.query
        if index >= q.query_layers or not q.context.segments:
            return None
        use_cache = q.cache_context and not torch.is_grad_enabled()
        if q.route_frames:  # per CFG branch, as the nodes route; without the cache, kept for this forward
            return self.routed_kv(index, block, x, q_query, heads, use_cache)
        key = (index, str(x.device), x.dtype)
        if use_cache and key in self.context_cache:
            return self.context_cache[key]
        tokens, rope, temb_clean = self.history_tokens(x, use_cache)
        kv = wh.context_kv(block, tokens.to(x.dtype), temb_clean, rope)
        if use_cache:
            self.context_cache[key] = kv
        return kv

    def routed_kv(self, index: int, block, x: torch.Tensor, q_query: torch.Tensor, heads: int,
                  use_cache: bool) -> ContextKV:
        """Query layer ``index``'s keys/values of the frames its queries rank highest, for this forward's CFG branch:
        kept while cached; without the cache decided once per forward and made each time (a checkpointed block's
        recomputation saves the same tensors)."""
        branch = self.forward.branch
        key = ("routed", index, branch, str(x.device), x.dtype)
        if use_cache and key in self.context_cache:
            return self.context_cache[key]
        frames = self.forward.history.get(key)
        if frames is None:
            frames = self.forward.history[key] = self.ranked(index, block, x, q_query, heads, use_cache, branch)
        q = self.query
        tokens, rope, temb_clean = history_tokens(self.transformer, replace(q, context=routing.picked(q.context, frames)),
                                                  x.device, x.dtype)
        kv = wh.context_kv(block, tokens.to(x.dtype), temb_clean, rope)
        if use_cache:
            self.context_cache[key] = kv
        return kv

    def ranked(self, index: int, block, x: torch.Tensor, q_query: torch.Tensor, heads: int, use_cache: bool,
               branch: int = 0) -> list[int]:
        """The ``route_frames`` history frames (``single_frames`` order) query layer ``index`` ranks highest."""
        q = self.query
        n = len(routing.single_frames(q.context))
        frames = list(range(n))
        if n > q.route_frames:
            tokens, rope, temb_clean = self.history_tokens(x, use_cache, "summary")
            with torch.no_grad():
                k = wh.context_kv(block, tokens.to(x.dtype), temb_clean, rope).k
            frames = routing.ranked_frames(q_query, k, n, heads, q.route_frames)
        if branch == 0 or index not in q.routed:  # the report gives the cond branch's frames
            q.routed[index] = frames
        return frames

    def history_tokens(self, x: torch.Tensor, use_cache: bool, kind: str = "full"):
        """History tokens, RoPE tables and t=0 modulation: kept per device and dtype while cached, else made once
        per forward (per device: under autocast the blocks may see another dtype than the input latent);
        ``kind`` "summary": every frame pooled to its summary (the learned policy's scoring)."""
        where = (kind, str(x.device), x.dtype) if use_cache else (kind, str(x.device))
        cache = self.history_cache if use_cache else self.forward.history
        if where not in cache:
            q = self.query
            if kind == "summary":
                q = replace(q, context=routing.summaries(q.context, wh.patch_size(self.transformer)))
            cache[where] = history_tokens(self.transformer, q, x.device, x.dtype)
        return cache[where]


def history_tokens(transformer, q: QueryMemory, device, dtype):
    """History tokens ``[1, Nc, C]`` (+ camera), their RoPE tables and the clean (t=0) modulation ``[1, 6, C]``."""
    patch = wh.patch_size(transformer)
    tokens, ids = [], []
    for seg in q.context.segments:
        tok = wh.embed_latent(transformer, seg.pooled_latent().unsqueeze(0), dtype).to(device)
        if q.camera is not None:
            poses = seg.poses if seg.poses is not None else torch.zeros(seg.latent.shape[1], 3, 4)
            emb = q.camera(poses.to(device)).to(dtype)
            tok = tok + frame_embedding_to_tokens(emb, frame_token_counts(seg, patch)).unsqueeze(0)
        tokens.append(tok)
        ids.append(chunk_aligned(segment_positions(seg, patch), seg.poses, q.camera, q.chunk_poses,
                                 -(-seg.latent.shape[3] // patch[2])))
    rope = wh.rope_from_ids(transformer, torch.cat(ids, 0), device)
    temb_clean = wh.time_modulation(transformer, torch.zeros(1, device=device), dtype)
    return torch.cat(tokens, 1), rope, temb_clean


class MemoryAttnProcessor:
    """Self-attention processor of block ``index``: q/k/v as diffusers' Wan processor makes them, then the core's
    memory-aware attention. Cross-attention calls (and calls outside a patched forward) go to ``original``."""

    def __init__(self, adapter: MemoryAdapter, index: int, block, original):
        self.adapter, self.index, self.block, self.original = adapter, index, block, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        ad, st = self.adapter, self.adapter.forward
        if st is None or encoder_hidden_states is not None or self.index not in st.temb:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kw)
        q, k, v = wh.qkv(attn, hidden_states, rotary_emb)
        temb = st.temb[self.index]
        mem = None
        if st.memory is not None:
            lw = None if st.memory.is_plain else st.memory.log_weight
            mem = wh.memory_kv(self.block, st.memory.tokens, temb, lw, hidden_states.dtype)
        fn = wh.host_attention(getattr(self.original, "_attention_backend", None))
        if ad.query is not None:
            ctx = ad.context_kv(self.index, self.block, hidden_states, q[:, :st.n_query], attn.heads)
            out = query_memory_attention(q, k, v, attn.heads, st.n_query, ctx, mem, fn)
        else:
            out = attention_with_memory(q, k, v, attn.heads, mem, fn)
        return attn.to_out[1](attn.to_out[0](out.type_as(q)))


def check_context_matches(context: ContextSpec, x: torch.Tensor, family: WanFamily) -> None:
    c = family.latent_channels
    if x.ndim != 5 or x.shape[1] != c:
        raise ValueError(f"query memory on {family.label} needs a video latent [B, {c}, T, H, W], got "
                         f"{tuple(x.shape)}")
    wrong = [tuple(s.latent.shape) for s in context.segments if s.latent.shape[0] != c]
    if wrong:
        raise ValueError(f"the query-memory history must be {family.label} latents [{c}, T, H, W], got "
                         f"{wrong[0]}; encode the history with this model's VAE")
    size = context.spatial_size()
    if size is not None and tuple(x.shape[-2:]) != size:
        raise ValueError(f"the query-memory context is {size[0]}x{size[1]} latent pixels but the latent being "
                         f"denoised is {x.shape[-2]}x{x.shape[-1]}; encode the history at the video's size")


def check_chunk_poses(poses: torch.Tensor | None, x: torch.Tensor) -> None:
    if poses is not None and poses.shape[0] < x.shape[2]:
        raise ValueError(f"chunk_poses cover {poses.shape[0]} of the {x.shape[2]} latent frames being generated; "
                         f"give one pose per generated frame")


def check_family(family: WanFamily, dim: int, memory, query: QueryMemory | None) -> None:
    """The memory encoder reads this family's latents, and query weights were fine-tuned on this family."""
    encoder = getattr(memory, "encoder", None)
    if encoder is not None:
        wrong = fit_problem(encoder.cfg.width, encoder.cfg.in_channels, dim, family.latent_channels)
        if wrong is not None:
            raise ValueError(wrong)
    recorded = getattr(query.camera, "model_family", None) if query is not None else None
    if recorded is not None and recorded != family.name:
        raise ValueError(family_refusal("the query weights (camera)", recorded, family.name))


def installed(transformer) -> MemoryAdapter | None:
    """The memory adapter a transformer carries, or None."""
    return getattr(transformer, ATTR, None)


def apply_memory(transformer, memory: ReferenceMemory | TrainableMemory | None = None, query: QueryMemory | None = None) -> MemoryAdapter | None:
    """Give ``transformer`` (a ``WanTransformer3DModel``, e.g. ``pipe.transformer``) the memories, in place;
    returns the adapter (``.remove()`` or ``remove_memory`` restores the plain transformer).

    A memory the transformer already carries is kept unless replaced (DiT-Mem applied first, then query memory,
    gives both), as with the ComfyUI nodes. Strength 0 drops the reference memory: exactly the plain model. All
    checks run before anything changes."""
    family = wh.wan_family(transformer)
    if memory is None and query is None:
        raise ValueError("nothing to apply: give a ReferenceMemory, a QueryMemory, or both")
    prev = installed(transformer)
    if prev is not None:
        memory = memory if memory is not None else prev.memory
        query = query if query is not None else prev.query
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    check_family(family, dim, memory, query)
    check_memory_settings(dim, len(transformer.blocks), memory, query)
    if memory is not None and memory.strength == 0:
        memory = None
    if prev is not None:
        prev.remove()
    if memory is None and query is None:
        return None
    adapter = MemoryAdapter(transformer, memory, query)
    adapter.install()
    return adapter


def remove_memory(transformer) -> None:
    """Take every memory off ``transformer``; a transformer without memory is left as it is."""
    adapter = installed(transformer)
    if adapter is not None:
        adapter.remove()
