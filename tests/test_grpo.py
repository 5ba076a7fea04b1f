"""Policy-gradient RL (rl.mode=grpo, DESIGN section 2's second RL mode): the math against its equations,
the sampler's step as the Gaussian the policy is, the generator update's direction, and a reward with no
gradient training the generator end to end."""

import math

import pytest
import torch

from dmdr_rl import algo, dmdr
from dmdr_rl.config import ConfigError, CriticSection, DmdSection, RewardSpec, RLSection, StudentSection, load_config
from dmdr_rl.flow import randn, sample, sampling_timesteps, sde_transition
from dmdr_rl.prompts import PromptSource
from dmdr_rl.rollout import make_rollout
from dmdr_rl.toy.teacher import ToyBackbone, create_teacher_transformer
from dmdr_rl.toy.text import ToyTextEncoder
from dmdr_rl.trainer import LocalTrainer, build_rewards

PROMPTS = ["a small red circle in the center", "a blue square above a green triangle"]


class MeanRedNoGradient:
    """A black-box reward: mean red, computed without autograd (as a remote service or a count would be)."""

    name, differentiable = "mean-red-black-box", False

    def __init__(self, **kwargs):
        self.calls = 0

    def score(self, images, prompts):
        self.calls += 1
        with torch.no_grad():
            return images.detach()[:, 0].mean(dim=(1, 2)).clone()


# -- the math ---------------------------------------------------------------------------------------
def test_group_advantages_normalise_within_each_group_over_its_finite_rewards():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, float("nan"), 5.0, 9.0, 4.0, 4.0, 4.0, 4.0, 7.0, float("nan"), 0.0, 0.0])
    valid = torch.isfinite(rewards)
    advantages = algo.group_advantages(rewards, valid, 4, clip=10.0)
    expected = []
    for group in rewards.view(4, 4):
        kept = group[torch.isfinite(group)]
        mean, std = kept.mean(), kept.std(unbiased=False)
        expected += [0.0 if not math.isfinite(r) else float((r - mean) / (std + 1e-4)) for r in group.tolist()]
    torch.testing.assert_close(advantages, torch.tensor(expected))
    assert advantages[5] == 0 and advantages[13] == 0  # not finite: no advantage
    assert torch.all(advantages[8:12] == 0)  # one reward for the whole group: nothing to prefer
    assert abs(float(advantages[:4].sum())) < 1e-5  # zero mean within a group


def test_group_advantages_are_clipped_and_a_group_with_one_finite_reward_gets_none():
    rewards = torch.tensor([0.0, 0.0, 0.0, 100.0, 1.0, float("nan"), float("nan"), float("nan")])
    advantages = algo.group_advantages(rewards, torch.isfinite(rewards), 4, clip=1.5)
    assert float(advantages[3]) == 1.5 and float(advantages.min()) >= -1.5
    assert torch.all(advantages[4:] == 0)
    with pytest.raises(ValueError, match="whole groups of 4"):
        algo.group_advantages(rewards[:6], torch.isfinite(rewards[:6]), 4, clip=1.0)


def test_group_advantages_of_bf16_scores_are_computed_in_float32():
    """A user's reward may score in bf16: its groups' means and stds in bf16 would round advantages away (a
    group's advantages then no longer sum to zero)."""
    scores = (3.2 + 0.04 * torch.tensor([0.5, 0.1, 0.9, 0.5, 0.1, 0.1, 0.1, 0.5])).bfloat16()
    advantages = algo.group_advantages(scores, torch.ones(8, dtype=torch.bool), 4, clip=10.0)
    expected = algo.group_advantages(scores.float(), torch.ones(8, dtype=torch.bool), 4, clip=10.0)
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, expected)
    assert torch.allclose(advantages.view(2, 4).sum(dim=1), torch.zeros(2), atol=1e-4)

def _normal_log_density(x, mean, std):
    """log N(x; mean, std^2 I) per sample, averaged over its dimensions (torch.distributions, for reference)."""
    return torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1).mean(dim=1)


