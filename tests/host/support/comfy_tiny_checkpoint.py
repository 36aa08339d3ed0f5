"""Placeholder checkpoint files that ComfyUI's own checkpoint loaders turn into the tiny models of
comfy_tiny.py and comfy_tiny_flow.py, so the real loader nodes and shipped workflows run on them:

- `tiny_checkpoint(seed, ..., family="sd15") -> (model, clip, vae)`, as a checkpoint loader returns them;
- `write_tiny_checkpoint_file(path, seed, family="sd15")` writes a placeholder marked with its family
  ("sd15", "sd2", "sdxl", "sd3" or "flux"); `read_tiny_checkpoint_marker(path)` reads the mark back;
- `checkpoint_family(name)`: the family a real checkpoint's file name belongs to (which tiny family
  stands in for it when a shipped workflow runs);
- `TinyCheckpointPatch` replaces `comfy.sd.load_checkpoint_guess_config` (see the class doc).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from . import comfy_env

comfy_env.ensure_bootstrapped()  # before ComfyUI's imports, as in comfy_tiny.py

import comfy.ldm.models.autoencoder  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402

from .comfy_tiny import (  # noqa: E402
    TINY_VAE_DDCONFIG,
    init_tiny_weights_,
    tiny_sd1_clip,
    tiny_sd2_clip,
    tiny_sd2_model,
    tiny_sd15_model,
    tiny_sdxl_clip,
    tiny_sdxl_model,
    tiny_vae,
)
from .comfy_tiny_flow import (  # noqa: E402
    LATENT_CHANNELS,
    tiny_flux_clip,
    tiny_flux_model,
    tiny_sd3_clip,
    tiny_sd3_model,
)

# Marker stored in the safetensors metadata of placeholder checkpoint files.
TINY_CKPT_METADATA_KEY = "comfyui_vct_tiny"


def tiny_checkpoint(seed: int = 0, embedding_directory=None, output_model: bool = True,
                    output_clip: bool = True, output_vae: bool = True, family: str = "sd15"):
    """(model, clip, vae) as a checkpoint loader returns them (None where not requested).
    `family`: "sd15" (tiny_sd15_model + tiny_sd1_clip), "sd2" (tiny_sd2_model, v-prediction, +
    tiny_sd2_clip), "sdxl" (tiny_sdxl_model + tiny_sdxl_clip), "sd3" (comfy_tiny_flow's tiny_sd3_model
    + tiny_sd3_clip) or "flux" (tiny_flux_model + tiny_flux_clip); the VAE is `tiny_vae` (4 latent
    channels) for the UNet families and `tiny_flow_vae` (16) for sd3 and flux."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny checkpoint family {family!r} (known: {', '.join(TINY_FAMILIES)})")
    make_model, make_clip = TINY_FAMILIES[family]
    model = make_model(seed=seed) if output_model else None
    clip = make_clip(embedding_directory, seed=seed + 1) if output_clip else None
    vae = TINY_VAES.get(family, tiny_vae)(seed=seed + 2) if output_vae else None
    return model, clip, vae


def tiny_flow_vae(seed: int = 2) -> comfy.sd.VAE:
    """Return a `tiny_vae` (AutoencoderKL, downscale 8) with SD3's and Flux's 16 latent channels: 32 px <-> 4x4."""
    ddconfig = {**TINY_VAE_DDCONFIG, "z_channels": LATENT_CHANNELS}
    ae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(ddconfig), embed_dim=LATENT_CHANNELS)
    init_tiny_weights_(ae, seed)
    state = {k: v.detach().clone() for k, v in ae.state_dict().items()}
    vae = comfy.sd.VAE(sd=state, config={"params": {"ddconfig": ddconfig, "embed_dim": LATENT_CHANNELS}})
    # VAE(config=...) leaves latent_channels at SD's 4; ComfyUI's tiled encoding (its fallback when
    # memory is short) allocates that many output channels.
    vae.latent_channels = LATENT_CHANNELS
    return vae


# family name -> (model builder(seed=...), clip builder(embedding_directory, seed=...))
TINY_FAMILIES = {
    "sd15": (tiny_sd15_model, tiny_sd1_clip),
    "sd2": (tiny_sd2_model, tiny_sd2_clip),
    "sdxl": (tiny_sdxl_model, tiny_sdxl_clip),
    "sd3": (tiny_sd3_model, tiny_sd3_clip),
    "flux": (tiny_flux_model, tiny_flux_clip),
}
# family name -> VAE builder(seed=...) where it is not `tiny_vae`: the rectified-flow families' 16 channels.
TINY_VAES = {"sd3": tiny_flow_vae, "flux": tiny_flow_vae}
# (pattern in a checkpoint's file name, family), first match wins: which tiny family stands in for a real
# checkpoint a shipped workflow names. Names matching none are SD1.5's.
CHECKPOINT_FAMILIES = [(r"flux", "flux"), (r"sd3|stable[-_ ]?diffusion[-_ ]?3", "sd3")]


