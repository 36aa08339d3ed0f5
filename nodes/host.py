"""The one place that adapts ComfyUI's model objects to the kernel layer's contracts.

Everything here reads ComfyUI objects (a ModelPatcher, CONDITIONING lists, the patch
registry) and hands `vct_ops` plain tensors and callables.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from typing import Callable, Iterator, Optional

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_base
import comfy.model_management
import comfy.supported_models
import comfy.utils
import torch

from ..vct_ops import BRANCHES_KEY, ROLE_UNCOND, ROLES_KEY
from . import compat, control, recompute

log = logging.getLogger("ComfyUI-VCT")

# Model families the nodes accept, by exact ComfyUI model-config class (variants such as unCLIP,
# refiners or distilled SDXLs condition differently and are refused by name).
SUPPORTED_FAMILIES = {
    "SD15": comfy.supported_models.SD15,
    "SD20": comfy.supported_models.SD20,
    "SDXL": comfy.supported_models.SDXL,
}


def family_name(model) -> str:
    """Return the name of the model's ComfyUI model-config class (e.g. 'SD15', 'SDXL', 'Flux')."""
    return type(model.model.model_config).__name__


def check_family(model, node: str) -> str:
    """Return the family name, or raise a ValueError naming it and the supported ones."""
    name = family_name(model)
    if type(model.model.model_config) not in SUPPORTED_FAMILIES.values():
        raise ValueError(
            f"{node}: the connected model is a {name} model; VCT supports {', '.join(SUPPORTED_FAMILIES)} "
            "(Stable Diffusion 1.x, 2.x and SDXL base) checkpoints. Load one with CheckpointLoaderSimple."
        )
    return name


def model_fingerprint(model) -> str:
    """Return a hash of the model's base weights (sampled) and its weight patches (LoRA etc.).

    Independent of load state: where ComfyUI has applied patches in place, the saved originals
    (`backup`) are hashed, and the patches are hashed from their own strengths and tensors.
    """
    digest = hashlib.sha256(family_name(model).encode())
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


def train_sigmas(model) -> torch.Tensor:
    """Return the sigma of every training timestep of the model's sampling schedule (float32, CPU)."""
    sigmas = model.get_model_object("model_sampling").sigmas
    return sigmas.detach().to(device="cpu", dtype=torch.float32)


def prediction_type(model) -> str:
    """Return 'eps' or 'v' for the kernel's concept loss."""
    kind = model.model.model_type
    if kind == comfy.model_base.ModelType.EPS:
        return "eps"
    if kind == comfy.model_base.ModelType.V_PREDICTION:
        return "v"
    raise ValueError(f"VCT supports eps- and v-prediction models; this model predicts {kind.name}")


def transformer_block_keys(model) -> list[tuple[str, int, int]]:
    """Return the (block, id, index) keys of every transformer block, as ComfyUI's attention patches use them."""
    unet = model.model.diffusion_model
    keys: list[tuple[str, int, int]] = []
    groups = [("input", list(getattr(unet, "input_blocks", []))), ("middle", [getattr(unet, "middle_block", None)]),
              ("output", list(getattr(unet, "output_blocks", [])))]
    for name, blocks in groups:
        for block_id, block in enumerate(blocks):
            if block is None:
                continue
            for layer in block:
                if isinstance(layer, comfy_attention.SpatialTransformer):
                    keys.extend((name, block_id, i) for i in range(len(layer.transformer_blocks)))
    return keys


def existing_replace_patch(model_options: dict, kind: str, key: tuple):
    """Return the replace patch ComfyUI would call for this block now (its own key first, then the 2-tuple)."""
    registry = model_options.get("transformer_options", {}).get("patches_replace", {}).get(kind, {})
    return registry.get(key, registry.get(key[:2]))


def _gradient_safe_attention(func, *args, **kwargs):
    # Sub-quadratic attention (ComfyUI's CPU default) was seen to give zero gradients to the text
    # conditioning; PyTorch's fused attention backpropagates on every device.
    return comfy_attention.attention_pytorch(*args, **kwargs)


