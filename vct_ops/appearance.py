"""Reference appearance attention: B's self-attention reads the reference's keys and values.

As in Cross-Image Attention (Alaluf et al., 2023) and StyleID (Chung et al., CVPR 2024), the
reference image R is DDIM-inverted too and walked along its own inversion trajectory beside B
and B*; in chosen self-attention layers and steps, B's conditional rows attend with queries that
carry the source's structure to R's keys and values, which carry R's appearance. The queries
blend B*'s (the source's) and B's own (StyleID's query preservation), the logits are sharpened
by a temperature (StyleID's T), and `strength` blends the result with what B would get otherwise.
B*'s rows are never changed, so the reconstruction stays exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .schedule import window_sigma

# The row role (and branch) of the reference's rows in the sampler's batch.
ROLE_APPEARANCE = "appearance"


@dataclass
class AppearanceConfig:
    """Where and how strongly B reads the reference's appearance: strength, step window, layers, queries."""

    strength: float = 0.0
    # The window, as fractions of the schedule: from the step `start_fraction` of the way in to
    # the step `end_fraction` of the way in (0 and 1: every step, as StyleID).
    start_fraction: float = 0.0
    end_fraction: float = 1.0
    # Logits multiplied by this (StyleID's T, 1.5): sharper maps, so a query takes few reference tokens.
    temperature: float = 1.5
    # Weight of B*'s queries against B's own (StyleID's gamma, 0.75): 1 reads the reference with
    # the source's structure alone.
    query_preservation: float = 0.75
    # Only layers the architecture marks as the decoder (both papers use the UNet's up blocks).
    decoder_only: bool = True
    # Only layers with at least this fraction of the latent's positions as queries: 1/4 gives the
    # papers' 32x32 and 64x64 levels of a 64x64 latent (SD1.5 at 512 px).
    min_area_fraction: float = 0.25
    # ... and at most this fraction (1: no upper limit; 1/4 keeps to the levels self-injection acts on).
    max_area_fraction: float = 1.0

    def __post_init__(self) -> None:
        """Check every value is in range, naming the setting to change."""
        for name in ("strength", "start_fraction", "end_fraction", "query_preservation", "min_area_fraction",
                     "max_area_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"appearance {name} must be between 0 and 1, got {value!r}")
        if self.start_fraction >= self.end_fraction and self.strength > 0:
            raise ValueError(
                f"the appearance window starts at {self.start_fraction} of the steps but ends at "
                f"{self.end_fraction}; give an end after the start"
            )
        if not (math.isfinite(self.temperature) and 0.0 < self.temperature <= 10.0):
            raise ValueError(f"appearance temperature must be above 0 and at most 10, got {self.temperature!r}")

    @property
    def enabled(self) -> bool:
        """Return whether the reference changes anything (a strength above 0)."""
        return self.strength > 0.0


class AppearanceWindow:
    """The appearance settings bound to one schedule: decides per call whether a layer reads the reference."""

    def __init__(self, sigmas: torch.Tensor, config: AppearanceConfig) -> None:
        """Convert the config's step window to sigma thresholds of the descending schedule `sigmas`."""
        self.config = config
        self.start_threshold = window_sigma(sigmas, config.start_fraction)
        self.end_threshold = window_sigma(sigmas, config.end_fraction)

    def active(self, sigma: float, queries: int, positions: int, decoder: bool) -> bool:
        """Return whether a self-attention layer of `queries` tokens reads the reference at `sigma`."""
        cfg = self.config
        if not cfg.enabled or (cfg.decoder_only and not decoder):
            return False
        if sigma > self.start_threshold or not sigma > self.end_threshold:
            return False
        return cfg.min_area_fraction * positions <= queries <= cfg.max_area_fraction * positions


def appearance_queries(q_main: torch.Tensor, q_source: torch.Tensor, preservation: float) -> torch.Tensor:
    """Return the queries that read the reference: `preservation` of the source's (B*'s) plus the rest of B's."""
    if preservation == 1.0:
        return q_source
    if preservation == 0.0:
        return q_main
    return preservation * q_source + (1.0 - preservation) * q_main


def blend(otherwise: torch.Tensor, appearance: torch.Tensor, strength: float) -> torch.Tensor:
    """Return `strength` of the appearance output plus the rest of what B gets otherwise (1: the former alone)."""
    if strength == 1.0:
        return appearance.to(otherwise.dtype)
    return otherwise + strength * (appearance.to(otherwise.dtype) - otherwise)
