"""Rectified-flow transformers with joint attention: SD3.x (MMDiT) and Flux.1 (double- and single-stream blocks).

Text and image tokens attend together (`[text | image]`), so VCT's two controls act on blocks of
one joint map (joint.py): self-attention injection on the image-to-image block, the refine on the
image-to-text block. The text side differs from the UNet's too:
- SD3's text tokens are CLIP-L and CLIP-G side by side (77 tokens, padded to T5-XXL's 4096 wide)
  followed by T5-XXL's; its pooled output is CLIP-L's and CLIP-G's. Any of the three may be absent.
- Flux's text tokens are T5-XXL's alone; CLIP-L gives only the pooled vector.
Concept vectors are learned for every encoder the CLIP has (T5 included, forward and backward at
every step: t5_text.py), and saved under each one's embedding key, so `embedding:NAME` conditions
all of them as ComfyUI tokenizes it.

SD3 runs CFG, so content inversion is null-text as on the UNet. Flux is guidance-distilled: one
conditional pass per step, no unconditional branch to tune, so its sampler runs the two-row
mode and B* is put back on the inversion path every step (`direct`), exact by construction.
"""
from __future__ import annotations

from typing import Optional

import comfy.ldm.flux.layers as flux_layers
import comfy.ldm.modules.diffusionmodules.mmdit as comfy_mmdit
import comfy.supported_models
import comfy.text_encoders.flux
import comfy.text_encoders.sd3_clip
import torch

from ... import vct_ops
from . import clip_text
from .base import Architecture, fused_attention
from .joint import joint_block_keys, joint_controlled_clone
from .t5_text import T5Encoder

# The named choices of which joint-attention blocks VCT's control acts on (sampler input `joint_blocks`).
BLOCK_CHOICES = ("auto", "all", "first_half", "second_half", "vital")
# What "auto" selects: measured best in the toy world's SD3 model (24 tasks, README "Does it work?").
AUTO_BLOCKS = "second_half"
# Stable Flow's (Avrahami et al., CVPR 2025) vital layers of FLUX.1-dev, numbered over its 19
# double-stream then 38 single-stream blocks: 0, 1, 17, 18 and 25, 28, 53, 54, 56.
FLUX_VITAL = ([("double_block", i) for i in (0, 1, 17, 18)]
              + [("single_block", i - 19) for i in (25, 28, 53, 54, 56)])
FLUX_BLOCKS = (19, 38)

# SD3 pads CLIP-L/G's side-by-side output to T5-XXL's width, and zero-fills absent pooled outputs.
SD3_CONTEXT_WIDTH = 4096
SD3_POOLED_WIDTHS = {"clip_l": 768, "clip_g": 1280}


def joint_text_encoders(clip, node: str) -> list:
    """Return SD3's (CLIP-L, CLIP-G, T5-XXL, whichever are present) or Flux's (CLIP-L, T5-XXL) text encoders."""
    outer, tokenizer = getattr(clip, "cond_stage_model", None), getattr(clip, "tokenizer", None)
    flux = isinstance(outer, comfy.text_encoders.flux.FluxClipModel)
    if not (flux or isinstance(outer, comfy.text_encoders.sd3_clip.SD3ClipModel)):
        name = type(outer).__name__ if outer is not None else type(clip).__name__
        raise ValueError(f"{node}: the connected CLIP ({name}) is not an SD3 or Flux text encoder; connect the CLIP "
                         "output of the same checkpoint loader (or DualCLIPLoader / TripleCLIPLoader) as the model")
    encoders = []
    for key, name in (("l", "clip_l"), ("g", "clip_g")):
        inner, sub = getattr(outer, name, None), getattr(tokenizer, name, None)
        if inner is not None and sub is not None:
            # Flux's CLIP-L gives only the pooled vector: no span of the model's text tokens.
            encoders.append(clip_text.ClipEncoder(clip, key, inner, sub.embedding_key, None if flux else "clip"))
    if getattr(outer, "t5xxl", None) is not None:
        encoders.append(T5Encoder(clip, "t5xxl", outer.t5xxl, tokenizer.t5xxl.embedding_key))
    if not any(isinstance(e, T5Encoder) for e in encoders) and flux:
        raise ValueError(f"{node}: the Flux CLIP has no T5-XXL; load it with DualCLIPLoader (clip_l and t5xxl)")
    if not encoders:
        raise ValueError(f"{node}: the SD3 CLIP has no text encoder loaded; load it with TripleCLIPLoader")
    return encoders


