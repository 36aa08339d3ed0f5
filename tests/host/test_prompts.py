"""Prompts beyond the paper's layout: the sampler aligns the real token sequences of the source and
concept prompts wherever they are recorded, and says so where they cannot be known."""
from __future__ import annotations

import logging

import pytest
import torch
from support import comfy_tiny
from support.comfy_runner import encode

STEPS = 4


@pytest.fixture(scope="module")
def world(pack, comfy_session):
    model = comfy_tiny.tiny_sd15_model(seed=11)
    clip = comfy_tiny.tiny_sd1_clip(str(comfy_session.folder("embeddings")), seed=12)
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    empty = encode(clip, "")
    inversion = pack.run("VCTDDIMInvert", model, latent, empty, STEPS)[0]
    tuned = pack.run("VCTNullTextInvert", model, inversion, 7.5, 3, 1e-5)[0]
    _, concept, _ = pack.run("VCTConceptLearn", model, clip, latent, "dog", 3, 2, 5e-4, 1, 1.0, 0, "vct_prompt_dog",
                             True)
    return dict(model=model, clip=clip, latent=latent, empty=empty, tuned=tuned, concept=concept)


def word_count(clip, text: str) -> int:
    return sum(1 for t, *_ in clip.tokenize(text)["l"][0] if t not in (49406, 49407))


def config_for(pack, world, concept, source=None, **kwargs):
    """Return the sampler's injection config for `concept` against the empty source (or `source` inversion)."""
    inversion = source if source is not None else world["tuned"]
    return pack.tokens.injection_config(
        inversion.source_cond["c_crossattn"], concept, 0.9, 0.2, 0.5, kwargs.pop("concept_tokens", 0),
        kwargs.pop("equalizer", "concept_tokens"), inversion.source_layout)


def scaled(config) -> list[int]:
    return [i for i, w in enumerate(config.weights.tolist()) if w != 1.0]


def test_concept_prompt_equals_the_saved_embedding_in_the_same_text(pack, world):
    text = "a photo of {concept}, oil painting"
    cond = pack.run("VCTConceptPrompt", world["clip"], text, world["concept"])[0]
    with torch.inference_mode():
        plain = encode(world["clip"], "a photo of embedding:vct_prompt_dog, oil painting")
    torch.testing.assert_close(cond[0][0], plain[0][0], rtol=0, atol=0)
    layout = cond[0][1][pack.tokens.LAYOUT_KEY]
    head = word_count(world["clip"], "a photo of")
    assert [j for j, t in enumerate(layout) if -1000 < t < 0] == [1 + head, 2 + head, 3 + head]
    assert len(layout) == 2 + head + 3 + word_count(world["clip"], ", oil painting")


def test_concept_in_the_middle_of_a_prompt_is_equalised_where_it_is(pack, world, caplog):
    cond = pack.run("VCTConceptPrompt", world["clip"], "a photo of {concept}, oil painting", world["concept"])[0]
    head = word_count(world["clip"], "a photo of")
    with caplog.at_level(logging.WARNING, logger="ComfyUI-VCT"):
        config = config_for(pack, world, cond)
        reference = config_for(pack, world, cond, equalizer="reference_code")
    assert scaled(config) == [1 + head, 2 + head, 3 + head]
    assert scaled(reference) == [head, 1 + head, 2 + head]
    # The empty source's start and end tokens map to the concept prompt's; nothing else is borrowed.
    end = 2 + head + 3 + word_count(world["clip"], ", oil painting") - 1
    assert config.alphas[0] == 1 and int(config.mapper[0]) == 0
    assert config.alphas[end] == 1 and int(config.mapper[end]) == 1
    assert float(config.alphas[1:end].sum()) == 0
    assert not caplog.records  # the empty source was recognised from the concept's record


