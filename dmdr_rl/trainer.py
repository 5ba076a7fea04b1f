"""The single-process DMDR trainer (`trainer.backend=local`): no Ray, the same step functions as
the distributed learner (`dmdr_rl.dmdr`), plus optimizers, logging, sample grids and checkpoints.

    python -m dmdr_rl.run --preset toy-dmdr trainer.backend=local
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import dmdr
from .algo import UpdateSchedule
from .config import ConfigError, RunConfig
from .grid import save_grid
from .registry import BACKBONES, REWARDS
from .toy.grammar import PromptSplit, prompts_of

GRID_PROMPTS = 16


class PromptSource:
    """Prompt batches by iteration number: the same run and iteration always get the same batch, so a
    resumed run continues the exact sequence without a separate cursor."""

    def __init__(self, spec: str, seed: int):
        kind, _, name = spec.partition(":")
        if kind != "toy":
            raise ConfigError(f"data.prompts {spec!r}: only toy:<split> sources exist so far (toy:held-in, toy:held-out)")
        self.split = PromptSplit(name)
        self.seed = seed

    def batch(self, iteration: int, size: int) -> list[str]:
        return prompts_of(self.split.sample(size, seed=self.seed * 1_000_003 + iteration))


class MetricsLog:
    """Per-step metrics to a JSONL file and, when available, TensorBoard."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.file = (directory / "metrics.jsonl").open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(directory / "tensorboard"))
        except ImportError:  # tensorboard is an optional extra
            self.tensorboard = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class LocalTrainer:
    def __init__(self, cfg: RunConfig, backbone=None, rewards: Sequence[dmdr.WeightedReward] | None = None):
        self.cfg = cfg
        self.out = cfg.output_dir
        self.backbone = backbone or BACKBONES.build(cfg.model.backbone, path=cfg.model.path, resolution=cfg.model.resolution)
        dmdr.add_adapters(self.backbone, cfg.student, cfg.critic)
        self.rewards = list(rewards) if rewards is not None else [
            dmdr.WeightedReward(REWARDS.build(spec.name, **spec.kwargs), spec) for spec in cfg.rewards
        ]
        self.schedule = UpdateSchedule(cfg.dmd.ratio, cfg.trainer.cold_start)
        self.prompts = PromptSource(cfg.data.prompts, cfg.trainer.seed)
        self.rng = torch.Generator().manual_seed(cfg.trainer.seed)
        self.opt_generator = torch.optim.AdamW(self.backbone.trainable_parameters(dmdr.GENERATOR), lr=cfg.trainer.lr_generator)
        self.opt_critic = torch.optim.AdamW(self.backbone.trainable_parameters(dmdr.CRITIC), lr=cfg.trainer.lr_critic)
        self.iteration = 0
        self.generator_step = 0
        self.grid_prompts = self.prompts.batch(-1, GRID_PROMPTS)

    # -- one iteration ------------------------------------------------------------------------
    def train_iteration(self) -> dict[str, float] | None:
        """Critic update every iteration; generator update every `ratio`-th. Returns the generator's
        metrics on the iterations that update it, else None."""
        cfg = self.cfg
        prompts = self.prompts.batch(self.iteration, cfg.trainer.batch_size)
        cond = self.backbone.encode(prompts)
        started = time.perf_counter()
        trajectory = dmdr.backward_simulation(self.backbone, cond, cfg.student, self.rng)
        simulated = time.perf_counter()

        critic_loss = dmdr.critic_loss(self.backbone, trajectory.x0, cond, self.generator_step, cfg.critic, cfg.dmd, self.rng)
        self._update(self.opt_critic, critic_loss)
        critic_done = time.perf_counter()

        metrics = None
        if self.schedule.generator_updates(self.iteration):
            loss, metrics = dmdr.generator_loss(
                self.backbone, trajectory, cond, prompts, self.generator_step, cfg.student, cfg.critic, cfg.dmd,
                self.rewards, self.schedule.reward_active(self.generator_step), self.rng,
            )
            self._update(self.opt_generator, loss)
            self.generator_step += 1
            metrics.update({
                "loss/critic": critic_loss.item(),
                "time/simulation_s": simulated - started,
                "time/critic_s": critic_done - simulated,
                "time/generator_s": time.perf_counter() - critic_done,
                "stage/reward_active": float(self.schedule.reward_active(self.generator_step - 1)),
            })
        self.iteration += 1
        return metrics

    def _update(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.trainer.grad_clip)
        optimizer.step()

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        log = MetricsLog(self.out)
        bar = tqdm(total=cfg.trainer.max_steps, initial=self.generator_step, desc=f"train {cfg.name}", dynamic_ncols=True)
        try:
            while self.generator_step < cfg.trainer.max_steps:
                metrics = self.train_iteration()
                if metrics is None:
                    continue
                bar.update(1)
                step = self.generator_step
                if step % cfg.output.log_every == 0 or step == cfg.trainer.max_steps:
                    log.write(step, metrics)
                    bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items() if k.startswith("loss/")})
                if step % cfg.output.sample_every == 0 or step == cfg.trainer.max_steps:
                    self.save_samples()
                if step % cfg.output.checkpoint_every == 0 or step == cfg.trainer.max_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            log.close()
        return {"output_dir": str(self.out), "generator_steps": self.generator_step, "iterations": self.iteration}

    def sample(self, prompts: Sequence[str], seed: int) -> torch.Tensor:
        """Student images in [0, 1]: K steps of the generator adapter, no guidance."""
        student = self.cfg.student
        return self.backbone.sample(prompts, steps=student.steps, cfg=1.0, seed=seed, shift=student.shift,
                                    adapter=dmdr.GENERATOR, mode=student.sampler)

    def save_samples(self) -> Path:
        images = self.sample(self.grid_prompts, seed=0)
        return save_grid(images, self.grid_prompts, self.out / "samples" / f"step_{self.generator_step:06d}.png")

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        directory = self.out / "checkpoints" / f"step_{self.generator_step:06d}"
        directory.mkdir(parents=True, exist_ok=True)
        for adapter in (dmdr.GENERATOR, dmdr.CRITIC):
            save_file(self._adapter_state(adapter), str(directory / f"{adapter}.safetensors"))
        torch.save({
            "iteration": self.iteration,
            "generator_step": self.generator_step,
            "rng": self.rng.get_state(),
            "opt_generator": self.opt_generator.state_dict(),
            "opt_critic": self.opt_critic.state_dict(),
        }, directory / "trainer_state.pt")
        (self.out / "checkpoints" / "latest").write_text(directory.name + "\n")
        return directory

    def load_checkpoint(self, directory: str | Path) -> None:
        directory = Path(directory)
        if (directory / "latest").exists():
            directory = directory / (directory / "latest").read_text().strip()
        if not (directory / "trainer_state.pt").exists():
            raise FileNotFoundError(f"no trainer checkpoint in {directory} (expected trainer_state.pt)")
        for adapter in (dmdr.GENERATOR, dmdr.CRITIC):
            saved = load_file(str(directory / f"{adapter}.safetensors"))
            params = dict(self.backbone.named_trainable_parameters(adapter))
            if set(saved) != set(params):
                raise ValueError(f"checkpoint {directory} does not match this model's {adapter} adapter")
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)
        state = torch.load(directory / "trainer_state.pt", weights_only=True)
        self.iteration, self.generator_step = int(state["iteration"]), int(state["generator_step"])
        self.rng.set_state(state["rng"])
        self.opt_generator.load_state_dict(state["opt_generator"])
        self.opt_critic.load_state_dict(state["opt_critic"])

    def _adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous() for n, p in self.backbone.named_trainable_parameters(adapter)}
