"""The DMDR step functions on a tiny random toy backbone: which parameters each loss reaches, and
when the reward term is (not) used."""

import pytest
import torch

from dmdr_rl import dmdr
from dmdr_rl.config import CriticSection, DmdSection, RewardSpec, StudentSection

PROMPTS = ["a small red circle in the center", "a blue square above a green triangle"]


class NanForPrompt:
    """Mean red, but NaN for one prompt: its samples must add nothing however the batch is sliced."""

    name, differentiable = "nan-for-one", True

    def __init__(self, prompt):
        self.prompt = prompt

    def score(self, images, prompts):
        bad = torch.tensor([p == self.prompt for p in prompts])
        return torch.where(bad, torch.full((len(prompts),), float("nan")), images[:, 0].mean(dim=(1, 2)))


class CountingReward:
    name, differentiable = "mean-red", True

    def __init__(self, scores=None):
        self.calls, self.scores = 0, scores

    def score(self, images, prompts):
        self.calls += 1
        return images[:, 0].mean(dim=(1, 2)) if self.scores is None else self.scores


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_a_rollout_in_slices_samples_and_scores_what_the_whole_batch_does(backbone, monkeypatch, sampler):
    """trainer.micro_batch_size bounds a rollout's memory too: the networks, the decode and the rewards see slices
    of it, and the samples and scores are the whole batch's (the sampler's noise is drawn for the batch)."""
    from dmdr_rl.rollout import make_rollout

    prompts = [*PROMPTS, "a green circle", "a red square", "a blue triangle"]
    student = StudentSection(steps=3, sampler=sampler)
    reward = dmdr.WeightedReward(CountingReward(), RewardSpec(name="mean-red", weight=1.0, shaping="linear"))
    whole = make_rollout(backbone, prompts, student, 0, 0, 0, scored=[reward], keep_inputs=True)
    seen = []
    original = backbone.velocity
    monkeypatch.setattr(backbone, "velocity", lambda x, *a, **k: seen.append(len(x)) or original(x, *a, **k))
    decoded = []
    original_decode = backbone.decode
    monkeypatch.setattr(backbone, "decode", lambda x0: decoded.append(len(x0)) or original_decode(x0))
    sliced = make_rollout(backbone, prompts, student, 0, 0, 0, scored=[reward], keep_inputs=True, micro_batch_size=2)
    assert set(seen) == {2, 1} and decoded == [2, 2, 1] and reward.model.calls == 1 + 3
    for a, b in ((whole.x0, sliced.x0), (whole.x0_steps, sliced.x0_steps), (whole.x_steps, sliced.x_steps),
                 (whole.reward_scores["mean-red"], sliced.reward_scores["mean-red"])):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _grads(params):
    return [p.grad is not None and p.grad.abs().sum().item() > 0 for p in params]


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_backward_simulation_keeps_every_step(backbone, monkeypatch, sampler):
    """K steps of the generator (never the critic or the bare teacher) at the student's shifted schedule:
    t' = s t / (1 + (s - 1) t) of t = 1, 2/3, 1/3 at s = 3 is 1, 6/7, 0.6."""
    student = StudentSection(steps=3, shift=3.0, sampler=sampler)
    calls = _spy_velocity(monkeypatch, backbone)
    traj = dmdr.backward_simulation(backbone, backbone.encode(PROMPTS), student, torch.Generator().manual_seed(0))
    assert traj.x0.shape == (2, 3, 32, 32) and traj.x0_steps.shape == (3, 2, 3, 32, 32)
    assert not traj.x0.requires_grad
    assert torch.allclose(traj.x0, traj.x0_steps[-1], atol=1e-5)
    torch.testing.assert_close(traj.timesteps, torch.tensor([1.0, 6 / 7, 0.6]))
    assert [(c["adapter"], c["scale"], c["cfg"], c["grad"]) for c in calls] == [(dmdr.GENERATOR, 1.0, 1.0, False)] * 3
    torch.testing.assert_close(torch.stack([c["t"] for c in calls]), traj.timesteps.view(3, 1).expand(3, 2))


