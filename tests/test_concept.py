"""Concept learning: the loss falls, only the concept vectors change, seeded runs repeat."""
import pytest
import torch
import vct_testnet as tn

import vct_ops


def make_setting(seed=0):
    denoise = tn.tiny_denoiser(seed=seed)
    torch.manual_seed(seed + 1)
    encoder = tn.init_like_design(tn.TinyTextEncoder()).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    z_ref = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    init = vct_ops.init_concept_vectors(encoder.words([3, 4]), 3)
    return denoise, encoder, z_ref, init


def eval_loss(denoise, encoder, vectors, z_ref, sigmas):
    # The same fixed timesteps and noises before and after training.
    g = torch.Generator().manual_seed(123)
    picks = torch.randint(0, sigmas.numel(), (32,), generator=g)
    noise = torch.randn(32, *z_ref.shape[1:], generator=g)
    with torch.no_grad():
        cond = encoder(vectors).expand(32, -1, -1)
        return float(vct_ops.concept_loss(denoise, cond, z_ref.expand(32, -1, -1, -1), sigmas[picks], noise))


def test_concept_learning_lowers_loss_and_changes_only_the_vectors():
    denoise, encoder, z_ref, init = make_setting()
    sigmas = tn.sd_train_sigmas()
    frozen = {k: v.clone() for k, v in list(denoise.net.state_dict().items()) + list(encoder.state_dict().items())}
    # A higher rate than the reference's 5e-4: the tiny encoder's vectors must move far in 100 steps.
    config = vct_ops.ConceptConfig(steps=100, grad_accum=2, learning_rate=1e-2, seed=7)
    sampler = vct_ops.reference_latent_sampler(z_ref, std=0.05 * torch.ones_like(z_ref))
    result = vct_ops.learn_concept(denoise, encoder, init, sampler, sigmas, config)
    before = eval_loss(denoise, encoder, init, z_ref, sigmas)
    after = eval_loss(denoise, encoder, result.vectors, z_ref, sigmas)
    print(f"concept loss: first step {result.losses[0]:.4f}, last step {result.losses[-1]:.4f}; "
          f"fixed evaluation {before:.4f} -> {after:.4f}")
    assert after < 0.85 * before
    assert len(result.losses) == 100
    assert result.vectors.shape == init.shape and not torch.equal(result.vectors, init)
    state = dict(list(denoise.net.state_dict().items()) + list(encoder.state_dict().items()))
    for k, v in frozen.items():
        assert torch.equal(state[k], v), k


def test_only_the_vectors_get_gradients_even_from_trainable_networks():
    denoise, encoder, z_ref, init = make_setting()
    networks = list(denoise.net.parameters()) + list(encoder.parameters())
    for p in networks:
        p.requires_grad_(True)  # as a host's models may be: the kernel must not touch their gradients
    config = vct_ops.ConceptConfig(steps=2, grad_accum=2, seed=3)
    vct_ops.learn_concept(denoise, encoder, init, vct_ops.reference_latent_sampler(z_ref), tn.sd_train_sigmas(), config)
    assert all(p.grad is None for p in networks)


def test_gradients_reach_the_vectors():
    denoise, encoder, z_ref, init = make_setting()
    vectors = init.clone().requires_grad_(True)
    loss = vct_ops.concept_loss(denoise, encoder(vectors), z_ref, torch.tensor([2.0]), torch.randn_like(z_ref))
    loss.backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0


def test_seeded_runs_repeat_and_seeds_differ():
    denoise, encoder, z_ref, init = make_setting()
    sigmas = tn.sd_train_sigmas()
    sampler = vct_ops.reference_latent_sampler(z_ref)
    run = lambda seed: vct_ops.learn_concept(  # noqa: E731
        denoise, encoder, init, sampler, sigmas, vct_ops.ConceptConfig(steps=5, seed=seed)
    )
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.vectors, b.vectors) and a.losses == b.losses
    assert not torch.equal(a.vectors, c.vectors)


