"""The architecture seam: everything VCT needs that depends on the network's architecture.

The nodes never look inside a network. They ask the model's `Architecture` (see `arch/__init__.py`)
for what differs between architectures:
- which attention calls exist and how VCT's dual-branch control is put on them (self-attention
  injection and cross-attention refine for a UNet's SpatialTransformers; a joint-attention
  transformer would map them onto its image-to-image and image-to-text blocks);
- which blocks may recompute their activations in backward (low-memory training);
- which text encoders the family has, how a concept's vectors become conditioning with gradients,
  and which conditioning keys its model takes.
Adding a family means adding one implementation of this class and listing it in `arch/__init__.py`.
"""
from __future__ import annotations

import abc
from typing import Callable, Optional

import comfy.ldm.modules.attention as comfy_attention
import torch

from ...vct_ops import AppearanceConfig, InjectionConfig


def fused_attention(*args, **kwargs):
    """Return PyTorch's fused attention of ComfyUI's attention arguments (it backpropagates on every device)."""
    # Sub-quadratic attention (ComfyUI's CPU default) was seen to give zero gradients to the text
    # conditioning.
    return comfy_attention.attention_pytorch(*args, **kwargs)


class Architecture(abc.ABC):
    """One network architecture, for the model families (ComfyUI model-config classes) it serves."""

    #: Family name -> ComfyUI model-config class, matched exactly (subclasses condition differently).
    families: dict[str, type] = {}
    #: What the model's `extra_conds` may return for a VCT prompt (anything else is refused).
    condition_keys: tuple[str, ...] = ()
    #: Whether a plain `embedding:NAME` prompt has the paper's layout [start, vectors, end] (one CLIP segment).
    paper_layout: bool = True
    #: Whether a ControlNet on a VCT prompt is applied to its branch (else it is refused by name).
    controlnet: bool = True

    @abc.abstractmethod
    def context_width(self, model) -> Optional[int]:
        """Return the text-conditioning width the model takes, when its config says."""

    def conditioning_width(self, encoders: list) -> int:
        """Return the width of the text conditioning the encoders give together (side by side by default)."""
        return sum(e.width for e in encoders)

    def check_text_encoders(self, model, encoders: list, node: str) -> None:
        """Raise ValueError when the encoders cannot condition `model` (their conditioning has another width)."""
        width, encoded = self.context_width(model), self.conditioning_width(encoders)
        if width is not None and encoded != width:
            raise ValueError(
                f"{node}: the CLIP encodes {encoded}-wide conditioning but the model takes {width}; connect the CLIP "
                "of the same checkpoint as the model"
            )

    def guidance_distilled(self, model) -> bool:
        """Return whether the model takes guidance as an input and runs no unconditional branch (Flux)."""
        return False

    def check_prompt_length(self, conditioning, name: str) -> None:
        """Raise ValueError when a source prompt is longer than VCT can align (nothing to check by default)."""
        return None

    @abc.abstractmethod
    def inject(self, model, config: InjectionConfig, sigmas: torch.Tensor,
               appearance: Optional[AppearanceConfig] = None, blocks: str = "auto"):
        """Return a clone of `model` with VCT's dual-branch control on its attention, wrapping patches already there.

        With `appearance`, the self-attention of the blocks the architecture calls its decoder may
        also read the reference rows' keys and values (reference appearance attention). `blocks`
        names which blocks take part, where the architecture offers a choice ("auto": the architecture's default).
        """

    @staticmethod
    @abc.abstractmethod
    def gradient_attention(func, *args, **kwargs):
        """Attention that backpropagates, as ComfyUI's `optimized_attention_override` (called with the default)."""

    @abc.abstractmethod
    def recompute_types(self) -> tuple[type, ...]:
        """Return the block classes whose activations may be recomputed in backward instead of kept."""

    def inplace_residual_types(self) -> tuple[type, ...]:
        """Return the block classes that add residuals in place, which training runs out of place (none by default)."""
        return ()

    @abc.abstractmethod
    def text_encoders(self, clip, node: str) -> list:
        """Return the family's text encoders of `clip` (objects with `key`, `module`, `embedding_key`, `width`)."""

    @abc.abstractmethod
    def initializer_vectors(self, encoder, word: str, count: int) -> torch.Tensor:
        """Return `count` starting vectors for a concept from the initializer word's token embeddings."""

    @abc.abstractmethod
    def gradient_encoder(self, encoders: list, to_model: Callable[[list], dict]) -> Callable[[dict], dict]:
        """Return a callable from concept vectors (per encoder key) to the model's conditioning, with gradients.

        `to_model` turns a CONDITIONING into the model's conditioning dict, keeping gradients.
        """

    @abc.abstractmethod
    def text_device(self, clip) -> torch.device:
        """Return the device the text encoders run on."""
