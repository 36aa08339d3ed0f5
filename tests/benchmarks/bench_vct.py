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
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "host"))

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


class PeakMemory:
    """Peak memory over a block: the CUDA allocator's peak, or the process's resident set sampled every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.stop.set()
            self.thread.join()


class Counting:
    """Wraps a denoiser and counts model rows run without and with gradients."""

    def __init__(self, denoise) -> None:
        self.denoise, self.forward, self.backward = denoise, 0, 0

    def __call__(self, x, sigma, cond, options=None):
        if torch.is_grad_enabled():
            self.backward += x.shape[0]
        else:
            self.forward += x.shape[0]
        return self.denoise(x, sigma, cond, options)


def explicit_attention(func, q, k, v, heads, *args, **kwargs):
    """ComfyUI attention override: softmax(q k^T) materialised, as the reference code's attention computes it."""
    import comfy.ldm.modules.attention as comfy_attention

    # attention_basic is itself wrapped; the wrapper's own marker in kwargs keeps it from recursing.
    return comfy_attention.attention_basic(q, k, v, heads, *args, **kwargs)


def reference_attention(model):
    """Return a clone of `model` whose every attention call materialises its maps."""
    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = explicit_attention
    return clone


def attention_store(pack, model, limit):
    """Return (a clone of `model` whose attention keeps the conditional rows' maps of at most `limit` queries,
    summed over steps, like prompt-to-prompt's AttentionStore, and the store)."""
    vct = pack.vct_ops
    store = {}
    clone = model.clone()

    def make(key):
        def patch(q, k, v, extra):
            heads = extra["n_heads"]
            probs = vct.attention_probs(q, k, heads)
            if q.shape[1] <= limit:
                half = q.shape[0] // 2
                store[key] = store.get(key, 0) + probs[half:]
            return vct.apply_probs(probs, v, heads)
        return patch

    for key in pack.host.transformer_block_keys(clone):
        for kind in ("attn1", "attn2"):
            clone.set_model_patch_replace(make((kind, *key)), kind, *key)
    return clone, store


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
    import comfy_tiny

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


def posterior(vae, image):
    """Return the VAE posterior's (mean, std) for `image`, in float32."""
    moments = vae.quant_conv(vae.encoder(image.to(next(vae.parameters()).dtype))).float()
    mean, logvar = moments.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def reference_sampler(model, vae, image):
    """Return a latent sampler that, like the reference's training loop, flips the image with probability 0.5,
    encodes it and samples the posterior at every call."""
    def sample(generator):
        flipped = image.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else image
        with torch.no_grad():
            mean, std = posterior(vae, flipped.to(next(vae.parameters()).device))
        noise = torch.randn(mean.shape, generator=generator).to(mean)
        return model.model.process_latent_in(mean + std * noise)
    return sample


def reference_null_text(pack, denoise, trajectory, sigmas, cond, uncond, inner_steps, guidance=7.5):
    """Return per-step null embeddings computed step for step like the reference's null-text loop."""
    vct = pack.vct_ops
    steps = sigmas.numel() - 1
    x = trajectory[-1].clone()
    phi = {k: v.clone() for k, v in uncond.items()}
    out = []
    with torch.enable_grad():
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            sig = sigma.view(1).to(x)
            target = trajectory[steps - i - 1]
            phi = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
            optimizer = torch.optim.Adam(list(phi.values()), lr=1e-2 * (1.0 - i / 100.0))
            with torch.no_grad():
                den_cond = denoise(x, sig, cond, None)
            for _ in range(inner_steps):
                den_uncond = denoise(x, sig, phi, None)
                x_prev = vct.ddim_step(x, sigma, sigma_next, vct.cfg(den_uncond, den_cond, guidance))
                loss = torch.mean((x_prev - target) ** 2) / (1.0 + sigma_next * sigma_next)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if loss.item() < 1e-5 + i * 2e-5:
                    break
            phi = {k: v.detach() for k, v in phi.items()}
            out.append(phi)
            with torch.no_grad():
                both = {k: torch.cat([phi[k], cond[k]]) for k in cond}
                den = denoise(torch.cat([x, x]), sig.repeat(2), both, None)
                x = vct.ddim_step(x, sigma, sigma_next, vct.cfg(den[:1], den[1:], guidance))
    return out


def stage(results, name, device, fn):
    """Run `fn(counter_factory)`, recording wall time, model rows and peak memory under `name`; return its value."""
    counters = []

    def counted(denoise):
        counter = Counting(denoise)
        counters.append(counter)
        return counter

    with PeakMemory(device) as memory:
        start = time.perf_counter()
        value = fn(counted)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    results[name] = {"time_s": seconds, "forward": sum(c.forward for c in counters),
                     "forward_backward": sum(c.backward for c in counters), "peak_mb": memory.peak / 2**20}
    return value


