"""Local blend: after its start, B keeps B*'s latent outside the region its concept tokens attend to."""
import copy

import pytest
import torch
import vct_testnet as tn

import vct_ops

KEYS = [("input", 1, 0), ("input", 4, 0), ("middle", 0, 0), ("output", 3, 0)]
STEPS = 10
POSITIONS = (1, 2)  # the concept tokens of B's prompt in these tests


@pytest.fixture(scope="module")
def setting():
    # Float64 throughout: CFG 7.5 amplifies float32 rounding differences between batch layouts.
    denoise = tn.EpsDenoiser(copy.deepcopy(tn.tiny_denoiser(seed=3).net).double())
    sigmas = vct_ops.ddim_sigmas(tn.sd_train_sigmas(), STEPS).double()
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    c_src, c_concept, c_null = (torch.randn(1, 32, 64, generator=g, dtype=torch.float64) for _ in range(3))
    trajectory = vct_ops.ddim_invert(denoise, vct_ops.latent_to_x(z0, sigmas[-1]), sigmas, c_src)
    nulls = vct_ops.fixed_null_embeddings(c_null, STEPS).embeddings
    return denoise, sigmas, trajectory, c_src, c_concept, nulls


def run(setting, blend=None, concept=None, callback=None, direct=False, wrap=None):
    denoise, sigmas, trajectory, c_src, c_concept, nulls = setting
    config = vct_ops.InjectionConfig(0.9, 0.2)
    # The concept prompt [start, two concept tokens, end] against an empty source; the source prompt
    # itself as the concept aligns every token.
    same = concept is c_src
    config.mapper, config.alphas = vct_ops.refine_mapping([0, 1], [0, 1] if same else [0, -1, -2, 1], 32)
    ctl = vct_ops.AttentionController(sigmas, config)
    attn2 = {key: ctl.patch("attn2") for key in KEYS}
    if wrap is not None:
        attn2 = {key: wrap(fn) for key, fn in attn2.items()}
    options = {"patches_replace": {"attn1": {key: ctl.patch("attn1") for key in KEYS}, "attn2": attn2}}
    return vct_ops.dual_branch_sample(
        denoise, trajectory[-1], sigmas, c_src, c_concept if concept is None else concept, nulls, 7.5, options,
        callback=callback, ref_trajectory=trajectory if direct else None, local_blend=blend)


def blend(threshold, **fields):
    # The tiny network's 4x4 level: half the 8x8 latent's side.
    return vct_ops.BlendConfig(threshold=threshold, map_factor=2, min_map_positions=16, positions=POSITIONS, **fields)


def test_off_gives_todays_result_exactly(setting):
    today = run(setting)
    for off in (vct_ops.BlendConfig(threshold=0.0, positions=POSITIONS), vct_ops.BlendConfig(threshold=0.3)):
        out = run(setting, off)
        assert torch.equal(out.main, today.main) and torch.equal(out.ref, today.ref)


def test_reconstruction_is_untouched_and_the_blend_acts(setting):
    today = run(setting)
    # The tiny network's random maps are nearly flat: only a high threshold leaves part of the latent out.
    out = run(setting, blend(0.95))
    assert torch.equal(out.ref, today.ref)
    assert float((out.main - today.main).abs().max()) > 1e-3, "the blend changed nothing"


def test_extreme_thresholds_give_the_reconstruction_or_todays_translation_exactly(setting):
    # Normalised maps never exceed 1, so threshold 1 masks nothing: B is B* from the start on.
    everything = run(setting, blend(1.0, start_fraction=0.0))
    assert torch.equal(everything.main, everything.ref)
    # Softmax maps are positive everywhere, so a tiny threshold keeps all of B: today's B.
    nothing = run(setting, blend(1e-12))
    assert torch.equal(nothing.main, run(setting).main)


def test_the_blend_starts_after_its_fraction_of_the_steps(setting):
    def states(config):
        seen = []
        run(setting, config, callback=lambda i, total, x: seen.append(x.clone()))
        return seen

    today, blended = states(None), states(blend(1.0, start_fraction=0.3))
    # int(0.3 * 10) = 3: steps 1-3 run free, the 4th ends on B*.
    for i in range(3):
        assert torch.equal(blended[i], today[i]), f"step {i + 1} was blended"
    assert not torch.equal(blended[3], today[3])


