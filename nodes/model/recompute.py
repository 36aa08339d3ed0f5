"""Recomputing a network's blocks in backward instead of keeping their activations (low-memory training).

Which blocks are recomputed is the architecture's choice (`Architecture.recompute_types`)."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.utils.checkpoint

from .. import arch


class RecomputedForward:
    """A block's forward that keeps no activations for backward and recomputes them instead.

    Installed as an object patch on the block's `forward` attribute rather than by wrapping the
    block in another module, so every weight keeps its module path: LoRA and other weight patches
    are attached by path, and a wrapper module would hide the block's weights from them.
    """

    def __init__(self, block: torch.nn.Module) -> None:
        """Recompute `block` (a ComfyUI BasicTransformerBlock or ResBlock)."""
        self.block = block

    def __call__(self, *args, **kwargs):
        """Return the block's output; under autograd its inner activations are recomputed in backward."""
        # The class's forward, never another clone's patch that may still be on the instance.
        forward = type(self.block).forward
        if not torch.is_grad_enabled():
            return forward(self.block, *args, **kwargs)
        # The UNet rewrites keys such as "block" in transformer_options as it goes; the
        # recomputation in backward must see them as they are now, so dicts are snapshotted.
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(forward, self.block, *args, use_reentrant=False, **kwargs)


def checkpoint_patches(module: torch.nn.Module, prefix: str, types: tuple[type, ...]) -> Iterator[tuple]:
    """Yield (attribute path, recomputing forward) for every block of one of `types` under `module`."""
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        if isinstance(child, types):
            yield f"{name}.forward", RecomputedForward(child)
        else:
            yield from checkpoint_patches(child, f"{name}.", types)


def checkpointed_clone(model):
    """Return a clone of `model` whose blocks (the architecture's choice) recompute their activations in backward."""
    clone = model.clone()
    types = arch.for_model(model).recompute_types()
    for name, forward in checkpoint_patches(model.model.diffusion_model, "diffusion_model.", types):
        clone.add_object_patch(name, forward)
    return clone
