"""Backward passes through half-precision models without losing small gradients."""
from __future__ import annotations

from typing import Optional

import torch


class LossScale:
    """Dynamic loss scaling: gradients of a scaled loss are unscaled before the step; steps with
    overflowing gradients are skipped and the scale halved.

    The losses here are small (the null-text early-stop threshold is 1e-5) and a float16 model
    would flush their gradients to zero; a power-of-two scale changes nothing in float32.
    """

    def __init__(self, scale: float = 2.0**14) -> None:
        """Start with `scale` (a power of two)."""
        self.scale = float(scale)

    def backward(self, loss: torch.Tensor, divide: float = 1.0, inputs: Optional[list[torch.Tensor]] = None) -> None:
        """Backpropagate `loss / divide`, scaled; with `inputs`, only into those tensors' gradients.

        With `inputs`, nothing else that requires grad (a model's weights) gets a gradient, and
        autograd does not compute one for it.
        """
        (loss * (self.scale / divide)).backward(inputs=inputs)

    def unscale(self, params: list[torch.Tensor]) -> bool:
        """Return whether the accumulated gradients are finite, after dividing them by the scale.

        On overflow the gradients are cleared and the scale halved, so the caller skips the step.
        """
        grads = [p.grad for p in params if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            for p in params:
                p.grad = None
            self.scale = max(self.scale / 2.0, 1.0)
            return False
        for g in grads:
            g.div_(self.scale)
        return True
