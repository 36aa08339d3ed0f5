"""Speed and memory of every VCT stage: the reference code's configuration against ours, in one run.

Not a test (pytest does not collect it). It needs a ComfyUI (COMFYUI_PATH or --comfyui) and
runs on the current device (CUDA when available, else the CPU):

    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/bench_vct.py --model tiny
    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/bench_vct.py --model full --size 512
    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/bench_vct.py --checkpoint sd15.safetensors

`--model full` is the real SD1.5 architecture (UNet and CLIP-L) with random weights, so time
and memory mean something; `tiny` is a quick smoke run. Both configurations run on the same
model and inputs. Printed per stage: wall time, model passes (forward / forward+backward, in
rows), peak memory (CUDA allocator peak, or peak resident memory of the process on the CPU),
and ours/reference ratios; then the quality figures showing nothing was lost.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "host"))
sys.path.insert(0, str(HERE))  # measure.py and reference_costs.py beside it, also when imported elsewhere

from measure import stage  # noqa: E402
from reference_costs import (  # noqa: E402
    attention_store,
    posterior,
    reference_attention,
    reference_null_text,
    reference_sampler,
)

FULL_SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_resblock": False, "use_temporal_attention": False,
}


FULL_SD_VAE = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
TINY_VAE = dict(FULL_SD_VAE, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)
# A trained SD VAE's posterior is narrow (log-variance around -10 on natural images); random
# weights would give a log-variance near 0, i.e. a latent drowned in its own sampling noise.
POSTERIOR_LOGVAR = -10.0


@dataclasses.dataclass
class Config:
    """One side of the comparison."""

    name: str
    # Reproduce the reference code: float32 everywhere; attention as explicit softmax maps
    # (diffusers 0.10 and prompt-to-prompt's controller); UNet weights left trainable during
    # null-text, so every backward also computes and accumulates their gradients; the CFG latent
    # update after each null-text step as a 2-row call; the VAE encoding (and posterior sample) of
    # the flipped reference image at every accumulation micro-batch, each with its own text-encoder
    # pass; every conditional attention map of at most 32x32 queries kept, summed over steps.
    reference: bool


REFERENCE = Config("reference", reference=True)
OURS = Config("ours", reference=False)


@dataclasses.dataclass
class Models:
    """One configuration's model, CLIP and VAE module, built from the same seeded weights."""

    model: object
    clip: object
    vae: torch.nn.Module
    dtype: torch.dtype


def resolve_dtypes(args, reference: bool):
    """Return (UNet, text encoder, VAE) dtypes: float32 for the reference, else ComfyUI's choice for the device."""
    import comfy.model_management as mm
    import comfy.supported_models

    if reference:
        return torch.float32, torch.float32, torch.float32
    device = mm.get_torch_device()
    if args.ours_dtype != "auto":
        unet = getattr(torch, args.ours_dtype)
    else:
        unet = mm.unet_dtype(device, 860_000_000, comfy.supported_models.SD15.supported_inference_dtypes)
    return unet, mm.text_encoder_dtype(device), mm.vae_dtype(device)


def build(args, reference: bool) -> Models:
    """Return the configuration's models; weights are drawn in float32 from fixed seeds, then cast."""
    import comfy.ldm.models.autoencoder
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from support import comfy_tiny

    unet_dtype, clip_dtype, vae_dtype = resolve_dtypes(args, reference)
    device = comfy.model_management.get_torch_device()
    if args.checkpoint:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            args.checkpoint, output_vae=True, model_options={"dtype": unet_dtype},
            te_model_options={"dtype": clip_dtype})[:3]
        return Models(model, clip, vae.first_stage_model.to(device, vae_dtype), unet_dtype)
    if args.model == "tiny":
        model, clip = comfy_tiny.tiny_sd15_model(dtype=unet_dtype), comfy_tiny.tiny_sd1_clip(dtype=clip_dtype)
        ddconfig = TINY_VAE
    else:
        config = comfy.supported_models.SD15(dict(FULL_SD15_UNET))
        config.unet_config.update(num_heads=8, num_head_channels=-1)
        config.set_inference_dtype(unet_dtype, None)
        unet = config.get_model({}, "", device=torch.device("cpu"))
        comfy_tiny.init_tiny_weights_(unet.diffusion_model, 0)
        model = comfy.model_patcher.ModelPatcher(unet, load_device=device,
                                                 offload_device=comfy.model_management.unet_offload_device())
        clip = comfy.sd.CLIP(config.clip_target(), parameters=123_000_000, model_options={"dtype": clip_dtype})
        comfy_tiny.init_tiny_weights_(clip.cond_stage_model, 1)
        ddconfig = FULL_SD_VAE
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(ddconfig), embed_dim=4)
    comfy_tiny.init_tiny_weights_(vae, 2)
    with torch.no_grad():
        vae.quant_conv.bias[4:] = POSTERIOR_LOGVAR
    return Models(model, clip, vae.to(device, vae_dtype).eval(), unet_dtype)


