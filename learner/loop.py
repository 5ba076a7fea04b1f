"""The Ray Train learner: `train_loop_per_worker` for a `TorchTrainer`.

Each worker is one data-parallel rank. It builds the backbone without prompt encoders (conditioning
arrives with each RolloutBatch), wraps the math core's `DMDRLearner`, and averages gradients across
ranks before every optimizer step (gloo on CPU, NCCL on GPU: Ray Train sets up the process group).
Rank 0 publishes the generator weights after each generator update, writes the metrics (the losses
and rewards of the whole batch, over all ranks), and hands Ray Train the checkpoints.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import ray
import ray.train
import torch
import torch.distributed as dist

from actors.coordinator import ACTOR_ERRORS, StaleLearnerError
from dmdr_rl import dmdr
from dmdr_rl.config import RunConfig
from dmdr_rl.errors import in_cause_chain
from dmdr_rl.evaluation import TrainingEvaluation
from dmdr_rl.learning import DMDRLearner, probe_rewards
from dmdr_rl.prompts import PromptSource
from dmdr_rl.registry import build_backbone
from dmdr_rl.store import open_store
from dmdr_rl.trainer import (GRID_PROMPTS, GRID_SEEDS, MetricsLog, build_rewards, load_checkpoint, loss_postfix, save_rollout_records,
                             save_step_samples, StepDuties, step_duties, student_images, write_checkpoint)
from reward_servers.protocol import RewardServerError

GRADIENT_BUCKET_ELEMENTS = 1 << 24  # 64 MiB of float32 gradients per all-reduce


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Data-parallel gradient averaging, in buckets of about GRADIENT_BUCKET_ELEMENTS (a parameter without a
    gradient gets zeros, which count as 0). The averages go back into the gradients themselves, so beyond
    them only one bucket is held: a full fine-tune's gradients are as large as its weights."""
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if bucket and (p.grad.dtype != bucket[0].dtype or size + p.grad.numel() > GRADIENT_BUCKET_ELEMENTS):
            _average_bucket(bucket)
            bucket, size = [], 0
        bucket.append(p.grad)
        size += p.grad.numel()
    if bucket:
        _average_bucket(bucket)


def _average_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


BATCH_METRICS = ("loss/", "reward/", "rollout/", "rl/")  # each rank's are its shard's; the log shows the whole batch's


def mean_over_ranks(metrics: dict, device: torch.device, shard_size: int, all_reduce=dist.all_reduce) -> dict:
    """The shard metrics of every rank as the whole batch's, in one all-reduce: counts (`/non_finite`)
    summed, a reward mean weighted by its rank's finite scores (`shard_size` less its non-finite count; a
    rank whose every score failed adds nothing), the rest averaged over the ranks (equal shards: a loss's
    mean is the batch's), and NaN where any rank's is not finite, as one process would log it (that
    update was skipped). Timings and schedules stay rank 0's. Every rank must call it at the same steps."""
    keys = sorted(k for k, v in metrics.items() if k.startswith(BATCH_METRICS)
                  and (isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)))
    if not keys:
        return metrics
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    counted = torch.tensor([f"{k}/non_finite" in metrics for k in keys], device=device)
    weights = torch.tensor([shard_size - float(metrics[f"{k}/non_finite"]) if f"{k}/non_finite" in metrics else 1.0
                            for k in keys], dtype=torch.float64, device=device)
    finite = torch.isfinite(values) & (weights > 0)
    broken = (~torch.isfinite(values) & ~counted).to(values.dtype)  # a loss, not a mean of counted scores
    every = torch.cat([torch.where(finite, values * weights, torch.zeros_like(values)),
                       torch.where(finite, weights, torch.zeros_like(weights)), broken])
    all_reduce(every)
    sums, counts, broken = every[: len(keys)], every[len(keys): 2 * len(keys)], every[2 * len(keys):]
    reduced = {k: float(sums[i]) if k.endswith("/non_finite") else float(sums[i] / counts[i])
               if counts[i] > 0 and broken[i] == 0 else float("nan") for i, k in enumerate(keys)}
    return {**metrics, **reduced}


def metrics_leaving(metrics: dict, duties: StepDuties, world: int, average: Callable[[dict], dict]) -> dict:
    """A step's metrics as they leave the learner (the log, a checkpoint's Ray Train report): the whole
    batch's, averaged over the ranks. `average` is a collective: every rank calls this at the same steps."""
    return average(metrics) if world > 1 and duties.shows_metrics else metrics