def test_backward_simulation_samples_with_the_students_sampler(backbone):
    cond = backbone.encode(PROMPTS)
    ode, sde = (dmdr.backward_simulation(backbone, cond, StudentSection(steps=3, sampler=mode), torch.Generator().manual_seed(0))
                for mode in ("ode", "sde"))
    torch.testing.assert_close(ode.x0_steps[0], sde.x0_steps[0])  # the same noise, the same first prediction
    assert (ode.x0_steps[1] - sde.x0_steps[1]).abs().max() > 1e-3  # then an Euler step vs a re-noising one


def test_critic_loss_trains_only_the_critic(backbone):
    cond = backbone.encode(PROMPTS)
    traj = dmdr.backward_simulation(backbone, cond, StudentSection(steps=2), torch.Generator().manual_seed(0))
    dmdr.critic_loss(backbone, traj.x0, cond, 0, CriticSection(), DmdSection(), torch.Generator().manual_seed(1)).backward()
    critic_grads = _grads(backbone.trainable_parameters(dmdr.CRITIC))
    assert sum(critic_grads) > 0.8 * len(critic_grads)  # all but the last block's unused context outputs
    assert not any(_grads(backbone.trainable_parameters(dmdr.GENERATOR)))


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_generator_loss_trains_only_the_generator_and_waits_for_the_reward(backbone, sampler):
    cond, student = backbone.encode(PROMPTS), StudentSection(steps=2, sampler=sampler)
    traj = dmdr.backward_simulation(backbone, cond, student, torch.Generator().manual_seed(0))
    reward = CountingReward()
    rewards = [dmdr.WeightedReward(reward, RewardSpec(name="mean-red", weight=2.0, shaping="linear"))]
    args = (backbone, traj, cond, PROMPTS, 0, student, CriticSection(), DmdSection(), rewards)
    loss, metrics = dmdr.generator_loss(*args, reward_active=False, generator=torch.Generator().manual_seed(2))
    assert reward.calls == 0 and "loss/dmd" in metrics and not any(k.startswith("reward/") for k in metrics)
    loss.backward()
    assert any(_grads(backbone.trainable_parameters(dmdr.GENERATOR)))
    assert not any(_grads(backbone.trainable_parameters(dmdr.CRITIC)))

    loss_with_reward, metrics = dmdr.generator_loss(*args, reward_active=True, generator=torch.Generator().manual_seed(2))
    assert reward.calls == 1
    # Same seed, same x0: the difference is exactly the weighted, shaped reward term.
    metrics = {k: float(v) for k, v in metrics.items()}
    assert loss_with_reward.item() - loss.item() == pytest.approx(metrics["loss/reward/mean-red"], abs=1e-6)
    assert metrics["loss/reward/mean-red"] == pytest.approx(-2.0 * metrics["reward/mean-red"], abs=1e-6)


def test_rl_only_has_no_dmd_term(backbone):
    cond, student = backbone.encode(PROMPTS), StudentSection(steps=2)
    traj = dmdr.backward_simulation(backbone, cond, student, torch.Generator().manual_seed(0))
    rewards = [dmdr.WeightedReward(CountingReward(), RewardSpec(name="mean-red", shaping="linear"))]
    loss, metrics = dmdr.generator_loss(backbone, traj, cond, PROMPTS, 0, student, CriticSection(), DmdSection(weight=0.0),
                                        rewards, True, torch.Generator().manual_seed(2))
    assert "loss/dmd" not in metrics and loss.item() == pytest.approx(float(metrics["loss/reward/mean-red"]))


