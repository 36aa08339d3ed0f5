"""Concept learning: multi-vector textual inversion of the reference image.

Only the `n` concept vectors train; the text encoder and the denoiser are used as frozen
callables. The text encoder is a callable from the vectors to conditioning, so this kernel
never sees a tokenizer and works for one encoder (SD1.x/SD2.x) or several (a dict of vectors).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch

from .conditioning import Cond, cond_batch, cond_detach, cond_leaves, cond_map, cond_repeat
from .ddim import DIFFUSION, FLOW, Denoiser
from .scaling import LossScale
from .validate import check_finite, check_latent, check_steps

LatentSampler = Callable[[torch.Generator], torch.Tensor]
VectorEncoder = Callable[[Cond], Cond]  # concept vectors -> conditioning
ProgressCallback = Callable[[int, int], None]
# The model's training target: noise (SD1.x, SDXL), v (SD2.x 768-v), or the flow velocity
# noise - z0 (rectified-flow models: SD3, Flux).
PREDICTION_TYPES = ("eps", "v", "flow")


@dataclass(frozen=True)
class ConceptConfig:
    """Hyper-parameters of concept learning; defaults are the reference code's."""

    steps: int = 500
    learning_rate: float = 5e-4
    grad_accum: int = 4
    batch_size: int = 1
    scale_lr: bool = True
    l1_weight: float = 1.0
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    prediction: str = "eps"
    seed: int = 0
    # Run the accumulated micro-batches as one batch through the model: the same loss and
    # gradient (the mean over equal-sized micro-batches), one text-encoder pass instead of
    # grad_accum, and better device utilisation; costs grad_accum times the activation memory.
    fuse_accumulation: bool = False
    # Dynamic loss scaling, so a half-precision model keeps the small gradients (no effect in float32).
    loss_scale: float = 2.0**14

    def effective_lr(self) -> float:
        """Return the learning rate used, scaled by accumulation and batch as the reference does."""
        return self.learning_rate * (self.grad_accum * self.batch_size if self.scale_lr else 1)


@dataclass
class ConceptResult:
    """The learned vectors (detached) and the mean loss of every optimisation step."""

    vectors: Cond
    losses: list[float]


