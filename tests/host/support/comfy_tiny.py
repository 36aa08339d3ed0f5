"""Tiny random-weight models built from ComfyUI's own classes, for CPU tests.

ComfyUI builds its modules with `comfy.ops.disable_weight_init` (parameters left as
`torch.empty`), so every builder initialises every parameter itself, deterministically from
`seed` (a private torch.Generator; the global RNG is not touched): Linear/Conv/Embedding weights
kaiming-uniform, norm weights 1, biases 0 (DESIGN.md section 4: GroupNorm weights at 0 make
the UNet output zeros; weights at std 0.02 leave the conditioning almost without influence).

Builders (all CPU, deterministic for a given seed, usable inside or outside `torch.inference_mode`):
- `tiny_sd15_model(...) -> comfy.model_patcher.ModelPatcher` (UNet through `SD15.get_model`),
  `tiny_sd1_clip(embedding_directory, ...) -> comfy.sd.CLIP` (real SD1 tokenizer, tiny CLIP-L),
  `tiny_vae(...) -> comfy.sd.VAE` (AutoencoderKL, downscale factor 8, 4 latent channels) and
  `init_tiny_weights_`: defined in the pack's tools/vct_toy.py, which the runner's demo uses to
  build the trained toy model, and re-exported here;
- `tiny_sd2_model(...)`, `tiny_sd2_clip(...)`: SD2.x (`SD20`, linear proj, OpenCLIP-H `clip_h`,
  v-prediction like a 768-v checkpoint by default); `tiny_sdxl_model(...)`, `tiny_sdxl_clip(...)`:
  SDXL (`model_base.SDXL` with the `y` vector input, `clip_l` + `clip_g`)

Whole checkpoints of these models (`tiny_checkpoint`), and placeholder checkpoint files that
ComfyUI's own loaders turn into them, are in comfy_tiny_checkpoint.py.
"""
from __future__ import annotations

import torch

from . import comfy_env

comfy_env.ensure_bootstrapped()
comfy_env.load_tool("vct_toy")

import comfy.model_base  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
from vct_toy import (  # noqa: E402, F401 - re-exported for the tests
    TINY_CLIP_CONFIG,
    TINY_CLIP_WIDTH,
    TINY_VAE_DDCONFIG,
    TINY_VAE_EMBED_DIM,
    build_tiny_model,
    init_tiny_weights_,
    tiny_sd1_clip,
    tiny_sd15_model,
    tiny_sd15_unet_config,
    tiny_vae,
    tiny_vae_state_dict,
)

# ----------------------------------------------------------------------------------------------
# SD2.x and SDXL
# ----------------------------------------------------------------------------------------------

# Text widths of the tiny SD2 / SDXL encoders. The SD2 UNet's context_dim is TINY_SD2_CLIP_WIDTH;
# the SDXL UNet's is TINY_SDXL_CLIP_L_WIDTH + TINY_SDXL_CLIP_G_WIDTH (clip_l and clip_g hidden states
# concatenated, as `SDXLClipModel.encode_token_weights` does); its `y` input is the projected clip_g
# pooled output (TINY_SDXL_CLIP_G_WIDTH) + 6 * 256 size/crop embeddings (`model_base.SDXL.encode_adm`).
TINY_SD2_CLIP_WIDTH = 64
TINY_SDXL_CLIP_L_WIDTH = 32
TINY_SDXL_CLIP_G_WIDTH = 64
TINY_SDXL_CONTEXT_DIM = TINY_SDXL_CLIP_L_WIDTH + TINY_SDXL_CLIP_G_WIDTH
TINY_SDXL_ADM_CHANNELS = TINY_SDXL_CLIP_G_WIDTH + 6 * 256

# Head width of the tiny SD2 / SDXL UNets: like the real ones (num_heads -1, num_head_channels 64
# from the model configs' unet_extra_config) the number of heads is channels // head width.
TINY_HEAD_CHANNELS = 16


def _tiny_te_config(width: int, layers: int = 3) -> dict:
    """Per-encoder override of ComfyUI's text-encoder json (`model_options["clip_X_model_config"]`).
    3 layers because SD2/SDXL encoders use the penultimate layer (`layer_idx=-2`, which
    `SDClipModel` asserts is < num_layers). Activation, vocab, positions and eos stay as in
    the real json (gelu for clip_h / clip_g, quick_gelu for clip_l)."""
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2,
            "num_hidden_layers": layers, "projection_dim": width}


TINY_SD2_CLIP_H_CONFIG = _tiny_te_config(TINY_SD2_CLIP_WIDTH)
TINY_SDXL_CLIP_L_CONFIG = _tiny_te_config(TINY_SDXL_CLIP_L_WIDTH)
TINY_SDXL_CLIP_G_CONFIG = _tiny_te_config(TINY_SDXL_CLIP_G_WIDTH)


