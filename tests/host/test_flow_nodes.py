"""SD3 and Flux.1 through every VCT node, on tiny models of ComfyUI's own classes, with the UNet's invariants:
concept = source gives B = B* exactly; `direct` rebuilds the source; null-text beats untuned nulls on SD3
(CFG); concept learning through T5 saves an embedding that `embedding:NAME` reads as the concept;
patches stay on clones; inputs that cannot work get errors that say what to do."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from support import comfy_tiny_flow as flow
from support.comfy_runner import encode

STEPS = 6
FAMILIES = {"sd3": (flow.tiny_sd3_model, flow.tiny_sd3_clip), "flux": (flow.tiny_flux_model, flow.tiny_flux_clip)}
EMBEDDING_KEYS = {"sd3": {"t5xxl"}, "flux": {"clip_l", "t5xxl"}}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, pack, comfy_session):
    name = request.param
    build_model, build_clip = FAMILIES[name]
    model, clip = build_model(seed=0), build_clip(str(comfy_session.folder("embeddings")))
    source, negative = encode(clip, ""), encode(clip, "a photo of a cat")
    latent = {"samples": torch.randn(1, flow.LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0))}
    inversion, _ = pack.run("VCTDDIMInvert", model, latent, source, STEPS)
    if name == "sd3":
        tuned, _ = pack.run("VCTNullTextInvert", model, inversion, 5.0, 30, 1e-5, negative=negative)
    else:  # guidance-distilled: no null embeddings, the sampler takes the inversion as it is
        tuned = inversion
    return dict(name=name, model=model, clip=clip, source=source, negative=negative, latent=latent,
                inversion=inversion, tuned=tuned, cfg=5.0)


def sample(pack, family, concept, **kwargs):
    """Return (B, B*) latents of the Dual-Branch Sampler on the family's inversion."""
    return pack.run("VCTDualBranchSampler", family["model"], family["tuned"], concept, family["cfg"], 0.9, 0.2, 0.5,
                    **kwargs)


def test_concept_equal_to_source_gives_the_reconstruction(pack, family):
    latent, reconstruction = sample(pack, family, family["source"])
    # Exact: with the concept equal to the source, B's rows are computed exactly as B*'s are.
    assert torch.equal(latent["samples"], reconstruction["samples"])
    assert not torch.equal(latent["samples"], torch.zeros_like(latent["samples"]))


def test_the_reconstruction_rebuilds_the_source(pack, family):
    z0 = family["latent"]["samples"]
    model = family["model"]
    if family["name"] == "sd3":
        negative = pack.conditioning.model_cond(model, family["negative"], "negative", z0.shape)
        plain = dataclasses.replace(family["inversion"], null_embeddings={
            k: v[None].repeat(STEPS, *[1] * v.dim()) for k, v in negative.items()})
        errors = []
        for inversion in (plain, family["tuned"]):
            _, rebuilt = pack.run("VCTDualBranchSampler", model, inversion, family["source"], family["cfg"], 0.9,
                                  0.2, 0.5)
            errors.append(float(((rebuilt["samples"] - z0) ** 2).mean()))
        print(f"sd3: reconstruction MSE untuned nulls {errors[0]:.4g}, null-text {errors[1]:.4g}")
        assert errors[1] * 10 < errors[0]
    direct, _ = pack.run("VCTNullTextInvert", model, family["inversion"], family["cfg"], 1, 1e-5, method="direct")
    _, rebuilt = pack.run("VCTDualBranchSampler", model, direct, family["source"], family["cfg"], 0.9, 0.2, 0.5)
    # direct puts B* back on the inversion path every step: it ends on the source latent.
    torch.testing.assert_close(rebuilt["samples"], z0, rtol=0, atol=1e-5)


def test_concept_learning_through_t5_and_the_embedding_round_trip(pack, family, comfy_session):
    model, clip = family["model"], family["clip"]
    name = f"vct_{family['name']}_concept"
    path = comfy_session.folder("embeddings") / f"{name}.safetensors"
    try:
        cond, concept, _ = pack.run("VCTConceptLearn", model, clip, family["latent"], "dog", 2, 3, 5e-3, 2, 1.0, 0,
                                    name, False)
        assert set(concept.vectors) == EMBEDDING_KEYS[family["name"]]
        assert len(concept.losses) == 3 and all(loss == loss for loss in concept.losses)
        with torch.inference_mode():
            again = encode(clip, f"embedding:{name}")
        # ComfyUI's own tokenization of embedding:NAME gives the concept conditioning, T5 tokens and pooled.
        torch.testing.assert_close(again[0][0], cond[0][0])
        torch.testing.assert_close(again[0][1]["pooled_output"], cond[0][1]["pooled_output"])
        latent, reconstruction = sample(pack, family, cond)
        assert torch.isfinite(latent["samples"]).all()
        assert not torch.equal(latent["samples"], reconstruction["samples"])
    finally:
        path.unlink(missing_ok=True)


