"""The toy world's model, built from ComfyUI's own SD1.5 classes, for the headless runner's demo
(`run_workflow.py --demo`, which loads the trained weights committed in tools/demo/) and for the tests.

- Tiny SD1.5-shaped models, every parameter initialised from a seed (ComfyUI builds its modules
  with `comfy.ops.disable_weight_init`, parameters left as `torch.empty`): Linear/Conv/Embedding
  weights kaiming-uniform, norm weights 1, biases 0 (GroupNorm weights at 0 make the UNet output
  zeros; weights at std 0.02 leave the conditioning almost without influence). A private
  torch.Generator per call; the global RNG is not touched. `tiny_sd15_model` (UNet through
  `SD15.get_model`), `tiny_sd1_clip` (real SD1 tokenizer, tiny CLIP-L), `tiny_vae`.
- The toy world's fixed latent encoding carried by a real `comfy.sd.VAE` (`picture_vae`): the 8x8
  means of the picture, centred on the background's grey and scaled ((p - 0.8) * 3.5), as latent
  channels 0-2 (channel 3 is zero), divided by SD1.5's latent scale; decoding repeats each latent
  position over 8x8 pixels. A 128 px image is a 16x16 latent.
- Tiny SD3 (MMDiT) models on `comfy.supported_models.SD3` (rectified flow, shift 3): `tiny_sd3_model`
  and `tiny_sd3_clip` (SD3's tokenizer and encoder classes, T5 only and tiny). The toy world's SD3
  toy sees the same picture in the first three of SD3's 16 latent channels, in SD3's latent format
  (`picture_vae("sd3")`: VAEEncode gives working latent / scale + shift, which ComfyUI's process_in
  undoes).
- `load_trained(path)`: (model, clip, vae) of a trained toy checkpoint. The file holds the diffusion
  model's weights and, in its metadata, the recipe it was trained from (tests/quality/toy_model.py
  for the SD1.5 toy, toy_flow_model.py for the SD3 toy; the recipe's `family`, SD1.5 where absent,
  picks the builder); the text encoder is random and frozen, rebuilt here from the recipe's seed.

ComfyUI is imported at import time: load this file once ComfyUI is importable. A module, not a command.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # before ComfyUI's imports, which fail outside it
    sys.exit(f"{Path(__file__).name} is a module of the headless runner, not a command: "
             f"see python {Path(__file__).with_name('run_workflow.py')} --help")

import comfy.latent_formats  # noqa: E402
import comfy.ldm.models.autoencoder  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.supported_models_base  # noqa: E402
import comfy.text_encoders.sd3_clip  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

# Width of the tiny text encoder; the tiny UNet's context_dim and `clip_l` embedding files use it.
TINY_CLIP_WIDTH = 64

TINY_CLIP_CONFIG = {
    "hidden_size": TINY_CLIP_WIDTH,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": TINY_CLIP_WIDTH,
    # unchanged from comfy/sd1_clip_config.json, repeated for clarity:
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "eos_token_id": 49407,
}

TINY_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
    # GroupNorm(32 groups) inside needs multiples of 32 channels; 4 levels = 3 downsamples = factor 8.
    "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
}
TINY_VAE_EMBED_DIM = 4


# ----------------------------------------------------------------------------------------------
# initialisation
# ----------------------------------------------------------------------------------------------

_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)


@torch.no_grad()
def init_tiny_weights_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Initialise every parameter of `module` in place: weights with >= 2 dims (Linear, Conv,
    Embedding) kaiming-uniform, norm weights 1, all biases 0. Other 1-d/scalar parameters that
    ComfyUI creates already initialised (e.g. CLIP's `logit_scale`) are left alone; an
    unrecognised 1-d parameter raises, so no `torch.empty` garbage ever survives.
    Works on inference tensors inside `torch.inference_mode()` too."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for mod_name, m in module.named_modules():
        for p_name, p in m.named_parameters(recurse=False):
            if p_name == "bias":
                p.zero_()
            elif isinstance(m, _NORMS) and p_name == "weight":
                p.fill_(1.0)
            elif p.ndim == 1 and p_name in ("weight", "scale") and "Norm" in type(m).__name__:
                # RMS norms (Flux's and SD3.5's qk-norms, T5's layer norms) scale by this vector.
                p.fill_(1.0)
            elif p.ndim >= 2:
                # generate in fp32 on CPU, then cast: same values whatever the storage dtype/device
                w = torch.empty(p.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(w, generator=gen)
                p.copy_(w)
            elif p_name in ("logit_scale",):
                pass
            else:
                raise ValueError(f"don't know how to initialise {mod_name}.{p_name} {tuple(p.shape)}")
    return module


# ----------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------

def tiny_sd15_unet_config(model_channels: int = 32, channel_mult=(1, 2), num_res_blocks: int = 1,
                          attention_levels=(True, True), transformer_depth_middle: int = 1,
                          num_heads: int = 2, context_dim: int = TINY_CLIP_WIDTH) -> dict:
    """The `unet_config` dict ComfyUI's model detection would produce for this tiny shape."""
    levels = len(channel_mult)
    assert len(attention_levels) == levels
    return {
        # what comfy.model_detection.detect_unet_config always sets for SD-style UNets
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        # what it detects from the weights
        "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks] * levels,
        "transformer_depth": [int(a) for a in attention_levels for _ in range(num_res_blocks)],
        "transformer_depth_output": [int(a) for a in attention_levels for _ in range(num_res_blocks + 1)],
        "channel_mult": list(channel_mult),
        "transformer_depth_middle": transformer_depth_middle,
        "use_linear_in_transformer": False,  # SD1.x: conv proj_in/proj_out
        "context_dim": context_dim,
        "adm_in_channels": None,
        "use_temporal_resblock": False, "use_temporal_attention": False,
        # SD15.unet_extra_config sets num_heads=8, num_head_channels=-1; overridden below
        "num_heads": num_heads, "num_head_channels": -1,
    }


