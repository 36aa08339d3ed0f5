#!/usr/bin/env python3
"""On a CUDA machine, check that the training nodes give the same results under ComfyUI's Dynamic
VRAM as without it, and print peak memory and times. A script, not collected by pytest:

    python tests/gpu/check_dynamic_vram.py --comfyui /path/to/ComfyUI [--size 512] [--steps 5]

ComfyUI (0.38.x) is started as `main.py` starts it, without the server: its module-level start-up
parses the arguments and turns Dynamic VRAM on through comfy-aimdo where the GPU supports it.
The models are the SD1.5 architecture at full size with random weights, built from ComfyUI's own
classes twice from the same seed: one under ComfyUI's default patcher (dynamic where enabled),
one under the plain ModelPatcher. The same nodes run on both:

1. VCT DDIM Invert, Content Null-Text Invert and Concept Embedding Learn, compared output by output;
2. one forward+backward loaded as the training nodes load it, its gradient to the conditioning
   compared (tightly);
3. the same pass without the pack's guard, printed only (shows whether the hazard is real on
   this machine);
4. Content Null-Text Invert at the node's defaults (50 inner steps, early stop 1e-5) in the
   model's own precision (float16 on most GPUs), printed only: per step the iterations it ran,
   its last loss, the early-stop threshold and the loss that rounding the model's output to its
   precision alone would leave (one unit in the last place, amplified by CFG 7.5 and the step),
   which shows whether the threshold lies below the rounding noise.

Exit code 0 when every guarded comparison agrees, 1 when one does not, 2 when the set-up is wrong
(no CUDA, or Dynamic VRAM not enabled and --allow-static not given).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import time
from pathlib import Path

PACK_ROOT = Path(os.path.abspath(__file__)).parents[2]


def start_comfyui(path: Path, comfy_args: list[str]):
    """Import ComfyUI's main.py the way `python main.py` runs its start-up (arguments, Dynamic VRAM)."""
    os.chdir(path)
    sys.path.insert(0, str(path))
    sys.argv = ["main.py", "--disable-all-custom-nodes", *comfy_args]
    importlib.import_module("main")
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(PACK_ROOT), module_parent="custom_nodes")):
        raise SystemExit("the pack did not load; see ComfyUI's log above")
    return nodes


