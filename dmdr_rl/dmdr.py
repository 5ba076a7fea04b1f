"""One DMDR training iteration, as loss functions over a `Backbone` (DESIGN section 2, steps 1-3).

These are the only implementation of the step: the local trainer and the distributed learner call
them and own nothing but optimizers, data and bookkeeping. The backbone carries two LoRA adapters on
its frozen base: "generator" (the student) and "critic" (fake score at `fake_scale`, real score at
`real_score_scale(step)`; scale 0 is the teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
import time
from typing import Sequence

import torch

from . import algo
from .backbone import Backbone
from .conditioning import Conditioning
from .config import CriticSection, DmdSection, RewardSpec, StudentSection
from .flow import Trajectory, add_noise, randn, sample, x0_from_velocity
from reward_servers.protocol import RewardModel

GENERATOR, CRITIC = "generator", "critic"


@dataclass
class WeightedReward:
    """A reward model with its weight and shaping from the config."""

    model: RewardModel
    spec: RewardSpec

    def loss(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, "torch.Tensor | Elapsed"]]:
        """lambda * mean phi(r) over the samples whose score is finite (the others are counted, not used:
        they get no gradient). Masked rather than indexed, so no host sync; the metrics are 0-d tensors
        and the scoring time an `Elapsed`, all read with float()."""
        started = mark(images.device)
        scores = self.model.score(images, prompts)
        finite = torch.isfinite(scores)
        kept = torch.where(finite, scores, torch.zeros_like(scores))
        shaped = torch.where(finite, algo.shape_reward(kept, self.spec.shaping, self.spec.margin), torch.zeros_like(kept))
        metrics = {f"reward/{self.spec.name}": algo.finite_mean(scores).detach(),
                   f"reward/{self.spec.name}/non_finite": (~finite).sum().float(),
                   f"time/reward/{self.spec.name}_s": Elapsed(started, mark(images.device))}
        return self.spec.weight * shaped.sum() / finite.sum().clamp(min=1), metrics


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
    backbone: Backbone, cond: Conditioning, student: StudentSection, generator: torch.Generator
) -> Trajectory:
    """Step 1: sample K steps with the current generator, no gradients, keeping every step's x0."""
    noise = randn((len(cond), *backbone.sample_shape), generator, cond.tokens.device)
    with torch.no_grad():
        return sample(
            lambda x, t: backbone.velocity(x, t, cond, adapter=GENERATOR),
            noise, student.steps, student.shift, mode=student.sampler, generator=generator, keep_steps=True,
        )


def critic_loss(
    backbone: Backbone, x0: torch.Tensor, cond: Conditioning, generator_step: int,
    critic: CriticSection, dmd: DmdSection, generator: torch.Generator,
) -> torch.Tensor:
    """Step 2: flow matching of the fake score on detached generator samples at tau ~ DynaRS."""
    tau = algo.sample_renoise_timesteps(x0.shape[0], generator_step, *dmd.renoise_beta, dmd.dynamic_steps, generator,
                                        device=x0.device)
    eps = randn(x0.shape, generator, x0.device)
    v_fake = backbone.velocity(add_noise(x0.detach(), eps, tau), tau, cond, adapter=CRITIC, scale=critic.fake_scale)
    return algo.critic_loss(v_fake, x0, eps)


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
) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
    """Step 3: re-noise at a random student timestep, predict x0 with gradient, then
    L_G = dmd.weight * L_dmd + sum_j lambda_j phi_j(r_j) (the reward only after the cold start).
    The loss metrics stay 0-d tensors on the step's device (no host sync inside the step)."""
    batch, device = trajectory.x0.shape[0], trajectory.x0.device
    k = torch.randint(0, trajectory.timesteps.shape[0], (batch,), generator=generator).to(device)
    t_k = trajectory.timesteps[k]
    x0_source = trajectory.x0 if student.sampler == "ode" else trajectory.x0_steps[k, torch.arange(batch, device=device)]
    x_in = add_noise(x0_source, randn(x0_source.shape, generator, device), t_k)
    x0 = x0_from_velocity(x_in, t_k, backbone.velocity(x_in, t_k, cond, adapter=GENERATOR))

    loss = x0.sum() * 0.0
    metrics: dict[str, float | torch.Tensor] = {}
    if dmd.weight > 0:
        tau = algo.sample_renoise_timesteps(batch, generator_step, *dmd.renoise_beta, dmd.dynamic_steps, generator,
                                            device=device)
        x_tau = add_noise(x0.detach(), randn(x0.shape, generator, device), tau)
        guidance = dmd.real_cfg + dmd.cfg_jitter * (2 * float(torch.rand((), generator=generator)) - 1)
        real_scale = algo.real_score_scale(generator_step, critic.real_scale0, dmd.dynamic_steps)
        real_cfg = algo.guidance_interval(tau, guidance, dmd.cfg_max_tau)
        with torch.no_grad():
            v_real = backbone.velocity(x_tau, tau, cond, adapter=CRITIC, scale=real_scale, cfg=real_cfg)
            v_fake = backbone.velocity(x_tau, tau, cond, adapter=CRITIC, scale=critic.fake_scale)
        dmd_term = algo.dmd_loss(x0, x0_from_velocity(x_tau, tau, v_real), x0_from_velocity(x_tau, tau, v_fake))
        loss = loss + dmd.weight * dmd_term
        metrics.update({"loss/dmd": dmd_term.detach(), "schedule/real_scale": real_scale, "schedule/real_cfg": guidance})
    if reward_active and rewards:
        images = backbone.decode(x0)
        for reward in rewards:
            if reward.spec.weight == 0:  # monitored on the rollouts only
                continue
            term, reward_metrics = reward.loss(images, prompts)
            loss = loss + term
            metrics.update(reward_metrics)
            metrics[f"loss/reward/{reward.spec.name}"] = term.detach()
    metrics["loss/generator"] = loss.detach()
    return loss, metrics