def test_two_entries_of_one_reward_model_keep_their_numbers_apart_by_label(backbone):
    cond, student = backbone.encode(PROMPTS), StudentSection(steps=2)
    traj = dmdr.backward_simulation(backbone, cond, student, torch.Generator().manual_seed(0))
    model = CountingReward()
    rewards = [dmdr.WeightedReward(model, RewardSpec(name="mean-red", weight=1.0, shaping="linear")),
               dmdr.WeightedReward(model, RewardSpec(name="mean-red", weight=0.5, shaping="hinge", margin=2.0,
                                                     label="mean-red-hinge"))]
    _, metrics = dmdr.generator_loss(backbone, traj, cond, PROMPTS, 0, student, CriticSection(), DmdSection(),
                                     rewards, True, torch.Generator().manual_seed(2))
    metrics = {k: float(v) for k, v in metrics.items()}
    assert model.calls == 2 and metrics["reward/mean-red"] == pytest.approx(metrics["reward/mean-red-hinge"])
    assert metrics["loss/reward/mean-red"] == pytest.approx(-metrics["reward/mean-red"], abs=1e-6)
    assert metrics["loss/reward/mean-red-hinge"] == pytest.approx(0.5 * (2.0 - metrics["reward/mean-red"]), abs=1e-6)


class SqrtOfRed:
    """sqrt(mean red - 0.5): NaN (and a NaN gradient) below 0.5, a finite score with an infinite gradient at 0.5."""

    name, differentiable = "sqrt-red", True

    def score(self, images, prompts):
        return (images[:, 0].mean(dim=(1, 2)) - 0.5).sqrt()


@pytest.mark.parametrize("shaping", ["linear", "hinge"])
def test_a_sample_the_reward_cannot_differentiate_gets_no_gradient_and_spares_the_others(shaping):
    # in-process, as the served path does: a NaN score back-propagates 0 * inf = NaN through the model, an
    # infinite gradient is infinite; either would make the whole update non-finite, and it would be skipped
    red = torch.tensor([0.9, 0.2, 0.5, 0.7])  # finite, NaN score, infinite gradient, finite
    images = red.view(4, 1, 1, 1).repeat(1, 3, 2, 2).requires_grad_(True)
    reward = dmdr.WeightedReward(SqrtOfRed(), RewardSpec(name="sqrt-red", shaping=shaping, margin=2.0))
    loss, metrics = reward.loss(images, ["p"] * 4)
    loss.backward()
    assert metrics["reward/sqrt-red/non_finite"] == 1.0 and torch.isfinite(loss)
    assert torch.isfinite(images.grad).all() and (images.grad[[1, 2]] == 0).all()
    good = images.detach()[[0, 3]].requires_grad_(True)  # the good samples alone, the loss's 1/4 kept
    (reward.loss(good, ["p"] * 2)[0] * 2 / 4).backward()
    assert torch.allclose(images.grad[[0, 3]], good.grad) and (good.grad[:, 0] != 0).all()
    plain = images.detach().requires_grad_(True)  # what the hook prevents
    torch.where(torch.isfinite(s := SqrtOfRed().score(plain, [])), s, 0).sum().backward()
    assert not torch.isfinite(plain.grad).all()


def test_non_finite_scores_are_dropped_and_counted():
    reward = dmdr.WeightedReward(CountingReward(torch.tensor([0.2, float("nan"), 0.4])), RewardSpec(name="r", shaping="linear"))
    loss, metrics = reward.loss(torch.zeros(3, 3, 4, 4, requires_grad=True), ["p"] * 3)
    assert loss.item() == pytest.approx(-0.6 / 3) and metrics["reward/r/non_finite"] == 1.0  # the NaN adds 0
    everything_nan = dmdr.WeightedReward(CountingReward(torch.full((2,), float("nan"))), RewardSpec(name="r", shaping="hinge"))
    images = torch.zeros(2, 3, 4, 4, requires_grad=True)
    loss, metrics = everything_nan.loss(images, ["p"] * 2)
    assert loss.item() == 0.0 and torch.isnan(metrics["reward/r"]) and metrics["reward/r/non_finite"] == 2.0