class FencedCoordinator:
    """The coordinator as one learner try calls it: each call that changes what the learners get carries
    the token its start returned, so a try that a later one replaced (a learner Ray declared dead that
    still runs, as across a network partition) is refused instead of publishing weights or taking batches."""

    FENCED = frozenset({"publish", "request", "reissue", "consumed", "restart_worker", "replace_failed_worker",
                        "learner_failed"})

    def __init__(self, handle, learner_start: int):
        self.handle, self.learner_start = handle, learner_start

    def __getattr__(self, name: str):
        method = getattr(self.handle, name)
        if name not in self.FENCED:
            return method
        return SimpleNamespace(remote=lambda *args, **kwargs: method.remote(*args, learner_start=self.learner_start,
                                                                            **kwargs))


def check_version(batch, generator_step: int, max_staleness: int) -> None:
    """A batch sampled by a generator version the learner at `generator_step` may train on (that version,
    or up to `max_staleness` older): anything else is a bug, and would train silently on another policy."""
    lag = generator_step - batch.weight_version
    if not 0 <= lag <= max_staleness:
        raise RuntimeError(f"batch ({batch.iteration}, rank {batch.rank}) was sampled by generator version "
                           f"{batch.weight_version}, but the learner at generator step {generator_step} trains on versions "
                           f"{max(0, generator_step - max_staleness)}..{generator_step} only (ray.max_staleness)")


def publish_generator(coordinator, learner: DMDRLearner, metrics: dict | None = None) -> None:
    """One object-store put per generator version; rollout workers fetch it by reference. (A full
    fine-tune of a large model would broadcast instead: this is the one place to change.) The step's
    losses (rank 0's shard) go along for the driver's progress bar."""
    ref = ray.put(learner.published_state(dmdr.GENERATOR))
    ray.get(coordinator.publish.remote(learner.generator_step, [ref], losses=loss_postfix(metrics or {})))


def _ticket(answer: list) -> tuple:
    """(ref, worker, incarnation) of a coordinator's ticket."""
    return answer[0], answer[1], answer[2]


LOADING_CHECK_S = 10.0  # how often a question at a launch's first start looks for a worker that has started
LOADING_NOTICE_S = 120.0  # how often a question still waiting for the first worker to start says so


def _from_a_worker(coordinator, next_ticket, what: str, patience_s: float, restart_stuck: bool = True):
    """What the worker of `next_ticket()`'s ref delivers. A dead or restarting worker: the next ticket,
    after a growing wait, for up to `patience_s`. With `restart_stuck`, a worker that delivers nothing
    within `patience_s` is restarted (the incarnation the ticket names: if another rank got there first,
    nothing is killed), once, and the next ticket waited on with the full patience again. Without it, the
    worker is waited for as long as it loads, unless another one starts first: then the question goes there."""
    ref, worker, incarnation = next_ticket()
    give_up, wait, restarted = time.monotonic() + patience_s, 0.5, False
    asked_at = noticed_at = time.monotonic()
    while True:
        try:
            return ray.get(ref, timeout=patience_s if restart_stuck else LOADING_CHECK_S)
        except ray.exceptions.GetTimeoutError as err:
            if not restart_stuck:  # still loading, or pending placement (a node being added) and maybe never placed
                started = ray.get(coordinator.ready_workers.remote())
                if not started and time.monotonic() - noticed_at >= LOADING_NOTICE_S:  # (a hung load would be silent)
                    noticed_at = time.monotonic()
                    print(f"dmdr_rl: {what}: no rollout worker has started in {noticed_at - asked_at:.0f} s (each loads its "
                          "model, encoders and rewards, or waits for a node that fits ray.rollout_cpus / "
                          "ray.rollout_gpus; `ray status` shows pending actors)", flush=True)
                if not started or worker in started:
                    continue  # no other worker to ask, or this one has started and is answering
                give_up = time.monotonic() + patience_s  # (the started worker gets the full patience)
            elif restarted:
                raise RuntimeError(f"{what} did not finish within {patience_s:.0f} s, also after its rollout worker was "
                                   "restarted (a worker is stuck or still loading: raise ray.rollout_timeout_s, or check "
                                   "ray.rollout_cpus / ray.rollout_gpus)") from err
            else:
                ray.get(coordinator.restart_worker.remote(worker, incarnation))
                restarted, give_up = True, time.monotonic() + patience_s
        except ACTOR_ERRORS as err:
            if (getattr(err, "actor_init_failed", False)  # its __init__ raised: Ray never restarts such an actor,
                    and not ray.get(coordinator.replace_failed_worker.remote(worker, incarnation))):  # nor the coordinator
                reason = [line for line in str(err).strip().splitlines() if line.strip()][-1:] or ["(no message)"]
                # (not from err: a Ray error would count as the infrastructure's, and a retry of the learner
                # would meet the same broken worker; as the run's own error, same_failure_limit ends it)
                raise RuntimeError(f"a rollout worker failed to start, so {what} cannot be made: {reason[0].strip()} "
                                   "(its model, encoders or rewards could not be built where it was placed: see the "
                                   "worker's log, and ray.rollout_cpus / ray.rollout_gpus)") from None
            if time.monotonic() > give_up:
                raise RuntimeError(f"no rollout worker could deliver {what} within {patience_s:.0f} s "
                                   f"(ray.rollout_timeout_s); the last error: {type(err).__name__}: {err}") from err
            time.sleep(wait)
            wait = min(2 * wait, 10.0)
        ref, worker, incarnation = next_ticket()