def test_a_non_empty_source_prompt_is_aligned_word_by_word(pack, world, tmp_path):
    clip, model = world["clip"], world["model"]
    source = pack.run("VCTConceptPrompt", clip, "a photo of a cat", None)[0]
    with torch.inference_mode():
        torch.testing.assert_close(source[0][0], encode(clip, "a photo of a cat")[0][0], rtol=0, atol=0)
    inversion = pack.run("VCTDDIMInvert", model, world["latent"], source, STEPS)[0]
    assert inversion.source_layout == source[0][1][pack.tokens.LAYOUT_KEY]
    concept = pack.run("VCTConceptPrompt", clip, "a photo of {concept}", world["concept"])[0]
    config = config_for(pack, world, concept, source=inversion)
    # source [start, a, photo, of, a, cat, end] -> concept [start, a, photo, of, c1, c2, c3, end]
    head = word_count(clip, "a photo of")
    mapped = {j: int(config.mapper[j]) for j in range(head + 5) if config.alphas[j] == 1}
    assert mapped == {**{j: j for j in range(head + 1)}, head + 4: head + 3}
    # The layout survives Save / Load Inversion.
    saved = pack.run("VCTSaveInversion", inversion, "vct_prompt_layout")
    del saved
    storage = pack.storage
    name = [n for n in storage.list_inversions() if n.startswith("vct_prompt_layout")][-1]
    assert storage.load_inversion(name).source_layout == inversion.source_layout


def test_an_unknown_non_empty_source_prompt_is_named_in_a_warning(pack, world, caplog):
    other = pack.run("VCTDDIMInvert", world["model"], world["latent"], encode(world["clip"], "a photo of a cat"),
                     STEPS)[0]
    concept = pack.prompts.encode_concept(pack.clip_text.clip_encoders(world["clip"], "t"),
                                       {"l": world["concept"].vectors["clip_l"]})
    with caplog.at_level(logging.WARNING, logger="ComfyUI-VCT"):
        config_for(pack, world, concept, source=other)
    assert any("source prompt is not empty and its tokens are unknown" in r.getMessage() for r in caplog.records)


def test_a_plain_embedding_prompt_needs_its_vector_count(pack, world, embedding_file, caplog):
    embedding_file("vct_five", torch.randn(5, 64, generator=torch.Generator().manual_seed(5)))
    with torch.inference_mode():
        cond = encode(world["clip"], "embedding:vct_five")
    with pytest.raises(ValueError, match="concept_tokens"):
        config_for(pack, world, cond)
    for source in (None, pack.run("VCTDDIMInvert", world["model"], world["latent"],
                                  encode(world["clip"], "a photo of a cat"), STEPS)[0]):
        # concept_tokens makes the paper's layout usable, but with an empty or a non-empty source
        # alike nothing records the tokens to check it, so the user is told what is assumed.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ComfyUI-VCT"):
            assert scaled(config_for(pack, world, cond, source=source, concept_tokens=5)) == [1, 2, 3, 4, 5]
        messages = [r.getMessage() for r in caplog.records]
        assert any("paper's layout is assumed" in m and "VCT Concept Prompt" in m for m in messages), messages
    latent, _ = pack.run("VCTDualBranchSampler", world["model"], world["tuned"], cond, 7.5, 0.9, 0.2, 0.5,
                         concept_tokens=5)
    assert torch.isfinite(latent["samples"]).all()


def test_the_sampler_runs_on_a_concept_prompt(pack, world):
    concept = pack.run("VCTConceptPrompt", world["clip"], "a photo of {concept}", world["concept"])[0]
    latent, reconstruction = pack.run("VCTDualBranchSampler", world["model"], world["tuned"], concept, 7.5, 0.9,
                                      0.2, 0.5)
    assert torch.isfinite(latent["samples"]).all()
    assert not torch.equal(latent["samples"], reconstruction["samples"])