def test_a_per_sample_cfg_scale_is_each_sample_at_its_own_scale(backbone):
    cond = backbone.encode(PROMPTS)
    x, t = torch.randn(2, *backbone.sample_shape), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        mixed = backbone.velocity(x, t, cond, adapter=dmdr.CRITIC, scale=0.5, cfg=torch.tensor([1.0, 4.0]))
        plain = backbone.velocity(x, t, cond, adapter=dmdr.CRITIC, scale=0.5)
        guided = backbone.velocity(x, t, cond, adapter=dmdr.CRITIC, scale=0.5, cfg=4.0)
    torch.testing.assert_close(mixed[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], guided[1], rtol=1e-5, atol=1e-5)
    assert (guided[0] - plain[0]).abs().max() > 1e-3  # the guidance does change the first sample


def test_the_guidance_interval_turns_the_real_scores_cfg_off_above_its_bound(backbone):
    cond, student = backbone.encode(PROMPTS), StudentSection(steps=2)
    traj = dmdr.backward_simulation(backbone, cond, student, torch.Generator().manual_seed(0))

    def dmd(**fields):
        _, metrics = dmdr.generator_loss(backbone, traj, cond, PROMPTS, 0, student, CriticSection(),
                                         DmdSection(cfg_jitter=0.0, **fields), [], False, torch.Generator().manual_seed(2))
        return float(metrics["loss/dmd"])

    everywhere, unguided = dmd(real_cfg=4.0), dmd(real_cfg=1.0)
    # a bound above every drawn tau takes the per-sample (tensor) path, yet guides every sample: the same loss
    assert dmd(real_cfg=4.0, cfg_max_tau=1.0 - 1e-7) == pytest.approx(everywhere, rel=1e-6)
    assert dmd(real_cfg=4.0, cfg_max_tau=1e-6) == pytest.approx(unguided, rel=1e-5)  # every tau is above the bound
    assert abs(everywhere - unguided) > 1e-3 * abs(unguided)
    # with the default jitter: w_r = 1 is used as it is, and a scale above 1 is drawn around itself
    for real_cfg, low, high in ((1.0, 1.0, 1.0), (4.0, 3.5, 4.5)):
        _, metrics = dmdr.generator_loss(backbone, traj, cond, PROMPTS, 0, student, CriticSection(),
                                         DmdSection(real_cfg=real_cfg, cfg_jitter=0.5), [], False,
                                         torch.Generator().manual_seed(2))
        assert low <= metrics["schedule/real_cfg"] <= high and (low == high or metrics["schedule/real_cfg"] != real_cfg)