def ask_a_worker(coordinator, method: str, *args, patience_s: float, restart_stuck: bool):
    """What a rollout worker answers to `method` (e.g. null_conditioning, encode), asking the workers in
    turn. `restart_stuck`: after a learner restart, when a worker may still run a rollout of the lost
    learner's, one that does not answer within `patience_s` is restarted; at a launch's first start a
    worker may still be loading its model, and the answer is waited for as long as it takes (or taken from
    another worker that has started meanwhile)."""
    attempts = itertools.count()
    return _from_a_worker(
        coordinator, lambda: _ticket(ray.get(getattr(coordinator, method).remote(*args, attempt=next(attempts)))),
        f"the answer to {method}", patience_s, restart_stuck)


def fetch_batch(coordinator, iteration: int, rank: int, patience_s: float):
    """The RolloutBatch of (iteration, rank). If its rollout worker died, the batch is sampled again (by
    another started worker, or by the restarted one, which reloads the weights itself) for up to
    `patience_s`; a worker that does
    not finish it within `patience_s` is restarted, once, and the batch sampled again (a learner restart
    would not help: it would wait behind the stuck worker)."""
    deadline, wait = time.monotonic() + patience_s, 0.005
    while (answer := ray.get(coordinator.request.remote(iteration, rank))) is None:
        if time.monotonic() > deadline:  # the generator version this batch needs never came
            raise RuntimeError(f"batch ({iteration}, rank {rank}) waited {patience_s:.0f} s (ray.rollout_timeout_s) for the "
                               f"generator weights it needs; the coordinator's progress: {_progress_for_errors(coordinator)}")
        # the weights this batch needs are being published: asked again soon, then less often (every rank asks
        # the one coordinator, which also serves the rollout workers)
        time.sleep(wait)
        wait = min(2 * wait, 0.1)
    tickets = iter([answer])
    return _from_a_worker(
        coordinator, lambda: _ticket(next(tickets, None) or ray.get(coordinator.reissue.remote(iteration, rank))),
        f"the rollout of batch ({iteration}, rank {rank})", patience_s)


def _progress_for_errors(coordinator) -> dict:
    """The coordinator's progress as an error names it: its counts, without the notices for the driver's console
    (sentences that would make the same failure look different to ray.same_failure_limit)."""
    return {k: v for k, v in ray.get(coordinator.progress.remote()).items() if k != "recent_notices"}


