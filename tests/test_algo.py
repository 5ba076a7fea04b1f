"""The DMDR math core against the equations of DESIGN section 2."""

import math

import pytest
import torch

from dmdr_rl import algo


def test_cosine_factor_start_middle_end():
    assert algo.cosine_factor(0, 2000) == pytest.approx(1.0)
    assert algo.cosine_factor(1000, 2000) == pytest.approx(0.5)
    assert algo.cosine_factor(2000, 2000) == pytest.approx(0.0)
    assert algo.cosine_factor(5000, 2000) == pytest.approx(0.0)


def test_dynamic_distribution_guidance_ends_at_the_teacher():
    assert algo.real_score_scale(0, 0.5, 2000) == pytest.approx(0.5)
    assert algo.real_score_scale(1000, 0.5, 2000) == pytest.approx(0.25)
    assert algo.real_score_scale(2000, 0.5, 2000) == 0.0


def test_dynamic_renoise_starts_at_beta_4_1p5_and_ends_uniform():
    a, b = algo.renoise_beta(0, 4.0, 1.5, 2000)
    assert (a, b) == pytest.approx((4.0, 1.5)) and a / (a + b) == pytest.approx(0.727, abs=1e-3)
    assert algo.renoise_beta(1000, 4.0, 1.5, 2000) == pytest.approx((2.5, 1.25))
    assert algo.renoise_beta(2000, 4.0, 1.5, 2000) == pytest.approx((1.0, 1.0))


def test_renoise_samples_follow_the_schedule_and_are_seeded():
    early = algo.sample_renoise_timesteps(20000, 0, 4.0, 1.5, 2000, torch.Generator().manual_seed(0))
    late = algo.sample_renoise_timesteps(20000, 2000, 4.0, 1.5, 2000, torch.Generator().manual_seed(0))
    assert early.mean().item() == pytest.approx(4 / 5.5, abs=0.01)
    assert late.mean().item() == pytest.approx(0.5, abs=0.01) and late.std().item() == pytest.approx(1 / math.sqrt(12), abs=0.01)
    again = algo.sample_renoise_timesteps(20000, 0, 4.0, 1.5, 2000, torch.Generator().manual_seed(0))
    assert torch.equal(early, again) and 0 < early.min() and early.max() < 1


