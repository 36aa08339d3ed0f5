"""Placeholder checkpoint files that ComfyUI's own checkpoint loaders turn into the tiny models of
comfy_tiny.py, so the real loader nodes and shipped workflows run on them:

- `tiny_checkpoint(seed, ..., family="sd15") -> (model, clip, vae)`, as a checkpoint loader returns them;
- `write_tiny_checkpoint_file(path, seed, family="sd15")` writes a placeholder marked with its family
  ("sd15", "sd2" or "sdxl"); `read_tiny_checkpoint_marker(path)` reads the mark back;
- `TinyCheckpointPatch` replaces `comfy.sd.load_checkpoint_guess_config` (see the class doc).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .comfy_tiny import (
    tiny_sd1_clip,
    tiny_sd2_clip,
    tiny_sd2_model,
    tiny_sd15_model,
    tiny_sdxl_clip,
    tiny_sdxl_model,
    tiny_vae,
)

# Marker stored in the safetensors metadata of placeholder checkpoint files.
TINY_CKPT_METADATA_KEY = "comfyui_vct_tiny"


def tiny_checkpoint(seed: int = 0, embedding_directory=None, output_model: bool = True,
                    output_clip: bool = True, output_vae: bool = True, family: str = "sd15"):
    """(model, clip, vae) as a checkpoint loader returns them (None where not requested).
    `family`: "sd15" (tiny_sd15_model + tiny_sd1_clip), "sd2" (tiny_sd2_model, v-prediction, +
    tiny_sd2_clip) or "sdxl" (tiny_sdxl_model + tiny_sdxl_clip); the VAE is `tiny_vae` for all."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny checkpoint family {family!r} (known: {', '.join(TINY_FAMILIES)})")
    make_model, make_clip = TINY_FAMILIES[family]
    model = make_model(seed=seed) if output_model else None
    clip = make_clip(embedding_directory, seed=seed + 1) if output_clip else None
    vae = tiny_vae(seed=seed + 2) if output_vae else None
    return model, clip, vae


# family name -> (model builder(seed=...), clip builder(embedding_directory, seed=...))
TINY_FAMILIES = {
    "sd15": (tiny_sd15_model, tiny_sd1_clip),
    "sd2": (tiny_sd2_model, tiny_sd2_clip),
    "sdxl": (tiny_sdxl_model, tiny_sdxl_clip),
}


def write_tiny_checkpoint_file(path: str | Path, seed: int = 0, family: str = "sd15") -> Path:
    """Write a placeholder `.safetensors` file whose metadata marks it as a tiny checkpoint of
    `family` ("sd15", "sd2" or "sdxl"; see `tiny_checkpoint`). It holds no real weights (one dummy
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
