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
    # For data concentrated at x*, the exact flow velocity is v(x_t, t) = (x_t - x*) / t.
    target = torch.randn(2, 3, 4, 4)
    exact = lambda x_t, t: (x_t - target) / t.view(-1, 1, 1, 1)
    traj = sample(exact, torch.randn(2, 3, 4, 4), steps, shift=2.0, mode=mode, keep_steps=True)
    assert torch.allclose(traj.x0, target, atol=1e-5)
    assert traj.x0_steps.shape == (steps, 2, 3, 4, 4) and torch.allclose(traj.x0_steps, target.expand(steps, -1, -1, -1, -1), atol=1e-5)


def test_ode_step_is_euler_and_sde_step_renoises_the_x0_prediction():
    noise = torch.randn(3, 2)
    v_const = torch.randn(3, 2)
    ode = sample(lambda x, t: v_const, noise, 2, keep_steps=True)
    # t = [1, 0.5]: x_1 = eps + (0.5 - 1) v; x0 = x_1 - 0.5 v = eps - v
    assert torch.allclose(ode.inputs[1], noise - 0.5 * v_const) and torch.allclose(ode.x0, noise - v_const)
    g = torch.Generator().manual_seed(0)
    sde = sample(lambda x, t: v_const, noise, 2, mode="sde", generator=g, keep_steps=True)
    fresh = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sde.inputs[1], 0.5 * (noise - v_const) + 0.5 * fresh)
    with pytest.raises(ValueError, match="'ode' or 'sde'"):
        sample(lambda x, t: v_const, noise, 2, mode="dpm")


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
