"""A tiny SD1.5 ControlNet from ComfyUI's own classes, and placeholder files that ControlNetLoader loads as it
(the companion of comfy_tiny's tiny checkpoints)."""
from __future__ import annotations

import json
from pathlib import Path

import comfy.model_management  # noqa: E402  (comfy_tiny bootstrapped ComfyUI)
import torch

from .comfy_tiny import init_tiny_weights_, tiny_sd15_unet_config
from .comfy_tiny_checkpoint import TINY_CKPT_METADATA_KEY, read_tiny_checkpoint_marker


def tiny_sd15_controlnet(seed: int = 21) -> "comfy.controlnet.ControlNet":
    """A `comfy.controlnet.ControlNet` for `tiny_sd15_model()`, built as `load_controlnet_state_dict` builds
    an SD1.5 ControlNet: `comfy.cldm.cldm.ControlNet(**unet_config)` without `out_channels`, with a
    3-channel hint at pixel resolution (8x the latent). Its zero convolutions get random weights
    too, so the control visibly changes the UNet's output."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = tiny_sd15_unet_config()
    config.pop("out_channels")
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                  device=torch.device("cpu"))
    control_model = comfy.cldm.cldm.ControlNet(**config)
    init_tiny_weights_(control_model, seed)
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device(),
                                       manual_cast_dtype=None)


def write_tiny_controlnet_file(path: str | Path) -> Path:
    """Write a placeholder `.safetensors` file that `TinyControlNetPatch` loads as `tiny_sd15_controlnet()`."""
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"comfyui_vct_tiny_placeholder": torch.zeros(1)}, str(path),
                                metadata={TINY_CKPT_METADATA_KEY: json.dumps({"family": "controlnet"})})
    return path


class TinyControlNetPatch:
    """Replacement for `comfy.controlnet.load_controlnet` that returns `tiny_sd15_controlnet()` for
    placeholder files (`write_tiny_controlnet_file`) and calls the original otherwise, so
    ControlNetLoader's real code (combo validation, path lookup) runs in shipped workflows."""

    def __init__(self, original) -> None:
        self.original = original
        self.calls = 0

    def __call__(self, ckpt_path, model=None, model_options={}):  # noqa: B006 - ComfyUI's signature
        marker = read_tiny_checkpoint_marker(ckpt_path)
        if marker is None or marker.get("family") != "controlnet":
            return self.original(ckpt_path, model=model, model_options=model_options)
        self.calls += 1
        return tiny_sd15_controlnet()
