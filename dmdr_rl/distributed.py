"""The distributed runtime's driver (`trainer.backend=ray`): builds the application from the config.

    python -m dmdr_rl.run --preset toy-dmdr trainer.backend=ray                    # a local Ray
    ray job submit --working-dir . -- python -m dmdr_rl.run --preset toy-dmdr trainer.backend=ray

It connects to the cluster it was submitted to (or `ray.address`), or starts a local Ray; starts the
rollout coordinator with its rollout workers (`actors/`), and runs the Ray Train learner (`learner/`)
while showing progress from the coordinator.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

from tqdm.auto import tqdm

from .config import ConfigError, RunConfig
from .ledger import Ledger, audit
from .trainer import write_run_config

PROGRESS_POLL_S = 1.0
COORDINATOR_PREFIX = "dmdr-coordinator-"  # + run name + a unique suffix: a named actor


def connect(cfg: RunConfig) -> str:
    """Join the given or ambient cluster, else start a local Ray with enough logical CPUs for the run."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return address
    r = cfg.ray
    needed = r.learner_workers * r.learner_cpus + r.rollout_actors * r.rollout_cpus + reward_app_cpus(cfg)
    ray.init(num_cpus=r.local_cpus or max(int(needed + 0.999), 1))
    return "local"


def reward_app_cpus(cfg: RunConfig) -> float:
    if not any(spec.placement == "serve" for spec in cfg.rewards):
        return 0.0
    from reward_servers.serve import serve_cpus

    return serve_cpus(cfg)


def serving_rewards(cfg: RunConfig):
    """A context holding the run's reward apps (placement: serve) up; nothing when every reward is local."""
    if not any(spec.placement == "serve" for spec in cfg.rewards):
        return contextlib.nullcontext([])
    from reward_servers.serve import reward_apps

    return reward_apps(cfg)


def train_distributed(cfg: RunConfig) -> dict:
    r = cfg.ray
    if r.learner_gpus > 0 or r.rollout_gpus > 0:
        raise ConfigError("ray.learner_gpus / ray.rollout_gpus > 0: the backbones do not place tensors on GPUs yet "
                          "(issue 6, real backbones); leave them at 0 for now")
    where = connect(cfg)
    with serving_rewards(cfg):
        return _train_on_ray(cfg, where)


def _train_on_ray(cfg: RunConfig, where: str) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.coordinator import RolloutCoordinator
    from learner.loop import train_loop_per_worker

    r = cfg.ray
    out = cfg.output_dir.resolve()
    write_run_config(cfg, out)
    cfg_dict = cfg.model_dump(mode="json")
    coordinator = ray.remote(RolloutCoordinator).options(
        num_cpus=0, name=f"{COORDINATOR_PREFIX}{cfg.name}-{uuid.uuid4().hex[:8]}",
    ).remote(cfg_dict, r.learner_workers, str(out / "ledger.jsonl"))
    use_gpu = r.learner_gpus > 0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg_dict, "coordinator": coordinator, "output_dir": str(out)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.learner_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": r.learner_cpus, **({"GPU": r.learner_gpus} if use_gpu else {})}),
        run_config=TrainRunConfig(name=cfg.name, storage_path=str(out / "ray_train"),
                                  failure_config=FailureConfig(max_failures=r.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    print(f"dmdr_rl: Ray ({where}): {r.learner_workers} learner worker(s), {r.rollout_actors} rollout actor(s), "
          f"max_staleness {r.max_staleness}; outputs in {out}", flush=True)
    outcome: dict = {}
    fit = threading.Thread(target=lambda: outcome.update(result=_fit(trainer)), daemon=True)
    started = time.time()
    fit.start()
    bar = tqdm(total=cfg.trainer.max_steps, desc=f"train {cfg.name} (ray)", dynamic_ncols=True)
    try:
        while fit.is_alive():
            fit.join(PROGRESS_POLL_S)
            try:
                progress = ray.get(coordinator.progress.remote(), timeout=5)
            except Exception:  # the coordinator is busy or gone: just skip this refresh
                continue
            bar.n = max(0, progress["version"])
            bar.set_postfix(iteration=progress["iteration"], refresh=False)
            bar.refresh()
    finally:
        bar.close()
        _shut_down(coordinator)
    result = outcome.get("result")
    if isinstance(result, BaseException):
        raise result
    metrics = result.metrics or {}
    summary = {
        "output_dir": str(out),
        "generator_steps": metrics.get("generator_step"),
        "iterations": metrics.get("iteration"),
        "checkpoint": str(_keep_checkpoint(result.checkpoint, out / "checkpoints", metrics.get("generator_step", 0))),
        "train_seconds": round(time.time() - started, 1),
        "ledger": audit(Ledger(out / "ledger.jsonl").events(), metrics.get("iteration", 0), r.learner_workers),
    }
    problems = {k: v for k, v in summary["ledger"].items() if k in ("lost", "duplicated", "unexpected") and v}
    if problems:
        print(f"dmdr_rl: WARNING: the prompt ledger shows {problems}", flush=True)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _shut_down(coordinator) -> None:
    """Free the run's actors (rollout workers, then the coordinator) so the cluster's CPUs come back."""
    import ray

    try:
        for worker in ray.get(coordinator.processes.remote(), timeout=30)["rollout_workers"]:
            ray.kill(worker)
    except Exception as err:  # already gone: nothing to free
        print(f"dmdr_rl: could not reach the rollout workers to stop them ({type(err).__name__})", flush=True)
    ray.kill(coordinator)


def _fit(trainer):
    try:
        return trainer.fit()
    except BaseException as err:  # re-raised on the driver's main thread
        return err


def _keep_checkpoint(checkpoint, root: Path, step: int) -> Path | None:
    """Copy Ray Train's final checkpoint to `checkpoints/step_N` (+ `latest`), the layout of the
    local trainer, so `python -m dmdr_rl.eval --model student --run DIR` reads either."""
    if checkpoint is None:
        return None
    target = root / f"step_{step:06d}"
    with checkpoint.as_directory() as directory:
        shutil.copytree(directory, target, dirs_exist_ok=True)
    (root / "latest").write_text(target.name + "\n")
    return target
