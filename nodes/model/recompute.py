"""Recomputing a network's blocks in backward instead of keeping their activations (low-memory training), and
running blocks that add their residuals in place so that autograd can go through them.

Which blocks are recomputed is the architecture's choice (`Architecture.recompute_types`), and so is
which add residuals in place (`Architecture.inplace_residual_types`: Flux's `txt += ...`)."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.utils.checkpoint

from .. import arch


class OutOfPlaceStream(torch.Tensor):
    """A block input whose in-place additions (`x += ...`) make new tensors, which stay of this type.

    Flux's blocks add their residuals in place; under autograd that overwrites activations a layer
    inside the block kept for backward. Every other operation returns plain tensors.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """Run `func` on plain tensors, turning in-place additions into out-of-place ones of this type."""
        kwargs = kwargs or {}
        plain = [a.as_subclass(torch.Tensor) if isinstance(a, cls) else a for a in args]
        if func in (torch.Tensor.__iadd__, torch.Tensor.add_):
            return torch.add(*plain, **kwargs).as_subclass(cls)
        return func(*plain, **kwargs)


def _streams(value):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.as_subclass(OutOfPlaceStream)
    return value


def _plain(value):
    if isinstance(value, OutOfPlaceStream):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


class RecomputedForward:
    """A block's forward that keeps no activations for backward and recomputes them instead, and/or whose
    in-place residual additions are made out of place (`streams`).

    Installed as an object patch on the block's `forward` attribute rather than by wrapping the
    block in another module, so every weight keeps its module path: LoRA and other weight patches
    are attached by path, and a wrapper module would hide the block's weights from them.
    """

    def __init__(self, block: torch.nn.Module, checkpoint: bool = True, streams: bool = False) -> None:
        """Recompute `block` (e.g. a ComfyUI BasicTransformerBlock or ResBlock) when `checkpoint`; with
        `streams`, run its in-place residual additions out of place."""
        self.block, self.checkpoint, self.streams = block, checkpoint, streams

    def _forward(self, block, *args, **kwargs):
        # The class's forward, never another clone's patch that may still be on the instance.
        forward = type(block).forward
        if self.streams:
            args = tuple(_streams(a) for a in args)
            kwargs = {k: _streams(v) for k, v in kwargs.items()}
            return _plain(forward(block, *args, **kwargs))
        return forward(block, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        """Return the block's output; under autograd its inner activations are recomputed in backward."""
        if not torch.is_grad_enabled():
            return type(self.block).forward(self.block, *args, **kwargs)
        if not self.checkpoint:
            return self._forward(self.block, *args, **kwargs)
        # The UNet rewrites keys such as "block" in transformer_options as it goes; the
        # recomputation in backward must see them as they are now, so dicts are snapshotted.
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(self._forward, self.block, *args, use_reentrant=False, **kwargs)


def checkpoint_patches(module: torch.nn.Module, prefix: str, types: tuple[type, ...],
                       streams: tuple[type, ...] = ()) -> Iterator[tuple]:
    """Yield (attribute path, patched forward) for every block of one of `types` (recomputed) or of `streams`
    (in-place residuals made out of place) under `module`."""
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        if isinstance(child, types + streams):
            yield f"{name}.forward", RecomputedForward(child, isinstance(child, types), isinstance(child, streams))
        else:
            yield from checkpoint_patches(child, f"{name}.", types, streams)


def training_clone(model, recompute: bool):
    """Return a clone of `model` whose blocks recompute their activations in backward (when `recompute`) and run
    in-place residuals out of place (the architecture's choices); `model` itself when nothing needs patching."""
    architecture = arch.for_model(model)
    types = architecture.recompute_types() if recompute else ()
    streams = architecture.inplace_residual_types()
    if not types and not streams:
        return model
    clone = model.clone()
    for name, forward in checkpoint_patches(model.model.diffusion_model, "diffusion_model.", types, streams):
        clone.add_object_patch(name, forward)
    return clone


def checkpointed_clone(model):
    """Return a clone of `model` whose blocks (the architecture's choice) recompute their activations in backward."""
    return training_clone(model, recompute=True)
