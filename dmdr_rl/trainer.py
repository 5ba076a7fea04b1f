"""The single-process DMDR trainer (`trainer.backend=local`): no Ray, the same step functions as
the distributed learner (`dmdr_rl.dmdr`), plus optimizers, logging, sample grids and checkpoints.

    python -m dmdr_rl.run --preset toy-dmdr trainer.backend=local
"""

from __future__ import annotations

import contextlib
import math
import re
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import dmdr
from .algo import finite_mean
from .config import ConfigError, RunConfig, StudentSection, load_config
from .evaluation import TrainingEvaluation
from .grid import save_grid
from .learning import ADAPTERS, DMDRLearner, load_adapter_state, probe_rewards
from .prompts import checked_prompt_source
from .registry import build_backbone, resolve_device
from .rollout import RolloutBatch, make_rollout, policy_trains_on, rewards_to_score
from .seeds import image_seeds
from .samples import write_samples
from .store import (EARLIER_RUNS, RunLock, directory_written_whole, open_store, readable_as_umask_allows, run_events,
                    set_aside_earlier_run, write_text_whole)
from .tracking import add_png_image, open_wandb_run, require_trackers

GRID_PROMPTS = 16
GRID_SEEDS = image_seeds(0, GRID_PROMPTS)  # one per grid image: the same images at every step but for the weights


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class MetricsLog:
    """Per-step metrics to the run store (`metrics.jsonl` or Redis), when available TensorBoard, and with
    `output.wandb` (`cfg` given) a Weights & Biases run."""

    def __init__(self, directory: Path, store, cfg: RunConfig | None = None):
        self.store = store  # (owned from here on: closed by close(), or at once if this fails)
        self.warned: set[str] = set()  # rewards warned of as training nothing
        self.tensorboard = self.wandb = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(directory / "tensorboard"))
            except ImportError:  # tensorboard is an optional extra
                pass
            if cfg is not None:
                self.wandb = open_wandb_run(cfg, directory)
        except BaseException:
            self.close()  # (the store with the run's lock, which would otherwise hold the run directory)
            raise

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._warn_of_rewards_that_trained_nothing(step, metrics)
        self.store.append("metrics", {"step": step, **metrics})
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:  # (a step below one it already has, after a learner's rewind, W&B drops)
            self.wandb.log(metrics, step=step)

    def _warn_of_rewards_that_trained_nothing(self, step: int, metrics: dict[str, float]) -> None:
        """Once per reward: a step at which none of its scores (or, served, gradients) was finite. Those samples are
        dropped from the reward term by design, and counted; all of them is a bug in the model, which would
        otherwise train on DMD alone without a word."""
        for key, count in metrics.items():
            name = key.removeprefix("reward/").removesuffix("/non_finite")
            if (key.startswith("reward/") and key.endswith("/non_finite") and count and name not in self.warned
                    and not _finite_number(metrics.get(f"reward/{name}"))):
                self.warned.add(name)
                tqdm.write(f"dmdr_rl: WARNING: at generator step {step} not one of the {count:g} scores of reward "
                           f"'{name}' was finite (with a finite gradient), so the reward trained nothing at that step: "
                           f"check its score() and its gradient (reward/{name}/non_finite "
                           "counts them at every logged step; this warning is not repeated)", file=sys.stderr)

    def write_samples(self, step: int, samples: StepSamples) -> None:
        """The step's sample grid and its mean reward scores to TensorBoard and W&B (`samples/grid`,
        `samples/reward/<reward>`); the run directory has them already (samples/step_N.png and .parquet)."""
        scalars = {f"samples/reward/{key}": value for key, value in samples.scores.items()}
        if self.tensorboard is not None:
            add_png_image(self.tensorboard, "samples/grid", samples.grid, step)
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples/grid": wandb.Image(str(samples.grid), caption=f"generator step {step}"),
                            **scalars}, step=step)

    def close(self, failed: bool = False) -> None:
        """`failed`: the run ended with an error (W&B marks it so). The store closes last, whatever happens
        before: it releases the run directory's lock, which must outlive what still writes there."""
        try:
            if self.wandb is not None:
                self.wandb.finish(exit_code=1 if failed else 0)
            if self.tensorboard is not None:
                self.tensorboard.close()
        finally:
            self.store.close()