def tiny_sd15_model(seed: int = 0, dtype: torch.dtype | None = None, **unet_kwargs) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a tiny SD1.5-shaped UNet (eps prediction, SD1.5 latent format and
    scaled-linear 1000-step schedule), built the way `comfy.sd.load_state_dict_guess_config` builds
    a checkpoint's model: `comfy.supported_models.SD15(unet_config)`, `set_inference_dtype`,
    `model_config.get_model(...)` -> `comfy.model_base.BaseModel`, then `ModelPatcher`.
    `model.model.apply_model(x, sigma, c_crossattn=...)` returns the denoised latent;
    `model.get_model_object("model_sampling")`, `model.model.latent_format` behave like SD1.5.

    Default shape (model_channels 32, channel_mult (1, 2), one res block per level, one
    SpatialTransformer after every res block, heads 2, context_dim 64):

        input_blocks:  0 conv_in | 1 Res+ST (level 0) | 2 Downsample | 3 Res+ST (level 1)
        middle_block:  Res, ST, Res                       (level 1)
        output_blocks: 0 Res+ST, 1 Res+ST+Upsample (level 1) | 2 Res+ST, 3 Res+ST (level 0)

    Attention-patch keys (block_name, block_id, index in the ST) for attn1 and attn2:
        ("input", 1, 0), ("output", 2, 0), ("output", 3, 0)   -> level 0: H*W query tokens, dim_head 16
        ("input", 3, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0)
                                                           -> level 1: (H/2)*(W/2) tokens, dim_head 32
    for a latent of H x W (image 8H x 8W with `tiny_vae`). E.g. latent 16x16: 256 and 64 query
    tokens; latent 8x8: 64 and 16. Cross-attention keys/values: 77 tokens (one CLIP chunk)
    of width 64. (Real SD1.5 at 64x64 latents: 4096, 1024, 256 tokens and 64 in the middle.)
    """
    unet_config = tiny_sd15_unet_config(**unet_kwargs)
    model_config = comfy.supported_models.SD15(unet_config)
    model_config.unet_config["num_heads"] = unet_config["num_heads"]
    model_config.unet_config["num_head_channels"] = unet_config["num_head_channels"]
    return build_tiny_model(model_config, seed, dtype)


def build_tiny_model(model_config, seed: int = 0, dtype: torch.dtype | None = None, state_dict: dict | None = None,
                     prefix: str = "") -> comfy.model_patcher.ModelPatcher:
    """Return a ModelPatcher around `model_config`'s model, built as `comfy.sd.load_state_dict_guess_config`
    builds a checkpoint's (the inference dtype ComfyUI picks for this device unless `dtype` is given,
    `get_model(state_dict, prefix)`), with every parameter initialised from `seed`."""
    load_device = comfy.model_management.get_torch_device()
    if dtype is None:  # ComfyUI's choice for this device (fp32 on CPU)
        dtype = comfy.model_management.unet_dtype(model_params=0,
                                                  supported_dtypes=list(model_config.supported_inference_dtypes))
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model_config.custom_operations = None
    model = model_config.get_model(state_dict or {}, prefix, device=torch.device("cpu"))
    init_tiny_weights_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                            offload_device=comfy.model_management.unet_offload_device())


# ----------------------------------------------------------------------------------------------
# text encoder
# ----------------------------------------------------------------------------------------------

def tiny_sd1_clip(embedding_directory=None, seed: int = 1, dtype: torch.dtype | None = None) -> comfy.sd.CLIP:
    """A `comfy.sd.CLIP` with exactly the classes an SD1.5 checkpoint gets
    (`SD15.clip_target()`: `sd1_clip.SD1Tokenizer` with the real tokenizer files from
    comfy/sd1_tokenizer, and `sd1_clip.SD1ClipModel` -> `SD1CheckpointClipModel` -> `SDClipModel`
    -> `clip_model.CLIPTextModel`), but a 2-layer, 64-wide, 2-head transformer (vocab 49408,
    77 positions). The tiny size goes in through ComfyUI's own per-encoder config override
    `model_options["clip_l_model_config"]`, which is merged into comfy/sd1_clip_config.json -
    the effective `textmodel_json_config` is `TINY_CLIP_CONFIG`.

    `embedding_directory` (str or list) is where `embedding:NAME` files are looked up (the real
    CheckpointLoaderSimple passes `folder_paths.get_folder_paths("embeddings")`); files must hold
    a `clip_l` tensor [n, 64] (or a single tensor). `dtype=None` lets ComfyUI choose (fp16 weights
    on CPU, computed in fp32 through `comfy.ops.manual_cast`, as with a real checkpoint)."""
    target = comfy.supported_models.SD15(tiny_sd15_unet_config()).clip_target()
    model_options = {"clip_l_model_config": dict(TINY_CLIP_CONFIG)}
    if dtype is not None:
        model_options["dtype"] = dtype
    n_params = 2 * (49408 + 77) * TINY_CLIP_WIDTH
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, tokenizer_data={},
                         parameters=n_params, model_options=model_options)
    init_tiny_weights_(clip.cond_stage_model, seed)
    return clip


# ----------------------------------------------------------------------------------------------
# SD3 (MMDiT) and its T5 text encoder
# ----------------------------------------------------------------------------------------------

SD3_LATENT_CHANNELS = 16
TINY_T5_WIDTH = 64
# T5-XXL's json with these fields replaced (`model_options["t5xxl_model_config"]`); the vocabulary
# stays the real one so the real tokenizer's ids fit.
TINY_T5_CONFIG = {"d_model": TINY_T5_WIDTH, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2}
SD3_POOLED_WIDTH = 768 + 1280  # CLIP-L + CLIP-G pooled, zeros when they are off


def tiny_sd3_unet_config(depth: int = 2, num_blocks: int = 2, patch_size: int = 2,
                         context_dim: int = TINY_T5_WIDTH) -> dict:
    """Return the `unet_config` dict ComfyUI's model detection would produce for a tiny SD3 MMDiT.

    ComfyUI's MMDiT fixes 64-wide heads and `depth` of them (width 64 * depth); `num_blocks` sets
    the number of joint blocks independently. No stored position embedding (`num_patches` None):
    MMDiT then computes its 2-d sin-cos embedding for the latent's size. Patch 1 does not run in
    ComfyUI 0.3.64 (MMDiT counts patches as (side + 1) // patch), so the patch is 2 as in SD3.
    """
    return {
        "in_channels": SD3_LATENT_CHANNELS, "out_channels": SD3_LATENT_CHANNELS, "patch_size": patch_size,
        "input_size": None, "depth": depth, "num_blocks": num_blocks, "adm_in_channels": SD3_POOLED_WIDTH,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": context_dim, "out_features": 64 * depth}},
        "pos_embed_scaling_factor": None, "pos_embed_max_size": None, "num_patches": None,
        "qk_norm": None, "x_block_self_attn_layers": [],
    }


# The test suite's default tiny SD3: 2 joint blocks, 128 wide, 2 heads.
TINY_SD3_UNET_CONFIG = tiny_sd3_unet_config()


def tiny_sd3_model(seed: int = 0, dtype: torch.dtype | None = None, **config) -> comfy.model_patcher.ModelPatcher:
    """Return a ModelPatcher around a tiny SD3 MMDiT (`supported_models.SD3` -> `model_base.SD3`, flow, shift 3)
    of `tiny_sd3_unet_config(**config)` (default 2 joint blocks, 128 wide, 2 heads); 16 latent channels;
    context TINY_T5_WIDTH wide; pooled `y` of 2048."""
    return build_tiny_model(comfy.supported_models.SD3(tiny_sd3_unet_config(**config)), seed, dtype)


def tiny_clip_from_target(target, model_options: dict, embedding_directory=None, seed: int = 1) -> comfy.sd.CLIP:
    """Return a `comfy.sd.CLIP` of a ClipTarget whose encoders `model_options` shrinks, every weight from `seed`."""
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, tokenizer_data={},
                         parameters=32128 * TINY_T5_WIDTH, model_options=model_options)
    init_tiny_weights_(clip.cond_stage_model, seed)
    return clip


def tiny_sd3_clip(embedding_directory=None, seed: int = 1) -> comfy.sd.CLIP:
    """Return a `comfy.sd.CLIP` with SD3's tokenizer and encoder classes (`sd3_clip.SD3Tokenizer`,
    `SD3ClipModel`), T5 only and tiny (TINY_T5_CONFIG): context `[1, >= 77, TINY_T5_WIDTH]`, pooled
    zeros `[1, 2048]` (ComfyUI pads CLIP-L/G outputs to T5-XXL's 4096 width, so a narrow T5 cannot
    sit beside them). Embedding files: key `t5xxl`, [n, TINY_T5_WIDTH]."""
    target = comfy.supported_models_base.ClipTarget(
        comfy.text_encoders.sd3_clip.SD3Tokenizer,
        comfy.text_encoders.sd3_clip.sd3_clip(clip_l=False, clip_g=False, t5=True))
    return tiny_clip_from_target(target, {"t5xxl_model_config": dict(TINY_T5_CONFIG)}, embedding_directory, seed)


# ----------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------

def tiny_vae_state_dict(seed: int = 2) -> dict:
    """Initialised weights of the tiny AutoencoderKL (keys as in a checkpoint's VAE part)."""
    ae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(TINY_VAE_DDCONFIG), embed_dim=TINY_VAE_EMBED_DIM)
    init_tiny_weights_(ae, seed)
    return {k: v.detach().clone() for k, v in ae.state_dict().items()}


