"""Probe: how ComfyUI's own models behave under autograd on CPU (not a test; prints numbers).

    COMFYUI_PATH=/path/to/ComfyUI python tests/host/support/probe_comfy_autograd.py

(i)   gradient from `c_crossattn` to `model.model.apply_model(...)` with ComfyUI's default CPU
      attention, and with `transformer_options["optimized_attention_override"]` -> attention_pytorch;
(ii)  whether SD1 CLIP's forward survives backward with a requires_grad embedding in the token list,
      where it fails, and whether calling the transformer directly / layer by layer works;
(iii) whether models built inside `torch.inference_mode()` (as the executor loads checkpoints)
      have inference-tensor parameters, and what fails when gradients are needed.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/host, where the support package is

from support import comfy_env  # noqa: E402

comfy_env.ensure_bootstrapped()

import comfy.ldm.modules.attention as attention  # noqa: E402
import torch  # noqa: E402

from support import comfy_tiny  # noqa: E402

torch.set_num_threads(2)


def pytorch_override(func, *args, **kwargs):
    return attention.attention_pytorch(*args, **kwargs)


def last_frame(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    return f"{tb[-1].filename.split('ComfyUI/')[-1]}:{tb[-1].lineno} `{tb[-1].line}`" if tb else "?"


def unet_grad(model, ctx, x, sigma, transformer_options=None):
    ctx = ctx.detach().clone().requires_grad_(True)
    kwargs = {} if transformer_options is None else {"transformer_options": transformer_options}
    out = model.model.apply_model(x, sigma, c_crossattn=ctx, **kwargs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * w).sum().backward()
    return out.detach(), ctx.grad


def probe_unet():
    print("== (i) UNet: d apply_model / d c_crossattn ==")
    print("default CPU attention:", attention.optimized_attention.__name__)
    model = comfy_tiny.tiny_sd15_model()
    model.model.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g) * 3.0
    sigma = torch.tensor([3.0])
    ctx = torch.randn(1, 77, 64, generator=g)
    out_d, grad_d = unet_grad(model, ctx, x, sigma)
    opts = {"optimized_attention_override": pytorch_override}
    out_p, grad_p = unet_grad(model, ctx, x, sigma, opts)
    print(f"  default   : |grad| = {grad_d.norm():.6g}")
    print(f"  pytorch   : |grad| = {grad_p.norm():.6g}")
    print(f"  forward max diff default vs pytorch: {(out_d - out_p).abs().max():.3g}; "
          f"grad rel diff: {((grad_d - grad_p).norm() / grad_p.norm()):.3g}")
    # finite-difference check of the directional derivative
    d = torch.randn(ctx.shape, generator=g)
    w = torch.randn(out_d.shape, generator=torch.Generator().manual_seed(5))
    eps = 1e-2
    with torch.no_grad():
        fp = (model.model.apply_model(x, sigma, c_crossattn=ctx + eps * d) * w).sum()
        fm = (model.model.apply_model(x, sigma, c_crossattn=ctx - eps * d) * w).sum()
    print(f"  finite diff {((fp - fm) / (2 * eps)).item():.6g} vs autograd default {(grad_d * d).sum():.6g}, "
          f"pytorch {(grad_p * d).sum():.6g}")
    # longer contexts (SD1.5 prompts > 75 tokens give 154, 231, ...), bigger latents
    for shape, n_ctx in (((1, 4, 32, 32), 77), ((2, 4, 16, 16), 154)):
        x2 = torch.randn(shape, generator=g)
        c2 = torch.randn(shape[0], n_ctx, 64, generator=g)
        _, gd = unet_grad(model, c2, x2, torch.full((shape[0],), 2.0))
        _, gp = unet_grad(model, c2, x2, torch.full((shape[0],), 2.0), opts)
        print(f"  latent {shape}, ctx {n_ctx}: |grad| default {gd.norm():.6g}, pytorch {gp.norm():.6g}")
    # sub-quadratic attention chunks keys/values only when free memory looks short
    import comfy.model_management as mm

    orig = mm.get_free_memory
    try:
        mm.get_free_memory = lambda *a, **k: (1e5, 1e5)
        _, gd = unet_grad(model, ctx, x, sigma)
        print(f"  default, low free memory: |grad| = {gd.norm():.6g}")
    except Exception as e:  # noqa: BLE001
        print(f"  default, low free memory (kv-chunked path): {type(e).__name__}: {str(e).splitlines()[0][:120]} "
              f"at {last_frame(e)}")
    finally:
        mm.get_free_memory = orig


def probe_clip():
    print("== (ii) SD1 CLIP with a requires_grad embedding in the token list ==")
    clip = comfy_tiny.tiny_sd1_clip(None)
    enc = clip.cond_stage_model.clip_l
    tokens = clip.tokenize("a photo of a cat")
    g = torch.Generator().manual_seed(3)
    vecs = torch.randn(3, 64, generator=g).requires_grad_(True)
    row = list(tokens["l"][0])
    row = row[:4] + [(vecs[i], 1.0) for i in range(3)] + row[4:-3]
    tokens_emb = {"l": [row]}

    wz = torch.randn(1, 77, 64, generator=g)  # a weighted loss: sum() of a LayerNorm output has zero gradient
    with torch.inference_mode(False), torch.enable_grad():
        for label, fn in (
            ("clip.encode_from_tokens", lambda: clip.encode_from_tokens(tokens_emb)),
            ("cond_stage_model.encode_token_weights",
             lambda: clip.cond_stage_model.encode_token_weights(tokens_emb)[0]),
        ):
            vecs.grad = None
            try:
                out = fn()
                print(f"  {label}: forward ok, requires_grad={out.requires_grad}")
                (out * wz).sum().backward()
                print(f"    backward ok, |grad| = {vecs.grad.norm():.6g}")
            except Exception as e:  # noqa: BLE001
                print(f"    {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        # where exactly: anomaly mode names the forward op
        vecs.grad = None
        try:
            with torch.autograd.detect_anomaly(check_nan=False):
                import warnings

                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    out = clip.cond_stage_model.encode_token_weights(tokens_emb)[0]
                    try:
                        (out * wz).sum().backward()
                    except Exception as e:  # noqa: BLE001
                        fwd = [str(x.message) for x in w if "Traceback of forward call" in str(x.message)]
                        lines = fwd[0].splitlines() if fwd else []
                        frames = [(ln.strip(), lines[i + 1].strip()) for i, ln in enumerate(lines[:-1])
                                  if 'File "' in ln and "ComfyUI/" in ln]
                        print(f"    anomaly mode: {type(e).__name__}; ComfyUI frames of the forward op "
                              f"whose saved input was modified in place:")
                        for f, code in frames[-3:]:
                            print(f"      {f.split('ComfyUI/')[-1]}: {code}")
        except Exception as e:  # noqa: BLE001
            print("    anomaly probe itself failed:", e)

        # direct transformer call with process_tokens embeds
        vecs.grad = None
        device = enc.transformer.get_input_embeddings().weight.device
        try:
            embeds, attention_mask, num_tokens, embeds_info = enc.process_tokens([[t for t, _ in row]], device)
            print(f"  process_tokens: embeds {tuple(embeds.shape)} requires_grad={embeds.requires_grad}, "
                  f"embeds_info={[(i['index'], i['size']) for i in embeds_info]}")
            outs = enc.transformer(None, None, embeds=embeds, num_tokens=num_tokens, intermediate_output=None,
                                   final_layer_norm_intermediate=True, dtype=torch.float32)
            (outs[0] * wz).sum().backward()
            print(f"  direct transformer(...): backward ok, |grad| = {vecs.grad.norm():.6g}")
        except Exception as e:  # noqa: BLE001
            print(f"  direct transformer(...): {type(e).__name__}: {str(e).splitlines()[0][:160]} at {last_frame(e)}")

        # layer-by-layer, out of place, with ComfyUI's own submodules
        vecs.grad = None
        embeds, attention_mask, num_tokens, _ = enc.process_tokens([[t for t, _ in row]], device)
        z = layerwise_clip(enc.transformer, embeds)
        (z * wz).sum().backward()
        with torch.no_grad():
            ref = clip.cond_stage_model.encode_token_weights({"l": [[(t.detach() if torch.is_tensor(t) else t, w)
                                                                      for t, w in row]]})[0]
        print(f"  layer-by-layer out-of-place: |grad| = {vecs.grad.norm():.6g}, max diff vs ComfyUI forward "
              f"{(z.detach() - ref).abs().max():.3g}")
        d = torch.randn(vecs.shape, generator=g)
        eps = 1e-2
        with torch.no_grad():
            def f(v):
                r = row[:4] + [(v[i], 1.0) for i in range(3)] + row[7:]
                e, *_ = enc.process_tokens([[t for t, _ in r]], device)
                return (layerwise_clip(enc.transformer, e) * wz).sum()
            fd = (f(vecs + eps * d) - f(vecs - eps * d)) / (2 * eps)
        print(f"    finite diff {fd.item():.6g} vs autograd {(vecs.grad * d).sum().item():.6g}")


def layerwise_clip(transformer, embeds):
    """CLIPTextModel forward ("last" layer) without in-place adds, reusing ComfyUI's submodules."""
    import comfy.ops
    from comfy.ldm.modules.attention import optimized_attention_for_device

    tm = transformer.text_model
    x = embeds + comfy.ops.cast_to(tm.embeddings.position_embedding.weight, dtype=embeds.dtype, device=embeds.device)
    n = x.shape[1]
    mask = torch.full((n, n), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)
    attn = optimized_attention_for_device(x.device, mask=True, small_input=True)
    for layer in tm.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, attn)
        x = x + layer.mlp(layer.layer_norm2(x))
    return tm.final_layer_norm(x)


