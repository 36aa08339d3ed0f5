"""The dual-branch sampler on a tiny UNet with real attention layers."""
import copy

import pytest
import torch
import vct_testnet as tn

import vct_ops

KEYS = [("input", 1, 0), ("input", 4, 0), ("middle", 0, 0), ("output", 3, 0)]
STEPS = 10


@pytest.fixture(scope="module")
def setting():
    # A realistic start: the inverted source and its null-text embeddings, so that B* retraces
    # the source and B departs from it only as far as the concept pulls.
    denoise = tn.tiny_denoiser(seed=3)
    sigmas = vct_ops.ddim_sigmas(tn.sd_train_sigmas(), STEPS)
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(1, 4, 8, 8, generator=g)
    c_src, c_concept, c_null = (torch.randn(1, 32, 64, generator=g) for _ in range(3))
    trajectory = vct_ops.ddim_invert(denoise, vct_ops.latent_to_x(z0, sigmas[-1]), sigmas, c_src)
    nulls = vct_ops.null_text_invert(denoise, trajectory, sigmas, c_src, c_null, inner_steps=20).embeddings
    return denoise, sigmas, trajectory[-1], c_src, c_concept, nulls


def in_float64(setting):
    # CFG 7.5 amplifies float32 rounding differences between batch layouts; equalities are
    # checked in float64.
    denoise, sigmas, x_T, c_src, c_concept, nulls = setting
    denoise = tn.EpsDenoiser(copy.deepcopy(denoise.net).double())
    return denoise, sigmas.double(), x_T.double(), c_src.double(), c_concept.double(), [n.double() for n in nulls]


def patched(ctl, wrap=None):
    attn1 = {key: ctl.patch("attn1") for key in KEYS}
    attn2 = {key: ctl.patch("attn2") for key in KEYS}
    if wrap is not None:
        attn1 = {key: wrap(key, fn) for key, fn in attn1.items()}
    return {"patches_replace": {"attn1": attn1, "attn2": attn2}}


def run(setting, concept=None, self_fraction=0.9, cross_fraction=0.2, mapping=True, wrap=None):
    denoise, sigmas, x_T, c_src, c_concept, nulls = setting
    concept = c_concept if concept is None else concept
    config = vct_ops.InjectionConfig(self_fraction, cross_fraction)
    if mapping:
        config.mapper, config.alphas = vct_ops.refine_mapping([0, 1], [0, -1, -2, 1], 32)
        config.weights = vct_ops.token_weights(32, [1, 2], 0.5)
    ctl = vct_ops.AttentionController(sigmas, config)
    return vct_ops.dual_branch_sample(denoise, x_T, sigmas, c_src, concept, nulls, 7.5, patched(ctl, wrap))


def test_concept_equal_to_source_gives_the_reconstruction(setting):
    denoise, sigmas, x_T, c_src, _, nulls = in_float64(setting)
    for fractions in [(0.9, 0.2), (0.0, 0.0), (1.0, 1.0)]:
        config = vct_ops.InjectionConfig(*fractions)
        # Same prompt on both sides: every token aligns, nothing is re-weighted.
        config.mapper, config.alphas = vct_ops.refine_mapping([0, 5, 1], [0, 5, 1], 32)
        ctl = vct_ops.AttentionController(sigmas, config)
        out = vct_ops.dual_branch_sample(denoise, x_T, sigmas, c_src, c_src, nulls, 7.5, patched(ctl))
        torch.testing.assert_close(out.main, out.ref, rtol=1e-9, atol=1e-9)


def test_injection_off_equals_plain_cfg_sampling_of_the_concept(setting):
    denoise, sigmas, x_T, c_src, c_concept, nulls = in_float64(setting)
    ctl = vct_ops.AttentionController(sigmas, vct_ops.InjectionConfig(0.0, 0.0))
    out = vct_ops.dual_branch_sample(denoise, x_T, sigmas, c_src, c_concept, nulls, 7.5, patched(ctl))
    plain = vct_ops.ddim_sample(denoise, x_T, sigmas, c_concept, nulls, 7.5)
    reconstruction = vct_ops.ddim_sample(denoise, x_T, sigmas, c_src, nulls, 7.5)
    torch.testing.assert_close(out.main, plain, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.ref, reconstruction, rtol=1e-9, atol=1e-9)
    assert float((out.main - out.ref).abs().max()) > 1e-2


