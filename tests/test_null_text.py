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
    # Embeddings are carried over: they drift away from the initial one, step after step.
    drift = [float((e - c_null).norm()) for e in result.embeddings[:-1]]
    assert drift[-1] > drift[0] > 0


def test_only_the_null_embedding_gets_gradients_even_from_a_trainable_network(setting):
    _, sigmas, _, c_src, c_null, trajectory = setting
    denoise = tn.tiny_denoiser(seed=0)
    for p in denoise.net.parameters():
        p.requires_grad_(True)  # as a host's model may be: the kernel must not touch its gradients
    result = vct_ops.null_text_invert(denoise, trajectory, sigmas, c_src, c_null, inner_steps=2, early_stop=0.0,
                                      early_stop_slope=0.0)
    assert result.iterations == [2] * 9 + [0]
    assert all(p.grad is None for p in denoise.net.parameters())


def z_space_loss(x_pred, x_target, sigma):
    """The reference's null-text loss, written in latents z = x / sqrt(1 + sigma^2)."""
    return float(((vct_ops.x_to_latent(x_pred, sigma) - vct_ops.x_to_latent(x_target, sigma)) ** 2).mean())


def test_each_loss_is_measured_on_latents_and_the_latent_advances_with_the_tuned_embedding(setting):
    denoise, sigmas, _, c_src, c_null, trajectory = setting
    # One iteration per step: step i's loss is that of the embedding carried in (Adam then updates it
    # once), and the latent must then advance with the updated embedding, as the reference does.
    result = vct_ops.null_text_invert(denoise, trajectory, sigmas, c_src, c_null, inner_steps=1, early_stop=0.0,
                                      early_stop_slope=0.0)
    steps = sigmas.numel() - 1
    x, carried = trajectory[-1], c_null
    with torch.no_grad():
        for i in range(steps - 1):  # the last step is the identity step
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            sig = sigma.view(1)
            den_cond = denoise(x, sig, c_src)
            before = vct_ops.ddim_step(x, sigma, sigma_next, vct_ops.cfg(denoise(x, sig, carried), den_cond, 7.5))
            expected = z_space_loss(before, trajectory[steps - i - 1], sigma_next)
            assert result.losses[i] == pytest.approx(expected, rel=1e-4), i
            carried = result.embeddings[i]
            x = vct_ops.ddim_step(x, sigma, sigma_next, vct_ops.cfg(denoise(x, sig, carried), den_cond, 7.5))


def test_a_step_stops_at_its_first_iteration_under_the_threshold(setting):
    denoise, _, _, c_src, c_null, _ = setting
    sigmas = vct_ops.ddim_sigmas(tn.sd_train_sigmas(), 3)
    trajectory = vct_ops.ddim_invert(denoise, vct_ops.latent_to_x(torch.randn(1, 4, 8, 8, generator=torch.Generator()
                                                                              .manual_seed(4)), sigmas[-1]),
                                     sigmas, c_src)
    # The loss step 0 reports after k iterations without early stop is the loss of its k-th iteration.
    curve = [vct_ops.null_text_invert(denoise, trajectory, sigmas, c_src, c_null, inner_steps=k, early_stop=0.0,
                                      early_stop_slope=0.0).losses[0] for k in range(1, 7)]
    assert curve[0] > curve[2] > curve[5], curve
    threshold = 0.5 * (curve[2] + min(curve[:2]))  # crossed first at the third iteration
    assert min(curve[:2]) > threshold > curve[2], curve
    stopped = vct_ops.null_text_invert(denoise, trajectory, sigmas, c_src, c_null, inner_steps=6, early_stop=threshold,
                                       early_stop_slope=0.0)
    assert stopped.iterations[0] == 3 and stopped.losses[0] == pytest.approx(curve[2], rel=1e-6)


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