def _spy_velocity(monkeypatch, backbone):
    """Every velocity call: its adapter, LoRA scale, CFG, t, input, output and whether autograd was on."""
    calls, original = [], backbone.velocity

    def velocity(x_t, t, cond, *, adapter=None, scale=1.0, cfg=1.0, null=None):
        v = original(x_t, t, cond, adapter=adapter, scale=scale, cfg=cfg, null=null)
        calls.append({"adapter": adapter, "scale": scale, "cfg": cfg, "t": t.detach().clone(), "x": x_t.detach().clone(),
                      "v": v.detach().clone(), "grad": torch.is_grad_enabled()})
        return v

    monkeypatch.setattr(backbone, "velocity", velocity)
    return calls


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_the_generator_step_queries_each_network_as_design_section_2_says(backbone, monkeypatch, sampler):
    """With the noise zeroed, x_t = (1 - t) x0 exactly, so the re-noising source and the scores' inputs can
    be read off the recorded calls and compared with the equations."""
    from dmdr_rl import algo

    student, critic = StudentSection(steps=3, sampler=sampler), CriticSection(fake_scale=2.0, real_scale0=0.5)
    dmd, step = DmdSection(real_cfg=4.0, cfg_jitter=0.5, dynamic_steps=10), 3
    cond = backbone.encode(PROMPTS)
    traj = dmdr.backward_simulation(backbone, cond, student, torch.Generator().manual_seed(0))
    monkeypatch.setattr(dmdr, "randn", lambda shape, generator, device="cpu": torch.zeros(shape, device=device))
    calls = _spy_velocity(monkeypatch, backbone)
    dmd_args, renoise_steps = [], []
    dmd_loss, renoise = algo.dmd_loss, algo.sample_renoise_timesteps
    monkeypatch.setattr(algo, "dmd_loss", lambda *args: dmd_args.append(args) or dmd_loss(*args))
    monkeypatch.setattr(algo, "sample_renoise_timesteps", lambda *a, **k: renoise_steps.append(a[1]) or renoise(*a, **k))
    dmdr.generator_loss(backbone, traj, cond, PROMPTS, step, student, critic, dmd, [], False, torch.Generator().manual_seed(3))
    gen, real, fake = calls
    assert renoise_steps == [step]  # DynaRS at the generator step
    # the generator, with gradient, at student timesteps t_k, re-noised from x0 (ODE) or the k-th step's x0 (SDE)
    assert (gen["adapter"], gen["scale"], gen["cfg"], gen["grad"]) == (dmdr.GENERATOR, 1.0, 1.0, True)
    k = [int((traj.timesteps - t).abs().argmin()) for t in gen["t"]]
    torch.testing.assert_close(gen["t"], traj.timesteps[k])
    assert sorted(k) == [1, 2]  # (this seed's draw) steps past the first, where an off-by-one would show
    sources = traj.x0 if sampler == "ode" else traj.x0_steps[k, torch.arange(2)]
    torch.testing.assert_close(gen["x"], (1 - gen["t"]).view(-1, 1, 1, 1) * sources)
    # the real score: the critic LoRA at s_r(step), CFG w ~ U(w_r - 0.5, w_r + 0.5); the fake one at s_f, no CFG
    assert (real["adapter"], real["scale"], real["grad"]) == (dmdr.CRITIC, algo.real_score_scale(step, 0.5, 10), False)
    assert 3.5 <= real["cfg"] <= 4.5 and real["cfg"] != 4.0
    assert (fake["adapter"], fake["scale"], fake["cfg"], fake["grad"]) == (dmdr.CRITIC, 2.0, 1.0, False)
    # both at the same tau and x_tau = (1 - tau) x0, with x0 = x_t - t v the generator's prediction
    x0 = gen["x"] - gen["t"].view(-1, 1, 1, 1) * gen["v"]
    assert torch.equal(real["t"], fake["t"]) and torch.equal(real["x"], fake["x"])
    torch.testing.assert_close(real["x"], (1 - real["t"]).view(-1, 1, 1, 1) * x0)
    # ... and L_dmd compares the generator's x0 with the real score's x0 and the fake score's, in that order
    (given,) = dmd_args
    tau = real["t"].view(-1, 1, 1, 1)
    torch.testing.assert_close(given[0], x0)
    torch.testing.assert_close(given[1], real["x"] - tau * real["v"])
    torch.testing.assert_close(given[2], fake["x"] - tau * fake["v"])


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_the_generator_steps_two_noises_are_fresh_draws_of_their_own(backbone, monkeypatch, sampler):
    """With real noise (the test above zeroes it): x_in = (1 - t_k) x0_src + t_k eps and the scores' input
    x_tau = (1 - tau) x0 + tau eps', eps' a draw of its own, so one noise used twice (or negated) would show."""
    student = StudentSection(steps=3, sampler=sampler)
    cond = backbone.encode(PROMPTS)
    traj = dmdr.backward_simulation(backbone, cond, student, torch.Generator().manual_seed(0))
    draws, randn = [], dmdr.randn
    monkeypatch.setattr(dmdr, "randn", lambda *args, **kwargs: draws.append(randn(*args, **kwargs)) or draws[-1])
    calls = _spy_velocity(monkeypatch, backbone)
    dmdr.generator_loss(backbone, traj, cond, PROMPTS, 3, student, CriticSection(), DmdSection(dynamic_steps=10), [],
                        False, torch.Generator().manual_seed(3))
    (gen, real, fake), (eps, eps_dmd) = calls, draws
    k = [int((traj.timesteps - t).abs().argmin()) for t in gen["t"]]
    sources = traj.x0 if sampler == "ode" else traj.x0_steps[k, torch.arange(2)]
    t, tau = gen["t"].view(-1, 1, 1, 1), real["t"].view(-1, 1, 1, 1)
    torch.testing.assert_close(gen["x"], (1 - t) * sources + t * eps)
    torch.testing.assert_close(real["x"], (1 - tau) * (gen["x"] - t * gen["v"]) + tau * eps_dmd)
    assert torch.equal(fake["x"], real["x"])
    assert eps.std() > 0.9 and eps_dmd.std() > 0.9  # standard normal draws, uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([eps.flatten(), eps_dmd.flatten()]))[0, 1])) < 0.1