def quiet_report_lines(level: str) -> None:
    """Ray Train's "Reporting training result N: <checkpoint and metrics>" line at each checkpoint comes from a
    logger named by its file's path, which `ray.train.LoggingConfig` does not reach: give it the run's level."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: its lines stay as they are
        return
    logging.getLogger(train_context.__file__).setLevel(level)


def train_loop_per_worker(config: dict) -> None:
    cfg = RunConfig.model_validate(config["cfg"])
    coordinator = config["coordinator"]
    quiet_report_lines(cfg.ray.train_log_level)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg.ray.learner_cpus)))
    try:  # before the backbone loads: a restart after the coordinator died must end fast, not after minutes
        repeated_failure, learner_try = ray.get(coordinator.register_learner.remote(rank, os.getpid()))
    except ray.exceptions.ActorDiedError as err:  # (not ActorUnavailableError: it may answer again, a retry may do)
        _say_coordinator_gone(rank, err)
        return
    if repeated_failure is not None:  # Ray Train would retry it again: end the try, and the driver ends the run
        print(f"dmdr_rl: learner rank {rank}: not trying again: {repeated_failure}", flush=True)
        return
    built: dict = {}  # what restores it, then the learner: where a failure happened
    try:
        _train(cfg, coordinator, Path(config["output_dir"]), rank, world, built, learner_try)
    except Exception as err:
        if coordinator_died(err, coordinator):  # as at registration: no try can go on (e.g. `ray job stop`)
            _say_coordinator_gone(rank, err)
            return
        if _replaced(err):  # not counted as the run's failure: the try that replaced this one trains on
            print(f"dmdr_rl: learner rank {rank}: a later learner try replaced this one ({err}); stopping", flush=True)
            raise
        own = own_error(err)
        if own is not None:
            report_failure(built.get("coordinator", coordinator), rank, built, own)
        raise


# failures of the infrastructure, which another try may well not meet (a lost node, a dead actor, a
# peer gone from the process group: the rank whose own error it was reports that)
INFRASTRUCTURE_ERRORS = (ray.exceptions.RayError, dist.DistError)


def _share_from_rank_0(value, world: int):
    """Rank 0's `value` on every rank, through the try's own process group (a collective: a rank of
    another try, which has its own group, cannot take it)."""
    if world == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _say_coordinator_gone(rank: int, err: BaseException) -> None:
    """One line for a learner rank that ends because the run's coordinator died (it lives on the driver's node and
    goes with it: a stopped run, a lost node), at registration or mid-run. The try ends without an error: a raised
    one would be the infrastructure's, and Ray Train would retry it while the driver has already given up."""
    print(f"dmdr_rl: learner rank {rank}: the run's rollout coordinator is gone (the run was stopped, or its driver's "
          f"node lost), so this learner ends; launch the run again with trainer.resume_from=<the run directory> to "
          f"continue it ({type(err).__name__})", flush=True)


def coordinator_died(err: BaseException | None, coordinator) -> bool:
    """Whether `err`, or an error it was raised from, is the death of the run's coordinator (`ray job stop` kills
    the driver, and the coordinator with it, a few seconds after its SIGTERM): a learner that raised it would
    print its traceback and be retried by Ray Train, for nothing."""
    try:
        coordinator_id = coordinator._actor_id.hex()
    except AttributeError:  # (a stand-in in tests)
        return False
    return in_cause_chain(err, lambda seen: isinstance(seen, ray.exceptions.ActorDiedError)
                          and seen.actor_id == coordinator_id, implicit=False)


def _replaced(err: BaseException | None) -> bool:
    return in_cause_chain(err, lambda seen: isinstance(seen, StaleLearnerError)
                          or isinstance(getattr(seen, "cause", None), StaleLearnerError), implicit=False)


def own_error(err: BaseException) -> BaseException | None:
    """The error a learner's try ended with that a retry would meet again if it is a bug: the cause of a
    remote call's error (a coordinator or reward server raised it), None for the infrastructure's: Ray's
    own, an error raised because of one (a rollout worker that stayed lost or stuck), a broken process
    group (gloo reports a lost peer as a plain RuntimeError). A reward app that stayed unreachable through the
    client's retries counts, though its cause is Ray's (a timeout, a dead replica): a new learner try cannot
    bring it back, so it ends the run after `ray.same_failure_limit` tries, not after every one."""
    if isinstance(err, RewardServerError):
        return err
    if isinstance(err, ray.exceptions.RayTaskError):
        return own_error(err.cause) if isinstance(err.cause, BaseException) else None
    if isinstance(err.__cause__, ray.exceptions.RayTaskError):  # e.g. a reward client naming the failed app
        return err if own_error(err.__cause__) is not None else None
    if isinstance(err, INFRASTRUCTURE_ERRORS) or isinstance(err.__cause__, INFRASTRUCTURE_ERRORS) or _lost_peer(err):
        return None
    return err


def _lost_peer(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, RuntimeError) and "gloo" in text and any(
        sign in text for sign in ("connection", "peer", "timed out", "timeout"))


