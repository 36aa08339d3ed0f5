"""Input checks shared by the kernels; every error names the argument and says what to do."""
from __future__ import annotations

import torch


def check_steps(name: str, value: int, low: int = 1, high: int | None = None) -> int:
    """Return `value` as an int after checking it is an integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Return `tensor` after checking it holds no NaN or infinity."""
    if not torch.is_tensor(tensor):
        raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if not torch.isfinite(tensor).all():
        raise ValueError(
            f"{name} contains NaN or infinite values; re-encode the image or check the upstream node "
            "(a model run in too low a precision can produce them)"
        )
    return tensor


def check_latent(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Return `tensor` after checking it is a finite [B, C, H, W] latent."""
    if not torch.is_tensor(tensor) or tensor.dim() != 4:
        shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a latent of shape [batch, channels, height, width], got {shape}")
    return check_finite(name, tensor)


def check_sigmas(name: str, sigmas: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """Return `sigmas` after checking it is a finite, positive, monotone 1-D schedule of 2+ values."""
    if not torch.is_tensor(sigmas) or sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor of at least 2 sigmas (1 step)")
    check_finite(name, sigmas)
    if (sigmas <= 0).any():
        raise ValueError(
            f"{name} must be strictly positive (DDIM in sigma space divides by sigma); "
            "build the schedule with vct_ops.ddim_sigmas, which ends at the smallest training sigma"
        )
    steps = sigmas[:-1] - sigmas[1:] if descending else sigmas[1:] - sigmas[:-1]
    if (steps < 0).any():
        order = "non-increasing" if descending else "non-decreasing"
        raise ValueError(f"{name} must be {order}")
    return sigmas