def test_the_critic_learns_the_final_samples_or_with_samples_step_each_ones_x0_at_a_drawn_step(backbone):
    cond = backbone.encode(PROMPTS)
    traj = dmdr.backward_simulation(backbone, cond, StudentSection(steps=3, sampler="sde"), torch.Generator().manual_seed(0))
    drawn = dmdr.critic_samples(traj, "sde", "step", torch.Generator().manual_seed(4))
    k = torch.randint(0, 3, (2,), generator=torch.Generator().manual_seed(4))  # the same draw
    assert k.tolist() != [2, 2]  # (this seed's draw reaches an earlier step than the last, whose x0_k is the final x0)
    assert torch.equal(drawn, traj.x0_steps[k, torch.arange(2)]) and not torch.equal(drawn, traj.x0)
    assert dmdr.critic_samples(traj, "sde", "final", torch.Generator()) is traj.x0
    assert dmdr.critic_samples(traj, "ode", "step", torch.Generator()) is traj.x0  # the ODE generator step's source


def test_the_critic_step_trains_the_fake_score_at_its_scale(backbone, monkeypatch):
    """With real noise: the critic's input is x_tau = (1 - tau) x0 + tau eps with the very eps (and x0, and the
    critic's output) its flow-matching loss is given, so a target built from other noise (-eps, fresh draws),
    other samples or another output would show."""
    from dmdr_rl import algo

    cond = backbone.encode(PROMPTS)
    traj = dmdr.backward_simulation(backbone, cond, StudentSection(steps=2), torch.Generator().manual_seed(0))
    calls, renoise_steps, renoise = _spy_velocity(monkeypatch, backbone), [], algo.sample_renoise_timesteps
    monkeypatch.setattr(algo, "sample_renoise_timesteps", lambda *a, **k: renoise_steps.append(a[1]) or renoise(*a, **k))
    loss_args, flow_matching = [], algo.critic_loss
    monkeypatch.setattr(algo, "critic_loss", lambda *args: loss_args.append(args) or flow_matching(*args))
    loss = dmdr.critic_loss(backbone, traj.x0, cond, 7, CriticSection(fake_scale=2.0), DmdSection(),
                            torch.Generator().manual_seed(1))
    assert renoise_steps == [7]  # DynaRS at the generator step
    (call,), ((v, x0, eps),) = calls, loss_args
    assert (call["adapter"], call["scale"], call["cfg"], call["grad"]) == (dmdr.CRITIC, 2.0, 1.0, True)
    assert eps.std() > 0.5  # real noise
    torch.testing.assert_close(x0, traj.x0, rtol=0, atol=0)
    torch.testing.assert_close(v.detach(), call["v"], rtol=0, atol=0)
    tau = call["t"].view(-1, 1, 1, 1)
    torch.testing.assert_close(call["x"], (1 - tau) * traj.x0 + tau * eps)
    torch.testing.assert_close(loss, ((call["v"] - (eps - traj.x0)) ** 2).mean())


