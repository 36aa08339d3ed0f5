"""Reference appearance attention: B reads the reference R's keys and values; B* and R never change."""
import copy

import pytest
import torch
import vct_testnet as tn

import vct_ops

KEYS = [("input", 1, 0), ("input", 4, 0), ("middle", 0, 0), ("output", 3, 0)]
STEPS = 10


@pytest.fixture(scope="module")
def setting():
    # Float64 throughout: CFG 7.5 amplifies float32 rounding differences between batch layouts.
    denoise = tn.tiny_denoiser(seed=3)
    denoise = tn.EpsDenoiser(copy.deepcopy(denoise.net).double())
    sigmas = vct_ops.ddim_sigmas(tn.sd_train_sigmas(), STEPS).double()
    g = torch.Generator().manual_seed(4)
    z_src, z_app = (torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    c_src, c_concept, c_null = (torch.randn(1, 32, 64, generator=g, dtype=torch.float64) for _ in range(3))
    source = vct_ops.ddim_invert(denoise, vct_ops.latent_to_x(z_src, sigmas[-1]), sigmas, c_src)
    reference = vct_ops.ddim_invert(denoise, vct_ops.latent_to_x(z_app, sigmas[-1]), sigmas, c_src)
    nulls = vct_ops.fixed_null_embeddings(c_null, STEPS).embeddings
    return denoise, sigmas, source, reference, c_src, c_concept, nulls


def patched(ctl, wrap=None):
    attn1 = {key: ctl.patch("attn1", decoder=key[0] == "output") for key in KEYS}
    attn2 = {key: ctl.patch("attn2") for key in KEYS}
    if wrap is not None:
        attn1 = {key: wrap(key, fn) for key, fn in attn1.items()}
    return {"patches_replace": {"attn1": attn1, "attn2": attn2}}


def run(setting, appearance=None, with_reference=True, direct=False, wrap=None, concept=None, self_fraction=0.9,
        denoise=None):
    denoise_, sigmas, source, reference, c_src, c_concept, nulls = setting
    ctl = vct_ops.AttentionController(sigmas, vct_ops.InjectionConfig(self_fraction, 0.0), appearance=appearance)
    extra = {"appearance_trajectory": reference, "appearance_cond": c_src} if with_reference else {}
    return vct_ops.dual_branch_sample(
        denoise or denoise_, source[-1], sigmas, c_src, c_concept if concept is None else concept, nulls, 7.5,
        patched(ctl, wrap), ref_trajectory=source if direct else None, **extra)


def test_strength_zero_or_no_reference_gives_todays_result_exactly(setting):
    today = run(setting, appearance=None, with_reference=False)
    off = run(setting, appearance=vct_ops.AppearanceConfig(strength=0.0), with_reference=False)
    assert torch.equal(off.main, today.main) and torch.equal(off.ref, today.ref)
    # With R's rows in the batch but strength 0, B is today's B up to the batch layout's rounding.
    zero = run(setting, appearance=vct_ops.AppearanceConfig(strength=0.0))
    torch.testing.assert_close(zero.main, today.main, rtol=1e-10, atol=1e-10)
    on = run(setting, appearance=vct_ops.AppearanceConfig(strength=1.0))
    assert float((on.main - today.main).abs().max()) > 1e-2, "appearance attention changed nothing"


def test_reconstruction_is_untouched(setting):
    on = vct_ops.AppearanceConfig(strength=1.0, decoder_only=False, min_area_fraction=0.0)
    today = run(setting, with_reference=False)
    torch.testing.assert_close(run(setting, appearance=on).ref, today.ref, rtol=1e-10, atol=1e-10)
    source = setting[2]
    assert torch.equal(run(setting, appearance=on, direct=True).ref, source[0]), "B* ends exactly on the source"


def test_rows_and_roles(setting):
    denoise = setting[0]
    seen = []

    def tagged(x, sigma, cond, options):
        seen.append((list(options[vct_ops.ROLES_KEY]), list(options[vct_ops.BRANCHES_KEY]), x.shape[0]))
        return denoise(x, sigma, cond, options)

    run(setting, appearance=vct_ops.AppearanceConfig(strength=1.0), denoise=tagged)
    assert seen[0] == (["uncond", "uncond", "ref", "main", "appearance"],
                       ["main", "ref", "ref", "main", "appearance"], 5)


def test_appearance_reads_the_reference_exactly_where_and_when_it_acts(setting):
    sigmas = setting[1]
    config = vct_ops.AppearanceConfig(strength=1.0, start_fraction=0.2, end_fraction=0.7, temperature=1.5,
                                      query_preservation=0.75)
    seen = {}

    def wrap(key, fn):
        def recorder(q, k, v, extra):
            out = fn(q, k, v, extra)
            roles = extra[vct_ops.ROLES_KEY]
            ref, main, look = roles.index("ref"), roles.index("main"), roles.index("appearance")
            heads = extra["n_heads"]
            queries = (0.75 * q[ref:ref + 1] + 0.25 * q[main:main + 1]) * 1.5
            read = vct_ops.sdpa_attention(queries, k[look:look + 1], v[look:look + 1], heads)
            step = int(torch.argmin((sigmas[:-1] - extra["sigmas"][0]).abs()))
            seen[(key, step)] = bool(torch.allclose(out[main], read[0], atol=1e-12))
            # B* and R always attend to themselves alone.
            for row in (ref, look):
                plain = vct_ops.sdpa_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], heads)
                torch.testing.assert_close(out[row], plain[0], rtol=1e-12, atol=1e-12)
            return out

        return recorder

    run(setting, appearance=config, wrap=wrap)
    window = range(2, 7)  # from 0.2 to 0.7 of the 10 steps
    for (key, step), read in seen.items():
        # Only the decoder's layer ("output") has a quarter or more of the latent's positions here.
        assert read == (key == ("output", 3, 0) and step in window), (key, step)
    assert sum(seen.values()) == len(window)


