"""Attention control on hand-made tensors: refine mapping, equaliser, which rows and when."""
import pytest
import torch

import vct_ops

SOT, EOT = 100, 101
HEADS = 2


def explicit_attention(q, k, v, heads=HEADS):
    # Written out independently of the kernel: per head softmax(q k^T / sqrt(d)) v.
    rows, n, width = q.shape
    d = width // heads
    out = torch.zeros_like(q)
    for r in range(rows):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            p = torch.softmax(q[r, :, sl] @ k[r, :, sl].T / d**0.5, dim=-1)
            out[r, :, sl] = p @ v[r, :, sl]
    return out


def test_refine_mapping_of_empty_source_and_concept_tokens():
    mapper, alphas = vct_ops.refine_mapping([SOT, EOT], [SOT, -1, -2, -3, EOT], length=8)
    assert alphas.tolist() == [1, 0, 0, 0, 1, 1, 1, 1]
    assert mapper[0] == 0 and mapper[4] == 1  # start and end tokens come from B*
    assert mapper[5:].tolist() == [5, 6, 7]  # padding maps to itself


def test_refine_mapping_aligns_shared_words():
    mapper, alphas = vct_ops.refine_mapping([SOT, 7, 8, EOT], [SOT, 7, -1, 8, EOT], length=6)
    assert alphas.tolist() == [1, 1, 0, 1, 1, 1]
    assert [int(mapper[i]) for i in (0, 1, 3, 4, 5)] == [0, 1, 2, 3, 5]
    with pytest.raises(ValueError, match="positions"):
        vct_ops.refine_mapping([SOT] * 9, [SOT], length=8)


def test_refine_mapping_breaks_ties_as_prompt_to_prompt_does():
    # Source [S, x, x, E], target [S, y, x, E]: prompt-to-prompt's traceback (from the ends, leaving a
    # target token unaligned before skipping a source token) maps the target's x to the first x.
    x, y = 7, 8
    mapper, alphas = vct_ops.refine_mapping([SOT, x, x, EOT], [SOT, y, x, EOT], length=6)
    assert alphas.tolist() == [1, 0, 1, 1, 1, 1]
    assert [int(mapper[j]) for j in (0, 2, 3)] == [0, 1, 3]
    # The source's x x against one target x: the same rule picks the first again.
    mapper, alphas = vct_ops.refine_mapping([SOT, x, x, EOT], [SOT, x, EOT], length=6)
    assert alphas[:3].tolist() == [1, 1, 1] and [int(mapper[j]) for j in range(3)] == [0, 1, 3]


def test_refine_mapping_aligns_a_longest_common_subsequence_in_order():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        src = [SOT] + torch.randint(0, 4, (int(torch.randint(0, 7, (1,), generator=g)),), generator=g).tolist() + [EOT]
        tgt = [SOT] + torch.randint(0, 4, (int(torch.randint(0, 7, (1,), generator=g)),), generator=g).tolist() + [EOT]
        mapper, alphas = vct_ops.refine_mapping(src, tgt, length=10)
        pairs = [(int(mapper[j]), j) for j in range(len(tgt)) if alphas[j] == 1]
        assert all(src[i] == tgt[j] for i, j in pairs)
        assert [i for i, _ in pairs] == sorted({i for i, _ in pairs}), "aligned in order, each source token once"
        longest = [[0] * (len(tgt) + 1) for _ in range(len(src) + 1)]  # the LCS length, computed here anew
        for a in range(len(src)):
            for b in range(len(tgt)):
                longest[a + 1][b + 1] = (longest[a][b] + 1 if src[a] == tgt[b]
                                         else max(longest[a][b + 1], longest[a + 1][b]))
        assert len(pairs) == longest[-1][-1]


def test_padding_borrows_only_the_source_padding():
    # A source longer than the target: the target's padding at positions where the source still has
    # words (and its end token) keeps its own maps instead of borrowing those words' maps.
    mapper, alphas = vct_ops.refine_mapping([SOT, 7, 8, 9, EOT], [SOT, -1, EOT], length=8)
    assert alphas.tolist() == [1, 0, 1, 0, 0, 1, 1, 1]
    assert int(mapper[2]) == 4 and mapper[5:].tolist() == [5, 6, 7]


