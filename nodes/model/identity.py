"""What a model is: its family and architecture, a fingerprint of its weights, its schedule and prediction type."""
from __future__ import annotations

import hashlib

import comfy.model_base
import comfy.model_sampling
import torch

from ... import vct_ops
from .. import arch
from ..payloads import InversionData


def check_family(model, node: str) -> str:
    """Return the family name, or raise a ValueError naming it and the supported ones."""
    arch.for_model(model, node)
    return arch.family_name(model)


def model_fingerprint(model) -> str:
    """Return a hash of the model's base weights (sampled) and its weight patches (LoRA etc.).

    Independent of load state: where ComfyUI has applied patches in place, the saved originals
    (`backup`) are hashed, and the patches are hashed from their own strengths and tensors.
    """
    digest = hashlib.sha256(arch.family_name(model).encode())
    params = list(model.model.diffusion_model.named_parameters())
    backup = getattr(model, "backup", {})
    for name, p in params[:: max(1, len(params) // 16)]:
        saved = backup.get(f"diffusion_model.{name}")
        tensor = saved.weight if saved is not None else p
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(_sample(tensor))
    for key in sorted(model.patches):
        digest.update(key.encode())
        for entry in model.patches[key]:
            digest.update(str((entry[0], entry[2])).encode())  # patch and model strengths
            digest.update(_sample(_first_tensor(entry[1])))
    return digest.hexdigest()[:16]


def _sample(tensor) -> bytes:
    if tensor is None:
        return b""
    return tensor.detach().flatten()[:64].to(device="cpu", dtype=torch.float32).numpy().tobytes()


def _first_tensor(value):
    if torch.is_tensor(value):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return getattr(value, "weights", None) and _first_tensor(value.weights)


def check_matches_model(inversion, model, node: str) -> None:
    """Raise ValueError when the inversion is not an inversion, or was made with another model (or other patches)."""
    if not isinstance(inversion, InversionData):
        raise ValueError(f"{node}: 'inversion' must come from VCT DDIM Invert or VCT Load Inversion")
    if inversion.model_fingerprint != model_fingerprint(model):
        raise ValueError(
            f"{node}: the {inversion.describe()} was made with another model (or the same model with other "
            "LoRAs/patches). Connect the model that made it, or run VCT DDIM Invert again with this one."
        )


def train_sigmas(model) -> torch.Tensor:
    """Return the sigma of every training timestep of the model's sampling schedule (float32, CPU)."""
    sigmas = model.get_model_object("model_sampling").sigmas
    return sigmas.detach().to(device="cpu", dtype=torch.float32)


def prediction_type(model) -> str:
    """Return 'eps', 'v' or 'flow' for the kernel's concept loss."""
    kind = model.model.model_type
    if kind == comfy.model_base.ModelType.EPS:
        return "eps"
    if kind == comfy.model_base.ModelType.V_PREDICTION:
        return "v"
    if state_space(model).flow:
        return "flow"
    raise ValueError(f"VCT supports eps-, v-prediction and rectified-flow models; this model predicts {kind.name}")


def state_space(model) -> vct_ops.StateSpace:
    """Return the kernel's state space: FLOW for ComfyUI's CONST model sampling (SD3, Flux), else DIFFUSION."""
    sampling = model.get_model_object("model_sampling")
    return vct_ops.FLOW if isinstance(sampling, comfy.model_sampling.CONST) else vct_ops.DIFFUSION


def check_reference(reference, inversion, model, node: str) -> None:
    """Raise ValueError unless `reference` is an inversion by this model on the source inversion's schedule and size."""
    if not isinstance(reference, InversionData):
        raise ValueError(f"{node}: 'reference' must come from VCT DDIM Invert (run on the reference image)")
    if reference.model_fingerprint != model_fingerprint(model):
        raise ValueError(
            f"{node}: the reference's {reference.describe()} was made with another model (or other LoRAs/patches); "
            "invert the reference with the model connected here"
        )
    if reference.steps != inversion.steps or not torch.allclose(reference.sigmas, inversion.sigmas):
        raise ValueError(
            f"{node}: the reference was inverted in {reference.steps} steps but the source in {inversion.steps}; "
            "give VCT DDIM Invert the same steps for both images"
        )
    if reference.trajectory.shape != inversion.trajectory.shape:
        raise ValueError(
            f"{node}: the reference's latent is {tuple(reference.trajectory.shape[1:])} but the source's is "
            f"{tuple(inversion.trajectory.shape[1:])}; scale or crop the reference image to the source's size "
            "(and batch) before VAEEncode"
        )
