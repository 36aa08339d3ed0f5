"""Pivotal-tuning (null-text) inversion: one optimised unconditional embedding per step.

Mirrors the reference's loop: for every sampling step (noisiest first) a fresh Adam with a
learning rate that decays with the step index optimises the null embedding, carried over from
the previous step, so that one CFG step from the current latent lands on the inversion
trajectory; then the latent advances one step with the optimised embedding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .conditioning import Cond, cond_detach, cond_leaves, cond_map, match_batch
from .ddim import DIFFUSION, Denoiser, StateSpace, cfg, ddim_step, sigma_batch
from .scaling import LossScale
from .validate import check_finite, check_sigmas, check_steps

ProgressCallback = Callable[[int, int], None]


@dataclass
class NullTextResult:
    """Per-step null embeddings (index i serves sampling step i), each step's last loss and its iterations."""

    embeddings: list[Cond]
    losses: list[float]
    iterations: list[int] = field(default_factory=list)


def _z_space_mse(x_pred: torch.Tensor, x_target: torch.Tensor, sigma: torch.Tensor,
                 space: StateSpace = DIFFUSION) -> torch.Tensor:
    # The reference measures the error on latents z = x / sqrt(1 + sigma^2); its early-stop
    # thresholds are in those units, so the state-space error is rescaled to match (a flow
    # model's state is already a latent).
    return torch.mean((x_pred - x_target) ** 2) * space.latent_square_scale(sigma)


def null_text_invert(
    denoise: Denoiser,
    trajectory: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Cond,
    uncond_init: Cond,
    guidance: float = 7.5,
    inner_steps: int = 50,
    early_stop: float = 1e-5,
    early_stop_slope: float = 2e-5,
    learning_rate: float = 1e-2,
    progress: Optional[ProgressCallback] = None,
    loss_scale: float = 2.0**14,
    space: StateSpace = DIFFUSION,
) -> NullTextResult:
    """Return the per-step null embeddings that make CFG sampling from `trajectory[-1]` retrace `trajectory`.

    `trajectory` is `ddim_invert`'s output for the same `sigmas`. At step i (0-based, noisiest
    first) Adam runs with lr `learning_rate * (1 - i / 100)` for at most `inner_steps`
    iterations and stops once the loss is below `early_stop + i * early_stop_slope`, as the
    reference code does. Only the null embedding receives gradients; the conditional prediction
    is computed once per step without gradient. Gradients go through a dynamic `loss_scale` so a
    half-precision model does not flush them to zero (no effect in float32). `space` is the
    model's state space (the loss is measured in latent units either way).
    """
    check_sigmas("sigmas", sigmas)
    steps = sigmas.numel() - 1
    check_steps("inner_steps", inner_steps, low=1, high=10_000)
    if trajectory.dim() != 5 or trajectory.shape[0] != steps + 1:
        raise ValueError(
            f"trajectory must be [steps + 1, B, C, H, W] = [{steps + 1}, ...] for a {steps}-step schedule, "
            f"got {tuple(trajectory.shape)}; invert with the same number of steps"
        )
    check_finite("trajectory", trajectory)
    rows = trajectory.shape[1]
    cond = cond_detach(match_batch(cond, rows))
    phi = cond_detach(match_batch(uncond_init, rows))
    embeddings: list[Cond] = []
    losses: list[float] = []
    iterations: list[int] = []
    total = steps * inner_steps
    scaler = LossScale(loss_scale)
    x = trajectory[-1].detach().clone()

    with torch.enable_grad():
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            target = trajectory[steps - i - 1].detach()
            if sigma_next == sigma:
                # Identity step: the latent does not move whatever phi is; nothing to optimise.
                embeddings.append(cond_detach(phi))
                losses.append(float(_z_space_mse(x, target, sigma_next, space)))
                iterations.append(0)
                if progress is not None:
                    progress((i + 1) * inner_steps, total)
                continue
            sig = sigma_batch(sigma, rows, x)
            with torch.no_grad():
                den_cond = denoise(x, sig, cond, None)
            phi = cond_map(lambda t: t.detach().clone().requires_grad_(True), phi)
            optimizer = torch.optim.Adam(cond_leaves(phi), lr=learning_rate * (1.0 - i / 100.0))
            threshold = early_stop + i * early_stop_slope
            used = 0
            loss_value = float("nan")
            for j in range(inner_steps):
                den_uncond = denoise(x, sig, phi, None)
                x_prev = ddim_step(x, sigma, sigma_next, cfg(den_uncond, den_cond, guidance))
                loss = _z_space_mse(x_prev, target, sigma_next, space)
                optimizer.zero_grad(set_to_none=True)
                scaler.backward(loss, inputs=cond_leaves(phi))
                if scaler.unscale(cond_leaves(phi)):
                    optimizer.step()
                loss_value = loss.item()
                used = j + 1
                if progress is not None:
                    progress(i * inner_steps + used, total)
                if loss_value < threshold:
                    break
            if not torch.isfinite(torch.tensor(loss_value)):
                raise ValueError(
                    f"null-text loss became {loss_value} at step {i + 1}; the model output is not finite "
                    "(run the model in float32 or lower the learning rate)"
                )
            phi = cond_detach(phi)
            embeddings.append(phi)
            losses.append(loss_value)
            iterations.append(used)
            if progress is not None and used < inner_steps:
                progress((i + 1) * inner_steps, total)
            with torch.no_grad():
                # The conditional prediction at this latent is already known: one model call, not two.
                den_u = denoise(x, sig, phi, None)
                x = ddim_step(x, sigma, sigma_next, cfg(den_u, den_cond, guidance))
    return NullTextResult(embeddings=embeddings, losses=losses, iterations=iterations)


def fixed_null_embeddings(uncond: Cond, steps: int) -> NullTextResult:
    """Return one unchanged null embedding per step, with no optimisation.

    For `negative_prompt` inversion (Miyake et al. 2023) `uncond` is the source conditioning
    itself, so CFG reduces to the conditional prediction that the inversion followed; for
    `direct` inversion it is the sampler's ordinary negative and B* is corrected instead.
    """
    check_steps("steps", steps, low=1)
    fixed = cond_detach(uncond)
    return NullTextResult(embeddings=[fixed] * steps, losses=[], iterations=[0] * steps)
