"""The reference code's way of running each VCT stage, reproduced on ComfyUI's models for bench_vct.py's
"reference" configuration: attention as explicit softmax maps, prompt-to-prompt's attention store,
the VAE encoding and posterior sample of a flipped reference image at every micro-batch, and the
step-by-step null-text loop with a 2-row latent update.
"""
from __future__ import annotations

import torch


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

    for key in pack.sd_unet.transformer_block_keys(clone):
        for kind in ("attn1", "attn2"):
            clone.set_model_patch_replace(make((kind, *key)), kind, *key)
    return clone, store


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
