"""Calling a (patched) ComfyUI MODEL's diffusion model directly, with the options its patches installed."""

from __future__ import annotations

import comfy.patcher_extension
import torch

import host


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-norm relative error ``|out - ref|_inf / |ref|_inf``; NaN never passes."""
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).abs().max() / ref.abs().max()).item()


@torch.no_grad()
def model_forward(model, x, t, txt, cond_or_uncond=None, run_seed=None, run=None):
    """One forward of ``model``'s Wan with its patches (block replaces, wrappers), as the sampler would call it."""
    mp = host.pack("nodes.memory_patch")
    opts = comfy.patcher_extension.copy_nested_dicts(model.model_options.get("transformer_options", {}))
    for wrapper_type, keyed in model.wrappers.items():  # what the sampler merges in before sampling
        for key, wrappers in keyed.items():
            for w in wrappers:
                comfy.patcher_extension.add_wrapper_with_key(wrapper_type, key, w, opts)
    opts["cond_or_uncond"] = cond_or_uncond or [0] * x.shape[0]
    if run is not None or run_seed is not None:
        opts[mp.RUN_KEY] = run if run is not None else mp.RunState(run_seed)
    return model.model.diffusion_model(x, t, txt, transformer_options=opts)
