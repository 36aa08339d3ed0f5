"""Files the nodes write: learned embeddings and saved inversions, always written atomically."""
from __future__ import annotations

import json
import os
import re
import uuid

import folder_paths
import safetensors.torch
import torch

from .payloads import ContentMethod, InversionData

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-. ]{0,127}")
INVERSION_FOLDER = "vct_inversions"
FORMAT = "vct-inversion/2"


def check_name(name: str, what: str) -> str:
    """Return the name stripped, after checking it is a plain file name (no folders, no '..')."""
    name = name.strip()
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} is not a plain file name: use letters, digits, '_', '-', '.' and spaces, "
            "without '/', '\\' or '..'"
        )
    return name


def atomic_save(tensors: dict, path: str, metadata: dict | None = None) -> str:
    """Write a safetensors file through a temporary file and a rename; return the path."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def save_embedding(name: str, vectors: dict, overwrite: bool) -> str:
    """Save concept vectors where ComfyUI's `embedding:NAME` finds them; return the path."""
    name = check_name(name, "embedding_name")
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    folder = folder_paths.get_folder_paths("embeddings")[0]
    path = os.path.join(folder, name + ".safetensors")
    if os.path.exists(path) and not overwrite:
        raise ValueError(
            f"an embedding named {name!r} already exists ({path}); choose another embedding_name or enable overwrite"
        )
    return atomic_save({k: v.detach().float().cpu() for k, v in vectors.items()}, path)


def inversion_folder() -> str:
    """Return the folder saved inversions go to."""
    return os.path.join(folder_paths.get_output_directory(), INVERSION_FOLDER)


def list_inversions() -> list[str]:
    """Return the saved inversion files, newest name last."""
    folder = inversion_folder()
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") and not f.startswith("."))


def save_inversion(data: InversionData, prefix: str) -> str:
    """Save an inversion as `<output>/vct_inversions/<prefix>_NNNNN.safetensors`; return the path."""
    prefix = check_name(prefix, "filename_prefix")
    if data.source_control is not None:
        raise ValueError(
            "this inversion was made with a ControlNet on the source prompt, which a file cannot hold; it cannot "
            "be saved. Keep it in the graph (ComfyUI caches it between runs), or invert without the ControlNet"
        )
    existing = list_inversions()
    pattern = re.compile(re.escape(prefix) + r"_(\d+)\.safetensors")
    number = 1 + max([int(m.group(1)) for f in existing if (m := pattern.fullmatch(f))], default=0)
    tensors = {"trajectory": data.trajectory, "sigmas": data.sigmas, "source_latent": data.source_latent}
    tensors.update({f"source_cond.{k}": v for k, v in data.source_cond.items()})
    if data.null_embeddings is not None:
        tensors.update({f"null_embeddings.{k}": v for k, v in data.null_embeddings.items()})
    metadata = {
        "format": FORMAT, "model_fingerprint": data.model_fingerprint, "family": data.family,
        "method": data.method.value if data.method else "ddim",
        "null_losses": json.dumps(data.null_losses), "cfg": str(data.cfg),
        "source_layout": json.dumps(data.source_layout),
    }
    path = os.path.join(inversion_folder(), f"{prefix}_{number:05d}.safetensors")
    return atomic_save({k: v.detach().cpu() for k, v in tensors.items()}, path, metadata)


def load_inversion(filename: str) -> InversionData:
    """Return the inversion saved in `filename` (a name from list_inversions)."""
    filename = check_name(filename, "inversion file")
    path = os.path.join(inversion_folder(), filename)
    if not os.path.isfile(path):
        raise ValueError(f"no saved inversion {filename!r} in {inversion_folder()}; save one with VCT Save Inversion")
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{filename} is not a VCT inversion file (format {metadata.get('format')!r})")
    losses = json.loads(metadata.get("null_losses", "null"))
    nulls = _group(tensors, "null_embeddings.")
    method = metadata.get("method", "ddim")  # "ddim": saved before the content inversion ran
    return InversionData(
        trajectory=tensors["trajectory"], sigmas=tensors["sigmas"], source_cond=_group(tensors, "source_cond."),
        source_latent=tensors["source_latent"], model_fingerprint=metadata["model_fingerprint"],
        family=metadata["family"], null_embeddings=nulls or None, null_losses=losses,
        method=None if method == "ddim" else ContentMethod(method), cfg=float(metadata.get("cfg", 7.5)),
        source_layout=json.loads(metadata.get("source_layout", "null")),
    )


def _group(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def same_latent(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Return whether two latents are of one image: same shape, values within 1 % (encoders vary by device)."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    a, b = a.float().cpu(), b.float().cpu()
    return bool((a - b).norm() <= 1e-2 * b.norm().clamp_min(1e-8))