def test_the_log_ratio_is_the_difference_of_per_dimension_mean_normal_log_densities():
    x, mean, old_mean = (torch.randn(3, 2, 4, 4, dtype=torch.float64) for _ in range(3))
    std = torch.tensor([0.3, 0.7, 1.0], dtype=torch.float64).view(-1, 1, 1, 1)
    expected = _normal_log_density(x, mean, std) - _normal_log_density(x, old_mean, std)
    torch.testing.assert_close(algo.gaussian_log_ratio(x, mean, old_mean, std), expected)
    # in float32 a tiny move of the mean still comes out right (two log-densities or squares subtracted: 20% off)
    x32, mean32, moved32 = x.float(), mean.float(), mean.float() + 1e-6
    moved = algo.gaussian_log_ratio(x32, moved32, mean32, std.float())
    exact = algo.gaussian_log_ratio(x32.double(), moved32.double(), mean32.double(), std)
    torch.testing.assert_close(moved.double(), exact, rtol=1e-2, atol=1e-12)
    assert torch.all(moved != 0)
    # a bf16 base's outputs are compared in float32 (bf16 differences of values near 1 are 0 or 2^-7)
    halves = [t.bfloat16() for t in (x32, moved32, mean32)]
    from_bf16 = algo.gaussian_log_ratio(*halves, std.bfloat16())
    assert from_bf16.dtype == torch.float32
    torch.testing.assert_close(from_bf16, algo.gaussian_log_ratio(*(t.float() for t in halves), std.bfloat16().float()))


def test_the_clipped_surrogate_is_ppos_and_its_gradient_at_ratio_one_is_minus_the_advantage():
    advantages = torch.tensor([2.0, -1.0, 0.5, -3.0])
    log_prob = torch.zeros(4, requires_grad=True)
    loss, ratio = algo.clipped_policy_loss(log_prob, advantages, clip_range=0.1)
    torch.testing.assert_close(ratio, torch.ones(4))
    loss.sum().backward()
    torch.testing.assert_close(log_prob.grad, -advantages)
    # outside the range, on the side the advantage pushes towards: clipped (value at the bound, no gradient)
    log_prob = torch.log(torch.tensor([1.5, 0.5, 1.05, 1.5])).requires_grad_()
    loss, _ = algo.clipped_policy_loss(log_prob, advantages, clip_range=0.1)
    torch.testing.assert_close(loss.detach(), torch.tensor([-2.0 * 1.1, 1.0 * 0.9, -0.5 * 1.05, 3.0 * 1.5]))
    loss.sum().backward()
    assert log_prob.grad[0] == 0 and log_prob.grad[1] == 0  # clipped
    assert log_prob.grad[2] != 0 and log_prob.grad[3] != 0  # inside the range, or moving against the advantage


def test_the_sde_sampler_draws_each_step_from_the_gaussian_of_design_section_2():
    """x_{k+1} = (1 - t_{k+1}) x0_k + t_{k+1} eps' with eps' the sampler's next fresh draw, and sde_transition
    gives that Gaussian's mean and standard deviation."""
    torch.manual_seed(0)
    weights = torch.randn(3, 3)

    def velocity(x, t):
        return torch.einsum("ij,bjhw->bihw", weights, x) * t.view(-1, 1, 1, 1)

    generator = torch.Generator().manual_seed(5)
    trajectory = sample(velocity, randn((2, 3, 4, 4), generator), 4, shift=2.0, mode="sde", generator=generator,
                        keep_steps=True)
    replay = torch.Generator().manual_seed(5)
    randn((2, 3, 4, 4), replay)  # the initial noise
    times = sampling_timesteps(4, 2.0)
    for k in range(3):
        t_next, fresh = float(times[k + 1]), randn((2, 3, 4, 4), replay)
        torch.testing.assert_close(trajectory.inputs[k + 1], (1 - t_next) * trajectory.x0_steps[k] + t_next * fresh)
        mean, std = sde_transition(trajectory.x0_steps[k], times[k + 1].expand(2))
        torch.testing.assert_close(mean, (1 - t_next) * trajectory.x0_steps[k])
        torch.testing.assert_close(std.flatten(), torch.full((2,), t_next))
    torch.testing.assert_close(trajectory.x0, trajectory.x0_steps[-1])  # the last step is not a draw


