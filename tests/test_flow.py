import pytest
import torch

from dmdr_rl.flow import add_noise, sample, sampling_timesteps, shift_timesteps, velocity_target, x0_from_velocity


def test_noise_and_x0_recovery_are_inverse():
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    x_t = add_noise(x0, eps, t)
    assert torch.allclose(x_t[0], x0[0]) and torch.allclose(x_t[3], eps[3])
    assert torch.allclose(x0_from_velocity(x_t, t, velocity_target(x0, eps)), x0, atol=1e-6)


def test_shift_formula_and_endpoints():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_timesteps(t, 1.0), t)
    assert torch.allclose(shift_timesteps(t, 3.0), 3 * t / (1 + 2 * t))
    assert shift_timesteps(torch.tensor(0.5), 3.0) > 0.5


def test_sampling_timesteps_are_the_linspace_without_the_last_point():
    assert torch.allclose(sampling_timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25]))
    assert torch.allclose(sampling_timesteps(1), torch.tensor([1.0]))
    with pytest.raises(ValueError):
        sampling_timesteps(0)


@pytest.mark.parametrize("mode", ["ode", "sde"])
@pytest.mark.parametrize("steps", [1, 4, 32])
def test_sampling_with_the_exact_velocity_of_a_point_mass_reaches_it(steps, mode):
    """For data concentrated at x*, the exact flow velocity is v(x_t, t) = (x_t - x*) / t: every x0 prediction is
    x*, whatever the path. The path is what the sampler decides: the ODE stays on the straight line
    (1 - t_k) x* + t_k eps of the first noise, the SDE re-noises x* with a fresh draw of its generator per step."""
    target, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    exact = lambda x_t, t: (x_t - target) / t.view(-1, 1, 1, 1)
    traj = sample(exact, noise, steps, shift=2.0, mode=mode, generator=torch.Generator().manual_seed(3), keep_steps=True)
    assert torch.allclose(traj.x0, target, atol=1e-5)
    assert traj.x0_steps.shape == (steps, 2, 3, 4, 4) and torch.allclose(traj.x0_steps, target.expand(steps, -1, -1, -1, -1), atol=1e-5)
    t = shift_timesteps(torch.linspace(1.0, 0.0, steps + 1)[:-1], 2.0)
    torch.testing.assert_close(traj.timesteps, t)
    fresh = torch.Generator().manual_seed(3)
    for k in range(steps):
        eps = noise if mode == "ode" or k == 0 else torch.randn(noise.shape, generator=fresh)
        torch.testing.assert_close(traj.inputs[k], (1 - t[k]) * target + t[k] * eps, rtol=1e-5, atol=1e-5)


def test_ode_step_is_euler_and_sde_step_renoises_the_x0_prediction():
    """Three steps at shift 3, t = 1, 6/7, 0.6 (where 1 - t != t, unlike t = 0.5), with a velocity that depends
    on x and t, each step checked against DESIGN section 2's update."""
    noise, w = torch.randn(3, 2), torch.randn(3, 2)
    velocity = lambda x, t: 0.5 * x + t.view(-1, 1) * w
    times = [1.0, 6 / 7, 0.6]
    ode = sample(velocity, noise, 3, shift=3.0, keep_steps=True)
    torch.testing.assert_close(ode.timesteps, torch.tensor(times))
    x = noise
    for k, t_now in enumerate(times):  # Euler: x <- x + (t_{k+1} - t_k) v, x0_k = x - t_k v
        v = 0.5 * x + t_now * w
        torch.testing.assert_close(ode.inputs[k], x)
        torch.testing.assert_close(ode.x0_steps[k], x - t_now * v)
        x = x + ((times + [0.0])[k + 1] - t_now) * v
    torch.testing.assert_close(ode.x0, x)
    sde = sample(velocity, noise, 3, shift=3.0, mode="sde", generator=torch.Generator().manual_seed(0), keep_steps=True)
    fresh, x = torch.Generator().manual_seed(0), noise
    for k, t_now in enumerate(times):  # SDE: x <- (1 - t_{k+1}) x0_k + t_{k+1} eps' (fresh noise), the last step to x0
        torch.testing.assert_close(sde.inputs[k], x)
        x0_k = x - t_now * (0.5 * x + t_now * w)
        torch.testing.assert_close(sde.x0_steps[k], x0_k)
        x = (1 - times[k + 1]) * x0_k + times[k + 1] * torch.randn(3, 2, generator=fresh) if k + 1 < 3 else x0_k
    torch.testing.assert_close(sde.x0, x)
    with pytest.raises(ValueError, match="'ode' or 'sde'"):
        sample(velocity, noise, 2, mode="dpm")


def test_one_generator_per_sample_draws_each_row_from_its_own_seed():
    from dmdr_rl.flow import generators, randn

    rows = randn((3, 2, 4), generators([5, 6, 7]))
    for row, seed in zip(rows, [5, 6, 7]):
        torch.testing.assert_close(row, torch.randn((2, 4), generator=torch.Generator().manual_seed(seed)), rtol=0, atol=0)
    torch.testing.assert_close(randn((3, 2, 4), generators(5)), torch.randn((3, 2, 4), generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn((3, 2, 4), generators([5, 6]))


def test_the_sampling_timesteps_are_shifted():
    # t' = s t / (1 + (s - 1) t) at s = 3 over the linspace 1, 0.75, 0.5, 0.25
    torch.testing.assert_close(sampling_timesteps(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5]))