def test_renoise_samples_are_kept_inside_eps_of_the_ends():
    """x0 = x_tau - tau v needs tau in [eps, 1 - eps] (eps = 1e-3): at Beta(0.05, 0.05), whose draws pile up
    within 1e-3 of 0 and of 1 (about a third at each end), many land exactly on the bounds, none beyond."""
    tau = algo.sample_renoise_timesteps(4000, 0, 0.05, 0.05, 2000, torch.Generator().manual_seed(0))
    low, high = torch.tensor(1e-3), torch.tensor(1 - 1e-3)
    assert tau.min() == low and tau.max() == high
    assert (tau == low).sum() > 400 and (tau == high).sum() > 400
    wider = algo.sample_renoise_timesteps(4000, 0, 0.05, 0.05, 2000, torch.Generator().manual_seed(0), eps=0.1)
    assert wider.min() == torch.tensor(0.1) and wider.max() == torch.tensor(0.9)


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    x0_real, x0_fake = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    algo.dmd_loss(x0, x0_real, x0_fake).backward()
    weight = (x0.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8
    expected = (x0_fake - x0_real) / weight / x0.numel()
    assert torch.allclose(x0.grad, expected, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_dmd_loss_does_not_differentiate_through_the_scores_and_survives_non_finite_scores(bad):
    x0 = torch.randn(1, 3, 2, 2, requires_grad=True)
    x0_real = torch.randn(1, 3, 2, 2, requires_grad=True)
    x0_fake = torch.randn(1, 3, 2, 2)
    x0_fake[0, 0, 0, 0] = bad
    loss = algo.dmd_loss(x0, x0_real, x0_fake)
    loss.backward()
    assert torch.isfinite(loss) and x0_real.grad is None and torch.isfinite(x0.grad).all()
    assert x0.grad[0, 0, 0, 0] == 0 and (x0.grad[0, 1:] != 0).all()  # that entry carries no signal; the rest do


def _posterior_mean(x_tau, tau, mu, sigma):
    """E[x0 | x_tau] for x0 ~ N(mu, sigma^2 I) under x_tau = (1 - tau) x0 + tau eps."""
    var = (1 - tau) ** 2 * sigma**2 + tau**2
    return mu + (1 - tau) * sigma**2 / var * (x_tau - (1 - tau) * mu)


def test_dmd_gradient_moves_generator_samples_toward_the_real_distribution():
    # Real data N(mu_r, 0.5^2); the generator is x0 = theta + 0.5 z. With the exact real and fake
    # (= current generator) denoisers, gradient descent on L_dmd must pull theta to mu_r.
    torch.manual_seed(0)
    mu_real, sigma = torch.tensor([2.0, -1.0, 0.5]), 0.5
    theta = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.SGD([theta], lr=0.5)
    start = (theta.detach() - mu_real).norm().item()
    for step in range(300):
        x0 = theta + sigma * torch.randn(64, 3)
        tau = algo.sample_renoise_timesteps(64, step, 4.0, 1.5, 100)[:, None]
        x_tau = (1 - tau) * x0.detach() + tau * torch.randn(64, 3)
        x0_real = _posterior_mean(x_tau, tau, mu_real, sigma)
        x0_fake = _posterior_mean(x_tau, tau, theta.detach(), sigma)
        optimizer.zero_grad()
        algo.dmd_loss(x0, x0_real, x0_fake).backward()
        optimizer.step()
    assert (theta.detach() - mu_real).norm().item() < 0.05 * start


def test_critic_loss_is_flow_matching_on_detached_samples():
    x0 = torch.randn(4, 3, requires_grad=True)
    eps, v = torch.randn(4, 3), torch.randn(4, 3, requires_grad=True)
    loss = algo.critic_loss(v, x0, eps)
    loss.backward()
    assert loss.item() == pytest.approx(torch.mean((v - (eps - x0)) ** 2).item())
    assert x0.grad is None


def test_reward_shaping():
    r = torch.tensor([0.2, 0.7, 0.9])
    assert torch.allclose(algo.shape_reward(r, "hinge", 0.7), torch.tensor([0.5, 0.0, 0.0]))
    assert torch.allclose(algo.shape_reward(r, "linear"), -r)
    with pytest.raises(ValueError, match="hinge, linear"):
        algo.shape_reward(r, "square")


def test_generator_updates_once_per_ratio_critic_updates_and_reward_waits_for_cold_start():
    schedule = algo.UpdateSchedule(ratio=5, cold_start=3)
    updates = [i for i in range(50) if schedule.generator_updates(i)]
    assert len(updates) == 10 and updates[:2] == [4, 9]
    assert [schedule.reward_active(s) for s in range(5)] == [False, False, False, True, True]
    with pytest.raises(ValueError, match="dmd.ratio"):
        algo.UpdateSchedule(ratio=0, cold_start=0)


def test_guidance_interval_guides_only_up_to_its_bound():
    tau = torch.tensor([0.1, 0.8, 0.81, 1.0])
    assert algo.guidance_interval(tau, 4.5, 0.8).tolist() == [4.5, 4.5, 1.0, 1.0]


def test_the_real_scores_guidance_is_drawn_around_w_r_and_not_drawn_at_or_below_1():
    def draws(real_cfg, jitter, n=2000):
        generator = torch.Generator().manual_seed(0)
        return torch.tensor([algo.draw_guidance(real_cfg, jitter, generator) for _ in range(n)])

    guided = draws(4.0, 0.5)  # U(3.5, 4.5): the range filled, the mean and variance of the uniform
    assert 3.5 <= guided.min() < 3.52 and 4.48 < guided.max() <= 4.5
    assert guided.mean() == pytest.approx(4.0, abs=0.02) and guided.var() == pytest.approx(1 / 12, rel=0.1)
    assert draws(1.2, 0.5).min() < 0.75  # above 1 the draw applies, even where it reaches below 1
    for unguided in (1.0, 0.6):  # no guidance (1), or less than the conditional (< 1): the scale as it is
        assert torch.equal(draws(unguided, 0.5), torch.full((2000,), unguided))
    from dmdr_rl.config import load_config

    assert load_config("toy-dmdr", ["dmd={real_cfg: 1.0, cfg_jitter: 2}"]).dmd.cfg_jitter == 2  # (nothing drawn: allowed)
    # one uniform number is drawn either way: what the generator draws next is the same
    generators = [torch.Generator().manual_seed(5) for _ in range(2)]
    algo.draw_guidance(4.0, 0.5, generators[0]), algo.draw_guidance(1.0, 0.5, generators[1])
    assert torch.equal(torch.rand(3, generator=generators[0]), torch.rand(3, generator=generators[1]))
