"""The pack's custom types: what flows between the VCT nodes, and the content methods' table."""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional

import torch
from comfy_api.latest import io

# Declared once; the README lists them.
Inversion = io.Custom("VCT_INVERSION")
Concept = io.Custom("VCT_CONCEPT")


@dataclasses.dataclass(frozen=True)
class MethodTraits:
    """What one content method does: where its null embeddings come from and what the sampler does with them."""

    optimises: bool  # runs the per-step optimisation (slow)
    nulls_from_source: bool  # the null embeddings are the source prompt itself
    corrects_reconstruction: bool  # the sampler puts B* back on the inversion path every step
    tuned_for_cfg: bool  # the null embeddings only rebuild the source at the CFG scale they were made for


class ContentMethod(str, enum.Enum):
    """How VCT Content Null-Text Invert makes the null embeddings (values as the node's `method` input)."""

    NULL_TEXT = "null_text"
    NEGATIVE_PROMPT = "negative_prompt"
    DIRECT = "direct"

    @property
    def traits(self) -> MethodTraits:
        """Return what this method does (the one table below)."""
        return METHOD_TRAITS[self]


METHOD_TRAITS = {
    ContentMethod.NULL_TEXT: MethodTraits(True, False, False, True),
    ContentMethod.NEGATIVE_PROMPT: MethodTraits(False, True, False, False),
    ContentMethod.DIRECT: MethodTraits(False, False, True, False),
}
# Null embeddings set by hand (no content method ran): plain CFG, nothing corrected.
UNTUNED = MethodTraits(False, False, False, False)


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
    method: Optional[ContentMethod] = None  # None until the content inversion has run
    cfg: float = 7.5  # the CFG scale the null embeddings were made for
    source_layout: Optional[list] = None  # the source prompt's token ids, when its conditioning recorded them
    # A ControlNet on the source prompt (ComfyUI control object): every later pass of the source runs
    # with it. Not saved to files.
    source_control: Optional[object] = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def steps(self) -> int:
        """Return the number of sampling steps."""
        return self.sigmas.numel() - 1

    @property
    def traits(self) -> MethodTraits:
        """Return what the content method that made the null embeddings does (UNTUNED when none ran)."""
        return self.method.traits if self.method is not None else UNTUNED

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
