"""The DDIM schedule and step in sigma space against the reference code's alpha-space formulas."""
import numpy as np
import pytest
import torch
import vct_testnet as tn

import vct_ops


def reference_alphas_cumprod():
    # Stable Diffusion's scaled-linear betas, written out independently in numpy.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_alpha_table_matches_scaled_linear_betas():
    ours = vct_ops.scaled_linear_alphas_cumprod().numpy()
    np.testing.assert_allclose(ours, reference_alphas_cumprod(), rtol=1e-12)


def test_ddim_sigmas_follow_reference_timesteps():
    ab = reference_alphas_cumprod()
    sigmas = vct_ops.ddim_sigmas(torch.from_numpy(np.sqrt((1 - ab) / ab)), 50)
    timesteps = list(range(980, -1, -20))
    assert len(timesteps) == 50 and sigmas.numel() == 51
    expected = [np.sqrt((1 - ab[t]) / ab[t]) for t in timesteps] + [np.sqrt((1 - ab[0]) / ab[0])]
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=1e-12)
    assert sigmas[-1] == sigmas[-2], "the step below t = 0 must land on alpha_bar[0], not 1"


def reference_next_step(eps, t, t_prev, z, ab):
    # The reference's inversion step, from timestep t_prev up to t (alpha_bar[0] below zero).
    a_t = ab[t_prev] if t_prev >= 0 else ab[0]
    a_next = ab[t]
    z0 = (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_next**0.5 * z0 + (1 - a_next) ** 0.5 * eps


def reference_prev_step(eps, t, t_prev, z, ab):
    a_t = ab[t]
    a_prev = ab[t_prev] if t_prev >= 0 else ab[0]
    z0 = (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_prev**0.5 * z0 + (1 - a_prev) ** 0.5 * eps


class TimestepEps:
    """An eps model in the reference's terms (latent z, timestep t) and the same model as a denoiser."""

    def __init__(self, ab):
        self.ab = ab
        self.weight = torch.randn(4, 4, dtype=torch.float64) * 0.5

    def eps(self, z, t):
        return torch.tanh(torch.einsum("ij,bjhw->bihw", self.weight, z) + 0.001 * t)

    def denoiser(self, x, sigma, cond, transformer_options=None):
        ab_t = 1.0 / (1.0 + sigma**2)
        t = int(np.argmin(np.abs(self.ab - float(ab_t[0]))))
        z = x * ab_t.sqrt().view(-1, 1, 1, 1)
        return x - sigma.view(-1, 1, 1, 1) * self.eps(z, t)


@pytest.mark.parametrize("steps", [10, 50])
def test_sigma_space_ddim_equals_reference_alpha_space(steps):
    ab = reference_alphas_cumprod()
    model = TimestepEps(ab)
    sigmas = vct_ops.ddim_sigmas(torch.from_numpy(np.sqrt((1 - ab) / ab)), steps)
    ratio = 1000 // steps
    timesteps = list(range((steps - 1) * ratio, -1, -ratio))
    z0 = torch.randn(1, 4, 8, 8, dtype=torch.float64)

    # Reference inversion: for t = 0, ratio, ..., step from t - ratio to t.
    z, ref_traj = z0, [z0]
    for t in reversed(timesteps):
        z = reference_next_step(model.eps(z, t), t, t - ratio, z, ab)
        ref_traj.append(z)
    x_traj = vct_ops.ddim_invert(model.denoiser, vct_ops.latent_to_x(z0, sigmas[-1]), sigmas, torch.zeros(1, 1, 1))
    ours = [vct_ops.x_to_latent(x, s) for x, s in zip(x_traj, sigmas.flip(0))]
    for a, b in zip(ours, ref_traj):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

    # Reference sampling back down from the top of the trajectory.
    z = ref_traj[-1]
    for t in timesteps:
        z = reference_prev_step(model.eps(z, t), t, t - ratio, z, ab)
    x = vct_ops.ddim_sample(model.denoiser, x_traj[-1], sigmas, torch.zeros(1, 1, 1))
    torch.testing.assert_close(vct_ops.x_to_latent(x, sigmas[-1]), z, rtol=1e-9, atol=1e-9)


def test_windows_cover_the_first_fraction_of_steps():
    sigmas = vct_ops.ddim_sigmas(tn.sd_train_sigmas(), 50)
    for fraction, expected in [(0.9, 45), (0.2, 10), (0.0, 0), (1.0, 50)]:
        threshold = vct_ops.window_sigma(sigmas, fraction)
        inside = [i for i in range(50) if float(sigmas[i]) > threshold]
        assert inside == list(range(expected)), fraction
        if 0 < expected < 50:
            # A margin on both sides: a sigma rounded on its way through a half-precision model
            # still falls on the right side.
            assert float(sigmas[expected]) * 1.01 < threshold < float(sigmas[expected - 1]) * 0.99


def test_windows_against_the_reference_counts_over_the_slider():
    # The figures README's "Where we differ from the reference code" gives, counted over the slider's
    # 101 values (0.00 to 1.00 in steps of 0.01) at 50 steps. The reference's self-attention window
    # is int(T * tau) steps and its cross-attention window int(tau * (T + 1)) (its alpha table has
    # T + 1 rows; at most T of them are used); ours is int(tau * T + 1e-6) for both.
    sigmas = vct_ops.ddim_sigmas(tn.sd_train_sigmas(), 50)
    ours = {k: vct_ops.steps_in_window(sigmas, k / 100) for k in range(101)}
    self_differs = [k for k in range(101) if ours[k] != int(50 * (k / 100))]
    cross_differs = [k for k in range(101) if ours[k] != min(50, int(k / 100 * 51))]
    assert self_differs == [58] and ours[58] == 29  # 0.58 * 50 = 28.999999999999996 in floating point
    assert cross_differs == list(range(51, 100, 2))  # every odd value from 0.51: one step fewer than the reference
    assert all(ours[k] == min(50, int(k / 100 * 51)) - 1 for k in cross_differs)
    assert ours[90] == 45 and ours[20] == 10  # the defaults agree with both