# -- the generator update ---------------------------------------------------------------------------
def _policy_setup(backbone, group=4):
    prompts = [p for p in PROMPTS for _ in range(group)]
    cond, student = backbone.encode(prompts), StudentSection(steps=3, sampler="sde")
    with torch.no_grad():
        trajectory = sample(lambda x, t: backbone.velocity(x, t, cond, adapter=dmdr.GENERATOR),
                                 randn((len(prompts), *backbone.sample_shape), torch.Generator().manual_seed(0)), 3,
                                 mode="sde", generator=torch.Generator().manual_seed(1), keep_steps=True)
    reward = dmdr.WeightedReward(MeanRedNoGradient(), RewardSpec(name="mean-red-black-box", shaping="linear"))
    return prompts, cond, student, trajectory, reward, _rollout_scores(backbone, trajectory, prompts, reward)


def _rollout_scores(backbone, trajectory, prompts, *rewards):
    """What the rollout hands the learner in GRPO mode: each trained reward's scores of its final samples."""
    with torch.no_grad():
        images = backbone.decode(trajectory.x0)
        return {reward.spec.name: reward.model.score(images, prompts) for reward in rewards}


def test_a_policy_step_raises_the_likelihood_of_the_better_samples_transitions(backbone):
    """One small SGD step on the policy term alone moves sum_i A_i log pi(x_{j+1} | x_j) up (first order:
    the step is along its gradient), so better-than-their-group samples become likelier."""
    prompts, cond, student, trajectory, reward, scores = _policy_setup(backbone)
    rl = RLSection(mode="grpo", group_size=4, clip_range=0.2, adv_clip=5.0)
    params = backbone.trainable_parameters(dmdr.GENERATOR)
    loss, metrics = dmdr.generator_loss(backbone, trajectory, cond, prompts, 0, student, CriticSection(),
                                        DmdSection(weight=0.0), [reward], True, torch.Generator().manual_seed(2), rl=rl,
                                        rollout_scores=scores)
    assert float(metrics["rl/ratio"]) == pytest.approx(1.0, abs=1e-5)  # sampled with these very weights
    # the rollout's scores are used, not scored again
    assert reward.model.calls == 1 and "loss/policy" in metrics
    assert float(metrics["reward/mean-red-black-box"]) == pytest.approx(float(scores["mean-red-black-box"].mean()))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert not any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.trainable_parameters(dmdr.CRITIC))

    def weighted_log_prob():
        scores = reward.model.score(trajectory.x0, prompts)
        advantages = algo.group_advantages(scores, torch.isfinite(scores), 4, 5.0)
        total = 0.0
        with torch.no_grad():
            for j in range(2):  # every transition of the 3-step sampler
                t_now, t_next = trajectory.timesteps[j].expand(8), trajectory.timesteps[j + 1].expand(8)
                x = trajectory.inputs[j]
                x0 = x - t_now.view(-1, 1, 1, 1) * backbone.velocity(x, t_now, cond, adapter=dmdr.GENERATOR)
                mean, std = sde_transition(x0, t_next)
                total += float((advantages * _normal_log_density(trajectory.inputs[j + 1], mean, std)).sum())
        return total

    before = weighted_log_prob()
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(1e-2 * p.grad / p.grad.norm().clamp(min=1e-12))
    assert weighted_log_prob() > before


def _replayable_trajectory(backbone, cond):
    """A 3-step SDE rollout of 4 samples and the two fresh draws its sampler made (the last step is not a draw)."""
    noise = randn((4, *backbone.sample_shape), torch.Generator().manual_seed(0))
    with torch.no_grad():
        trajectory = sample(lambda x, t: backbone.velocity(x, t, cond, adapter=dmdr.GENERATOR), noise, 3, shift=3.0,
                            mode="sde", generator=torch.Generator().manual_seed(1), keep_steps=True)
    replay = torch.Generator().manual_seed(1)
    return trajectory, [randn(noise.shape, replay) for _ in range(2)]