def test_concept_vectors_move_in_every_encoder(pack, family):
    model, clip = family["model"], family["clip"]
    architecture = pack.arch.for_model(model)
    encoders = architecture.text_encoders(clip, "t")
    start = {e.embedding_key: architecture.initializer_vectors(e, "dog", 2) for e in encoders}
    _, concept, _ = pack.run("VCTConceptLearn", model, clip, family["latent"], "dog", 2, 3, 5e-3, 1, 1.0, 0, "",
                             False)
    for key, vectors in concept.vectors.items():
        moved = float((vectors - start[key]).abs().max())
        assert moved > 1e-4, f"{key}: the concept vectors got no gradient (moved {moved})"


def test_concept_prompt_records_the_t5_segment(pack, family):
    cond, concept, _ = pack.run("VCTConceptLearn", family["model"], family["clip"], family["latent"], "dog", 2, 1,
                                5e-3, 1, 1.0, 0, "", False)
    (prompt,) = pack.run("VCTConceptPrompt", family["clip"], "a photo of {concept}, red", concept)
    layout = prompt[0][1][pack.tokens.LAYOUT_KEY]
    (segment,) = pack.tokens.segments_of(layout, prompt[0][0].shape[1])
    assert not segment.start and segment.offset == 0 and segment.length == prompt[0][0].shape[1]
    words = family["clip"].tokenize("a photo of")["t5xxl"][0]
    head = [int(t) for t, *_ in words[: len(segment.ids)] if t != 1][:3]
    assert list(segment.ids[:3]) == head, "T5's layout starts with the first word (no start token)"
    assert [pack.tokens.is_concept_id(t) for t in segment.ids].count(True) == 2
    assert segment.ids[-1] == 1, "T5's end token closes the layout"
    # The sampler aligns it with the empty source: the concept's two vectors are its own, the rest aligned.
    config = pack.tokens.injection_config(family["source"][0][0], prompt, 0.9, 0.2, 0.5, 0)
    concept_at = [i for i, t in enumerate(segment.ids) if pack.tokens.is_concept_id(t)]
    assert list(config.concept_positions) == concept_at
    assert all(float(config.alphas[i]) == 0.0 for i in concept_at)
    assert float(config.alphas[len(segment.ids) - 1]) == 1.0 and int(config.mapper[len(segment.ids) - 1]) == 0, \
        "the end token maps to the empty prompt's end token, its first position"
    latent, reconstruction = sample(pack, family, prompt)
    assert not torch.equal(latent["samples"], reconstruction["samples"])


def test_the_sampler_patches_a_clone_only(pack, family):
    before = dict(family["model"].model_options.get("transformer_options", {}))
    sample(pack, family, family["source"])
    after = family["model"].model_options.get("transformer_options", {})
    assert "optimized_attention_override" not in after and after.keys() == before.keys()


def test_inputs_that_cannot_work_are_refused_with_what_to_do(pack, family):
    model = family["model"]
    with pytest.raises(ValueError, match="appearance attention is not available on SD3 and Flux"):
        sample(pack, family, family["source"], reference=family["inversion"], appearance_strength=0.5)
    with pytest.raises(ValueError, match="concept_tokens assumes a CLIP prompt.*VCT Concept Prompt"):
        sample(pack, family, family["negative"], concept_tokens=3)
    if family["name"] == "flux":
        with pytest.raises(ValueError, match="guidance-distilled.*method to direct"):
            pack.run("VCTNullTextInvert", model, family["inversion"], 3.5, 5, 1e-5)
    else:
        with pytest.raises(ValueError, match="no null embeddings"):
            sample(pack, {**family, "tuned": family["inversion"]}, family["source"])
    other = flow.tiny_flux_clip() if family["name"] == "sd3" else flow.tiny_sd3_clip()
    with pytest.raises(ValueError, match="connect the CLIP of the same checkpoint"):
        pack.run("VCTConceptLearn", model, other, family["latent"], "dog", 2, 1, 5e-3, 1, 1.0, 0, "", False)


