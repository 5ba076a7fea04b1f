"""The learner side of a DMDR iteration: critic and generator updates over `RolloutBatch`es.

`DMDRLearner` owns the adapters' optimizers, the two time-scale schedule and the step counters, and
calls the step functions of `dmdr_rl.dmdr` (the only copy of the math). The local trainer feeds it
batches made in-process; the Ray learner feeds it batches from rollout actors and passes a
`reduce_gradients` hook that averages gradients across data-parallel workers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import dmdr
from .algo import UpdateSchedule, finite_mean
from .backbone import TrainableBackbone
from .config import RunConfig
from .rollout import RolloutBatch
from .seeds import LEARNER_STREAM, iteration_seed

GradientHook = Callable[[list[torch.nn.Parameter]], None]
ADAPTERS = (dmdr.GENERATOR, dmdr.CRITIC)


class DMDRLearner:
    def __init__(self, backbone: TrainableBackbone, cfg: RunConfig, rewards: Sequence[dmdr.WeightedReward],
                 reduce_gradients: GradientHook | None = None, rank: int = 0):
        self.backbone = backbone
        self.cfg = cfg
        self.rewards = list(rewards)
        with torch.random.fork_rng(devices=[]):  # the same initial adapters in every process of a run
            torch.manual_seed(cfg.trainer.seed)
            dmdr.add_adapters(backbone, cfg.student, cfg.critic)
        optimizer = optimizer_class(cfg.trainer.optimizer)
        t = cfg.trainer
        self.opt_generator = optimizer(backbone.trainable_parameters(dmdr.GENERATOR), lr=t.lr_generator,
                                       weight_decay=t.weight_decay_generator)
        self.opt_critic = optimizer(backbone.trainable_parameters(dmdr.CRITIC), lr=t.lr_critic,
                                    weight_decay=t.weight_decay_critic)
        self.schedule = UpdateSchedule(cfg.dmd.ratio, cfg.trainer.cold_start)
        self.reduce_gradients = reduce_gradients
        self.rank = rank
        self.iteration = 0
        self.generator_step = 0
        self._critic_times: list[dmdr.Elapsed] = []
        self.skipped_updates = 0  # optimizer steps left out because the gradient was not finite

    def step(self, batch: RolloutBatch) -> dict[str, float] | None:
        """Critic update on every batch; generator update every `ratio`-th. Returns the metrics on the
        batches that update the generator, else None. Batches must come in iteration order."""
        if batch.iteration != self.iteration:
            raise ValueError(f"the learner is at iteration {self.iteration} but got the batch of iteration {batch.iteration}")
        cfg, backbone = self.cfg, self.backbone
        if batch.rank != self.rank:
            raise ValueError(f"learner rank {self.rank} got the shard of rank {batch.rank}")
        batch = batch.to(backbone.device)
        rng = torch.Generator().manual_seed(iteration_seed(cfg.trainer.seed, batch.iteration, LEARNER_STREAM, self.rank))
        self._set_stage_learning_rates()
        started = dmdr.mark(backbone.device)
        micro = cfg.trainer.micro_batch_size
        self.opt_critic.zero_grad(set_to_none=True)
        samples = dmdr.critic_samples(batch.trajectory, cfg.student.sampler, cfg.critic.samples, rng)
        critic_loss = dmdr.critic_loss(backbone, samples, batch.cond, self.generator_step, cfg.critic, cfg.dmd, rng,
                                       micro_batch_size=micro, backward=torch.Tensor.backward)
        self._step(self.opt_critic)
        critic_done = dmdr.mark(backbone.device)
        self._critic_times.append(dmdr.Elapsed(started, critic_done))

        metrics = None
        if self.schedule.generator_updates(self.iteration):
            reward_active = self.schedule.reward_active(self.generator_step)
            self.opt_generator.zero_grad(set_to_none=True)
            _, metrics = dmdr.generator_loss(
                backbone, batch.trajectory, batch.cond, batch.prompts, self.generator_step, cfg.student, cfg.critic,
                cfg.dmd, self.rewards, reward_active, rng, micro_batch_size=micro, backward=torch.Tensor.backward,
                rl=cfg.rl, rollout_scores=batch.reward_scores,
            )
            self._step(self.opt_generator)
            generator_time = dmdr.Elapsed(critic_done, dmdr.mark(backbone.device))
            metrics = {name: float(value) for name, value in metrics.items()}
            reward_seconds = sum(v for k, v in metrics.items() if k.startswith("time/reward/"))
            metrics.update({
                "loss/critic": critic_loss.item(),
                "time/critic_s": sum(map(float, self._critic_times)),  # all critic updates since the last generator update
                # the generator update without the reward calls (time/reward/<name>_s: scoring, and for a
                # served reward also its gradient; an in-process reward's backward stays in here)
                "time/generator_s": float(generator_time) - reward_seconds,
                "stage/reward_active": float(reward_active),
                "schedule/lr_generator": self.opt_generator.param_groups[0]["lr"],
                "schedule/lr_critic": self.opt_critic.param_groups[0]["lr"],
                "rollout/staleness": float(self.generator_step - batch.weight_version),
                "train/skipped_updates": float(self.skipped_updates),  # so far, critic and generator together
            })
            for name, scores in batch.reward_scores.items():  # (the count weights each rank's mean in the batch's)
                metrics[f"rollout/reward/{name}"] = float(finite_mean(scores))
                metrics[f"rollout/reward/{name}/non_finite"] = float((~torch.isfinite(scores)).sum())
            self.generator_step += 1
            self._critic_times = []
        self.iteration += 1
        return metrics

    def learning_rates(self) -> tuple[float, float]:
        """(generator, critic) learning rates of the current stage: cold start, or DMD + reward."""
        t = self.cfg.trainer
        if self.schedule.reward_active(self.generator_step):
            return t.lr_generator_rl or t.lr_generator, t.lr_critic_rl or t.lr_critic
        return t.lr_generator, t.lr_critic

    def _set_stage_learning_rates(self) -> None:
        for optimizer, lr in zip((self.opt_generator, self.opt_critic), self.learning_rates()):
            for group in optimizer.param_groups:
                group["lr"] = lr

    def _step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step on the gradients the loss functions accumulated (over micro-batches, and
        averaged over data-parallel ranks): clipped, or skipped when not finite."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.reduce_gradients is not None:
            self.reduce_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.trainer.grad_clip)
        if not torch.isfinite(norm):  # clipping cannot rescue inf/NaN (0 * inf): one step skipped, not weights lost
            self.skipped_updates += 1
            optimizer.zero_grad(set_to_none=True)
            return
        optimizer.step()

    # -- state --------------------------------------------------------------------------------
    def adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        """An adapter's trainable weights by stable name, as CPU copies (safetensors-ready; what rollout
        actors load, whatever device either side trains or samples on)."""
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.backbone.named_trainable_parameters(adapter)}

    def load_adapter_state(self, adapter: str, state: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.backbone, adapter, state)

    def published_state(self, adapter: str) -> dict[str, torch.Tensor]:
        """`adapter_state` as rollout actors need it: in the precision the adapter computes in
        (`adapter_compute_dtype`, where the backbone has one), which samples exactly as the float32 weights do.
        A bf16 base's LoRA goes out in half the bytes (FLUX.1-dev's r64 generator, 104.6M parameters: 209 MB a
        generator step instead of 418; SD3-Medium's 75 instead of 150); checkpoints keep float32."""
        state = self.adapter_state(adapter)
        compute = getattr(self.backbone, "adapter_compute_dtype", None)
        dtype = compute(adapter) if compute is not None else None
        return state if dtype is None else {name: value.to(dtype) for name, value in state.items()}

    def training_state(self) -> dict:
        """Everything but the weights: optimizers and counters (torch.save-able, weights_only-loadable)."""
        return {"iteration": self.iteration, "generator_step": self.generator_step, "skipped_updates": self.skipped_updates,
                "opt_generator": self.opt_generator.state_dict(), "opt_critic": self.opt_critic.state_dict()}

    def load_training_state(self, state: dict) -> None:
        self.iteration, self.generator_step = int(state["iteration"]), int(state["generator_step"])
        self.skipped_updates = int(state.get("skipped_updates", 0))  # (absent from older checkpoints)
        self.opt_generator.load_state_dict(state["opt_generator"])
        self.opt_critic.load_state_dict(state["opt_critic"])
        t = self.cfg.trainer  # (a state dict brings its own hyperparameters: the config's weight decay holds)
        for optimizer, decay in ((self.opt_generator, t.weight_decay_generator), (self.opt_critic, t.weight_decay_critic)):
            for group in optimizer.param_groups:
                group["weight_decay"] = decay