def _accumulated(backbone, adapter, run):
    """The gradients of `adapter` after `run(backward)`, and what it returned; the gradients are cleared."""
    params = backbone.trainable_parameters(adapter)
    for p in params:
        p.grad = None
    out = run()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads, out


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_the_reward_gradient_reaches_the_generator_through_its_own_x0(backbone, monkeypatch, sampler):
    """ReFL (DESIGN section 2): L_r = lambda * phi(r(decode(x0))) with x0 = x_in - t G(x_in, t) WITH gradient, so
    the generator's gradient is exactly that of -2 * mean red of decode(x0) recomputed here by autograd; a
    detached x0 (no gradient) or scoring the rollout's own samples (other images, no gradient) would differ."""
    cond, student = backbone.encode(PROMPTS), StudentSection(steps=2, sampler=sampler)
    traj = dmdr.backward_simulation(backbone, cond, student, torch.Generator().manual_seed(0))
    rewards = [dmdr.WeightedReward(CountingReward(), RewardSpec(name="mean-red", weight=2.0, shaping="linear"))]
    original = backbone.velocity
    calls = _spy_velocity(monkeypatch, backbone)

    def run():
        loss, _ = dmdr.generator_loss(backbone, traj, cond, PROMPTS, 0, student, CriticSection(), DmdSection(weight=0.0),
                                      rewards, True, torch.Generator().manual_seed(2))
        loss.backward()
        return loss.detach()

    grads, loss = _accumulated(backbone, dmdr.GENERATOR, run)
    (call,) = calls
    assert call["adapter"] == dmdr.GENERATOR and call["grad"]
    x_in, t = call["x"], call["t"].view(-1, 1, 1, 1)

    def reference():
        images = backbone.decode(x_in - t * original(x_in, call["t"], cond, adapter=dmdr.GENERATOR))
        ref = -2.0 * images[:, 0].mean(dim=(1, 2)).mean()
        ref.backward()
        return ref.detach()

    ref_grads, ref_loss = _accumulated(backbone, dmdr.GENERATOR, reference)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert sum(g.abs().sum().item() > 0 for g in grads) > 0.5 * len(grads)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_the_dmd_weight_scales_the_dmd_term(backbone):
    cond, student = backbone.encode(PROMPTS), StudentSection(steps=2)
    traj = dmdr.backward_simulation(backbone, cond, student, torch.Generator().manual_seed(0))
    losses = {}
    for weight in (1.0, 2.0):
        loss, metrics = dmdr.generator_loss(backbone, traj, cond, PROMPTS, 0, student, CriticSection(),
                                            DmdSection(weight=weight), [], False, torch.Generator().manual_seed(2))
        losses[weight] = (loss.item(), metrics["loss/dmd"].item())
    assert losses[1.0][1] == pytest.approx(losses[2.0][1]) and losses[1.0][1] > 0  # the same L_dmd ...
    assert losses[2.0][0] == pytest.approx(2 * losses[1.0][0])  # ... weighted twice as much


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_micro_batches_give_the_whole_batchs_losses_and_gradients(backbone, sampler):
    """Gradient accumulation (trainer.micro_batch_size): every draw is made for the whole batch, each slice's
    loss is weighted by its share, so slices of 2 + 2 + 1 give the 5-sample batch's losses and gradients,
    also with a non-finite score in two of the slices."""
    prompts = PROMPTS * 2 + PROMPTS[:1]
    cond, student = backbone.encode(prompts), StudentSection(steps=2, sampler=sampler)
    traj = dmdr.backward_simulation(backbone, cond, student, torch.Generator().manual_seed(0))
    reward = CountingReward()
    rewards = [dmdr.WeightedReward(reward, RewardSpec(name="mean-red", weight=2.0, shaping="hinge", margin=0.7)),
               # NaN for samples 1 and 3: one in each of the first two slices, none in the last
               dmdr.WeightedReward(NanForPrompt(PROMPTS[1]), RewardSpec(name="nan-for-one", weight=1.0, shaping="linear"))]
    dmd = DmdSection(cfg_max_tau=0.7)  # per-sample guidance, sliced with its samples

    def critic(micro):
        return dmdr.critic_loss(backbone, traj.x0, cond, 3, CriticSection(), dmd, torch.Generator().manual_seed(1),
                                micro_batch_size=micro, backward=torch.Tensor.backward)

    def generator(micro):
        return dmdr.generator_loss(backbone, traj, cond, prompts, 3, student, CriticSection(), dmd, rewards, True,
                                   torch.Generator().manual_seed(2), micro_batch_size=micro, backward=torch.Tensor.backward)

    (whole_grads, whole), (micro_grads, micro) = (_accumulated(backbone, dmdr.CRITIC, lambda: critic(m)) for m in (None, 2))
    torch.testing.assert_close(micro, whole, rtol=1e-5, atol=1e-7)
    for a, b in zip(micro_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in whole_grads)

    calls = reward.calls
    (whole_grads, (whole, whole_metrics)), (micro_grads, (micro, micro_metrics)) = (
        _accumulated(backbone, dmdr.GENERATOR, lambda: generator(m)) for m in (None, 2))
    assert reward.calls - calls == 1 + 3  # one call for the batch, then one per slice
    torch.testing.assert_close(micro, whole, rtol=1e-5, atol=1e-7)
    assert float(whole_metrics["reward/nan-for-one/non_finite"]) == 2.0
    for name in ("loss/dmd", "loss/reward/mean-red", "reward/mean-red", "reward/mean-red/non_finite", "loss/generator",
                 "loss/reward/nan-for-one", "reward/nan-for-one", "reward/nan-for-one/non_finite"):
        assert float(micro_metrics[name]) == pytest.approx(float(whole_metrics[name]), rel=1e-5, abs=1e-7), name
    assert float(micro_metrics["time/reward/mean-red_s"]) >= 0
    for a, b in zip(micro_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in whole_grads)


