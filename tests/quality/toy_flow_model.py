"""The toy world's SD3 model: an SD3-layout joint-attention transformer (MMDiT), tiny, trained on the world on the CPU.

The transformer counterpart of toy_model.py's SD1.5 toy, built from ComfyUI's own classes; the
definition (model builders, latent encoding, loading a trained file) is the pack's `tools/vct_toy.py`:
- MMDiT: `comfy.supported_models.SD3` -> `model_base.SD3`, rectified flow on ComfyUI's
  `ModelSamplingDiscreteFlow` with SD3's shift 3; 128 wide (two 64-wide heads, the width ComfyUI's
  MMDiT ties to its `depth`), RECIPE_SD3's `num_blocks` joint blocks, patch 2: a 16x16 latent is
  8x8 image tokens beside the 77 text tokens (patch 1 does not run in ComfyUI 0.3.64, see
  `vct_toy.tiny_sd3_unet_config`).
- Text encoder: SD3's tokenizer and encoder classes, T5 only, 2 layers, 64 wide, random and frozen
  (seeded); the pooled vector `y` is zeros, as SD3 without CLIP-L/G has it.
- "VAE": the SD1.5 toy's fixed picture encoding in the first 3 of SD3's 16 latent channels, in
  SD3's latent format (VAEEncode gives working latent / 1.5305 + 0.0609).

Training: velocity MSE in ComfyUI's CONST parameterisation (x_t = (1 - s) z0 + s n; the model's
velocity is (x_t - denoised) / s, regressed on n - z0) plus the clean-image MSE, at noise levels
drawn from the model's own shifted schedule (the `sigmas` of its `model_sampling`, those the
sampler uses), AdamW with warm-up and cosine decay, adaLN-Zero start (DiT's: every block's
modulation and the output layer start at zero, so each block starts as the identity), the caption
left empty for 15 % of the images (so CFG has an unconditional model), an exponential moving
average of the weights kept as the result. About 21-25 minutes on 2 CPU cores.

Weights are cached as toy_model.py's are (`weights_path`): tools/demo/, then VCT_CACHE.
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
import safetensors.torch
import torch
import toy_model
import world

vct_toy = toy_model.vct_toy

log = logging.getLogger("vct-toy")

RECIPE_SD3 = {
    "family": "sd3",
    "world": toy_model.WORLD_VERSION,
    "latent": [vct_toy.PICTURE_OFFSET, vct_toy.PICTURE_SCALE],
    "mmdit": {"depth": 2, "num_blocks": 4, "patch_size": 2},
    "clip_seed": 1,
    "steps": 5000,
    "batch": 16,
    "lr": 2e-3,
    "warmup": 200,
    "ema": 0.999,
    "caption_dropout": 0.15,
    # The velocity MSE weighs the clean-image error by 1 / sigma^2, so the high noise levels, where the
    # object's place and shape are decided, count little; this much clean-image MSE adds to them.
    "x0_weight": 1.0,
    "adaln_zero": True,
    "seed": 0,
}


def weights_name(recipe: dict = RECIPE_SD3) -> str:
    """Return the cache file name of a recipe's trained weights (a hash of the recipe)."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return f"toy_sd3_{digest}.safetensors"


def image_to_latent(image: np.ndarray) -> torch.Tensor:
    """Return the working-space latent `[1, 16, S, S]` of a world image `[S, S, 3]` (what the MMDiT sees)."""
    picture = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    return vct_toy.picture_to_latent(picture, vct_toy.SD3_LATENT_CHANNELS)


def build(recipe: dict = RECIPE_SD3, embedding_directory=None):
    """Return an untrained (model, clip, vae) of the recipe's architecture (model weights random)."""
    return vct_toy.build(recipe, embedding_directory)


def caption_table(clip) -> tuple[list[str], torch.Tensor]:
    """Return every caption of the world (the empty one first) and their T5 encodings `[n, 77, width]`."""
    return toy_model.caption_table(clip)


def pooled(rows: int) -> torch.Tensor:
    """Return the pooled conditioning `y` `[rows, 2048]`: zeros, as SD3 without its CLIP encoders has it."""
    return torch.zeros(rows, vct_toy.SD3_POOLED_WIDTH)


@torch.no_grad()
def _adaln_zero_(net: torch.nn.Module) -> None:
    # DiT's adaLN-Zero: with the modulation (shift, scale, gate) and the output projection at zero,
    # every block starts as the identity and the model's output as zero velocity.
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Linear) and ("adaLN_modulation" in name or name == "final_layer.linear"):
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()


