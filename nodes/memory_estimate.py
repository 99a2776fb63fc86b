"""Telling ComfyUI what the memories cost: the patched clone's memory estimate includes their extra memory.

ComfyUI takes every estimate from ``BaseModel.memory_required(input_shape, cond_shapes)``: once before it loads
the model (``sampler_helpers.estimate_memory``: how much of the weights may stay on the GPU) and at every step
(``samplers._calc_cond_batch``: whether cond and uncond fit in one batch). Neither 0.3.75 nor 0.12.1 has a
per-clone hook for it (no ``model_options`` key; ``memory_required`` is a method of the ``BaseModel`` that every
clone shares), and a ModelPatcher object patch is applied only when the clone is loaded, after the first
estimate. So the clone carries an OUTER_SAMPLE wrapper (keyed like the other memory hooks, so it comes and goes
with them) that, for its own sampling run only, puts ``stock + extra`` in front of the model's
``memory_required`` and restores what was there in ``finally``. The extra is ``memlearner_core.memory_estimate``'s.
"""

from __future__ import annotations

import comfy.model_management
import comfy.patcher_extension

from memlearner_core.context_routing import summary_tokens
from memlearner_core.context_tokens import segment_positions
from memlearner_core.memory_estimate import MemoryShape, extra_bytes

ATTR = "memory_required"


class PatchedEstimate:
    """Stands in for ``base.memory_required`` during one sampling run: the estimate it replaced plus the extra.
    After the run it only forwards (in case something kept a reference to it, e.g. an object-patch backup)."""

    def __init__(self, base, previous, estimator: MemoryEstimate):
        self.base, self.previous, self.estimator, self.active = base, previous, estimator, True

    def __call__(self, input_shape, cond_shapes=None, **kwargs):
        stock = self.previous(input_shape, cond_shapes=cond_shapes or {}, **kwargs)
        if not self.active:
            return stock
        return stock + self.estimator.extra(self.base, stock, input_shape)["total"]


class MemoryEstimate:
    """OUTER_SAMPLE wrapper: the clone's memories as a ``MemoryShape``, applied to the host's estimate."""

    def __init__(self, dm, memory, query):
        self.dim, self.heads, self.patch = dm.dim, dm.num_heads, tuple(dm.patch_size)
        self.memory, self.query = memory, query
        self._context_tokens = None

    def __deepcopy__(self, memo):  # immutable settings: clones share them (model_options are deep-copied)
        return self

    def context_tokens(self) -> tuple[int, int]:
        """``(Nc, S)``: the history tokens a query layer reads, and (the learned policy) its summary tokens."""
        if self._context_tokens is None:
            q = self.query
            segs = q.context.segments if q is not None else []
            every = sum(len(segment_positions(s, self.patch)) for s in segs)
            frames = sum(s.latent.shape[1] for s in segs)
            if q is None or not q.route_frames or frames <= q.route_frames:
                self._context_tokens = (every, 0)
            else:
                h, w = segs[0].latent.shape[-2:]
                self._context_tokens = (every * q.route_frames // frames, frames * summary_tokens(h, w, self.patch))
        return self._context_tokens

    def memory_tokens(self) -> tuple[int, bool]:
        """``(U, weighted)``: memory tokens the blocks read as keys, and whether they carry log-weights."""
        m = self.memory
        if m is None:
            return 0, False
        if m.managed_models():  # ReferenceMemory: tokens made once, before sampling, and cached
            tokens = m.tokens()
            return tokens.tokens.shape[1], not tokens.is_plain
        enc = m.encoder  # TrainableMemory: every token, unweighted (2 branches x tokens_per_video per reference)
        return m.latents.shape[1] * 2 * enc.cfg.tokens_per_video, False

    def shape(self) -> MemoryShape:
        q = self.query
        u, weighted = self.memory_tokens()
        nc, summary = self.context_tokens()
        return MemoryShape(self.dim, self.heads, q.query_layers if q else 0, q.query_pool if q else 1,
                           nc, q.cache_context if q else True, u, weighted, self.patch, summary)

    def extra(self, base, stock: float, input_shape) -> dict[str, float]:
        dtype = base.manual_cast_dtype or base.get_dtype()
        return extra_bytes(stock, input_shape, self.shape(), comfy.model_management.dtype_size(dtype))

    def __call__(self, executor, *args, **kwargs):
        base = executor.class_obj.model_patcher.model
        own = ATTR in vars(base)
        saved = vars(base).get(ATTR)
        patched = PatchedEstimate(base, getattr(base, ATTR), self)
        setattr(base, ATTR, patched)
        try:
            return executor(*args, **kwargs)
        finally:
            patched.active = False
            if vars(base).get(ATTR) is patched:  # replaced meanwhile (an object patch): leave that in place
                if own:
                    setattr(base, ATTR, saved)
                else:
                    delattr(base, ATTR)


def install(model, key: str, dm, memory, query) -> None:
    """Add the estimate hook to the patched clone ``model`` under ``key`` (removed with the other hooks)."""
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, MemoryEstimate(dm, memory, query))