def failure_key(error: str) -> str:
    """An error's text with what differs between processes masked: addresses, temporary paths, numbers
    (a CUDA out-of-memory error's free bytes). The place it happened is compared exactly."""
    error = re.sub(r"0x[0-9a-fA-F]+", "ADDRESS", error)
    error = re.sub(r"/tmp[^\s'\"]*", "/tmp/?", error)
    return re.sub(r"\d+", "N", error)


def _probe_ends_the_run(coordinator, built: dict, backbone, prompts: list[str], cfg: RunConfig) -> bool:
    """Rank 0's probe of the rewards (`probe_rewards`). True when it found a model's own failure, which every
    try would meet again: reported to the coordinator as final, printed with its traceback, and the try ends
    without an error (one raised, Ray Train would start another try, reloading the model, only to end it)."""
    try:
        probe_rewards(built["learner"].rewards, backbone, prompts, refl=not cfg.rl.policy_gradient)
    except Exception as err:
        if not getattr(err, "ends_the_run", False) or not report_failure(coordinator, 0, built, err):
            raise  # (an app that did not answer may next time; a failure the coordinator does not hold: Ray Train's)
        # (not print: Ray Train's print in a learner also logs each line, and a traceback came out twice, interleaved)
        sys.stdout.write("dmdr_rl: learner rank 0: a reward model cannot score, so the run ends:\n"
                         + "".join(traceback.format_exception(err)))
        sys.stdout.flush()
        return True
    return False


def report_failure(coordinator, rank: int, built: dict, err: BaseException) -> bool:
    """Tell the coordinator how this try ended, so one that recurs unchanged in consecutive tries ends the
    run (`ray.same_failure_limit`). False: the coordinator could not be told."""
    learner = built.get("learner")
    where = (f"at iteration {learner.iteration}, generator step {learner.generator_step}" if learner is not None
             else f"while the learner was built, restoring {built.get('restoring') or 'nothing'}")
    error = f"{type(err).__name__}: {err}"[:2000]
    final = getattr(err, "ends_the_run", False)  # (a failure every try meets again: the probe of the rewards)
    try:
        ray.get(coordinator.learner_failed.remote(rank, where, error, failure_key(error), final=final), timeout=30)
    except Exception as report_err:  # the try fails either way: with what it failed of
        print(f"dmdr_rl: could not report the learner's failure ({type(report_err).__name__})", flush=True)
        return False
    return True