def test_concept_prompt_errors_say_what_to_do(pack, world):
    clip, concept = world["clip"], world["concept"]
    with pytest.raises(ValueError, match="no concept is connected"):
        pack.run("VCTConceptPrompt", clip, "a photo of {concept}", None)
    with pytest.raises(ValueError, match="exactly once"):
        pack.run("VCTConceptPrompt", clip, "a photo of a dog", concept)
    with pytest.raises(ValueError, match="another text encoder"):
        pack.run("VCTConceptPrompt", comfy_tiny.tiny_sd2_clip(), "{concept}", concept)
    with pytest.raises(ValueError, match="inside a"):
        pack.run("VCTConceptPrompt", clip, "a photo of ({concept}:1.2)", concept)
    with pytest.raises(ValueError, match="at most 77"):
        pack.run("VCTConceptPrompt", clip, "word " * 74 + "{concept}", concept)


def test_a_source_prompt_over_75_tokens_is_refused_at_ddim_invert(pack, world):
    # It used to pass DDIM and null-text inversion and stop in the sampler, blaming the concept prompt.
    with torch.inference_mode():
        long_source = encode(world["clip"], "a photo of a cat " * 20)
    assert long_source[0][0].shape[1] > 77
    with pytest.raises(ValueError, match=r"VCT DDIM Invert: conditioning \(the source prompt\).*at most 75 tokens"):
        pack.run("VCTDDIMInvert", world["model"], world["latent"], long_source, STEPS)


def test_escaped_parentheses_are_literal_as_in_comfyui(pack, world):
    text = "a \\(photo of {concept}"
    cond = pack.run("VCTConceptPrompt", world["clip"], text, world["concept"])[0]
    with torch.inference_mode():
        plain = encode(world["clip"], text.replace("{concept}", "embedding:vct_prompt_dog"))
    torch.testing.assert_close(cond[0][0], plain[0][0], rtol=0, atol=0)
    # A real group is still refused, also after an escaped closing parenthesis.
    with pytest.raises(ValueError, match="inside a"):
        pack.run("VCTConceptPrompt", world["clip"], "a (photo \\) of {concept}:1.2)", world["concept"])


def test_a_longer_source_lends_no_words_to_the_concept_prompts_padding(pack, world):
    source = pack.run("VCTConceptPrompt", world["clip"], "a photo of a big red cat on a green mat", None)[0]
    inversion = pack.run("VCTDDIMInvert", world["model"], world["latent"], source, STEPS)[0]
    concept = pack.run("VCTConceptPrompt", world["clip"], "{concept}", world["concept"])[0]
    config = config_for(pack, world, concept, source=inversion)
    src, tgt = len(inversion.source_layout), len(concept[0][1][pack.tokens.LAYOUT_KEY])
    assert src > tgt == 5
    # The concept prompt's padding at positions where the source still has words keeps its own maps.
    assert config.alphas[tgt:src].tolist() == [0.0] * (src - tgt)
    assert config.alphas[src:].tolist() == [1.0] * (77 - src)
    assert config.mapper[src:].tolist() == list(range(src, 77))


def test_a_wrong_vector_count_cannot_be_detected_and_the_warning_says_so(pack, world, embedding_file, caplog):
    embedding_file("vct_five_again", torch.randn(5, 64, generator=torch.Generator().manual_seed(6)))
    with torch.inference_mode():
        cond = encode(world["clip"], "embedding:vct_five_again")
    with caplog.at_level(logging.WARNING, logger="ComfyUI-VCT"):
        assert scaled(config_for(pack, world, cond, concept_tokens=3)) == [1, 2, 3]  # wrong, and nothing can know
    messages = [r.getMessage() for r in caplog.records]
    assert any("concept_tokens = 3" in m and "another number of vectors" in m for m in messages), messages


def test_an_sdxl_embedding_for_one_encoder_only_is_refused(pack, embedding_file):
    clip = comfy_tiny.tiny_sdxl_clip(str(embedding_file("vct_l_only", torch.randn(2, 32)).parent))
    # clip_g drops embedding:vct_l_only (ComfyUI logs it), so its later tokens would sit two positions earlier.
    with pytest.raises(ValueError, match="clip_g cannot read an embedding:NAME.*clip_l and clip_g"):
        pack.run("VCTConceptPrompt", clip, "a embedding:vct_l_only photo of a cat", None)
    assert pack.run("VCTConceptPrompt", clip, "a photo of a cat", None)[0][0][0].shape[1] == 77