def train(recipe: dict = RECIPE_SD3, log_every: int = 250, on_step: Optional[Callable[[int, float], None]] = None
          ) -> dict:
    """Return the EMA weights of the recipe's MMDiT trained on the world (float32, CPU state dict)."""
    model, clip, _ = build(recipe)
    captions, table = caption_table(clip)
    index = {c: i for i, c in enumerate(captions)}
    net = model.model.diffusion_model
    if recipe["adaln_zero"]:
        _adaln_zero_(net)
    net.train()
    net.requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.AdamW(net.parameters(), lr=recipe["lr"], weight_decay=1e-2)
    steps, warmup = recipe["steps"], recipe["warmup"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    rng = np.random.default_rng(recipe["seed"])
    gen = torch.Generator().manual_seed(recipe["seed"])
    # The sampler's noise levels: SD3's shift-3 schedule, from ComfyUI's own model sampling.
    sigmas = model.get_model_object("model_sampling").sigmas.float()
    y = pooled(recipe["batch"])
    start, running = time.time(), None
    for step in range(steps):
        scenes = [world.random_scene(rng) for _ in range(recipe["batch"])]
        z0 = torch.cat([image_to_latent(world.render(s)) for s in scenes])
        keep = rng.random(len(scenes)) >= recipe["caption_dropout"]
        rows = [index[s.caption()] if k else 0 for s, k in zip(scenes, keep)]
        t = torch.randint(0, sigmas.numel(), (len(scenes),), generator=gen)
        sigma = sigmas[t]
        s = sigma.view(-1, 1, 1, 1)
        noise = torch.randn(z0.shape, generator=gen)
        x = (1 - s) * z0 + s * noise
        denoised = model.model.apply_model(x, sigma, c_crossattn=table[rows], y=y,
                                           transformer_options=dict(toy_model.TRAIN_OPTIONS))
        velocity = (x - denoised) / s
        loss = torch.mean((velocity - (noise - z0)) ** 2) + recipe["x0_weight"] * torch.mean((denoised - z0) ** 2)
        toy_model.update(net, optimizer, schedule, loss, ema, recipe["ema"], step)
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if on_step is not None:
            on_step(step, value)
        if log_every and (step + 1) % log_every == 0:
            log.info("toy SD3 training step %d/%d loss %.4f (%.0f s)", step + 1, steps, running, time.time() - start)
    return {k: v.float().contiguous() for k, v in ema.items()}


# ----------------------------------------------------------------------------------------------
# measuring what it learned (plain Euler on the flow ODE: the kernel's DDIM in its FLOW state space)
# ----------------------------------------------------------------------------------------------

def denoiser(model):
    """Return the kernel's denoiser contract on the model: `denoise(x, sigma, {"c_crossattn", "y"}, options)`."""

    def denoise(x, sigma, cond, transformer_options=None):
        return model.model.apply_model(x, sigma, c_crossattn=cond["c_crossattn"], y=cond["y"],
                                       transformer_options=dict(transformer_options or {}))

    return denoise


def schedule_sigmas(model, steps: int) -> torch.Tensor:
    """Return the pack's DDIM schedule of `steps` steps on the model's own sigmas (descending, ending at the
    smallest training sigma), the one VCT's inversion and sampling run on."""
    from vct_ops.schedule import ddim_sigmas

    return ddim_sigmas(model.get_model_object("model_sampling").sigmas.float(), steps)


def _cond(clip, texts: list[str]) -> dict:
    context = torch.cat([toy_model.encode_text(clip, t) for t in texts])
    return {"c_crossattn": context, "y": pooled(len(texts))}


def evaluation_captions(count: int = 24, seed: int = 0) -> list[str]:
    """Return `count` distinct captions of the world, drawn with a fixed seed."""
    captions = _all_captions()
    return [captions[i] for i in np.random.default_rng(seed).choice(len(captions), count, replace=False)]


def _all_captions() -> list[str]:
    return [world.Scene(shape, colour, texture, 0, 0, 1, (0, 0, 0), (0, 0)).caption()
            for colour in world.COLOURS for texture in world.TEXTURES for shape in world.SHAPES]


@torch.no_grad()
def caption_following(model, clip, captions: list[str], steps: int = 30, guidance: float = 5.0, seed: int = 0
                      ) -> dict:
    """Return the rates at which Euler/CFG samples of `captions` show the caption's colour, shape, texture, and
    colour and shape together (world.analyse of the sampled picture), with the analyses."""
    from vct_ops.ddim import ddim_sample

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(captions), vct_toy.SD3_LATENT_CHANNELS, world.SIDE, world.SIDE, generator=gen)
    latent = ddim_sample(denoiser(model), noise, schedule_sigmas(model, steps), _cond(clip, captions),
                         _cond(clip, [""] * len(captions)), guidance)
    pictures = vct_toy.latent_to_picture(latent).permute(0, 2, 3, 1).numpy().astype(np.float64)
    found = [world.analyse(p).attributes() for p in pictures]
    wanted = [_attributes(c) for c in captions]
    rates = {key: float(np.mean([f[key] == w[key] for f, w in zip(found, wanted)]))
             for key in ("colour", "shape", "texture")}
    rates["colour+shape"] = float(np.mean([f["colour"] == w["colour"] and f["shape"] == w["shape"]
                                           for f, w in zip(found, wanted)]))
    rates["found"] = found
    return rates


