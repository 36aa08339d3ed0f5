"""Noise schedules in ComfyUI's k-diffusion parameterisation.

A latent `z` at training timestep `t` is written `x = z / sqrt(alpha_bar_t)` with noise level
`sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`. In these coordinates deterministic DDIM is the
Euler method on the probability-flow ODE, and the state and noise level match what ComfyUI's
samplers use, so a kernel driven by sigmas works with any ComfyUI model sampling object.
"""
from __future__ import annotations

import torch

from .validate import check_steps


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Return the cumulative alpha products of Stable Diffusion's scaled-linear beta schedule (float64)."""
    check_steps("num_train_timesteps", num_train_timesteps, low=2)
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod_to_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Return the sigma of each alpha_bar: sqrt((1 - a) / a)."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def ddim_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """Return the DDIM timesteps, noisiest first (1000 training steps, 50 steps: 980, 960, ..., 0)."""
    check_steps("steps", steps, low=1, high=num_train_timesteps)
    ratio = num_train_timesteps // steps
    return torch.arange(steps - 1, -1, -1, dtype=torch.long) * ratio


def ddim_sigmas(train_sigmas: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """Return the `steps + 1` descending sigmas of the reference code's DDIM schedule.

    `train_sigmas` holds the sigma of every training timestep (ComfyUI's
    `model_sampling.sigmas`). The step below t = 0 lands on alpha_bar[0], not 1 (the reference
    scheduler's `set_alpha_to_one=False`), so the last value repeats the sigma of t = 0 and the
    last step is an identity step that kernels skip without a model call.
    """
    if train_sigmas.dim() != 1:
        raise ValueError(f"train_sigmas must be 1-D, got shape {tuple(train_sigmas.shape)}")
    timesteps = ddim_timesteps(train_sigmas.numel(), steps)
    sigmas = train_sigmas[timesteps]
    return torch.cat([sigmas, train_sigmas[:1]])


def steps_in_window(sigmas: torch.Tensor, fraction: float) -> int:
    """Return how many of the schedule's first steps a fraction covers (int(fraction * steps), as the reference)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"injection fraction must be between 0 and 1, got {fraction}")
    steps = sigmas.numel() - 1
    return int(fraction * steps + 1e-6)


def window_sigma(sigmas: torch.Tensor, fraction: float) -> float:
    """Return the sigma threshold above which a step lies in the first `fraction` of the schedule.

    The threshold sits halfway between the last sigma inside the window and the first outside,
    so it is robust to the rounding a sigma suffers on its way through a model in half precision.
    """
    count = steps_in_window(sigmas, fraction)
    if count == 0:
        return float("inf")
    if count >= sigmas.numel() - 1:
        return float("-inf")
    inside, outside = float(sigmas[count - 1]), float(sigmas[count])
    return 0.5 * (inside + outside)