def test_gradient_checkpointing_keeps_the_gradients(backbone):
    """The generator's (LoRA scale 1) and the critic's (scale fake_scale = 2, which diffusers sets on the layers
    for the forward pass and resets after it): a recomputed block must run with the scale of its forward pass."""
    cond, student = backbone.encode(PROMPTS), StudentSection(steps=2)
    traj = dmdr.backward_simulation(backbone, cond, student, torch.Generator().manual_seed(0))
    critic = CriticSection()
    assert critic.fake_scale != 1.0

    def run():
        loss, _ = dmdr.generator_loss(backbone, traj, cond, PROMPTS, 0, student, critic, DmdSection(), [], False,
                                      torch.Generator().manual_seed(2))
        loss.backward()

    def run_critic():
        dmdr.critic_loss(backbone, traj.x0, cond, 0, critic, DmdSection(), torch.Generator().manual_seed(3)).backward()

    plain, _ = _accumulated(backbone, dmdr.GENERATOR, run)
    plain_critic, _ = _accumulated(backbone, dmdr.CRITIC, run_critic)
    backbone.enable_gradient_checkpointing()
    assert backbone.transformer.gradient_checkpointing
    checkpointed, _ = _accumulated(backbone, dmdr.GENERATOR, run)
    checkpointed_critic, _ = _accumulated(backbone, dmdr.CRITIC, run_critic)
    for a, b in [*zip(checkpointed, plain), *zip(checkpointed_critic, plain_critic)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in plain) and any(g.abs().sum() > 0 for g in plain_critic)
