"""Reference appearance attention through the VCT Dual-Branch Sampler, on a tiny random-weight SD1.5 model."""
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
    g = torch.Generator().manual_seed(0)
    latent, other = ({"samples": torch.randn(1, 4, 8, 8, generator=g)} for _ in range(2))
    inversion, _ = pack.run("VCTDDIMInvert", model, latent, source, STEPS)
    direct, _ = pack.run("VCTNullTextInvert", model, inversion, 7.5, 1, 1e-5, method="direct")
    tuned, _ = pack.run("VCTNullTextInvert", model, inversion, 7.5, 5, 1e-5)
    reference, _ = pack.run("VCTDDIMInvert", model, other, source, STEPS)
    return dict(model=model, clip=clip, source=source, concept=concept, latent=latent, direct=direct, tuned=tuned,
                reference=reference, other=other)


def sample(pack, setup, inversion="direct", concept="concept", **appearance):
    # A CLIPTextEncode concept: its first 3 tokens stand for the concept (concept_tokens).
    tokens = 3 if concept == "concept" else 0
    return pack.run(NODE, setup["model"], setup[inversion], setup[concept], 7.5, 0.9, 0.2, 0.5, tokens, **appearance)


@pytest.mark.parametrize("inversion", ["direct", "tuned"])
def test_strength_zero_equals_no_reference_and_the_reconstruction_is_untouched(pack, setup, inversion):
    today = sample(pack, setup, inversion)
    zero = sample(pack, setup, inversion, reference=setup["reference"], appearance_strength=0.0)
    assert all(torch.equal(a["samples"], b["samples"]) for a, b in zip(today, zero))
    on = sample(pack, setup, inversion, reference=setup["reference"], appearance_strength=1.0)
    # B* never reads the reference: exact under direct inversion (it is put back on the source's
    # path), equal up to the five-row batch's rounding under null-text.
    torch.testing.assert_close(on[1]["samples"], today[1]["samples"], rtol=1e-5, atol=1e-5)
    if inversion == "direct":
        assert torch.equal(on[1]["samples"], today[1]["samples"])
    assert float((on[0]["samples"] - today[0]["samples"]).abs().max()) > 1e-3, "appearance changed nothing"


def test_works_without_a_learned_concept(pack, setup):
    # The concept prompt = the source's empty prompt: B = B* without a reference, B reads R with one.
    plain = sample(pack, setup, "tuned", concept="source")
    assert torch.equal(plain[0]["samples"], plain[1]["samples"])
    on = sample(pack, setup, "tuned", concept="source", reference=setup["reference"], appearance_strength=0.8,
                appearance_window=0.5)
    torch.testing.assert_close(on[1]["samples"], plain[1]["samples"], rtol=1e-5, atol=1e-5)
    assert float((on[0]["samples"] - on[1]["samples"]).abs().max()) > 1e-3


def test_bad_appearance_inputs_raise(pack, setup):
    with pytest.raises(ValueError, match="no reference is connected"):
        sample(pack, setup, appearance_strength=0.5)
    with pytest.raises(ValueError, match="appearance strength must be between 0 and 1"):
        sample(pack, setup, reference=setup["reference"], appearance_strength=1.5)
    with pytest.raises(ValueError, match="appearance end_fraction must be between 0 and 1"):
        sample(pack, setup, reference=setup["reference"], appearance_strength=0.5, appearance_window=2.0)
    with pytest.raises(ValueError, match="must come from VCT DDIM Invert"):
        sample(pack, setup, reference=setup["other"], appearance_strength=0.5)
    model, source = setup["model"], setup["source"]
    longer, _ = pack.run("VCTDDIMInvert", model, setup["other"], source, STEPS + 2)
    with pytest.raises(ValueError, match="same steps for both images"):
        sample(pack, setup, reference=longer, appearance_strength=0.5)
    bigger, _ = pack.run("VCTDDIMInvert", model, {"samples": torch.randn(1, 4, 16, 8)}, source, STEPS)
    with pytest.raises(ValueError, match="source's size"):
        sample(pack, setup, reference=bigger, appearance_strength=0.5)
    other_model = comfy_tiny.tiny_sd15_model(seed=1)
    foreign, _ = pack.run("VCTDDIMInvert", other_model, setup["other"], source, STEPS)
    with pytest.raises(ValueError, match="another model"):
        sample(pack, setup, reference=foreign, appearance_strength=0.5)


def test_every_sampler_input_has_a_tooltip(pack):
    schema = pack.node[NODE].define_schema()
    assert all(getattr(i, "tooltip", None) for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_appearance_on_sd2_and_sdxl(pack, comfy_session, name):
    from support import comfy_tiny_checkpoint

    build_model, build_clip = comfy_tiny_checkpoint.TINY_FAMILIES[name]
    model, clip = build_model(seed=0), build_clip(str(comfy_session.folder("embeddings")))
    source = encode(clip, "")
    g = torch.Generator().manual_seed(0)
    latent, other = ({"samples": torch.randn(1, 4, 8, 8, generator=g)} for _ in range(2))
    inversion, _ = pack.run("VCTDDIMInvert", model, latent, source, STEPS)
    direct, _ = pack.run("VCTNullTextInvert", model, inversion, 7.5, 1, 1e-5, method="direct")
    reference, _ = pack.run("VCTDDIMInvert", model, other, source, STEPS)
    today = pack.run(NODE, model, direct, source, 7.5, 0.9, 0.2, 0.5)
    on = pack.run(NODE, model, direct, source, 7.5, 0.9, 0.2, 0.5, reference=reference, appearance_strength=1.0)
    assert torch.equal(on[1]["samples"], today[1]["samples"]), "B* read the reference"
    assert torch.isfinite(on[0]["samples"]).all()
    assert float((on[0]["samples"] - today[0]["samples"]).abs().max()) > 1e-3, f"{name}: appearance changed nothing"


def test_reference_rows_stay_with_the_conditional_rows_when_rows_are_split(pack, setup, monkeypatch):
    import comfy.model_management

    one_call = sample(pack, setup, reference=setup["reference"], appearance_strength=1.0)
    calls = []
    original = pack.denoiser.Denoiser._call

    def recording(self, x, sigma, cond, options):
        calls.append(list(options[pack.vct_ops.ROLES_KEY]))
        return original(self, x, sigma, cond, options)

    def no_memory(dev=None, torch_free_too=False):
        return (1, 1) if torch_free_too else 1

    monkeypatch.setattr(comfy.model_management, "get_free_memory", no_memory)
    monkeypatch.setattr(pack.denoiser.Denoiser, "_call", recording)
    split = sample(pack, setup, reference=setup["reference"], appearance_strength=1.0)
    assert calls[0] == ["uncond", "uncond"] and calls[1] == ["ref", "main", "appearance"]
    # Equal up to float32 rounding of another batch layout (amplified by CFG 7.5), far below what
    # appearance attention changes.
    today = sample(pack, setup)
    effect = float((one_call[0]["samples"] - today[0]["samples"]).abs().max())
    assert float((split[0]["samples"] - one_call[0]["samples"]).abs().max()) < 0.01 * effect