class StepDuties(NamedTuple):
    """What a generator step does besides training (the local trainer and every Ray learner rank alike)."""

    log: bool
    sample: bool
    checkpoint: bool
    evaluate: bool  # (its val/... metrics are logged with the step's: log is true then too)

    @property
    def shows_metrics(self) -> bool:
        """The metrics leave the learner (the log, or a checkpoint's Ray Train report): averaged over the
        ranks first, so that neither shows rank 0's shard alone."""
        return self.log or self.checkpoint


def step_duties(step: int, cfg: RunConfig) -> StepDuties:
    last = step == cfg.trainer.max_steps
    evaluate = cfg.output.eval_every is not None and (step % cfg.output.eval_every == 0 or last)
    return StepDuties(log=step % cfg.output.log_every == 0 or last or evaluate,
                      sample=step % cfg.output.sample_every == 0 or last,
                      checkpoint=step % cfg.output.checkpoint_every == 0 or last, evaluate=evaluate)


def loss_postfix(metrics: dict[str, float]) -> dict[str, str]:
    """The losses for a progress bar, each named as a loss (L_toy-align: the reward's loss term, whose sign and
    shaping differ from the reward itself, which the run's last line reports)."""
    return {"L_" + key.split("/")[-1]: f"{value:.3g}" for key, value in metrics.items() if key.startswith("loss/")}