def _design_log_density(backbone, cond, trajectory, j):
    """log N(x_{j+1}; (1 - t_{j+1}) (x_j - t_j G(x_j, t_j)), t_{j+1}^2 I) per sample, mean over dimensions,
    written out from DESIGN section 2 with the generator as it is now."""
    t, t_next = float(trajectory.timesteps[j]), float(trajectory.timesteps[j + 1])
    x = trajectory.inputs[j]
    x0 = x - t * backbone.velocity(x, torch.full((x.shape[0],), t), cond, adapter=dmdr.GENERATOR)
    z = (trajectory.inputs[j + 1] - (1 - t_next) * x0) / t_next
    return (-0.5 * z**2 - math.log(t_next) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(dim=1)


@pytest.mark.parametrize("j", [0, 1])
def test_the_policy_gradient_is_minus_the_advantage_weighted_log_density_of_the_drawn_transition(backbone, j):
    prompts = [p for p in PROMPTS for _ in range(2)]
    cond = backbone.encode(prompts)
    trajectory, fresh = _replayable_trajectory(backbone, cond)
    with torch.no_grad():  # on-policy, the recorded step is the sampler's own draw: z is its fresh noise
        t_next = float(trajectory.timesteps[j + 1])
        on_policy = (-0.5 * fresh[j] ** 2).flatten(1).mean(dim=1) - math.log(t_next) - 0.5 * math.log(2 * math.pi)
        torch.testing.assert_close(_design_log_density(backbone, cond, trajectory, j), on_policy, rtol=1e-4, atol=1e-5)
    params = backbone.trainable_parameters(dmdr.GENERATOR)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for p in params:
        p.grad = None
    loss, stats = dmdr.policy_loss(backbone, trajectory, cond, torch.full((4,), j), advantages, 0.2, slice(0, 4))
    loss.backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    (-(advantages * _design_log_density(backbone, cond, trajectory, j)).mean()).backward()
    for a, b in zip(got, [p.grad for p in params]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in got)


def test_the_ratio_compares_the_current_generator_with_the_rollouts(backbone):
    prompts = [p for p in PROMPTS for _ in range(2)]
    cond = backbone.encode(prompts)
    trajectory, _ = _replayable_trajectory(backbone, cond)
    with torch.no_grad():
        old = _design_log_density(backbone, cond, trajectory, 1)
        for p in backbone.trainable_parameters(dmdr.GENERATOR):  # the learner moved on since the rollout
            p.add_(0.05 * torch.randn_like(p))
        new = _design_log_density(backbone, cond, trajectory, 1)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    _, stats = dmdr.policy_loss(backbone, trajectory, cond, torch.ones(4, dtype=torch.long), advantages, 1e-6, slice(0, 4))
    ratio = torch.exp(new - old)
    assert float((ratio - 1).abs().max()) > 1e-5
    assert float(stats["rl/ratio"]) == pytest.approx(float(ratio.mean()), rel=1e-6)
    moved = ratio - 1
    assert float(stats["rl/clipped"]) == pytest.approx(float(((moved.abs() > 1e-6) & (moved * advantages > 0)).float().mean()))


def test_rollout_advantages_are_per_group_and_need_every_reward_finite():
    class Fixed:
        differentiable = False

        def __init__(self, name, scores):
            self.name, self.scores = name, torch.tensor(scores)

        def score(self, images, prompts):
            return self.scores

    first = dmdr.WeightedReward(Fixed("a", [1.0, 2.0, 101.0, 104.0, 5.0, 3.0, 0.0, 1.0]),
                                RewardSpec(name="a", shaping="linear", weight=2.0))
    second = dmdr.WeightedReward(Fixed("b", [0.0, 0.0, 0.0, 0.0, float("nan"), 0.0, 0.0, 0.0]),
                                 RewardSpec(name="b", shaping="linear", weight=1.0))
    scores = {reward.spec.name: reward.model.score(None, None) for reward in (first, second)}
    advantages, metrics = dmdr.rollout_advantages(scores, [first, second], RLSection(mode="grpo", group_size=2))
    # groups at very different levels each get -1/+1; sample 4 has a NaN score from the second reward, so its
    # group has one valid sample and nothing to compare
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.0, 0.0, -1.0, 1.0]), atol=1e-3, rtol=0)
    assert float(metrics["reward/b/non_finite"]) == 1.0 and float(metrics["reward/a"]) == pytest.approx(217 / 8)


