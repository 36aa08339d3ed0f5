"""The Stable Diffusion UNet (SD1.x, SD2.x, SDXL): SpatialTransformer attention and CLIP text encoders.

Every transformer block has a self-attention (`attn1`) and a cross-attention (`attn2`) call, which
ComfyUI lets a patch replace per block, keyed `(block, id, index)`. VCT's controller goes on both:
self-attention injection acts on `attn1`, the cross-attention refine on `attn2`. The output blocks
are the decoder, where reference appearance attention acts (as in Cross-Image Attention and StyleID).
"""
from __future__ import annotations

from typing import Optional

import comfy.ldm.modules.attention as comfy_attention
import comfy.ldm.modules.diffusionmodules.openaimodel as comfy_unet
import comfy.supported_models
import torch

from ... import vct_ops
from . import clip_text
from .base import Architecture, fused_attention

# CLIP encodes a prompt in chunks of 77 tokens (75 plus the start and end tokens); VCT's concept
# prompts are always one chunk.
CHUNK_TOKENS = 77


def check_one_chunk(conditioning, name: str) -> None:
    """Raise ValueError when a CONDITIONING spans more than one CLIP chunk (its text is over 75 tokens)."""
    tokens = conditioning[0][0].shape[1]
    if tokens > CHUNK_TOKENS:
        raise ValueError(
            f"{name} encodes to {tokens} tokens, more than one {CHUNK_TOKENS}-token chunk: its text is longer than "
            "75 tokens. VCT aligns it with a concept prompt of one chunk, so shorten it to at most 75 tokens"
        )


def _comfy_attention(q, k, v, heads, extra_options):
    # ComfyUI's fastest attention for this device, for every row VCT does not change; the
    # layer's precision (SD2.x asks for float32) is honoured as in ComfyUI's own layers.
    return comfy_attention.optimized_attention(
        q, k, v, heads, attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
    )


def transformer_block_keys(model) -> list[tuple[str, int, int]]:
    """Return the (block, id, index) keys of every transformer block, as ComfyUI's attention patches use them."""
    unet = model.model.diffusion_model
    keys: list[tuple[str, int, int]] = []
    groups = [("input", list(getattr(unet, "input_blocks", []))), ("middle", [getattr(unet, "middle_block", None)]),
              ("output", list(getattr(unet, "output_blocks", [])))]
    for name, blocks in groups:
        for block_id, block in enumerate(blocks):
            if block is None:
                continue
            for layer in block:
                if isinstance(layer, comfy_attention.SpatialTransformer):
                    keys.extend((name, block_id, i) for i in range(len(layer.transformer_blocks)))
    return keys


def existing_replace_patch(model_options: dict, kind: str, key: tuple):
    """Return the replace patch ComfyUI would call for this block now (its own key first, then the 2-tuple)."""
    registry = model_options.get("transformer_options", {}).get("patches_replace", {}).get(kind, {})
    return registry.get(key, registry.get(key[:2]))


def controlled_clone(model, controller: vct_ops.AttentionController):
    """Return a clone of `model` with `controller` on every transformer block's attn1 and attn2, wrapping the
    patches already there (another pack's patch on a block is called from inside ours)."""
    clone = model.clone()
    for key in transformer_block_keys(clone):
        for kind in ("attn1", "attn2"):
            previous = existing_replace_patch(clone.model_options, kind, key)
            patch = controller.patch(kind, previous, decoder=key[0] == "output")
            clone.set_model_patch_replace(patch, kind, *key)
    return clone


class SDUNet(Architecture):
    """SD1.x, SD2.x and SDXL base: a UNet with SpatialTransformers, conditioned by CLIP text encoders."""

    # Exact classes: variants such as unCLIP, refiners or distilled SDXLs condition differently.
    families = {
        "SD15": comfy.supported_models.SD15,
        "SD20": comfy.supported_models.SD20,
        "SDXL": comfy.supported_models.SDXL,
    }
    condition_keys = ("c_crossattn", "y")

    def context_width(self, model) -> Optional[int]:
        """Return the cross-attention width from the UNet config."""
        return model.model.model_config.unet_config.get("context_dim")

    def inject(self, model, config: vct_ops.InjectionConfig, sigmas: torch.Tensor,
               appearance: Optional[vct_ops.AppearanceConfig] = None, blocks: str = "auto"):
        """Return a clone with the controller on every transformer block's attn1 and attn2, wrapping patches there;
        the output blocks are the decoder for appearance attention."""
        if blocks not in ("auto", "all"):
            raise ValueError(f"joint_blocks is {blocks!r}, a choice for SD3 and Flux; the UNet families use every "
                             "transformer block: set it to auto")
        controller = vct_ops.AttentionController(sigmas, config, attention=_comfy_attention, appearance=appearance)
        return controlled_clone(model, controller)

    @staticmethod
    def gradient_attention(func, *args, **kwargs):
        """Return PyTorch's fused attention, which backpropagates on every device."""
        return fused_attention(*args, **kwargs)

    def check_prompt_length(self, conditioning, name: str) -> None:
        """Raise ValueError when the prompt spans more than one 77-token CLIP chunk."""
        check_one_chunk(conditioning, name)

    def recompute_types(self) -> tuple[type, ...]:
        """Return the UNet's residual and transformer blocks."""
        return (comfy_unet.ResBlock, comfy_attention.BasicTransformerBlock)

    def text_encoders(self, clip, node: str) -> list[clip_text.ClipEncoder]:
        """Return CLIP-L, OpenCLIP-H, or CLIP-L and CLIP-G."""
        return clip_text.clip_encoders(clip, node)

    def initializer_vectors(self, encoder, word: str, count: int) -> torch.Tensor:
        """Return vectors copied from the word's CLIP token embeddings, as the reference code does."""
        return clip_text.initializer_vectors(encoder, word, count)

    def gradient_encoder(self, encoders, to_model) -> clip_text.GradientEncoder:
        """Return the CLIP forward with gradients to the concept vectors."""
        return clip_text.GradientEncoder(encoders, to_model)

    def text_device(self, clip) -> torch.device:
        """Return the CLIP patcher's load device."""
        return clip_text.text_device(clip)
