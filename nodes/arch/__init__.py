"""Model architectures behind one seam: `for_model` gives the implementation that serves a model's family.

Two implementations: the SD UNet (sd_unet.py: SD1.x, SD2.x, SDXL) and the joint-attention
transformers (mmdit.py: SD3.x, Flux.1). A new family plugs in as one more `Architecture`
(base.py) listed in ARCHITECTURES; the nodes do not change.
"""
from __future__ import annotations

from .base import Architecture
from .mmdit import JointTransformer
from .sd_unet import SDUNet

ARCHITECTURES: tuple[Architecture, ...] = (SDUNet(), JointTransformer())


def family_name(model) -> str:
    """Return the name of the model's ComfyUI model-config class (e.g. 'SD15', 'SDXL', 'Flux')."""
    return type(model.model.model_config).__name__


def supported_families() -> list[str]:
    """Return the names of every family some architecture serves."""
    return [name for arch in ARCHITECTURES for name in arch.families]


def for_model(model, node: str = "VCT") -> Architecture:
    """Return the architecture that serves the model's family; raise a ValueError naming it and the supported ones."""
    config = type(model.model.model_config)
    for arch in ARCHITECTURES:
        if config in arch.families.values():
            return arch
    raise ValueError(
        f"{node}: the connected model is a {family_name(model)} model; VCT supports "
        f"{', '.join(supported_families())} (Stable Diffusion 1.x, 2.x, SDXL base, SD3.x, Flux.1 dev and schnell) "
        "checkpoints. Load one with CheckpointLoaderSimple (or, for SD3 and Flux, UNETLoader with its CLIP loader)."
    )


def text_encoders_of(clip, node: str) -> list:
    """Return the text encoders of `clip` from the architecture that knows its kind (no model at hand to ask)."""
    errors = []
    for architecture in ARCHITECTURES:
        try:
            return architecture.text_encoders(clip, node)
        except ValueError as error:
            errors.append(error)
    raise errors[0]
