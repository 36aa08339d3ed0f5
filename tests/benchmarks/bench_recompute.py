"""Activations kept for backward, and time, of one training pass: plain UNet against recomputing blocks.

Not a test (pytest does not collect it). It needs a ComfyUI (COMFYUI_PATH or --comfyui):

    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/bench_recompute.py --size 512

On the full SD1.5 architecture (random weights) it runs one forward+backward pass to a
conditioning, as null-text inversion does, through three versions of the same model: the plain
UNet, a clone whose transformer blocks recompute their activations in backward, and the clone
the nodes use when memory is short (transformer and residual blocks). It prints, per version
and repetition, the activations held for backward (tensors saved by autograd, model weights
excluded), the pass's wall time, and the gradient's sum, which must be equal across versions.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vct  # noqa: E402 - next to this file


def saved_bytes(model, run, *args) -> tuple:
    """Return (bytes autograd saved for backward outside the model's weights, value of `run(*args)`)."""
    weights = {p.untyped_storage().data_ptr() for p in model.model.diffusion_model.parameters()}
    saved = {}

    def keep(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        value = run(*args)
    return sum(saved.values()), value


def main(argv=None) -> int:
    """Run the comparison; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=2, help="passes per version")
    args = parser.parse_args(argv)
    if not args.comfyui:
        parser.error("set COMFYUI_PATH or pass --comfyui")
    os.environ["COMFYUI_PATH"] = args.comfyui
    os.environ.setdefault("VCT_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    from support import comfy_env

    comfy_env.ensure_bootstrapped()
    import comfy.model_management
    from support import comfy_runner

    pack = comfy_runner.Pack(comfy_runner.load_pack())
    build_args = argparse.Namespace(size=args.size, checkpoint=None, model="full", ours_dtype="auto")
    with torch.inference_mode():
        models = bench_vct.build(build_args, reference=False)
    model = models.model.clone()
    device = model.load_device
    shape = (1, 4, args.size // 8, args.size // 8)
    with torch.no_grad():
        cond = pack.conditioning.model_cond(model, comfy_runner.encode(models.clip, ""), "source", shape)
    sigma = pack.identity.train_sigmas(model)[500].view(1).clone().to(device)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)

    transformer_only = model.clone()
    import comfy.ldm.modules.attention as comfy_attention

    for name, forward in pack.recompute.checkpoint_patches(model.model.diffusion_model, "diffusion_model.",
                                                         pack.sd_unet.SDUNet().recompute_types()):
        if isinstance(forward.block, comfy_attention.BasicTransformerBlock):
            transformer_only.add_object_patch(name, forward)
    versions = {"plain": model, "transformer blocks": transformer_only,
                "transformer+residual": pack.recompute.checkpointed_clone(model)}
    print(f"device {device}, UNet {models.dtype}, {args.size}px, batch 1")
    with pack.training.training_mode():
        for rep in range(args.repeats):
            for label, version in versions.items():
                comfy.model_management.load_models_gpu([version])
                pack.training.make_autograd_safe(version.model.diffusion_model)
                leaf = {k: v.to(device).clone().requires_grad_(True) for k, v in cond.items()}
                denoise = pack.denoiser.Denoiser(version, gradients=True)
                start = time.perf_counter()
                kept, out = saved_bytes(version, denoise, x, sigma, leaf, None)
                out.float().square().mean().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
                grad = float(leaf["c_crossattn"].grad.float().abs().sum())
                print(f"rep {rep}  {label:<22} kept for backward {kept / 2**20:8.1f} MB  "
                      f"forward+backward {seconds:7.2f} s  |grad| sum {grad:.6g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