def init_concept_vectors(token_embeddings: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """Return `num_vectors` initial vectors: vector i copies the initializer's token i * len // n."""
    check_steps("num_vectors", num_vectors, low=1, high=75)
    if token_embeddings.dim() != 2 or token_embeddings.shape[0] == 0:
        raise ValueError(
            "the initializer must encode to at least one token; give a word such as 'girl' or 'painting'"
        )
    count = token_embeddings.shape[0]
    rows = [i * count // num_vectors for i in range(num_vectors)]
    return token_embeddings[rows].detach().clone()


def reference_latent_sampler(
    latents: torch.Tensor, std: Optional[torch.Tensor] = None, flip_probability: float = 0.5
) -> LatentSampler:
    """Return a sampler of training latents: one of `latents` at random, mirrored with probability
    `flip_probability`, drawn from N(latent, std^2) when `std` is given.

    The reference flips the image before encoding; a latent has no image, so the latent is mirrored
    instead (the VAE is close to flip-equivariant).
    """
    check_latent("latents", latents)

    def sample(generator: torch.Generator) -> torch.Tensor:
        index = int(torch.randint(0, latents.shape[0], (1,), generator=generator))
        latent = latents[index : index + 1]
        flip = bool(torch.rand((), generator=generator) < flip_probability)
        if std is not None:
            spread = std[index : index + 1] if std.shape[0] == latents.shape[0] else std
            latent = latent + spread * torch.randn(latent.shape, generator=generator).to(latent)
        return latent.flip(-1) if flip else latent

    return sample


def concept_loss(
    denoise: Denoiser,
    cond: Cond,
    z0: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    prediction: str = "eps",
    l1_weight: float = 1.0,
) -> torch.Tensor:
    """Return the training loss: MSE on the model's native target (noise, v or flow velocity) plus `l1_weight` *
    L1 of predicted z0.

    `sigma` holds one noise level per row; the noisy state is `x = z0 + sigma * noise`, or
    `(1 - sigma) * z0 + sigma * noise` for a flow model.
    """
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")
    s = sigma.view(-1, *([1] * (z0.dim() - 1))).to(z0)
    x = (FLOW if prediction == "flow" else DIFFUSION).noised(z0, noise, s)
    if cond is not None and cond_batch(cond) == 1 and z0.shape[0] > 1:
        cond = cond_repeat(cond, z0.shape[0])
    denoised = denoise(x, sigma.to(z0), cond, None)
    eps_hat = (x - denoised) / s
    if prediction == "eps":
        loss = torch.mean((eps_hat - noise) ** 2)
    elif prediction == "flow":
        # (x - denoised) / sigma is the predicted velocity on the flow ODE.
        loss = torch.mean((eps_hat - (noise - z0)) ** 2)
    else:
        # v = sqrt(alpha_bar) * (noise - sigma * z0) in latent units.
        alpha_bar = 1.0 / (1.0 + s * s)
        loss = torch.mean(alpha_bar * ((eps_hat - s * denoised) - (noise - s * z0)) ** 2)
    if l1_weight:
        loss = loss + l1_weight * torch.mean(torch.abs(denoised - z0))
    return loss


def _draw(sample_latent: LatentSampler, generator: torch.Generator, train_sigmas: torch.Tensor, rows: int):
    # One micro-batch: latents (with their flips), uniform training timesteps and noise, in a fixed
    # order so fused and sequential accumulation see the same draws.
    z0 = torch.cat([sample_latent(generator) for _ in range(rows)])
    timesteps = torch.randint(0, train_sigmas.numel(), (rows,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator).to(z0)
    return z0, train_sigmas[timesteps].to(device=z0.device), noise


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The vectors stay float32 master copies; the model may run in another precision.
    return t if t.dtype == dtype else t.to(dtype)


def learn_concept(
    denoise: Denoiser,
    encode: VectorEncoder,
    init_vectors: Cond,
    sample_latent: LatentSampler,
    train_sigmas: torch.Tensor,
    config: ConceptConfig = ConceptConfig(),
    progress: Optional[ProgressCallback] = None,
) -> ConceptResult:
    """Return concept vectors learned by textual inversion on the reference latent, with the loss history.

    Each optimisation step accumulates `grad_accum` micro-batches of `batch_size` rows, each with
    a uniformly drawn training timestep and fresh noise (in one model pass when
    `fuse_accumulation`); AdamW updates only the vectors.
    Seeded: the same seed, inputs and device give the same vectors.
    """
    check_steps("steps", config.steps, low=1, high=100_000)
    check_steps("grad_accum", config.grad_accum, low=1, high=1024)
    check_steps("batch_size", config.batch_size, low=1, high=1024)
    if config.prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {config.prediction!r}")
    for leaf in cond_leaves(init_vectors):
        check_finite("init_vectors", leaf)
    generator = torch.Generator().manual_seed(int(config.seed))
    vectors = cond_map(lambda t: t.detach().clone().float().requires_grad_(True), init_vectors)
    params = cond_leaves(vectors)
    optimizer = torch.optim.AdamW(
        params, lr=config.effective_lr(), betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    losses: list[float] = []
    scaler = LossScale(config.loss_scale)
    with torch.enable_grad():
        for step in range(config.steps):
            optimizer.zero_grad(set_to_none=True)
            draws = [_draw(sample_latent, generator, train_sigmas, config.batch_size) for _ in range(config.grad_accum)]
            groups = [tuple(torch.cat(parts) for parts in zip(*draws))] if config.fuse_accumulation else draws
            total = 0.0
            for z0, sigma, noise in groups:
                cond = encode(cond_map(partial(_cast, dtype=z0.dtype), vectors))
                loss = concept_loss(denoise, cond, z0, sigma, noise, config.prediction, config.l1_weight)
                scaler.backward(loss, divide=len(groups), inputs=params)
                total += loss.item()
            mean_loss = total / len(groups)
            if mean_loss != mean_loss or mean_loss in (float("inf"), float("-inf")):
                raise ValueError(
                    f"concept loss became {mean_loss} at step {step + 1}; lower the learning rate or run in float32"
                )
            if scaler.unscale(params):
                optimizer.step()
            losses.append(mean_loss)
            if progress is not None:
                progress(step + 1, config.steps)
    return ConceptResult(vectors=cond_detach(vectors), losses=losses)
