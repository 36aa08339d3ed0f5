"""What VCT's training nodes leave behind on the model other nodes share, and how they run on it.

`make_autograd_safe` swaps the inference-mode tensors of the model every clone shares for ordinary
tensors of equal value (ComfyUI's ModelPatcher clones share one torch module). These tests show
what other nodes then see: the same values, the same requires_grad flags, the same samples, LoRA
patches applied and removed as before, and the model unloaded and loaded again.
"""
from __future__ import annotations

import pytest
import torch
from support import comfy_tiny
from support.comfy_runner import encode

STEPS = 4


def ksample(model, positive, negative, latent):
    """Return what a KSampler gives (euler, 3 steps, cfg 7.5, seed 5), run as ComfyUI's executor runs it."""
    import nodes

    with torch.inference_mode():
        return nodes.common_ksampler(model, 5, 3, 7.5, "euler", "normal", positive, negative, latent)[0]["samples"]


def parameters(module) -> dict:
    """Return every parameter's value and requires_grad flag."""
    return {name: (p.detach().clone(), p.requires_grad) for name, p in module.named_parameters()}


@pytest.fixture(scope="module")
def shared(pack, comfy_session):
    with torch.inference_mode():  # as CheckpointLoaderSimple builds them
        model = comfy_tiny.tiny_sd15_model(seed=21)
        clip = comfy_tiny.tiny_sd1_clip(seed=22)
        positive, negative = encode(clip, "a photo of a cat"), encode(clip, "")
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(23))}
    return dict(model=model, clip=clip, positive=positive, negative=negative, latent=latent)


def test_null_text_freezes_the_unet_and_leaves_the_shared_model_as_other_nodes_need_it(pack, shared):
    import comfy.model_management

    model, latent = shared["model"], shared["latent"]
    unet = model.model.diffusion_model
    key = next(k for k in model.model_state_dict() if k.endswith("attn2.to_k.weight"))
    lora = model.clone()  # a weight patch on a clone, as LoraLoader adds one
    lora.add_patches({key: (torch.full(model.model_state_dict()[key].shape, 0.01),)}, 1.0)
    assert all(p.is_inference() and p.requires_grad for p in unet.parameters())
    sampled = {name: ksample(m, shared["positive"], shared["negative"], latent) for name, m in
               (("model", model), ("lora", lora))}
    comfy.model_management.unload_all_models()
    # ComfyUI's own LoRA round trip already changes the patched weight's flag (set_attr_param makes
    # every weight it puts back a Parameter with requires_grad False): no node can rely on these flags.
    name_of_key = key.removeprefix("diffusion_model.")
    assert [name for name, p in unet.named_parameters() if not p.requires_grad] == [name_of_key]
    before = parameters(unet)

    watched = lora.clone()  # null-text on the LoRA clone, looking at the UNet during every call with gradients
    seen = []

    def wrapper(apply_model, args):
        if torch.is_grad_enabled():
            seen.append(sorted(name for name, p in unet.named_parameters() if p.requires_grad))
        return apply_model(args["input"], args["timestep"], **args["c"])

    watched.set_model_unet_function_wrapper(wrapper)
    inversion, _ = pack.run("VCTDDIMInvert", watched, latent, shared["negative"], STEPS)
    pack.run("VCTNullTextInvert", watched, inversion, 7.5, 3, 0.0, negative=shared["positive"])
    assert len(seen) >= STEPS - 1 and all(names == [] for names in seen), "the UNet is frozen during null-text"
    assert all(p.grad is None for p in unet.parameters())
    replaced = sum(not p.is_inference() for p in unet.parameters())
    print(f"null-text replaced {replaced} of {len(before)} shared UNet parameters by ordinary tensors")
    assert replaced > 0  # what is to be shown harmless

    comfy.model_management.unload_all_models()  # unpatches the LoRA clone: its backup goes back
    after = parameters(unet)
    assert after.keys() == before.keys()
    for name, (value, _) in before.items():
        assert torch.equal(after[name][0], value), name
    assert [name for name, (_, flag) in before.items() if after[name][1] != flag] == []
    assert not lora.backup and not watched.backup
    for name, m in (("model", model), ("lora", lora)):
        assert torch.equal(ksample(m, shared["positive"], shared["negative"], latent), sampled[name]), name
    comfy.model_management.load_models_gpu([lora])  # loads, patches and unloads again as before
    torch.testing.assert_close(dict(unet.named_parameters())[name_of_key], before[name_of_key][0] + 0.01)
    comfy.model_management.unload_all_models()
    assert torch.equal(dict(unet.named_parameters())[name_of_key], before[name_of_key][0])


def test_concept_learning_freezes_the_unet_and_the_text_encoder(pack, shared):
    model, clip = shared["model"].clone(), shared["clip"]
    modules = [shared["model"].model.diffusion_model, clip.cond_stage_model]
    seen = []

    def wrapper(apply_model, args):
        if torch.is_grad_enabled():
            seen.append(sum(p.requires_grad for m in modules for p in m.parameters()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    pack.run("VCTConceptLearn", model, clip, shared["latent"], "dog", 2, 2, 5e-4, 1, 1.0, 0, "", False)
    assert seen and all(count == 0 for count in seen), "only the concept vectors require grad while learning"
    assert [[p.requires_grad for p in m.parameters()] for m in modules] == flags
    assert all(p.grad is None for m in modules for p in m.parameters())


def test_a_batch_of_two_sources_gets_each_the_null_embeddings_it_gets_alone(pack, shared):
    # One Adam over both rows' embeddings, on the mean of their losses: Adam works per element and
    # ignores the 1/2 scale, so without early stop each image gets what it gets when inverted alone.
    model = shared["model"]
    latent = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(24))}
    tuned = []
    for samples in (latent["samples"], latent["samples"][:1], latent["samples"][1:]):
        inversion = pack.run("VCTDDIMInvert", model, {"samples": samples}, shared["negative"], STEPS)[0]
        # Early stop 0 (and losses far above 2e-5 per step): every step runs all 5 iterations.
        tuned.append(pack.run("VCTNullTextInvert", model, inversion, 7.5, 5, 0.0, negative=shared["positive"])[0])
    both, first, second = tuned
    assert all(t.null_iterations == [5] * (STEPS - 1) + [0] for t in tuned)  # carried for the GPU check to print
    torch.testing.assert_close(both.trajectory[:, :1], first.trajectory, rtol=1e-4, atol=1e-4)  # batched rounding
    start = shared["positive"][0][0]
    for rows, alone in ((slice(0, 1), first), (slice(1, 2), second)):
        difference = (both.null_embeddings["c_crossattn"][:, rows] - alone.null_embeddings["c_crossattn"]).abs()
        moved = (alone.null_embeddings["c_crossattn"] - start).abs()
        assert float(difference.mean()) < 0.01 * float(moved.mean())
    reconstructions = [pack.run("VCTDualBranchSampler", model, t, shared["negative"], 7.5, 0.9, 0.2, 0.5)[1]["samples"]
                       for t in tuned]
    for row, alone in ((0, reconstructions[1]), (1, reconstructions[2])):
        source = latent["samples"][row : row + 1]
        batched_mse = float(((reconstructions[0][row : row + 1] - source) ** 2).mean())
        assert batched_mse == pytest.approx(float(((alone - source) ** 2).mean()), rel=1e-3)
