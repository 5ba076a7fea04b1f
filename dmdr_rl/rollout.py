"""Rollouts: prompt batches turned into generator samples with their whole trajectory, as tensors.

A `RolloutBatch` is what crosses from a rollout actor to the learner through Ray's object store
(DESIGN section 6); the local trainer makes the very same batches in-process. Every random draw of
iteration i comes from seeds derived from (run seed, i), so a batch does not depend on which process
made it or on what ran before: that is what lets the distributed runtime reproduce the local
trainer's losses and lets any run resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from . import dmdr
from .backbone import Backbone
from .conditioning import Conditioning
from .algo import UpdateSchedule
from .config import RunConfig, StudentSection
from .flow import Trajectory
from .seeds import ROLLOUT_STREAM, iteration_seed


@dataclass
class RolloutBatch:
    iteration: int  # the batch index: with `rank`, the prompt ledger's key
    rank: int  # the learner rank whose shard this is
    prompts: list[str]
    cond: Conditioning
    x0: torch.Tensor  # [B, C, H, W] final samples
    x0_steps: torch.Tensor  # [K, B, C, H, W] each step's x0 prediction
    timesteps: torch.Tensor  # [K]
    weight_version: int  # the generator version that sampled it (the learner's generator step, or up to
    # ray.max_staleness versions behind it)
    seed: int  # the rollout stream's seed
    # the scores of x0 by the rewards the config has rollouts score (`RunConfig.scored_on_rollout`: monitored
    # ones, and in GRPO mode the trained ones), [B] each
    reward_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    # [K, B, C, H, W] x at each step (the network's input): kept for GRPO, whose policy is the sampler's
    # Gaussian steps x_k -> x_{k+1}; None otherwise (it would double what the object store carries)
    x_steps: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """The batch with its tensors on `device` (rollout actors hand the object store CPU tensors;
        the learner moves them to its own device)."""
        return replace(self, cond=self.cond.to(device), x0=self.x0.to(device), x0_steps=self.x0_steps.to(device),
                       timesteps=self.timesteps.to(device),
                       reward_scores={name: scores.to(device) for name, scores in self.reward_scores.items()},
                       x_steps=None if self.x_steps is None else self.x_steps.to(device))

    @property
    def trajectory(self) -> Trajectory:
        return Trajectory(self.x0, self.timesteps, self.x_steps, self.x0_steps)


def policy_trains_on(cfg: RunConfig, iteration: int, train_step: int) -> bool:
    """Whether GRPO's term trains on the batch of `iteration`, which the generator update of `train_step`
    consumes: a generator-update batch after the cold start (before it, the batch needs no trained reward's
    scores and no per-step inputs)."""
    schedule = UpdateSchedule(cfg.dmd.ratio, cfg.trainer.cold_start)
    return (cfg.rl.policy_gradient and schedule.generator_updates(iteration)
            and schedule.reward_active(train_step))


def rewards_to_score(cfg: RunConfig, rewards: Sequence[dmdr.WeightedReward], iteration: int,
                     train_step: int) -> list[dmdr.WeightedReward]:
    """The rewards the rollout of `iteration` (trained at generator step `train_step`) scores, among those
    `cfg.scored_on_rollout` selects: only on the batches a generator update trains on (the others update the
    critic alone, which uses no score), monitored ones for the logs, and GRPO's trained ones only once its
    term trains (not through the cold start)."""
    if not UpdateSchedule(cfg.dmd.ratio, cfg.trainer.cold_start).generator_updates(iteration):
        return []
    policy = policy_trains_on(cfg, iteration, train_step)
    return [reward for reward in rewards if cfg.scored_on_rollout(reward.spec) and (reward.spec.monitor or policy)]


def make_rollout(
    backbone: Backbone, prompts: list[str], student: StudentSection, run_seed: int, iteration: int, weight_version: int,
    rank: int = 0, scored: Sequence[dmdr.WeightedReward] = (), keep_inputs: bool = False,
    micro_batch_size: int | None = None,
) -> RolloutBatch:
    """Step 1 of DESIGN section 2 (backward simulation) for one batch of prompts (rank: which
    data-parallel learner's shard it is); `scored` rewards score the samples without gradients (for the
    logs, and GRPO's advantages); `keep_inputs`: also keep each step's x (GRPO's trajectory);
    `micro_batch_size` (trainer.micro_batch_size): the networks, the decode and the scoring see the batch in
    slices of this size (the samples and scores do not depend on it)."""
    seed = iteration_seed(run_seed, iteration, ROLLOUT_STREAM, rank)
    cond = backbone.encode(prompts)
    trajectory = dmdr.backward_simulation(backbone, cond, student, torch.Generator().manual_seed(seed), micro_batch_size)
    scores = {}
    if scored:  # (a decoded batch of a large model at 1024 px holds tens of GB of the VAE's activations at once)
        parts = dmdr.micro_batches(len(prompts), micro_batch_size)
        sliced: dict[str, list[torch.Tensor]] = {reward.spec.key: [] for reward in scored}
        with torch.no_grad():
            for part in parts:
                images = backbone.decode(trajectory.x0[part])
                for reward in scored:
                    sliced[reward.spec.key].append(reward.score(images, prompts[part]).detach())
        scores = {key: torch.cat(values) for key, values in sliced.items()}
    return RolloutBatch(iteration, rank, list(prompts), cond, trajectory.x0, trajectory.x0_steps, trajectory.timesteps,
                        weight_version, seed, scores, trajectory.inputs if keep_inputs else None)
