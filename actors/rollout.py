"""The rollout worker: a generator replica plus the frozen prompt encoders, making `RolloutBatch`es
(and scoring the batches a generator update trains on, without gradients, with the rewards
`RunConfig.scored_on_rollout` selects: the `monitor: true` ones, and in GRPO mode the trained ones, whose
scores give the learner its advantages).

It is a plain class (tested without Ray); the runtime starts it as a Ray actor with
`ray.remote(RolloutWorker)`. It never trains: it loads the learner's generator weights by version and
samples with them, so a restarted worker only needs the latest published weights to be useful again.

The model stack (torch, peft, the backbones) is imported by the worker itself, not with this module: the
rollout coordinator imports the class to start the workers and needs none of it (about 5 s of imports
and 0.8 GB less in that process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from dmdr_rl.conditioning import Conditioning
    from dmdr_rl.rollout import RolloutBatch


class RolloutWorker:
    def __init__(self, cfg: dict, threads: int | None = None):
        import torch

        from dmdr_rl import dmdr
        from dmdr_rl.config import RunConfig
        from dmdr_rl.registry import build_backbone
        from reward_servers import reward_model

        if threads:
            torch.set_num_threads(threads)
        self.cfg = RunConfig.model_validate(cfg)
        model = self.cfg.model
        # Ray gives an actor with num_gpus > 0 its GPU(s) as CUDA_VISIBLE_DEVICES, so "cuda" is its own GPU
        device = "cuda" if self.cfg.ray.rollout_gpus > 0 else "cpu"
        self.backbone = build_backbone(model, precision=self.cfg.trainer.precision, device=device)
        dmdr.add_generator(self.backbone, self.cfg.student)
        self.rewards = [dmdr.WeightedReward(reward_model(spec, f"rewards.{i}"), spec)
                        for i, spec in enumerate(self.cfg.rewards) if self.cfg.scored_on_rollout(spec)]
        self.weight_version, self.epoch = -1, 0  # nothing loaded yet: the learner publishes version 0 first

    def load_weights(self, version: int, state: dict[str, torch.Tensor], epoch: int = 0) -> int:
        """Hold the generator weights of (epoch, version); the epoch changes when a restarted learner
        rolls the run back to a checkpoint, so an older version of a newer epoch still replaces them."""
        from dmdr_rl import dmdr
        from dmdr_rl.learning import load_adapter_state

        load_adapter_state(self.backbone, dmdr.GENERATOR, state)
        self.weight_version, self.epoch = version, epoch
        return version

    def rollout(self, iteration: int, prompts: list[str], rank: int = 0, version: int | None = None,
                weights: list | None = None, epoch: int = 0, train_step: int | None = None) -> RolloutBatch:
        """Sample the batch; `weights` = [ObjectRef of the generator weights of (epoch, version)] is
        fetched only when this worker holds other weights (so a restarted worker catches up by itself);
        `train_step`: the generator step that will train on it (default: the weights' version)."""
        from dmdr_rl.rollout import make_rollout, policy_trains_on, rewards_to_score

        if version is not None and (epoch, version) != (self.epoch, self.weight_version):
            import ray

            self.load_weights(version, ray.get(weights[0]), epoch)
        if self.weight_version < 0:
            raise RuntimeError("rollout before any generator weights were loaded")
        step = self.weight_version if train_step is None else train_step
        batch = make_rollout(self.backbone, prompts, self.cfg.student, self.cfg.trainer.seed, iteration,
                             self.weight_version, rank, rewards_to_score(self.cfg, self.rewards, iteration, step),
                             keep_inputs=policy_trains_on(self.cfg, iteration, step),
                             micro_batch_size=self.cfg.trainer.micro_batch_size)
        return batch.to("cpu")  # the object store carries host memory; the learner moves it to its device

    def ready(self) -> bool:
        """Answers once the constructor is done (model, encoders and rewards loaded): the coordinator sends
        batches to workers that have answered, not to one still pending placement or loading."""
        return True

    def null_conditioning(self) -> Conditioning:
        """The empty prompt's conditioning, for a learner that holds no encoders (CFG of the real score)."""
        return self.backbone.null(1).to("cpu")

    def encode(self, prompts: list[str]) -> Conditioning:
        return self.backbone.encode(prompts).to("cpu")
