"""B's guidance through the model's CFG hooks (RescaleCFG, PAG, SAG...), as ComfyUI's own sampling runs them."""
from __future__ import annotations

import uuid
from typing import Optional

import comfy.conds
import comfy.samplers

from ... import vct_ops
from .conditioning import BranchConditioning

CFG_HOOKS = ("sampler_pre_cfg_function", "sampler_cfg_function", "sampler_post_cfg_function")


def cfg_hooks(model, concept: BranchConditioning, nulls: list[dict], latent_shape, device
              ) -> Optional[vct_ops.Guidance]:
    """Return B's guidance through the model's CFG hooks, or None when it has none.

    The hooks get the arguments ComfyUI's own sampling gives them: B's cond and uncond denoised
    rows, its input and sigma, the model and its options, and B's conditionings in ComfyUI's
    sampler format (the concept; the step's null embedding as the negative). B* keeps plain CFG:
    its null embeddings were tuned so that plain CFG rebuilds the source, and B borrows its maps.
    """
    options = model.model_options
    if not any(options.get(key) for key in CFG_HOOKS):
        return None
    base = model.model
    positive = concept.sampler_conds(model, latent_shape, device)
    negative_uuid = uuid.uuid4()  # one negative across the steps, as in ComfyUI's sampling (caches key by it)
    negatives = [_negative(null, negative_uuid, device) for null in nulls]

    def guide(x, sigma, cond_pred, uncond_pred, scale, step):
        uncond = negatives[step]
        conds, out = [positive, uncond], [cond_pred, uncond_pred]
        for fn in options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": conds, "conds_out": out, "cond_scale": scale, "timestep": sigma, "input": x,
                      "sigma": sigma, "model": base, "model_options": options})
        return comfy.samplers.cfg_function(base, out[0], out[1], scale, x, sigma, model_options=options,
                                           cond=positive, uncond=uncond)

    return guide


def _negative(null: dict, negative_uuid, device) -> list:
    """Return one step's null embedding as ComfyUI's sampler-format negative."""
    model_conds = {"c_crossattn": comfy.conds.CONDCrossAttn(null["c_crossattn"].to(device))}
    if "y" in null:
        model_conds["y"] = comfy.conds.CONDRegular(null["y"].to(device))
    return [{"cross_attn": null["c_crossattn"], "model_conds": model_conds, "uuid": negative_uuid}]