def test_rollout_advantages_normalise_the_weighted_sum_of_the_shaped_rewards():
    """R = -sum_j lambda_j phi_j(r_j) (DESIGN section 2), then (R - mean_g) / (std_g + 1e-4) per group of 3. In
    the first group the weights change the advantages' sizes and order, so a sum that drops a weight shows."""

    class Fixed:
        differentiable = False

        def __init__(self, name, scores):
            self.name, self.scores = name, torch.tensor(scores)

    linear = dmdr.WeightedReward(Fixed("a", [0.0, 1.0, 0.5, 2.0, 2.0, 2.0]), RewardSpec(name="a", shaping="linear", weight=3.0))
    hinge = dmdr.WeightedReward(Fixed("b", [0.7, 0.0, 0.2, 0.7, 0.0, 0.3]),
                                RewardSpec(name="b", shaping="hinge", margin=0.7, weight=0.5))
    scores = {reward.spec.name: reward.model.scores for reward in (linear, hinge)}
    advantages, _ = dmdr.rollout_advantages(scores, [linear, hinge], RLSection(mode="grpo", group_size=3, adv_clip=10.0))
    # by hand: phi_a = -a, phi_b = relu(0.7 - b) = [0, 0.7, 0.5, 0, 0.7, 0.4]; R = 3 a - 0.5 phi_b
    rewards = torch.tensor([[0.0, 2.65, 1.25], [6.0, 5.65, 5.8]], dtype=torch.float64)
    mean, std = rewards.mean(dim=1, keepdim=True), rewards.std(dim=1, unbiased=False, keepdim=True)
    expected = ((rewards - mean) / (std + 1e-4)).reshape(-1).float()
    torch.testing.assert_close(advantages, expected, rtol=1e-5, atol=1e-5)
    unweighted = torch.tensor([[0.0, 0.3, 0.0]])  # -(phi_a + phi_b) of the first group: not what comes out
    assert (advantages[:3] - (unweighted - unweighted.mean()) / (unweighted.std(unbiased=False) + 1e-4)).abs().max() > 0.1


@pytest.mark.parametrize("transitions", ["one", "all"])
def test_policy_micro_batches_give_the_whole_batchs_loss_and_gradients(backbone, transitions):
    prompts, cond, student, trajectory, reward, scores = _policy_setup(backbone)
    rl = RLSection(mode="grpo", group_size=4, transitions=transitions)
    params = backbone.trainable_parameters(dmdr.GENERATOR)
    results = []
    for micro in (None, 3):
        for p in params:
            p.grad = None
        loss, metrics = dmdr.generator_loss(backbone, trajectory, cond, prompts, 0, student, CriticSection(), DmdSection(),
                                            [reward], True, torch.Generator().manual_seed(2), micro_batch_size=micro,
                                            backward=torch.Tensor.backward, rl=rl, rollout_scores=scores)
        results.append((loss, metrics, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]))
    (whole, whole_metrics, whole_grads), (micro, micro_metrics, micro_grads) = results
    torch.testing.assert_close(micro, whole, rtol=1e-5, atol=1e-7)
    for name in ("loss/dmd", "loss/policy", "rl/advantage_abs", "reward/mean-red-black-box"):
        assert float(micro_metrics[name]) == pytest.approx(float(whole_metrics[name]), rel=1e-4, abs=1e-6), name
    for a, b in zip(micro_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in whole_grads)


def test_a_trajectory_without_its_inputs_is_refused(backbone):
    prompts, cond, student, trajectory, reward, scores = _policy_setup(backbone)
    trajectory.inputs = None
    with pytest.raises(ValueError, match="keep_inputs"):
        dmdr.generator_loss(backbone, trajectory, cond, prompts, 0, student, CriticSection(), DmdSection(), [reward],
                            True, torch.Generator().manual_seed(2), rl=RLSection(mode="grpo"), rollout_scores=scores)


def test_a_rollout_batch_without_the_trained_rewards_scores_is_refused(backbone):
    prompts, cond, student, trajectory, reward, _ = _policy_setup(backbone)
    with pytest.raises(ValueError, match="no scores of 'mean-red-black-box'.*rewards_to_score"):
        dmdr.generator_loss(backbone, trajectory, cond, prompts, 0, student, CriticSection(), DmdSection(), [reward],
                            True, torch.Generator().manual_seed(2), rl=RLSection(mode="grpo"), rollout_scores={"other": torch.zeros(8)})


# -- prompts, rollouts, config ------------------------------------------------------------------------
def test_grouped_prompt_batches_repeat_each_prompt_and_ungrouped_ones_do_not_change():
    source = PromptSource("toy:held-in", 0)
    grouped = source.batch(3, 12, group=4)
    assert len(grouped) == 12 and all(len(set(grouped[i:i + 4])) == 1 for i in range(0, 12, 4))
    assert len(set(grouped)) == 3
    assert source.batch(3, 12) == source.batch(3, 12, group=1) and len(set(source.batch(3, 12))) > 3
    with pytest.raises(ValueError, match="whole groups"):
        source.batch(3, 10, group=4)