def test_token_weights():
    assert vct_ops.token_weights(5, [1, 2], 0.5).tolist() == [1, 0.5, 0.5, 1, 1]
    with pytest.raises(ValueError, match="position"):
        vct_ops.token_weights(5, [5], 0.5)


def make_qkv(rows=4, queries=16, keys=6, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, queries, width, generator=g), torch.randn(rows, keys, width, generator=g),
            torch.randn(rows, keys, width, generator=g))


def options(sigma, queries=16, latent=(8, 8)):
    return {
        "n_heads": HEADS,
        "sigmas": torch.full((4,), sigma),
        "original_shape": [4, 4, *latent],
        vct_ops.ROLES_KEY: ["uncond", "uncond", "ref", "main"],
    }


def controller(self_fraction=0.5, cross_fraction=0.5, **kw):
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])  # 4 steps: windows of 0.5 cover sigma 8 and 4
    return vct_ops.AttentionController(sigmas, vct_ops.InjectionConfig(self_fraction, cross_fraction, **kw))


def test_refine_and_equaliser_on_hand_made_maps():
    g = torch.Generator().manual_seed(1)
    p_ref = torch.softmax(torch.randn(1, 2, 3, 6, generator=g), -1)
    p_main = torch.softmax(torch.randn(1, 2, 3, 6, generator=g), -1)
    mapper, alphas = vct_ops.refine_mapping([SOT, EOT], [SOT, -1, -2, EOT], length=6)
    weights = vct_ops.token_weights(6, [1, 2], 0.5)
    mixed = controller(mapper=mapper, alphas=alphas, weights=weights).refine(p_ref, p_main)
    for j, (m, a, w) in enumerate([(0, 1, 1), (None, 0, 0.5), (None, 0, 0.5), (1, 1, 1), (4, 1, 1), (5, 1, 1)]):
        expected = (p_ref[..., m] if a else p_main[..., j]) * w
        torch.testing.assert_close(mixed[..., j], expected)


def test_cross_refine_touches_only_the_translation_rows_and_only_in_its_window():
    q, k, v = make_qkv()
    mapper, alphas = vct_ops.refine_mapping([SOT, EOT], [SOT, -1, EOT], length=6)
    ctl = controller(mapper=mapper, alphas=alphas, weights=vct_ops.token_weights(6, [1], 0.5))
    plain = explicit_attention(q, k, v)
    out = ctl.patch("attn2")(q, k, v, options(sigma=8.0))
    torch.testing.assert_close(out[:3], plain[:3], rtol=1e-5, atol=1e-5)
    p_ref = vct_ops.attention_probs(q[2:3], k[2:3], HEADS)
    p_main = vct_ops.attention_probs(q[3:4], k[3:4], HEADS)
    expected = vct_ops.apply_probs(ctl.refine(p_ref, p_main), v[3:4], HEADS)
    torch.testing.assert_close(out[3:], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[3:], plain[3:], atol=1e-3)
    late = ctl.patch("attn2")(q, k, v, options(sigma=2.0))
    torch.testing.assert_close(late, plain, rtol=1e-5, atol=1e-5)


def test_self_injection_uses_reconstruction_maps_with_own_values():
    q, k, v = make_qkv(keys=16)
    ctl = controller()
    out = ctl.patch("attn1")(q, k, v, options(sigma=4.0))
    plain = explicit_attention(q, k, v)
    torch.testing.assert_close(out[:3], plain[:3], rtol=1e-5, atol=1e-5)
    borrowed = explicit_attention(q[2:3], k[2:3], v[3:4])
    torch.testing.assert_close(out[3:], borrowed, rtol=1e-5, atol=1e-5)
    # Outside the step window, and in layers with more queries than the limit, nothing changes.
    torch.testing.assert_close(ctl.patch("attn1")(q, k, v, options(sigma=2.0)), plain, rtol=1e-5, atol=1e-5)
    big = options(sigma=8.0, latent=(4, 4))  # 16 queries > 1/4 of a 4x4 latent
    torch.testing.assert_close(ctl.patch("attn1")(q, k, v, big), plain, rtol=1e-5, atol=1e-5)


