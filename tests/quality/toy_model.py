"""The toy world's model: an SD1.5-architecture checkpoint, tiny, trained on the world on the CPU.

Built from ComfyUI's own classes; the definition (model builders, latent encoding, loading a
trained file) is the pack's `tools/vct_toy.py`, which the headless runner's demo uses too, and the
recipe and training are here:
- UNet: `comfy.supported_models.SD15`, 32 channels, three levels (32/64/64 channels) with self-
  and cross-attention at every level and in the middle; eps prediction, SD1.5's schedule.
- Text encoder: ComfyUI's SD1 CLIP classes and real tokenizer, 2 layers, 64 wide, random and
  frozen (seeded): the UNet learns to read its encodings of the captions.
- "VAE": a fixed latent encoding carried by a real `comfy.sd.VAE`, so LoadImage -> VAEEncode ->
  ... -> VAEDecode work unchanged: the 8x8 means of the picture, centred on the background's
  grey and scaled ((p - 0.8) * 3.5), as latent channels 0-2 (channel 3 is zero), divided by
  SD1.5's latent scale; decoding repeats each latent position over 8x8 pixels. A 128 px image is
  a 16x16 latent whose first three channels are the picture of `world.py`.

Training: eps-MSE plus a little clean-image MSE on uniformly drawn timesteps, AdamW with warm-up
and cosine decay, the caption left empty for 15 % of the images (so CFG and null-text have an
unconditional model to work with), an exponential moving average of the weights kept as the
result. Reproducible from the recipe's seed on one machine; about 15 minutes on 2 CPU cores.

Weights are cached under a name derived from the recipe (`weights_name`): first in
`tools/demo/` (committed there, beside the demo that ships them to users), then in the user cache
folder (`VCT_CACHE`, default `~/.cache/comfyui-vct`), where a missing file is trained and written
atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import world

_HOST = Path(__file__).resolve().parents[1] / "host"
if str(_HOST) not in sys.path:
    sys.path.insert(0, str(_HOST))

from support import comfy_env  # noqa: E402

comfy_env.ensure_bootstrapped()

import comfy.ldm.modules.attention as comfy_attention  # noqa: E402
import safetensors.torch  # noqa: E402

vct_toy = comfy_env.load_tool("vct_toy")  # the model's definition, which the runner's demo uses too
from vct_toy import (  # noqa: E402, F401 - re-exported for the tests
    LATENT_FACTOR,
    PICTURE_OFFSET,
    PICTURE_SCALE,
    SD15_LATENT_SCALE,
    PictureLatent,
    latent_to_picture,
    load_trained,
    picture_to_latent,
    picture_vae,
    toy_checkpoint_loader,
)

log = logging.getLogger("vct-toy")

# The committed weights live with the runner's demo, which users run (tests/ is not in a registry archive).
WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "tools" / "demo"
WORLD_VERSION = 1  # bump when world.py changes what it renders

RECIPE = {
    "world": WORLD_VERSION,
    "latent": [PICTURE_OFFSET, PICTURE_SCALE],
    "unet": {"model_channels": 32, "channel_mult": [1, 2, 2], "attention_levels": [True, True, True]},
    "clip_seed": 1,
    "steps": 4500,
    "batch": 16,
    "lr": 1e-3,
    "warmup": 200,
    "ema": 0.999,
    "caption_dropout": 0.15,
    # eps-MSE alone barely constrains the clean-image estimate at high noise (its error is
    # sigma^2 times the eps error); this much of the clean-image MSE balances the noise levels.
    "x0_weight": 0.1,
    "seed": 0,
}


def weights_name(recipe: dict = RECIPE) -> str:
    """Return the cache file name of a recipe's trained weights (a hash of the recipe)."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return f"toy_sd15_{digest}.safetensors"


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------

def image_to_latent(image: np.ndarray) -> torch.Tensor:
    """Return the working-space latent `[1, 4, S, S]` of a world image `[S, S, 3]` (what the UNet sees)."""
    return picture_to_latent(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None])


def latent_to_image(latent: torch.Tensor) -> np.ndarray:
    """Return the world image `[S, S, 3]` in [0, 1] of one working-space latent."""
    picture = latent_to_picture(latent.reshape(1, -1, *latent.shape[-2:]))[0]
    return picture.permute(1, 2, 0).cpu().numpy().astype(np.float64)


def to_pixels(image: np.ndarray) -> torch.Tensor:
    """Return a ComfyUI IMAGE `[1, 8S, 8S, 3]` showing a world image at the VAE's scale."""
    t = torch.from_numpy(np.asarray(image, dtype=np.float32))
    return t.repeat_interleave(LATENT_FACTOR, 0).repeat_interleave(LATENT_FACTOR, 1)[None]


def from_pixels(pixels: torch.Tensor) -> np.ndarray:
    """Return the world image `[S, S, 3]` of a ComfyUI IMAGE `[1, 8S, 8S, 3]` (8x8 means)."""
    t = pixels[0].float().permute(2, 0, 1)[None]
    return torch.nn.functional.avg_pool2d(t, LATENT_FACTOR)[0].permute(1, 2, 0).cpu().numpy().astype(np.float64)