def _train(cfg: RunConfig, coordinator, out: Path, rank: int, world: int, built: dict, learner_try: int) -> None:
    checkpoint = ray.train.get_checkpoint()
    built["restoring"] = checkpoint.path if checkpoint is not None else cfg.trainer.resume_from
    device = ray.train.torch.get_device() if cfg.ray.learner_gpus > 0 else torch.device("cpu")
    backbone = build_backbone(cfg.model, encoders=False, precision=cfg.trainer.precision, device=device)
    learner = DMDRLearner(backbone, cfg, build_rewards(cfg), average_gradients if world > 1 else None, rank=rank)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_checkpoint(learner, directory)
    elif cfg.trainer.resume_from:
        load_checkpoint(learner, cfg.trainer.resume_from)
    built["learner"] = learner
    patience = cfg.ray.rollout_timeout_s
    learner_start = None
    if rank == 0:  # first: after a restart, it cancels the lost learner's rollouts, which would delay what follows
        learner_start = ray.get(coordinator.start.remote(learner.iteration, learner.generator_step, learner_try))
    # asked before any rollout is issued, so no worker is busy: after a learner restart a worker that does
    # not answer is stuck (e.g. in a rollout of the lost learner's) and is restarted; at a launch's first
    # start it may be loading its model, and is waited for
    coordinator = built["coordinator"] = FencedCoordinator(coordinator, _share_from_rank_0(learner_start, world))
    ask = {"patience_s": patience, "restart_stuck": ray.get(coordinator.progress.remote())["epoch"] > 0}
    backbone.set_null(ask_a_worker(coordinator, "null_conditioning", **ask))
    grid_prompts = PromptSource(cfg.data.prompts, cfg.trainer.seed).batch(-1, GRID_PROMPTS) if rank == 0 else None
    grid_cond = ask_a_worker(coordinator, "encode", grid_prompts, **ask) if rank == 0 else None
    if _share_from_rank_0(rank == 0 and _probe_ends_the_run(coordinator, built, backbone, grid_prompts, cfg), world):
        return  # (every rank: the driver ends the run with the failure the coordinator holds)
    evaluation = (TrainingEvaluation(cfg.output.eval_images, lambda prompts: ask_a_worker(coordinator, "encode", prompts,
                                                                                         **ask))
                  if rank == 0 and cfg.output.eval_every is not None else None)
    if rank == 0:
        publish_generator(coordinator, learner)
    if world > 1:
        dist.barrier()

    # a restarted learner waits a Redis outage out (else the same error in each try would end the run); the
    # launch's first try stops on it, naming the URL (a store this node cannot reach, say)
    log = MetricsLog(out, open_store(cfg.store.url, out, cfg.name, joining=learner_try > 1), cfg) if rank == 0 else None
    waited = 0.0
    try:
        while learner.generator_step < cfg.trainer.max_steps:
            started = time.perf_counter()
            batch = fetch_batch(coordinator, learner.iteration, rank, patience)
            check_version(batch, learner.generator_step, cfg.ray.max_staleness)
            waited += time.perf_counter() - started  # summed over the iterations of one generator step
            coordinator.consumed.remote(batch.iteration, rank, batch.weight_version, learner.generator_step)
            metrics = learner.step(batch)
            if metrics is None:
                continue
            published = time.perf_counter()
            if rank == 0:
                publish_generator(coordinator, learner, metrics)
            metrics.update({"time/rollout_wait_s": waited, "time/weight_sync_s": time.perf_counter() - published})
            waited = 0.0
            step = learner.generator_step
            duties = step_duties(step, cfg)
            metrics = metrics_leaving(metrics, duties, world,
                                      lambda shard: mean_over_ranks(shard, device, len(batch.prompts)))
            if duties.evaluate and evaluation is not None:  # (rank 0's, after the ranks' metrics are averaged)
                metrics.update(evaluation(lambda cond, seeds: student_images(backbone, cond, cfg.student, seeds), step))
            if duties.log and log is not None:
                log.write(step, metrics)
            if rank == 0 and duties.sample:
                images = student_images(backbone, grid_cond, cfg.student, GRID_SEEDS)
                log.write_samples(step, save_step_samples(out, step, images, grid_prompts, learner.rewards, GRID_SEEDS))
                save_rollout_records(out, backbone, batch, step)
            stopping = stop_requested(coordinator, rank, world, device)
            if duties.checkpoint or stopping:
                report(learner, rank, {**metrics, "stopped": 1.0} if stopping else metrics)
            if stopping:
                break
    finally:
        if log is not None:
            log.close(failed=sys.exc_info()[0] is not None)  # (the exception on its way out, if any)


def stop_requested(coordinator, rank: int, world: int, device) -> bool:
    """Whether the driver was asked to stop (Ctrl-C): rank 0 asks the coordinator and every rank gets
    its answer, so all end after the same generator step (their collectives stay paired)."""
    asked = bool(ray.get(coordinator.stop_requested.remote())) if rank == 0 else False
    if world > 1:
        flag = torch.tensor([float(asked)], device=device)
        dist.broadcast(flag, src=0)
        asked = bool(flag.item())
    return asked


def replica_divergence(learner: DMDRLearner) -> float:
    """Largest difference between the ranks' checksums of the generator and critic weights: 0 while the
    data-parallel replicas stay identical (they start equal and apply the same averaged gradients)."""
    checksum = torch.stack([sum(p.detach().sum(dtype=torch.float64) for p in learner.backbone.trainable_parameters(a))
                            for a in (dmdr.GENERATOR, dmdr.CRITIC)])  # (per parameter: no float64 copy of the model)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    stacked = torch.stack(gathered)
    return float((stacked.max(dim=0).values - stacked.min(dim=0).values).max())


def report(learner: DMDRLearner, rank: int, metrics: dict) -> None:
    """A Ray Train report (a barrier over all ranks) carrying rank 0's checkpoint, and a check that the
    replicas' weights have not drifted apart."""
    summary = {"generator_step": learner.generator_step, "iteration": learner.iteration,
               **{k: v for k, v in metrics.items() if k.startswith("loss/") or k == "stopped"}}  # (asked to stop)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        summary["ddp/replica_divergence"] = replica_divergence(learner)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            checkpoint = ray.train.Checkpoint.from_directory(str(write_checkpoint(learner, Path(tmp))))
        ray.train.report(summary, checkpoint=checkpoint)
