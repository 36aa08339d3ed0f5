"""The kernel on rectified-flow models (ComfyUI's CONST sampling: SD3, Flux): the state space, Euler
inversion of the flow ODE, the flow concept loss, null-text in latent units.

The reference model is the exact denoiser of Gaussian data z0 ~ N(0, s^2 I), whose flow ODE is
solved in closed form: the state at sigma is x0 * std(sigma) / s with std(sigma)^2 = (1 - sigma)^2 s^2
+ sigma^2. So the expected trajectories come from the formula, not from the code under test.
"""
from __future__ import annotations

import math

import pytest
import torch
from vct_testnet import flow_sigmas

import vct_ops

S = 0.5  # the data's standard deviation
COND = torch.zeros(1, 3, 8)  # the model ignores it


def gaussian_flow_denoiser(x, sigma, cond, transformer_options=None):
    """E[z0 | x at sigma] for z0 ~ N(0, S^2) under x = (1 - sigma) z0 + sigma eps."""
    s = sigma.view(-1, *([1] * (x.dim() - 1))).to(x)
    # The conditioning takes no part but stays in the graph, so null-text has a gradient to follow.
    return x * (1 - s) * S**2 / ((1 - s) ** 2 * S**2 + s**2) + 0.0 * cond.sum()


def std(sigma: float) -> float:
    return math.sqrt((1 - sigma) ** 2 * S**2 + sigma**2)


@pytest.fixture
def x0():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * S


def test_flow_state_is_the_noisy_latent():
    z0, noise, sigma = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 3.0), torch.tensor(0.25)
    assert torch.equal(vct_ops.FLOW.noised(z0, noise, sigma), torch.full((1, 1, 2, 2), 0.75 + 0.75))
    assert torch.equal(vct_ops.FLOW.to_state(z0, 0.7), z0) and torch.equal(vct_ops.FLOW.to_latent(z0, 0.7), z0)
    assert torch.equal(vct_ops.DIFFUSION.noised(z0, noise, sigma), torch.full((1, 1, 2, 2), 1.75))


def test_the_euler_step_is_ddim_on_the_flow():
    # x' = (1 - sigma') z0_hat + sigma' eps_hat, with eps_hat recovered from x = (1 - sigma) z0_hat + sigma eps_hat.
    x, den = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    sigma, nxt = torch.tensor(0.8), torch.tensor(0.5)
    eps = (x - (1 - sigma) * den) / sigma
    assert torch.allclose(vct_ops.ddim_step(x, sigma, nxt, den), (1 - nxt) * den + nxt * eps, atol=1e-6)


def test_euler_inversion_follows_the_flow_ode(x0):
    sigmas = flow_sigmas(200)
    trajectory = vct_ops.ddim_invert(gaussian_flow_denoiser, x0, sigmas, COND, space=vct_ops.FLOW)
    for i in (50, 100, 200):
        sigma = float(sigmas.flip(0)[i])
        expected = x0 * std(sigma) / std(float(sigmas[-1]))
        error = (trajectory[i] - expected).abs().max() / expected.abs().max()
        assert error < 0.02, (i, float(error))


def test_flow_inversion_reads_the_velocity_at_the_current_state_and_next_sigma(x0):
    seen = []

    def model(x, sigma, cond, options=None):
        seen.append((x, sigma))
        return gaussian_flow_denoiser(x, sigma, cond)

    vct_ops.ddim_invert_step(model, x0, torch.tensor(0.3), torch.tensor(0.6), COND, space=vct_ops.FLOW)
    assert torch.equal(seen[0][0], x0) and bool((seen[0][1] == 0.6).all())
    vct_ops.ddim_invert_step(model, x0, torch.tensor(0.3), torch.tensor(0.6), COND)  # a diffusion state rescales
    assert not torch.equal(seen[1][0], x0)


def test_inversion_then_sampling_rebuilds_the_latent_better_with_more_steps(x0):
    errors = []
    for steps in (10, 50):
        sigmas = flow_sigmas(steps)
        trajectory = vct_ops.ddim_invert(gaussian_flow_denoiser, x0, sigmas, COND, space=vct_ops.FLOW)
        rebuilt = vct_ops.ddim_sample(gaussian_flow_denoiser, trajectory[-1], sigmas, COND)
        errors.append(float((rebuilt - x0).abs().max()))
    assert errors[1] < errors[0] / 3 and errors[1] < 0.06, errors


def test_the_flow_concept_loss_is_zero_for_the_exact_model():
    z0 = torch.randn(3, 4, 4, 4)
    noise = torch.randn(3, 4, 4, 4)
    sigma = torch.tensor([0.2, 0.5, 0.9])

    seen = []

    def exact(x, s, cond, options=None):  # knows z0: the data is this one latent
        seen.append(x)
        return z0

    assert float(vct_ops.concept_loss(exact, COND, z0, sigma, noise, prediction="flow")) < 1e-10
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(seen[0], (1 - s) * z0 + s * noise)  # the model saw the flow's states


def test_null_text_measures_the_flow_state_as_a_latent(x0):
    # The conditioning takes no part in this model, so the nulls never move and both runs retrace
    # the same states; only the loss's units differ: a diffusion state is the latent times
    # sqrt(1 + sigma^2), a flow state is the latent itself.
    sigmas = flow_sigmas(10)
    trajectory = vct_ops.ddim_invert(gaussian_flow_denoiser, x0, sigmas, COND, space=vct_ops.FLOW)
    null = torch.zeros(1, 3, 8)
    runs = [vct_ops.null_text_invert(gaussian_flow_denoiser, trajectory, sigmas, COND, null, guidance=7.5,
                                     inner_steps=1, early_stop=0.0, early_stop_slope=0.0, space=space)
            for space in (vct_ops.FLOW, vct_ops.DIFFUSION)]
    flow, diffusion = (torch.tensor(r.losses[:-1], dtype=torch.float64) for r in runs)
    assert bool((flow > 1e-6).all())
    assert torch.allclose(flow / diffusion, 1 + sigmas[1:-1].double() ** 2, rtol=1e-4)