def probe_rewards(rewards: Sequence[dmdr.WeightedReward], backbone, prompts: Sequence[str], refl: bool) -> None:
    """Each reward scores two decoded samples once before training, with the gradient where ReFL trains on it
    (`refl`), so a reward that cannot score (a wrong answer, a model that raises, an app that does not answer)
    stops the run at its start rather than when the cold start ends, thousands of steps later. The samples
    decode seeded noise (the run's random streams are untouched); their scores mean nothing and are not kept.
    The model's own failures (it raised, in process or in its app, or answered other than one float per image)
    carry `ends_the_run`: every try would meet them again, so a Ray run ends at the first (a served app that did not
    answer, or whose device ran out of memory, may not)."""
    from reward_servers.protocol import RewardInputError, RewardModelError, RewardScoreError, RewardServerError

    prompts = list(prompts)[:2]
    if not rewards or not prompts:
        return
    noise = torch.randn((len(prompts), *backbone.sample_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = backbone.decode(noise.to(backbone.device))
    for i, reward in enumerate(rewards):
        pixels = images.detach().requires_grad_(refl and reward.spec.weight > 0)
        try:
            scores = reward.score(pixels, prompts)
            if pixels.requires_grad:
                scores.sum().backward()
        except (RewardInputError, RewardServerError, RewardScoreError) as err:
            named = type(err)(f"rewards.{i} ({reward.spec.key}), scoring two samples before training: {err}")
            named.ends_the_run = isinstance(err, (RewardInputError, RewardModelError, RewardScoreError))
            raise named from (err if isinstance(err, RewardScoreError) else None)


def load_adapter_state(backbone, adapter: str, state: dict[str, torch.Tensor]) -> None:
    """Copy saved weights into an adapter; the names must match exactly (same model, same adapter config)."""
    params = dict(backbone.named_trainable_parameters(adapter))
    if set(state) != set(params):
        missing, unexpected = sorted(set(params) - set(state))[:3], sorted(set(state) - set(params))[:3]
        raise ValueError(f"saved {adapter} weights do not match this model's {adapter} adapter "
                         f"(missing e.g. {missing}, unexpected e.g. {unexpected})")
    wrong = [f"{n}: saved {tuple(v.shape)}, here {tuple(params[n].shape)}" for n, v in state.items()
             if v.shape != params[n].shape]
    if wrong:
        raise ValueError(f"saved {adapter} weights have other shapes than this model's {adapter} adapter (e.g. "
                         f"{'; '.join(wrong[:2])}): another LoRA rank or model size")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def optimizer_class(name: str):
    """`trainer.optimizer`: torch's AdamW, or bitsandbytes' 8-bit AdamW (optimizer state in 8 bits)."""
    if name == "adamw":
        return torch.optim.AdamW
    try:
        import bitsandbytes
    except ImportError as err:  # a config this machine cannot run: the run stops with the message, no traceback
        from .config import ConfigError

        raise ConfigError("trainer.optimizer=adamw8bit needs bitsandbytes (`pip install bitsandbytes`, on a CUDA "
                          "machine); or set trainer.optimizer=adamw") from err
    return bitsandbytes.optim.AdamW8bit
