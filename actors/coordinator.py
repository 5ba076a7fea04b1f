"""The rollout coordinator: one Ray actor per run that issues prompt batches to rollout workers,
holds the latest published generator weights, and keeps the prompt ledger.

Learner workers ask it for the batch of (iteration, rank); it hands back an ObjectRef, so the batch
itself travels from the rollout worker to the learner through the object store, never through here.
Rollouts run ahead of the learner as far as `ray.max_staleness` allows: the batch of iteration j may
be sampled by any generator version >= g(j) - max_staleness, where g(j) is the generator step the
learner is at when it trains iteration j (0: exactly the version the single-process trainer would
use, so with one learner worker the two produce the same losses; several ranks each draw their own
shard's randomness). g counts from the step the learner (re)started at, so a run
resumed with another `dmd.ratio` is served too.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import ray

from dmdr_rl.config import RunConfig
from dmdr_rl.ledger import Ledger
from dmdr_rl.store import open_store
from dmdr_rl.prompts import PromptSource

from .rollout import RolloutWorker

# a rollout worker died, is restarting, or its node went with the batch it had made: sample it again
ACTOR_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError)


# fresh actors one rollout worker slot may get in a launch when its restarts fail in their constructor
WORKER_REPLACEMENTS = 3


class StaleLearnerError(RuntimeError):
    """A call from a learner try that a later try has replaced: one Ray declared dead while it still ran
    (a network partition, say). Refused, so that it cannot publish weights, take batches, kill workers or
    count failures of the try that replaced it."""


@dataclass
class IssuedBatch:
    """A batch sent to a rollout worker and not consumed yet: the worker and its incarnation then (a restart
    since makes the batch's loss that worker's death), and whether a learner has taken its ref."""

    ref: ray.ObjectRef
    worker: int
    incarnation: int
    taken: bool = False

    def ticket(self) -> list:
        """[ObjectRef, worker, incarnation]: a list, so Ray passes the ref, not the batch."""
        return [self.ref, self.worker, self.incarnation]


class RolloutCoordinator:
    def __init__(self, cfg: dict, world_size: int, run_dir: str, lookahead: int | None = None):
        self.cfg = RunConfig.model_validate(cfg)
        ray_cfg = self.cfg.ray
        self.world_size = world_size
        self.prompts = PromptSource(self.cfg.data.prompts, self.cfg.trainer.seed)
        for field, size in self.cfg.trainer.batch_size_fields():
            if size % world_size:
                raise ValueError(f"trainer.{field}={size} must divide evenly over ray.learner_workers={world_size}")
        worker = ray.remote(RolloutWorker).options(
            num_cpus=ray_cfg.rollout_cpus, num_gpus=ray_cfg.rollout_gpus, max_restarts=-1, max_task_retries=0,
        )
        self._new_worker = lambda: worker.remote(cfg, threads=max(1, int(ray_cfg.rollout_cpus)))
        self.workers = [self._new_worker() for _ in range(ray_cfg.rollout_actors)]
        self.incarnations = [0] * len(self.workers)  # + 1 at each restart: restart_worker, replace_failed_worker, reissue
        self.started_once = [False] * len(self.workers)  # a worker's actor has answered `ready` (some incarnation)
        self.replacements = [0] * len(self.workers)  # fresh actors given to each slot (replace_failed_worker)
        # True once a worker has answered `ready` (its constructor is done), else the ref of the question
        self.readiness: list = [worker.ready.remote() for worker in self.workers]
        # workers whose death or restart is counted (a new incarnation) and that have not answered `ready` since:
        # a batch sent to one while Ray restarts it fails too, and is the same death, not another
        self.restarting: set[int] = set()
        self.notices: list[str] = []  # what happened to the rollout workers, for the driver's console
        self.ratio, self.max_staleness = self.cfg.dmd.ratio, ray_cfg.max_staleness
        self.lookahead = lookahead if lookahead is not None else self.ratio * (self.max_staleness + 1)
        self.version, self.weights = -1, None  # the latest published generator weights: [ObjectRef]
        self.epoch = 0  # + 1 at every learner restart (the rollout workers reload their weights at a new one)
        self.learner_starts = 0  # + 1 at every start: the token that fences the calls of the try that started
        self.batches: dict[tuple[int, int], IssuedBatch] = {}  # (iteration, rank): issued, not consumed yet
        self.next_iteration = 0  # the first iteration not issued yet
        self.requested_since_start = False  # a learner asked for a batch since the last start
        self.consumed_upto = 0
        self.started_at = (0, 0)  # (iteration, generator step) the learner last (re)started from
        self.turn = 0
        self.ledger = Ledger(open_store(self.cfg.store.url, run_dir, self.cfg.name))
        self.learner_processes: dict[int, int] = {}
        self.try_number = 0  # learner tries of this launch: + 1 when a rank registers again
        self.registered: set[int] = set()  # the ranks registered in the current try
        self.rank0_registrations = 0  # one per try that got as far as its rank 0: what its start() must carry
        self.failures_by_try: dict[int, set[tuple[str, str]]] = {}  # try -> its (where, error key)s
        self.repeated_failure: str | None = None  # set once one recurs ray.same_failure_limit times
        self.stop_asked = False  # the driver was asked to stop: see request_stop
        self.losses: dict = {}  # the last generator step's losses, for the driver's progress bar (see publish)
        self.learner_down = False  # a learner try failed and the next has not started: see progress

    # -- weights ------------------------------------------------------------------------------
    def publish(self, version: int, weights: list, learner_start: int | None = None, losses: dict | None = None) -> int:
        """New generator weights (`weights[0]` a ref to a dict of tensors) become the version rollouts use.
        `learner_start` (here and in every call that changes what the learners get): what `start` returned
        to the calling try; a call of an earlier try's is refused (None: not checked, for operators).
        `losses`: the step's, as the driver's progress bar shows them."""
        self._fence(learner_start, "publish")
        if version <= self.version:
            return self.version
        self.version, self.weights = version, weights  # sent along with each rollout request
        self.losses = losses or {}
        self.learner_down = False  # (a try that publishes is up: a late failure report of an earlier one is stale)
        # the batches that waited for these weights go out now, not at the learner's next request: the
        # workers sample them while the learner logs, samples grids and writes checkpoints. Not before a
        # try's first request: its ranks' first questions (null conditioning) must not queue behind rollouts
        if self.requested_since_start:
            self._issue_ahead(self.consumed_upto)
        return version

    def null_conditioning(self, attempt: int = 0) -> list:
        """The ticket [ObjectRef, worker, incarnation] of the empty prompt's conditioning, from the
        `attempt`-th worker in turn."""
        return self._ticket(attempt, lambda worker: worker.null_conditioning.remote())

    def encode(self, prompts: list[str], attempt: int = 0) -> list:
        """The ticket of prompt conditioning from a rollout worker (the learner holds no encoders), e.g. for
        sample grids. A ref, not the answer: this actor never waits on a worker (a stuck one would stop
        every learner's calls here), the learner does, with its timeout (see learner.loop.ask_a_worker)."""
        return self._ticket(attempt, lambda worker: worker.encode.remote(prompts))

    def _ticket(self, attempt: int, call) -> list:
        """The question goes to the ready workers in turn (to all in turn while none is ready)."""
        ready = self.ready_workers() or list(range(len(self.workers)))
        index = ready[attempt % len(ready)]
        return [call(self.workers[index]), index, self.incarnations[index]]

    def restart_worker(self, index: int, incarnation: int, learner_start: int | None = None) -> bool:
        """Kill rollout worker `index` that stopped answering, unless it was restarted since the caller's
        ticket was made (another rank, or an earlier try, got there first: that one is a fresh start).
        Ray starts it again (max_restarts=-1) and it reloads the weights with its next request."""
        self._fence(learner_start, "restart_worker")
        if self.incarnations[index] != incarnation:
            return False
        ray.kill(self.workers[index], no_restart=False)
        self.incarnations[index] += 1
        self.readiness[index] = self.workers[index].ready.remote()  # the restarted worker's: asked again
        self.restarting.add(index)
        self.ledger.append("worker_restarted", worker=index, incarnation=self.incarnations[index])
        self.notices.append(f"rollout worker {index} stopped answering (ray.rollout_timeout_s), so it was restarted; "
                            "its batches are sampled again")
        return True

    def replace_failed_worker(self, index: int, incarnation: int, learner_start: int | None = None) -> bool:
        """Worker `index`'s constructor raised, and Ray never restarts such an actor. When the worker had
        started before, the failure came with a restart (a GPU still held by the killed process, a file
        server away for a moment): a fresh actor takes its slot, up to WORKER_REPLACEMENTS times a launch.
        False when it never started (its model, encoders or rewards cannot be built where it is placed: the
        run's own error, at once) or has used them up. True as well when the caller's incarnation is gone
        (another rank, or the readiness check, replaced or restarted it first)."""
        self._fence(learner_start, "replace_failed_worker")
        if self.incarnations[index] != incarnation:
            return True
        if not self.started_once[index] or self.replacements[index] >= WORKER_REPLACEMENTS:
            return False
        self.workers[index] = self._new_worker()
        self.incarnations[index] += 1
        self.replacements[index] += 1
        self.readiness[index] = self.workers[index].ready.remote()
        self.restarting.add(index)
        self.ledger.append("worker_replaced", worker=index, incarnation=self.incarnations[index])
        self.notices.append(f"rollout worker {index} could not start again (its constructor failed), so a fresh one "
                            f"took its place ({self.replacements[index]} of {WORKER_REPLACEMENTS} this launch)")
        return True

    # -- batches ------------------------------------------------------------------------------
    def start(self, iteration: int, generator_step: int | None = None, learner_try: int | None = None) -> int:
        """Begin (or, after a learner restart, resume) issuing from `iteration`, where the learner's
        generator is at `generator_step` (default: iteration // ratio, a run at one ratio throughout):
        earlier batches are done, later ones consumed before the restart are rolled back (the ledger
        says so, with the world size from here on). Returns the token the learner's calls carry (see
        `_fence`). `learner_try`: what `register_learner` gave the calling rank 0; one that a later rank 0 has
        replaced is refused, so that a replaced try's rank 0 that gets here late (after loading its model,
        say) cannot take the run back from the try that replaced it (None: not checked)."""
        if learner_try is not None and learner_try != self.rank0_registrations:
            raise StaleLearnerError(f"start from learner try {learner_try}, which a later try "
                                    f"({self.rank0_registrations}) replaced: refused")
        # a learner that published anything (version 0 comes right after the first start) has run before
        restart = self.version >= 0 or bool(self.batches or self.consumed_upto)
        self.started_at = (iteration, iteration // self.ratio if generator_step is None else generator_step)
        self.ledger.append("rewind" if restart else "start", iteration=iteration, world_size=self.world_size)
        if restart:
            # The restored learner's weights replace the ones the lost learner published (and owned: they
            # died with it); a new epoch tells the workers to reload even an older version.
            self.epoch += 1
            self.version, self.weights = -1, None
        for batch in self.batches.values():  # rollouts for the lost learner (those it took too: a worker
            ray.cancel(batch.ref)  # samples them one after another): not worth waiting behind
        self.batches.clear()
        self.next_iteration = self.consumed_upto = iteration
        self.requested_since_start = False
        self.learner_down = False
        self.learner_starts += 1
        return self.learner_starts

    def _fence(self, learner_start: int | None, call: str) -> None:
        if learner_start is not None and learner_start != self.learner_starts:
            raise StaleLearnerError(f"{call} from the learner try of start {learner_start}, which a later try (start "
                                    f"{self.learner_starts}) replaced: refused")

    def request(self, iteration: int, rank: int, learner_start: int | None = None) -> list | None:
        """The batch of (iteration, rank) as a ticket (`IssuedBatch.ticket`), or None while the generator
        version it needs is not published yet (ask again shortly)."""
        self._fence(learner_start, "request")
        if iteration < self.consumed_upto - 1 or iteration > self.next_iteration + self.lookahead:
            raise ValueError(f"batch ({iteration}, rank {rank}) requested out of order: the learner is at "
                             f"{self.consumed_upto}; a restarted learner calls start() first")
        self.consumed_upto = max(self.consumed_upto, iteration)
        self.requested_since_start = True
        self._issue_ahead(iteration)
        batch = self.batches.get((iteration, rank))
        if batch is None or batch.taken:
            return None
        return self._take(batch)

    @staticmethod
    def _take(batch: IssuedBatch) -> list:
        batch.taken = True
        return batch.ticket()

    def progress(self) -> dict:
        """Where the run is; `epoch` > 0 once a learner restart has happened in this launch."""
        return {"iteration": self.consumed_upto, "version": self.version, "issued_upto": self.next_iteration,
                "next_needs_version": self.needed_version(self.next_iteration), "epoch": self.epoch,
                "started_step": self.started_at[1],  # (version > started_step: a step trained since the learner started)
                "losses": self.losses,
                "learners_registered": len(self.learner_processes),  # (0: Ray has not placed and started one yet)
                "notices": len(self.notices), "recent_notices": self.notices[-10:],
                "learner_tries": self.try_number,  # (a new try registered: the learners are being started again)
                # a learner try failed, or another one has begun, and has not started (loading its model) yet
                "learner_restarting": self.learner_down or 0 < self.learner_starts < self.rank0_registrations}

    def request_stop(self) -> None:
        """The driver was asked to stop (Ctrl-C): the learner ends at its next generator step, with
        a checkpoint (`stop_requested`, asked by rank 0 and shared with the other ranks)."""
        self.stop_asked = True
        self.ledger.append("stop_requested", iteration=self.consumed_upto)

    def stop_requested(self) -> bool:
        return self.stop_asked

    def training_step(self, iteration: int) -> int:
        """The learner's generator step when it trains the batch of `iteration` (the generator moves after
        iterations ratio-1, 2 ratio-1, ...)."""
        first, step = self.started_at
        return step + iteration // self.ratio - first // self.ratio

    def needed_version(self, iteration: int) -> int:
        """The oldest generator version that may sample the batch of `iteration`: the step that trains it,
        less max_staleness."""
        return max(0, self.training_step(iteration) - self.max_staleness)

    # -- processes (for operators and fault-injection tests) ----------------------------------
    def register_learner(self, rank: int, pid: int) -> tuple[str | None, int]:
        """A learner rank starts a try. The answer: the failure that ended enough tries in a row to end
        the run (the rank returns at once, so Ray Train stops retrying), or None: train; and how many times
        a rank 0 has registered in this launch, which rank 0's `start` carries. (Tries are counted, for
        `same_failure_limit`, by any rank registering again; but a try whose rank 0 never registered leaves
        the next try's rank 0 looking like a late member of it, so `start` is fenced by rank 0's count.)"""
        self.learner_processes[rank] = pid
        if rank in self.registered or not self.registered:  # the first rank of a new try, whichever it is
            self.try_number += 1
            self.registered = set()
        self.registered.add(rank)
        if rank == 0:
            self.rank0_registrations += 1
        return self.repeated_failure, self.rank0_registrations

    def learner_failed(self, rank: int, where: str, error: str, key: str | None = None,
                       learner_start: int | None = None, final: bool = False) -> bool:
        """A learner rank's try ended with `error` at `where` (`key`: the error with what varies from process
        to process masked; default the error). Ranks failing in one try count once. True once the same
        failure has ended `ray.same_failure_limit` tries in a row, or at once for a `final` one (every try
        would meet it again): the next try ends the run with it. A replaced try's failure (`learner_start`
        of an earlier start) is noted, not counted."""
        if learner_start is not None and learner_start != self.learner_starts:
            self.ledger.append("stale_call", call="learner_failed", rank=rank, learner_start=learner_start,
                               error=error[:500])
            return self.repeated_failure is not None
        self.learner_down = True  # (until the next try's start: the driver's progress bar says so)
        failure = (where, key or error)
        self.failures_by_try.setdefault(self.try_number, set()).add(failure)
        in_a_row, t = 0, self.try_number
        while failure in self.failures_by_try.get(t, ()):
            in_a_row, t = in_a_row + 1, t - 1
        self.ledger.append("learner_failed", rank=rank, where=where, error=error[:500], tries_in_a_row=in_a_row)
        limit = self.cfg.ray.same_failure_limit
        if final and self.repeated_failure is None:
            self.repeated_failure = f"{error} ({where}; another try would meet it again)"
        if limit and in_a_row >= limit and self.repeated_failure is None:
            self.repeated_failure = (f"{error} ({where}; the same in {in_a_row} tries of the learner in a row, "
                                     "ray.same_failure_limit)")
        return self.repeated_failure is not None

    def failure(self) -> str | None:
        """The repeated failure that ends the run, if any (the driver raises it)."""
        return self.repeated_failure

    def processes(self) -> dict:
        """{"learners": {rank: pid}, "rollout_workers": [actor handles]}."""
        return {"learners": dict(self.learner_processes), "rollout_workers": list(self.workers)}

    def reissue(self, iteration: int, rank: int, learner_start: int | None = None) -> list:
        """After a rollout worker died (Ray restarts it; it reloads weights with its next request). The
        batch goes to another worker when there is one, rather than wait for the restart, and the failed
        one gets no batches until it answers `ready` again."""
        self._fence(learner_start, "reissue")
        lost = self.batches.get((iteration, rank))
        failed = lost.worker if lost is not None else None
        if failed is not None and lost.incarnation == self.incarnations[failed] and failed not in self.restarting:
            # it died, and Ray starts it again: a new incarnation, as after restart_worker, so that a ticket made
            # before (another rank's, a stuck one's) cannot kill the restarted worker while it loads. (Not
            # after restart_worker or replace_failed_worker, which counted the death themselves, nor for a batch
            # that went to the worker while it was restarting: the only worker gets the reissued batch back.)
            self.incarnations[failed] += 1
            self.restarting.add(failed)
            self.ledger.append("worker_died", worker=failed, incarnation=self.incarnations[failed])
            self.notices.append(f"rollout worker {failed} died; Ray starts it again, and its batches are sampled again")
        if failed is not None and self.readiness[failed] is True:
            self.readiness[failed] = self.workers[failed].ready.remote()
        batch = self._issue(iteration, rank, avoid=failed, urgent=True)
        self.ledger.append("reissued", iteration=iteration, rank=rank)
        return self._take(batch)

    def consumed(self, iteration: int, rank: int, weight_version: int, generator_step: int,
                 learner_start: int | None = None) -> None:
        if learner_start is not None and learner_start != self.learner_starts:  # (no one waits on it: noted, not raised)
            self.ledger.append("stale_call", call="consumed", iteration=iteration, rank=rank, learner_start=learner_start)
            return
        self.batches.pop((iteration, rank), None)
        self.ledger.append("consumed", iteration=iteration, rank=rank, weight_version=weight_version,
                           generator_step=generator_step)

    def _issue_ahead(self, iteration: int) -> None:
        while self.next_iteration <= iteration + self.lookahead:
            j = self.next_iteration
            if self.version < self.needed_version(j):
                break  # needs weights not published yet
            for rank in range(self.world_size):
                self._issue(j, rank)
            self.next_iteration += 1

    def ready_workers(self) -> list[int]:
        """The workers that have answered `ready`, without waiting for the others. A batch sent to one still
        pending placement (its node being added) or loading would wait there until the learner's timeout
        killed it, again at each of its turns, while the others sat idle."""
        asked = [(index, ref) for index, ref in enumerate(self.readiness) if ref is not True]
        if asked:
            answered, _ = ray.wait([ref for _, ref in asked], num_returns=len(asked), timeout=0, fetch_local=False)
            for index, ref in asked:
                if ref in answered:
                    self.readiness[index] = self._answer(index, ref)
                    if self.readiness[index] is True:  # up again: its next death is a new one
                        self.restarting.discard(index)
        return [index for index, ref in enumerate(self.readiness) if ref is True]

    def _answer(self, index: int, ref):
        """True (ready), or the ref of the question asked again when the worker died or is restarting (or
        was replaced, see `replace_failed_worker`)."""
        try:
            ray.get(ref)  # (answered: no wait)
            self.started_once[index] = True
        except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as err:
            if not getattr(err, "actor_init_failed", False):  # Ray starts it again: asked again
                return self.workers[index].ready.remote()
            if self.replace_failed_worker(index, self.incarnations[index]):
                return self.readiness[index]
            # its constructor failed, for good: its batches end the learner's try with the reason
        except ray.exceptions.RayError:  # it cannot start where it is (its runtime_env, no node fits it): the
            pass  # same, its batches fail with the reason rather than the healthy workers' batches here
        return True

    def _issue(self, iteration: int, rank: int, avoid: int | None = None, urgent: bool = False) -> IssuedBatch:
        """Send the batch of (iteration, rank) to a rollout worker: round-robin over the ready workers other
        than `avoid` (the one that failed this batch), else over the ready ones, else over all (none has
        answered yet: the batch waits for a worker to start). `urgent` (a batch a learner waits on, reissued):
        the candidate with the fewest batches outstanding, since a worker samples its batches in turn and the
        learner's patience runs from its question, not from when the worker gets to it."""
        if self.version < 0:
            raise RuntimeError("no generator weights published yet: the learner publishes version 0 first")
        size = self.cfg.trainer.rollout_batch_size(self.training_step(iteration))
        prompts = self.prompts.batch(iteration, size, self.cfg.prompt_group)
        shard_size = size // self.world_size
        shard = prompts[rank * shard_size : (rank + 1) * shard_size]
        everyone = range(len(self.workers))
        ready = set(self.ready_workers())
        candidates = ({i for i in ready if i != avoid} or ready or {i for i in everyone if i != avoid}
                      or set(everyone))
        in_turn = [i for k in everyone if (i := (self.turn + k) % len(self.workers)) in candidates]
        if urgent:
            outstanding = self._unfinished_batches(exclude=(iteration, rank))
            worker_index = min(in_turn, key=lambda i: outstanding[i])  # (ties: in turn)
        else:
            worker_index = in_turn[0]
            self.turn = worker_index + 1
        ref = self.workers[worker_index].rollout.remote(iteration, shard, rank, self.version, self.weights, self.epoch,
                                                        self.training_step(iteration))
        batch = self.batches[(iteration, rank)] = IssuedBatch(ref, worker_index, self.incarnations[worker_index])
        self.ledger.append("issued", iteration=iteration, rank=rank, worker=worker_index, weight_version=self.version)
        return batch

    def _unfinished_batches(self, exclude: tuple[int, int]) -> collections.Counter:
        """Per worker, its issued batches still being sampled or waiting their turn (a finished batch the
        learner has not consumed yet costs the worker nothing: asked Ray, without waiting or fetching)."""
        pending = [batch for key, batch in self.batches.items() if key != exclude]
        if not pending:
            return collections.Counter()
        refs = [batch.ref for batch in pending]
        _, unfinished = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        return collections.Counter(batch.worker for batch in pending if batch.ref in unfinished)

    def close_store(self) -> None:
        """Flush the ledger to the run store (before the driver audits it and stops this actor)."""
        self.ledger.store.close()
