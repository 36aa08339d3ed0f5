"""How VCT calls a model: a ModelPatcher as the kernel layer's denoiser callable.

Rows are tagged by role and branch (the sampler's four row groups); the options ComfyUI's own
samplers give other packs' patches are filled in; a ControlNet acts on its branch's rows only; rows
are split when memory is short.
"""
from __future__ import annotations

import uuid
from typing import Optional

import comfy.model_management
import torch

from ...vct_ops import BRANCHES_KEY, LATENT_SHAPE_KEY, ROLE_UNCOND, ROLES_KEY
from .. import arch, compat
from .controls import ALL_ROWS, OutOfPlaceResidual, scatter_residuals


class Denoiser:
    """A ModelPatcher as the kernel's denoiser: `(x, sigma, cond, transformer_options) -> denoised`.

    `cond` is the dict `model_cond` returns (`c_crossattn`, and `y` for SDXL).
    """

    def __init__(self, model, gradients: bool = False, sample_sigmas: Optional[torch.Tensor] = None,
                 controls: Optional[dict] = None) -> None:
        """Wrap `model` (already loaded on its device); with `gradients`, attention runs a path that backpropagates.

        `controls` maps a branch (vct_ops.ROLE_MAIN / ROLE_REF, or ALL_ROWS) to a ComfyUI
        ControlNet or T2I-Adapter (already pre-run, or None for none) that acts on that branch's rows only.
        """
        self.model = model
        self.controls = {branch: net for branch, net in (controls or {}).items() if net is not None}
        self.device = model.load_device
        self.base_options = model.model_options.get("transformer_options", {})
        self.wrapper = model.model_options.get("model_function_wrapper")
        # Under gradients, attention takes a path known to backpropagate (the architecture's choice).
        self.attention_override = arch.for_model(model).gradient_attention if gradients else None
        self.sample_sigmas = sample_sigmas
        # Stable ids for the conditional and unconditional inputs, as ComfyUI's samplers give
        # other packs' patches (e.g. caches keyed by cond).
        self.uuids = {0: uuid.uuid4(), 1: uuid.uuid4()}
        self.calls = 0

    def __call__(self, x, sigma, cond, transformer_options=None):
        """Return the model's denoised estimate for rows `x` at `sigma` under the conditioning dict `cond`."""
        options = dict(self.base_options)
        if transformer_options:
            options.update(transformer_options)
        if self.attention_override is not None:
            options["optimized_attention_override"] = self.attention_override
        x, sigma = x.to(self.device), sigma.to(self.device)
        cond = {key: value.to(self.device) for key, value in cond.items()}
        roles = options.get(ROLES_KEY)
        if roles is not None and not self.fits(x):
            # Too little memory for all rows at once: run the unconditional rows apart from the
            # conditional ones, which attention control needs together (B* and B in one call).
            uncond = [i for i, r in enumerate(roles) if r == ROLE_UNCOND]
            rest = [i for i, r in enumerate(roles) if r != ROLE_UNCOND]
            out = torch.empty_like(x)
            for rows in (uncond, rest):
                if rows:
                    part = dict(options)
                    part[ROLES_KEY] = [roles[i] for i in rows]
                    if options.get(BRANCHES_KEY) is not None:
                        part[BRANCHES_KEY] = [options[BRANCHES_KEY][i] for i in rows]
                    part["sigmas"] = sigma[rows]
                    part_cond = {key: value[rows] for key, value in cond.items()}
                    out[rows] = self._call(x[rows], sigma[rows], part_cond, part).to(out.dtype)
            return out
        return self._call(x, sigma, cond, options)

    def fits(self, x: torch.Tensor) -> bool:
        """Return whether one model call on all rows of `x` fits in the device's free memory."""
        needed = self.model.model.memory_required(list(x.shape))
        return needed * 1.5 < compat.free_memory(self.model, self.device)

    def _call(self, x, sigma, cond, options):
        # The keys ComfyUI's samplers always give other packs' patches (Deep Shrink reads sigmas,
        # SAG cond_or_uncond, caches uuids, hooks sample_sigmas).
        roles = options.get(ROLES_KEY)
        if roles is not None:
            options["cond_or_uncond"] = _cond_or_uncond(roles, options.get(BRANCHES_KEY))
        else:
            options.setdefault("cond_or_uncond", [0] * x.shape[0])
        options.setdefault("sigmas", sigma)
        options["uuids"] = [self.uuids[c] for c in options["cond_or_uncond"]]
        # Joint-attention models do not tell their attention the latent's size; the glue needs it.
        options[LATENT_SHAPE_KEY] = list(x.shape)
        if self.sample_sigmas is not None:
            options.setdefault("sample_sigmas", self.sample_sigmas)
        self.calls += 1
        control = self._control(x, sigma, cond, options)
        if control is not None:
            cond = {**cond, "control": control}
        if self.wrapper is not None:
            return self.wrapper(
                self.model.model.apply_model,
                {"input": x, "timestep": sigma, "c": {**cond, "transformer_options": options},
                 "cond_or_uncond": options.get("cond_or_uncond", [0] * x.shape[0])},
            )
        return self.model.model.apply_model(x, sigma, transformer_options=options, **cond)

    def _control(self, x, sigma, cond, options) -> Optional[dict]:
        """Return the UNet's control residuals for this call: each branch's control on its own rows, zero elsewhere.

        Zero rows leave the other branch exactly as without control (adding 0 changes nothing), and
        all rows still go through one model call.
        """
        if not self.controls:
            return None
        branches = options.get(BRANCHES_KEY) or [ALL_ROWS] * x.shape[0]
        merged: Optional[dict] = None
        for branch, net in self.controls.items():
            rows = [i for i, b in enumerate(branches) if b == branch or branch == ALL_ROWS]
            if not rows:
                continue
            # ComfyUI's "batched_number": how many cond/uncond chunks these rows hold (the hint is
            # repeated per chunk).
            roles = options.get(ROLES_KEY)
            chunks = len({roles[i] == ROLE_UNCOND for i in rows}) if roles is not None else 1
            part = net.get_control(x[rows], sigma[rows], {k: v[rows] for k, v in cond.items()}, chunks,
                                       options)
            if part is not None:
                merged = scatter_residuals(part, rows, x.shape[0], merged)
        if merged is not None and self.attention_override is not None and torch.is_grad_enabled():
            merged = {key: [v.as_subclass(OutOfPlaceResidual) if torch.is_tensor(v) else v for v in values]
                      for key, values in merged.items()}
        return merged


def _cond_or_uncond(roles: list, branches: Optional[list]) -> list[int]:
    """Return ComfyUI's `cond_or_uncond` for tagged rows: 1 or 0 per chunk of equal-sized consecutive rows.

    ComfyUI lists one entry per chunk of the batch (patches such as SAG's compute the chunk size as
    rows // entries); the sampler's rows come in four chunks of one branch and kind each. Rows that
    do not form equal chunks get one entry per row.
    """
    keys = list(zip(roles, branches or roles))
    starts = [i for i in range(len(keys)) if i == 0 or keys[i] != keys[i - 1]]
    sizes = {end - start for start, end in zip(starts, starts[1:] + [len(keys)])}
    heads = starts if len(sizes) == 1 else range(len(keys))
    return [1 if roles[i] == ROLE_UNCOND else 0 for i in heads]


def load(model, extra=()) -> None:
    """Load the model (with its weight patches applied), and `extra` patchers such as ControlNets, on their devices."""
    comfy.model_management.load_models_gpu([model] + list(extra))
