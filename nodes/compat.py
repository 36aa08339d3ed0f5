"""Everything that differs between the ComfyUI versions the pack supports, decided by feature detection.

Supported: ComfyUI 0.3.64 (the pinned test host) through 0.38.x. What differs, and where it is
handled here:
- Dynamic VRAM (0.38.x on NVIDIA by default): a patcher's `is_dynamic()` is true, its weights stay
  in system memory and every layer casts them per call into device buffers that later layers
  reuse. Autograd would keep views of those buffers for backward and read what a later layer
  wrote there (wrong gradients, silently); partially loaded models on 0.38.x cast into shared
  per-stream buffers too -> `gradient_safe_model`, `gradient_safe_clip`.
- Free memory: 0.38.x's `ModelPatcher.get_free_memory(device)` also counts what Dynamic VRAM can
  evict on demand, which `comfy.model_management.get_free_memory` does not -> `free_memory`.
- `comfy.model_management.in_training` (0.38.x) selects differentiable kernels -> `training_kernels`.

What differs for the headless runner (the executor's `cache_args`, PromptServer's asset manager,
config files) lives with the runner in tools/.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import comfy.model_management
import torch


def is_dynamic(patcher) -> bool:
    """Return whether a ModelPatcher loads its weights with Dynamic VRAM (cast per call, never resident)."""
    check = getattr(patcher, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def free_memory(patcher, device) -> int:
    """Return the bytes a model call on `device` can use, counting what Dynamic VRAM would free on demand."""
    own = getattr(patcher, "get_free_memory", None)
    if callable(own):
        return own(device)
    return comfy.model_management.get_free_memory(device)


def offloads_weights(patcher) -> bool:
    """Return whether the loaded patcher casts some weights to the device per call instead of holding them there."""
    return is_dynamic(patcher) or bool(getattr(patcher.model, "model_lowvram", False))


def _own_copy_under_autograd(tensor: torch.Tensor) -> torch.Tensor:
    # A weight function runs on every per-call cast. Under autograd the layer saves its weight
    # for backward; a private copy cannot be overwritten by the next layer's cast.
    return tensor.clone() if torch.is_grad_enabled() else tensor


def _cast_weight_keys(module: torch.nn.Module) -> Iterator[str]:
    """Yield the state keys of the weights that ComfyUI's ops may cast per call.

    Biases are left alone: linear, convolution and norm layers never keep them for backward.
    """
    for name, child in module.named_modules():
        if hasattr(child, "comfy_cast_weights") and getattr(child, "weight", None) is not None:
            yield f"{name}.weight" if name else "weight"


def with_private_casts(patcher):
    """Return a clone of `patcher` whose per-call weight casts give autograd a private copy under gradients."""
    clone = patcher.clone()
    for key in _cast_weight_keys(patcher.model):
        clone.add_weight_wrapper(key, _own_copy_under_autograd)
    return clone


def has_private_casts(patcher) -> bool:
    """Return whether `patcher` already gives autograd private copies of its weight casts."""
    wrappers = getattr(patcher, "weight_wrapper_patches", {})
    return any(_own_copy_under_autograd in functions for functions in wrappers.values())


def gradient_safe_model(model):
    """Return `model`, or when its weights are cast per call (Dynamic VRAM, partial loads) a clone whose casts
    autograd can keep."""
    if not offloads_weights(model) or has_private_casts(model):
        return model
    return with_private_casts(model)


def gradient_safe_clip(clip):
    """Return `clip`, or when its text encoder is cast per call a CLIP clone whose casts autograd can keep."""
    patcher = gradient_safe_model(clip.patcher)
    if patcher is clip.patcher:
        return clip
    clone = clip.clone()
    clone.patcher = patcher
    return clone


@contextlib.contextmanager
def training_kernels() -> Iterator[None]:
    """Within, ComfyUI (0.38.x) picks differentiable kernels over inference-only fused ones; a no-op before."""
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = previous
