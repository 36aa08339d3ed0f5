"""Local blend: B keeps B*'s latent outside the region its concept tokens attend to.

Prompt-to-prompt's LocalBlend (Hertz et al., 2022), which the VCT reference code carries too: the
cross-attention maps of the edited words (here B's concept tokens), summed over the chosen layers
and all steps so far, max-pooled, scaled to the latent's size and normalised by their maximum,
give a mask where they exceed a threshold; after every step from `start_fraction` of the way in,
B's latent is B*'s outside the mask. What B* rebuilds is the source, so the background stays the
source's instead of taking the concept's tint.

The maps travel from the attention patches to the sampler in a `MaskAccumulator` placed in the
model call's transformer options (`BLEND_KEY`): one per sampling run, so nothing outlives it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

# The transformer-options key under which the sampler hands the attention patches its accumulator.
BLEND_KEY = "vct_local_blend"


@dataclass
class BlendConfig:
    """When and where B keeps B*'s latent: the mask threshold, the first step, the maps' layers and tokens."""

    # Mask where the normalised maps exceed this (prompt-to-prompt's 0.3); 0 switches the blend off.
    threshold: float = 0.0
    # The blend starts after this fraction of the steps (prompt-to-prompt's 0.2): early steps set the
    # layout, and the maps need a few steps to settle.
    start_fraction: float = 0.2
    # Maps come from layers whose side is the latent's divided by this (prompt-to-prompt's 16x16
    # maps of a 64x64 latent: 4), but with at least `min_map_positions` positions where the latent
    # has them: coarser maps cannot outline an object (a 16x16 latent's 4x4 maps, pooled, cover it all).
    map_factor: int = 4
    min_map_positions: int = 64
    # Token positions in B's prompt whose maps make the mask (the concept tokens).
    positions: Sequence[int] = ()

    def __post_init__(self) -> None:
        """Check every value is in range, naming the setting to change."""
        for name in ("threshold", "start_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"local blend {name} must be between 0 and 1, got {value!r}")
        for name in ("map_factor", "min_map_positions"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"local blend {name} must be a whole number of at least 1, got {value!r}")

    @property
    def enabled(self) -> bool:
        """Return whether the blend acts (a threshold above 0 and tokens to read)."""
        return self.threshold > 0 and len(self.positions) > 0


class MaskAccumulator:
    """Sums B's cross-attention maps at the blend tokens over layers and steps, per map size; gives the blend mask."""

    def __init__(self, config: BlendConfig, latent_shape: Sequence[int]) -> None:
        """Start empty sums for one sampling run over latents of `latent_shape` ([rows, C, H, W])."""
        self.config = config
        self.latent_size = (int(latent_shape[-2]), int(latent_shape[-1]))
        positions = self.latent_size[0] * self.latent_size[1]
        self.target = max(positions / config.map_factor**2, min(config.min_map_positions, positions))
        self.totals: dict[int, torch.Tensor] = {}

    def wants(self, queries: int) -> bool:
        """Return whether a cross-attention layer with `queries` positions may make the mask: the maps' level or the
        next finer one (used where a model has no layer at the maps' level), never the costly full resolution."""
        return queries <= 4 * self.target and self._grid(queries) is not None

    def _grid(self, queries: int) -> Optional[tuple[int, int]]:
        # A level of a UNet or a patchified transformer: the latent's sides divided by a common factor.
        height, width = self.latent_size
        factor = math.sqrt(height * width / queries)
        grid = (math.ceil(height / factor - 1e-6), math.ceil(width / factor - 1e-6))
        return grid if grid[0] * grid[1] == queries else None

    def record(self, probs: torch.Tensor) -> None:
        """Add one layer's maps of B's conditional rows, `[rows, heads, queries, keys]`, at the blend tokens."""
        positions = torch.as_tensor(list(self.config.positions), device=probs.device, dtype=torch.long)
        if int(positions.max()) >= probs.shape[-1]:
            raise ValueError(f"local blend token position {int(positions.max())} is beyond the prompt's "
                             f"{probs.shape[-1]} tokens")
        queries = probs.shape[-2]
        maps = probs.index_select(-1, positions).sum(-1).mean(1).float()  # [rows, queries]
        total = self.totals.get(queries)
        self.totals[queries] = maps if total is None else total + maps

    @property
    def recorded(self) -> bool:
        """Return whether any maps arrived (a model with no layer near the maps' level gives none)."""
        return bool(self.totals)

    def mask(self) -> Optional[torch.Tensor]:
        """Return the mask `[rows, 1, H, W]` (1 where B keeps its own latent), or None before any map arrived."""
        if not self.totals:
            return None
        # The recorded level nearest the maps' level (by area ratio; the finer one on a tie).
        queries = min(self.totals, key=lambda q: (abs(math.log(q / self.target)), -q))
        total = self.totals[queries]
        maps = total.reshape(total.shape[0], 1, *self._grid(queries))
        pooled = torch.nn.functional.max_pool2d(maps, 3, stride=1, padding=1)
        scaled = torch.nn.functional.interpolate(pooled, size=self.latent_size, mode="nearest")
        peak = scaled.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        return (scaled / peak > self.config.threshold).float()


def blend_step(main: torch.Tensor, ref: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Return B's latent with B*'s outside the mask (B unchanged without a mask)."""
    if mask is None:
        return main
    return torch.where(mask.to(device=main.device) > 0, main, ref)