def test_strength_blends_with_what_b_gets_otherwise(setting):
    config = vct_ops.AppearanceConfig(strength=0.3, query_preservation=0.0, temperature=1.0)
    sigmas = setting[1]
    ctl = vct_ops.AttentionController(sigmas, vct_ops.InjectionConfig(0.0, 0.0), appearance=config)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 16, 8, generator=g, dtype=torch.float64) for _ in range(3))
    extra = {"n_heads": 2, "sigmas": sigmas[:1].repeat(5), "original_shape": [5, 4, 4, 4],
             vct_ops.ROLES_KEY: ["uncond", "uncond", "ref", "main", "appearance"]}
    out = ctl.self_attention(q, k, v, extra, decoder=True)
    own = vct_ops.sdpa_attention(q[3:4], k[3:4], v[3:4], 2)
    read = vct_ops.sdpa_attention(q[3:4], k[4:5], v[4:5], 2)
    torch.testing.assert_close(out[3:4], 0.7 * own + 0.3 * read, rtol=1e-12, atol=1e-12)
    assert torch.equal(ctl.self_attention(q, k, v, extra, decoder=False)[3], own[0]), "not a decoder layer"


def test_reading_a_reference_that_walks_with_the_reconstruction_changes_nothing(setting):
    # Whether reading the reference moves B towards it cannot be shown on random weights (the toy
    # world measures it). What can: with the concept equal to the source, B = B*; if R walks B*'s
    # own path, R's rows equal B*'s at every step, so at temperature 1 B reads exactly what it
    # reads otherwise. Reading the wrong rows or R at the wrong step breaks the equality.
    denoise, sigmas, source, _, c_src, _, nulls = setting
    path = [source[-1]]
    vct_ops.ddim_sample(denoise, source[-1], sigmas, c_src, nulls, 7.5, callback=lambda i, n, x: path.append(x))
    walk = torch.stack(path[::-1])
    config = vct_ops.AppearanceConfig(strength=1.0, temperature=1.0, query_preservation=0.5, decoder_only=False,
                                      min_area_fraction=0.0)
    ctl = vct_ops.AttentionController(sigmas, vct_ops.InjectionConfig(0.0, 0.0), appearance=config)
    out = vct_ops.dual_branch_sample(denoise, source[-1], sigmas, c_src, c_src, nulls, 7.5, patched(ctl),
                                     appearance_trajectory=walk, appearance_cond=c_src)
    torch.testing.assert_close(out.main, out.ref, rtol=1e-9, atol=1e-9)
    late = torch.cat([walk[:1], walk[:-1]])  # R one step behind
    out = vct_ops.dual_branch_sample(denoise, source[-1], sigmas, c_src, c_src, nulls, 7.5, patched(ctl),
                                     appearance_trajectory=late, appearance_cond=c_src)
    assert float((out.main - out.ref).abs().max()) > 1e-3


def test_window_layers_and_steps(setting):
    sigmas = setting[1]
    window = vct_ops.AppearanceWindow(sigmas, vct_ops.AppearanceConfig(strength=1.0, start_fraction=0.2,
                                                                       end_fraction=0.7, max_area_fraction=0.25))
    inside, before, after = float(sigmas[3]), float(sigmas[1]), float(sigmas[8])
    assert window.active(inside, 16, 64, decoder=True)
    assert not window.active(inside, 16, 64, decoder=False), "an encoder layer"
    assert not window.active(inside, 64, 64, decoder=True), "above max_area_fraction"
    assert not window.active(inside, 4, 64, decoder=True), "below min_area_fraction"
    assert not window.active(before, 16, 64, decoder=True) and not window.active(after, 16, 64, decoder=True)
    off = vct_ops.AppearanceWindow(sigmas, vct_ops.AppearanceConfig(strength=0.0))
    assert not off.active(inside, 16, 64, decoder=True)


def test_bad_inputs_raise(setting):
    _, sigmas, source, reference, c_src, c_concept, nulls = setting
    for bad in ({"strength": 1.5}, {"strength": -0.1}, {"query_preservation": 2.0}, {"temperature": 0.0},
                {"end_fraction": float("nan")}):
        with pytest.raises(ValueError, match="appearance"):
            vct_ops.AppearanceConfig(**bad)
    with pytest.raises(ValueError, match="window"):
        vct_ops.AppearanceConfig(strength=1.0, start_fraction=0.5, end_fraction=0.5)
    with pytest.raises(ValueError, match="reference's trajectory has shape"):
        vct_ops.dual_branch_sample(tn.GaussianDenoiser(), source[-1], sigmas, c_src, c_concept, nulls,
                                   appearance_trajectory=reference[1:], appearance_cond=c_src)
    with pytest.raises(ValueError, match="together"):
        vct_ops.dual_branch_sample(tn.GaussianDenoiser(), source[-1], sigmas, c_src, c_concept, nulls,
                                   appearance_trajectory=reference)
