"""The pack's custom types: what flows between the VCT nodes."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from comfy_api.latest import io

# Declared once; the README lists them.
Inversion = io.Custom("VCT_INVERSION")
Concept = io.Custom("VCT_CONCEPT")


@dataclasses.dataclass(frozen=True)
class InversionData:
    """A source inversion: its trajectory and schedule, where it came from, and (once tuned) its null embeddings."""

    trajectory: torch.Tensor  # [steps + 1, B, C, H, W] sampler states, clean first
    sigmas: torch.Tensor  # [steps + 1] descending
    source_cond: dict  # what the model takes: {"c_crossattn": [1 or B, tokens, width], "y": ... (SDXL)}
    source_latent: torch.Tensor  # the LATENT samples it was made from (to refuse another image on load)
    model_fingerprint: str
    family: str
    null_embeddings: Optional[dict] = None  # like source_cond, each tensor with a leading step dimension
    null_losses: Optional[list] = None
    null_iterations: Optional[list] = None  # the optimiser iterations each null-text step ran (not saved to files)
    method: str = "ddim"
    cfg: float = 7.5  # the CFG scale the null embeddings were made for
    source_layout: Optional[list] = None  # the source prompt's token ids, when its conditioning recorded them
    # A ControlNet on the source prompt (ComfyUI control object): every later pass of the source runs
    # with it. Not saved to files.
    source_control: Optional[object] = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def steps(self) -> int:
        """Return the number of sampling steps."""
        return self.sigmas.numel() - 1

    def null_list(self) -> list[dict]:
        """Return the null embeddings as one conditioning dict per step."""
        return [{key: value[i] for key, value in self.null_embeddings.items()} for i in range(self.steps)]

    def describe(self) -> str:
        """Return a one-line summary for error messages."""
        return f"{self.family} inversion of a {tuple(self.source_latent.shape)} latent in {self.steps} steps"


@dataclasses.dataclass(frozen=True)
class ConceptData:
    """Learned concept vectors per text encoder (e.g. {'clip_l': [n, 768]}) and the loss history."""

    vectors: dict
    initializer: str
    losses: list

    @property
    def num_vectors(self) -> int:
        """Return how many token vectors stand for the concept."""
        return next(iter(self.vectors.values())).shape[0]


def stack_steps(per_step: list[dict]) -> dict:
    """Return per-step conditioning dicts stacked into one dict of [steps, ...] tensors (CPU, float32)."""
    return {key: torch.stack([c[key].detach().float().cpu() for c in per_step]) for key in per_step[0]}
