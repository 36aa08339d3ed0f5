"""What the nodes take in, as the model needs it: CONDITIONING through the model's own extra_conds, LATENTs in
its working scale, the conditioning options VCT refuses by name, and a branch's prompt read once
(`BranchConditioning`)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import torch

from ...vct_ops.validate import check_latent
from .. import arch, tokens

# Conditioning options VCT refuses (never ignores), with the node that sets each, so the error says
# what to remove. A ControlNet is applied where a node allows it (the sampler's concept).
REFUSED_CONDITIONING = {
    "area": "ConditioningSetArea",
    "mask": "ConditioningSetMask",
    "start_percent": "ConditioningSetTimestepRange",
    "end_percent": "ConditioningSetTimestepRange",
    "hooks": "conditioning hooks (Cond Set Props / Set CLIP Hooks)",
    "gligen": "GLIGENTextBoxApply",
    "control": "Apply ControlNet",
}


def check_conditioning_options(extra: dict, name: str, allow: tuple = ()) -> None:
    """Raise a ValueError naming the node to remove when a conditioning carries options VCT does not apply."""
    refused = [key for key in REFUSED_CONDITIONING if extra.get(key) is not None and key not in allow]
    if not refused:
        return
    nodes = ", ".join(dict.fromkeys(REFUSED_CONDITIONING[key] for key in refused))
    hint = ""
    if "control" in refused:
        hint = (" A ControlNet goes on the source prompt given to VCT DDIM Invert (it then acts on the "
                "reconstruction B*) or on the concept given to VCT Dual-Branch Sampler (it acts on the translation B).")
    raise ValueError(f"{name} carries {nodes}, which VCT does not apply here; remove it from this conditioning.{hint}")


def model_cond(model, conditioning, name: str, latent_shape, prompt_type: str = "positive", detach: bool = True,
               allow: tuple = ()) -> dict:
    """Return what the model takes for one CONDITIONING: `c_crossattn`, plus `y` for SDXL.

    Built with the model's own `extra_conds`, as ComfyUI's samplers do (pooled output and size
    conditioning included), so every family is conditioned exactly as in a KSampler.
    """
    if not isinstance(conditioning, list) or len(conditioning) == 0:
        raise ValueError(f"{name} is empty; connect a CLIPTextEncode (an empty prompt is the paper's choice)")
    if len(conditioning) > 1:
        raise ValueError(
            f"{name} holds {len(conditioning)} combined conditionings; VCT needs a single prompt "
            "(remove ConditioningCombine/Concat before this node)"
        )
    tensor, extra = conditioning[0][0], conditioning[0][1]
    check_conditioning_options(extra, name, allow)
    if not torch.is_tensor(tensor) or tensor.dim() != 3:
        raise ValueError(f"{name} must be a [batch, tokens, width] text conditioning")
    check_conditioning_width(model, tensor, name)
    params = dict(extra)
    params.update(cross_attn=tensor, device=tensor.device, noise=torch.zeros(latent_shape))
    params.setdefault("width", latent_shape[-1] * 8)
    params.setdefault("height", latent_shape[-2] * 8)
    params.setdefault("prompt_type", prompt_type)
    if model.model.adm_channels and params.get("pooled_output") is None:
        raise ValueError(
            f"{name} has no pooled output, which this {arch.family_name(model)} model needs; use CLIPTextEncode"
        )
    out = model.model.extra_conds(**params)
    unsupported = sorted(set(out) - set(arch.for_model(model).condition_keys))
    if unsupported:
        raise ValueError(f"{name}: VCT does not support conditioning with {', '.join(unsupported)} (e.g. inpainting)")
    if not detach:  # gradients flow through (concept learning)
        return {key: value.cond.float() for key, value in out.items()}
    return {key: value.cond.detach().float().cpu() for key, value in out.items()}


def differentiable_model_cond(model, name: str, latent_shape, device) -> Callable[[list], dict]:
    """Return a function from a CONDITIONING to what the model takes on `device`, keeping gradients."""

    def convert(conditioning: list) -> dict:
        conds = model_cond(model, conditioning, name, latent_shape, detach=False)
        return {key: value.to(device) for key, value in conds.items()}

    return convert


def context_width(model) -> Optional[int]:
    """Return the text-conditioning width the model expects, when its config says."""
    return arch.for_model(model).context_width(model)


def check_conditioning_width(model, tensor: torch.Tensor, name: str) -> None:
    """Raise ValueError when a conditioning is not as wide as the model's cross-attention."""
    width = context_width(model)
    if width is not None and tensor.shape[-1] != width:
        raise ValueError(
            f"{name} is {tensor.shape[-1]} wide but this model's cross-attention takes {width}: "
            "it was encoded by another model's text encoder; encode it with this checkpoint's CLIP"
        )


def latent_in(model, latent: dict, name: str) -> torch.Tensor:
    """Return the LATENT's samples in the model's working scale (ComfyUI's process_latent_in), float32."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if samples is None:
        raise ValueError(f"{name} must be a LATENT (connect a VAEEncode)")
    check_latent(name, samples)
    expected = model.model.latent_format.latent_channels
    if samples.shape[1] != expected:
        raise ValueError(
            f"{name} has {samples.shape[1]} channels but this model's latents have {expected}; "
            "encode the image with this checkpoint's VAE"
        )
    return model.model.process_latent_in(samples.float())


def latent_out(model, z: torch.Tensor) -> dict:
    """Return a LATENT dict from a latent in the model's working scale."""
    return {"samples": model.model.process_latent_out(z.float()).to(comfy.model_management.intermediate_device())}


@dataclasses.dataclass(frozen=True)
class BranchConditioning:
    """One branch's prompt, read once: the model's tensors, the recorded token layout, its ControlNet, the raw input."""

    conditioning: list  # the CONDITIONING as connected
    model_cond: dict  # what the model takes (CPU, float32)
    layout: Optional[list]  # token ids from start to end token, when a VCT prompt node recorded them
    control: Optional[object]  # a ControlNet / T2I-Adapter applied to this prompt

    @classmethod
    def read(cls, model, conditioning, name: str, latent_shape) -> "BranchConditioning":
        """Return the branch's prompt, with a ControlNet allowed on it; raise on anything VCT cannot apply."""
        architecture = arch.for_model(model)
        options = conditioning[0][1]
        if options.get("control") is not None and not architecture.controlnet:
            raise ValueError(f"{name} carries a ControlNet, which VCT does not yet apply on {arch.family_name(model)} "
                             "models; remove Apply ControlNet from this conditioning")
        cond = model_cond(model, conditioning, name, latent_shape, allow=("control",))
        return cls(conditioning, cond, options.get(tokens.LAYOUT_KEY), options.get("control"))

    @property
    def tokens(self) -> int:
        """Return the number of token positions of the text conditioning."""
        return self.model_cond["c_crossattn"].shape[1]

    def sampler_conds(self, model, latent_shape, device, prompt_type: str = "positive") -> list:
        """Return the prompt in ComfyUI's sampler format (what CFG hooks get as `cond`), built by the model."""
        return comfy.samplers.encode_model_conds(model.model.extra_conds,
                                                 comfy.sampler_helpers.convert_cond(self.conditioning),
                                                 torch.zeros(latent_shape), device, prompt_type)
