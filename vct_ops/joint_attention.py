"""VCT's dual-branch control on joint (MM-DiT) attention: SD3's joint blocks, Flux's double and single blocks.

A joint-attention call runs one softmax over the text tokens and the image tokens together,
`[text | image]` along the sequence (text first, as SD3 and Flux lay it out). The UNet's two
controls map onto its blocks:

- **self-attention injection** (the first τ_self of the steps): B's image rows take B*'s
  image-to-image attention. As on the UNet, B's image queries and image keys are swapped for
  B*'s, so its image-to-image logits are B*'s exactly while its values stay its own; B's text
  rows keep their own queries.
- **cross-attention refine** (the first τ_cross of the steps): the image-to-text block of B's
  image rows takes B*'s maps at aligned tokens and B's own at the concept tokens, times the
  equaliser's weights (the UNet's `AttentionController.refine`), with the image-to-image block as
  the injection left it. The maps are materialised only while the refine acts.

When B's inputs equal B*'s (concept = source), every path computes B's rows with the very
functions, on the very inputs, that compute B*'s, so B = B* exactly. Rows are tagged as for the
UNet (ROLES_KEY); the glue calls `joint_attention` with `[rows, tokens, heads * d]` tensors and the
text length, from whichever hook its host offers.
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention import (
    BORROW,
    KEEP,
    AttentionController,
    AttentionFn,
    InjectionConfig,
    _current_sigma,
    _role_rows,
    apply_probs,
    attention_probs,
    sdpa_attention,
)
from .local_blend import BLEND_KEY

# Transformer option the host glue sets to the latent's shape `[rows, C, H, W]`: joint-attention
# models do not pass it themselves, and the glue needs it to tell text tokens from image tokens.
LATENT_SHAPE_KEY = "vct_latent_shape"


class JointAttentionController:
    """Per-run control of joint attention: which of B's blocks of the joint map come from B*, by sigma."""

    def __init__(self, sigmas: torch.Tensor, config: InjectionConfig, attention: AttentionFn = sdpa_attention) -> None:
        """Build a controller for one sampling run over the descending schedule `sigmas`."""
        # The UNet controller's windows and refine are the same here; only the layout differs.
        self.base = AttentionController(sigmas, config, attention=attention)
        self.config = config
        self.attention = attention

    def self_active(self, extra_options: dict) -> bool:
        """Return whether image-to-image injection applies at this call's step."""
        sigma = _current_sigma(extra_options)
        return sigma is not None and sigma > self.base.self_threshold

    def cross_active(self, extra_options: dict) -> bool:
        """Return whether the image-to-text refine applies at this call's step."""
        return self.base.cross_active(extra_options)

    def joint_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: int,
                        extra_options: dict, attention: Optional[AttentionFn] = None) -> torch.Tensor:
        """Return joint attention over `[text | image]` tokens with B's rows controlled by B*'s.

        `q`, `k`, `v` are `[rows, text + image, heads * d]`; `extra_options["n_heads"]` gives the heads.
        `attention` computes the fused rows (default: the controller's), e.g. the host's kernel for this call.
        """
        attend = attention or self.attention
        heads = extra_options["n_heads"]
        if not 0 <= text <= q.shape[1]:
            raise ValueError(f"the text length {text} does not fit a joint sequence of {q.shape[1]} tokens")
        pairs = _role_rows(extra_options, q.shape[0])
        store = extra_options.get(BLEND_KEY)
        if pairs is not None and store is not None and store.wants(q.shape[1] - text):
            # B's own image-to-text maps (renormalised over the text), before any control: local blend's input.
            ref, main = pairs
            probs = attention_probs(q[main, text:], k[main, :text], heads)
            store.record(probs)
        if pairs is None:
            return attend(q, k, v, heads, extra_options)
        ref, main = pairs
        inject, refine = self.self_active(extra_options), self.cross_active(extra_options)
        # A call without text tokens (SD3.5's extra image-only attention) has nothing to refine.
        effect = self.config.refine_effect(text) if refine and text else KEEP
        if not inject and effect == KEEP:
            return attend(q, k, v, heads, extra_options)
        q2, k2 = q.clone(), k.clone()
        if inject:
            q2[main, text:], k2[main, text:] = q[ref, text:], k[ref, text:]
        if effect == BORROW:
            # B's image rows read B*'s text maps unchanged. In one softmax over text and image the
            # text block's share depends on the image block, so they read B*'s whole joint map
            # (its queries and all its keys), with their own values.
            q2[main, text:], k2[main] = q[ref, text:], k[ref]
        # B's text rows keep their own queries; they see whichever keys B's rows now carry (B*'s
        # image keys under injection), which leaves them unchanged when concept = source.
        out = attend(q2, k2, v, heads, extra_options)
        if effect in (KEEP, BORROW):
            return out
        probs = attention_probs(q2[main, text:], k2[main], heads)
        probs_ref = attention_probs(q[ref, text:], k[ref], heads)
        mixed = probs.clone()
        mixed[..., :text] = self.base.refine(probs_ref[..., :text], probs[..., :text])
        out = out.clone()
        out[main, text:] = apply_probs(mixed, v[main], heads).to(out.dtype)
        return out