def test_grpo_rollouts_keep_each_steps_input_and_others_do_not(backbone):
    student = StudentSection(steps=3, sampler="sde")
    kept = make_rollout(backbone, PROMPTS, student, 0, 0, 0, keep_inputs=True)
    assert kept.x_steps.shape == (3, 2, 3, 32, 32) and kept.trajectory.inputs is kept.x_steps
    assert make_rollout(backbone, PROMPTS, student, 0, 0, 0).x_steps is None
    assert kept.to("cpu").x_steps is not None


@pytest.mark.parametrize("overrides, message", [
    (["student.sampler=ode"], "student.sampler=sde and student.steps >= 2"),
    (["student.steps=1"], "student.sampler=sde and student.steps >= 2"),
    (["trainer.batch_size=30"], "multiple of rl.group_size=4"),
    (["trainer.batch_size_rl=6"], "trainer.batch_size_rl=6 must be a multiple of rl.group_size=4"),
    (["trainer.backend=ray", "trainer.device=auto", "ray.learner_workers=3", "trainer.batch_size=16"],
     "times ray.learner_workers=3"),
    (["rewards.0.weight=0", "rewards.0.monitor=true"], "no reward has weight > 0"),
    (["rewards=[{name: toy-align, shaping: linear}, {name: toy-align, weight: 0, monitor: true}]"],
     "rewards.0 and rewards.1 are both called 'toy-align', and a reward's metrics and scores are kept by that name: "
     "give one a label"),
])
def test_grpo_configs_that_cannot_work_name_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config("toy-dmdr-grpo", overrides)