def test_initialisation_copies_spread_tokens():
    words = torch.arange(5.0)[:, None].expand(5, 3)
    init = vct_ops.init_concept_vectors(words, 3)
    assert init[:, 0].tolist() == [0.0, 1.0, 3.0]  # token i * 5 // 3
    single = vct_ops.init_concept_vectors(words[:1], 3)
    assert torch.equal(single, words[:1].expand(3, 3))
    with pytest.raises(ValueError, match="initializer"):
        vct_ops.init_concept_vectors(words[:0], 3)
    with pytest.raises(ValueError, match="num_vectors"):
        vct_ops.init_concept_vectors(words, 0)


def test_v_prediction_loss_uses_the_v_target():
    model = tn.GaussianDenoiser(mean=0.0, std=1.0)
    z0 = torch.randn(2, 4, 4, 4)
    noise = torch.randn(2, 4, 4, 4)
    sigma = torch.tensor([0.5, 3.0])
    loss = vct_ops.concept_loss(model, None, z0, sigma, noise, prediction="v", l1_weight=0.0)
    # Independent computation in latent units: z_t = sqrt(a) z0 + sqrt(1 - a) n, v = sqrt(a) n - sqrt(1 - a) z0.
    a = (1.0 / (1.0 + sigma**2)).view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    x = z_t / a.sqrt()
    den = model(x, sigma, None)
    eps_hat = (x - den) / sigma.view(-1, 1, 1, 1)
    v_hat = a.sqrt() * eps_hat - (1 - a).sqrt() * den
    expected = torch.mean((v_hat - (a.sqrt() * noise - (1 - a).sqrt() * z0)) ** 2)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="prediction"):
        vct_ops.concept_loss(model, None, z0, sigma, noise, prediction="x0")


def test_bad_steps_raise():
    denoise, encoder, z_ref, init = make_setting()
    with pytest.raises(ValueError, match="steps"):
        vct_ops.learn_concept(denoise, encoder, init, vct_ops.reference_latent_sampler(z_ref), tn.sd_train_sigmas(),
                              vct_ops.ConceptConfig(steps=0))


def test_one_optimiser_update_per_step_whatever_the_accumulation(monkeypatch):
    denoise, encoder, z_ref, init = make_setting()
    updates = []
    original = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        updates.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    config = vct_ops.ConceptConfig(steps=3, grad_accum=4, seed=0)
    result = vct_ops.learn_concept(denoise, encoder, init, vct_ops.reference_latent_sampler(z_ref),
                                   tn.sd_train_sigmas(), config)
    assert len(updates) == 3 and len(result.losses) == 3
    assert config.effective_lr() == pytest.approx(2e-3)  # 5e-4 scaled by accumulation 4, as the reference


def test_l1_term_is_the_mean_absolute_error_of_predicted_z0():
    model = tn.GaussianDenoiser()
    z0, noise, sigma = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([0.7, 5.0])
    with_l1 = vct_ops.concept_loss(model, None, z0, sigma, noise, l1_weight=2.0)
    without = vct_ops.concept_loss(model, None, z0, sigma, noise, l1_weight=0.0)
    den = model(z0 + sigma.view(-1, 1, 1, 1) * noise, sigma, None)
    torch.testing.assert_close(with_l1 - without, 2.0 * (den - z0).abs().mean())


def test_fused_accumulation_equals_sequential_accumulation():
    denoise, encoder, z_ref, init = make_setting()
    sampler = vct_ops.reference_latent_sampler(z_ref, std=0.1 * torch.ones_like(z_ref))
    runs = {}
    for fused in (False, True):
        config = vct_ops.ConceptConfig(steps=4, grad_accum=3, seed=11, fuse_accumulation=fused)
        calls = []

        def counting(x, sigma, cond, options=None, calls=calls):
            calls.append(x.shape[0])
            return denoise(x, sigma, cond, options)

        runs[fused] = (vct_ops.learn_concept(counting, encoder, init, sampler, tn.sd_train_sigmas(), config), calls)
    (sequential, seq_calls), (fused, fused_calls) = runs[False], runs[True]
    assert seq_calls == [1] * 12 and fused_calls == [3] * 4
    torch.testing.assert_close(fused.vectors, sequential.vectors, rtol=1e-4, atol=1e-5)
    assert fused.losses == pytest.approx(sequential.losses, rel=1e-4)


