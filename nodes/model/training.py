"""How VCT trains through a frozen model: one training session used by both training nodes.

ComfyUI builds models under inference mode, may cast weights per call (Dynamic VRAM, partial
loads) and picks kernels that cannot backpropagate; a training session undoes each of these for its
duration, and recomputes activations in backward when memory is short.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator, Optional

import comfy.utils
import torch

from .. import arch, compat
from . import recompute
from .controls import ALL_ROWS, control_chain, controls_ready
from .denoiser import Denoiser, load

log = logging.getLogger("ComfyUI-VCT")


def training_fits(model, shape) -> bool:
    """Return whether a forward+backward pass on a batch of `shape` likely fits in free device memory.

    ComfyUI's estimate is for inference; a backward pass keeps the activations, so a generous
    factor is applied.
    """
    needed = model.model.memory_required(list(shape))
    return needed * 4 < compat.free_memory(model, model.load_device)


def training_model(model, shape):
    """Return the model to train through: a clone that recomputes activations in backward when a
    forward+backward pass on `shape` would not fit in free memory (and whose in-place residuals run
    out of place where the architecture has them), else `model` itself."""
    fits = training_fits(model, shape)
    if not fits:
        log.info("VCT: too little free memory for a training pass on %s; recomputing activations in backward",
                 tuple(shape))
    return recompute.training_clone(model, recompute=not fits)


def load_for_training(model, clip=None, extra: tuple = ()) -> tuple:
    """Load `model` (and `clip`, and `extra` patchers such as ControlNets) for passes with gradients; return the
    (model, clip) to run them through.

    Where weights are cast to the device per call (Dynamic VRAM, or a model only partly loaded),
    the loaded patchers are clones that give autograd private copies of the casts, so backward
    never reads a buffer that a later layer has reused. A ControlNet's patcher gets the same, as
    gradients to a source prompt's null embeddings pass through it.
    """
    def guarded(model, clip, extra):
        return (compat.gradient_safe_model(model), compat.gradient_safe_clip(clip) if clip is not None else None,
                [compat.gradient_safe_model(p) for p in extra])

    def patchers(clip, extra):
        return ([clip.patcher] if clip is not None else []) + extra

    model, clip, extra = guarded(model, clip, list(extra))
    load(model, patchers(clip, extra))
    # A non-dynamic model shows whether it was only partly loaded once it is loaded.
    safe = guarded(model, clip, extra)
    if safe[0] is not model or safe[1] is not clip or any(a is not b for a, b in zip(safe[2], extra)):
        model, clip, extra = safe
        load(model, patchers(clip, extra))
    return model, clip


def make_autograd_safe(module: torch.nn.Module, device: Optional[torch.device] = None) -> int:
    """Return how many inference-mode parameters/buffers were replaced by ordinary tensors of equal value.

    ComfyUI builds and loads models inside `torch.inference_mode()`; such tensors cannot be saved
    for backward, which gradients through the frozen model need. Values are unchanged. With
    `device`, tensors held elsewhere are left alone: they are cast per call, and `load_for_training`
    gives autograd private copies of those casts (no second copy of an offloaded model in RAM).
    """
    replaced = 0
    with torch.inference_mode(False):
        for name, param in list(module.named_parameters()):
            if param.is_inference() and (device is None or param.device.type == device.type):
                # Its requires_grad flag too, so the shared model's flags are as they were.
                safe = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                comfy.utils.set_attr(module, name, safe)
                replaced += 1
        for name, buf in list(module.named_buffers()):
            if buf.is_inference() and (device is None or buf.device.type == device.type):
                comfy.utils.set_attr(module, name, buf.clone())
                replaced += 1
    return replaced


def make_controls_autograd_safe(control, device: Optional[torch.device] = None) -> None:
    """Replace inference-mode weights of a control chain's networks (gradients flow through their context input).

    With `device`, only tensors held there, as for the UNet: offloaded ones are cast per call into
    private copies by the training load.
    """
    for part in control_chain(control):
        network = getattr(part, "control_model", None)
        if isinstance(network, torch.nn.Module):
            make_autograd_safe(network, device)
            network.requires_grad_(False)


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """Switch off gradients for a module's parameters for the duration, restoring the flags by name after."""
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for name, p in module.named_parameters():
            if flags.get(name) and not p.is_inference():
                p.requires_grad_(True)


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """Enable autograd inside ComfyUI's inference-mode node execution, with ComfyUI's differentiable kernels."""
    with torch.inference_mode(False), torch.enable_grad(), compat.training_kernels():
        yield



@dataclasses.dataclass
class TrainingSession:
    """What a training node runs through: the loaded model (and CLIP), and the source ControlNet if any."""

    model: object
    clip: Optional[object]
    control: Optional[object]

    def denoiser(self, sample_sigmas: Optional[torch.Tensor] = None) -> Denoiser:
        """Return a denoiser whose attention backpropagates, with the session's ControlNet on every row."""
        return Denoiser(self.model, gradients=True, sample_sigmas=sample_sigmas, controls={ALL_ROWS: self.control})


@contextlib.contextmanager
def training_session(model, sample_shape, clip=None, text_modules: tuple = (), control=None
                     ) -> Iterator[TrainingSession]:
    """Within, passes with gradients through a frozen `model` (and `text_modules` of `clip`, and `control`) work.

    One set-up for both training nodes: blocks recompute their activations in backward when a pass on
    `sample_shape` would not fit in free memory; autograd is on inside ComfyUI's inference mode, with
    ComfyUI's differentiable kernels; the models are loaded with private weight casts where they are
    cast per call; inference-mode weights on the load device are made ordinary; every weight is frozen
    for the duration, so gradients reach only what the kernel optimises.
    """
    model = training_model(model, sample_shape)
    with training_mode(), controls_ready(model, [control]) as control_models:
        model, clip = load_for_training(model, clip, extra=tuple(control_models))
        device = model.load_device
        unet = model.model.diffusion_model
        make_autograd_safe(unet, device)
        make_controls_autograd_safe(control, device)  # nothing without a control
        modules = [unet]
        if text_modules:
            text_device = arch.for_model(model).text_device(clip)
            for module in text_modules:
                make_autograd_safe(module, text_device)
            modules += list(text_modules)
        with contextlib.ExitStack() as stack:
            for module in modules:
                stack.enter_context(frozen(module))
            yield TrainingSession(model, clip, control)