def test_translation_uses_reconstruction_self_attention_exactly_where_injected(setting):
    _, sigmas, _, _, _, _ = setting
    seen = {}

    def wrap(key, fn):
        def recorder(q, k, v, extra):
            out = fn(q, k, v, extra)
            roles = extra[vct_ops.ROLES_KEY]
            ref, main = roles.index("ref"), roles.index("main")
            own = vct_ops.sdpa_attention(q[main:main + 1], k[main:main + 1], v[main:main + 1], extra["n_heads"])
            borrowed = vct_ops.sdpa_attention(q[ref:ref + 1], k[ref:ref + 1], v[main:main + 1], extra["n_heads"])
            step = int(torch.argmin((sigmas[:-1] - extra["sigmas"][0]).abs()))
            if torch.allclose(own, borrowed, atol=1e-5):
                return out  # both branches still agree here (first block of the first step)
            if torch.allclose(out[main], borrowed[0], atol=1e-5):
                seen[(key, step)] = "borrowed"
            elif torch.allclose(out[main], own[0], atol=1e-5):
                seen[(key, step)] = "own"
            else:
                seen[(key, step)] = "neither"
            return out

        return recorder

    run(setting, self_fraction=0.6, wrap=wrap)
    injected_steps = range(int(0.6 * STEPS))
    # 8x8 latent: the 64-query level is above 1/4 of the latent's positions, the 16-query levels are not.
    small_layers = {("input", 4, 0), ("middle", 0, 0)}
    for step in range(STEPS - 1):
        for key in KEYS:
            expected = "borrowed" if step in injected_steps and key in small_layers else "own"
            assert seen.get((key, step), expected) == expected, (key, step)
    assert sum(v == "borrowed" for v in seen.values()) >= 2 * int(0.6 * STEPS) - 1


def test_translation_moves_towards_the_reconstruction_as_self_injection_grows():
    # On random weights self-attention maps carry no image structure, so the invariant is checked
    # on a network where the prompt acts only through where self-attention looks (the mechanism
    # VCT relies on in a trained model), with every self-attention layer injected.
    denoise = tn.tiny_denoiser(seed=0, prompt_via_maps=True)
    sigmas = vct_ops.ddim_sigmas(tn.sd_train_sigmas(), STEPS)
    g = torch.Generator().manual_seed(100)
    z0 = torch.randn(1, 4, 8, 8, generator=g)
    c_src, c_concept, c_null = (torch.randn(1, 32, 64, generator=g) for _ in range(3))
    x_T = vct_ops.ddim_invert(denoise, vct_ops.latent_to_x(z0, sigmas[-1]), sigmas, c_src)[-1]
    distances = []
    for fraction in (0.0, 0.3, 0.6, 0.9):
        config = vct_ops.InjectionConfig(fraction, 0.0, self_area_fraction=1.0)
        ctl = vct_ops.AttentionController(sigmas, config)
        out = vct_ops.dual_branch_sample(denoise, x_T, sigmas, c_src, c_concept, [c_null] * STEPS, 7.5, patched(ctl))
        distances.append(float(((out.main - out.ref) ** 2).mean()))
    print("MSE of B to B* for tau_self 0, 0.3, 0.6, 0.9:", [round(d, 4) for d in distances])
    assert all(a > b for a, b in zip(distances, distances[1:])), distances
    assert distances[0] > 10.0 and distances[-1] < 1e-6  # all real steps injected: B retraces B*


def test_bad_inputs_raise(setting):
    denoise, sigmas, x_T, c_src, c_concept, nulls = setting
    with pytest.raises(ValueError, match="null_embeddings"):
        vct_ops.dual_branch_sample(denoise, x_T, sigmas, c_src, c_concept, nulls[:-1])
    with pytest.raises(ValueError, match="x_T"):
        vct_ops.dual_branch_sample(denoise, x_T * float("nan"), sigmas, c_src, c_concept, nulls)
    with pytest.raises(ValueError, match="token length"):
        vct_ops.dual_branch_sample(denoise, x_T, sigmas, c_src, c_concept[:, :16], nulls)