class StopAtStepEnd:
    """Ctrl-C while a run trains: the generator step under way finishes, a checkpoint is written, and the run
    stops (its events say "stopped"), so nothing trained is lost and a resume continues from there; a second
    Ctrl-C stops at once. Only the main thread takes signals: in another thread (a
    caller's) the handlers stay as they are."""

    # Ctrl-C only: SIGTERM comes from `ray job stop` or Kubernetes, which kill the process a few seconds later,
    # often before a large model's step and checkpoint are done; it stops at once, its events and store flushed
    SIGNALS = (signal.SIGINT,)

    def __init__(self, on_request=None):
        """`on_request`: called at the first signal (the Ray runtime passes the request on to its learners);
        when it returns False, no step is under way to wait for (the run is still starting): it stops at once."""
        self.requested = False
        self.on_request = on_request
        self._previous: dict = {}

    def __enter__(self) -> "StopAtStepEnd":
        if threading.current_thread() is threading.main_thread():  # (a signal the process ignores stays ignored:
            self._previous = {number: signal.signal(number, self._request) for number in self.SIGNALS  # nohup, &)
                              if signal.getsignal(number) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _request(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.on_request is not None and self.on_request() is False:
            raise KeyboardInterrupt
        tqdm.write("dmdr_rl: stopping at the end of this generator step, with a checkpoint (again: at once)",
                   file=sys.stderr)

    def finished_anyway(self) -> None:
        """Asked to stop during the last step: the run has finished, and says so (what follows goes on)."""
        if self.requested:
            tqdm.write("dmdr_rl: the stop came in the last generator step: the run has finished (Ctrl-C stops what "
                       "follows, e.g. its evaluation)", file=sys.stderr)


class LocalTrainer:
    """Rollouts made in-process by `make_rollout`, consumed by a `DMDRLearner`; the Ray runtime swaps
    the first for rollout actors and wraps the second in Ray Train, nothing else."""

    def __init__(self, cfg: RunConfig, backbone=None, rewards: Sequence[dmdr.WeightedReward] | None = None):
        self.cfg = cfg
        self.out = cfg.output_dir
        self.prompts = checked_prompt_source(cfg)  # first: a bad prompt file fails at once
        require_trackers(cfg)  # (and a tracker this machine cannot log to, before the models load)
        self.resume = resume_checkpoint(cfg.trainer.resume_from) if cfg.trainer.resume_from else None
        self.backbone = backbone or build_backbone(cfg.model, precision=cfg.trainer.precision,
                                                   device=resolve_device(cfg.trainer.device))
        rewards = list(rewards) if rewards is not None else build_rewards(cfg)
        self.learner = DMDRLearner(self.backbone, cfg, rewards)
        self.grid_prompts = self.prompts.batch(-1, GRID_PROMPTS)
        self.evaluation = (TrainingEvaluation(cfg.output.eval_images, self.backbone.encode)
                           if cfg.output.eval_every is not None else None)
        self._rollout_times: list[dmdr.Elapsed] = []

    @property
    def iteration(self) -> int:
        return self.learner.iteration

    @property
    def generator_step(self) -> int:
        return self.learner.generator_step

    # -- one iteration ------------------------------------------------------------------------
    def train_iteration(self) -> dict[str, float] | None:
        """One rollout batch, one critic update, and a generator update on every `ratio`-th iteration
        (then its metrics are returned, else None)."""
        cfg = self.cfg
        started = dmdr.mark(self.backbone.device)  # device time, read after the step (no host sync here)
        prompts = self.prompts.batch(self.iteration, cfg.trainer.rollout_batch_size(self.generator_step), cfg.prompt_group)
        batch = make_rollout(self.backbone, prompts, cfg.student, cfg.trainer.seed, self.iteration, self.generator_step,
                             scored=rewards_to_score(cfg, self.learner.rewards, self.iteration, self.generator_step),
                             keep_inputs=policy_trains_on(cfg, self.iteration, self.generator_step),
                             micro_batch_size=cfg.trainer.micro_batch_size)
        self._rollout_times.append(dmdr.Elapsed(started, dmdr.mark(self.backbone.device)))
        self.last_batch = batch
        metrics = self.learner.step(batch)
        if metrics is not None:  # rollouts of every iteration since the last generator update
            metrics["time/rollout_s"] = sum(map(float, self._rollout_times))
            self._rollout_times = []
        return metrics

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        if self.resume is not None and self.iteration == 0:
            try:
                self.load_checkpoint(self.resume)
            except ValueError as err:  # another adapter shape or set: the config is not the checkpoint's
                raise ConfigError(f"trainer.resume_from={cfg.trainer.resume_from}: {err}; resume with the config "
                                  "the checkpoint was trained with (its run's config.yaml)") from None
            check_steps_left(cfg, self.generator_step)
            print(resuming_line(self.resume, self.generator_step, cfg.trainer.max_steps), flush=True)
        probe_rewards(self.learner.rewards, self.backbone, self.grid_prompts, refl=not cfg.rl.policy_gradient)
        fresh = self.generator_step == 0 or (self.resume is not None and not continues_in(self.out, self.resume))
        store = open_run_directory(cfg, self.out, fresh=fresh)
        log = MetricsLog(self.out, store, cfg)
        bar = tqdm(total=cfg.trainer.max_steps, initial=self.generator_step, desc=f"train {cfg.name}", dynamic_ncols=True)
        if cfg.model.compile:  # (the first steps' time is mostly torch.compile's)
            bar.set_postfix_str("the first steps compile the transformer's blocks")
        stopping = False
        try:
            with run_events(store, backend="local", generator_step=self.generator_step,
                            max_steps=cfg.trainer.max_steps, output_dir=str(self.out),
                            resume_from=str(self.resume.resolve()) if self.resume is not None else None,
                            ) as ending, StopAtStepEnd() as stop:
                ending["generator_step"] = self.generator_step
                while self.generator_step < cfg.trainer.max_steps:
                    metrics = self.train_iteration()
                    if metrics is None:
                        continue
                    bar.update(1)
                    if cfg.model.compile and bar.postfix and "compile" in bar.postfix:  # (compiled by now, mostly)
                        bar.set_postfix_str("")
                    step = ending["generator_step"] = self.generator_step
                    duties = step_duties(step, cfg)
                    if duties.evaluate:
                        metrics.update(self.evaluation(self.sample_conditioned, step))
                    if duties.log:
                        log.write(step, metrics)
                        bar.set_postfix(loss_postfix(metrics))
                    if duties.sample:
                        log.write_samples(step, self.save_samples())
                        save_rollout_records(self.out, self.backbone, self.last_batch, step)
                    stopping = stop.requested and step < cfg.trainer.max_steps  # (at the last step: it has finished)
                    if duties.checkpoint or stopping:
                        self.save_checkpoint()
                    if stopping:
                        raise KeyboardInterrupt
                stop.finished_anyway()
        finally:
            bar.close()
            # (the exception on its way out, if any; a stop asked for, checkpointed, is no failure, as on Ray)
            log.close(failed=sys.exc_info()[0] is not None and not stopping)
        return {"output_dir": str(self.out), "generator_steps": self.generator_step, "iterations": self.iteration}

    def sample(self, prompts: Sequence[str], seed: int | Sequence[int]) -> torch.Tensor:
        """Student images in [0, 1]: K steps of the generator adapter, no guidance; `seed` one for the
        batch or one per image."""
        return self.sample_conditioned(self.backbone.encode(prompts), seed)

    def sample_conditioned(self, cond, seed: int | Sequence[int]) -> torch.Tensor:
        return student_images(self.backbone, cond, self.cfg.student, seed)

    def save_samples(self) -> StepSamples:
        """The sample grid (PNG) and the same samples as data (Parquet, with every reward's score)."""
        images = self.sample(self.grid_prompts, GRID_SEEDS)
        return save_step_samples(self.out, self.generator_step, images, self.grid_prompts, self.learner.rewards, GRID_SEEDS)

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.learner, self.out / "checkpoints")

    def load_checkpoint(self, directory: str | Path) -> None:
        load_checkpoint(self.learner, directory)


def student_images(backbone, cond, student: StudentSection, seed: int | Sequence[int]) -> torch.Tensor:
    """The student's images for encoded prompts: K steps of the generator adapter, no guidance (what
    the sample grids and the evaluation show, in either trainer)."""
    return backbone.sample_conditioned(cond, student.steps, 1.0, seed=seed, shift=student.shift,
                                       adapter=dmdr.GENERATOR, mode=student.sampler)


class StepSamples(NamedTuple):
    """A training step's sample grid, as the trackers show it: the PNG and each reward's mean score."""

    grid: Path
    scores: dict[str, float]  # reward key -> mean over the grid's images with a finite score (none: left out)


def save_step_samples(out: Path, step: int, images: torch.Tensor, prompts: Sequence[str],
                      rewards: Sequence[dmdr.WeightedReward], seeds: Sequence[int]) -> StepSamples:
    """`samples/step_N.png` (the grid) and `samples/step_N.parquet` (the same samples as data, with each
    reward model's score, no gradient)."""
    with torch.no_grad():
        scores = {reward.spec.key: reward.score(images, prompts) for reward in rewards}
    write_samples(out / "samples" / f"step_{step:06d}.parquet", images, prompts, seeds, step, step, scores, source="grid")
    means = {key: float(finite_mean(values.float())) for key, values in scores.items() if torch.isfinite(values).any()}
    return StepSamples(save_grid(images, prompts, out / "samples" / f"step_{step:06d}.png"), means)


def save_rollout_records(out: Path, backbone, batch: RolloutBatch, step: int) -> Path:
    """`samples/rollout_step_N.parquet`: the rollout batch a generator step trained on (the caller's: on
    several learner ranks, rank 0's share), with the weight
    version that sampled it and the rollout-side reward scores (monitored rewards; in GRPO mode the trained
    ones too)."""
    with torch.no_grad():
        images = backbone.decode(batch.x0.to(backbone.device))  # the batch may still be the object store's CPU copy
    return write_samples(out / "samples" / f"rollout_step_{step:06d}.parquet", images, batch.prompts, batch.seed, step,
                         batch.weight_version, batch.reward_scores, source="rollout")


def continues_in(out: Path, checkpoint: Path) -> bool:
    """Whether resuming from `checkpoint` into `out` continues the run there (its records go on); a
    checkpoint taken into another directory starts that directory's records, and an earlier run found
    there is set aside as for a fresh run. So does one of `out`'s own set-aside runs (`previous/<time>/`):
    the run now in `out` is another, whose records must not go on with the resumed one's."""
    checkpoint, out = Path(checkpoint).resolve(), Path(out).resolve()
    within = (checkpoint, *checkpoint.parents)
    return out in within and out / EARLIER_RUNS not in within


def open_run_directory(cfg: RunConfig, out: Path, fresh: bool):
    """The run's directory, config and store, as every trainer starts them: a fresh (not resumed) run first
    sets an earlier run's files aside and must not mix its records with another run's in the store. A run
    refused here leaves behind no run directory it made (one holding only its lock file; its parents stay)."""
    made = not out.exists()
    store = open_store(cfg.store.url, out, cfg.name)  # (a Redis that does not answer stops it before `out` is made)
    try:
        store.run_lock = RunLock(out)  # (released by store.close()) one training run in a directory at a time
    except BaseException:
        store.close()
        raise
    try:
        if fresh:
            store.require_new()  # refused before anything of the earlier run is moved
            set_aside_earlier_run(out)
        write_run_config(cfg, out)
    except BaseException:
        if made:  # (while the lock is held: a run waiting for it would otherwise get a directory deleted under it)
            with contextlib.suppress(OSError):
                if {path.name for path in out.iterdir()} <= {RunLock.NAME}:
                    (out / RunLock.NAME).unlink(missing_ok=True)
                    out.rmdir()
        store.close()
        raise
    return store


def write_run_config(cfg: RunConfig, out: Path) -> None:
    """The resolved config beside the outputs: what `eval --model student --run DIR` rebuilds from."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_whole(out / "config.yaml", yaml.safe_dump(run_config_dump(cfg), sort_keys=False))


def run_config_dump(cfg: RunConfig) -> dict:
    """The config as a run directory keeps it: a store password redacted (it stays out of the directory)."""
    from .store import redact_url

    config = cfg.model_dump(mode="json")
    config["store"]["url"] = redact_url(config["store"]["url"])
    return config


def build_rewards(cfg: RunConfig) -> list[dmdr.WeightedReward]:
    """The config's rewards, each in its placement (in-process or a Serve app's client). A reward the
    generator trains on (weight > 0) with ReFL must be differentiable (it needs d score / d image); with
    rl.mode=grpo any reward can train it."""
    from reward_servers import reward_model
    from reward_servers.registry import refl_needs_a_gradient

    rewards = []
    for i, spec in enumerate(cfg.rewards):
        model = reward_model(spec, f"rewards.{i}")
        if spec.weight > 0 and not model.differentiable and not cfg.rl.policy_gradient:
            raise refl_needs_a_gradient(f"rewards.{i}", spec.name)
        rewards.append(dmdr.WeightedReward(model, spec))
    return rewards


def save_checkpoint(learner: DMDRLearner, root: Path) -> Path:
    """`root/step_N/` (see `write_checkpoint`) and `root/latest` naming it."""
    directory = root / f"step_{learner.generator_step:06d}"
    with directory_written_whole(directory) as pending:  # (a resume from an older step in this directory rewrites one)
        write_checkpoint(learner, pending)
    write_text_whole(root / "latest", directory.name + "\n")  # a run killed here still names a whole checkpoint
    return directory


def write_checkpoint(learner: DMDRLearner, directory: Path) -> Path:
    """`{generator,critic}.safetensors` (weights) + `trainer_state.pt` (optimizers, counters) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for adapter in ADAPTERS:
        save_file(learner.adapter_state(adapter), str(directory / f"{adapter}.safetensors"))
    torch.save(learner.training_state(), directory / "trainer_state.pt")
    readable_as_umask_allows(directory)
    return directory