def record_gradients(monkeypatch) -> list:
    """Make every AdamW step first record the gradients it is given (one list per step)."""
    recorded = []
    original = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        recorded.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return recorded


def test_the_step_gradient_is_the_mean_over_micro_batches_fused_or_not(monkeypatch):
    # Adam ignores a constant gradient scale, so the vectors after a step cannot show a wrong
    # accumulation scale: the gradients are compared themselves, with one computed here anew.
    denoise, encoder, z_ref, init = make_setting()
    sampler = vct_ops.reference_latent_sampler(z_ref, flip_probability=0.0)  # every draw is z_ref itself
    recorded = record_gradients(monkeypatch)
    inputs = {}
    for fused in (False, True):
        calls = []

        def recording(x, sigma, cond, options=None, calls=calls):
            calls.append((x.detach().clone(), sigma.detach().clone()))
            return denoise(x, sigma, cond, options)

        config = vct_ops.ConceptConfig(steps=1, grad_accum=3, seed=11, fuse_accumulation=fused)
        vct_ops.learn_concept(recording, encoder, init, sampler, tn.sd_train_sigmas(), config)
        inputs[fused] = (torch.cat([x for x, _ in calls]), torch.cat([s for _, s in calls]))
    (sequential,), (fused,) = recorded
    x, sigma = inputs[False]
    torch.testing.assert_close(inputs[True][0], x)  # the same draws either way
    # The mean of the three micro-batch losses (one row each) is the loss over the three rows.
    vectors = init.clone().requires_grad_(True)
    noise = (x - z_ref) / sigma.view(-1, 1, 1, 1)
    loss = vct_ops.concept_loss(denoise, encoder(vectors), z_ref.expand(3, -1, -1, -1), sigma, noise)
    (expected,) = torch.autograd.grad(loss, vectors)
    torch.testing.assert_close(sequential, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-7)


def test_loss_scaling_changes_no_gradient_in_float32(monkeypatch):
    denoise, encoder, z_ref, init = make_setting()
    recorded = record_gradients(monkeypatch)
    for scale in (2.0**14, 1.0):
        vct_ops.learn_concept(denoise, encoder, init, vct_ops.reference_latent_sampler(z_ref), tn.sd_train_sigmas(),
                              vct_ops.ConceptConfig(steps=2, seed=2, loss_scale=scale))
    scaled, plain = recorded[:2], recorded[2:]
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-9)


def test_loss_scaling_changes_nothing_in_float32_and_skips_overflowing_steps():
    denoise, encoder, z_ref, init = make_setting()
    sampler = vct_ops.reference_latent_sampler(z_ref)
    run = lambda scale: vct_ops.learn_concept(  # noqa: E731
        denoise, encoder, init, sampler, tn.sd_train_sigmas(), vct_ops.ConceptConfig(steps=3, seed=2, loss_scale=scale)
    )
    torch.testing.assert_close(run(2.0**14).vectors, run(1.0).vectors, rtol=1e-5, atol=1e-6)
    scaler = vct_ops.LossScale(8.0)
    p = torch.zeros(2, requires_grad=True)
    scaler.backward((p * torch.tensor([1.0, float("inf")])).sum())
    assert not scaler.unscale([p]) and p.grad is None and scaler.scale == 4.0
    scaler.backward((p * 3.0).sum())
    assert scaler.unscale([p]) and torch.equal(p.grad, torch.tensor([3.0, 3.0]))