def test_direct_inversion_keeps_the_reconstruction_on_the_trajectory(setting):
    denoise, sigmas, x_T, c_src, c_concept, _ = setting
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    x0 = vct_ops.latent_to_x(z0, sigmas[-1])
    trajectory = vct_ops.ddim_invert(denoise, x0, sigmas, c_src)
    plain = vct_ops.fixed_null_embeddings(torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(5)), STEPS)
    options = patched(vct_ops.AttentionController(sigmas, vct_ops.InjectionConfig()))
    out = vct_ops.dual_branch_sample(denoise, trajectory[-1], sigmas, c_src, c_concept, plain.embeddings, 7.5,
                                     options, ref_trajectory=trajectory)
    assert torch.equal(out.ref, trajectory[0]), "B* ends exactly on the source"
    free = vct_ops.dual_branch_sample(denoise, trajectory[-1], sigmas, c_src, c_concept, plain.embeddings, 7.5,
                                      options)
    assert float(((free.ref - x0) ** 2).mean()) > 1.0, "without the correction B* drifts at CFG 7.5"
    assert not torch.allclose(out.main, free.main), "B follows B*'s corrected path through the shared attention"
    with pytest.raises(ValueError, match="ref_trajectory"):
        vct_ops.dual_branch_sample(denoise, trajectory[-1], sigmas, c_src, c_concept, plain.embeddings,
                                   ref_trajectory=trajectory[1:])


def test_negative_prompt_inversion_reduces_cfg_to_the_inverted_prediction(setting):
    denoise, sigmas, _, c_src, c_concept, _ = in_float64(setting)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    trajectory = vct_ops.ddim_invert(denoise, vct_ops.latent_to_x(z0, sigmas[-1]), sigmas, c_src)
    nulls = vct_ops.fixed_null_embeddings(c_src, STEPS)
    assert nulls.iterations == [0] * STEPS and len(nulls.embeddings) == STEPS
    out = vct_ops.dual_branch_sample(denoise, trajectory[-1], sigmas, c_src, c_concept, nulls.embeddings, 7.5)
    guidance_one = vct_ops.ddim_sample(denoise, trajectory[-1], sigmas, c_src)
    torch.testing.assert_close(out.ref, guidance_one, rtol=1e-9, atol=1e-9)


def test_no_attention_maps_are_kept_across_steps(setting):
    denoise, sigmas, x_T, c_src, c_concept, nulls = setting
    config = vct_ops.InjectionConfig()
    config.mapper, config.alphas = vct_ops.refine_mapping([0, 1], [0, -1, -2, 1], 32)
    ctl = vct_ops.AttentionController(sigmas, config)
    options = patched(ctl)
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in vars(ctl).items()}
    vct_ops.dual_branch_sample(denoise, x_T, sigmas, c_src, c_concept, nulls, 7.5, options)
    after = vars(ctl)
    assert set(after) == set(before), "the controller gained state during sampling"
    for key, value in after.items():
        assert not torch.is_tensor(value) or torch.equal(value, before[key]), key
    patches = [p for kind in options["patches_replace"].values() for p in kind.values()]
    assert all(set(vars(p)) == {"controller", "kind", "prev", "decoder"} for p in patches)


def test_guide_main_replaces_cfg_for_the_translation_only(setting):
    denoise, sigmas, x_T, c_src, c_concept, nulls = in_float64(setting)
    seen = []

    def tagged(x, sigma, cond, options):
        seen.append((list(options[vct_ops.ROLES_KEY]), list(options[vct_ops.BRANCHES_KEY])))
        return denoise(x, sigma, cond, options)

    def rescaled(x, sigma, cond, uncond, scale, step):
        # Any guidance other than plain CFG (here: half the guidance scale).
        return vct_ops.cfg(uncond, cond, scale / 2)

    ctl = vct_ops.AttentionController(sigmas, vct_ops.InjectionConfig(0.0, 0.0))
    out = vct_ops.dual_branch_sample(tagged, x_T, sigmas, c_src, c_concept, nulls, 7.5, patched(ctl),
                                     guide_main=rescaled)
    # B follows the given guidance, B* plain CFG at the full scale (it must retrace the source).
    torch.testing.assert_close(out.main, vct_ops.ddim_sample(denoise, x_T, sigmas, c_concept, nulls, 3.75),
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.ref, vct_ops.ddim_sample(denoise, x_T, sigmas, c_src, nulls, 7.5),
                               rtol=1e-9, atol=1e-9)
    # Rows [uncond B, uncond B*, cond B*, cond B], each tagged with its role and its branch.
    assert seen[0] == (["uncond", "uncond", "ref", "main"], ["main", "ref", "ref", "main"])
