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

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.supported_models_base  # noqa: E402
import comfy.text_encoders.flux  # noqa: E402
import comfy.text_encoders.sd3_clip  # noqa: E402
from vct_toy import build_tiny_model, init_tiny_weights_  # noqa: E402

LATENT_CHANNELS = 16
TINY_T5_WIDTH = 64
# T5-XXL's json with these fields replaced (`model_options["t5xxl_model_config"]`); the vocabulary
# stays the real one so the real tokenizer's ids fit.
TINY_T5_CONFIG = {"d_model": TINY_T5_WIDTH, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2}
TINY_FLUX_CLIP_L_WIDTH = 32
TINY_FLUX_CLIP_L_CONFIG = {"hidden_size": TINY_FLUX_CLIP_L_WIDTH, "intermediate_size": 64,
                           "num_attention_heads": 2, "num_hidden_layers": 3, "projection_dim": TINY_FLUX_CLIP_L_WIDTH}
SD3_POOLED_WIDTH = 768 + 1280  # CLIP-L + CLIP-G pooled, zeros when they are off

# SD3's MMDiT fixes 64-wide heads and `depth` heads: depth 2 is 128 wide.
TINY_SD3_UNET_CONFIG = {
    "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS, "patch_size": 2, "input_size": None,
    "depth": 2, "num_blocks": 2, "adm_in_channels": SD3_POOLED_WIDTH,
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": TINY_T5_WIDTH, "out_features": 128}},
    "pos_embed_scaling_factor": None, "pos_embed_max_size": None, "num_patches": None,
    "qk_norm": None, "x_block_self_attn_layers": [],
}
TINY_FLUX_UNET_CONFIG = {
    "image_model": "flux", "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS, "patch_size": 2,
    "vec_in_dim": TINY_FLUX_CLIP_L_WIDTH, "context_in_dim": TINY_T5_WIDTH, "hidden_size": 64, "mlp_ratio": 4.0,
    "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000,
    "qkv_bias": True, "guidance_embed": True,
}


def tiny_sd3_model(seed: int = 0, dtype: torch.dtype | None = None) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a tiny SD3 MMDiT (`supported_models.SD3` -> `model_base.SD3`): 2 joint blocks,
    128 wide, 2 heads; 16 latent channels; context TINY_T5_WIDTH wide; pooled `y` of 2048."""
    return build_tiny_model(comfy.supported_models.SD3(dict(TINY_SD3_UNET_CONFIG)), seed, dtype)


def tiny_flux_model(seed: int = 0, dtype: torch.dtype | None = None) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a tiny Flux.1 dev (`supported_models.Flux` -> `model_base.Flux`, guidance embedded):
    2 double and 2 single blocks, 64 wide, 2 heads; context TINY_T5_WIDTH wide, pooled TINY_FLUX_CLIP_L_WIDTH."""
    return build_tiny_model(comfy.supported_models.Flux(dict(TINY_FLUX_UNET_CONFIG)), seed, dtype)


def _clip(target, model_options: dict, embedding_directory, seed: int) -> comfy.sd.CLIP:
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, tokenizer_data={},
                         parameters=32128 * TINY_T5_WIDTH, model_options=model_options)
    init_tiny_weights_(clip.cond_stage_model, seed)
    return clip


def tiny_sd3_clip(embedding_directory=None, seed: int = 1) -> comfy.sd.CLIP:
    """A `comfy.sd.CLIP` with SD3's tokenizer and encoder classes (`sd3_clip.SD3Tokenizer`,
    `SD3ClipModel`), T5 only and tiny (TINY_T5_CONFIG). Embedding files: key `t5xxl`, [n, TINY_T5_WIDTH]."""
    target = comfy.supported_models_base.ClipTarget(
        comfy.text_encoders.sd3_clip.SD3Tokenizer,
        comfy.text_encoders.sd3_clip.sd3_clip(clip_l=False, clip_g=False, t5=True))
    return _clip(target, {"t5xxl_model_config": dict(TINY_T5_CONFIG)}, embedding_directory, seed)


def tiny_flux_clip(embedding_directory=None, seed: int = 1) -> comfy.sd.CLIP:
    """A `comfy.sd.CLIP` with Flux's classes (`flux.FluxTokenizer`, `FluxClipModel`: CLIP-L and T5-XXL), tiny."""
    target = comfy.supported_models.Flux(dict(TINY_FLUX_UNET_CONFIG)).clip_target()
    options = {"t5xxl_model_config": dict(TINY_T5_CONFIG), "clip_l_model_config": dict(TINY_FLUX_CLIP_L_CONFIG)}
    return _clip(target, options, embedding_directory, seed)
