"""Deterministic DDIM sampling and inversion in ComfyUI's sigma parameterisation.

A denoiser is any callable `denoise(x, sigma, cond, transformer_options) -> denoised` that
returns the model's estimate of the clean latent (ComfyUI's `apply_model` contract), so eps-,
v- and x0-prediction models all work: the noise is recovered as `(x - denoised) / sigma`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from .conditioning import Cond, cond_cat, match_batch
from .validate import check_latent, check_sigmas


class Denoiser(Protocol):
    """The model contract every kernel uses."""

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, transformer_options: Optional[dict] = None
    ) -> torch.Tensor:
        """Return the denoised estimate of `x` at noise level `sigma` under `cond`."""
        ...


StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class StateSpace:
    """How a sampler state relates to the latent at a noise level, as the family's ComfyUI model sampling defines it.

    `diffusion` (ComfyUI's EPS and V_PREDICTION, the SD UNets): the state is `x = z / sqrt(alpha_bar)
    = z0 + sigma * eps`, so one latent is a different state at each sigma. `flow` (ComfyUI's CONST,
    rectified-flow models such as SD3 and Flux): the state is the noisy latent itself,
    `x = (1 - sigma) * z0 + sigma * eps`. In both, ComfyUI's Euler step `x + (sigma' - sigma) *
    (x - denoised) / sigma` is deterministic DDIM (on the flow ODE: its Euler method), so every
    kernel step is the same function; only re-expressing a latent at another sigma and the noising
    of a clean latent differ.
    """

    name: str

    @property
    def flow(self) -> bool:
        """Return whether the state is the noisy latent itself (rectified flow)."""
        return self.name == "flow"

    def to_state(self, z: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Return the sampler state of the latent `z` at `sigma`."""
        return z if self.flow else latent_to_x(z, sigma)

    def to_latent(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Return the latent of the sampler state `x` at `sigma`."""
        return x if self.flow else x_to_latent(x, sigma)

    def noised(self, z0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Return the state of the clean latent `z0` with `noise` at `sigma` (broadcast over rows)."""
        return (1.0 - sigma) * z0 + sigma * noise if self.flow else z0 + sigma * noise

    def latent_square_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """Return the factor that turns a squared error between states at `sigma` into latent units."""
        return torch.ones_like(sigma) if self.flow else 1.0 / (1.0 + sigma * sigma)


def latent_to_x(z: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Return the sampler state `z / sqrt(alpha_bar) = z * sqrt(1 + sigma^2)` of a latent at `sigma`."""
    return z * (1.0 + torch.as_tensor(sigma, dtype=z.dtype, device=z.device) ** 2).sqrt()


def x_to_latent(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Return the latent `x * sqrt(alpha_bar)` of a sampler state at `sigma`."""
    return x / (1.0 + torch.as_tensor(sigma, dtype=x.dtype, device=x.device) ** 2).sqrt()


DIFFUSION = StateSpace("diffusion")
FLOW = StateSpace("flow")


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Return classifier-free guidance `uncond + scale * (cond - uncond)` (same on denoised or on noise)."""
    return uncond + scale * (cond - uncond)


def ddim_step(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Return the state after one deterministic DDIM (Euler) step from `sigma` to `sigma_next`.

    Equal to the alpha-space DDIM update: z' = sqrt(a') * z0_hat + sqrt(1 - a') * eps_hat.
    Works in either direction, so inversion is the same step with `sigma_next > sigma`.
    """
    eps = (x - denoised) / sigma
    return x + eps * (sigma_next - sigma)


def ddim_invert_step(
    denoise: Denoiser,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    cond: Cond,
    uncond: Optional[Cond] = None,
    guidance: float = 1.0,
    space: StateSpace = DIFFUSION,
) -> torch.Tensor:
    """Return the state one inversion step up, from `sigma` to the larger `sigma_next`.

    As in the reference code (and DDIM inversion generally), the noise is predicted at the
    destination noise level from the current latent, `eps(z_current, t_next)`; the current
    latent is re-expressed at `sigma_next` so the model sees exactly that input. On the flow ODE
    the latent is the state, so the velocity is read at the current state and the next sigma.
    """
    x_eval = space.to_state(space.to_latent(x, sigma), sigma_next)
    denoised = guided_denoise(denoise, x_eval, sigma_next, cond, uncond, guidance)
    eps = (x_eval - denoised) / sigma_next
    return x + eps * (sigma_next - sigma)


def sigma_batch(sigma: torch.Tensor, rows: int, like: torch.Tensor) -> torch.Tensor:
    """Return `sigma` as one value per row, on `like`'s device and dtype."""
    return sigma.to(device=like.device, dtype=like.dtype).expand(rows).clone()


def guided_denoise(
    denoise: Denoiser,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: Cond,
    uncond: Optional[Cond] = None,
    guidance: float = 1.0,
    transformer_options: Optional[dict] = None,
) -> torch.Tensor:
    """Return the (optionally CFG-guided) denoised estimate, with both halves in one model call."""
    rows = x.shape[0]
    if uncond is None or guidance == 1.0:
        return denoise(x, sigma_batch(sigma, rows, x), cond, transformer_options)
    both = denoise(
        torch.cat([x, x]), sigma_batch(sigma, 2 * rows, x), cond_cat([uncond, cond]), transformer_options
    )
    den_uncond, den_cond = both.chunk(2)
    return cfg(den_uncond, den_cond, guidance)


def ddim_invert(
    denoise: Denoiser,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Cond,
    uncond: Optional[Cond] = None,
    guidance: float = 1.0,
    callback: Optional[StepCallback] = None,
    space: StateSpace = DIFFUSION,
) -> torch.Tensor:
    """Return the DDIM inversion trajectory `[T + 1, B, C, H, W]` from `x0` (at `sigmas[-1]`) up to `sigmas[0]`.

    `sigmas` is the sampling schedule (descending); inversion walks it backwards. Guidance 1
    (the default, as the reference code) uses the conditional prediction only. `space` is the
    model's state space (FLOW for rectified-flow models: Euler inversion of the flow ODE).
    """
    check_latent("x0", x0)
    check_sigmas("sigmas", sigmas)
    cond = match_batch(cond, x0.shape[0])
    if uncond is not None:
        uncond = match_batch(uncond, x0.shape[0])
    rising = sigmas.flip(0)
    steps = rising.numel() - 1
    trajectory = [x0]
    x = x0
    with torch.no_grad():
        for i in range(steps):
            sigma, sigma_next = rising[i], rising[i + 1]
            if sigma_next != sigma:  # identity steps (the reference's step at t = 0) need no model call
                x = ddim_invert_step(denoise, x, sigma, sigma_next, cond, uncond, guidance, space)
            trajectory.append(x)
            if callback is not None:
                callback(i + 1, steps, x)
    return torch.stack(trajectory)


def ddim_sample(
    denoise: Denoiser,
    x_T: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Cond,
    uncond: Optional[Cond | list[Cond]] = None,
    guidance: float = 1.0,
    callback: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Return the latent state after DDIM sampling from `x_T` along `sigmas` (descending).

    `uncond` may be one conditioning or a list with one per step (null-text embeddings).
    """
    check_latent("x_T", x_T)
    check_sigmas("sigmas", sigmas)
    steps = sigmas.numel() - 1
    if isinstance(uncond, list) and len(uncond) != steps:
        raise ValueError(f"uncond holds {len(uncond)} per-step embeddings but the schedule has {steps} steps")
    cond = match_batch(cond, x_T.shape[0])
    x = x_T
    with torch.no_grad():
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            if sigma_next != sigma:
                step_uncond = uncond[i] if isinstance(uncond, list) else uncond
                if step_uncond is not None:
                    step_uncond = match_batch(step_uncond, x.shape[0])
                denoised = guided_denoise(denoise, x, sigma, cond, step_uncond, guidance)
                x = ddim_step(x, sigma, sigma_next, denoised)
            if callback is not None:
                callback(i + 1, steps, x)
    return x