def _tiny_unet_config(model_channels: int, channel_mult, num_res_blocks: int, attention_depth,
                      transformer_depth_middle: int, context_dim: int, adm_in_channels: int | None) -> dict:
    """The `unet_config` dict `comfy.model_detection.detect_unet_config` would produce for an
    SD2/SDXL-style UNet (linear proj_in/proj_out in the transformers) of this tiny shape."""
    levels = len(channel_mult)
    assert len(attention_depth) == levels
    cfg = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks] * levels,
        "transformer_depth": [int(d) for d in attention_depth for _ in range(num_res_blocks)],
        "transformer_depth_output": [int(d) for d in attention_depth for _ in range(num_res_blocks + 1)],
        "channel_mult": list(channel_mult),
        "transformer_depth_middle": transformer_depth_middle,
        "use_linear_in_transformer": True,
        "context_dim": context_dim,
        "adm_in_channels": adm_in_channels,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }
    if adm_in_channels is not None:
        cfg["num_classes"] = "sequential"   # what detect_unet_config sets when label_emb exists
    return cfg


def _build_tiny_unet(model_config, state_dict: dict, prefix: str, seed: int,
                     dtype: torch.dtype | None) -> comfy.model_patcher.ModelPatcher:
    """`comfy.sd.load_state_dict_guess_config`'s model path: inference dtype, `get_model(sd, prefix)`
    (which decides the model type from the state dict), then every UNet parameter initialised."""
    model_config.unet_config["num_heads"] = -1
    model_config.unet_config["num_head_channels"] = TINY_HEAD_CHANNELS
    return build_tiny_model(model_config, seed, dtype, state_dict, prefix)


# The key `comfy.supported_models.SD20.model_type` reads to tell a 768-v (v-prediction) SD2
# checkpoint from a 512 (eps) one: std(norm1.bias of output_blocks.11.1) > 0.09 means v-prediction.
SD2_VPRED_PROBE_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"


def tiny_sd2_model(seed: int = 0, v_prediction: bool = True, dtype: torch.dtype | None = None,
                   model_channels: int = 32, channel_mult=(1, 2)) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a tiny SD2.x-shaped UNet, built like an SD2 checkpoint's model:
    `comfy.supported_models.SD20(unet_config)` (linear proj_in/proj_out, attn_precision fp32,
    SD1.5 latent format, scaled-linear 1000-step schedule) and `get_model(state_dict,
    "model.diffusion_model.")` -> `comfy.model_base.BaseModel`. The model type is decided by
    `SD20.model_type` from the state dict, as for a real checkpoint: with `v_prediction` the
    state dict handed to `get_model` holds the probe key (SD2_VPRED_PROBE_KEY) with a spread-out
    bias, as a 768-v checkpoint does -> `ModelType.V_PREDICTION`; otherwise `ModelType.EPS`.

    Same block layout as `tiny_sd15_model` (channel_mult (1, 2), one res block + one transformer
    per block, context 77 x TINY_SD2_CLIP_WIDTH = 64), but heads of 16 channels (num_head_channels
    like SD2's 64): level 0 2 heads, level 1 4 heads. Attention keys for a latent H x W:
        ("input", 1, 0), ("output", 2, 0), ("output", 3, 0)                  -> H*W query tokens
        ("input", 3, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0) -> (H/2)*(W/2)
    """
    unet_config = _tiny_unet_config(model_channels, channel_mult, 1, (1,) * len(channel_mult), 1,
                                    TINY_SD2_CLIP_WIDTH, None)
    model_config = comfy.supported_models.SD20(unet_config)
    prefix = "model.diffusion_model."
    state_dict = {}
    if v_prediction:
        state_dict[prefix + SD2_VPRED_PROBE_KEY] = torch.linspace(-1.0, 1.0, model_channels)
    patcher = _build_tiny_unet(model_config, state_dict, prefix, seed, dtype)
    expected = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    assert patcher.model.model_type == expected, patcher.model.model_type
    return patcher


def tiny_sdxl_model(seed: int = 0, dtype: torch.dtype | None = None, model_channels: int = 32,
                    channel_mult=(1, 2, 4), attention_depth=(0, 1, 1)) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a tiny SDXL-shaped UNet, built like an SDXL checkpoint's model:
    `comfy.supported_models.SDXL(unet_config)` + `get_model({}, "model.diffusion_model.")` ->
    `comfy.model_base.SDXL` (eps, SDXL latent format with scale 0.13025, label_emb taking the
    `y` vector of TINY_SDXL_ADM_CHANNELS = 64 + 6*256 = 1600 from `encode_adm`). Context is
    77 x TINY_SDXL_CONTEXT_DIM (32 clip_l + 64 clip_g = 96).

    SDXL's real layout, shrunk: channel_mult (1, 2, 4) (32/64/128 channels), one res block per
    level, no attention at level 0, one transformer at levels 1 and 2 and in the middle; heads
    of 16 channels (level 1: 4 heads, level 2: 8 heads). Latent sides must be multiples of 4.

        input_blocks:  0 conv_in | 1 Res | 2 Down | 3 Res+ST | 4 Down | 5 Res+ST
        middle_block:  Res, ST, Res                                           (level 2)
        output_blocks: 0 Res+ST, 1 Res+ST+Up (l2) | 2 Res+ST, 3 Res+ST+Up (l1) | 4 Res, 5 Res (l0)

    Attention keys for a latent H x W:
        ("input", 3, 0), ("output", 2, 0), ("output", 3, 0)                  -> (H/2)*(W/2) tokens
        ("input", 5, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0) -> (H/4)*(W/4) tokens
    e.g. latent 8x8: 16 and 4 query tokens; cross-attention keys 77 (one chunk).
    """
    unet_config = _tiny_unet_config(model_channels, channel_mult, 1, attention_depth, 1,
                                    TINY_SDXL_CONTEXT_DIM, TINY_SDXL_ADM_CHANNELS)
    model_config = comfy.supported_models.SDXL(unet_config)
    return _build_tiny_unet(model_config, {}, "model.diffusion_model.", seed, dtype)


def _tiny_clip(target, model_options: dict, n_params: int, embedding_directory, seed: int,
               dtype: torch.dtype | None) -> comfy.sd.CLIP:
    if dtype is not None:
        model_options["dtype"] = dtype
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, tokenizer_data={},
                         parameters=n_params, model_options=model_options)
    init_tiny_weights_(clip.cond_stage_model, seed)
    return clip