def test_a_reward_without_a_gradient_trains_with_grpo_and_is_refused_by_refl(tmp_path, monkeypatch):
    module = tmp_path / "my_black_box.py"  # the user's module, outside the package, named only in the config
    module.write_text("import torch\n\n"
                      "class Redness:\n"
                      "    name, differentiable = 'redness', False\n"
                      "    def __init__(self, **kwargs):\n"
                      "        pass\n"
                      "    def score(self, images, prompts):\n"
                      "        with torch.no_grad():\n"
                      "            return images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = ["rewards=[{name: 'my_black_box:Redness', shaping: linear}]", "trainer.batch_size=4", "rl.group_size=2",
                "student.steps=2", "trainer.max_steps=3", "trainer.cold_start=1", "dmd.ratio=2", "output.log_every=1",
                "output.sample_every=100", "output.checkpoint_every=100", f"output.dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match="set rl.mode=grpo"):
        build_rewards(load_config("toy-dmdr-grpo", settings + ["rl.mode=refl"]))
    cfg = load_config("toy-dmdr-grpo", settings)
    torch.manual_seed(0)
    trainer = LocalTrainer(cfg, ToyBackbone(create_teacher_transformer(seed=0), ToyTextEncoder.create(seed=0)))
    for _ in range(6):
        metrics = trainer.train_iteration()
    assert trainer.generator_step == 3 and "loss/policy" in metrics and "reward/my_black_box:Redness" in metrics
    # the rollout scored it (the learner's advantages come from these scores, logged on both sides)
    rollout_scores = trainer.last_batch.reward_scores["my_black_box:Redness"]
    assert float(metrics["reward/my_black_box:Redness"]) == pytest.approx(float(rollout_scores.mean()), rel=1e-6)
    assert metrics["rollout/reward/my_black_box:Redness"] == metrics["reward/my_black_box:Redness"]
    assert metrics["rollout/reward/my_black_box:Redness/non_finite"] == 0.0  # (weights it over the learner ranks)
    assert float(metrics["rl/advantage_abs"]) > 0 and float(metrics["stage/reward_active"]) == 1.0
    # with no DMD term, only the policy term can move the generator: it does, from its first update on
    cfg = load_config("toy-dmdr-grpo", settings + ["dmd.weight=0", "trainer.cold_start=0"])
    torch.manual_seed(0)
    trainer = LocalTrainer(cfg, ToyBackbone(create_teacher_transformer(seed=0), ToyTextEncoder.create(seed=0)))
    before = [p.detach().clone() for p in trainer.backbone.trainable_parameters(dmdr.GENERATOR)]
    trainer.train_iteration(), trainer.train_iteration()
    after = trainer.backbone.trainable_parameters(dmdr.GENERATOR)
    assert trainer.generator_step == 1 and any(not torch.equal(a, b) for a, b in zip(before, after))


def test_a_grpo_run_with_a_reward_without_a_gradient_trains_from_its_start(tmp_path):
    """The start-of-run probe of the rewards asks no gradient of a reward the policy gradient trains with (ReFL's
    probe would, and this reward has none)."""
    cfg = load_config("toy-dmdr-grpo", ["rewards=[{name: mean-red-black-box, shaping: linear}]", "trainer.batch_size=4",
                                        "rl.group_size=2", "student.steps=2", "trainer.cold_start=1", "dmd.ratio=1",
                                        "trainer.max_steps=2", "output.log_every=1", "output.sample_every=1000",
                                        "output.checkpoint_every=1000", f"output.dir={tmp_path}"])
    torch.manual_seed(0)
    trainer = LocalTrainer(cfg, ToyBackbone(create_teacher_transformer(seed=0), ToyTextEncoder.create(seed=0)),
                           [dmdr.WeightedReward(MeanRedNoGradient(), cfg.rewards[0])])
    trainer.train()
    assert trainer.generator_step == 2 and (tmp_path / "metrics.jsonl").read_text().count("loss/policy") == 1


def test_a_monitored_trained_reward_is_scored_once_per_generator_update_and_only_by_the_rollout(tmp_path):
    cfg = load_config("toy-dmdr-grpo", ["rewards=[{name: mean-red-black-box, shaping: linear, monitor: true}]",
                                        "trainer.batch_size=4", "rl.group_size=2", "student.steps=2",
                                        "trainer.cold_start=0", "dmd.ratio=2", f"output.dir={tmp_path / 'run'}"])
    reward = dmdr.WeightedReward(MeanRedNoGradient(), cfg.rewards[0])
    torch.manual_seed(0)
    trainer = LocalTrainer(cfg, ToyBackbone(create_teacher_transformer(seed=0), ToyTextEncoder.create(seed=0)), [reward])
    # a critic-only iteration: its batch is not scored (the critic's update uses no score)
    assert trainer.train_iteration() is None and reward.model.calls == 0 and trainer.last_batch.reward_scores == {}
    metrics = trainer.train_iteration()  # scored once, by the rollout, though both monitored and trained
    assert trainer.generator_step == 1 and reward.model.calls == 1 and float(metrics["rl/advantage_abs"]) > 0
    # ReFL scores the trained reward in the learner (with its gradient); the rollouts only what is monitored
    refl, grpo = (load_config(preset, ["rewards.0.monitor=false"]) for preset in ("toy-dmdr", "toy-dmdr-grpo"))
    assert not refl.scored_on_rollout(refl.rewards[0]) and grpo.scored_on_rollout(grpo.rewards[0])


def test_grpo_rollouts_score_and_keep_inputs_only_for_the_policy_terms_batches(tmp_path):
    """Through the cold start and on critic-only batches nothing uses a trained reward's scores or the
    per-step inputs: a black-box reward server is not called for them, and the batch carries no x_steps.
    A monitored reward is still scored on every generator-update batch, for the logs."""
    cfg = load_config("toy-dmdr-grpo", ["rewards=[{name: mean-red-black-box, shaping: linear}, "
                                        "{name: mean-red-black-box, label: watched, weight: 0, monitor: true}]",
                                        "trainer.batch_size=4", "rl.group_size=2", "student.steps=2",
                                        "trainer.cold_start=1", "dmd.ratio=2", f"output.dir={tmp_path / 'run'}"])
    trained, watched = (dmdr.WeightedReward(MeanRedNoGradient(), spec) for spec in cfg.rewards)
    torch.manual_seed(0)
    trainer = LocalTrainer(cfg, ToyBackbone(create_teacher_transformer(seed=0), ToyTextEncoder.create(seed=0)),
                           [trained, watched])
    seen = []
    for _ in range(4):  # iterations 0-3: critic, generator step 0 (cold start), critic, generator step 1 (GRPO)
        metrics = trainer.train_iteration()
        batch = trainer.last_batch
        seen.append((sorted(batch.reward_scores), batch.x_steps is not None, trained.model.calls, watched.model.calls))
    assert seen == [([], False, 0, 0), (["watched"], False, 0, 1), ([], False, 0, 1),
                    (["mean-red-black-box", "watched"], True, 1, 2)]
    assert float(metrics["stage/reward_active"]) == 1.0 and "loss/policy" in metrics


def test_the_dry_run_accepts_a_reward_without_a_gradient_only_with_grpo(tmp_path, monkeypatch):
    from dmdr_rl.run import dry_run

    (tmp_path / "my_checked_box.py").write_text("class Count:\n    name, differentiable = 'count', False\n"
                                               "    def score(self, images, prompts):\n        return images.sum((1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = "rewards=[{name: 'my_checked_box:Count', shaping: linear}]"
    plan = dry_run("toy-dmdr-grpo", [reward])
    assert ("trained by policy gradient (GRPO): 8 prompts x 4 samples per batch, every sampler transition, "
            "policy weight 10, scored by the rollouts") in plan
    assert "(GRPO): 4 prompts x 4 samples per batch" in dry_run("toy-dmdr-grpo", [reward, "trainer.batch_size_rl=16"])
    with pytest.raises(ConfigError, match=r"rewards\.0 \(my_checked_box:Count\) is not differentiable.*rl\.mode=grpo"):
        dry_run("toy-dmdr-grpo", [reward, "rl.mode=refl", "student.sampler=ode"])


def test_grpo_settings_that_run_but_learn_less_are_warned_about():
    warnings = load_config("toy-dmdr-grpo", ["rewards.0.shaping=hinge", "trainer.backend=ray", "trainer.device=auto",
                                             "student.steps=2", "ray.max_staleness=1"]).warnings()
    assert any("rewards.0 (toy-align) has hinge shaping" in w for w in warnings)
    assert any("ray.max_staleness=1" in w and "rl/clipped" in w for w in warnings)
    assert any("student.steps=2" in w for w in warnings)
    assert load_config("toy-dmdr-grpo").warnings() == []


def test_grpo_rollouts_are_on_policy_unless_the_config_says_otherwise():
    """ray.max_staleness defaults to 0 under GRPO (one version behind, the clip drops part of the gradient) and
    to 1 otherwise (rollouts overlap the learner); the default is not a setting of the user's, so a local run is
    not warned that it sets the Ray runtime, and the config written with the run records the value used."""
    grpo = load_config("toy-dmdr-grpo", ["trainer.backend=ray", "trainer.device=auto"])
    assert grpo.ray.max_staleness == 0 and grpo.warnings() == []
    assert load_config("toy-dmdr").ray.max_staleness == 1 and load_config("toy-dmdr-grpo").warnings() == []
    assert load_config("toy-dmdr-grpo", ["ray.max_staleness=2"]).ray.max_staleness == 2
    assert grpo.model_dump(mode="json")["ray"]["max_staleness"] == 0


def test_training_every_transition_averages_the_one_transition_terms(backbone):
    """rl.transitions=all is the mean of the policy terms of each transition j taken alone."""
    prompts = [p for p in PROMPTS for _ in range(2)]
    cond = backbone.encode(prompts)
    trajectory, _ = _replayable_trajectory(backbone, cond)
    reward = dmdr.WeightedReward(MeanRedNoGradient(), RewardSpec(name="red", shaping="linear"))
    scores = _rollout_scores(backbone, trajectory, prompts, reward)
    student, params = StudentSection(steps=3, sampler="sde"), backbone.trainable_parameters(dmdr.GENERATOR)

    def gradients(loss):
        for p in params:
            p.grad = None
        loss.backward()
        return [p.grad.clone() for p in params]

    loss, metrics = dmdr.generator_loss(backbone, trajectory, cond, prompts, 0, student, CriticSection(), DmdSection(weight=0.0),
                                        [reward], True, torch.Generator().manual_seed(2),
                                        rl=RLSection(mode="grpo", group_size=2, transitions="all"), rollout_scores=scores)
    every = gradients(loss)
    advantages, _ = dmdr.rollout_advantages(scores, [reward], RLSection(mode="grpo", group_size=2))
    alone = [gradients(dmdr.policy_loss(backbone, trajectory, cond, torch.full((4,), j), advantages, 1e-4, slice(0, 4))[0])
             for j in range(2)]
    for g, a, b in zip(every, *alone):
        torch.testing.assert_close(g, (a + b) / 2, rtol=1e-4, atol=1e-9)
    assert any(g.abs().sum() > 0 for g in every)
