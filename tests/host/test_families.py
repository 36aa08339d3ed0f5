"""SD2.x (v-prediction) and SDXL through every VCT node, with the same invariants as SD1.x."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from support import comfy_runner, comfy_tiny_checkpoint
from support.comfy_runner import encode
from test_nodes import recording_patches
from test_workflows import UNET_WORKFLOWS, small_workflow

STEPS = 6
FAMILIES = ["sd2", "sdxl"]
EMBEDDING_KEYS = {"sd2": {"clip_h"}, "sdxl": {"clip_l", "clip_g"}}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, pack, comfy_session):
    name = request.param
    build_model, build_clip = comfy_tiny_checkpoint.TINY_FAMILIES[name]
    model = build_model(seed=0)
    clip = build_clip(str(comfy_session.folder("embeddings")))
    source, negative = encode(clip, ""), encode(clip, "a photo of a cat")
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    inversion, _ = pack.run("VCTDDIMInvert", model, latent, source, STEPS)
    tuned, _ = pack.run("VCTNullTextInvert", model, inversion, 7.5, 30, 1e-5, negative=negative)
    return dict(name=name, model=model, clip=clip, source=source, negative=negative, latent=latent,
                inversion=inversion, tuned=tuned)


def test_null_text_reconstruction_far_better_than_plain(pack, family):
    model, z0 = family["model"], family["latent"]["samples"]
    negative = pack.conditioning.model_cond(model, family["negative"], "negative", z0.shape)
    if family["name"] == "sdxl":
        assert set(negative) == {"c_crossattn", "y"}, "SDXL's unconditional branch includes the size conditioning"
        assert set(family["tuned"].null_embeddings) == {"c_crossattn", "y"}
    plain = dataclasses.replace(family["inversion"], null_embeddings={
        k: v[None].repeat(STEPS, *[1] * v.dim()) for k, v in negative.items()})
    errors = []
    for inversion in (plain, family["tuned"]):
        _, reconstruction = pack.run("VCTDualBranchSampler", model, inversion, family["source"], 7.5, 0.9, 0.2, 0.5)
        errors.append(float(((reconstruction["samples"] - z0) ** 2).mean()))
    print(f"{family['name']}: reconstruction MSE plain {errors[0]:.4g}, null-text {errors[1]:.4g}")
    assert errors[1] * 10 < errors[0]


def test_concept_equal_to_source_gives_the_reconstruction(pack, family):
    latent, reconstruction = pack.run("VCTDualBranchSampler", family["model"], family["tuned"], family["source"],
                                      7.5, 0.9, 0.2, 0.5)
    # Exact: with the concept equal to the source, B's rows are computed exactly as B*'s are.
    assert torch.equal(latent["samples"], reconstruction["samples"])


def test_self_injection_follows_the_latent_area(pack, family):
    model = family["model"].clone()
    log = []
    recording_patches(model, pack, log)
    pack.run("VCTDualBranchSampler", model, family["tuned"], family["negative"], 7.5, 1.0, 0.2, 0.5, concept_tokens=3)
    area = 8 * 8
    injected, kept = set(), set()
    for entry in log:
        if "borrowed" in entry and entry["sigma"] < float(family["tuned"].sigmas[0]) - 1e-6:
            (injected if entry["borrowed"] else kept).add((entry["key"], entry["queries"]))
    assert injected and all(q <= area / 4 for _, q in injected)
    assert all(q > area / 4 for _, q in kept)
    if family["name"] == "sdxl":
        assert not kept, "SDXL has no attention at full latent resolution: every layer is injected"


def test_concept_learning_and_the_embedding_round_trip(pack, family, comfy_session):
    model, clip = family["model"], family["clip"]
    name = f"vct_{family['name']}_concept"
    path = comfy_session.folder("embeddings") / f"{name}.safetensors"
    try:
        cond, concept, _ = pack.run("VCTConceptLearn", model, clip, family["latent"], "dog", 2, 3, 5e-4, 2, 1.0, 0,
                                    name, False)
        assert set(concept.vectors) == EMBEDDING_KEYS[family["name"]]
        assert concept.losses[-1] == concept.losses[-1]
        with torch.inference_mode():
            again = encode(clip, f"embedding:{name}")
        torch.testing.assert_close(again[0][0], cond[0][0])
        if family["name"] == "sdxl":
            torch.testing.assert_close(again[0][1]["pooled_output"], cond[0][1]["pooled_output"])
        latent, reconstruction = pack.run("VCTDualBranchSampler", model, family["tuned"], cond, 7.5, 0.9, 0.2, 0.5)
        assert torch.isfinite(latent["samples"]).all() and not torch.equal(latent["samples"],
                                                                           reconstruction["samples"])
    finally:
        path.unlink(missing_ok=True)


# The UNet templates only: the SD3.5 and Flux.1 ones load transformers, run on their own families in
# test_workflows.py.
@pytest.mark.parametrize("workflow", UNET_WORKFLOWS, ids=[w.stem for w in UNET_WORKFLOWS])
@pytest.mark.parametrize("name", FAMILIES)
def test_shipped_workflow_runs_on_the_family(name, workflow, vct_pack, tiny_checkpoint, input_image):
    prompt = small_workflow(workflow)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            tiny_checkpoint.add(node["inputs"]["ckpt_name"], family=name)
        if node["class_type"] == "LoadImage":
            input_image(node["inputs"]["image"], width=40, height=48)
    result = comfy_runner.run_prompt(prompt)
    assert result.success
