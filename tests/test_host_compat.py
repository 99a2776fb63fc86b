"""What depends on the ComfyUI version: RoPE with gradients (comfy-kitchen's kernel has none from 0.8.0 on), the
minimum host refused at load time, and the memories' cost in ComfyUI's memory estimate. Runs on every test host
(``scripts/test.sh``)."""

from __future__ import annotations

import importlib.util
import logging
import re
import sys

import pytest
import torch

import host
from forward import rel_err

# --- RoPE with gradients -------------------------------------------------------------------------------------

def rope_inputs(b=2, seq=24, heads=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, seq, heads * d, generator=g)
    angles = torch.randn(1, seq, 1, d // 2, generator=g) * 3
    c, s = angles.cos(), angles.sin()
    freqs = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # [1, L, 1, D/2, 2, 2] rotations
    return x, freqs, heads


def test_rope_gradient_path_equals_the_hosts_kernel_and_has_the_rotations_gradient(comfy):
    from comfy.ldm.flux.math import apply_rope1

    wa = host.pack("nodes.comfy_adapter")
    x, freqs, heads = rope_inputs()
    b, s = x.shape[:2]
    with torch.no_grad():
        kernel = apply_rope1(x.view(b, s, heads, -1), freqs).view(b, s, -1)
        assert torch.equal(wa._rope(x, freqs, heads), kernel)  # inference: the host's own kernel
    xg = x.clone().requires_grad_()
    out = wa._rope(xg, freqs, heads)
    assert torch.equal(out, kernel)  # the gradient path gives the kernel's value, bit for bit
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    # RoPE rotates each pair: its gradient is the inverse rotation (the transposed 2x2) of the output gradient.
    inverse = apply_rope1(grad_out.view(b, s, heads, -1), freqs.transpose(-1, -2).contiguous()).view(b, s, -1)
    assert rel_err(xg.grad, inverse) < 1e-6
    # The stock Wan blocks call the host's kernel itself: on 0.8.0+ (comfy-kitchen's op, no backward of its own,
    # called directly or through ComfyUI's wrapper) the adapter registered one; through it the gradient is the same.
    assert wa.rope_backward_error(apply_rope1) is None
    xk = x.clone().requires_grad_()
    apply_rope1(xk.view(b, s, heads, -1), freqs).view(b, s, -1).backward(grad_out)
    assert rel_err(xk.grad, xg.grad) < 1e-6  # the same sums, rounded in another order


def test_a_rope_kernel_without_backward_gets_one_whatever_wraps_it(comfy):
    """Decided by behaviour, not by the kernel's module: a custom op with no autograd formula, reached through a
    plain Python wrapper (as ComfyUI 0.14+ wraps comfy-kitchen's), gets the rotation's backward."""
    wa = host.pack("nodes.comfy_adapter")

    @torch.library.custom_op("memlearner_test::rope_no_grad", mutates_args=())
    def kernel(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        return wa.rope_with_grad(x, freqs)

    @kernel.register_fake
    def _(x, freqs):
        return torch.empty_like(x)

    def host_wrapper(x, freqs):  # another module's function, as the host's apply_rope1 is
        return kernel(x, freqs)

    assert "no autograd formula" in str(wa.rope_backward_error(host_wrapper))
    assert wa.give_rope_a_backward(host_wrapper) is True
    assert wa.rope_backward_error(host_wrapper) is None
    assert wa.give_rope_a_backward(host_wrapper) is False  # nothing left to do
    x, freqs, heads = rope_inputs(seed=3)
    b, s = x.shape[:2]
    xk, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(b, s, heads, x.shape[-1] // heads)
    host_wrapper(xk.view(b, s, heads, -1), freqs).backward(grad_out)
    wa.rope_with_grad(xr.view(b, s, heads, -1), freqs).backward(grad_out)
    assert rel_err(xk.grad, xr.grad) < 1e-6


def test_backward_through_the_patched_model_on_this_host(comfy, wan_model):
    mp = host.pack("nodes.memory_patch")
    ctx = {"samples": torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(5))}
    model = comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=ctx, query_layers=2)[0]
    g = torch.Generator().manual_seed(1)
    x, t, txt = torch.randn(1, 16, 2, 8, 8, generator=g), torch.full((1,), 500.0), torch.randn(1, 512, 4096, generator=g)
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    with torch.no_grad():
        ref = mp.patched_forward(model, x, t, txt, [0], mp.RunState(3))  # RoPE through the host's kernel
    xg = x.clone().requires_grad_()
    out = mp.patched_forward(model, xg, t, txt, [0], mp.RunState(3))  # through the gradient path
    assert rel_err(out.detach(), ref) < 1e-6
    out.square().mean().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_training_sets_the_hosts_own_training_switch_and_restores_it(comfy):
    """``comfy.model_management.in_training`` (0.3x) sends the host's RoPE and fused kernels down their plain-torch
    paths; the pack sets it while it trains. A host without it gets none."""
    import comfy.model_management as mm

    wa = host.pack("nodes.comfy_adapter")
    had = hasattr(mm, "in_training")
    before = getattr(mm, "in_training", None)
    with wa.host_training_mode():
        assert getattr(mm, "in_training", None) is (True if had else None)
    assert getattr(mm, "in_training", None) is before and hasattr(mm, "in_training") == had


def test_the_attention_override_takes_plain_tensors_from_newer_hosts():
    """Newer ComfyUI wraps attention inputs in containers and unwraps them unless the override has a
    ``container_function``, which it then calls instead, without the kernel: the pack's override must have none."""
    mp = host.pack("nodes.memory_patch")
    assert not hasattr(mp.AttentionOverride(None), "container_function")


# --- the minimum host ------------------------------------------------------------------------------------------

def load_pack_init(monkeypatch, version: str | None):
    """Execute the pack's ``__init__.py`` as a fresh package whose ``host_version`` reports ``version``."""
    name = f"memlearner_gate_probe_{abs(hash(version))}"
    hv_spec = importlib.util.spec_from_file_location(f"{name}.host_version", host.ROOT / "host_version.py")
    hv = importlib.util.module_from_spec(hv_spec)
    hv_spec.loader.exec_module(hv)
    monkeypatch.setattr(hv, "host_comfyui_version", lambda root=None: version)
    monkeypatch.setitem(sys.modules, f"{name}.host_version", hv)
    spec = importlib.util.spec_from_file_location(name, host.ROOT / "__init__.py",
                                                  submodule_search_locations=[str(host.ROOT)])
    pkg = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, pkg)
    spec.loader.exec_module(pkg)
    return name, pkg


