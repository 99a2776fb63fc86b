"""The memory patch honours the host's hooks: attention overrides, attn1/attn2 patches, block patches, RoPE options.

A probe counts the hooks ComfyUI calls in one forward of the tiny Wan, stock and patched, with memory on and off.
"""

from collections import Counter

import pytest
import torch

import host
from forward import model_forward, rel_err


def inputs(batch=1, seed=0, frames=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, frames, 8, 8, generator=g), torch.full((batch,), 600.0),
            torch.randn(batch, 512, 4096, generator=g))


def history(frames, seed=5):
    return {"samples": torch.randn(1, 16, frames, 8, 8, generator=torch.Generator().manual_seed(seed))}


def reference_latents(seed=0, n=2):
    return {"samples": torch.randn(n, 16, 13, 16, 16, generator=torch.Generator().manual_seed(seed))}


class Probe:
    """Counts the hooks it is installed as; every hook passes its input through unchanged. Shared by clones
    (ComfyUI deep-copies model_options) so the counts of any clone land here."""

    def __init__(self):
        self.calls = Counter()
        self.self_keys = []  # (query length, key length) of each attention call the override saw
        self.grids = []  # (transformer_options["grid_sizes"], sequence length) where the host sets grid_sizes

    def __deepcopy__(self, memo):
        return self

    def override(self, func, *args, **kwargs):
        self.calls["optimized_attention_override"] += 1
        assert kwargs.get("transformer_options") is not None
        self.self_keys.append((args[0].shape[1], args[1].shape[1]))
        grid = kwargs["transformer_options"].get("grid_sizes")
        if grid is not None and args[1].shape[1] == 512:  # cross-attention: every token of the sequence queries
            self.grids.append((tuple(grid), args[0].shape[1]))
        return func(*args, **kwargs)

    def attn1(self, args):
        self.calls["attn1_patch"] += 1
        return args["x"]

    def attn2(self, args):
        self.calls["attn2_patch"] += 1
        return args["x"]

    def block(self, args, extra):
        self.calls["double_block"] += 1
        return extra["original_block"](args)

    def install(self, model, attn_patches=True):
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = self.override
        if attn_patches:
            m.set_model_attn1_patch(self.attn1)
            m.set_model_attn2_patch(self.attn2)
        m.set_model_patch_replace(self.block, "dit", "double_block", 1)
        return m


def probe_forward(model, run_seed=None):
    x, t, txt = inputs()
    return model_forward(model, x, t, txt, run_seed=run_seed)


def hooks(model, attn_patches=True, apply=None):
    """The hooks called (with counts) in one forward of ``model`` with the probe installed, then ``apply``."""
    probe = Probe()
    m = probe.install(model, attn_patches)
    if apply is not None:
        m = apply(m)
    probe_forward(m, run_seed=3)
    return probe


@pytest.fixture(scope="module")
def memory(comfy, encoder):
    return comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent=reference_latents())[0]


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.0], ids=["memory_on", "weighted_memory", "memory_off"])
def test_reference_memory_calls_every_hook_stock_wan_calls(comfy, wan_model, encoder, strength):
    mem = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent=reference_latents(),
                    strength=strength)[0]
    stock = hooks(wan_model)
    patched = hooks(wan_model, apply=lambda m: comfy.run("MemLearnerApplyReferenceMemory", model=m, memory=mem)[0])
    assert set(patched.calls) == set(stock.calls)
    assert patched.calls == stock.calls  # one attention call per self- and cross-attention, memory or not
    n_blocks = len(wan_model.model.diffusion_model.blocks)
    assert stock.calls["optimized_attention_override"] == 2 * n_blocks
    if strength:  # the memory's keys reach the override: each self-attention call has more keys than stock's
        more = [p[1] > s[1] for p, s in zip(patched.self_keys, stock.self_keys, strict=True)]
        assert sum(more) == n_blocks and not any(more[1::2])


@pytest.mark.parametrize("context_frames", [1, 3])
def test_query_memory_calls_every_hook_stock_wan_calls(comfy, wan_model, context_frames):
    wa = host.pack("nodes.comfy_adapter")

    def apply(m):
        return comfy.run("MemLearnerApplyQueryMemory", model=m, context=history(context_frames), query_layers=2)[0]

    stock = hooks(wan_model, attn_patches=not wa.HOST_CALLS_ATTN_PATCHES)
    patched = hooks(wan_model, attn_patches=not wa.HOST_CALLS_ATTN_PATCHES, apply=apply)
    assert set(patched.calls) == set(stock.calls)
    n_blocks = len(wan_model.model.diffusion_model.blocks)
    # each self-attention is two calls (Q's keys, P's keys), each through the override
    assert patched.calls["optimized_attention_override"] == stock.calls["optimized_attention_override"] + n_blocks
    assert patched.calls["double_block"] == stock.calls["double_block"] == 1


@pytest.mark.parametrize("pool", [1, 2])
def test_grid_sizes_describe_the_sequence_the_blocks_run_on(comfy, wan_model, pool):
    probe = hooks(wan_model, attn_patches=False, apply=lambda m: comfy.run(
        "MemLearnerApplyQueryMemory", model=m, context=history(2), query_layers=2, query_pool=pool)[0])
    if not probe.grids:
        pytest.skip("this ComfyUI does not set transformer_options['grid_sizes']")
    x = inputs()[0]
    for grid, tokens in probe.grids:
        assert grid[0] * grid[1] * grid[2] == tokens and grid[0] > x.shape[2]  # Q's frames, then the video's


