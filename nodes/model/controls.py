"""ComfyUI ControlNets and T2I-Adapters inside VCT's own model calls: preparation and per-branch residuals."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

# A `Denoiser.controls` key: the control acts on every row of every call (single-branch kernels:
# DDIM inversion and null-text inversion of a source prompt that carries a ControlNet).
ALL_ROWS = "all"


def control_chain(control) -> list:
    """Return a ComfyUI control and the ones chained before it (Apply ControlNet applied twice)."""
    chain = []
    while control is not None:
        chain.append(control)
        control = getattr(control, "previous_controlnet", None)
    return chain


@contextlib.contextmanager
def controls_ready(model, controls) -> Iterator[list]:
    """Prepare ControlNets for `model`'s schedule (start/end percent) as ComfyUI's samplers do; yield their models.

    They are cleaned up on exit (cached hints dropped), as after a KSampler run.
    """
    sampling = model.model.model_sampling
    prepared = []
    try:
        for control in (c for c in controls if c is not None):
            prepared.append(control)
            control.pre_run(model.model, lambda percent: sampling.percent_to_sigma(percent))
        yield [m for control in prepared for m in control.get_models()]
    finally:
        for control in prepared:
            control.cleanup()


class OutOfPlaceResidual(torch.Tensor):
    """A control residual that the UNet adds out of place.

    ComfyUI's UNet adds control residuals with `h += ctrl`; under autograd that in-place add
    overwrites activations a later layer kept for backward (the skip connections). With this
    type, `h += ctrl` makes a new tensor instead, and every other use behaves as a plain tensor.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """Run `func` on plain tensors, turning in-place additions into out-of-place ones."""
        kwargs = kwargs or {}
        plain = [a.as_subclass(torch.Tensor) if isinstance(a, cls) else a for a in args]
        if func in (torch.Tensor.__iadd__, torch.Tensor.add_):
            return torch.add(*plain, **kwargs)
        return func(*plain, **kwargs)


def scatter_residuals(part: dict, rows: list[int], batch: int, merged: Optional[dict]) -> dict:
    """Return `merged` plus the control residuals `part` (computed on `rows`) placed in a zero batch of `batch` rows."""
    out = merged if merged is not None else {}
    for key, values in part.items():
        target = out.setdefault(key, [])
        for i, value in enumerate(values):
            if i >= len(target):
                target.append(None)
            if value is None:
                continue
            full = value.new_zeros((batch, *value.shape[1:]))
            full[rows] = value
            target[i] = full if target[i] is None else target[i] + full
    return out
