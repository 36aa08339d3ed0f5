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


@dataclasses.dataclass
class Config:
    """One side of the comparison."""

    name: str
    fuse_accumulation: bool
    store_attention: bool
    half_precision: bool  # compute in float16 on a GPU (ComfyUI's default for SD1.5); the CPU stays in float32


REFERENCE = Config("reference", fuse_accumulation=False, store_attention=True, half_precision=False)
OURS = Config("ours", fuse_accumulation=True, store_attention=False, half_precision=True)


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


def attention_store(pack, model, limit):
    """Return a clone of `model` that keeps every conditional self-attention map of at most `limit` queries, summed
    over steps, as the reference code's (unused) AttentionStore does."""
    store = {}
    clone = model.clone()

    def make(key):
        def patch(q, k, v, extra):
            heads = extra["n_heads"]
            if q.shape[1] <= limit:
                half = q.shape[0] // 2
                probs = pack.vct_ops.attention_probs(q[half:], k[half:], heads)
                store[key] = store.get(key, 0) + probs
            return pack.vct_ops.sdpa_attention(q, k, v, heads)
        return patch

    for key in pack.host.transformer_block_keys(clone):
        clone.set_model_patch_replace(make(key), "attn1", *key)
    return clone, store


def build(args):
    """Return (model, clip, latent source, latent reference) for the chosen model."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy_tiny

    size = args.size // 8
    g = torch.Generator().manual_seed(0)
    latents = [{"samples": torch.randn(1, 4, size, size, generator=g)} for _ in range(2)]
    if args.checkpoint:
        model, clip, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False)[:3]
        return model, clip, *latents
    if args.model == "tiny":
        return comfy_tiny.tiny_sd15_model(), comfy_tiny.tiny_sd1_clip(), *latents
    config = comfy.supported_models.SD15(dict(FULL_SD15_UNET))
    config.unet_config.update(num_heads=8, num_head_channels=-1)
    device = comfy.model_management.get_torch_device()
    config.set_inference_dtype(torch.float32, None)
    unet = config.get_model({}, "", device=torch.device("cpu"))
    comfy_tiny.init_tiny_weights_(unet.diffusion_model, 0)
    model = comfy.model_patcher.ModelPatcher(unet, load_device=device,
                                             offload_device=comfy.model_management.unet_offload_device())
    clip = comfy.sd.CLIP(config.clip_target(), parameters=123_000_000, model_options={"dtype": torch.float32})
    comfy_tiny.init_tiny_weights_(clip.cond_stage_model, 1)
    return model, clip, *latents


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


def run_config(pack, cfg: Config, model, clip, source_latent, reference_latent, args):
    """Run every stage under one configuration; return ({stage: figures}, outputs for the quality checks)."""
    import comfy.model_management

    vct, host, text, sample = pack.vct_ops, pack.host, pack.text, pack.sample
    device = model.load_device
    model = model.clone()
    if cfg.half_precision and device.type == "cuda":
        model.set_model_compute_dtype(torch.float16)  # weights cast per layer; learned tensors stay float32
    elif not cfg.half_precision:
        model.set_model_compute_dtype(torch.float32)
    results, out = {}, {}
    z0 = host.latent_in(model, source_latent, "source")
    empty = encode(clip, "")
    cond = host.model_cond(model, empty, "source", z0.shape)
    sigmas = vct.ddim_sigmas(host.train_sigmas(model), args.steps).to(device)
    comfy.model_management.load_models_gpu([model, clip.patcher])
    cond = {k: v.to(device) for k, v in cond.items()}

    x0 = vct.latent_to_x(z0.to(device), sigmas[-1])
    trajectory = stage(results, "ddim_invert", device,
                       lambda c: vct.ddim_invert(c(host.Denoiser(model)), x0, sigmas, cond))
    out["x0"] = x0

    with host.training_mode():
        host.make_autograd_safe(model.model.diffusion_model)
        nulls = stage(results, "null_text", device, lambda c: vct.null_text_invert(
            c(host.Denoiser(model, gradients=True)), trajectory.clone(), sigmas.clone(),
            {k: v.clone() for k, v in cond.items()}, {k: v.clone() for k, v in cond.items()},
            inner_steps=args.inner_steps)).embeddings

        encoders = text.text_encoders(clip, "benchmark")
        for e in encoders:
            host.make_autograd_safe(e.module)
        references = host.latent_in(model, reference_latent, "reference").to(device)
        init = {e.key: text.initializer_vectors(e, "dog", 3).to(device) for e in encoders}
        config = vct.ConceptConfig(steps=args.concept_steps, grad_accum=4, seed=0,
                                   fuse_accumulation=cfg.fuse_accumulation)
        concept = stage(results, "concept_learn", device, lambda c: vct.learn_concept(
            c(host.Denoiser(model, gradients=True)), text.GradientEncoder(encoders, model, references.shape, device),
            init, pack.learn.latent_sampler(references.clone()), host.train_sigmas(model).to(device), config))
        out["concept_loss"] = fixed_concept_loss(pack, model, encoders, concept.vectors, references, device)

    concept_cond = host.model_cond(model, text.encode_concept(encoders, concept.vectors), "concept", z0.shape)
    concept_cond = {k: v.to(device) for k, v in concept_cond.items()}
    injection = sample.injection_config(cond["c_crossattn"].cpu(), text.encode_concept(encoders, concept.vectors),
                                        0.9, 0.2, 0.5, 0)
    base = model
    if cfg.store_attention:
        base, store = attention_store(pack, model, limit=(z0.shape[-1] * z0.shape[-2]) // 4)
    patched = sample.patched_clone(base, vct.AttentionController(sigmas.cpu(), injection))
    comfy.model_management.load_models_gpu([patched])
    result = stage(results, "dual_branch", device, lambda c: vct.dual_branch_sample(
        c(host.Denoiser(patched)), trajectory[-1], sigmas, cond, concept_cond, nulls))
    stage(results, "plain_cfg", device, lambda c: vct.ddim_sample(
        c(host.Denoiser(model)), trajectory[-1], sigmas, concept_cond, nulls, 7.5))
    out["reconstruction_mse"] = float(((result.ref - x0) ** 2).mean())
    out["b_to_bstar_mse"] = float(((result.main - result.ref) ** 2).mean())
    return results, out


def fixed_concept_loss(pack, model, encoders, vectors, references, device, samples=16):
    """Return the concept loss of `vectors` on fixed timesteps and noises (the same for both configurations)."""
    vct, host, text = pack.vct_ops, pack.host, pack.text
    g = torch.Generator().manual_seed(1234)
    sigmas = host.train_sigmas(model)
    picks = torch.randint(0, sigmas.numel(), (samples,), generator=g)
    noise = torch.randn(samples, *references.shape[1:], generator=g).to(device)
    total = 0.0
    with torch.no_grad():
        cond = text.GradientEncoder(encoders, model, references.shape, device)(vectors)
        for i in range(samples):
            sigma = sigmas[picks[i : i + 1]].to(device)
            loss = vct.concept_loss(host.Denoiser(model), cond, references[:1], sigma, noise[i : i + 1],
                                    host.prediction_type(model))
            total += float(loss)
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
    model, clip, source, reference = build(args)
    device = model.load_device
    print(f"device {device}, model {args.checkpoint or args.model}, {args.size}px, {args.steps} steps, "
          f"{args.inner_steps} inner, {args.concept_steps} concept steps")
    results, outputs = {}, {}
    for cfg in (REFERENCE, OURS):
        if args.config in ("both", cfg.name):
            with torch.inference_mode():
                results[cfg.name], outputs[cfg.name] = run_config(pack, cfg, model, clip, source, reference, args)
    if args.config == "both":
        print_table(results, outputs)
    else:
        for stage_name, figures in results[args.config].items():
            print(f"{stage_name:<14}{args.config:<11}{figures['time_s']:>10.3f}{figures['forward']:>10}"
                  f"{figures['forward_backward']:>10}{figures['peak_mb']:>10.0f}")
        quality = {k: v for k, v in outputs[args.config].items() if isinstance(v, float)}
        print(f"quality: {quality}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