def test_concept_equal_to_source_still_gives_the_reconstruction(setting):
    _, _, _, c_src, _, _ = setting
    out = run(setting, blend(0.95), concept=c_src)
    assert torch.equal(out.main, out.ref)


def test_outside_the_mask_b_is_b_star_exactly(setting):
    out = run(setting, blend(0.95), direct=True)
    mask = out.blend_mask[0, 0]
    outside = mask == 0
    assert 0 < int(outside.sum()) < mask.numel(), "the mask should cover part of the latent"
    assert torch.equal(out.main[0][:, outside], out.ref[0][:, outside])
    assert not torch.equal(out.main[0][:, ~outside], out.ref[0][:, ~outside])


def test_mask_from_known_maps():
    config = vct_ops.BlendConfig(threshold=0.5, map_factor=4, min_map_positions=16, positions=(2,))
    acc = vct_ops.MaskAccumulator(config, (1, 4, 16, 16))  # maps of 4x4 layers (at least 16 positions)
    assert acc.wants(16) and acc.wants(64) and not acc.wants(256) and not acc.wants(15) and acc.mask() is None
    probs = torch.full((1, 2, 16, 5), 0.01)
    probs[0, :, 0, 2] = 0.9  # only the top-left map cell attends to the concept token
    probs[0, :, 15, 3] = 0.9  # another token's attention is not read
    acc.record(probs)
    mask = acc.mask()[0, 0]
    # Max pooling grows the cell to the 2x2 top-left cells, each 4x4 latent positions.
    expected = torch.zeros(16, 16)
    expected[:8, :8] = 1
    assert torch.equal(mask, expected)
    # A second layer's maps add up with the first's.
    probs2 = torch.full((1, 2, 16, 5), 0.01)
    probs2[0, :, 15, 2] = 2.0
    acc.record(probs2)
    mask = acc.mask()[0, 0]
    # The top-left cell now holds 0.91 / 2.01 = 0.45 of the peak, below the threshold 0.5.
    assert mask[15, 15] == 1 and mask[0, 0] == 0


def test_a_model_without_the_maps_level_uses_the_nearest():
    config = vct_ops.BlendConfig(threshold=0.5, map_factor=4, min_map_positions=16, positions=(0,))
    acc = vct_ops.MaskAccumulator(config, (1, 4, 16, 16))
    probs = torch.full((1, 1, 64, 2), 0.01)  # only 8x8 layers (the maps' level is 4x4)
    probs[0, 0, 63, 0] = 1.0
    acc.record(probs)
    mask = acc.mask()[0, 0]
    expected = torch.zeros(16, 16)
    expected[12:, 12:] = 1  # the bottom-right 8x8 cell, pooled to 2x2 cells of 2x2 latent positions
    assert torch.equal(mask, expected)


def test_maps_have_at_least_their_minimum_of_positions():
    # A 64x64 latent: prompt-to-prompt's 16x16 maps. A 16x16 latent: 8x8 maps, not 4x4 ones.
    config = vct_ops.BlendConfig(threshold=0.3, positions=(1,))
    assert vct_ops.MaskAccumulator(config, (1, 4, 64, 64)).target == 256
    assert vct_ops.MaskAccumulator(config, (1, 4, 16, 16)).target == 64
    assert vct_ops.MaskAccumulator(config, (1, 4, 4, 4)).target == 16  # never more than the latent has


def test_bad_settings_raise():
    for fields, word in (({"threshold": 1.5}, "threshold"), ({"threshold": float("nan")}, "threshold"),
                         ({"start_fraction": -0.1}, "start_fraction"), ({"map_factor": 0}, "map_factor")):
        with pytest.raises(ValueError, match=word):
            vct_ops.BlendConfig(**fields)
    acc = vct_ops.MaskAccumulator(vct_ops.BlendConfig(threshold=0.3, positions=(7,)), (1, 4, 8, 8))
    with pytest.raises(ValueError, match="position 7"):
        acc.record(torch.ones(1, 1, 4, 5))
