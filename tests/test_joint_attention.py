"""VCT's dual-branch control on joint attention (the MM-DiT layout of SD3 and Flux), on a tiny
joint-attention flow transformer and on hand-made tensors whose expected outputs are written out
with explicit softmaxes here."""
import copy

import pytest
import torch
import vct_testnet as tn

import vct_ops

STEPS = 8
TEXT = 6  # text tokens of the tiny transformer's conditioning


@pytest.fixture(scope="module")
def setting():
    denoise = tn.tiny_flow_denoiser(seed=5)
    sigmas = tn.flow_sigmas(STEPS)
    g = torch.Generator().manual_seed(6)
    z0 = torch.randn(1, 4, 8, 8, generator=g)
    c_src, c_concept, c_null = (torch.randn(1, TEXT, 64, generator=g) for _ in range(3))
    trajectory = vct_ops.ddim_invert(denoise, z0, sigmas, c_src, space=vct_ops.FLOW)
    return denoise, sigmas, trajectory[-1], c_src, c_concept, c_null


def float64(setting):
    denoise, sigmas, x_T, *conds = setting
    return (tn.FlowDenoiser(copy.deepcopy(denoise.net).double()), sigmas.double(), x_T.double(),
            *(c.double() for c in conds))


def config(self_fraction=0.9, cross_fraction=0.2, same_prompt=False):
    cfg = vct_ops.InjectionConfig(self_fraction, cross_fraction)
    if same_prompt:  # every token aligns, nothing is re-weighted
        cfg.mapper, cfg.alphas = vct_ops.refine_mapping(list(range(TEXT)), list(range(TEXT)), TEXT)
    else:  # tokens 2-3 are the concept's own
        cfg.mapper, cfg.alphas = vct_ops.refine_mapping([0, 1, 4, 5], [0, 1, -1, -2, 4, 5], TEXT)
        cfg.weights = vct_ops.token_weights(TEXT, [2, 3], 0.5)
    return cfg


def sample(denoise, sigmas, x_T, c_src, concept, c_null, cfg, guidance=3.0):
    ctl = vct_ops.JointAttentionController(sigmas, cfg)
    options = {tn.JOINT_HOOK: ctl.joint_attention}
    nulls = [c_null] * (sigmas.numel() - 1)
    return vct_ops.dual_branch_sample(denoise, x_T, sigmas, c_src, concept, nulls, guidance, options)


def test_concept_equal_to_source_gives_the_reconstruction_exactly(setting):
    denoise, sigmas, x_T, c_src, _, c_null = float64(setting)
    for fractions in [(0.9, 0.2), (0.0, 0.0), (1.0, 1.0)]:
        result = sample(denoise, sigmas, x_T, c_src, c_src, c_null, config(*fractions, same_prompt=True))
        assert torch.equal(result.main, result.ref), fractions


def test_the_translation_moves_towards_the_reconstruction_as_self_injection_grows():
    # As for the UNet: on random weights only a network whose prompt acts through where the image
    # looks (not through what it reads) shows the mechanism VCT relies on in a trained model.
    denoise = tn.tiny_flow_denoiser(seed=0, prompt_via_maps=True)
    sigmas = tn.flow_sigmas(STEPS)
    g = torch.Generator().manual_seed(100)
    z0 = torch.randn(1, 4, 8, 8, generator=g)
    c_src, c_concept, c_null = (torch.randn(1, TEXT, 64, generator=g) for _ in range(3))
    x_T = vct_ops.ddim_invert(denoise, z0, sigmas, c_src, space=vct_ops.FLOW)[-1]
    distances = []
    for fraction in (0.0, 0.3, 0.6, 1.0):
        result = sample(denoise, sigmas, x_T, c_src, c_concept, c_null, config(fraction, 0.0))
        distances.append(float(((result.main - result.ref) ** 2).mean()))
    assert all(a > b for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] < 0.5 * distances[0], distances  # measured 0.36x


def rows_and_options(sigma=0.9):
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, TEXT + 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    options = {vct_ops.ROLES_KEY: [vct_ops.ROLE_REF, vct_ops.ROLE_MAIN], "n_heads": 2,
               "sigmas": torch.tensor([sigma, sigma])}
    return q, k, v, options


def explicit(q, k, v, heads=2):
    """softmax(q k^T / sqrt(d)) v per head, written out."""
    d = q.shape[-1] // heads
    out = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        out.append(torch.softmax(qh @ kh.T / d**0.5, dim=-1) @ vh)
    return torch.cat(out, dim=-1)


