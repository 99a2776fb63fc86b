"""Calling a (patched) ComfyUI MODEL's diffusion model directly, with the options its patches installed."""

from __future__ import annotations

import torch

import host


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-norm relative error ``|out - ref|_inf / |ref|_inf``; NaN never passes."""
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).abs().max() / ref.abs().max()).item()


@torch.no_grad()
def model_forward(model, x, t, txt, cond_or_uncond=None, run_seed=None, run=None):
    """One forward of ``model``'s Wan with its patches (block replaces, wrappers), as the sampler would call it:
    loaded by ComfyUI's model management, inputs on its device; the output comes back float32 on the CPU."""
    import comfy.model_management

    mp = host.pack("nodes.memory_patch")
    if run is None and run_seed is not None:
        run = mp.RunState(run_seed)
    if not any(m is model for m in comfy.model_management.loaded_models()):  # as loaded, streamed or not
        comfy.model_management.load_models_gpu([model])
    dev = model.load_device
    return mp.patched_forward(model, x.to(dev), t.to(dev), txt.to(dev), cond_or_uncond, run).float().cpu()
