"""Wan2.1's rectified-flow training target: noise a clean latent to a random sigma and regress the velocity.

Wan2.1 is trained as a flow: ``x_t = (1 - sigma) * x0 + sigma * noise`` moves in a straight line from the
clean latent (sigma 0) to noise (sigma 1), the model predicts its velocity ``noise - x0`` at timestep
``sigma * 1000``. Sigmas are drawn uniformly, then shifted towards noise the way Wan and ComfyUI shift their
sampling schedule (``shift * u / (1 + (shift - 1) * u)``), so training spends its steps where sampling does.

This is the flow diffusers' ``FlowMatchEulerDiscreteScheduler`` samples (``tests/test_diffusers_training.py``
checks the shift, timesteps, noising and an Euler step against it, and that ``u`` is the draw of
``diffusers.training_utils.compute_density_for_timestep_sampling("none", ...)``), written out here rather than
called: the core stays free of diffusers (the ComfyUI host trains without it installed), and diffusers' training
scripts turn ``u`` into an index on the scheduler's 1000-step grid (``scheduler.sigmas[(u * 1000).long()]``), a
rounded sigma, where this draws the shifted sigma itself (other values, so other losses and no exact resume of
runs trained before).
"""

from __future__ import annotations

import torch


class FlowMatchingError(ValueError):
    """Flow-matching inputs that do not fit together; the message says which."""


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * u / (1 + (shift - 1) * u)``: the identity at shift 1, towards 1 (noise) for shift > 1."""
    if not shift > 0:
        raise FlowMatchingError(f"shift must be > 0, got {shift}")
    return shift * u / (1 + (shift - 1) * u)


def sample_sigmas(batch: int, generator: torch.Generator | None = None, shift: float = 5.0,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """``[B]`` float32 sigmas in ``[0, 1)``: uniform ``u`` drawn from ``generator``, then ``shift_sigma``."""
    if batch < 1 or not shift > 0:
        raise FlowMatchingError(f"need batch >= 1 and shift > 0, got batch {batch}, shift {shift}")
    u = torch.rand(batch, generator=generator, device=generator.device if generator is not None else device)
    sigma = shift_sigma(u, shift)
    return sigma if device is None else sigma.to(device)


def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (a float, ``[]`` or ``[B]``) shaped to broadcast over ``x [B, C, T, H, W]``."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.ndim == 0:
        return sigma.to(x.dtype)
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise FlowMatchingError(f"sigma must be a number or [B] with B = {x.shape[0]} (the batch of the "
                                f"latent {tuple(x.shape)}), got {tuple(sigma.shape)}")
    return sigma.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x_t = (1 - sigma) * x0 + sigma * noise`` for ``x0, noise [B, C, T, H, W]`` and ``sigma [B]``."""
    if x0.shape != noise.shape:
        raise FlowMatchingError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model regresses: ``d x_t / d sigma = noise - x0``, ``[B, C, T, H, W]``."""
    if x0.shape != noise.shape:
        raise FlowMatchingError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    return noise - x0


def timesteps(sigma: torch.Tensor) -> torch.Tensor:
    """The model's timestep input for ``sigma [B]``: ``sigma * 1000`` (Wan's ``t`` in ``[0, 1000)``)."""
    return sigma * 1000


def flow_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of ``pred`` and ``target [B, C, T, H, W]``, in float32.

    ``mask`` (bool ``[T]`` or ``[B, T]``) keeps the frames the loss counts, the predicted frames P only; the
    mean is over the kept frames' elements.
    """
    if pred.shape != target.shape:
        raise FlowMatchingError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ "
                                "in shape")
    err = (pred.float() - target.float()).square()
    if mask is None:
        return err.mean()
    if pred.ndim != 5:
        raise FlowMatchingError(f"a frame mask needs latents [B, C, T, H, W], got {tuple(pred.shape)}")
    b, _, t = pred.shape[:3]
    if mask.dtype != torch.bool or tuple(mask.shape) not in ((t,), (b, t)):
        raise FlowMatchingError(f"the frame mask must be bool [T] or [B, T] with B = {b}, T = {t}, "
                                f"got {mask.dtype} {tuple(mask.shape)}")
    m = mask.to(pred.device).expand(b, t)[:, None, :, None, None].expand_as(err)
    if not m.any():
        raise FlowMatchingError("the frame mask selects no frame; the loss must count the predicted frames")
    return err[m].mean()
