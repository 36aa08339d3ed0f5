"""Conditioning as a small tree of tensors: a tensor, or a dict of tensors.

SD1.x/SD2.x conditioning is one cross-attention tensor; SDXL adds pooled/size vectors. Kernels
treat both alike by mapping over the leaves, so no kernel needs to know a model family.
"""
from __future__ import annotations

from typing import Callable, Mapping, Union

import torch

Cond = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def cond_map(fn: Callable[[torch.Tensor], torch.Tensor], cond: Cond) -> Cond:
    """Return `cond` with `fn` applied to every tensor leaf."""
    if isinstance(cond, torch.Tensor):
        return fn(cond)
    if isinstance(cond, Mapping):
        return {key: fn(value) for key, value in cond.items()}
    raise TypeError(f"conditioning must be a tensor or a dict of tensors, got {type(cond).__name__}")


def cond_leaves(cond: Cond) -> list[torch.Tensor]:
    """Return the tensor leaves of `cond` in a fixed order."""
    if isinstance(cond, torch.Tensor):
        return [cond]
    if isinstance(cond, Mapping):
        return [cond[key] for key in sorted(cond)]
    raise TypeError(f"conditioning must be a tensor or a dict of tensors, got {type(cond).__name__}")


def cond_cat(conds: list[Cond]) -> Cond:
    """Return the conditionings concatenated along the batch dimension."""
    first = conds[0]
    if isinstance(first, torch.Tensor):
        shapes = {tuple(c.shape[1:]) for c in conds}
        if len(shapes) != 1:
            raise ValueError(
                f"conditionings have different shapes {sorted(shapes)}; the source and concept prompts "
                "must encode to the same token length (shorten the longer prompt)"
            )
        return torch.cat(list(conds), dim=0)
    return {key: cond_cat([c[key] for c in conds]) for key in first}


def cond_repeat(cond: Cond, times: int) -> Cond:
    """Return `cond` repeated `times` times along the batch dimension."""
    return cond_map(lambda t: t.repeat(times, *([1] * (t.dim() - 1))), cond)


def cond_detach(cond: Cond) -> Cond:
    """Return a detached clone of `cond`, safe to optimise or store."""
    return cond_map(lambda t: t.detach().clone(), cond)


def cond_batch(cond: Cond) -> int:
    """Return the batch size of `cond`."""
    return cond_leaves(cond)[0].shape[0]


def match_batch(cond: Cond, rows: int) -> Cond:
    """Return `cond` with `rows` rows: itself, or its single row repeated."""
    batch = cond_batch(cond)
    if batch == rows:
        return cond
    if batch == 1:
        return cond_repeat(cond, rows)
    raise ValueError(f"conditioning has batch {batch} but the latent has batch {rows}; use one prompt per image")