def init_weights_(module, seed: int) -> None:
    """Fill every parameter from a fixed seed (kaiming-uniform matrices, unit norm weights, zero biases)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for part in module.modules():
            for name, p in part.named_parameters(recurse=False):
                if name == "bias":
                    p.zero_()
                elif isinstance(part, norms):
                    p.fill_(1.0)
                elif p.ndim >= 2:
                    w = torch.empty(p.shape, dtype=torch.float32)
                    torch.nn.init.kaiming_uniform_(w, generator=gen)
                    p.copy_(w)


def build(dynamic: bool):
    """Return (model, clip): full-size SD1.5 UNet and text encoder with seeded random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import torch

    sys.path.insert(0, str(PACK_ROOT / "tests" / "benchmarks"))
    from bench_vct import FULL_SD15_UNET

    plain_class = comfy.model_patcher.ModelPatcher
    patcher = getattr(comfy.model_patcher, "CoreModelPatcher", plain_class) if dynamic else plain_class
    config = comfy.supported_models.SD15(dict(FULL_SD15_UNET))
    config.unet_config.update(num_heads=8, num_head_channels=-1)
    dtype = mm.unet_dtype(model_params=0, supported_dtypes=list(config.supported_inference_dtypes))
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, mm.get_torch_device(),
                                                          config.supported_inference_dtypes))
    with torch.inference_mode():  # as checkpoint loaders build models
        unet = config.get_model({}, "", device=torch.device("cpu"))
        init_weights_(unet.diffusion_model, 0)
        model = patcher(unet, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
        clip = comfy.sd.CLIP(config.clip_target(), parameters=123_000_000)
        init_weights_(clip.cond_stage_model, 1)
    if not dynamic and type(clip.patcher) is not plain_class:
        plain = plain_class(clip.cond_stage_model, load_device=clip.patcher.load_device,
                                                 offload_device=clip.patcher.offload_device)
        plain.is_clip = True
        clip.patcher = plain
    return model, clip


class Runner:
    """Runs the pack's nodes as ComfyUI's executor does (inside inference mode), timing each and its peak memory."""

    def __init__(self, nodes_module) -> None:
        self.nodes = nodes_module.NODE_CLASS_MAPPINGS
        package = self.nodes["VCTNullTextInvert"].__module__.rsplit(".", 1)[0]
        self.identity = importlib.import_module(package + ".model.identity")
        self.denoiser = importlib.import_module(package + ".model.denoiser")
        self.training = importlib.import_module(package + ".model.training")

    def run(self, node: str, *args):
        """Return (outputs, seconds, peak MB) of one node run."""
        import comfy.model_management as mm
        import torch

        cuda = torch.cuda.is_available()
        mm.unload_all_models()
        mm.soft_empty_cache()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.nodes[node].execute(*args).args
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
        return out, time.perf_counter() - start, peak

    def gradient(self, model, cond, shape, guarded: bool):
        """Return the gradient to the conditioning of one forward+backward through `model`, loaded as the
        training nodes load it (`guarded`) or plainly."""
        import comfy.model_management as mm
        import torch

        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(model.load_device)
        sigma = self.identity.train_sigmas(model)[500].view(1).clone().to(model.load_device)
        mm.unload_all_models()
        with self.training.training_mode():
            if guarded:
                model, _ = self.training.load_for_training(model)
            else:
                mm.load_models_gpu([model])
            self.training.make_autograd_safe(model.model.diffusion_model, model.load_device)
            leaf = cond.clone().to(model.load_device).requires_grad_(True)
            out = self.denoiser.Denoiser(model, gradients=True)(x, sigma, {"c_crossattn": leaf})
            out.float().square().mean().backward()
        return leaf.grad.float().cpu()


def compare(label: str, a, b, rtol: float) -> bool:
    """Print and return whether two tensors agree to `rtol` of b's largest magnitude."""
    import torch

    a, b = a.float().cpu(), b.float().cpu()
    scale = float(b.abs().max()) or 1.0
    error = float((a - b).abs().max()) / scale
    ok = bool(torch.isfinite(a).all()) and error <= rtol
    print(f"  {label:<44} max |diff| / max |plain| = {error:.2e}  {'ok' if ok else 'DIFFERENT'}")
    return ok


def main(argv=None) -> int:
    """Run the checks; return the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="the ComfyUI folder (0.38.x)")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (latent size / 8)")
    ap.add_argument("--steps", type=int, default=5, help="DDIM steps")
    ap.add_argument("--inner-steps", type=int, default=3, help="null-text iterations per step")
    ap.add_argument("--concept-steps", type=int, default=3, help="concept-learning steps")
    ap.add_argument("--rtol", type=float, default=2e-2,
                    help="agreement needed of the nodes' outputs, relative to the plain run's max (Adam's first "
                    "steps amplify rounding differences near zero gradients)")
    ap.add_argument("--gradient-rtol", type=float, default=1e-3,
                    help="agreement needed of one pass's gradient, relative to the plain run's max")
    ap.add_argument("--allow-static", action="store_true",
                    help="run even where Dynamic VRAM is off or there is no GPU (a smoke test of the script)")
    ap.add_argument("--stop-inner-steps", type=int, default=50,
                    help="inner steps of the early-stop run at the node's defaults (0 skips it)")
    ap.add_argument("--early-stop", type=float, default=1e-5, help="early_stop of that run (the node's default)")
    ap.add_argument("comfy_args", nargs="*", help="extra ComfyUI arguments after --, e.g. -- --reserve-vram 2")
    args = ap.parse_args(argv)
    if not args.comfyui:
        print("give --comfyui /path/to/ComfyUI (or set COMFYUI_PATH)")
        return 2
    nodes_module = start_comfyui(Path(args.comfyui).resolve(), args.comfy_args)
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfyui_version
    import torch

    if not torch.cuda.is_available() and not args.allow_static:
        print("no CUDA device: this check is for GPU machines")
        return 2
    dynamic_class = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    enabled = dynamic_class is not None and comfy.model_patcher.CoreModelPatcher is dynamic_class
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"ComfyUI {comfyui_version.__version__}, torch {torch.__version__}, {device}, "
          f"Dynamic VRAM {'on' if enabled else 'off'}")
    if not enabled and not args.allow_static:
        print("Dynamic VRAM is not enabled (flags, GPU or comfy-aimdo): nothing to compare; --allow-static runs anyway")
        return 2

    runner = Runner(nodes_module)
    models = {"plain": build(dynamic=False), "dynamic": build(dynamic=True)}
    print(f"patchers: plain {type(models['plain'][0]).__name__}/{type(models['plain'][1].patcher).__name__}, "
          f"dynamic {type(models['dynamic'][0]).__name__}/{type(models['dynamic'][1].patcher).__name__}")
    size = args.size // 8
    latent = {"samples": torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(1))}
    clip = models["plain"][1]
    with torch.inference_mode():
        tokens = clip.tokenize("")
        out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    source = [[out.pop("cond"), out]]

    results, ok = {}, True
    print(f"{'run':<10} {'node':<28} {'seconds':>8} {'peak MB':>9}")
    for name, (model, clip) in models.items():
        inversion, *_ = timed(runner, name, "VCTDDIMInvert", model, latent, source, args.steps)
        tuned, *_ = timed(runner, name, "VCTNullTextInvert", model, inversion, 7.5, args.inner_steps, 0.0)
        print(f"{name:<10} null-text iterations per step: {tuned.null_iterations}")
        concept = timed(runner, name, "VCTConceptLearn", model, clip, latent, "dog", 3, args.concept_steps,
                        5e-4, 4, 1.0, 0, "", False)
        results[name] = dict(trajectory=inversion.trajectory, nulls=tuned.null_embeddings,
                             concept=concept[0][0][0], losses=concept[1].losses)
    plain, dyn = results["plain"], results["dynamic"]
    print("guarded (the nodes as shipped):")
    ok &= compare("DDIM inversion path", dyn["trajectory"], plain["trajectory"], args.rtol)
    for key in plain["nulls"]:
        ok &= compare(f"null embeddings [{key}]", dyn["nulls"][key], plain["nulls"][key], args.rtol)
    ok &= compare("learned concept conditioning", dyn["concept"], plain["concept"], args.rtol)
    print(f"  concept losses plain {plain['losses'][-1]:.5f} dynamic {dyn['losses'][-1]:.5f}")

    cond = source[0][0]
    shape = (1, 4, size, size)
    guarded = {name: runner.gradient(model, cond, shape, guarded=True) for name, (model, _) in models.items()}
    ok &= compare("gradient to the conditioning (one pass)", guarded["dynamic"], guarded["plain"],
                  args.gradient_rtol)
    print("unguarded (one forward+backward straight through each UNet, for comparison):")
    try:
        raw = {name: runner.gradient(model, cond, shape, guarded=False) for name, (model, _) in models.items()}
        compare("gradient to the conditioning", raw["dynamic"], raw["plain"], args.gradient_rtol)
    except RuntimeError as e:  # e.g. inference-mode casts saved for backward
        print(f"  raised {type(e).__name__}: {str(e).splitlines()[0]}")
    if args.stop_inner_steps > 0:
        early_stop_report(runner, models["dynamic"][0], latent, source, args)
    mm.unload_all_models()
    print("result:", "all guarded comparisons agree" if ok else "a guarded comparison DIFFERS")
    return 0 if ok else 1


def early_stop_report(runner: Runner, model, latent, source, args) -> None:
    """Print, per null-text step at the node's defaults, its iterations, last loss, threshold and rounding floor."""
    import torch

    inversion, *_ = timed(runner, "defaults", "VCTDDIMInvert", model, latent, source, args.steps)
    tuned, *_ = timed(runner, "defaults", "VCTNullTextInvert", model, inversion, 7.5, args.stop_inner_steps,
                      args.early_stop)
    dtype = model.model_dtype()
    unit = torch.finfo(dtype).eps / 2  # unit roundoff: 2^-11 in float16, 2^-8 in bfloat16, 2^-24 in float32
    cfg_gain = (7.5**2 + 6.5**2) ** 0.5  # independent errors of the cond and uncond predictions under CFG 7.5
    sigmas = inversion.sigmas.double()
    print(f"null-text at the node's defaults, model in {dtype} (unit roundoff {unit:.1e}); the loss is an MSE on "
          "the latent, the floor what one unit of rounding in the model's noise prediction leaves in it:")
    print(f"  {'step':>4} {'iterations':>10} {'last loss':>11} {'threshold':>11} {'rounding floor':>15}")
    for i, (used, loss) in enumerate(zip(tuned.null_iterations, tuned.null_losses)):
        gain = float((sigmas[i + 1] - sigmas[i]).abs() / (1 + sigmas[i + 1] ** 2).sqrt())
        floor = (gain * cfg_gain * unit) ** 2
        print(f"  {i:>4} {used:>10} {loss:>11.3e} {args.early_stop + i * 2e-5:>11.3e} {floor:>15.3e}")
    optimised = [used for used in tuned.null_iterations if used > 0]  # the identity step runs none
    full = sum(1 for used in optimised if used == args.stop_inner_steps)
    print(f"  steps that ran all {args.stop_inner_steps} iterations: {full} of {len(optimised)}")


def timed(runner: Runner, name: str, node: str, *args):
    """Run one node, print its time and peak memory, and return its outputs."""
    out, seconds, peak = runner.run(node, *args)
    print(f"{name:<10} {node:<28} {seconds:8.2f} {peak:9.0f}", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