def chosen_blocks(model, choice: str) -> Optional[list]:
    """Return the block keys a named choice selects in this model (None: every block), or raise naming the choices."""
    if choice not in BLOCK_CHOICES:
        raise ValueError(f"joint_blocks must be one of {', '.join(BLOCK_CHOICES)}, got {choice!r}")
    if choice == "auto":
        choice = AUTO_BLOCKS
    if choice == "all":
        return None
    keys = joint_block_keys(model)
    half = (len(keys) + 1) // 2
    if choice == "first_half":
        return keys[:half]
    if choice == "second_half":
        return keys[half:]
    counts = tuple(sum(1 for kind, _ in keys if kind == name) for name in ("double_block", "single_block"))
    if counts != FLUX_BLOCKS:
        raise ValueError(f"joint_blocks 'vital' is Stable Flow's choice for Flux.1's {FLUX_BLOCKS[0]} double- and "
                         f"{FLUX_BLOCKS[1]} single-stream blocks; this model has {counts[0]} and {counts[1]}. Choose "
                         "all, first_half or second_half")
    return list(FLUX_VITAL)


class JointGradientEncoder(clip_text.GradientEncoder):
    """Concept vectors -> SD3's or Flux's conditioning dict, composed as their CLIP models compose it (gradients on)."""

    def __call__(self, vectors: dict) -> dict:
        """Return the model's conditioning dict for the concept prompt made of `vectors`."""
        out = {e.embedding_key: e.encode(vectors[e.key], self.tokenized, self.text_device) for e in self.encoders}
        t5 = out.get("t5xxl")
        if isinstance(self.encoders[0].clip.cond_stage_model, comfy.text_encoders.flux.FluxClipModel):
            return self.to_model([[t5[0], {"pooled_output": out["clip_l"][1]}]])
        # SD3: CLIP-L and CLIP-G side by side, padded to 4096 wide, then T5's tokens after them.
        zeros = {key: torch.zeros(1, width, device=self.text_device) for key, width in SD3_POOLED_WIDTHS.items()}
        pooled = torch.cat([out[key][1] if key in out else zeros[key] for key in SD3_POOLED_WIDTHS], dim=-1)
        clip_l, clip_g = out.get("clip_l"), out.get("clip_g")
        side = None
        if clip_l is not None and clip_g is not None:
            cut = min(clip_l[0].shape[1], clip_g[0].shape[1])
            side = torch.cat([clip_l[0][:, :cut], clip_g[0][:, :cut]], dim=-1)
        elif clip_l is not None:
            side = clip_l[0]
        elif clip_g is not None:
            side = torch.nn.functional.pad(clip_g[0], (SD3_POOLED_WIDTHS["clip_l"], 0))
        if side is not None:
            side = torch.nn.functional.pad(side, (0, SD3_CONTEXT_WIDTH - side.shape[-1]))
        parts = [part for part in (side, t5[0] if t5 is not None else None) if part is not None]
        return self.to_model([[torch.cat(parts, dim=-2), {"pooled_output": pooled}]])


