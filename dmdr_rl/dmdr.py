"""One DMDR training iteration, as loss functions over a `Backbone` (DESIGN section 2, steps 1-3).

These are the only implementation of the step: the local trainer and the distributed learner call
them and own nothing but optimizers, data and bookkeeping. The backbone carries two LoRA adapters on
its frozen base: "generator" (the student) and "critic" (fake score at `fake_scale`, real score at
`real_score_scale(step)`; scale 0 is the teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
import time
from typing import Callable, Mapping, Sequence

import torch

from . import algo
from .backbone import Backbone
from .conditioning import Conditioning
from .config import CriticSection, DmdSection, RewardSpec, RLSection, StudentSection
from .flow import Trajectory, add_noise, randn, sample, sde_transition, x0_from_velocity
from reward_servers.gradient import zero_unusable
from reward_servers.protocol import RewardModel

GENERATOR, CRITIC = "generator", "critic"


@dataclass
class WeightedReward:
    """A reward model with its weight and shaping from the config."""

    model: RewardModel
    spec: RewardSpec

    def loss(self, images: torch.Tensor, prompts: Sequence[str], words: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, dict[str, "torch.Tensor | Elapsed"]]:
        """lambda * sum phi(r) / B over the samples whose score is finite: the others are counted, not used
        (they add nothing and get no gradient), and do not raise the weight of the rest. So the term is the
        same however the batch is split, into micro-batches or DDP ranks. `words`: as `score`."""
        shaped, _, metrics = self.shaped(images, prompts, words)
        return self.spec.weight * shaped.sum() / shaped.numel(), metrics

    def score(self, images: torch.Tensor, prompts: Sequence[str], words: torch.Tensor | None = None) -> torch.Tensor:
        """The model's scores, each image against its prompt as this reward reads it (`spec.prompt_template`).
        With `spec.relative`, SRPO's (1 + k) r(x, positive) - r(x, negative): given `words` (`draw_words`), each
        image is read with its own drawn positive and negative template (training: two readings an image, as the
        paper's code); without, the mean over every reading (an exact, repeatable score: monitoring, GRPO,
        evaluation), which a draw estimates without bias. One model call either way."""
        prompts = self.spec.reward_prompts(prompts)
        relative = self.spec.relative
        if relative is None:
            return self.model.score(images, prompts)
        if words is None:
            readings, count = relative.readings(prompts), len(relative.positive) + len(relative.negative)
            scores = self.model.score(images.repeat(count, 1, 1, 1), readings).reshape(count, len(prompts))
            positive, negative = scores[: len(relative.positive)].mean(0), scores[len(relative.positive) :].mean(0)
        else:
            drawn = [[templates[i].replace("{prompt}", prompt) for i, prompt in zip(column.tolist(), prompts)]
                     for templates, column in ((relative.positive, words[:, 0]), (relative.negative, words[:, 1]))]
            positive, negative = self.model.score(torch.cat([images, images]), drawn[0] + drawn[1]).chunk(2)
        return (1 + relative.k) * positive - negative

    def draw_words(self, batch: int, generator: torch.Generator) -> torch.Tensor | None:
        """[batch, 2]: each image's positive and negative template of `spec.relative`, uniformly; None (and no
        draw) without it."""
        relative = self.spec.relative
        if relative is None:
            return None
        return torch.stack([torch.randint(0, len(relative.positive), (batch,), generator=generator),
                            torch.randint(0, len(relative.negative), (batch,), generator=generator)], dim=1)

    def shaped(self, images: torch.Tensor, prompts: Sequence[str], words: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """phi(r) per sample (0 where the score is not finite), which scores were finite, and the metrics.
        Masked rather than indexed, so no host sync; the metrics are 0-d tensors and the scoring time an
        `Elapsed`, all read with float()."""
        started = mark(images.device)
        pixels = images.view_as(images)  # this reward's own node of the graph, for the hook below
        scores = self.score(pixels, prompts, words)
        shaped, finite, metrics = self.shape(scores)
        if pixels.requires_grad:  # a sample whose score or gradient is not finite gets none (it would give NaN):
            pixels.register_hook(lambda grad: zero_unusable(grad, finite))  # as on the served path
        metrics[f"time/reward/{self.spec.key}_s"] = Elapsed(started, mark(images.device))
        return shaped, finite, metrics

    def shape(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """`shaped` for scores already computed (GRPO's, which the rollout scored)."""
        finite = torch.isfinite(scores)
        kept = torch.where(finite, scores, torch.zeros_like(scores))
        shaped = torch.where(finite, algo.shape_reward(kept, self.spec.shaping, self.spec.margin), torch.zeros_like(kept))
        metrics = {f"reward/{self.spec.key}": algo.finite_mean(scores).detach(),
                   f"reward/{self.spec.key}/non_finite": (~finite).sum().float()}
        return shaped, finite, metrics


def mark(device: torch.device):
    """A point in `device`'s work: a recorded CUDA event on a GPU (its kernels run asynchronously, so a host
    clock would credit them to whatever waits for them next), the host clock elsewhere. No host sync."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))  # that device's stream, whichever device is current
        return event
    return time.perf_counter()


class Elapsed:
    """Seconds between two marks, read when converted with float(): by then the step has waited for its
    results anyway (a metric's .item()), so timing adds no host sync."""

    def __init__(self, start, end):
        self.start, self.end = start, end

    def __float__(self) -> float:
        if isinstance(self.start, float):
            return self.end - self.start
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1000.0


def add_generator(backbone, student: StudentSection) -> None:
    """The generator: its own LoRA, or a full copy of the base when `student.lora` is null."""
    if student.lora is None:
        backbone.add_full_copy(GENERATOR)
    else:
        backbone.add_lora(GENERATOR, student.lora.rank, student.lora.alpha, **_targets(student.lora))


def _targets(lora) -> dict:
    return {"targets": tuple(lora.targets)} if lora.targets else {}


def add_adapters(backbone, student: StudentSection, critic: CriticSection) -> None:
    """Both trained networks on one backbone: the generator, then the critic LoRA."""
    add_generator(backbone, student)
    backbone.add_lora(CRITIC, critic.lora.rank, critic.lora.alpha, **_targets(critic.lora))


def backward_simulation(
    backbone: Backbone, cond: Conditioning, student: StudentSection, generator: torch.Generator,
    micro_batch_size: int | None = None,
) -> Trajectory:
    """Step 1: sample K steps with the current generator, no gradients, keeping every step's x0.
    `micro_batch_size`: the network sees the batch in slices of this size (the sampler's noise is drawn for the
    whole batch, so the samples do not depend on it; a large model's batch at 1024 px would not fit at once)."""
    noise = randn((len(cond), *backbone.sample_shape), generator, cond.tokens.device)
    parts = micro_batches(len(cond), micro_batch_size)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if len(parts) == 1:
            return backbone.velocity(x, t, cond, adapter=GENERATOR)
        return torch.cat([backbone.velocity(x[part], t[part], cond[part], adapter=GENERATOR) for part in parts])

    with torch.no_grad():
        return sample(velocity, noise, student.steps, student.shift, mode=student.sampler, generator=generator,
                      keep_steps=True)


Backward = Callable[[torch.Tensor], None]


def micro_batches(batch: int, size: int | None) -> list[slice]:
    """The batch in consecutive slices of at most `size` samples (None: one slice, the whole batch)."""
    size = size or batch
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


def _accumulate(total: torch.Tensor | None, share: torch.Tensor, backward: Backward | None) -> torch.Tensor:
    """Add one micro-batch's share of a loss; with `backward`, back-propagate it first and keep it detached
    (its activations are freed before the next micro-batch is built: gradient accumulation)."""
    if backward is not None:
        backward(share)
        share = share.detach()
    return share if total is None else total + share


def critic_loss(
    backbone: Backbone, x0: torch.Tensor, cond: Conditioning, generator_step: int,
    critic: CriticSection, dmd: DmdSection, generator: torch.Generator,
    micro_batch_size: int | None = None, backward: Backward | None = None,
) -> torch.Tensor:
    """Step 2: flow matching of the fake score on detached generator samples at tau ~ DynaRS.

    `micro_batch_size`: the batch goes through the network in slices of this size, each slice's loss
    weighted by its share of the batch, so the shares sum to the batch's loss (every random draw is made
    for the whole batch first: the numbers do not depend on the slicing). `backward`: back-propagate each
    share as soon as it is built (the returned loss is then detached)."""
    batch = x0.shape[0]
    tau = algo.sample_renoise_timesteps(batch, generator_step, *dmd.renoise_beta, dmd.dynamic_steps, generator,
                                        device=x0.device)
    eps = randn(x0.shape, generator, x0.device)
    total = None
    for part in micro_batches(batch, micro_batch_size):
        x_tau = add_noise(x0[part].detach(), eps[part], tau[part])
        v_fake = backbone.velocity(x_tau, tau[part], cond[part], adapter=CRITIC, scale=critic.fake_scale)
        share = algo.critic_loss(v_fake, x0[part], eps[part]) * ((part.stop - part.start) / batch)
        total = _accumulate(total, share, backward)
    return total


def critic_samples(trajectory: Trajectory, sampler: str, samples: str, generator: torch.Generator) -> torch.Tensor:
    """What step 2's critic learns from (`critic.samples`): the final samples (DESIGN section 2), or, in SDE mode
    with samples="step", each sample's x0_k at a step k drawn uniformly from `generator`, as the generator step
    re-noises them (the paper's code). The ODE sampler's generator step re-noises the final samples: those."""
    if samples == "final" or sampler != "sde":
        return trajectory.x0
    batch, device = trajectory.x0.shape[0], trajectory.x0.device
    k = torch.randint(0, trajectory.timesteps.shape[0], (batch,), generator=generator).to(device)
    return trajectory.x0_steps[k, torch.arange(batch, device=device)]


def generator_loss(
    backbone: Backbone,
    trajectory: Trajectory,
    cond: Conditioning,
    prompts: Sequence[str],
    generator_step: int,
    student: StudentSection,
    critic: CriticSection,
    dmd: DmdSection,
    rewards: Sequence[WeightedReward],
    reward_active: bool,
    generator: torch.Generator,
    micro_batch_size: int | None = None,
    backward: Backward | None = None,
    rl: RLSection | None = None,
    rollout_scores: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
    """Step 3: re-noise at a random student timestep, predict x0 with gradient, then
    L_G = dmd.weight * L_dmd + sum_j lambda_j phi_j(r_j) (the reward only after the cold start), or with
    `rl.mode=grpo` L_G = dmd.weight * L_dmd + rl.policy_weight * L_policy (see `policy_loss`), whose
    advantages come from `rollout_scores` (the rollout's scores of its samples, by reward name).
    The loss metrics stay 0-d tensors on the step's device (no host sync inside the step).

    `micro_batch_size` / `backward`: as `critic_loss`. The DMD, reward and policy terms are means over
    the samples (a non-finite score adds 0), so their shares add up exactly."""
    batch, device = trajectory.x0.shape[0], trajectory.x0.device
    # every draw for the whole batch, in one order, before any network runs
    k = torch.randint(0, trajectory.timesteps.shape[0], (batch,), generator=generator).to(device)
    t_k = trajectory.timesteps[k]
    x0_source = trajectory.x0 if student.sampler == "ode" else trajectory.x0_steps[k, torch.arange(batch, device=device)]
    x_in = add_noise(x0_source, randn(x0_source.shape, generator, device), t_k)
    metrics: dict[str, float | torch.Tensor] = {}
    if dmd.weight > 0:
        tau = algo.sample_renoise_timesteps(batch, generator_step, *dmd.renoise_beta, dmd.dynamic_steps, generator,
                                            device=device)
        tau_noise = randn(x_in.shape, generator, device)
        guidance = algo.draw_guidance(dmd.real_cfg, dmd.cfg_jitter, generator)
        real_scale = algo.real_score_scale(generator_step, critic.real_scale0, dmd.dynamic_steps)
        metrics.update({"schedule/real_scale": real_scale, "schedule/real_cfg": guidance})
    rewarded = [reward for reward in rewards if reward.spec.weight != 0] if reward_active else []  # weight 0: monitors
    policy = bool(rewarded) and rl is not None and rl.policy_gradient
    transitions: list[torch.Tensor] = []  # GRPO's, each [B]: which transition of each sample to train
    if policy:  # GRPO: the sampler's transitions x_j -> x_{j+1}, j < K - 1: all, or one per sample (an unbiased
        if trajectory.inputs is None:  # draw of their mean)
            raise ValueError("rl.mode=grpo needs the rollout's per-step inputs (make_rollout(..., keep_inputs=True))")
        draws = trajectory.timesteps.shape[0] - 1
        if rl.transitions == "one":
            transitions = [torch.randint(0, draws, (batch,), generator=generator).to(device)]
        else:
            transitions = [torch.full((batch,), j, device=device) for j in range(draws)]
    # each image's style words, for a reward scored relative to them (none drawn for the others)
    words = {} if policy else {reward.spec.key: reward.draw_words(batch, generator) for reward in rewarded}

    total, parts = None, micro_batches(batch, micro_batch_size)
    reward_parts: list[tuple[WeightedReward, int, dict]] = []
    if policy:
        advantages, metrics_of_scores = rollout_advantages(rollout_scores or {}, rewarded, rl)
        metrics.update(metrics_of_scores)
    shares: dict[str, list[torch.Tensor]] = {}
    for part in parts:
        fraction = (part.stop - part.start) / batch
        loss = torch.zeros((), device=device)
        if dmd.weight > 0 or (rewarded and not policy):  # (GRPO without DMD never needs the re-noised x0)
            x0 = x0_from_velocity(x_in[part], t_k[part],
                                  backbone.velocity(x_in[part], t_k[part], cond[part], adapter=GENERATOR))
            loss = x0.sum() * 0.0
        if dmd.weight > 0:
            x_tau = add_noise(x0.detach(), tau_noise[part], tau[part])
            real_cfg = algo.guidance_interval(tau[part], guidance, dmd.cfg_max_tau)
            with torch.no_grad():
                v_real = backbone.velocity(x_tau, tau[part], cond[part], adapter=CRITIC, scale=real_scale, cfg=real_cfg)
                v_fake = backbone.velocity(x_tau, tau[part], cond[part], adapter=CRITIC, scale=critic.fake_scale)
            dmd_term = algo.dmd_loss(x0, x0_from_velocity(x_tau, tau[part], v_real),
                                     x0_from_velocity(x_tau, tau[part], v_fake)) * fraction
            loss = loss + dmd.weight * dmd_term
            shares.setdefault("loss/dmd", []).append(dmd_term.detach())
        for transition in transitions:  # (the policy term is the mean over the transitions trained)
            term, stats = policy_loss(backbone, trajectory, cond[part], transition[part], advantages[part],
                                      rl.clip_range, part)
            share = fraction / len(transitions)
            loss = loss + rl.policy_weight * term * share
            shares.setdefault("loss/policy", []).append(term.detach() * share)
            for name, value in stats.items():  # (means over the slice: weighted like the loss)
                shares.setdefault(name, []).append(value * share)
        if rewarded and not policy:
            images = backbone.decode(x0)
            for reward in rewarded:
                drawn = words[reward.spec.key]
                term, reward_metrics = reward.loss(images, prompts[part], None if drawn is None else drawn[part])
                loss = loss + term * fraction
                shares.setdefault(f"loss/reward/{reward.spec.key}", []).append(term.detach() * fraction)
                reward_parts.append((reward, part.stop - part.start, reward_metrics))
        total = _accumulate(total, loss, backward)
    metrics.update({name: _sum(values) for name, values in shares.items()})
    metrics.update(_combined_reward_metrics(reward_parts, single=len(parts) == 1))
    metrics["loss/generator"] = total.detach()
    return total, metrics


def rollout_advantages(
    scores: Mapping[str, torch.Tensor], rewarded: Sequence[WeightedReward], rl: RLSection,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's advantages of the rollout's final samples: R = -sum_j lambda_j phi_j(r_j) (the ReFL loss's
    shaping and weights, as a reward), normalised within each group of samples of one prompt, and the
    rewards' metrics. The scores are the rollout's (`RolloutBatch.reward_scores`: scored there without
    gradients, once, where reward servers scale with the rollouts); a sample with a non-finite score gets
    advantage 0 and is counted in the reward's metrics."""
    missing = [reward.spec.key for reward in rewarded if reward.spec.key not in scores]
    if missing:
        raise ValueError(f"rl.mode=grpo: the rollout batch has no scores of {', '.join(map(repr, missing))} (it has "
                         f"{sorted(scores) or 'none'}); GRPO's rollouts score every trained reward: make them with "
                         "make_rollout(..., scored=rewards_to_score(cfg, rewards, iteration, train_step))")
    total, valid, metrics = None, None, {}
    for reward in rewarded:
        shaped, finite, reward_metrics = reward.shape(scores[reward.spec.key].detach())
        term = -reward.spec.weight * shaped
        total = term if total is None else total + term.to(total.device)
        valid = finite if valid is None else valid & finite.to(valid.device)
        metrics.update(reward_metrics)
    return algo.group_advantages(total, valid, rl.group_size, rl.adv_clip), metrics


def policy_loss(
    backbone: Backbone, trajectory: Trajectory, cond: Conditioning, transition: torch.Tensor, advantages: torch.Tensor,
    clip_range: float, rows: slice,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's term for the samples `rows` of the trajectory: the clipped surrogate of the likelihood ratio of
    each sample's sampler transition x_j -> x_{j+1} (`transition` = j) under the current generator against
    the rollout's generator (its recorded x0_j), averaged over the samples. The DMD term stays the
    regulariser (DESIGN section 2: it replaces GRPO's KL term)."""
    index = torch.arange(rows.start, rows.stop, device=transition.device)
    t_now, t_next = trajectory.timesteps[transition], trajectory.timesteps[transition + 1]
    x, x_next = trajectory.inputs[transition, index], trajectory.inputs[transition + 1, index]
    x0_new = x0_from_velocity(x, t_now, backbone.velocity(x, t_now, cond, adapter=GENERATOR))
    mean, std = sde_transition(x0_new, t_next)
    old_mean, _ = sde_transition(trajectory.x0_steps[transition, index], t_next)
    log_ratio = algo.gaussian_log_ratio(x_next, mean, old_mean, std)
    per_sample, ratio = algo.clipped_policy_loss(log_ratio, advantages, clip_range)
    moved = ratio.detach() - 1
    # the fraction of samples whose gradient the clip removed: moved past the range the way their advantage pushes
    clipped = (moved.abs() > clip_range) & (moved * advantages > 0)
    stats = {"rl/ratio": ratio.detach().mean(), "rl/clipped": clipped.float().mean(),
             "rl/log_ratio_abs": log_ratio.detach().abs().mean(), "rl/advantage_abs": advantages.abs().mean()}
    return per_sample.mean(), stats


def _sum(values: list[torch.Tensor]) -> torch.Tensor:
    return values[0] if len(values) == 1 else torch.stack(values).sum()


def _combined_reward_metrics(parts: list[tuple[WeightedReward, int, dict]], single: bool) -> dict:
    """One slice's metrics as they are; several slices' combined: the mean of all finite scores, the count
    of the non-finite ones, and the scoring time summed."""
    if single:
        return {name: value for _, _, metrics in parts for name, value in metrics.items()}
    combined: dict = {}
    for reward in {id(r): r for r, _, _ in parts}.values():
        name = reward.spec.key
        mine = [(size, metrics) for r, size, metrics in parts if r is reward]
        non_finite = torch.stack([m[f"reward/{name}/non_finite"] for _, m in mine])
        finite = torch.tensor([size for size, _ in mine], dtype=non_finite.dtype, device=non_finite.device) - non_finite
        means = torch.stack([torch.nan_to_num(m[f"reward/{name}"]) for _, m in mine])
        combined[f"reward/{name}"] = (means * finite).sum() / finite.sum()
        combined[f"reward/{name}/non_finite"] = non_finite.sum()
        combined[f"time/reward/{name}_s"] = ElapsedSum([m[f"time/reward/{name}_s"] for _, m in mine])
    return combined


class ElapsedSum:
    """Several `Elapsed` added up when read with float()."""

    def __init__(self, parts: list):
        self.parts = parts

    def __float__(self) -> float:
        return sum(float(part) for part in self.parts)