def latest_checkpoint(directory: Path) -> Path:
    """The checkpoint a checkpoints root's `latest` names; any other directory as it is."""
    latest = directory / "latest"
    return directory / latest.read_text().strip() if latest.exists() else directory


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted fields whose values differ between two config dumps, as `field: saved -> current` (lists of one
    length item by item: `rewards.0.margin`, not the whole list)."""
    changes = []
    for key in dict.fromkeys([*saved, *current]):
        a, b, name = saved.get(key), current.get(key), f"{prefix}{key}"
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            a, b = dict(enumerate(a)), dict(enumerate(b))
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, name + ".")
        elif a != b:
            changes.append(f"{name}: {a!r} -> {b!r}")
    return changes


# how a reward is served, not what it computes: the same scores and gradients in or out of a Serve app, at any
# batching (tested), so changing these does not make a run another run (an app's name, attaching to a running
# app and its runtime_env can change the model that scores, so they count)
SERVING_ONLY = re.compile(r"rewards\.\d+\.(placement:|max_images_per_call:|serve\.(replicas|autoscaling|max_batch_size|"
                          r"batch_wait_timeout_s|num_cpus|num_gpus|timeout_s|retries|backoff_s|http_max_pixels|access_log)[.:])")


def changed_settings(cfg: RunConfig, run_dir: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """How `cfg` differs from the config the run in `run_dir` was trained with (none when it kept none),
    leaving out the fields that start with one of `ignore`."""
    saved_file = Path(run_dir) / "config.yaml"
    if not saved_file.exists():
        return []
    # fields added since then get their defaults; rules added since do not stop the comparison
    saved = load_config(saved_file, for_sampling=True).model_dump(mode="json")
    current = run_config_dump(cfg)  # as the run directory keeps it (a store password redacted in both)
    return [c for c in config_changes(saved, current) if not c.startswith(ignore) and not SERVING_ONLY.match(c)]


# where a run may differ from the run it resumes: where it writes and runs, and for how long
RESUME_MAY_CHANGE = ("name:", "output.", "store.", "ray.", "trainer.resume_from:", "trainer.max_steps:",
                     "trainer.device:", "trainer.backend:")


def resume_changes(cfg: RunConfig) -> list[str]:
    """The training settings a resumed run changes from the config its checkpoint was trained with (said
    at start: the run goes on, but it is not the run it continues). Settings that change the adapters'
    shapes cannot load the checkpoint at all: a ConfigError, before any model is built (a Ray run would
    otherwise load the model in every learner restart to fail the same way)."""
    checkpoint = resume_checkpoint(cfg.trainer.resume_from)
    run_dir = run_directory_of(checkpoint)
    changes = changed_settings(cfg, run_dir, RESUME_MAY_CHANGE) if run_dir is not None else []
    shapes = [c for c in changes if c.startswith(ADAPTER_SHAPES)]
    if shapes:
        raise ConfigError(f"trainer.resume_from={cfg.trainer.resume_from}: its checkpoint's adapters have other shapes "
                          f"({'; '.join(shapes)}); resume with the config the checkpoint was trained with (its run's "
                          "config.yaml)")
    return changes


# the settings that decide the shapes of the checkpointed adapters (null: a full copy)
ADAPTER_SHAPES = ("student.lora:", "student.lora.rank:", "student.lora.targets", "critic.lora.rank:",
                  "critic.lora.targets", "model.backbone:")  # (a list's change may be named by item: targets.0)


def resume_checkpoint(resume_from: str | Path) -> Path:
    """trainer.resume_from as the checkpoint to load: a run directory, its checkpoints/ (the latest
    checkpoint) or one checkpoints/step_N/ (a Ray run stopped before its end: its newest Ray Train
    checkpoint); a ConfigError naming the field otherwise."""
    path = Path(resume_from)
    checkpoint = _run_checkpoint(path) if (path / "config.yaml").exists() else latest_checkpoint(path)
    if not (checkpoint / "trainer_state.pt").is_file():
        raise ConfigError(f"trainer.resume_from={resume_from}: no trainer checkpoint there (give a run directory, its "
                          "checkpoints/ or one checkpoints/step_N/ holding trainer_state.pt, or one of a Ray run's "
                          "ray_train/<train run>/checkpoint_<time>/)")
    return checkpoint


def resuming_line(checkpoint: str | Path, generator_step: int, max_steps: int) -> str:
    """What a resumed run says first (either trainer): the checkpoint it continues from and its step."""
    return (f"dmdr_rl: resuming from {Path(checkpoint).resolve()} (generator step {generator_step} of "
            f"trainer.max_steps={max_steps})")


def check_steps_left(cfg: RunConfig, generator_step: int) -> None:
    """A resumed run must have steps left to train (else it would end at once, as if it had trained)."""
    if generator_step >= cfg.trainer.max_steps:
        raise ConfigError(f"trainer.resume_from={cfg.trainer.resume_from} is at generator step {generator_step}, "
                          f"and trainer.max_steps={cfg.trainer.max_steps}: nothing is left to train; raise "
                          "trainer.max_steps to train on")


def how_to_continue(cfg: RunConfig, out: Path, since: float | None = None) -> str:
    """What a run that ended early (stopped, failed) continues from, as a phrase with the command: the newest
    checkpoint in its directory (with `since`, a time.time(): only one this launch wrote, not an earlier run's
    still there), with the config this launch saved beside it; else, for a Ray run with ray.storage_path, where
    to look; else the same command again (it resumes from where this launch did, or starts afresh)."""
    try:
        newest = resume_checkpoint(out)
    except ConfigError:
        newest = None
    if newest is not None and (since is None or (newest / "trainer_state.pt").stat().st_mtime >= since):
        if _saved_step(newest) >= cfg.trainer.max_steps:
            return f"it had trained all trainer.max_steps={cfg.trainer.max_steps}, nothing to continue: {newest}"
        run_dir = run_directory_of(newest)
        preset = f"--preset {shlex.quote(str(run_dir / 'config.yaml'))} " if run_dir is not None else ""
        return f"continue with `python -m dmdr_rl.run {preset}{shlex.quote(f'trainer.resume_from={newest}')}`"
    if cfg.trainer.backend == "ray" and cfg.ray.storage_path:  # Ray Train's checkpoints are there, maybe remote
        return (f"continue with trainer.resume_from=<the newest checkpoint_* directory of this launch's Ray Train run "
                f"under ray.storage_path={cfg.ray.storage_path} (copied to a local path if it is remote)>")
    if cfg.trainer.resume_from:
        return f"this launch saved no checkpoint: run the same command again, which resumes from {cfg.trainer.resume_from}"
    return "it saved no checkpoint: start it again"


def checkpoint_generator_step(checkpoint: Path) -> int:
    """The generator step a checkpoint was saved at, read without loading its tensors (mmap)."""
    state = torch.load(Path(checkpoint) / "trainer_state.pt", weights_only=True, map_location="cpu", mmap=True)
    return int(state["generator_step"])


def _run_checkpoint(run_dir: Path) -> Path:
    """A run directory's newest checkpoint by generator step: the latest of checkpoints/ (what a finished
    run keeps) or one of Ray Train's under ray_train/ (a Ray launch that stopped before its end, maybe after
    an earlier launch in the same directory had finished); checkpoints/ on a tie, then the newest file."""
    latest = latest_checkpoint(run_dir / "checkpoints")
    saved = [p for p in [latest, *(run_dir / "ray_train").glob("*/checkpoint_*")]
             if (p / f"{dmdr.GENERATOR}.safetensors").exists()]
    if not saved:
        return latest
    return max(saved, key=lambda p: (_saved_step(p), p == latest, p.stat().st_mtime))


def _saved_step(checkpoint: Path) -> int:
    """Its generator step; -1 where it cannot be read (loading it later says why)."""
    try:
        return checkpoint_generator_step(checkpoint)
    except Exception:  # noqa: BLE001 - missing, truncated, another format: ranked last, not an error here
        return -1


def run_directory_of(path: Path) -> Path | None:
    """The run directory (the one with config.yaml) that `path` is, or lies in up to four levels down."""
    path = Path(path)
    return next((d for d in [path, *path.parents][:5] if (d / "config.yaml").exists()), None)


def find_run(run: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) for a run directory (its latest checkpoint, see
    `_run_checkpoint`), or any checkpoint directory inside it (checkpoints/, step_N/, a Ray Train one)."""
    run = Path(run)
    if not run.exists():  # (a typo, most likely: not "no config.yaml")
        raise FileNotFoundError(f"{run} does not exist: give a run directory (output.dir of a training), its "
                                "checkpoints/ or a step_N/ in it")
    run_dir = run_directory_of(run)
    if run_dir is None:
        raise FileNotFoundError(f"{run} is not a training run (no config.yaml in it or above it)")
    checkpoint = _run_checkpoint(run_dir) if run_dir == run else latest_checkpoint(run)
    if not (checkpoint / f"{dmdr.GENERATOR}.safetensors").exists():
        raise FileNotFoundError(f"no {dmdr.GENERATOR}.safetensors in {checkpoint}: has the run saved a checkpoint? "
                                f"(output.checkpoint_every sets how often it does)")
    return run_dir, checkpoint