@pytest.mark.parametrize("version", ["0.3.64", "0.3.74", None], ids=["0.3.64", "0.3.74", "no_version_file"])
def test_an_older_host_is_refused_with_one_line_and_no_nodes(comfy, monkeypatch, caplog, version):
    with caplog.at_level(logging.INFO):
        name, pkg = load_pack_init(monkeypatch, version)
    assert pkg.NODE_CLASS_MAPPINGS == {} and not hasattr(pkg, "comfy_entrypoint")
    assert f"{name}.nodes" not in sys.modules  # nothing version-specific was imported
    lines = [r.getMessage() for r in caplog.records if "memlearner" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "0.3.75 or newer" in lines[0]
    assert (version or "too old to have comfyui_version.py") in lines[0]


def test_supported_hosts_pass_the_gate_and_the_minimum_is_pyprojects(comfy):
    hv = host.pack("host_version")
    assert hv.refusal() is None  # this test host
    import comfyui_version

    assert hv.host_comfyui_version() == comfyui_version.__version__
    for version in ("0.3.75", "0.3.76", "0.4.0", "0.12.1", "1.0.0"):
        assert hv.version_tuple(version) >= hv.version_tuple(hv.MIN_COMFYUI)
    assert hv.version_tuple("0.3.64") < hv.version_tuple(hv.MIN_COMFYUI)
    declared = re.search(r'^requires-comfyui\s*=\s*"([^"]+)"', (host.ROOT / "pyproject.toml").read_text(), re.M)
    assert declared and declared.group(1) == f">={hv.MIN_COMFYUI}"  # [tool.comfy] (tomllib needs Python 3.11)


def test_a_missing_version_file_reads_as_very_old(comfy, tmp_path):
    hv = host.pack("host_version")
    assert hv.host_comfyui_version(tmp_path) is None
    (tmp_path / "comfyui_version.py").write_text('__version__ = "0.3.64"\n')
    assert hv.host_comfyui_version(tmp_path) == "0.3.64"


# --- the memory estimate -----------------------------------------------------------------------------------------

def sample_with_spies(comfy, model, text_cond, monkeypatch, frames=3):
    """One KSampler run with cond and uncond (cfg > 1); records what ComfyUI's planning saw: the estimates handed to
    ``load_models_gpu`` for this model, and per step the model's estimate of the batch next to the class's own."""
    import comfy.model_management as mm
    import comfy.samplers as samplers

    loads, steps = [], []
    load, calc = mm.load_models_gpu, samplers._calc_cond_batch

    def load_spy(models, memory_required=0, *a, minimum_memory_required=None, **kw):
        if any(m is model for m in models):
            loads.append((memory_required, minimum_memory_required))
        return load(models, memory_required, *a, minimum_memory_required=minimum_memory_required, **kw)

    def calc_spy(base, conds, x_in, *a, **kw):
        shape = [2 * x_in.shape[0], *x_in.shape[1:]]
        steps.append((base.memory_required(shape), type(base).memory_required(base, shape), shape))
        return calc(base, conds, x_in, *a, **kw)

    monkeypatch.setattr(mm, "load_models_gpu", load_spy)
    monkeypatch.setattr(samplers, "_calc_cond_batch", calc_spy)
    latent = {"samples": torch.zeros(1, 16, frames, 8, 8)}
    comfy.run("KSampler", model=model, seed=1, steps=2, cfg=2.0, sampler_name="euler", scheduler="simple",
              positive=text_cond[0], negative=text_cond[1], latent_image=latent, denoise=1.0)
    monkeypatch.undo()
    return loads, steps


def expected_extra(stock, shape, dim, layers, context_tokens, dtype_bytes, pool=1):
    """The query memory's extra, written out: Q (as many tokens as P at pool 1) in every block, the history's
    tokens and per-layer keys/values kept, and its keys/values joined to P's for the batch in a query layer."""
    b, t, h, w = shape[0], shape[2], shape[3] // 2, shape[4] // 2
    n_p, n_q = t * h * w, t * -(-h // pool) * -(-w // pool)
    nc, d, s = context_tokens, dim, dtype_bytes
    return stock * n_q / n_p + (2 * layers + 1) * nc * d * s + 2 * b * (nc + n_p) * d * s


def test_the_estimate_of_a_query_memory_model_exceeds_the_stock_one_by_the_computed_amount(
        comfy, wan_model, text_cond, monkeypatch):
    import comfy.model_management as mm

    base = wan_model.model
    dim, s = base.diffusion_model.dim, mm.dtype_size(base.manual_cast_dtype or base.get_dtype())
    ctx = {"samples": torch.randn(1, 16, 2, 8, 8)}  # 2 history frames of 4 x 4 tokens
    model = comfy.run("MemLearnerApplyQueryMemory", model=wan_model, context=ctx, query_layers=2)[0]
    stock_loads, stock_steps = sample_with_spies(comfy, wan_model, text_cond, monkeypatch)
    loads, steps = sample_with_spies(comfy, model, text_cond, monkeypatch)

    noise = [1, 16, 3, 8, 8]
    for (patched_req, patched_min), (stock_req, stock_min) in zip(loads, stock_loads, strict=True):
        for got, stock, batch in ((patched_req, stock_req, 2), (patched_min, stock_min, 1)):
            shape = [batch, *noise[1:]]
            want = expected_extra(type(base).memory_required(base, shape), shape, dim, 2, 32, s)
            assert want > 0 and got - stock == pytest.approx(want, rel=1e-9)
    assert loads and len(steps) == 2
    for got, stock, shape in steps:  # the per-step batch planning sees it too
        assert got - stock == pytest.approx(expected_extra(stock, shape, dim, 2, 32, s), rel=1e-9)
    for got, stock, _ in stock_steps:  # a stock model's estimate is untouched...
        assert got == stock
    assert "memory_required" not in vars(base)  # ...and the patched run left nothing on the shared model


def test_the_estimate_counts_dit_mem_keys_and_their_weights(comfy, wan_model, encoder, text_cond, monkeypatch):
    import comfy.model_management as mm

    base = wan_model.model
    dm = base.diffusion_model
    s = mm.dtype_size(base.manual_cast_dtype or base.get_dtype())
    refs = {"samples": torch.randn(2, 16, 13, 16, 16)}
    for dedup in (False, True):
        memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent=refs,
                           deduplicate=dedup)[0]
        model = comfy.run("MemLearnerApplyReferenceMemory", model=wan_model, memory=memory)[0]
        _, steps = sample_with_spies(comfy, model, text_cond, monkeypatch)
        tokens = memory.tokens()
        u = tokens.tokens.shape[1]
        assert u < 400 if dedup else u == 400  # 2 references x 2 branches x 100 tokens, fewer when collapsed
        for got, stock, shape in steps:
            b, n_p = shape[0], shape[2] * (shape[3] // 2) * (shape[4] // 2)
            # memory keys/values, joined to the sequence's (a copy), and the per-key bias when weighted
            want = 2 * b * u * dm.dim * s + 2 * b * (n_p + u) * dm.dim * s + (b * (n_p + u) * s if dedup else 0)
            assert got - stock == pytest.approx(want, rel=1e-9)