def test_a_variant_family_is_refused_by_name(pack, comfy_session):
    import comfy.supported_models

    # Flux inpainting conditions on a mask VCT does not apply: refused, naming what is served.
    model = flow.tiny_flux_model(seed=0)
    model.model.model_config = comfy.supported_models.FluxInpaint(dict(flow.TINY_FLUX_UNET_CONFIG))
    latent = {"samples": torch.zeros(1, flow.LATENT_CHANNELS, 8, 8)}
    cond = encode(flow.tiny_flux_clip(), "")
    with pytest.raises(ValueError, match="FluxInpaint model.*SD3, Flux, FluxSchnell"):
        pack.run("VCTDDIMInvert", model, latent, cond, 5)


def test_joint_blocks_choose_where_the_control_acts(pack, family):
    (prompt,) = pack.run("VCTConceptPrompt", family["clip"], "a photo of a cat")
    results = {}
    for choice in ("all", "first_half", "second_half"):
        latent, reconstruction = sample(pack, family, prompt, joint_blocks=choice)
        results[choice] = latent["samples"]
        same, rebuilt = sample(pack, family, family["source"], joint_blocks=choice)
        assert torch.equal(same["samples"], rebuilt["samples"]), f"{choice}: B = B* for concept = source"
    distances = {(a, b): float((results[a] - results[b]).abs().max())
                 for a, b in (("all", "first_half"), ("all", "second_half"), ("first_half", "second_half"))}
    assert all(d > 1e-4 for d in distances.values()), distances
    with pytest.raises(ValueError, match="'vital' is Stable Flow's choice for Flux.1's 19 double- and 38"):
        sample(pack, family, prompt, joint_blocks="vital")


def test_composes_with_a_lora_and_flux_guidance_and_refuses_a_controlnet(pack, family):
    model = family["model"].clone()
    # A LoRA-like weight patch on the first joint block: the nodes run on the patched model, and an
    # inversion made without the patch is refused.
    name = next(k for k in model.model_state_dict() if "blocks.0" in k and k.endswith("weight")
                and model.model_state_dict()[k].dim() == 2)
    model.add_patches({name: (torch.full_like(model.model_state_dict()[name], 1e-2),)}, 1.0)
    with pytest.raises(ValueError, match="made with another model"):
        pack.run("VCTDualBranchSampler", model, family["tuned"], family["source"], family["cfg"], 0.9, 0.2, 0.5)
    inversion, _ = pack.run("VCTDDIMInvert", model, family["latent"], family["source"], STEPS)
    if family["name"] == "sd3":
        inversion, _ = pack.run("VCTNullTextInvert", model, inversion, family["cfg"], 1, 1e-5, method="direct")
    same, rebuilt = pack.run("VCTDualBranchSampler", model, inversion, family["source"], family["cfg"], 0.9, 0.2, 0.5)
    plain, _ = sample(pack, family, family["source"])
    assert not torch.equal(rebuilt["samples"], plain["samples"]), "the patch changes the model"
    if family["name"] == "flux":
        # FluxGuidance on the concept changes B (its guidance input), never B*.
        import comfy_extras.nodes_flux as nodes_flux

        (prompt,) = pack.run("VCTConceptPrompt", family["clip"], "a photo of a cat")
        (guided,) = nodes_flux.FluxGuidance.execute(prompt, 1.0).args
        results = [sample(pack, family, c) for c in (prompt, guided)]
        assert not torch.equal(results[0][0]["samples"], results[1][0]["samples"])
        assert torch.equal(results[0][1]["samples"], results[1][1]["samples"])
    controlled = [[family["source"][0][0], {**family["source"][0][1], "control": object()}]]
    with pytest.raises(ValueError, match="ControlNet, which VCT does not yet apply"):
        sample(pack, family, controlled)


def test_training_recomputes_the_joint_blocks_when_memory_is_short(pack, family, monkeypatch):
    def learn():
        return pack.run("VCTConceptLearn", family["model"], family["clip"], family["latent"], "dog", 2, 2, 5e-3, 2,
                        1.0, 0, "", False)[1]

    kept = learn()
    patched = []
    original = pack.recompute.training_clone

    def spy(model, recompute):
        clone = original(model, recompute)
        patched.append(sum(isinstance(p, pack.recompute.RecomputedForward) and p.checkpoint
                           for p in clone.object_patches.values()))
        return clone

    monkeypatch.setattr(pack.training, "training_fits", lambda model, shape: False)
    monkeypatch.setattr(pack.recompute, "training_clone", spy)
    recomputed = learn()
    blocks = len(pack.arch.joint.joint_block_keys(family["model"]))
    assert patched and patched[0] == blocks, (patched, blocks)
    for key in kept.vectors:
        torch.testing.assert_close(recomputed.vectors[key], kept.vectors[key], rtol=1e-4, atol=1e-5)
