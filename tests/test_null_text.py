"""Null-text (pivotal-tuning) inversion on a tiny UNet whose conditioning has real influence."""
import pytest
import torch
import vct_testnet as tn

import vct_ops


@pytest.fixture(scope="module")
def setting():
    denoise = tn.tiny_denoiser(seed=0)
    sigmas = vct_ops.ddim_sigmas(tn.sd_train_sigmas(), 10)
    g = torch.Generator().manual_seed(10)
    z0 = torch.randn(1, 4, 8, 8, generator=g)
    c_src, c_null = torch.randn(1, 32, 64, generator=g), torch.randn(1, 32, 64, generator=g)
    x0 = vct_ops.latent_to_x(z0, sigmas[-1])
    trajectory = vct_ops.ddim_invert(denoise, x0, sigmas, c_src)
    return denoise, sigmas, x0, c_src, c_null, trajectory


def test_null_text_makes_cfg_reconstruction_far_better_than_plain(setting):
    denoise, sigmas, x0, c_src, c_null, trajectory = setting
    net_before = {k: v.clone() for k, v in denoise.net.state_dict().items()}
    c_null_before = c_null.clone()
    result = vct_ops.null_text_invert(denoise, trajectory, sigmas, c_src, c_null, guidance=7.5)
    plain = vct_ops.ddim_sample(denoise, trajectory[-1], sigmas, c_src, c_null, 7.5)
    tuned = vct_ops.ddim_sample(denoise, trajectory[-1], sigmas, c_src, result.embeddings, 7.5)
    plain_mse = float(((plain - x0) ** 2).mean())
    tuned_mse = float(((tuned - x0) ** 2).mean())
    print(f"CFG 7.5 reconstruction MSE: plain {plain_mse:.4g}, null-text {tuned_mse:.4g}")
    assert tuned_mse * 10 < plain_mse
    assert len(result.embeddings) == 10 and len(result.losses) == 10
    assert result.iterations[-1] == 0, "the identity step needs no optimisation"
    assert all(not e.requires_grad for e in result.embeddings)
    assert torch.equal(c_null, c_null_before), "the initial embedding must not be modified in place"
    for k, v in denoise.net.state_dict().items():
        assert torch.equal(v, net_before[k]), k
        assert all(p.grad is None for p in denoise.net.parameters())
    # Embeddings are carried over: they drift away from the initial one, step after step.
    drift = [float((e - c_null).norm()) for e in result.embeddings[:-1]]
    assert drift[-1] > drift[0] > 0


def test_early_stop_and_iteration_cap(setting):
    denoise, sigmas, _, c_src, c_null, trajectory = setting
    capped = vct_ops.null_text_invert(denoise, trajectory, sigmas, c_src, c_null, inner_steps=3, early_stop=0.0,
                                      early_stop_slope=0.0)
    assert capped.iterations == [3] * 9 + [0]
    stopped = vct_ops.null_text_invert(denoise, trajectory, sigmas, c_src, c_null, inner_steps=3, early_stop=1e9)
    assert stopped.iterations == [1] * 9 + [0]


def test_threshold_grows_with_the_step_index(setting):
    denoise, sigmas, _, c_src, c_null, trajectory = setting
    # With cond == uncond, CFG is guidance 1 whatever phi is: the loss cannot move, so a step stops
    # after one iteration exactly when its fixed loss is under early_stop + i * slope.
    fixed = vct_ops.null_text_invert(denoise, trajectory, sigmas, c_src, c_src, inner_steps=4)
    slope = 1.0
    early = 0.0
    result = vct_ops.null_text_invert(denoise, trajectory, sigmas, c_src, c_src, inner_steps=4, early_stop=early,
                                      early_stop_slope=slope)
    for i, (loss, used) in enumerate(zip(fixed.losses[:-1], result.iterations[:-1])):
        assert used == (1 if loss < early + i * slope else 4), (i, loss, used)


def test_wrong_trajectory_length_raises(setting):
    denoise, sigmas, _, c_src, c_null, trajectory = setting
    with pytest.raises(ValueError, match="trajectory"):
        vct_ops.null_text_invert(denoise, trajectory[:-1], sigmas, c_src, c_null)
    with pytest.raises(ValueError, match="inner_steps"):
        vct_ops.null_text_invert(denoise, trajectory, sigmas, c_src, c_null, inner_steps=0)


def test_each_step_starts_from_the_previous_embedding_with_a_decaying_rate(setting):
    denoise, sigmas, _, c_src, c_null, trajectory = setting
    # One Adam iteration per step moves every element by about lr_i (its first update is
    # g / |g|), so each step's change from the previous embedding reveals lr_i = 1e-2 * (1 - i / 100).
    result = vct_ops.null_text_invert(denoise, trajectory, sigmas, c_src, c_null, inner_steps=1, early_stop=0.0,
                                      early_stop_slope=0.0)
    previous = c_null
    for i, embedding in enumerate(result.embeddings[:-1]):
        moved = float((embedding - previous).abs().max())
        assert moved == pytest.approx(1e-2 * (1 - i / 100), rel=1e-3), i
        previous = embedding