def test_query_memory_with_attention_patches_is_refused_where_wan_calls_them(comfy, wan_model):
    wa = host.pack("nodes.comfy_adapter")
    if not wa.HOST_CALLS_ATTN_PATCHES:
        pytest.skip("this ComfyUI's Wan never calls attn1_patch/attn2_patch")
    probe = Probe()
    m = comfy.run("MemLearnerApplyQueryMemory", model=probe.install(wan_model), context=history(2), query_layers=2)[0]
    with pytest.raises(ValueError, match="cannot run with a node's attn1_patch/attn2_patch"):
        probe_forward(m, run_seed=3)


def test_a_users_attention_override_sees_the_memory_calls_and_keeps_the_result(comfy, wan_model, memory):
    """An override that computes attention its own way (as a SageAttention node would) gets every memory call;
    with exact math the result is the one without it."""
    def own_attention(func, q, k, v, heads, mask=None, **kwargs):
        b, _, c = q.shape
        split = lambda t: t.view(b, -1, heads, c // heads).transpose(1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, -1, c)

    for apply in (lambda m: comfy.run("MemLearnerApplyReferenceMemory", model=m, memory=memory)[0],
                  lambda m: comfy.run("MemLearnerApplyQueryMemory", model=m, context=history(3), query_layers=2,
                                      memory=memory)[0]):
        plain = apply(wan_model)
        m = wan_model.clone()
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = own_attention
        routed = apply(m)
        out, ref = probe_forward(routed, run_seed=3), probe_forward(plain, run_seed=3)
        assert rel_err(out, ref) < 1e-5

        def broken(func, q, k, v, heads, **kwargs):  # wrong only on self-attention calls (text has 512 tokens)
            return func(q, k, v, heads=heads, **kwargs) if k.shape[1] == 512 else torch.zeros_like(q)

        m.model_options["transformer_options"]["optimized_attention_override"] = broken
        assert rel_err(probe_forward(apply(m), run_seed=3), ref) > 1e-3  # the override is really in the path


@pytest.mark.parametrize("kind", ["reference", "query"])
def test_a_model_wrapper_added_after_the_memory_still_runs(comfy, wan_model, memory, kind):
    """ComfyUI calls DIFFUSION_MODEL wrappers in the order they were added: the memory's must hand on to those
    after it, and to the stock forward."""
    patcher_extension = host.pack("nodes.memory_patch").comfy.patcher_extension
    if kind == "reference":
        model = comfy.run("MemLearnerApplyReferenceMemory", model=wan_model, memory=memory)[0]
    else:
        model = comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(3), query_layers=2)[0]
    ref = probe_forward(model, run_seed=3)
    seen = []

    def wrapper(executor, x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return executor(x, *args, **kwargs)

    wrapped = model.clone()
    wrapped.add_wrapper_with_key(patcher_extension.WrappersMP.DIFFUSION_MODEL, "probe", wrapper)
    assert torch.equal(probe_forward(wrapped, run_seed=3), ref)
    assert len(seen) == 1


@pytest.mark.parametrize("skipped", ["first", "last"])
def test_query_memory_runs_with_a_block_skipped_by_another_patch(comfy, wan_model, skipped):
    """Skip-layer guidance replaces blocks with a patch that returns its input: the query tokens must not depend
    on any one block to leave the sequence."""
    n_blocks = len(wan_model.model.diffusion_model.blocks)
    calls = []

    def skip(args, extra):
        calls.append(1)
        return args

    m = comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(3), query_layers=2)[0].clone()
    m.set_model_patch_replace(skip, "dit", "double_block", 0 if skipped == "first" else n_blocks - 1)
    x, t, txt = inputs()
    out = model_forward(m, x, t, txt, run_seed=3)
    assert out.shape == x.shape and torch.isfinite(out).all() and calls == [1]


@pytest.mark.parametrize("pool", [1, 2])
def test_rope_options_move_history_and_query_positions_with_the_video(comfy, wan_model, pool):
    """A shift of every RoPE position changes no relative position: the output stays the same only if the
    history's and the pooled queries' positions are shifted with the video's."""
    model = comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(3), query_layers=2,
                      query_pool=pool)[0]
    ref = probe_forward(model, run_seed=3)
    shifted = model.clone()
    shifted.model_options.setdefault("transformer_options", {})["rope_options"] = {
        "scale_t": 1.0, "scale_y": 1.0, "scale_x": 1.0, "shift_t": 3.0, "shift_y": 2.0, "shift_x": 5.0}
    assert rel_err(probe_forward(shifted, run_seed=3), ref) < 1e-4
    scaled = model.clone()
    scaled.model_options.setdefault("transformer_options", {})["rope_options"] = {"scale_t": 2.0}
    assert rel_err(probe_forward(scaled, run_seed=3), ref) > 1e-3  # the options do reach the model


def test_settings_are_shared_by_clones_and_nothing_is_left_after_sampling(comfy, wan_model, memory, text_cond):
    mp = host.pack("nodes.memory_patch")
    model = comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=history(2), query_layers=2,
                      memory=memory)[0]
    settings = mp.installed_patch(model)
    assert model.clone().get_attachment("memlearner") is settings  # by reference, not a deep copy
    assert mp.installed_patch(wan_model) is None
    before = str(model.model_options)
    comfy.run("KSampler", model=model, seed=1, steps=2, cfg=2.0, sampler_name="euler", scheduler="simple",
              positive=text_cond[0], negative=text_cond[1], latent_image={"samples": torch.zeros(1, 16, 2, 8, 8)},
              denoise=1.0)
    assert str(model.model_options) == before
    assert "optimized_attention_override" not in before and "patches_replace" not in before
