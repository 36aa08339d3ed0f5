"""Tiny random-weight rectified-flow transformers built from ComfyUI's own classes: SD3 (MMDiT) and Flux.

Built as a checkpoint's model is (`build_tiny_model`): the family's model config class from a
unet_config (the dict `comfy.model_detection` would produce, shrunk), every parameter initialised
from `seed`. Both run ComfyUI's CONST (flow)
model sampling: SD3 on `ModelSamplingDiscreteFlow` (shift 3), Flux on `ModelSamplingFlux`.

Their text encoders are tiny too, with ComfyUI's real tokenizers (shipped in its tree):
- SD3: T5 only (ComfyUI pads the CLIP-L/G outputs to T5-XXL's 4096 width, so a narrow T5
  cannot sit beside them): context `[1, >= 77, TINY_T5_WIDTH]`, pooled zeros `[1, 2048]`.
- Flux: CLIP-L and T5 as the family has them: context from T5 `[1, >= 256, TINY_T5_WIDTH]`,
  pooled from CLIP-L `[1, TINY_FLUX_CLIP_L_WIDTH]`.
"""
from __future__ import annotations

import torch

from . import comfy_env

comfy_env.ensure_bootstrapped()
comfy_env.load_tool("vct_toy")

import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
from vct_toy import SD3_LATENT_CHANNELS as LATENT_CHANNELS  # noqa: E402
from vct_toy import (  # noqa: E402, F401 - SD3's tiny model and T5 live with the toy world's SD3 model
    SD3_POOLED_WIDTH,
    TINY_SD3_UNET_CONFIG,
    TINY_T5_CONFIG,
    TINY_T5_WIDTH,
    build_tiny_model,
    tiny_clip_from_target,
    tiny_sd3_clip,
    tiny_sd3_model,
)

TINY_FLUX_CLIP_L_WIDTH = 32
TINY_FLUX_CLIP_L_CONFIG = {"hidden_size": TINY_FLUX_CLIP_L_WIDTH, "intermediate_size": 64,
                           "num_attention_heads": 2, "num_hidden_layers": 3, "projection_dim": TINY_FLUX_CLIP_L_WIDTH}

TINY_FLUX_UNET_CONFIG = {
    "image_model": "flux", "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS, "patch_size": 2,
    "vec_in_dim": TINY_FLUX_CLIP_L_WIDTH, "context_in_dim": TINY_T5_WIDTH, "hidden_size": 64, "mlp_ratio": 4.0,
    "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000,
    "qkv_bias": True, "guidance_embed": True,
}


def tiny_flux_model(seed: int = 0, dtype: torch.dtype | None = None) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a tiny Flux.1 dev (`supported_models.Flux` -> `model_base.Flux`, guidance embedded):
    2 double and 2 single blocks, 64 wide, 2 heads; context TINY_T5_WIDTH wide, pooled TINY_FLUX_CLIP_L_WIDTH."""
    return build_tiny_model(comfy.supported_models.Flux(dict(TINY_FLUX_UNET_CONFIG)), seed, dtype)


def tiny_flux_clip(embedding_directory=None, seed: int = 1) -> comfy.sd.CLIP:
    """A `comfy.sd.CLIP` with Flux's classes (`flux.FluxTokenizer`, `FluxClipModel`: CLIP-L and T5-XXL), tiny."""
    target = comfy.supported_models.Flux(dict(TINY_FLUX_UNET_CONFIG)).clip_target()
    options = {"t5xxl_model_config": dict(TINY_T5_CONFIG), "clip_l_model_config": dict(TINY_FLUX_CLIP_L_CONFIG)}
    return tiny_clip_from_target(target, options, embedding_directory, seed)
