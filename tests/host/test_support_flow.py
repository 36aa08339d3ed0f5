"""The tiny SD3 and Flux models of comfy_tiny_flow, on ComfyUI's own classes: flow sampling, conditioning,
the hooks joint-attention control will use (dit block replaces, the attention override), and the
kernel's Euler inversion of the flow ODE through them (the VCT nodes on them: test_flow_nodes.py)."""
from __future__ import annotations

import comfy.model_sampling
import pytest
import torch
from support import comfy_tiny_flow as flow

FAMILIES = {
    "sd3": (flow.tiny_sd3_model, flow.tiny_sd3_clip, comfy.model_sampling.ModelSamplingDiscreteFlow,
            [("double_block", 0), ("double_block", 1)]),
    "flux": (flow.tiny_flux_model, flow.tiny_flux_clip, comfy.model_sampling.ModelSamplingFlux,
             [("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1)]),
}


@pytest.fixture(params=sorted(FAMILIES), scope="module")
def family(request, comfy_session):
    build_model, build_clip, sampling, blocks = FAMILIES[request.param]
    clip = build_clip()
    context, pooled = clip.encode_from_tokens(clip.tokenize("a red striped circle"), return_pooled=True)
    return dict(name=request.param, model=build_model(), context=context, pooled=pooled, sampling=sampling,
                blocks=blocks)


def denoiser(family, transformer_options=None):
    """The kernel's denoiser contract on the family's model: ComfyUI's apply_model with its conditioning."""
    model = family["model"].model

    def denoise(x, sigma, cond, options=None):
        rows = x.shape[0]
        extra = dict(c_crossattn=family["context"].expand(rows, -1, -1), y=family["pooled"].expand(rows, -1))
        if family["name"] == "flux":
            extra["guidance"] = torch.full((rows,), 3.5)
        return model.apply_model(x, sigma, transformer_options=dict(transformer_options or {}), **extra)

    return denoise


def test_flow_sampling_and_conditioning(family):
    model = family["model"].model
    assert isinstance(model.model_sampling, comfy.model_sampling.CONST)
    assert isinstance(model.model_sampling, family["sampling"])
    assert float(model.model_sampling.sigma_max) == pytest.approx(1.0)
    width = flow.TINY_T5_WIDTH
    minimum = 77 if family["name"] == "sd3" else 256  # T5's minimum length in each family's tokenizer
    assert family["context"].shape[0] == 1 and family["context"].shape[1] >= minimum
    assert family["context"].shape[2] == width
    pooled_width = flow.SD3_POOLED_WIDTH if family["name"] == "sd3" else flow.TINY_FLUX_CLIP_L_WIDTH
    assert tuple(family["pooled"].shape) == (1, pooled_width)
    x = torch.randn(1, flow.LATENT_CHANNELS, 8, 8)
    out = denoiser(family)(x, torch.tensor([0.5]), None)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_joint_attention_is_reachable_per_block_with_the_text_length(family):
    # What VCT's glue will rely on: a dit block replace per block (the block index and the text
    # length), and ComfyUI's attention override inside it (the joint q, k, v).
    seen = []

    def block(key):
        def replace(args, extra):
            options = dict(args["transformer_options"], vct_block=key)
            if "txt" in args:
                options["vct_text"] = args["txt"].shape[1]
            return extra["original_block"]({**args, "transformer_options": options})
        return replace

    def override(func, *args, **kwargs):
        options = kwargs["transformer_options"]
        seen.append((options.get("vct_block"), options.get("vct_text"), tuple(args[0].shape)))
        return func(*args, **kwargs)

    patcher = family["model"].clone()
    for kind, index in family["blocks"]:
        patcher.set_model_patch_replace(block((kind, index)), "dit", kind, index)
    patcher.model_options["transformer_options"]["optimized_attention_override"] = override
    x = torch.randn(2, flow.LATENT_CHANNELS, 8, 8)
    options = patcher.model_options["transformer_options"]
    with torch.no_grad():
        denoiser(family, options)(x, torch.tensor([0.5, 0.5]), None)
    text = family["context"].shape[1]
    assert [entry[0] for entry in seen] == family["blocks"]
    for key, text_seen, shape in seen:
        # 8x8 latent, 2x2 patches: 16 image tokens after the text.
        tokens = shape[1] if len(shape) == 3 else shape[2]  # SD3 [rows, L, H*D], Flux [rows, H, L, D]
        assert tokens == text + 16, (key, shape)
        if key[0] == "double_block":
            assert text_seen == text
    assert "optimized_attention_override" not in family["model"].model_options.get("transformer_options", {})


def test_euler_inversion_of_the_flow_then_sampling_retraces_the_latent(family, pack):
    ops = pack.vct_ops
    sampling = family["model"].model.model_sampling
    sigmas = ops.ddim_sigmas(sampling.sigmas, 50)
    assert float(sigmas[0]) > 0.9 and float(sigmas[-2]) < 0.05
    z0 = torch.randn(1, flow.LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0))
    denoise = denoiser(family)
    trajectory = ops.ddim_invert(denoise, z0, sigmas, torch.zeros(1, 1), space=ops.FLOW)
    rebuilt = ops.ddim_sample(denoise, trajectory[-1], sigmas, torch.zeros(1, 1))
    error = float((rebuilt - z0).pow(2).mean() / z0.pow(2).mean())
    print(f"{family['name']}: relative squared error of Euler inversion and sampling, 50 steps: {error:.2e}")
    assert error < 0.05
