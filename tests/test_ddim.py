"""DDIM inversion on the exact denoiser of Gaussian data, and input validation."""
import pytest
import torch
import vct_testnet as tn

import vct_ops


def roundtrip_error(steps):
    model = tn.GaussianDenoiser()
    sigmas = vct_ops.ddim_sigmas(tn.sd_train_sigmas().double(), steps)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    traj = vct_ops.ddim_invert(model, x0, sigmas, torch.zeros(2, 1, 1))
    back = vct_ops.ddim_sample(model, traj[-1], sigmas, torch.zeros(2, 1, 1))
    exact_top = model.flow(x0, float(sigmas[-1]), float(sigmas[0]))
    return float(((back - x0) ** 2).mean().sqrt()), float(((traj[-1] - exact_top) ** 2).mean().sqrt())


def test_roundtrip_error_falls_like_a_first_order_method():
    errors = {steps: roundtrip_error(steps) for steps in (10, 20, 40, 80, 160)}
    roundtrip = [errors[s][0] for s in (10, 20, 40, 80)]
    for coarse, fine in zip(roundtrip, roundtrip[1:]):
        assert 1.7 < coarse / fine < 2.3, roundtrip  # halving the step halves the error
    assert roundtrip[0] < 0.2 and roundtrip[-1] < 0.02
    # Inversion alone against the closed-form ODE solution: first order once the steps are fine
    # enough for the schedule's uneven spacing to stop mattering.
    inversion = [errors[s][1] for s in (40, 80, 160)]
    for coarse, fine in zip(inversion, inversion[1:]):
        assert 1.6 < coarse / fine < 2.6, inversion


def test_inversion_keeps_the_start_and_is_deterministic():
    model = tn.GaussianDenoiser()
    sigmas = vct_ops.ddim_sigmas(tn.sd_train_sigmas(), 10)
    x0 = torch.randn(1, 4, 8, 8)
    a = vct_ops.ddim_invert(model, x0, sigmas, torch.zeros(1, 1, 1))
    b = vct_ops.ddim_invert(model, x0, sigmas, torch.zeros(1, 1, 1))
    assert a.shape == (11, 1, 4, 8, 8)
    assert torch.equal(a[0], x0) and torch.equal(a, b)
    assert torch.equal(a[1], a[0]), "the reference's first inversion step (t = 0 to t = 0) is the identity"


def test_guidance_one_ignores_uncond():
    d = tn.tiny_denoiser()
    sigmas = vct_ops.ddim_sigmas(tn.sd_train_sigmas(), 5)
    x0 = torch.randn(1, 4, 8, 8)
    c, u = torch.randn(1, 32, 64), torch.randn(1, 32, 64)
    a = vct_ops.ddim_invert(d, x0, sigmas, c)
    b = vct_ops.ddim_invert(d, x0, sigmas, c, u, 1.0)
    g = vct_ops.ddim_invert(d, x0, sigmas, c, u, 3.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a[-1], g[-1])


@pytest.mark.parametrize("steps", [0, -3])
def test_bad_step_counts_raise(steps):
    with pytest.raises(ValueError, match="steps"):
        vct_ops.ddim_sigmas(tn.sd_train_sigmas(), steps)


def test_non_finite_latent_raises():
    sigmas = vct_ops.ddim_sigmas(tn.sd_train_sigmas(), 5)
    x0 = torch.randn(1, 4, 8, 8)
    x0[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x0"):
        vct_ops.ddim_invert(tn.GaussianDenoiser(), x0, sigmas, torch.zeros(1, 1, 1))
    with pytest.raises(ValueError, match="x_T"):
        vct_ops.ddim_sample(tn.GaussianDenoiser(), x0.squeeze(0), sigmas, torch.zeros(1, 1, 1))


def test_bad_schedule_raises():
    x0 = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="sigmas"):
        vct_ops.ddim_invert(tn.GaussianDenoiser(), x0, torch.tensor([1.0, 0.0]), torch.zeros(1, 1, 1))
    with pytest.raises(ValueError, match="sigmas"):
        vct_ops.ddim_invert(tn.GaussianDenoiser(), x0, torch.tensor([0.5, 1.0]), torch.zeros(1, 1, 1))


def test_mismatched_conditioning_batch_raises():
    sigmas = vct_ops.ddim_sigmas(tn.sd_train_sigmas(), 5)
    with pytest.raises(ValueError, match="batch"):
        vct_ops.ddim_invert(tn.GaussianDenoiser(), torch.randn(2, 4, 8, 8), sigmas, torch.zeros(3, 1, 1))