def load_generator(run: str | Path, model=None, precision: str | None = None, encoders: bool = True,
                   device: torch.device | str = "cpu", with_generator: bool = True, compile: bool = False):
    """(backbone with the run's generator adapter restored, the run's config, the checkpoint): only what
    sampling the student needs -- no optimizers, rewards, reward apps or prompt files of the training.
    `model` / `precision` replace the run's own (export merges on a float32 base); `with_generator=False`:
    the run's base model alone, its teacher (a full fine-tune's copy is a whole transformer more); `compile`:
    its blocks under torch.compile whatever the run's model.compile (a few images are not worth compiling)."""
    run_dir, checkpoint = find_run(run)
    cfg = load_config(run_dir / "config.yaml", for_sampling=True)
    model = (model or cfg.model).model_copy(update={"compile": compile})
    backbone = build_backbone(model, encoders=encoders, precision=precision or cfg.trainer.precision,
                              device=device)
    if with_generator:
        dmdr.add_generator(backbone, cfg.student)
        load_adapter_state(backbone, dmdr.GENERATOR, load_file(str(checkpoint / f"{dmdr.GENERATOR}.safetensors")))
    return backbone, cfg, checkpoint


def load_checkpoint(learner: DMDRLearner, directory: str | Path) -> Path:
    """Restore from a checkpoint directory, or from the `latest` one of a checkpoints root."""
    directory = latest_checkpoint(Path(directory))
    if not (directory / "trainer_state.pt").exists():
        raise FileNotFoundError(f"no trainer checkpoint in {directory} (expected trainer_state.pt)")
    for adapter in ADAPTERS:
        learner.load_adapter_state(adapter, load_file(str(directory / f"{adapter}.safetensors")))
    state = torch.load(directory / "trainer_state.pt", weights_only=True, map_location="cpu")
    # (load_state_dict moves the moments to each parameter's device and keeps AdamW's `step` counters on the
    # host, where torch's non-fused AdamW reads them without a device sync)
    learner.load_training_state(state)
    return directory