def checkpoint_family(ckpt_name: str) -> str:
    """Return the tiny family that stands in for the checkpoint file `ckpt_name` ("sd3", "flux", else "sd15")."""
    name = Path(ckpt_name).name.lower()
    return next((family for pattern, family in CHECKPOINT_FAMILIES if re.search(pattern, name)), "sd15")


def write_tiny_checkpoint_file(path: str | Path, seed: int = 0, family: str = "sd15") -> Path:
    """Write a placeholder `.safetensors` file whose metadata marks it as a tiny checkpoint of
    `family` (a key of TINY_FAMILIES; see `tiny_checkpoint`). It holds no real weights (one dummy
    tensor); `TinyCheckpointPatch` recognises it. Markers without a family (older files) are sd15."""
    import safetensors.torch

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny checkpoint family {family!r} (known: {', '.join(TINY_FAMILIES)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"comfyui_vct_tiny_placeholder": torch.zeros(1)}, str(path),
                                metadata={TINY_CKPT_METADATA_KEY: json.dumps({"seed": seed, "family": family})})
    return path


def read_tiny_checkpoint_marker(path: str | Path) -> dict | None:
    """The marker dict of a placeholder written by `write_tiny_checkpoint_file`, else None."""
    path = str(path)
    if not path.endswith(".safetensors"):
        return None
    try:
        import safetensors

        with safetensors.safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return None
    raw = meta.get(TINY_CKPT_METADATA_KEY)
    return json.loads(raw) if raw is not None else None


class TinyCheckpointPatch:
    """Replacement for `comfy.sd.load_checkpoint_guess_config` that returns freshly built tiny
    models (model, clip, vae, None) for placeholder files and calls the original otherwise.

    Why patch this function (and not the node, nor add a test-only node): every ComfyUI
    checkpoint loader node (CheckpointLoaderSimple, CheckpointLoader, ...) ends in it, so the
    real node code still runs - combo validation against `folder_paths.get_filename_list(
    "checkpoints")` (the placeholder file must exist there), `get_full_path_or_raise`, and the real
    `embedding_directory` argument - and shipped workflows run unchanged once a placeholder
    file with their checkpoint's name exists. The models are built on every call, inside
    whatever mode the executor is in (`torch.inference_mode()`), exactly like real loading, so
    nodes meet inference-tensor parameters as they would in production. Install it with pytest's
    `monkeypatch` (fixture `tiny_checkpoint` in conftest.py) so it is undone after each test.
    """

    def __init__(self, original, loaders: dict | None = None):
        """`loaders` maps further marker families to `fn(path, marker, embedding_directory, output_model,
        output_clip, output_vae) -> (model, clip, vae)` (e.g. the trained toy world's checkpoint)."""
        self.original = original
        self.loaders = dict(loaders or {})
        self.calls: list[dict] = []

    def __call__(self, ckpt_path, output_vae=True, output_clip=True, output_clipvision=False,
                 embedding_directory=None, output_model=True, model_options={}, te_model_options={}):  # noqa: B006
        marker = read_tiny_checkpoint_marker(ckpt_path)
        if marker is None:
            return self.original(ckpt_path, output_vae=output_vae, output_clip=output_clip,
                                 output_clipvision=output_clipvision, embedding_directory=embedding_directory,
                                 output_model=output_model, model_options=model_options,
                                 te_model_options=te_model_options)
        family = marker.get("family", "sd15")
        self.calls.append({"ckpt_path": str(ckpt_path), "embedding_directory": embedding_directory,
                           "inference_mode": torch.is_inference_mode_enabled(), "family": family})
        if family in self.loaders:
            model, clip, vae = self.loaders[family](ckpt_path, marker, embedding_directory, output_model,
                                                    output_clip, output_vae)
            return model, clip, vae, None
        model, clip, vae = tiny_checkpoint(seed=int(marker.get("seed", 0)), embedding_directory=embedding_directory,
                                           output_model=output_model, output_clip=output_clip, output_vae=output_vae,
                                           family=family)
        return model, clip, vae, None