def _attributes(caption: str) -> dict:
    words = caption.split()[1:]
    return {"colour": words[0], "shape": words[-1], "texture": words[1] if len(words) == 3 else "plain"}


@torch.no_grad()
def reconstruction(model, clip, scenes: list, steps: int = 30) -> dict:
    """Return the error of Euler inversion to sigma 1 then Euler sampling back, with the empty caption:
    latent RMSE, picture PSNR (dB, pictures in [0, 1]) and the rate at which the analysed attributes are kept."""
    from vct_ops.ddim import FLOW, ddim_invert, ddim_sample

    z0 = torch.cat([image_to_latent(world.render(s)) for s in scenes])
    sigmas = schedule_sigmas(model, steps)
    cond = _cond(clip, [""] * len(scenes))
    noise = ddim_invert(denoiser(model), z0, sigmas, cond, space=FLOW)[-1]
    back = ddim_sample(denoiser(model), noise, sigmas, cond)
    pictures = vct_toy.latent_to_picture(back).permute(0, 2, 3, 1).numpy().astype(np.float64)
    originals = np.stack([world.render(s) for s in scenes])
    mse = np.mean((pictures - originals) ** 2, axis=(1, 2, 3))
    kept = [world.analyse(p).attributes() == s.attributes() for p, s in zip(pictures, scenes)]
    return {"latent_rmse": float(torch.sqrt(torch.mean((back - z0)[:, :3] ** 2))),
            "psnr": float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10)))),
            "attributes_kept": float(np.mean(kept))}


def _metadata(recipe: dict, seconds: float) -> dict:
    return {
        "comfyui_vct_tiny": json.dumps({"family": "toy", "model_family": recipe["family"], "recipe": recipe}),
        "training_seconds": f"{seconds:.0f}",
        "torch": torch.__version__,
    }


def weights_path(recipe: dict = RECIPE_SD3, train_if_missing: bool = True) -> Path:
    """Return the path of the recipe's trained weights: committed, cached, or trained now and cached."""
    name = weights_name(recipe)
    committed = toy_model.WEIGHTS_DIR / name
    if committed.is_file():
        return committed
    cache = Path(os.environ.get("VCT_CACHE", Path.home() / ".cache" / "comfyui-vct")) / "toy"
    cached = cache / name
    if cached.is_file():
        return cached
    if not train_if_missing:
        raise FileNotFoundError(f"no trained toy weights {name} in {toy_model.WEIGHTS_DIR} or {cache}")
    log.warning("training the SD3 toy model (%s); about 25 minutes on 2 CPU cores", name)
    start = time.time()
    weights = train(recipe)
    cache.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial")
    # Stored in float16: a few MB, and the toy world does not need more precision.
    safetensors.torch.save_file({k: v.half() for k, v in weights.items()}, str(partial),
                                metadata=_metadata(recipe, time.time() - start))
    partial.replace(cached)
    return cached


def measure(path: Path, captions: int = 24, scenes: int = 24) -> dict:
    """Return the caption-following rates (Euler, 30 steps, CFG 3 and 5) and the inversion reconstruction
    figures (30 steps, empty caption) of the trained weights at `path`."""
    model, clip, _ = vct_toy.load_trained(path)
    texts = evaluation_captions(captions)
    result = {}
    for guidance in (3.0, 5.0):
        rates = caption_following(model, clip, texts, guidance=guidance)
        result[f"cfg {guidance:g}"] = {k: round(v, 3) for k, v in rates.items() if k != "found"}
    figures = reconstruction(model, clip, world.dataset(7, scenes))
    result["reconstruction"] = {k: round(v, 3) for k, v in figures.items()}
    return result


if __name__ == "__main__":  # train (or find) the weights and print where they are; --measure: and what they learned
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    found = weights_path()
    print(found)
    if "--measure" in sys.argv[1:]:
        for key, value in measure(found).items():
            print(key, value)