def build(recipe: dict = RECIPE, embedding_directory=None):
    """Return an untrained (model, clip, vae) of the recipe's architecture (model weights random)."""
    return vct_toy.build(recipe, embedding_directory)


def encode_text(clip, text: str) -> torch.Tensor:
    """Return CLIPTextEncode's conditioning tensor `[1, 77, width]` for a text."""
    return clip.encode_from_tokens(clip.tokenize(text), return_pooled=False).float()


def caption_table(clip) -> tuple[list[str], torch.Tensor]:
    """Return every caption of the world (the empty one first) and their encodings `[n, 77, width]`."""
    captions = [""]
    for colour in world.COLOURS:
        for texture in world.TEXTURES:
            for shape in world.SHAPES:
                captions.append(world.Scene(shape, colour, texture, 0, 0, 1, (0, 0, 0), (0, 0)).caption())
    with torch.no_grad():
        return captions, torch.cat([encode_text(clip, c) for c in captions])


def _sdpa(func, *args, **kwargs):
    # PyTorch's fused attention: fast on the CPU and known to backpropagate.
    return comfy_attention.attention_pytorch(*args, **kwargs)


TRAIN_OPTIONS = {"optimized_attention_override": _sdpa}


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

def update(net: torch.nn.Module, optimizer, schedule, loss: torch.Tensor, ema: dict, ema_cap: float, step: int) -> None:
    """Take one optimisation step on `loss` (gradients clipped to norm 1) and update the EMA weights `ema` in place."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    with torch.no_grad():
        decay = min(ema_cap, (step + 1) / (step + 10))  # warm-up of the average: early weights fade fast
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                ema[k].copy_(v)


def train(recipe: dict = RECIPE, log_every: int = 250, on_step: Optional[Callable[[int, float], None]] = None
          ) -> dict:
    """Return the EMA weights of the recipe's UNet trained on the world (float32, CPU state dict)."""
    model, clip, _ = build(recipe)
    captions, table = caption_table(clip)
    index = {c: i for i, c in enumerate(captions)}
    unet = model.model.diffusion_model
    unet.train()
    unet.requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe["lr"], weight_decay=1e-2)
    steps, warmup = recipe["steps"], recipe["warmup"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    rng = np.random.default_rng(recipe["seed"])
    gen = torch.Generator().manual_seed(recipe["seed"])
    sigmas = model.get_model_object("model_sampling").sigmas.float()
    start, running = time.time(), None
    for step in range(steps):
        scenes = [world.random_scene(rng) for _ in range(recipe["batch"])]
        z0 = torch.cat([image_to_latent(world.render(s)) for s in scenes])
        keep = rng.random(len(scenes)) >= recipe["caption_dropout"]
        rows = [index[s.caption()] if k else 0 for s, k in zip(scenes, keep)]
        context = table[rows]
        t = torch.randint(0, sigmas.numel(), (len(scenes),), generator=gen)
        sigma = sigmas[t]
        noise = torch.randn(z0.shape, generator=gen)
        x = z0 + sigma.view(-1, 1, 1, 1) * noise
        denoised = model.model.apply_model(x, sigma, c_crossattn=context, transformer_options=dict(TRAIN_OPTIONS))
        eps = (x - denoised) / sigma.view(-1, 1, 1, 1)
        loss = torch.mean((eps - noise) ** 2) + recipe["x0_weight"] * torch.mean((denoised - z0) ** 2)
        update(unet, optimizer, schedule, loss, ema, recipe["ema"], step)
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if on_step is not None:
            on_step(step, value)
        if log_every and (step + 1) % log_every == 0:
            log.info("toy training step %d/%d loss %.4f (%.0f s)", step + 1, steps, running, time.time() - start)
    return {k: v.float().contiguous() for k, v in ema.items()}


def _metadata(recipe: dict, seconds: float) -> dict:
    return {
        "comfyui_vct_tiny": json.dumps({"family": "toy", "recipe": recipe}),
        "training_seconds": f"{seconds:.0f}",
        "torch": torch.__version__,
    }


def weights_path(recipe: dict = RECIPE, train_if_missing: bool = True) -> Path:
    """Return the path of the recipe's trained weights: committed, cached, or trained now and cached."""
    name = weights_name(recipe)
    committed = WEIGHTS_DIR / name
    if committed.is_file():
        return committed
    cache = Path(os.environ.get("VCT_CACHE", Path.home() / ".cache" / "comfyui-vct")) / "toy"
    cached = cache / name
    if cached.is_file():
        return cached
    if not train_if_missing:
        raise FileNotFoundError(f"no trained toy weights {name} in {WEIGHTS_DIR} or {cache}")
    log.warning("training the toy model (%s); about 15 minutes on 2 CPU cores", name)
    start = time.time()
    weights = train(recipe)
    cache.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial")
    # Stored in float16: a few MB, and the toy world does not need more precision.
    safetensors.torch.save_file({k: v.half() for k, v in weights.items()}, str(partial),
                                metadata=_metadata(recipe, time.time() - start))
    partial.replace(cached)
    return cached


if __name__ == "__main__":  # train (or find) the weights and print where they are
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    print(weights_path())
