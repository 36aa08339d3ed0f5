"""Local blend through the VCT Dual-Branch Sampler, on tiny random-weight SD1.5, SD2 and SDXL models."""
from __future__ import annotations

import pytest
import torch
from support import comfy_tiny
from support.comfy_runner import encode

STEPS = 6
NODE = "VCTDualBranchSampler"


@pytest.fixture(scope="module")
def setup(pack, comfy_session):
    model = comfy_tiny.tiny_sd15_model(seed=0)
    clip = comfy_tiny.tiny_sd1_clip(str(comfy_session.folder("embeddings")))
    source, concept = encode(clip, ""), encode(clip, "a photo of a cat")
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))}
    inversion, _ = pack.run("VCTDDIMInvert", model, latent, source, STEPS)
    direct, _ = pack.run("VCTNullTextInvert", model, inversion, 7.5, 1, 1e-5, method="direct")
    return dict(model=model, source=source, concept=concept, direct=direct)


def sample(pack, setup, concept="concept", **blend):
    # A CLIPTextEncode concept: its first 3 tokens stand for the concept (concept_tokens).
    tokens = 3 if concept == "concept" else 0
    return pack.run(NODE, setup["model"], setup["direct"], setup[concept], 7.5, 0.9, 0.2, 0.5, tokens, **blend)


def test_off_is_todays_sampler_and_on_keeps_b_star(pack, setup):
    today = sample(pack, setup)
    off = sample(pack, setup, local_blend=0.0)
    assert all(torch.equal(a["samples"], b["samples"]) for a, b in zip(today, off))
    on = sample(pack, setup, local_blend=0.95)
    assert torch.equal(on[1]["samples"], today[1]["samples"]), "the blend changed B*"
    changed = (on[0]["samples"] - today[0]["samples"]).abs().amax(dim=1)
    assert float(changed.max()) > 1e-3, "local blend changed nothing"
    # Outside the mask B is B* exactly, inside it B keeps its own latent: both regions exist.
    kept = (on[0]["samples"] == on[1]["samples"]).all(dim=1)
    assert 0 < int(kept.sum()) < kept.numel()


def test_threshold_one_gives_the_reconstruction(pack, setup):
    # Normalised maps never exceed 1: the mask is empty and B ends on B*.
    out = sample(pack, setup, local_blend=1.0)
    assert torch.equal(out[0]["samples"], out[1]["samples"])


def test_a_concept_without_concept_tokens_is_not_blended(pack, setup):
    # The source prompt as the concept has no tokens of its own: nothing to read maps at.
    plain = sample(pack, setup, concept="source")
    out = sample(pack, setup, concept="source", local_blend=0.5)
    assert all(torch.equal(a["samples"], b["samples"]) for a, b in zip(plain, out))


def test_bad_value_raises_naming_the_input(pack, setup):
    with pytest.raises(ValueError, match="set local_blend between 0"):
        sample(pack, setup, local_blend=1.5)


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_local_blend_on_sd2_and_sdxl(pack, comfy_session, name, caplog):
    from support import comfy_tiny_checkpoint

    build_model, build_clip = comfy_tiny_checkpoint.TINY_FAMILIES[name]
    model, clip = build_model(seed=0), build_clip(str(comfy_session.folder("embeddings")))
    source, concept = encode(clip, ""), encode(clip, "a photo of a cat")
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))}
    inversion, _ = pack.run("VCTDDIMInvert", model, latent, source, STEPS)
    direct, _ = pack.run("VCTNullTextInvert", model, inversion, 7.5, 1, 1e-5, method="direct")
    today = pack.run(NODE, model, direct, concept, 7.5, 0.9, 0.2, 0.5, 3)
    on = pack.run(NODE, model, direct, concept, 7.5, 0.9, 0.2, 0.5, 3, local_blend=1.0)
    assert "did nothing" not in caplog.text, f"{name}: no cross-attention layer gave maps"
    assert torch.equal(on[0]["samples"], on[1]["samples"]) and torch.equal(on[1]["samples"], today[1]["samples"])
    assert not torch.equal(on[0]["samples"], today[0]["samples"])