def tiny_vae(seed: int = 2) -> comfy.sd.VAE:
    """A `comfy.sd.VAE` wrapping ComfyUI's AutoencoderKL (Encoder/Decoder of the SD VAE) with
    ch 32, ch_mult [1,1,1,1], one res block per level, 4 latent channels: the downscale factor is
    8 like SD1.5 (`vae.downscale_ratio == 8`), so EmptyLatentImage/VAEEncode/VAEDecode shapes match
    real SD1.5 (image 32x32 <-> latent 4x4). ~0.3 M parameters, fp32 on CPU. Built through
    `VAE(sd=..., config=...)` because ComfyUI's state-dict detection assumes the full-size SD VAE.
    VAEEncode returns the posterior mode (mean), not a sample."""
    config = {"params": {"ddconfig": dict(TINY_VAE_DDCONFIG), "embed_dim": TINY_VAE_EMBED_DIM}}
    return comfy.sd.VAE(sd=tiny_vae_state_dict(seed), config=config)


# ----------------------------------------------------------------------------------------------
# the toy world's model
# ----------------------------------------------------------------------------------------------

SD15_LATENT_SCALE = 0.18215  # the latent format's scale factor, which VAEEncode's output is divided by
LATENT_FACTOR = 8
# The picture is centred on the background's grey and scaled, so that the latent is near zero
# where most pixels are and spreads about as wide as an SD latent.
PICTURE_OFFSET, PICTURE_SCALE = 0.8, 3.5


