"""Memory-saving paths of the training nodes: activations recomputed in backward when memory is short."""
from __future__ import annotations

import torch
from support import comfy_tiny
from support.comfy_runner import encode


def blocks(model):
    """Return the transformer blocks currently inside the model's UNet."""
    import comfy.ldm.modules.attention as comfy_attention

    unet = model.model.diffusion_model
    spatial = [m for m in unet.modules() if isinstance(m, comfy_attention.SpatialTransformer)]
    return [b for m in spatial for b in m.transformer_blocks]


def res_blocks(model):
    """Return the residual blocks currently inside the model's UNet, wrapped or not."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as comfy_unet

    unet = model.model.diffusion_model
    found = []
    for blocks_list in (unet.input_blocks, [unet.middle_block], unet.output_blocks):
        for sequence in blocks_list:
            found += [m for m in sequence if isinstance(m, comfy_unet.TimestepBlock)]
    return found


def pass_with_gradient(pack, model, phi, x, sigma):
    """Return (denoised, gradient to phi, forward calls of the first transformer block's attention and of the
    last residual block's input layers). Blocks before the first cross-attention need no backward."""
    attn_calls, res_calls = [], []
    with pack.training.training_mode():
        pack.denoiser.load(model)
        pack.training.make_autograd_safe(model.model.diffusion_model)
        first, last_res = blocks(model)[0], res_blocks(model)[-1]
        hooks = [getattr(first, "block", first).attn1.register_forward_hook(lambda *a: attn_calls.append(1)),
                 getattr(last_res, "block", last_res).in_layers.register_forward_hook(
                     lambda *a: res_calls.append(1))]
        try:
            leaf = phi.clone().requires_grad_(True)
            out = pack.denoiser.Denoiser(model, gradients=True)(x, sigma, {"c_crossattn": leaf})
            out.square().mean().backward()
        finally:
            for hook in hooks:
                hook.remove()
    return out.detach(), leaf.grad, (len(attn_calls), len(res_calls))


def test_checkpointed_clone_gives_the_same_output_and_gradient_and_recomputes(pack, comfy_session):
    with torch.inference_mode():
        model = comfy_tiny.tiny_sd15_model(seed=5)
        clip = comfy_tiny.tiny_sd1_clip(seed=6)
        phi = encode(clip, "a cat")[0][0]
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 0.5])
    phi = phi.repeat(2, 1, 1)

    plain_out, plain_grad, plain_calls = pass_with_gradient(pack, model, phi, x, sigma)
    checkpointed = pack.recompute.checkpointed_clone(model)
    ck_out, ck_grad, ck_calls = pass_with_gradient(pack, checkpointed, phi, x, sigma)
    print(f"(attention, residual) calls per forward+backward: plain {plain_calls}, checkpointed {ck_calls}")

    torch.testing.assert_close(ck_out, plain_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ck_grad, plain_grad, rtol=1e-4, atol=1e-6)
    assert float(plain_grad.abs().sum()) > 0
    # Both kinds of block ran again in backward instead of keeping their activations.
    assert (plain_calls, ck_calls) == ((1, 1), (2, 2))

    # The patches replace the blocks' forward and leave every module where it was, so weight
    # patches (attached by module path) still reach the blocks' weights.
    patches = checkpointed.object_patches
    assert len(patches) == len(blocks(model)) + len(res_blocks(model))
    assert all(name.endswith(".forward") for name in patches)
    assert all(type(f.block).__name__ in ("BasicTransformerBlock", "ResBlock") for f in patches.values())

    pack.denoiser.load(model)  # loading the unpatched model puts ComfyUI's own forwards back
    assert not any(isinstance(m.__dict__.get("forward"), pack.recompute.RecomputedForward)
                   for m in model.model.diffusion_model.modules())


def test_checkpointed_clone_keeps_weight_patches_when_loaded_first(pack, comfy_session):
    """A LoRA-like weight patch reaches the checkpointed clone even when it is the first to be loaded."""
    with torch.inference_mode():
        model = comfy_tiny.tiny_sd15_model(seed=5)
    keys = [k for k in model.model.state_dict() if k.endswith(("attn1.to_q.weight", "in_layers.2.weight"))]
    assert any("transformer_blocks" in k for k in keys) and any("in_layers" in k for k in keys)
    patched = model.clone()
    for key in keys:
        patched.add_patches({key: (torch.full_like(model.model.state_dict()[key], 0.5),)}, 1.0)
    g = torch.Generator().manual_seed(0)
    x, sigma, cond = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([2.0]), torch.randn(1, 77, 64, generator=g)

    def run(version):
        pack.denoiser.load(version)
        with torch.no_grad():
            return pack.denoiser.Denoiser(version)(x, sigma, {"c_crossattn": cond})

    checkpointed = run(pack.recompute.checkpointed_clone(patched))  # loaded first, onto the unpatched weights
    plain = run(patched)
    base = run(model)
    assert float((plain - base).abs().max()) > 1e-2  # the patch matters
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)


def test_training_nodes_give_the_same_results_when_memory_is_short(pack, comfy_session, monkeypatch):
    with torch.inference_mode():
        model = comfy_tiny.tiny_sd15_model(seed=7)
        clip = comfy_tiny.tiny_sd1_clip(str(comfy_session.folder("embeddings")), seed=8)
        source = encode(clip, "")
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    inversion, _ = pack.run("VCTDDIMInvert", model, latent, source, 4)

    def run_all():
        tuned = pack.run("VCTNullTextInvert", model, inversion, 7.5, 5, 1e-5)[0]
        concept = pack.run("VCTConceptLearn", model, clip, latent, "dog", 2, 3, 5e-4, 4, 1.0, 0, "", False)
        return tuned.null_embeddings, concept[0][0][0]

    plain_nulls, plain_concept = run_all()
    decisions = []

    def short(model, shape):
        decisions.append(tuple(shape))
        return False

    monkeypatch.setattr(pack.training, "training_fits", short)
    low_nulls, low_concept = run_all()
    assert decisions, "the nodes did not ask whether training fits"
    for key in plain_nulls:
        torch.testing.assert_close(low_nulls[key], plain_nulls[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(low_concept, plain_concept, rtol=1e-4, atol=1e-5)
    assert not torch.equal(plain_concept, encode(clip, "dog dog")[0][0])  # the concept did train