def test_without_roles_attention_is_untouched():
    q, k, v = make_qkv(keys=16)
    opts = options(sigma=8.0)
    del opts[vct_ops.ROLES_KEY]
    ctl = controller()
    torch.testing.assert_close(ctl.patch("attn1")(q, k, v, opts), explicit_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_previous_patch_is_still_called():
    q, k, v = make_qkv()
    calls = []

    def adapter(q, k, v, extra):  # stands for an image-prompt adapter: text attention plus its own term
        calls.append(extra["n_heads"])
        return vct_ops.sdpa_attention(q, k, v, extra["n_heads"]) + 1.0

    mapper, alphas = vct_ops.refine_mapping([SOT, EOT], [SOT, -1, EOT], length=6)
    ctl = controller(mapper=mapper, alphas=alphas)
    out = ctl.patch("attn2", prev=adapter)(q, k, v, options(sigma=8.0))
    alone = ctl.patch("attn2")(q, k, v, options(sigma=8.0))
    assert calls, "the previous patch must be called"
    torch.testing.assert_close(out, alone + 1.0, rtol=1e-5, atol=1e-5)
    self_out = ctl.patch("attn1", prev=adapter)(q, k[:, :6].repeat(1, 1, 1), v, options(sigma=8.0))
    assert len(calls) == 2 and self_out.shape == q.shape


def test_unpaired_rows_raise():
    q, k, v = make_qkv()
    opts = options(sigma=8.0)
    opts[vct_ops.ROLES_KEY] = ["uncond", "ref", "ref", "main"]
    with pytest.raises(RuntimeError, match="reconstruction rows"):
        controller().patch("attn2")(q, k, v, opts)
    with pytest.raises(ValueError, match="kind"):
        controller().patch("attn3")


def test_refine_effect_recognises_identity_and_no_op_configs():
    ones = torch.ones(6)
    identity = torch.arange(6)
    assert controller().config.refine_effect(6) == vct_ops.KEEP
    assert controller(mapper=identity, alphas=torch.zeros(6)).config.refine_effect(6) == vct_ops.KEEP
    assert controller(mapper=identity, alphas=ones).config.refine_effect(6) == vct_ops.BORROW
    assert controller(mapper=identity, alphas=ones, weights=ones).config.refine_effect(6) == vct_ops.BORROW
    # Anything that changes a map is a mix: a weight, a partial alpha, a permutation.
    assert controller(mapper=identity, alphas=ones, weights=vct_ops.token_weights(6, [1], 0.5)
                      ).config.refine_effect(6) == vct_ops.MIX
    assert controller(weights=vct_ops.token_weights(6, [1], 0.5)).config.refine_effect(6) == vct_ops.MIX
    half = torch.tensor([1.0, 0, 1, 1, 1, 1])
    assert controller(mapper=identity, alphas=half).config.refine_effect(6) == vct_ops.MIX
    assert controller(mapper=identity.flip(0), alphas=ones).config.refine_effect(6) == vct_ops.MIX


@pytest.mark.parametrize("effect", ["keep", "borrow"])
def test_no_op_and_identity_refines_run_the_hosts_attention_so_results_are_exact(effect):
    # Both branches must go through the very same attention function, so that B equals B* bit for
    # bit when their inputs do (a concept equal to the source), whatever kernel the host picks.
    calls = []

    def host_attention(q, k, v, heads, extra):
        calls.append(q.shape[0])
        return vct_ops.sdpa_attention(q, k, v, heads) * 1.0001  # distinguishable from the explicit path

    q, k, v = make_qkv()
    q[3], k[3], v[3] = q[2], k[2], v[2]  # B's inputs equal B*'s
    mapper, alphas = torch.arange(6), torch.full((6,), 1.0 if effect == "borrow" else 0.0)
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    ctl = vct_ops.AttentionController(sigmas, vct_ops.InjectionConfig(0.5, 0.5, mapper, alphas, torch.ones(6)),
                                      attention=host_attention)
    out = ctl.patch("attn2")(q, k, v, options(sigma=8.0))
    assert calls == [4], "one call of the host's attention on all rows"
    assert torch.equal(out[3], out[2])
    if effect == "keep":
        assert torch.equal(out, host_attention(q, k, v, HEADS, {}))