def picture_to_latent(picture: torch.Tensor, channels: int = 4) -> torch.Tensor:
    """Return the working-space latents `[B, channels, S, S]` of pictures `[B, 3, S, S]` in [0, 1]
    (centred, scaled, zero channels added: 4 for SD1.5, 16 for SD3)."""
    latent = (picture.float() - PICTURE_OFFSET) * PICTURE_SCALE
    return torch.cat([latent, latent.new_zeros(latent.shape[0], channels - 3, *latent.shape[2:])], dim=1)


def latent_to_picture(latent: torch.Tensor) -> torch.Tensor:
    """Return the pictures `[B, 3, S, S]` in [0, 1] of working-space latents `[B, C, S, S]` (channels 0-2)."""
    return (latent[:, :3].float() / PICTURE_SCALE + PICTURE_OFFSET).clamp(0, 1)


def _latent_format(family: str) -> tuple[int, float, float]:
    """Return (latent channels, scale, shift) of a toy family's latent format."""
    if family == "sd3":  # ComfyUI's own constants, so the VAE matches the model's process_in/out
        fmt = comfy.latent_formats.SD3()
        return SD3_LATENT_CHANNELS, fmt.scale_factor, fmt.shift_factor
    if family == "sd15":
        return 4, SD15_LATENT_SCALE, 0.0
    raise ValueError(f"unknown toy family {family!r}")