class JointTransformer(Architecture):
    """SD3.x and Flux.1 (dev and schnell): joint-attention transformers on the rectified flow."""

    # Exact classes: Flux inpainting, Kontext, Chroma and others condition differently.
    families = {
        "SD3": comfy.supported_models.SD3,
        "Flux": comfy.supported_models.Flux,
        "FluxSchnell": comfy.supported_models.FluxSchnell,
    }
    condition_keys = ("c_crossattn", "y", "guidance")
    paper_layout = False  # T5's tokens have no start token, and SD3 puts CLIP's and T5's side by side
    # Their ControlNets add residuals inside the joint blocks; not yet tested with VCT's rows.
    controlnet = False

    def context_width(self, model) -> Optional[int]:
        """Return the text-token width from the model config (Flux's context_in_dim, SD3's context embedder)."""
        config = model.model.model_config.unet_config
        if "context_in_dim" in config:
            return config["context_in_dim"]
        embedder = config.get("context_embedder_config") or {}
        return embedder.get("params", {}).get("in_features")

    def conditioning_width(self, encoders: list) -> int:
        """Return T5's width (SD3 pads CLIP to it), or SD3's padded CLIP width without T5."""
        t5 = [e for e in encoders if isinstance(e, T5Encoder)]
        return t5[0].width if t5 else SD3_CONTEXT_WIDTH

    def check_text_encoders(self, model, encoders: list, node: str) -> None:
        """Raise ValueError when the CLIP is another family's (SD3's for a Flux model or the reverse) or too wide."""
        flux_clip = isinstance(encoders[0].clip.cond_stage_model, comfy.text_encoders.flux.FluxClipModel)
        if flux_clip != self.guidance_distilled(model):
            kind = "Flux" if flux_clip else "SD3"
            family = type(model.model.model_config).__name__
            raise ValueError(f"{node}: the CLIP is a {kind} text encoder but the model is {family}; connect the CLIP "
                             "of the same checkpoint as the model")
        super().check_text_encoders(model, encoders, node)

    def guidance_distilled(self, model) -> bool:
        """Return True for Flux (one conditional pass per step, guidance as an input), False for SD3 (CFG)."""
        return not isinstance(model.model.model_config, comfy.supported_models.SD3)

    def inject(self, model, config: vct_ops.InjectionConfig, sigmas: torch.Tensor,
               appearance: Optional[vct_ops.AppearanceConfig] = None, blocks: str = "auto"):
        """Return a clone whose joint attention (in the `blocks` chosen by name) runs under VCT's controller,
        wrapping an override already set."""
        if appearance is not None:
            raise ValueError("appearance attention is not available on SD3 and Flux yet; set appearance_strength "
                             "to 0")
        chosen = chosen_blocks(model, blocks)
        return joint_controlled_clone(model, vct_ops.JointAttentionController(sigmas, config), chosen)

    @staticmethod
    def gradient_attention(func, *args, **kwargs):
        """Return PyTorch's fused attention, which backpropagates on every device (both joint layouts)."""
        return fused_attention(*args, **kwargs)

    def recompute_types(self) -> tuple[type, ...]:
        """Return SD3's joint blocks and Flux's double- and single-stream blocks."""
        return (comfy_mmdit.JointBlock, flux_layers.DoubleStreamBlock, flux_layers.SingleStreamBlock)

    def inplace_residual_types(self) -> tuple[type, ...]:
        """Return Flux's blocks, which add residuals in place (`txt += ...`, `x += ...`)."""
        return (flux_layers.DoubleStreamBlock, flux_layers.SingleStreamBlock)

    def text_encoders(self, clip, node: str) -> list:
        """Return the CLIP and T5 encoders of an SD3 or Flux CLIP."""
        return joint_text_encoders(clip, node)

    def initializer_vectors(self, encoder, word: str, count: int) -> torch.Tensor:
        """Return vectors copied from the word's token embeddings in each encoder's own table (T5's `shared`)."""
        return clip_text.initializer_vectors(encoder, word, count)

    def gradient_encoder(self, encoders, to_model) -> JointGradientEncoder:
        """Return the CLIP and T5 forwards with gradients to the concept vectors, composed as the family does."""
        return JointGradientEncoder(encoders, to_model)

    def text_device(self, clip) -> torch.device:
        """Return the CLIP patcher's load device."""
        return clip_text.text_device(clip)