def inputs(args):
    """Return (source latent, reference image in [-1, 1]) shared by both configurations."""
    g = torch.Generator().manual_seed(0)
    source = {"samples": torch.randn(1, 4, args.size // 8, args.size // 8, generator=g)}
    image = torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1
    return source, image


def run_config(pack, cfg: Config, models: Models, source_latent, image, args, source_prompt=None):
    """Run every stage under one configuration; return ({stage: figures}, outputs for the quality checks).

    `source_prompt` is the source prompt's CONDITIONING from the configuration that ran first, if
    any, so both invert the same problem (see `main`); without it this configuration encodes it.
    """
    import comfy.model_management
    from support.comfy_runner import encode

    vct = pack.vct_ops
    clip, vae = models.clip, models.vae
    model = reference_attention(models.model) if cfg.reference else models.model.clone()
    device = model.load_device
    results, out = {}, {}
    z0 = pack.conditioning.latent_in(model, source_latent, "source")
    empty = source_prompt if source_prompt is not None else encode(clip, "")
    out["source_prompt"] = empty
    cond = pack.conditioning.model_cond(model, empty, "source", z0.shape)
    sigmas = vct.ddim_sigmas(pack.identity.train_sigmas(model), args.steps).to(device)
    comfy.model_management.load_models_gpu([model, clip.patcher])
    cond = {k: v.to(device) for k, v in cond.items()}

    x0 = vct.latent_to_x(z0.to(device), sigmas[-1])
    trajectory = stage(results, "ddim_invert", device,
                       lambda c: vct.ddim_invert(c(pack.denoiser.Denoiser(model)), x0, sigmas, cond))

    shape = (1, *z0.shape[1:])
    train = model
    if not cfg.reference:  # what the nodes do: recompute activations in backward when memory is short
        training = pack.training
        train = pack.recompute.checkpointed_clone(model) if args.low_memory else training.training_model(model, shape)
        out["checkpointed"] = train is not model
        comfy.model_management.load_models_gpu([train, clip.patcher])
    unet = train.model.diffusion_model
    with pack.training.training_mode():
        pack.training.make_autograd_safe(unet)
        # The reference's attention is plain autograd; ours needs the gradient-safe override.
        denoiser = pack.denoiser.Denoiser(train, gradients=not cfg.reference)
        if cfg.reference:
            for param in unet.parameters():
                param.requires_grad_(True)  # the reference never freezes the UNet for null-text
            nulls = stage(results, "null_text", device, lambda c: reference_null_text(
                pack, c(denoiser), trajectory.clone(), sigmas.clone(), {k: v.clone() for k, v in cond.items()},
                {k: v.clone() for k, v in cond.items()}, args.inner_steps))
            for param in unet.parameters():
                param.requires_grad_(False)  # its gradients stay allocated, as in the reference's process
        else:
            nulls = stage(results, "null_text", device, lambda c: vct.null_text_invert(
                c(denoiser), trajectory.clone(), sigmas.clone(), {k: v.clone() for k, v in cond.items()},
                {k: v.clone() for k, v in cond.items()}, inner_steps=args.inner_steps)).embeddings

        encoders = pack.clip_text.clip_encoders(clip, "benchmark")
        for e in encoders:
            pack.training.make_autograd_safe(e.module)
        init = {e.key: pack.clip_text.initializer_vectors(e, "dog", 3).to(device) for e in encoders}

        def learn(c):
            if cfg.reference:
                sampler, fuse = reference_sampler(model, vae, image), False
            else:  # what the nodes do: VAEEncode once (the posterior mode), fuse when memory allows
                with torch.no_grad():
                    mean, _ = posterior(vae, image.to(device))
                reference = pack.conditioning.latent_in(model, {"samples": mean.cpu()}, "reference")
                sampler = pack.vct_ops.reference_latent_sampler(reference)
                fuse = not args.low_memory and pack.training.training_fits(model, (4, *shape[1:]))
            config = vct.ConceptConfig(steps=args.concept_steps, grad_accum=4, seed=args.seed,
                                        fuse_accumulation=fuse)
            out["fused"] = fuse
            to_model = pack.conditioning.differentiable_model_cond(train, "concept", shape, device)
            return vct.learn_concept(c(denoiser), pack.clip_text.GradientEncoder(encoders, to_model), init,
                                     sampler, pack.identity.train_sigmas(model).to(device), config)

        concept = stage(results, "concept_learn", device, learn)
    out["vectors"] = concept.vectors

    concept_prompt = pack.prompts.encode_concept(encoders, concept.vectors)
    concept_cond = pack.conditioning.model_cond(model, concept_prompt, "concept", z0.shape)
    concept_cond = {k: v.to(device) for k, v in concept_cond.items()}
    injection = pack.tokens.injection_config(cond["c_crossattn"].cpu(), concept_prompt, 0.9, 0.2, 0.5, 0)
    base = model
    if cfg.reference:
        base, store = attention_store(pack, model, limit=32 * 32)
    patched = pack.sd_unet.controlled_clone(base, vct.AttentionController(sigmas.cpu(), injection))
    comfy.model_management.load_models_gpu([patched])
    result = stage(results, "dual_branch", device, lambda c: vct.dual_branch_sample(
        c(pack.denoiser.Denoiser(patched)), trajectory[-1], sigmas, cond, concept_cond, nulls))
    stage(results, "plain_cfg", device, lambda c: vct.ddim_sample(
        c(pack.denoiser.Denoiser(model)), trajectory[-1], sigmas, concept_cond, nulls, 7.5))
    out["reconstruction_mse"] = float(((result.ref - x0) ** 2).mean())
    out["b_to_bstar_mse"] = float(((result.main - result.ref) ** 2).mean())
    for param in unet.parameters():
        param.grad = None
    return results, out


def fixed_concept_loss(pack, models: Models, vectors, image, samples=16):
    """Return the concept loss of `vectors` on fixed timesteps and noises, through `models` (float32 for both)."""
    vct = pack.vct_ops
    model = models.model
    device = model.load_device
    g = torch.Generator().manual_seed(1234)
    sigmas = pack.identity.train_sigmas(model)
    with torch.no_grad():
        mean, _ = posterior(models.vae, image.to(device))
        z0 = pack.conditioning.latent_in(model, {"samples": mean.cpu()}, "reference").to(device)
        picks = torch.randint(0, sigmas.numel(), (samples,), generator=g)
        noise = torch.randn(samples, *z0.shape[1:], generator=g).to(device)
        encoders = pack.clip_text.clip_encoders(models.clip, "benchmark")
        to_model = pack.conditioning.differentiable_model_cond(model, "concept", z0.shape, device)
        cond = pack.clip_text.GradientEncoder(encoders, to_model)({k: v.to(device) for k, v in vectors.items()})
        total = 0.0
        for i in range(samples):
            sigma = sigmas[picks[i : i + 1]].to(device)
            total += float(vct.concept_loss(pack.denoiser.Denoiser(model), cond, z0, sigma, noise[i : i + 1],
                                            pack.identity.prediction_type(model)))
    return total / samples


def print_table(results, outputs):
    """Print the per-stage figures of both configurations and their ratios, then the quality figures."""
    ref, ours = results["reference"], results["ours"]
    print(f"{'stage':<14}{'config':<11}{'time s':>10}{'fwd rows':>10}{'fwd+bwd':>10}{'peak MB':>10}")
    for stage_name in ref:
        for name, figures in (("reference", ref[stage_name]), ("ours", ours[stage_name])):
            print(f"{stage_name:<14}{name:<11}{figures['time_s']:>10.3f}{figures['forward']:>10}"
                  f"{figures['forward_backward']:>10}{figures['peak_mb']:>10.0f}")
        ratio = ours[stage_name]["time_s"] / max(ref[stage_name]["time_s"], 1e-9)
        mem = ours[stage_name]["peak_mb"] / max(ref[stage_name]["peak_mb"], 1e-9)
        print(f"{stage_name:<14}{'ours/ref':<11}{ratio:>10.2f}{'':>20}{mem:>10.2f}")
    sampler = ours["dual_branch"]["time_s"] / max(ours["plain_cfg"]["time_s"], 1e-9)
    print(f"dual-branch / plain CFG sampling time (ours): {sampler:.2f}")
    peak = {name: max(f["peak_mb"] for f in stages.values()) for name, stages in results.items()}
    print(f"whole-pipeline peak MB: reference {peak['reference']:.0f}, ours {peak['ours']:.0f}, "
          f"ratio {peak['ours'] / peak['reference']:.2f}")
    for key in ("reconstruction_mse", "concept_loss", "b_to_bstar_mse"):
        print(f"{key}: reference {outputs['reference'][key]:.6g}, ours {outputs['ours'][key]:.6g}")
    print(f"ours fused the accumulation micro-batches: {outputs['ours']['fused']}, "
          f"recomputed activations in backward: {outputs['ours']['checkpointed']}")


def main(argv=None) -> int:
    """Run the benchmark; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder")
    parser.add_argument("--checkpoint", help="a real SD1.5 checkpoint file (optional)")
    parser.add_argument("--model", choices=["full", "tiny"], default="full")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--inner-steps", type=int, default=50, help="null-text iterations per step at most")
    parser.add_argument("--concept-steps", type=int, default=500, help="concept-learning steps")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of concept learning's timestep, noise and flip draws (both configurations); "
                        "change it to see how far the final concept loss moves between runs")
    parser.add_argument("--ours-dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                        help="UNet precision of 'ours': auto is ComfyUI's choice for the device (float16 on most "
                        "GPUs, float32 on the CPU); bfloat16 is what ComfyUI's --bf16-unet gives")
    parser.add_argument("--low-memory", action="store_true",
                        help="ours as the nodes run it when free memory is short: one sample per pass, transformer "
                        "blocks recomputing their activations in backward")
    parser.add_argument("--config", choices=["both", "reference", "ours"], default="both",
                        help="one configuration only: on the CPU, peak memory is only comparable between processes")
    args = parser.parse_args(argv)
    if not args.comfyui:
        parser.error("set COMFYUI_PATH or pass --comfyui")
    os.environ["COMFYUI_PATH"] = args.comfyui
    os.environ.setdefault("VCT_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    from support import comfy_env

    comfy_env.ensure_bootstrapped()
    from support import comfy_runner

    pack = comfy_runner.Pack(comfy_runner.load_pack())
    source, image = inputs(args)
    results, outputs = {}, {}
    # The source prompt is encoded once, by the configuration that runs first, and both invert it.
    # ComfyUI's text encoder keeps float16 weights by default (even on the CPU), and its embedding
    # of the prompt differs slightly from the float32 one; that changes the inversion problem itself
    # and, with it, the reconstruction error (at 128 px: 0.05908 vs 0.05878), which would then no
    # longer compare the two inversions.
    source_prompt = None
    for cfg in (REFERENCE, OURS):
        if args.config in ("both", cfg.name):
            with torch.inference_mode():
                models = build(args, cfg.reference)
                print(f"{cfg.name}: device {models.model.load_device}, UNet {models.dtype}, model "
                      f"{args.checkpoint or args.model}, {args.size}px, {args.steps} steps, {args.inner_steps} "
                      f"inner, {args.concept_steps} concept steps, source prompt encoded by "
                      f"{'this configuration' if source_prompt is None else 'the reference'}", flush=True)
                results[cfg.name], outputs[cfg.name] = run_config(pack, cfg, models, source, image, args,
                                                                  source_prompt)
                source_prompt = outputs[cfg.name].pop("source_prompt")
            del models
            release()
    with torch.inference_mode():
        judge = build(args, reference=True)  # the concept loss of both is measured the same way, in float32
        for out in outputs.values():
            out["concept_loss"] = fixed_concept_loss(pack, judge, out.pop("vectors"), image)
    if args.config == "both":
        print_table(results, outputs)
    else:
        for stage_name, figures in results[args.config].items():
            print(f"{stage_name:<14}{args.config:<11}{figures['time_s']:>10.3f}{figures['forward']:>10}"
                  f"{figures['forward_backward']:>10}{figures['peak_mb']:>10.0f}")
        quality = {k: v for k, v in outputs[args.config].items() if isinstance(v, (float, bool))}
        print(f"quality: {quality}")
    return 0


def release() -> None:
    """Free what the last configuration left loaded, so the next starts from the same state."""
    import gc

    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


if __name__ == "__main__":
    sys.exit(main())