def tiny_sd2_clip(embedding_directory=None, seed: int = 1, dtype: torch.dtype | None = None) -> comfy.sd.CLIP:
    """A `comfy.sd.CLIP` with the classes an SD2 checkpoint gets (`SD20.clip_target()`:
    `text_encoders.sd2_clip.SD2Tokenizer` (real tokenizer files, pad token 0) and `SD2ClipModel`
    -> `SD2ClipHModel` (penultimate layer, projected pooled output)), with a 3-layer, 64-wide,
    2-head OpenCLIP-H-config transformer set through `model_options["clip_h_model_config"]`.
    Tokens are `{"h": [...]}`; `encode_from_tokens(..., return_pooled=True)` gives [1, 77, 64]
    and [1, 64]. Embedding files: key `clip_h`, tensor [n, 64]."""
    target = comfy.supported_models.SD20(
        _tiny_unet_config(32, (1, 2), 1, (1, 1), 1, TINY_SD2_CLIP_WIDTH, None)).clip_target()
    model_options = {"clip_h_model_config": dict(TINY_SD2_CLIP_H_CONFIG)}
    n_params = 2 * (49408 + 77) * TINY_SD2_CLIP_WIDTH
    return _tiny_clip(target, model_options, n_params, embedding_directory, seed, dtype)


def tiny_sdxl_clip(embedding_directory=None, seed: int = 1, dtype: torch.dtype | None = None) -> comfy.sd.CLIP:
    """A `comfy.sd.CLIP` with the classes an SDXL checkpoint gets (`SDXL.clip_target()`:
    `sdxl_clip.SDXLTokenizer` (clip_l + clip_g tokenizers) and `SDXLClipModel` (clip_l: SDClipModel,
    layer -2; clip_g: SDXLClipG, layer -2, projected pooled)), tiny through ComfyUI's
    `clip_l_model_config` (32 wide) / `clip_g_model_config` (64 wide, projection 64), 3 layers each.
    Tokens are `{"g": [...], "l": [...]}`; `encode_from_tokens(..., return_pooled=True)` gives
    [1, 77, 96] (l then g) and the clip_g pooled [1, 64]. Embedding files need `clip_l` [n, 32]
    and `clip_g` [n, 64] tensors (each tokenizer loads its own key)."""
    target = comfy.supported_models.SDXL(
        _tiny_unet_config(32, (1, 2, 4), 1, (0, 1, 1), 1, TINY_SDXL_CONTEXT_DIM, TINY_SDXL_ADM_CHANNELS)).clip_target()
    model_options = {"clip_l_model_config": dict(TINY_SDXL_CLIP_L_CONFIG),
                     "clip_g_model_config": dict(TINY_SDXL_CLIP_G_CONFIG)}
    n_params = 2 * (49408 + 77) * TINY_SDXL_CONTEXT_DIM
    return _tiny_clip(target, model_options, n_params, embedding_directory, seed, dtype)