def probe_inference_mode():
    print("== (iii) models built inside torch.inference_mode() ==")
    with torch.inference_mode():
        model = comfy_tiny.tiny_sd15_model()
        clip = comfy_tiny.tiny_sd1_clip(None)
        vae = comfy_tiny.tiny_vae()
    parts = (("unet", model.model.diffusion_model), ("clip", clip.cond_stage_model), ("vae", vae.first_stage_model))
    for label, mod in parts:
        ps = list(mod.parameters())
        print(f"  {label}: {sum(p.is_inference() for p in ps)}/{len(ps)} parameters are inference tensors; "
              f"requires_grad {sum(p.requires_grad for p in ps)}/{len(ps)}; type {type(ps[0]).__name__}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    sigma = torch.tensor([2.0])
    ctx = torch.randn(1, 77, 64, generator=g)
    opts = {"optimized_attention_override": pytorch_override}
    with torch.inference_mode(False), torch.enable_grad():
        for label, o in (("default attention", None), ("attention_pytorch", opts)):
            try:
                _, grad = unet_grad(model, ctx, x, sigma, o)
                print(f"  unet grad wrt ctx ({label}): ok |grad| = {grad.norm():.6g}")
            except Exception as e:  # noqa: BLE001
                print(f"  unet grad wrt ctx ({label}): {type(e).__name__}: {str(e).splitlines()[0][:150]} "
                      f"at {last_frame(e)}")
        try:
            model.model.diffusion_model.requires_grad_(False)
            print("  requires_grad_(False) on inference params: ok")
        except Exception as e:  # noqa: BLE001
            print(f"  requires_grad_(False): {type(e).__name__}: {e}")
        # an inference tensor as input (e.g. a LATENT from an upstream node)
        with torch.inference_mode():
            x_inf = torch.randn(1, 4, 8, 8)
        fresh = comfy_tiny.tiny_sd15_model()
        fresh.model.requires_grad_(False)
        for label, xx in (("inference-tensor latent", x_inf), ("its clone", x_inf.clone())):
            try:
                _, grad = unet_grad(fresh, ctx, xx, sigma, opts)
                print(f"  normal model, {label}: ok |grad| = {grad.norm():.6g}")
            except Exception as e:  # noqa: BLE001
                print(f"  normal model, {label}: {type(e).__name__}: {str(e).splitlines()[0][:150]} at {last_frame(e)}")
        # the loaded-for-sampling path: ModelPatcher.patch_model / load_models_gpu
        import comfy.model_management as mm

        mm.load_models_gpu([model])
        ps = list(model.model.diffusion_model.parameters())
        print(f"  after load_models_gpu (CPU, inside inference_mode(False)): "
              f"{sum(p.is_inference() for p in ps)}/{len(ps)} still inference tensors")
        # workaround that leaves the shared model untouched: torch.func.functional_call with
        # normal-tensor clones of the parameters (one copy, reusable across optimisation steps)
        wrapper = _ApplyModel(model.model)
        params = {n: p.detach().clone() for n, p in wrapper.named_parameters()}
        ctx_g = ctx.clone().requires_grad_(True)
        out = torch.func.functional_call(wrapper, params, (x, sigma),
                                         {"c_crossattn": ctx_g, "transformer_options": opts})
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
        print(f"  functional_call with cloned parameters: ok |grad| = {ctx_g.grad.norm():.6g}; "
              f"shared model params still inference: {all(p.is_inference() for p in ps)}")
        # text encoder built in inference mode, layer-by-layer path
        enc = clip.cond_stage_model.clip_l
        vec = torch.randn(1, 64, generator=g).requires_grad_(True)
        wt = torch.randn(1, 77, 64, generator=g)
        row = [t for t, _ in clip.tokenize("a photo")["l"][0]]
        row = row[:1] + [vec[0]] + row[1:-1]
        embeds, *_ = enc.process_tokens([row], torch.device("cpu"))
        try:
            (layerwise_clip(enc.transformer, embeds) * wt).sum().backward()
            print(f"  text encoder (inference params), layer-by-layer: ok |grad| = {vec.grad.norm():.6g}")
        except Exception as e:  # noqa: BLE001
            print(f"  text encoder (inference params), layer-by-layer: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:100]} at {last_frame(e)}")
        tparams = {n: p.detach().clone() for n, p in enc.transformer.named_parameters()}
        vec.grad = None
        embeds, *_ = enc.process_tokens([row], torch.device("cpu"))
        z = torch.func.functional_call(_Layerwise(enc.transformer), {f"t.{k}": v for k, v in tparams.items()},
                                       (embeds,))
        (z * wt).sum().backward()
        print(f"  text encoder, functional_call(cloned params) + layer-by-layer: ok |grad| = {vec.grad.norm():.6g}")


class _ApplyModel(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *args, **kwargs):
        return self.m.apply_model(*args, **kwargs)


class _Layerwise(torch.nn.Module):
    def __init__(self, t):
        super().__init__()
        self.t = t

    def forward(self, embeds):
        return layerwise_clip(self.t, embeds)


if __name__ == "__main__":
    t0 = time.time()
    probe_unet()
    probe_clip()
    probe_inference_mode()
    print(f"total {time.time() - t0:.1f} s")