def test_injected_image_rows_use_the_reconstructions_image_logits_and_their_own_values():
    q, k, v, options = rows_and_options()
    sigmas = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.1])
    ctl = vct_ops.JointAttentionController(sigmas, vct_ops.InjectionConfig(1.0, 0.0))
    out = ctl.joint_attention(q, k, v, TEXT, options)
    keys = torch.cat([k[1, :TEXT], k[0, TEXT:]])  # B's text keys, B*'s image keys
    expected_image = explicit(q[0, TEXT:], keys, v[1])
    expected_text = explicit(q[1, :TEXT], keys, v[1])
    assert torch.allclose(out[1, TEXT:], expected_image, atol=1e-12)
    assert torch.allclose(out[1, :TEXT], expected_text, atol=1e-12)
    assert torch.allclose(out[0], explicit(q[0], k[0], v[0]), atol=1e-12)  # B* untouched


def test_refine_gives_the_image_rows_the_reconstructions_text_maps_at_aligned_tokens():
    q, k, v, options = rows_and_options()
    sigmas = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.1])
    cfg = config(0.0, 1.0)
    ctl = vct_ops.JointAttentionController(sigmas, cfg)
    out = ctl.joint_attention(q, k, v, TEXT, options)
    d = 4
    expected = []
    for h in range(2):
        part = slice(h * d, (h + 1) * d)
        p_main = torch.softmax(q[1, TEXT:, part] @ k[1, :, part].T / d**0.5, dim=-1)
        p_ref = torch.softmax(q[0, TEXT:, part] @ k[0, :, part].T / d**0.5, dim=-1)
        text = p_main[:, :TEXT].clone()
        for target in range(TEXT):
            source, alpha = int(cfg.mapper[target]), float(cfg.alphas[target])
            mapped = p_ref[:, source] if source >= 0 else torch.zeros_like(text[:, 0])
            text[:, target] = (alpha * mapped + (1 - alpha) * p_main[:, target]) * float(cfg.weights[target])
        mixed = torch.cat([text, p_main[:, TEXT:]], dim=-1)
        expected.append(mixed @ v[1, :, part])
    assert torch.allclose(out[1, TEXT:], torch.cat(expected, dim=-1), atol=1e-12)


def test_outside_the_windows_b_attends_as_it_would_alone():
    q, k, v, options = rows_and_options(sigma=0.1)
    sigmas = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.1])
    out = vct_ops.JointAttentionController(sigmas, config(0.5, 0.5)).joint_attention(q, k, v, TEXT, options)
    assert torch.equal(out, vct_ops.sdpa_attention(q, k, v, 2))


def test_a_text_length_beyond_the_sequence_is_refused():
    q, k, v, options = rows_and_options()
    ctl = vct_ops.JointAttentionController(torch.tensor([1.0, 0.5, 0.5]), config())
    with pytest.raises(ValueError, match="text length"):
        ctl.joint_attention(q, k, v, TEXT + 5, options)


def test_local_blend_reads_the_image_to_text_maps():
    q, k, v, options = rows_and_options()
    store = vct_ops.MaskAccumulator(vct_ops.BlendConfig(threshold=0.3, positions=(2,), min_map_positions=4),
                                    (1, 4, 4, 4))
    options[vct_ops.BLEND_KEY] = store
    vct_ops.JointAttentionController(torch.tensor([1.0, 0.5, 0.5]), config()).joint_attention(q, k, v, TEXT, options)
    assert store.recorded and store.mask() is not None


def test_a_guidance_distilled_model_runs_two_rows_per_step(setting):
    # Flux is guidance-distilled: one conditional pass per step, no unconditional rows (null_embeddings None).
    denoise, sigmas, x_T, c_src, c_concept, _ = float64(setting)
    seen = []

    def counting(x, sigma, cond, options=None):
        seen.append((x.shape[0], list(options[vct_ops.ROLES_KEY])))
        return denoise(x, sigma, cond, options)

    ctl = vct_ops.JointAttentionController(sigmas, config(same_prompt=True))
    result = vct_ops.dual_branch_sample(counting, x_T, sigmas, c_src, c_src, None, 1.0,
                                        {tn.JOINT_HOOK: ctl.joint_attention})
    assert torch.equal(result.main, result.ref)  # concept = source: B = B* exactly
    assert seen and all(rows == 2 and roles == [vct_ops.ROLE_REF, vct_ops.ROLE_MAIN] for rows, roles in seen)
    # B* is the plain Euler sampling of the source's conditional prediction.
    alone = vct_ops.ddim_sample(denoise, x_T, sigmas, c_src)
    assert torch.allclose(result.ref, alone, rtol=0, atol=1e-10)
    translated = vct_ops.dual_branch_sample(denoise, x_T, sigmas, c_src, c_concept, None, 1.0,
                                            {tn.JOINT_HOOK: vct_ops.JointAttentionController(
                                                sigmas, config()).joint_attention})
    assert torch.equal(translated.ref, result.ref) and not torch.equal(translated.main, result.main)