class Denoiser:
    """A ModelPatcher as the kernel's denoiser: `(x, sigma, cond, transformer_options) -> denoised`.

    `cond` is the dict `model_cond` returns (`c_crossattn`, and `y` for SDXL).
    """

    def __init__(self, model, gradients: bool = False, sample_sigmas: Optional[torch.Tensor] = None,
                 controls: Optional[dict] = None) -> None:
        """Wrap `model` (already loaded on its device); with `gradients`, attention runs a path that backpropagates.

        `controls` maps a branch (vct_ops.ROLE_MAIN / ROLE_REF, or control.ALL_ROWS) to a ComfyUI
        ControlNet or T2I-Adapter (already pre-run, or None for none) that acts on that branch's rows only.
        """
        self.model = model
        self.controls = {branch: net for branch, net in (controls or {}).items() if net is not None}
        self.device = model.load_device
        self.base_options = model.model_options.get("transformer_options", {})
        self.wrapper = model.model_options.get("model_function_wrapper")
        self.gradients = gradients
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
        if self.gradients:
            options["optimized_attention_override"] = _gradient_safe_attention
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
        branches = options.get(BRANCHES_KEY) or [control.ALL_ROWS] * x.shape[0]
        merged: Optional[dict] = None
        for branch, net in self.controls.items():
            rows = [i for i, b in enumerate(branches) if b == branch or branch == control.ALL_ROWS]
            if not rows:
                continue
            # ComfyUI's "batched_number": how many cond/uncond chunks these rows hold (the hint is
            # repeated per chunk).
            roles = options.get(ROLES_KEY)
            chunks = len({roles[i] == ROLE_UNCOND for i in rows}) if roles is not None else 1
            part = net.get_control(x[rows], sigma[rows], {k: v[rows] for k, v in cond.items()}, chunks,
                                       options)
            if part is not None:
                merged = control.scatter_residuals(part, rows, x.shape[0], merged)
        if merged is not None and self.gradients and torch.is_grad_enabled():
            merged = {key: [v.as_subclass(control.OutOfPlaceResidual) if torch.is_tensor(v) else v for v in values]
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


def training_fits(model, shape) -> bool:
    """Return whether a forward+backward pass on a batch of `shape` likely fits in free device memory.

    ComfyUI's estimate is for inference; a backward pass keeps the activations, so a generous
    factor is applied.
    """
    needed = model.model.memory_required(list(shape))
    return needed * 4 < compat.free_memory(model, model.load_device)


def training_model(model, shape):
    """Return the model to train through: a clone that recomputes activations in backward when a
    forward+backward pass on `shape` would not fit in free memory, else `model` itself."""
    if training_fits(model, shape):
        return model
    log.info("VCT: too little free memory for a training pass on %s; recomputing activations in backward",
             tuple(shape))
    return recompute.checkpointed_clone(model)


def load(model, extra=()) -> None:
    """Load the model (with its weight patches applied), and `extra` patchers such as ControlNets, on their devices."""
    comfy.model_management.load_models_gpu([model] + list(extra))


def load_for_training(model, clip=None, extra: tuple = ()) -> tuple:
    """Load `model` (and `clip`, and `extra` patchers such as ControlNets) for passes with gradients; return the
    (model, clip) to run them through.

    Where weights are cast to the device per call (Dynamic VRAM, or a model only partly loaded),
    the loaded patchers are clones that give autograd private copies of the casts, so backward
    never reads a buffer that a later layer has reused. A ControlNet's patcher gets the same, as
    gradients to a source prompt's null embeddings pass through it.
    """
    def guarded(model, clip, extra):
        return (compat.gradient_safe_model(model), compat.gradient_safe_clip(clip) if clip is not None else None,
                [compat.gradient_safe_model(p) for p in extra])

    def patchers(clip, extra):
        return ([clip.patcher] if clip is not None else []) + extra

    model, clip, extra = guarded(model, clip, list(extra))
    load(model, patchers(clip, extra))
    # A non-dynamic model shows whether it was only partly loaded once it is loaded.
    safe = guarded(model, clip, extra)
    if safe[0] is not model or safe[1] is not clip or any(a is not b for a, b in zip(safe[2], extra)):
        model, clip, extra = safe
        load(model, patchers(clip, extra))
    return model, clip


def make_autograd_safe(module: torch.nn.Module, device: Optional[torch.device] = None) -> int:
    """Return how many inference-mode parameters/buffers were replaced by ordinary tensors of equal value.

    ComfyUI builds and loads models inside `torch.inference_mode()`; such tensors cannot be saved
    for backward, which gradients through the frozen model need. Values are unchanged. With
    `device`, tensors held elsewhere are left alone: they are cast per call, and `load_for_training`
    gives autograd private copies of those casts (no second copy of an offloaded model in RAM).
    """
    replaced = 0
    with torch.inference_mode(False):
        for name, param in list(module.named_parameters()):
            if param.is_inference() and (device is None or param.device.type == device.type):
                # Its requires_grad flag too, so the shared model's flags are as they were.
                safe = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                comfy.utils.set_attr(module, name, safe)
                replaced += 1
        for name, buf in list(module.named_buffers()):
            if buf.is_inference() and (device is None or buf.device.type == device.type):
                comfy.utils.set_attr(module, name, buf.clone())
                replaced += 1
    return replaced


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """Enable autograd inside ComfyUI's inference-mode node execution, with ComfyUI's differentiable kernels."""
    with torch.inference_mode(False), torch.enable_grad(), compat.training_kernels():
        yield


def prompt_server():
    """Return ComfyUI's running PromptServer, or None where there is none (headless tools, tests)."""
    import server

    return getattr(server.PromptServer, "instance", None)


class Progress:
    """A ComfyUI progress bar that is also a cancellation point."""

    def __init__(self, total: int) -> None:
        """Start a bar of `total` units."""
        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, done: int, total: int, preview=None) -> None:
        """Report `done` of `total`; raise if the user cancelled the run."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(done, total, preview)


def step_callback(progress: Progress) -> Callable[[int, int, torch.Tensor], None]:
    """Return a kernel step callback that reports progress."""
    return lambda step, total, x: progress(step, total)