def run_config(pack, cfg: Config, models: Models, source_latent, image, args, source_prompt=None):
    """Run every stage under one configuration; return ({stage: figures}, outputs for the quality checks).

    `source_prompt` is the source prompt's CONDITIONING from the configuration that ran first, if
    any, so both invert the same problem (see `main`); without it this configuration encodes it.
    """
    import comfy.model_management

    vct, host, text, sample = pack.vct_ops, pack.host, pack.text, pack.sample
    clip, vae = models.clip, models.vae
    model = reference_attention(models.model) if cfg.reference else models.model.clone()
    device = model.load_device
    results, out = {}, {}
    z0 = pack.inputs.latent_in(model, source_latent, "source")
    empty = source_prompt if source_prompt is not None else encode(clip, "")
    out["source_prompt"] = empty
    cond = pack.inputs.model_cond(model, empty, "source", z0.shape)
    sigmas = vct.ddim_sigmas(host.train_sigmas(model), args.steps).to(device)
    comfy.model_management.load_models_gpu([model, clip.patcher])
    cond = {k: v.to(device) for k, v in cond.items()}

    x0 = vct.latent_to_x(z0.to(device), sigmas[-1])
    trajectory = stage(results, "ddim_invert", device,
                       lambda c: vct.ddim_invert(c(host.Denoiser(model)), x0, sigmas, cond))

    shape = (1, *z0.shape[1:])
    train = model
    if not cfg.reference:  # what the nodes do: recompute activations in backward when memory is short
        train = pack.recompute.checkpointed_clone(model) if args.low_memory else host.training_model(model, shape)
        out["checkpointed"] = train is not model
        comfy.model_management.load_models_gpu([train, clip.patcher])
    unet = train.model.diffusion_model
    with host.training_mode():
        host.make_autograd_safe(unet)
        # The reference's attention is plain autograd; ours needs the gradient-safe override.
        denoiser = host.Denoiser(train, gradients=not cfg.reference)
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

        encoders = text.text_encoders(clip, "benchmark")
        for e in encoders:
            host.make_autograd_safe(e.module)
        init = {e.key: text.initializer_vectors(e, "dog", 3).to(device) for e in encoders}

        def learn(c):
            if cfg.reference:
                sampler, fuse = reference_sampler(model, vae, image), False
            else:  # what the nodes do: VAEEncode once (the posterior mode), fuse when memory allows
                with torch.no_grad():
                    mean, _ = posterior(vae, image.to(device))
                sampler = pack.learn.latent_sampler(pack.inputs.latent_in(model, {"samples": mean.cpu()}, "reference"))
                fuse = not args.low_memory and host.training_fits(model, (4, *shape[1:]))
            config = vct.ConceptConfig(steps=args.concept_steps, grad_accum=4, seed=args.seed,
                                        fuse_accumulation=fuse)
            out["fused"] = fuse
            return vct.learn_concept(c(denoiser), text.GradientEncoder(encoders, train, shape, device), init,
                                     sampler, host.train_sigmas(model).to(device), config)

        concept = stage(results, "concept_learn", device, learn)
    out["vectors"] = concept.vectors

    concept_cond = pack.inputs.model_cond(model, text.encode_concept(encoders, concept.vectors), "concept", z0.shape)
    concept_cond = {k: v.to(device) for k, v in concept_cond.items()}
    injection = sample.injection_config(cond["c_crossattn"].cpu(), text.encode_concept(encoders, concept.vectors),
                                        0.9, 0.2, 0.5, 0)
    base = model
    if cfg.reference:
        base, store = attention_store(pack, model, limit=32 * 32)
    patched = sample.patched_clone(base, vct.AttentionController(sigmas.cpu(), injection))
    comfy.model_management.load_models_gpu([patched])
    result = stage(results, "dual_branch", device, lambda c: vct.dual_branch_sample(
        c(host.Denoiser(patched)), trajectory[-1], sigmas, cond, concept_cond, nulls))
    stage(results, "plain_cfg", device, lambda c: vct.ddim_sample(
        c(host.Denoiser(model)), trajectory[-1], sigmas, concept_cond, nulls, 7.5))
    out["reconstruction_mse"] = float(((result.ref - x0) ** 2).mean())
    out["b_to_bstar_mse"] = float(((result.main - result.ref) ** 2).mean())
    for param in unet.parameters():
        param.grad = None
    return results, out


def fixed_concept_loss(pack, models: Models, vectors, image, samples=16):
    """Return the concept loss of `vectors` on fixed timesteps and noises, through `models` (float32 for both)."""
    vct, host, text = pack.vct_ops, pack.host, pack.text
    model = models.model
    device = model.load_device
    g = torch.Generator().manual_seed(1234)
    sigmas = host.train_sigmas(model)
    with torch.no_grad():
        mean, _ = posterior(models.vae, image.to(device))
        z0 = pack.inputs.latent_in(model, {"samples": mean.cpu()}, "reference").to(device)
        picks = torch.randint(0, sigmas.numel(), (samples,), generator=g)
        noise = torch.randn(samples, *z0.shape[1:], generator=g).to(device)
        encoders = text.text_encoders(models.clip, "benchmark")
        cond = text.GradientEncoder(encoders, model, z0.shape, device)({k: v.to(device) for k, v in vectors.items()})
        total = 0.0
        for i in range(samples):
            sigma = sigmas[picks[i : i + 1]].to(device)
            total += float(vct.concept_loss(host.Denoiser(model), cond, z0, sigma, noise[i : i + 1],
                                            host.prediction_type(model)))
    return total / samples


def encode(clip, text_prompt):
    """Return the CONDITIONING of a prompt."""
    out = clip.encode_from_tokens(clip.tokenize(text_prompt), return_pooled=True, return_dict=True)
    return [[out.pop("cond"), out]]


class Pack:
    """The pack's modules as ComfyUI loaded them."""

    def __init__(self, module) -> None:
        self.vct_ops = module.vct_ops
        self.host, self.text = module.nodes.host, module.nodes.text
        self.sample, self.learn = module.nodes.sample, module.nodes.learn
        self.recompute = module.nodes.recompute
        self.inputs = module.nodes.inputs


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
    import comfy_env

    comfy_env.ensure_bootstrapped()
    import comfy_runner

    pack = Pack(comfy_runner.load_pack().module)
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