class PictureLatent(torch.nn.Module):
    """The fixed latent encoding: the 8x8 means of the picture, centred and scaled, in channels 0-2."""

    def __init__(self, channels: int = 4, scale: float = SD15_LATENT_SCALE, shift: float = 0.0) -> None:
        super().__init__()
        self.channels = channels
        # ComfyUI's model management sizes and moves modules by their tensors; give it some.
        self.register_buffer("latent_scale", torch.tensor(scale))
        self.register_buffer("latent_shift", torch.tensor(shift))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Return VAE-space latents `[B, channels, H/8, W/8]` of images `[B, 3, H, W]` in [-1, 1]
        (working latent / scale + shift, which the latent format's process_in undoes)."""
        picture = (torch.nn.functional.avg_pool2d(pixels.float(), LATENT_FACTOR) + 1) / 2
        return (picture_to_latent(picture, self.channels) / self.latent_scale + self.latent_shift).to(pixels.dtype)

    def decode(self, latent: torch.Tensor, **_) -> torch.Tensor:
        """Return images `[B, 3, 8H, 8W]` in [-1, 1] from VAE-space latents."""
        picture = latent_to_picture((latent.float() - self.latent_shift) * self.latent_scale) * 2 - 1
        return picture.repeat_interleave(LATENT_FACTOR, -2).repeat_interleave(LATENT_FACTOR, -1)


def picture_vae(family: str = "sd15") -> comfy.sd.VAE:
    """Return a `comfy.sd.VAE` whose first stage is the fixed `PictureLatent` encoding in `family`'s latent format."""
    channels, scale, shift = _latent_format(family)
    vae = tiny_vae()
    vae.first_stage_model = PictureLatent(channels, scale, shift).eval()
    vae.latent_channels = channels  # what ComfyUI's tiled encoding allocates
    vae.patcher = comfy.model_patcher.ModelPatcher(
        vae.first_stage_model, load_device=vae.device, offload_device=comfy.model_management.vae_offload_device()
    )
    return vae


def recipe_family(recipe: dict) -> str:
    """Return a toy recipe's model family: "sd3", or "sd15" (the SD1.5 toy's recipe names none)."""
    return recipe.get("family", "sd15")


def build(recipe: dict, embedding_directory=None):
    """Return an untrained (model, clip, vae) of a toy recipe's architecture (model weights random)."""
    family = recipe_family(recipe)
    if family == "sd3":
        mmdit = recipe["mmdit"]
        model = tiny_sd3_model(seed=recipe["seed"], depth=mmdit["depth"], num_blocks=mmdit["num_blocks"],
                               patch_size=mmdit["patch_size"])
        clip = tiny_sd3_clip(embedding_directory, seed=recipe["clip_seed"])
        return model, clip, picture_vae(family)
    unet = recipe["unet"]
    model = tiny_sd15_model(
        seed=recipe["seed"], model_channels=unet["model_channels"], channel_mult=tuple(unet["channel_mult"]),
        attention_levels=tuple(unet["attention_levels"]),
    )
    clip = tiny_sd1_clip(embedding_directory, seed=recipe["clip_seed"])
    return model, clip, picture_vae(family)


def read_recipe(path: Path) -> dict:
    """Return the recipe stored in a trained toy checkpoint's metadata."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["comfyui_vct_tiny"])["recipe"]


def load_trained(path: Path, embedding_directory=None):
    """Return (model, clip, vae) of the toy checkpoint at `path` (SD1.5 or SD3 toy, by its recipe's family),
    the diffusion model holding its trained weights."""
    model, clip, vae = build(read_recipe(path), embedding_directory)
    weights = safetensors.torch.load_file(str(path))
    net = model.model.diffusion_model
    net.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    net.eval()
    return model, clip, vae


def toy_checkpoint_loader(path, marker, embedding_directory, output_model=True, output_clip=True, output_vae=True):
    """Return (model, clip, vae) like a checkpoint loader (None where not asked for)."""
    model, clip, vae = load_trained(Path(path), embedding_directory)
    return (model if output_model else None, clip if output_clip else None, vae if output_vae else None)
