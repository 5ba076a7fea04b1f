"""The Ray runtime on a local Ray: the same losses as the single-process trainer, the ledger, and
checkpoints in the local trainer's layout."""

import json
import math
import os
import re
import signal
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from dmdr_rl.config import ConfigError, load_config  # noqa: E402
from dmdr_rl.distributed import COORDINATOR_PREFIX, train_distributed  # noqa: E402
from dmdr_rl.ledger import Ledger, audit  # noqa: E402
from dmdr_rl.store import FileStore  # noqa: E402
from dmdr_rl.trainer import LocalTrainer  # noqa: E402
from conftest import backbone_overrides  # noqa: E402

TINY = {"trainer.batch_size": 4, "trainer.max_steps": 3, "trainer.cold_start": 1, "dmd.ratio": 2, "student.steps": 2,
        "output.log_every": 1, "output.sample_every": 1000, "output.checkpoint_every": 3,
        "trainer.lr_generator": 1e-3, "trainer.lr_critic": 1e-3}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=3, log_to_driver=False)  # Ray Train v2 needs the dashboard (state API): without it, minutes of timeouts
    yield
    ray.shutdown()


def _config(out, preset="toy-dmdr", **extra):
    return load_config(preset, [f"{k}={v}" for k, v in {**TINY, "output.dir": str(out), **extra}.items()])


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], {k: v for k, v in r.items() if k.startswith(("loss/", "reward/", "val/"))}) for r in rows]


@pytest.mark.parametrize("preset, extra, reward_loss, backbone", [
    # (and evaluated during training: the same val/ metrics from a Ray learner, whose prompts a worker encodes)
    # (and with a smaller batch after the cold start: the coordinator sizes each batch by the step that trains it)
    ("toy-dmdr", {"output.eval_every": 2, "output.eval_images": 8, "trainer.batch_size_rl": 2}, "loss/reward/toy-align", "toy"),
    # policy-gradient RL: grouped prompts, each step's x carried through the object store to the learner
    ("toy-dmdr-grpo", {"rl.group_size": 2, "student.steps": 3}, "loss/policy", "toy"),
    # a diffusers family on VAE latents (tiny FLUX.1): its learner holds no text encoders (CLIP, T5), the real
    # score's CFG takes the empty prompt's conditioning a rollout worker encoded
    ("toy-dmdr", {}, "loss/reward/toy-align", "flux"),
    # a bf16 base: the learner publishes its LoRA in bf16 (half the bytes), which samples as its float32 weights do
    ("toy-dmdr", {"trainer.precision": "bf16"}, "loss/reward/toy-align", "toy"),
], ids=["refl", "grpo", "flux", "refl-bf16"])
def test_synchronous_runtime_reproduces_the_local_trainer(tmp_path, local_ray, request, preset, extra, reward_loss, backbone):
    extra = {**extra, **dict(override.split("=", 1) for override in backbone_overrides(request, backbone))}
    LocalTrainer(_config(tmp_path / "local", preset, **extra)).train()
    summary = train_distributed(_config(tmp_path / "ray", preset, **{"trainer.backend": "ray", "ray.max_staleness": 0,
                                                                     **extra}))
    assert summary["generator_steps"] == 3
    local, distributed = _losses(tmp_path / "local"), _losses(tmp_path / "ray")
    assert [s for s, _ in local] == [s for s, _ in distributed] == [1, 2, 3]
    assert reward_loss in local[2][1] and local[2][1]["reward/toy-align"] == pytest.approx(
        distributed[2][1]["reward/toy-align"], rel=1e-4)
    assert [s for s, m in local if "val/judge_accuracy" in m] == ([2, 3] if "output.eval_every" in extra else [])
    for (_, a), (_, b) in zip(local, distributed):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    # The ledger: every batch issued once and consumed once, in order, at staleness 0.
    ledger = [json.loads(line) for line in (tmp_path / "ray" / "ledger.jsonl").read_text().splitlines()]
    consumed = [(e["iteration"], e["rank"]) for e in ledger if e["event"] == "consumed"]
    assert consumed == [(i, 0) for i in range(6)]
    assert all(e["generator_step"] == e["weight_version"] for e in ledger if e["event"] == "consumed")
    # Checkpoints land in the local trainer's layout, so eval and resume read either.
    latest = (tmp_path / "ray" / "checkpoints" / "latest").read_text().strip()
    assert (tmp_path / "ray" / "checkpoints" / latest / "generator.safetensors").exists()


def _start_in_background(cfg):
    outcome = {}

    def target():
        try:
            outcome["summary"] = train_distributed(cfg)
        except BaseException as err:  # surfaced by the test
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _coordinator(name, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith(f"{COORDINATOR_PREFIX}{name}-"):
                return ray.get_actor(actor["name"], namespace=actor["namespace"])
        time.sleep(0.5)
    raise TimeoutError("the run's coordinator never started")


def _wait_for(condition, timeout=600):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.5)


def _consumed(out):
    return sum(e["event"] == "consumed" for e in Ledger(FileStore(out)).events())


def _finish(thread, outcome, out, steps):
    thread.join(timeout=900)
    assert not thread.is_alive(), "the run did not finish"
    if "error" in outcome:
        raise outcome["error"]
    summary = outcome["summary"]
    assert summary["generator_steps"] == steps
    assert summary["ledger"]["lost"] == [] and summary["ledger"]["duplicated"] == []
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(logged)) == list(range(1, steps + 1))  # continuous step numbers
    return summary, logged


def _start_eight_step_run(tmp_path, name, checkpoint_every):
    """An 8-generator-step Ray run in a background thread: (output dir, thread, outcome, coordinator)."""
    out = tmp_path / "run"
    cfg = _config(out, **{"trainer.backend": "ray", "trainer.max_steps": 8, "ray.max_staleness": 1,
                          "output.checkpoint_every": checkpoint_every, "name": name})
    thread, outcome = _start_in_background(cfg)
    return out, thread, outcome, _coordinator(name)


@pytest.mark.slow
def test_a_second_launch_into_the_same_directory_trains_afresh(tmp_path, local_ray):
    """Ray Train restores a run of the same name from its storage: a reused output.dir must not continue
    (or, with another dmd.ratio, hang on) the earlier run silently; resuming is trainer.resume_from's job."""
    settings = {"trainer.backend": "ray", "trainer.max_steps": 2, "output.checkpoint_every": 2}
    train_distributed(_config(tmp_path, **settings))
    summary = train_distributed(_config(tmp_path, **settings, **{"dmd.ratio": 1}))
    assert summary["generator_steps"] == 2 and summary["iterations"] == 2
    assert [step for step, _ in _losses(tmp_path)] == [1, 2]
    assert not {k: v for k, v in summary["ledger"].items() if k in ("lost", "duplicated", "unexpected") and v}
    assert len(list((tmp_path / "previous").iterdir())) == 1


@ray.remote(num_cpus=0)
class _Doomed:
    def rollout(self):
        return "never"


@ray.remote(num_cpus=0)
class _FlakyCoordinator:
    """Hands out the refs of a dead rollout worker `deaths` times, then a good batch."""

    def __init__(self, dead: list, good: list, deaths: int):
        self.dead, self.good, self.deaths, self.calls = dead, good, deaths, []

    def request(self, iteration, rank):
        self.calls.append(("request", iteration, rank))
        return self.dead if self.deaths > 0 else self.good

    def reissue(self, iteration, rank):
        self.calls.append(("reissue", iteration, rank))
        self.deaths -= 1
        return self.dead if self.deaths > 0 else self.good

    def history(self):
        return self.calls


def _dead_rollout_ref():
    doomed = _Doomed.remote()
    ray.kill(doomed)
    return doomed.rollout.remote()


def test_a_batch_whose_rollout_worker_died_is_sampled_again(local_ray):
    from learner.loop import fetch_batch

    coordinator = _FlakyCoordinator.remote([_dead_rollout_ref(), 0, 0], [ray.put("the batch"), 1, 0], deaths=2)  # tickets
    assert fetch_batch(coordinator, 3, 1, patience_s=60) == "the batch"
    assert ray.get(coordinator.history.remote()) == [("request", 3, 1), ("reissue", 3, 1), ("reissue", 3, 1)]


def test_a_batch_no_worker_can_sample_ends_the_run_naming_it(local_ray):
    from learner.loop import fetch_batch

    coordinator = _FlakyCoordinator.remote([_dead_rollout_ref(), 0, 0], [ray.put("the batch"), 1, 0], deaths=10**6)
    with pytest.raises(RuntimeError, match=r"no rollout worker could deliver the rollout of batch \(3, rank 1\) within 2 s"):
        fetch_batch(coordinator, 3, 1, patience_s=2)


@pytest.mark.slow
def test_a_killed_rollout_worker_is_replaced_and_no_batch_is_lost(tmp_path, local_ray):
    out, thread, outcome, coordinator = _start_eight_step_run(tmp_path, "kill-rollout", checkpoint_every=4)
    _wait_for(lambda: _consumed(out) >= 4)
    worker = ray.get(coordinator.processes.remote())["rollout_workers"][0]
    ray.kill(worker, no_restart=False)
    summary, logged = _finish(thread, outcome, out, 8)
    assert logged == list(range(1, 9))
    # Ray restarted the run's only rollout worker, so the batches after the kill came from the new process
    # (which reloaded the weights itself). Whether a batch was in flight at the kill is up to timing: the
    # re-issue itself is tested deterministically above.
    from ray.util.state import get_actor

    assert get_actor(worker._actor_id.hex()).num_restarts >= 1


@pytest.mark.slow
def test_a_killed_learner_worker_resumes_from_its_checkpoint_and_no_batch_is_lost(tmp_path, local_ray):
    out, thread, outcome, coordinator = _start_eight_step_run(tmp_path, "kill-learner", checkpoint_every=2)
    _wait_for(lambda: _consumed(out) >= 11)  # past the checkpoint at generator step 4 (iteration 8)
    os.kill(ray.get(coordinator.processes.remote())["learners"][0], signal.SIGKILL)
    summary, logged = _finish(thread, outcome, out, 8)
    assert summary["ledger"]["rewinds"] >= 1
    # the restarted learner resumed at a checkpoint: every 2 generator steps = 4 iterations (dmd.ratio 2)
    rewinds = [e["iteration"] for e in Ledger(FileStore(out)).events() if e["event"] == "rewind"]
    assert rewinds and all(i > 0 and i % 4 == 0 for i in rewinds), rewinds
    repeats = [logged[i] for i in range(1, len(logged)) if logged[i] <= logged[i - 1]]
    assert all(step % 2 == 1 for step in repeats)  # a replay starts right after a checkpoint


@pytest.mark.slow
def test_two_learner_ranks_each_train_on_their_own_shard_of_every_batch(tmp_path, local_ray):
    out = tmp_path / "run"
    summary = train_distributed(_config(out, **{
        "trainer.backend": "ray", "ray.learner_workers": 2, "ray.rollout_actors": 2, "ray.learner_cpus": 0.5,
        "ray.rollout_cpus": 0.5, "trainer.max_steps": 2, "output.checkpoint_every": 2, "output.sample_every": 1,
        "name": "two-ranks"}))
    assert summary["generator_steps"] == 2
    # rank 0 alone writes the sample grids and records (rank 1 goes on to the next all-reduce meanwhile)
    assert sorted(p.name for p in (out / "samples").iterdir()) == sorted(
        f"{kind}_{step:06d}.{ext}" for kind, ext in (("rollout_step", "parquet"), ("step", "parquet"), ("step", "png"))
        for step in (1, 2))
    events = Ledger(FileStore(out)).events()
    consumed = sorted((e["iteration"], e["rank"]) for e in events if e["event"] == "consumed")
    assert consumed == [(i, r) for i in range(4) for r in (0, 1)]
    assert {e["worker"] for e in events if e["event"] == "issued"} == {0, 1}  # both rollout actors sampled
    assert summary["ledger"]["lost"] == [] and summary["ledger"]["duplicated"] == []
    assert summary["replica_divergence"] == 0.0  # both ranks hold bit-identical generator and critic weights


class _Question:
    """A fake `ready` ref, naming the actor (by creation order) that was asked."""

    def __init__(self, index):
        self.index = index


class _InitFailed(ray.exceptions.ActorDiedError):
    actor_init_failed = True  # (Ray's mark of an actor whose constructor raised)


class _FakeWorkers:
    """Stands in for `ray.remote(RolloutWorker)`: each handle's rollout "ref" names the worker that got it.
    `questions`: its `ready` gives a `_Question` (answered as the test's ray.wait / ray.get say), else True."""

    def __init__(self, questions: bool = False):
        self.count = 0
        self.questions = questions
        self.shards: list[tuple[int, int, int]] = []  # (iteration, rank, prompts) of each rollout sent

    def options(self, **_):
        return self

    def remote(self, *_, **__):
        index, self.count = self.count, self.count + 1
        rollout = type("Method", (), {"remote": lambda _, iteration, shard, rank, *rest: (
            self.shards.append((iteration, rank, len(shard))), ("worker", index, iteration, rank, *rest))[1]})()
        null = type("Method", (), {"remote": lambda _: ("null", index)})()
        answer = _Question(index) if self.questions else True  # (True: answered already, the coordinator's mark)
        ready = type("Method", (), {"remote": lambda _: answer})()
        return type("Handle", (), {"rollout": rollout, "null_conditioning": null, "ready": ready})()


def test_a_reissued_batch_goes_to_another_rollout_worker(tmp_path, monkeypatch):
    import actors.coordinator as coordinator_module

    monkeypatch.setattr(coordinator_module.ray, "remote", lambda cls: _FakeWorkers())
    monkeypatch.setattr(coordinator_module.ray, "wait", lambda refs, **_: ([], refs))  # every batch still sampling
    cfg = _config(tmp_path, **{"ray.rollout_actors": 4, "ray.max_staleness": 1})
    coordinator = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=1, run_dir=str(tmp_path))
    coordinator.publish(0, ["weights"])
    first = coordinator.request(0, 0)[0]  # the ticket's ref (the fake's names its worker)
    # iterations 0-3 went out round-robin, so plain round-robin would hand batch 0 back to worker 0
    assert coordinator.next_iteration == 4 and first[1] == 0
    for _ in range(5):  # whatever the round-robin turn, the batch moves away from the worker that failed it
        again = coordinator.reissue(0, 0)[0]
        assert again[0] == "worker" and again[2:4] == (0, 0) and again[1] != first[1]
        first = again
    coordinator.consumed(0, 0, 0, 0)
    assert (0, 0) not in coordinator.batches


def test_a_worker_that_died_is_a_new_incarnation_which_an_earlier_ticket_cannot_kill(tmp_path, monkeypatch):
    """Ray restarts a rollout worker whose process died (max_restarts=-1) without the coordinator: the reissue of
    the batch it failed counts the death once (however many ranks' batches it failed), so that a ticket made
    before it cannot have the restarted worker killed while it loads; a restart the coordinator made itself is
    not counted twice."""
    import actors.coordinator as coordinator_module

    killed = []
    monkeypatch.setattr(coordinator_module.ray, "remote", lambda cls: _FakeWorkers())
    monkeypatch.setattr(coordinator_module.ray, "wait", lambda refs, **_: ([], refs))
    monkeypatch.setattr(coordinator_module.ray, "kill", lambda handle, **_: killed.append(handle))
    cfg = _config(tmp_path, **{"ray.rollout_actors": 1, "ray.max_staleness": 1})
    coordinator = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=2, run_dir=str(tmp_path))
    coordinator.publish(0, ["weights"])
    tickets = {rank: coordinator.request(0, rank) for rank in (0, 1)}
    assert [t[1:] for t in tickets.values()] == [[0, 0], [0, 0]]  # both ranks' batches on worker 0, incarnation 0
    coordinator.reissue(0, 0)  # rank 0's batch failed: worker 0 died
    assert coordinator.incarnations == [1]
    coordinator.reissue(0, 1)  # rank 1's failed in the same death: counted once
    assert coordinator.incarnations == [1]
    assert coordinator.restart_worker(0, 0) is False and killed == []  # a ticket of before: the restarted one lives
    assert coordinator.restart_worker(0, 1) is True and len(killed) == 1 and coordinator.incarnations == [2]
    coordinator.batches[(0, 0)] = coordinator_module.IssuedBatch(("stuck",), 0, 1)  # the batch the kill was for
    coordinator.reissue(0, 0)  # (after restart_worker: already counted)
    assert coordinator.incarnations == [2]
    events = [e["event"] for e in coordinator.ledger.events()]
    assert events.count("worker_died") == 1 and events.count("worker_restarted") == 1


def test_a_batch_reissued_to_the_only_worker_while_it_restarts_fails_in_the_same_death(tmp_path, monkeypatch):
    """With one rollout worker the reissued batch goes back to it while Ray restarts it, and fails as well: that is
    the death already counted (a trial's one kill was counted three times), until the worker answers `ready` again."""
    import actors.coordinator as coordinator_module

    workers, up = _FakeWorkers(questions=True), [True]

    def wait(refs, **_):  # a `ready` question answers while the worker is up; a batch never finishes here
        done = [r for r in refs if isinstance(r, _Question) and up[0]]
        return done, [r for r in refs if not any(r is d for d in done)]

    monkeypatch.setattr(coordinator_module.ray, "remote", lambda cls: workers)
    monkeypatch.setattr(coordinator_module.ray, "wait", wait)
    monkeypatch.setattr(coordinator_module.ray, "get", lambda ref, **_: True)
    cfg = _config(tmp_path, **{"ray.rollout_actors": 1, "ray.max_staleness": 1})
    coordinator = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=1, run_dir=str(tmp_path))
    coordinator.publish(0, ["weights"])
    assert coordinator.ready_workers() == [0]
    coordinator.request(0, 0)
    up[0] = False  # killed: Ray restarts it
    for _ in range(3):  # the batch fails, goes back to the restarting worker, fails again ...
        coordinator.reissue(0, 0)
    assert coordinator.incarnations == [1]
    up[0] = True  # restarted: it answers `ready`, and a later death is a new one
    assert coordinator.ready_workers() == [0] and not coordinator.restarting
    coordinator.reissue(0, 0)
    assert coordinator.incarnations == [2]
    events = [e["event"] for e in coordinator.ledger.events()]
    assert events.count("worker_died") == 2 and events.count("reissued") == 4
    assert coordinator.progress()["notices"] == 2 and coordinator.progress()["recent_notices"][-1].startswith(
        "rollout worker 0 died; Ray starts it again")


def test_a_reissued_batch_goes_to_the_worker_with_the_fewest_batches_outstanding(tmp_path, monkeypatch):
    """A learner waits on a reissued batch, and a worker samples its batches in turn: it goes to the ready worker
    with the least queued, not the next in round-robin (which would put it behind that worker's look-ahead)."""
    import actors.coordinator as coordinator_module

    finished = []  # the refs of batches sampled already (not consumed yet)
    done = lambda ref: any(ref is f for f in finished)  # noqa: E731
    monkeypatch.setattr(coordinator_module.ray, "remote", lambda cls: _FakeWorkers())
    monkeypatch.setattr(coordinator_module.ray, "wait", lambda refs, **_: ([r for r in refs if done(r)],
                                                                           [r for r in refs if not done(r)]))
    cfg = _config(tmp_path, **{"ray.rollout_actors": 4, "ray.max_staleness": 1})
    coordinator = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=1, run_dir=str(tmp_path))
    coordinator.publish(0, ["weights"])
    assert coordinator.request(0, 0)[0][1] == 0  # iterations 0-3 went to workers 0-3; worker 1 is next in turn
    for key, worker in (((90, 0), 1), ((91, 0), 1), ((92, 0), 2)):  # workers 1 and 2 have more queued
        coordinator.batches[key] = coordinator_module.IssuedBatch(("queued",), worker, 0)
    assert coordinator.reissue(0, 0)[0][1] == 3
    coordinator.batches[(93, 0)] = coordinator_module.IssuedBatch(("queued",), 0, 0)  # queued: 0: 1, 1: 3, 2: 2, 3: 1
    assert coordinator.reissue(0, 0)[0][1] == 0  # not worker 3, which failed it this time
    finished += [batch.ref for batch in coordinator.batches.values() if batch.worker == 1]
    assert coordinator.reissue(0, 0)[0][1] == 1  # its 3 batches are done: they do not hold up this one


def test_a_learner_restart_before_any_batch_replaces_the_lost_learners_weights(tmp_path, monkeypatch):
    import actors.coordinator as coordinator_module

    cancelled = []
    monkeypatch.setattr(coordinator_module.ray, "remote", lambda cls: _FakeWorkers())
    monkeypatch.setattr(coordinator_module.ray, "cancel", cancelled.append)
    cfg = _config(tmp_path, **{"ray.rollout_actors": 2, "ray.max_staleness": 1})
    coordinator = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=1, run_dir=str(tmp_path))
    coordinator.start(0)
    coordinator.publish(0, ["weights of the first learner"])
    assert not coordinator.batches  # a try's first publish issues nothing: its ranks' first questions go first
    # the learner group dies before its first request; the new rank 0 starts again at iteration 0
    coordinator.start(0)
    assert coordinator.epoch == 1 and coordinator.publish(0, ["weights of the second"]) == 0
    assert coordinator.weights == ["weights of the second"]
    taken = coordinator.request(0, 0)[0]
    issued = [batch.ref for batch in coordinator.batches.values()]  # issued ahead, and the one the learner took
    assert taken in issued and len(issued) > 1 and all(ref[4:7] == (0, ["weights of the second"], 1) for ref in issued)  # version, weights, epoch
    assert not cancelled
    coordinator.start(0)  # a worker samples its batches one after another: the taken one is cancelled too
    assert cancelled == issued and coordinator.epoch == 2 and not coordinator.batches
    events = [e["event"] for e in Ledger(FileStore(tmp_path)).events() if e["event"] in ("start", "rewind")]
    assert events == ["start", "rewind", "rewind"]


def test_a_replaced_learner_try_cannot_publish_take_batches_or_kill_workers(tmp_path, monkeypatch):
    """A learner try Ray declared dead may still run (a network partition): its calls carry the token of its
    start and are refused, or it would publish its weights over the new try's, take its batches, kill its
    workers or count its failures."""
    import actors.coordinator as coordinator_module
    from actors.coordinator import StaleLearnerError
    from learner.loop import FencedCoordinator, _replaced

    monkeypatch.setattr(coordinator_module.ray, "remote", lambda cls: _FakeWorkers())
    monkeypatch.setattr(coordinator_module.ray, "cancel", lambda ref: None)
    monkeypatch.setattr(coordinator_module.ray, "kill", lambda *a, **k: None)
    cfg = _config(tmp_path, **{"ray.rollout_actors": 2, "ray.max_staleness": 0})
    coordinator = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=1, run_dir=str(tmp_path))
    old = coordinator.start(0)
    coordinator.publish(0, ["old weights"], learner_start=old)
    assert coordinator.request(0, 0, learner_start=old) is not None
    new = coordinator.start(0)  # the new try, from the checkpoint at iteration 0
    assert (old, new) == (1, 2)
    coordinator.publish(0, ["new weights"], learner_start=new)
    for call, args in (("publish", (1, ["zombie weights"])), ("request", (0, 0)), ("reissue", (0, 0)),
                       ("restart_worker", (0, 0))):
        with pytest.raises(StaleLearnerError, match=f"{call} from the learner try of start 1, which a later try \\(start 2\\)"):
            getattr(coordinator, call)(*args, learner_start=old)
    assert coordinator.version == 0 and coordinator.weights == ["new weights"] and coordinator.incarnations == [0, 0]
    ticket = coordinator.request(0, 0, learner_start=new)
    assert ticket[0][4:7] == (0, ["new weights"], 1)  # version, weights, epoch of the new try
    coordinator.consumed(0, 0, 0, 0, learner_start=old)  # fire-and-forget: noted, not counted
    coordinator.consumed(0, 0, 0, 0, learner_start=new)
    assert coordinator.learner_failed(0, "at iteration 0", "ValueError: x", learner_start=old) is False
    assert coordinator.failures_by_try == {}  # the old try's failure does not count against the new one's
    events = Ledger(FileStore(tmp_path)).events()
    assert [e["call"] for e in events if e["event"] == "stale_call"] == ["consumed", "learner_failed"]
    assert audit(events, 1, 1) == {"lost": [], "duplicated": [], "unexpected": [], "rewinds": 1, "reissued": 0, "stale_calls": 2}
    # a replaced try's rank 0 that reaches start() late (it loaded its model slowly) cannot take the run back
    late = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=1, run_dir=str(tmp_path / "c"))
    (_, try_1), (_, try_2) = late.register_learner(0, 100), late.register_learner(0, 200)
    token = late.start(0, learner_try=try_2)
    with pytest.raises(StaleLearnerError, match="start from learner try 1, which a later try \\(2\\) replaced"):
        late.start(0, learner_try=try_1)
    assert late.learner_starts == token and late.epoch == 0  # the new try's token and batches stand
    # a try whose rank 1 registered but whose rank 0 never did (it died first): the next try's rank 0, which may
    # register before that try's rank 1, still starts
    partial = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=2, run_dir=str(tmp_path / "d"))
    assert partial.progress()["learners_registered"] == 0  # (the driver's bar: Ray has not started a learner yet)
    partial.register_learner(1, 100)  # try 1: rank 0 never comes
    assert partial.progress()["learners_registered"] == 1
    _, rank0_try = partial.register_learner(0, 200)  # try 2's rank 0 first ...
    partial.register_learner(1, 300)  # ... then its rank 1
    assert partial.try_number == 2 and partial.start(0, learner_try=rank0_try) == 1
    # a first try that failed before it published anything: the second is fenced from it all the same
    fresh = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=1, run_dir=str(tmp_path / "b"))
    first, second = fresh.start(0), fresh.start(0)
    assert fresh.epoch == 0 and first != second
    with pytest.raises(StaleLearnerError):
        fresh.publish(0, ["the first try's"], learner_start=first)
    # the learner's side: every fenced call carries the try's epoch; a refused try ends quietly, not as a failure
    sent = []
    handle = type("Handle", (), {name: type("Method", (), {"remote": staticmethod(lambda *a, name=name, **k: sent.append((name, a, k)))})()
                                 for name in ("publish", "consumed", "progress")})()
    fenced = FencedCoordinator(handle, 3)
    fenced.publish.remote(2, ["w"])
    fenced.consumed.remote(5, 0, 2, 2)
    fenced.progress.remote()
    assert sent == [("publish", (2, ["w"]), {"learner_start": 3}), ("consumed", (5, 0, 2, 2), {"learner_start": 3}),
                    ("progress", (), {})]
    assert _replaced(RuntimeError("a failure of the try's own")) is False
    wrapped = RuntimeError("the call failed")
    wrapped.__cause__ = StaleLearnerError("publish from a learner try of epoch 0")
    assert _replaced(wrapped)


def test_batches_go_to_the_rollout_workers_that_have_started(tmp_path, monkeypatch):
    """A worker still pending placement (its GPU node being added) or loading its model gets no batches:
    sent one, the batch would wait there until the learner's timeout killed the worker, at each of its turns."""
    import actors.coordinator as coordinator_module

    workers = _FakeWorkers(questions=True)
    answered = {0}  # worker 1 has not answered `ready` yet
    monkeypatch.setattr(coordinator_module.ray, "remote", lambda cls: workers)
    def wait(refs, **_):  # a question answers once its worker is in `answered`; a batch is never done here
        done = [r for r in refs if isinstance(r, _Question) and r.index in answered]
        return done, [r for r in refs if not any(r is d for d in done)]

    monkeypatch.setattr(coordinator_module.ray, "wait", wait)
    monkeypatch.setattr(coordinator_module.ray, "get", lambda ref: True)
    monkeypatch.setattr(coordinator_module.ray, "kill", lambda *a, **k: None)
    cfg = _config(tmp_path, **{"ray.rollout_actors": 2, "ray.max_staleness": 1})
    coordinator = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=1, run_dir=str(tmp_path))
    assert coordinator.null_conditioning(attempt=1)[1] == 0  # the questions too: to a worker that has started
    coordinator.start(0)
    coordinator.publish(0, ["weights"])
    coordinator.request(0, 0)
    assert {batch.worker for batch in coordinator.batches.values()} == {0}  # every batch issued so far: worker 0's
    answered.add(1)  # worker 1 has loaded: the round-robin takes it in
    coordinator.publish(1, ["weights 1"])
    coordinator.request(2, 0)
    assert {batch.worker for batch in coordinator.batches.values()} == {0, 1}
    coordinator.restart_worker(1, 0)  # killed: not ready again until the restarted worker answers
    answered.discard(1)
    assert coordinator.ready_workers() == [0]
    assert coordinator.reissue(2, 0)[1] == 0
    # a worker that failed a batch (it died: Ray restarts it) gets none until it answers again
    answered.add(1)
    assert coordinator.ready_workers() == [0, 1]
    coordinator.batches[(2, 0)].worker = 1
    answered.discard(1)  # (restarting: its new `ready` is not answered yet)
    assert coordinator.reissue(2, 0)[1] == 0 and coordinator.readiness[1] is not True
    assert coordinator.ready_workers() == [0]
    # how an answer that is an error counts: died or restarting, asked again; cannot start at all, "ready"
    # (its batches then end the learner's try with the reason, as before)

    answered.add(1)
    for error, ready in ((ray.exceptions.ActorDiedError(), False), (ray.exceptions.ActorUnavailableError("restarting", b"0" * 16), False),
                         (_InitFailed(), True), (ray.exceptions.RuntimeEnvSetupError("no such package"), True)):
        def fail(ref, error=error):
            raise error

        monkeypatch.setattr(coordinator_module.ray, "get", fail)
        coordinator.readiness[1] = _Question(1)
        coordinator.started_once[1] = False  # (one that had started gets a fresh actor instead: the test below)
        assert (1 in coordinator.ready_workers()) is ready, error
    # no worker started yet (a launch's first question): the round-robin over all, as before
    coordinator.readiness = [_Question(0), _Question(1)]
    answered.clear()
    assert [coordinator.null_conditioning(attempt=a)[1] for a in range(3)] == [0, 1, 0]


def test_a_batch_of_a_generator_version_the_learner_may_not_train_on_is_refused():
    from learner.loop import check_version

    def batch(version):
        return type("Batch", (), {"iteration": 7, "rank": 1, "weight_version": version})()

    check_version(batch(3), 3, 0)
    check_version(batch(2), 3, 1)
    for version, staleness in ((2, 0), (4, 1), (1, 1)):  # older than max_staleness allows, or newer than the learner
        with pytest.raises(RuntimeError, match=rf"batch \(7, rank 1\) was sampled by generator version {version}, but the "
                                               rf"learner at generator step 3 trains on versions"):
            check_version(batch(version), 3, staleness)


def test_a_submitted_jobs_password_and_output_directory(tmp_path, monkeypatch):
    from dmdr_rl.config import WandbSpec
    from dmdr_rl.distributed import JOB_CONFIG_ENV, place_job_output, secrets_runtime_env
    from dmdr_rl.store import PASSWORD_ENV

    cfg = _config(tmp_path, **{"store.url": "redis://127.0.0.1:6380/0"})
    relative = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": "runs/{name}"})})
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert secrets_runtime_env(cfg) == {"env_vars": {PASSWORD_ENV: "s3cret"}}  # ray.init(address=...) passes it on
    assert place_job_output(relative) is relative  # not a submitted job: relative to where it is started
    # a submitted job given the password in its runtime_env: passing it again is a conflict ray.init refuses
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"env_vars": {PASSWORD_ENV: "s3cret"}}}))
    assert secrets_runtime_env(cfg) is None
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    assert secrets_runtime_env(cfg) == {"env_vars": {PASSWORD_ENV: "s3cret"}}
    monkeypatch.setenv("WANDB_API_KEY", "k3y")  # W&B's key too, where the run logs to W&B
    logged = cfg.model_copy(update={"output": cfg.output.model_copy(update={"wandb": WandbSpec(project="p")})})
    assert secrets_runtime_env(cfg) == {"env_vars": {PASSWORD_ENV: "s3cret"}}
    assert secrets_runtime_env(logged) == {"env_vars": {PASSWORD_ENV: "s3cret", "WANDB_API_KEY": "k3y"}}
    assert place_job_output(cfg) is cfg  # absolute
    # relative in a submitted job (whose directory is Ray's temporary copy): under the home directory instead
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    placed = place_job_output(relative)
    assert placed.output_dir == tmp_path / "home" / "runs" / cfg.name and relative.output.dir == "runs/{name}"
    # `~` is the home directory wherever the run is (no shell expands it inside output.dir=~/...)
    tilde = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": "~/elsewhere/{name}"})})
    assert place_job_output(tilde) is tilde and tilde.output_dir == tmp_path / "home" / "elsewhere" / cfg.name
    # a relative local storage path would be in Ray's temporary copy too; a URI stays as it is
    storage = relative.model_copy(update={"ray": relative.ray.model_copy(update={"storage_path": "ckpt"})})
    assert place_job_output(storage).ray.storage_path == str(tmp_path / "home" / "ckpt")
    uri = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"storage_path": "s3://bucket/x"})})
    assert place_job_output(uri) is uri
    only_storage = place_job_output(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"storage_path": "ckpt"})}))
    assert only_storage.output_dir == cfg.output_dir and only_storage.ray.storage_path == str(tmp_path / "home" / "ckpt")


def test_local_paths_in_the_config_are_made_absolute_for_rays_workers(tmp_path, monkeypatch):
    """Ray Train's workers run in a directory of their own (and a cluster's actors where it was started):
    prompt files, model directories, path kwargs and a local storage path reach them absolute; hub ids,
    toy: specs, URIs and other strings are left as they are, even one that names a local folder by chance."""
    from dmdr_rl.distributed import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a small red circle in the center\n")
    (tmp_path / "weights").mkdir()
    cfg = _config(tmp_path, **{"data.prompts": "prompts.txt", "model.path": "weights",
                               "model.kwargs": "{dtype: float32, vae_path: weights, variant: weights}",
                               "ray.storage_path": "ckpt",
                               "rewards.0.kwargs": "{path: weights, cache_dir: not-there, gain: 2, "
                                                   "med_config: prompts.txt, device: weights, extra: prompts.txt, "
                                                   "nested: {vae: {checkpoint: weights}, files: [prompts.txt, 3]}, "
                                                   "cache: s3://bucket/cache, log_dir: s3://bucket/logs}"})
    placed = with_absolute_paths(cfg)
    assert placed.data.prompts == str(tmp_path / "prompts.txt") and placed.model.path == str(tmp_path / "weights")
    assert placed.model.kwargs == {"dtype": "float32", "vae_path": str(tmp_path / "weights"), "variant": "weights"}
    assert placed.rewards[0].kwargs == {
        "path": str(tmp_path / "weights"), "gain": 2, "device": "weights",  # by key; not a folder's name by chance
        "cache_dir": str(tmp_path / "not-there"),  # a directory the model creates: absolute before it exists
        "med_config": str(tmp_path / "prompts.txt"), "extra": str(tmp_path / "prompts.txt"),  # by key, by suffix
        "nested": {"vae": {"checkpoint": str(tmp_path / "weights")}, "files": [str(tmp_path / "prompts.txt"), 3]},
        "cache": "s3://bucket/cache", "log_dir": "s3://bucket/logs"}  # (URIs as they are)
    assert placed.ray.storage_path == str(tmp_path / "ckpt")
    assert cfg.data.prompts == "prompts.txt"  # the original is left alone
    hub = _config(tmp_path, **{"model.path": "stabilityai/stable-diffusion-3-medium-diffusers",
                               "ray.storage_path": "s3://bucket/runs"})
    placed = with_absolute_paths(hub)
    assert placed.model.path == hub.model.path and placed.ray.storage_path == "s3://bucket/runs"
    assert placed.data.prompts == hub.data.prompts and hub.data.prompts.startswith("toy:")


def test_the_users_backbone_and_reward_modules_are_sent_to_the_ray_the_run_starts_or_joins(tmp_path, monkeypatch):
    """Their files, or their packages' directories, in the job's py_modules, each once; never an installed package or
    this project's, nor into a submitted job (its own runtime_env decides)."""
    import sys

    from dmdr_rl.distributed import JOB_CONFIG_ENV, user_code, with_user_code

    (tmp_path / "mine.py").write_text("def build(**_): pass\n")
    (tmp_path / "my_rewards.py").write_text("class Bright: pass\n")
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "models.py").write_text("def build(**_): pass\n")
    (tmp_path / "my_pkg" / "rewards.py").write_text("class Bright: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("mine", "my_pkg", "my_rewards"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    assert user_code(_config(tmp_path, **{"model.backbone": "mine:build"})) == [str(tmp_path / "mine.py")]
    assert user_code(_config(tmp_path, **{"model.backbone": "my_pkg.models:build"})) == [str(tmp_path / "my_pkg")]
    for installed in ("toy", "dmdr_rl.registry:BACKBONES", "torch.nn:Linear"):
        assert user_code(_config(tmp_path, **{"model.backbone": installed})) == []
    rewards = "[{name: toy-align}, {name: 'my_rewards:Bright'}, {name: 'my_pkg.rewards:Bright'}]"
    assert user_code(_config(tmp_path, **{"model.backbone": "my_pkg.models:build", "rewards": rewards})) == [
        str(tmp_path / "my_pkg"), str(tmp_path / "my_rewards.py")]
    assert not any(name in sys.modules for name in ("mine", "my_pkg", "my_rewards"))  # (found, not imported)
    cfg = _config(tmp_path, **{"model.backbone": "mine:build"})
    assert with_user_code({"env_vars": {"A": "1"}}, cfg) == {"env_vars": {"A": "1"}, "py_modules": [str(tmp_path / "mine.py")]}
    assert with_user_code(None, _config(tmp_path)) is None
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "."}}))
    assert with_user_code(None, cfg) is None


def test_a_run_started_beside_a_running_cluster_joins_it(tmp_path, monkeypatch):
    """With a `ray start` cluster on the machine, ray.init(num_cpus=...) refuses to start another Ray: the
    run joins that cluster instead of failing with Ray's ValueError."""
    import dmdr_rl.distributed as distributed

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if "num_cpus" in kwargs:
            raise ValueError("When connecting to an existing cluster, num_cpus and num_gpus must not be provided.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert distributed.connect(_config(tmp_path)) == "the Ray cluster already running on this machine"
    assert [c.get("address") for c in calls] == [None, "auto"]


def test_a_local_ray_runs_without_the_preemption_watcher_unless_the_user_chose(tmp_path, monkeypatch):
    """The Ray a run starts on this machine gets Ray Train's preemption watcher off (nothing to watch on one
    machine, and its start prints a core_worker error line); a user's own setting is left alone, and a run
    that joins a cluster never sets it."""
    import dmdr_rl.distributed as distributed

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    monkeypatch.setattr(distributed, "check_reachable", lambda *a: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(distributed.PREEMPTION_WATCHER_ENV, raising=False)
    assert distributed.connect(_config(tmp_path)) == "local"
    assert calls[-1]["runtime_env"] == {"env_vars": {distributed.PREEMPTION_WATCHER_ENV: "0"}}
    monkeypatch.setenv(distributed.PREEMPTION_WATCHER_ENV, "1")
    distributed.connect(_config(tmp_path))
    assert calls[-1]["runtime_env"] is None
    monkeypatch.delenv(distributed.PREEMPTION_WATCHER_ENV)
    distributed.connect(_config(tmp_path, **{"ray.address": "127.0.0.1:6379"}))
    assert calls[-1]["address"] == "127.0.0.1:6379" and calls[-1]["runtime_env"] is None


def test_ray_trains_log_level_comes_from_the_config(tmp_path):
    """Ray Train's console lines (worker group, each checkpoint with its metrics) are at WARNING unless
    ray.train_log_level says otherwise; the trainer is built without a Ray."""
    import dmdr_rl.distributed as distributed

    assert distributed._torch_trainer(_config(tmp_path), None, tmp_path).run_config.logging_config.log_level == "WARNING"
    chatty = _config(tmp_path, **{"ray.train_log_level": "INFO"})
    assert distributed._torch_trainer(chatty, None, tmp_path).run_config.logging_config.log_level == "INFO"
    with pytest.raises(ConfigError, match="ray.train_log_level"):
        _config(tmp_path, **{"ray.train_log_level": "LOUD"})


def test_the_learner_gives_ray_trains_report_lines_the_runs_log_level():
    """The per-checkpoint "Reporting training result" line comes from the logger of Ray Train's context module,
    which LoggingConfig misses: the learner sets that very logger (restored afterwards)."""
    import logging

    from ray.train.v2._internal.execution import context as train_context

    from learner.loop import quiet_report_lines

    before = train_context.logger.level
    try:
        quiet_report_lines("WARNING")
        assert train_context.logger.level == logging.WARNING
        assert not train_context.logger.isEnabledFor(logging.INFO)
    finally:
        train_context.logger.setLevel(before)


def test_gradients_are_averaged_in_place_bucket_by_bucket(monkeypatch):
    """Each bucket is one all-reduce whose sum over the ranks, divided by their number, goes back into the very
    gradient tensors (no second copy of a full fine-tune's gradients); a missing gradient counts as 0."""
    import learner.loop as loop

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((3, 4), (5,), (2, 2), (7,))]
    for p in params[:3]:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params[:3]]
    grads = [p.grad for p in params[:3]]
    sizes = []

    def all_reduce(flat):  # two ranks, the other one's gradients three times these
        sizes.append(flat.numel())
        flat.mul_(4.0)

    monkeypatch.setattr(loop.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(loop.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(loop, "GRADIENT_BUCKET_ELEMENTS", 16)
    loop.average_gradients(params)
    assert sizes == [12, 5 + 4 + 7]  # buckets of at most 16 elements, in order
    for p, grad, old in zip(params, grads, before):
        assert p.grad is grad  # averaged in place
        torch.testing.assert_close(p.grad, 2.0 * old)  # (g + 3 g) / 2
    assert torch.equal(params[3].grad, torch.zeros(7))


def test_the_coordinator_sizes_each_batch_by_the_generator_step_that_trains_it_split_over_the_ranks(tmp_path, monkeypatch):
    """trainer.batch_size in the cold start, trainer.batch_size_rl after it (as the local trainer sizes them), each
    split evenly over the learner ranks; a size that does not split is refused before any worker starts."""
    import actors.coordinator as coordinator_module

    workers = _FakeWorkers()
    monkeypatch.setattr(coordinator_module.ray, "remote", lambda cls: workers)
    sizes = {"trainer.batch_size": 4, "trainer.batch_size_rl": 2, "trainer.cold_start": 1, "dmd.ratio": 1}
    cfg = _config(tmp_path, **sizes, **{"ray.max_staleness": 0})
    coordinator = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=2, run_dir=str(tmp_path))
    for step in range(2):
        coordinator.publish(step, [f"weights at step {step}"])
        coordinator.request(step, 0), coordinator.request(step, 1)
    assert sorted(set(workers.shards)) == [(0, 0, 2), (0, 1, 2), (1, 0, 1), (1, 1, 1)]  # 4 prompts, then 2, over 2 ranks
    uneven = _config(tmp_path, **{**sizes, "trainer.batch_size_rl": 3})
    with pytest.raises(ValueError, match=r"trainer.batch_size_rl=3 must divide evenly over ray.learner_workers=2"):
        coordinator_module.RolloutCoordinator(uneven.model_dump(mode="json"), world_size=2, run_dir=str(tmp_path))


def test_a_run_resumed_with_another_ratio_gets_its_batches_from_the_learners_generator_step(tmp_path, monkeypatch):
    """Trained at dmd.ratio=2 to iteration 4 (generator step 2), resumed at ratio 1: the batch of
    iteration 4 is trained at generator step 2, not 4 // 1 = 4 (which no published version would reach)."""
    import actors.coordinator as coordinator_module

    monkeypatch.setattr(coordinator_module.ray, "remote", lambda cls: _FakeWorkers())
    monkeypatch.setattr(coordinator_module.ray, "cancel", lambda ref: None)
    cfg = _config(tmp_path, **{"dmd.ratio": 1, "ray.max_staleness": 0})
    coordinator = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=1, run_dir=str(tmp_path))
    coordinator.start(4, generator_step=2)
    coordinator.publish(2, ["weights at step 2"])
    batch = coordinator.request(4, 0)[0]
    assert batch[2] == 4 and batch[4] == 2  # iteration 4, sampled by version 2: exactly the local trainer's
    assert batch[7] == 2  # the worker is told the step that trains it (GRPO's cold start: what to score)
    assert coordinator.request(5, 0) is None  # iteration 5 is trained at step 3: not published yet
    assert coordinator.progress()["next_needs_version"] == 3
    coordinator.publish(3, ["weights at step 3"], losses={"L_dmd": "0.42"})
    assert coordinator.progress()["losses"] == {"L_dmd": "0.42"}  # (the driver's progress bar shows them)
    assert not coordinator.batches[(5, 0)].taken  # issued as the weights it waited for came, before the learner asks
    assert coordinator.request(5, 0)[0][4] == 3 and coordinator.training_step(5) == 3
    starts = [e for e in Ledger(FileStore(tmp_path)).events() if e["event"] == "start"]
    assert starts == [{**starts[0], "iteration": 4, "world_size": 1}]
    # the same run at one ratio throughout: the step is iteration // ratio, as before
    coordinator.start(6)
    assert coordinator.started_at == (6, 6)


class _Ref:
    """A fake ObjectRef: `stuck` ones time out in ray.get, the others give `value`."""

    def __init__(self, value=None, stuck=False):
        self.value, self.stuck = value, stuck


def _fake_get(monkeypatch):
    import learner.loop as loop

    def get(obj, timeout=None):
        if isinstance(obj, _Ref):
            if obj.stuck:
                raise loop.ray.exceptions.GetTimeoutError("stuck")
            return obj.value
        return obj  # a fake coordinator's answer, already there

    monkeypatch.setattr(loop.ray, "get", get)
    return loop


def _fake_coordinator(**methods):
    return type("Coordinator", (), {name: type("Method", (), {"remote": staticmethod(fn)})() for name, fn in methods.items()})()


def test_a_stuck_rollout_worker_is_restarted_and_the_batch_sampled_again(monkeypatch):
    loop = _fake_get(monkeypatch)
    restarted, reissued = [], []
    coordinator = _fake_coordinator(request=lambda i, r: [_Ref(stuck=True), 1, 0],  # worker 1, first incarnation
                                    restart_worker=lambda worker, incarnation: restarted.append((worker, incarnation)),
                                    reissue=lambda i, r: reissued.append((i, r)) or [_Ref("the batch"), 1, 1])
    assert loop.fetch_batch(coordinator, 3, 1, patience_s=0.01) == "the batch"
    assert restarted == [(1, 0)] and reissued == [(3, 1)]  # the worker the stuck ref went to, as it was then
    coordinator = _fake_coordinator(request=lambda i, r: [_Ref(stuck=True), 0, 0], restart_worker=lambda *a: None,
                                    reissue=lambda i, r: [_Ref(stuck=True), 0, 1])
    with pytest.raises(RuntimeError, match=r"batch \(3, rank 1\) did not finish within 0 s, also after its rollout worker was restarted"):
        loop.fetch_batch(coordinator, 3, 1, patience_s=0.01)


def test_a_reissued_batch_gets_the_full_patience_and_a_healthy_worker_is_not_killed(monkeypatch):
    """Worker 0 dies late in the batch's wait; the batch goes to worker 1, which is slow but healthy: its
    ref is waited on for the whole patience, not what was left of the first one's (review finding)."""
    import learner.loop as loop

    monkeypatch.setattr(loop.time, "sleep", lambda s: None)
    waits = []

    def get(obj, timeout=None):
        if isinstance(obj, _Ref):
            waits.append(timeout)
            if obj.value == "dies":
                raise loop.ray.exceptions.ActorDiedError()
            return obj.value
        return obj

    monkeypatch.setattr(loop.ray, "get", get)
    coordinator = _fake_coordinator(request=lambda i, r: [_Ref("dies"), 0, 0], restart_worker=lambda *a: pytest.fail("killed"),
                                    reissue=lambda i, r: [_Ref("the batch"), 1, 0])
    assert loop.fetch_batch(coordinator, 0, 0, patience_s=600) == "the batch"
    assert waits == [600, 600]


def test_a_question_to_a_stuck_rollout_worker_restarts_it_after_a_learner_restart(monkeypatch):
    """After a learner restart the coordinator must not wait on a stuck worker itself (every learner call
    would hang behind it): it hands out refs, and the learner waits with its timeout and restarts it."""
    loop = _fake_get(monkeypatch)
    restarted, asked = [], []
    incarnations = iter([0, 1])

    def null_conditioning(attempt):
        asked.append(attempt)
        incarnation = next(incarnations)
        return [_Ref(stuck=incarnation == 0, value="null conditioning"), 0, incarnation]

    coordinator = _fake_coordinator(null_conditioning=null_conditioning,
                                    restart_worker=lambda worker, incarnation: restarted.append((worker, incarnation)))
    assert loop.ask_a_worker(coordinator, "null_conditioning", patience_s=0.01, restart_stuck=True) == "null conditioning"
    assert restarted == [(0, 0)] and asked == [0, 1]  # asked again: the next worker in turn (one worker: itself, restarted)
    coordinator = _fake_coordinator(null_conditioning=lambda attempt: [_Ref(stuck=True), 0, 0], restart_worker=lambda *a: None)
    with pytest.raises(RuntimeError, match=r"the answer to null_conditioning did not finish within 0 s, "
                                           "also after its rollout worker was restarted"):
        loop.ask_a_worker(coordinator, "null_conditioning", patience_s=0.01, restart_stuck=True)


def test_at_a_first_start_a_question_waits_for_a_worker_that_loads_its_model(monkeypatch):
    """As long as it loads (no patience: a large model's first load takes what it takes), unless another
    worker starts first: worker 0 may wait for a node that never comes, while worker 1 could answer."""
    import learner.loop as loop

    timeouts = []
    loading = {0: 3}  # worker 0 answers at its 4th look; worker 1 at once

    def get(obj, timeout=None):
        if not isinstance(obj, _Ref):
            return obj
        timeouts.append(timeout)
        if loading.get(obj.value, 0) > 0:
            loading[obj.value] -= 1
            raise loop.ray.exceptions.GetTimeoutError("loading")
        return f"null conditioning from worker {obj.value}"

    monkeypatch.setattr(loop.ray, "get", get)
    asked, started_in_turn = [], iter([[], [0], [0]])  # none started yet, then worker 0 itself
    coordinator = _fake_coordinator(null_conditioning=lambda attempt: asked.append(attempt) or [_Ref(attempt % 2), attempt % 2, 0],
                                    ready_workers=lambda: next(started_in_turn),
                                    restart_worker=lambda *a: pytest.fail("a loading worker was killed"))
    ask = {"patience_s": 5, "restart_stuck": False}
    # worker 0 is waited for past the patience (a first load has no timeout of its own)
    assert loop.ask_a_worker(coordinator, "null_conditioning", **ask) == "null conditioning from worker 0"
    assert timeouts == [loop.LOADING_CHECK_S] * 4 and asked == [0]
    # worker 1 starts while worker 0 still loads: the question goes to worker 1
    loading[0], timeouts[:], asked[:] = 3, [], []
    started_in_turn = iter([[1]])
    assert loop.ask_a_worker(coordinator, "null_conditioning", **ask) == "null conditioning from worker 1"
    assert asked == [0, 1] and len(timeouts) == 2


def test_a_question_waiting_long_for_the_first_rollout_worker_says_so(monkeypatch, capsys):
    """A load that hangs (a hub download, a node that never comes) must not be silent for ever."""
    import learner.loop as loop

    clock = [0.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    looks = [0]

    def get(obj, timeout=None):
        if not isinstance(obj, _Ref):
            return obj
        looks[0] += 1
        clock[0] += timeout  # each look waits its timeout out
        if looks[0] <= 30:  # 300 s of loading
            raise loop.ray.exceptions.GetTimeoutError("loading")
        return "null conditioning"

    monkeypatch.setattr(loop.ray, "get", get)
    coordinator = _fake_coordinator(null_conditioning=lambda attempt: [_Ref(0), 0, 0], ready_workers=lambda: [])
    assert loop.ask_a_worker(coordinator, "null_conditioning", patience_s=5, restart_stuck=False) == "null conditioning"
    notices = [line for line in capsys.readouterr().out.splitlines() if "no rollout worker has started" in line]
    assert [n.split(" in ")[1].split(" s ")[0] for n in notices] == ["120", "240"]  # every LOADING_NOTICE_S


def test_a_rollout_worker_that_failed_to_start_ends_the_try_at_once_as_the_runs_own_error(monkeypatch):
    # Ray does not restart an actor whose __init__ raised: waiting out the patience would only delay the error
    import learner.loop as loop

    monkeypatch.setattr(loop.time, "sleep", lambda s: pytest.fail("waited for a worker that cannot come back"))
    failed = loop.ray.exceptions.RayActorError(
        error_msg="The actor died because of an error raised in its creation task, ray::RolloutWorker.__init__()\n"
                  "  File ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        actor_init_failed=True)

    def get(obj, timeout=None):
        if isinstance(obj, _Ref):
            raise failed
        return obj

    monkeypatch.setattr(loop.ray, "get", get)
    asked = []
    coordinator = _fake_coordinator(request=lambda i, r: [_Ref("never"), 0, 0], reissue=lambda i, r: pytest.fail("reissued"),
                                    replace_failed_worker=lambda *a: asked.append(a) or False)  # it never started
    with pytest.raises(RuntimeError, match=r"a rollout worker failed to start, so the rollout of batch \(0, rank 0\) "
                                           r"cannot be made: torch.OutOfMemoryError: CUDA out of memory") as caught:
        loop.fetch_batch(coordinator, 0, 0, patience_s=600)
    assert loop.own_error(caught.value) is caught.value  # counted by same_failure_limit, not retried forever
    assert asked == [(0, 0)]  # the worker and incarnation of the ticket


def test_a_rollout_worker_whose_restart_failed_to_construct_is_replaced_and_its_batch_sampled_again(monkeypatch):
    """A restart's constructor can fail where the first one did not (the killed process still held the GPU):
    the coordinator gives the slot a fresh actor, and the learner takes the batch from the next ticket."""
    import learner.loop as loop

    monkeypatch.setattr(loop.time, "sleep", lambda s: None)
    failed = loop.ray.exceptions.RayActorError(error_msg="torch.OutOfMemoryError: CUDA out of memory",
                                               actor_init_failed=True)

    def get(obj, timeout=None):
        if isinstance(obj, _Ref):
            if obj.value is None:
                raise failed
            return obj.value
        return obj

    monkeypatch.setattr(loop.ray, "get", get)
    replaced, reissued = [], []
    coordinator = _fake_coordinator(request=lambda i, r: [_Ref(None), 1, 2],
                                    replace_failed_worker=lambda *a: replaced.append(a) or True,
                                    reissue=lambda i, r: reissued.append((i, r)) or [_Ref("the batch"), 1, 3])
    assert loop.fetch_batch(coordinator, 5, 0, patience_s=600) == "the batch"
    assert replaced == [(1, 2)] and reissued == [(5, 0)]


def test_the_coordinator_replaces_a_worker_whose_restart_failed_to_construct_a_bounded_number_of_times(tmp_path,
                                                                                                      monkeypatch):
    import actors.coordinator as coordinator_module

    workers = _FakeWorkers(questions=True)
    broken = set()  # actors (by creation order) whose constructor raised

    def get(ref):
        if ref.index in broken:
            raise _InitFailed()
        return True

    monkeypatch.setattr(coordinator_module.ray, "remote", lambda cls: workers)
    monkeypatch.setattr(coordinator_module.ray, "wait", lambda refs, **_: (list(refs), []))  # every question answered
    monkeypatch.setattr(coordinator_module.ray, "get", get)
    monkeypatch.setattr(coordinator_module.ray, "kill", lambda *a, **k: None)
    cfg = _config(tmp_path, **{"ray.rollout_actors": 2, "ray.max_staleness": 1})
    broken.add(1)  # worker 1's first constructor fails: a setting, not bad luck
    coordinator = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=1, run_dir=str(tmp_path))
    assert coordinator.ready_workers() == [0, 1]  # (1 "ready": its batches end the try with the reason, as before)
    assert workers.count == 2 and coordinator.replace_failed_worker(1, 0) is False
    # worker 0 started; its restart fails in the constructor: a fresh actor, up to WORKER_REPLACEMENTS times
    assert coordinator.restart_worker(0, 0) is True
    broken.update(range(2, 2 + coordinator_module.WORKER_REPLACEMENTS))  # the fresh actors fail too
    broken.add(0)
    coordinator.readiness[0] = _Question(0)  # (the restarted actor's question: its constructor raises)
    for _ in range(coordinator_module.WORKER_REPLACEMENTS):
        assert coordinator.ready_workers() == [1]  # 0 replaced: its fresh actor is asked again
    assert coordinator.ready_workers() == [0, 1]  # the replacements used up: left failed, as a first failure
    assert coordinator.replacements[0] == coordinator_module.WORKER_REPLACEMENTS
    assert workers.count == 2 + coordinator_module.WORKER_REPLACEMENTS
    assert coordinator.incarnations[0] == 1 + coordinator_module.WORKER_REPLACEMENTS
    assert coordinator.replace_failed_worker(0, coordinator.incarnations[0]) is False  # used up
    assert coordinator.replace_failed_worker(0, 0) is True  # an old ticket's: replaced since, nothing done
    assert workers.count == 2 + coordinator_module.WORKER_REPLACEMENTS
    events = [r["event"] for r in coordinator.ledger.store.read("ledger")]
    assert events.count("worker_replaced") == coordinator_module.WORKER_REPLACEMENTS


def test_a_question_waits_for_a_restarting_rollout_worker(monkeypatch):
    """The only worker was just restarted (ActorUnavailableError: restarting): asked again after a wait,
    not given up on at once."""
    import learner.loop as loop

    monkeypatch.setattr(loop.time, "sleep", lambda s: None)
    restarting = iter([True, True, False])

    def get(obj, timeout=None):
        if isinstance(obj, _Ref):
            if next(restarting):
                raise loop.ray.exceptions.ActorUnavailableError("The actor is restarting", b"\0" * 16)
            return obj.value
        return obj

    monkeypatch.setattr(loop.ray, "get", get)
    coordinator = _fake_coordinator(null_conditioning=lambda attempt: [_Ref("null conditioning"), attempt, 0])
    assert loop.ask_a_worker(coordinator, "null_conditioning", patience_s=60, restart_stuck=True) == "null conditioning"


def test_the_coordinator_restarts_a_worker_once_per_incarnation(tmp_path, monkeypatch):
    """Two ranks time out on the same stuck worker: the first restarts it, the second's request (for the
    incarnation that is gone) kills nothing, so the fresh worker is not killed again."""
    import actors.coordinator as coordinator_module

    killed = []
    monkeypatch.setattr(coordinator_module.ray, "remote", lambda cls: _FakeWorkers())
    monkeypatch.setattr(coordinator_module.ray, "kill", lambda actor, no_restart: killed.append((actor, no_restart)))
    monkeypatch.setattr(coordinator_module.ray, "wait", lambda refs, **_: ([], refs))  # every batch still sampling
    cfg = _config(tmp_path, **{"ray.rollout_actors": 3, "ray.max_staleness": 0})
    coordinator = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=1, run_dir=str(tmp_path))
    coordinator.publish(0, ["weights"])
    ticket = coordinator.request(0, 0)
    assert ticket[1:] == [0, 0]  # worker 0, first incarnation
    assert coordinator.restart_worker(0, 0) is True and coordinator.restart_worker(0, 0) is False
    assert killed == [(coordinator.workers[0], False)]  # Ray starts it again
    assert coordinator.null_conditioning(attempt=3)[1:] == [0, 1]  # 3 mod 3: the fresh incarnation
    _, worker, incarnation = coordinator.reissue(0, 0)
    assert worker != 0 and incarnation == 0  # the batch moves to another worker, in its first incarnation
    events = [e for e in Ledger(FileStore(tmp_path)).events() if e["event"] == "worker_restarted"]
    assert [(e["worker"], e["incarnation"]) for e in events] == [(0, 1)]


def test_a_ray_run_resumed_from_a_finished_checkpoint_stops_before_ray_starts(tmp_path, monkeypatch):
    import dmdr_rl.distributed as distributed
    from dmdr_rl.config import ConfigError

    checkpoint = tmp_path / "done" / "checkpoints" / "step_000004"
    checkpoint.mkdir(parents=True)
    torch.save({"iteration": 8, "generator_step": 4}, checkpoint / "trainer_state.pt")
    monkeypatch.setattr(distributed, "connect", lambda cfg: pytest.fail("Ray was started"))
    cfg = _config(tmp_path / "out", **{"trainer.backend": "ray", "trainer.max_steps": 4, "trainer.resume_from": str(checkpoint)})
    with pytest.raises(ConfigError, match="is at generator step 4, and trainer.max_steps=4: nothing is left to train"):
        distributed.train_distributed(cfg)


def test_a_resumed_ray_run_says_where_it_resumes_from_and_its_started_event_records_it(tmp_path, monkeypatch, capsys):
    """(Without Ray: its actors and Ray Train stand-ins, as in the test below.)"""
    import contextlib

    import ray

    import dmdr_rl.distributed as distributed

    cfg = _config(tmp_path / "out", **{"trainer.backend": "ray", "trainer.max_steps": 6})
    fresh = distributed.ray_start_lines(cfg, "local", tmp_path / "out")
    assert fresh.startswith("dmdr_rl: Ray (local): 1 learner worker(s), 1 rollout actor(s)") and "resuming" not in fresh
    checkpoint = tmp_path / "done" / "checkpoints" / "step_000004"
    checkpoint.mkdir(parents=True)
    torch.save({"iteration": 8, "generator_step": 4}, checkpoint / "trainer_state.pt")
    cfg.trainer.resume_from = str(checkpoint)  # (a checkpoint's absolute path, as train_distributed makes it)
    remote = type("Remote", (), {"options": lambda self, **_: self, "remote": lambda self, *_: object()})()
    monkeypatch.setattr(ray, "remote", lambda cls: remote)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("Context", (), {"get_node_id": lambda self: "ab" * 28})())
    monkeypatch.setattr(distributed, "_shut_down", lambda coordinator: None)
    monkeypatch.setattr(distributed, "_torch_trainer", lambda *a: "trainer")
    monkeypatch.setattr(distributed, "_fit_and_summarise", lambda *a, **k: {"generator_steps": 6})
    started = []

    @contextlib.contextmanager
    def recorded(store, **fields):
        started.append(fields)
        yield {}

    monkeypatch.setattr(distributed, "run_events", recorded)
    distributed._train_on_ray(cfg, "local")
    assert capsys.readouterr().out.splitlines()[1] == (f"dmdr_rl: resuming from {checkpoint} (generator step 4 of "
                                                       "trainer.max_steps=6)")
    assert started[0]["resume_from"] == str(checkpoint) and started[0]["generator_step"] == 4


def test_logged_metrics_are_the_whole_batchs_over_the_ranks():
    from learner.loop import mean_over_ranks

    ranks = [{"loss/dmd": torch.tensor(0.2), "reward/r": float("nan"), "reward/r/non_finite": torch.tensor(2.0),
              "rollout/reward/r": 0.5, "time/step_s": 3.0, "schedule/lr_generator": 1e-5},
             {"loss/dmd": torch.tensor(0.4), "reward/r": 0.7, "reward/r/non_finite": torch.tensor(1.0),
              "rollout/reward/r": 0.1, "time/step_s": 9.0, "schedule/lr_generator": 1e-5}]
    sent = []
    for metrics in ranks:  # what each rank puts into the all-reduce (shards of 2 images)
        mean_over_ranks(metrics, torch.device("cpu"), 2, lambda tensor: sent.append(tensor.clone()))
    merged = mean_over_ranks(ranks[1], torch.device("cpu"), 2, lambda tensor: tensor.copy_(sent[0] + sent[1]))  # SUM
    assert merged["loss/dmd"] == pytest.approx(0.3) and merged["rollout/reward/r"] == pytest.approx(0.3)
    assert merged["reward/r"] == pytest.approx(0.7)  # the rank whose every score failed does not count
    assert merged["reward/r/non_finite"] == 3.0  # counts add up
    assert merged["time/step_s"] == 9.0 and merged["schedule/lr_generator"] == 1e-5  # this rank's own
    # a reward mean is weighted by each rank's finite scores: 1 of 4 at 0.1 and 4 of 4 at 0.9 -> 3.7 / 5
    a, b = {"reward/r": 0.1, "reward/r/non_finite": 3.0}, {"reward/r": 0.9, "reward/r/non_finite": 0.0}
    sent.clear()
    for metrics in (a, b):
        mean_over_ranks(metrics, torch.device("cpu"), 4, lambda tensor: sent.append(tensor.clone()))
    merged = mean_over_ranks(b, torch.device("cpu"), 4, lambda tensor: tensor.copy_(sent[0] + sent[1]))
    assert merged["reward/r"] == pytest.approx(0.74) and merged["reward/r/non_finite"] == 3.0
    # and so is a rollout's monitored reward, with the count the learner logs beside it (test_grpo)
    a, b = {"rollout/reward/r": 0.1, "rollout/reward/r/non_finite": 3.0}, {"rollout/reward/r": 0.9, "rollout/reward/r/non_finite": 0.0}
    sent.clear()
    for metrics in (a, b):
        mean_over_ranks(metrics, torch.device("cpu"), 4, lambda tensor: sent.append(tensor.clone()))
    merged = mean_over_ranks(b, torch.device("cpu"), 4, lambda tensor: tensor.copy_(sent[0] + sent[1]))
    assert merged["rollout/reward/r"] == pytest.approx(0.74)
    # a loss that is not finite on one rank (its update is skipped) is logged NaN, as one process would log it
    a, b = {"loss/dmd": float("nan"), "reward/r": 0.5}, {"loss/dmd": 0.4, "reward/r": 0.7}
    sent.clear()
    for metrics in (a, b):
        mean_over_ranks(metrics, torch.device("cpu"), 4, lambda tensor: sent.append(tensor.clone()))
    merged = mean_over_ranks(b, torch.device("cpu"), 4, lambda tensor: tensor.copy_(sent[0] + sent[1]))
    assert math.isnan(merged["loss/dmd"]) and merged["reward/r"] == pytest.approx(0.6)


def test_a_checkpoint_reports_the_whole_batchs_metrics_at_a_step_that_is_not_logged(tmp_path):
    """The ranks average their metrics (a collective) whenever they leave the learner: in the log, and in a
    checkpoint's Ray Train report, whose losses were rank 0's shard alone at steps that were not logged."""
    from dmdr_rl.trainer import step_duties

    cfg = _config(tmp_path, **{"trainer.max_steps": 7, "output.log_every": 2, "output.checkpoint_every": 3,
                               "output.sample_every": 5})
    duties = {step: step_duties(step, cfg) for step in range(1, 8)}
    assert [s for s, d in duties.items() if d.log] == [2, 4, 6, 7]  # the last step always
    assert [s for s, d in duties.items() if d.checkpoint] == [3, 6, 7]
    assert [s for s, d in duties.items() if d.sample] == [5, 7]
    assert [s for s, d in duties.items() if d.shows_metrics] == [2, 3, 4, 6, 7]
    from learner.loop import metrics_leaving

    averaged = []  # the steps whose metrics leave the learner averaged over two ranks (the collective's calls)
    for step, step_duty in duties.items():
        metrics_leaving({"loss/dmd": 0.5}, step_duty, 2, lambda shard, s=step: averaged.append(s) or shard)
    assert averaged == [2, 3, 4, 6, 7]  # step 3: a checkpoint only, its report the whole batch's too
    assert metrics_leaving({"loss/dmd": 0.5}, duties[3], 1, lambda shard: pytest.fail("one rank averages nothing")) == {
        "loss/dmd": 0.5}


def test_the_progress_bar_times_the_steps_not_the_loading_before_them(monkeypatch):
    """30 s of loading before 60-s steps, polled every second: the bar's rate is a step's time from the first
    step on (the loading once made a 1-minute run's bar say 14 minutes left); it says what the wait before the
    first step is; a resumed launch shows no rate until it has trained; a learner restart is said as it begins."""
    import io

    from tqdm.auto import tqdm

    import dmdr_rl.distributed as distributed

    clock = [1000.0]
    monkeypatch.setattr(distributed.time, "time", lambda: clock[0])
    out = io.StringIO()
    bar = tqdm(total=100, file=out, desc="train")
    bar._time = lambda: clock[0]  # (tqdm's own clock)
    bar.start_t = bar.last_print_t = clock[0]
    shown = lambda: out.getvalue().split("\r")[-1]  # noqa: E731

    def poll(version: int, started: int = 0, epoch: int = 0, **more):
        distributed.show_progress(bar, {"version": version, "started_step": started, "epoch": epoch,
                                        "iteration": 5 * max(version, 0), **more})
        clock[0] += 1.0

    poll(-1, learners_registered=0)  # Ray has not started a learner yet (it may be waiting for free CPUs)
    assert "starting: Ray places and starts the learners" in shown() and bar.n == 0
    for _ in range(30):  # loading: nothing published yet
        poll(-1, learners_registered=1)
    assert "starting: learners and rollout workers load" in shown() and bar.n == 0
    for step in range(3):  # the starting weights published (version 0), then a step a minute
        for _ in range(60):
            poll(step, losses={"L_dmd": f"0.4{step}"})
    poll(3, losses={"L_dmd": "0.43"})
    assert bar.n == 3 and "L_dmd=0.43, iteration=16" in shown()  # (the losses, as the local trainer's bar)
    assert 50.0 < 1.0 / bar.format_dict["rate"] < 70.0  # about a minute a step: from the first step on
    assert bar.format_dict["elapsed"] > 200.0  # (the elapsed time still counts the loading)

    poll(3, learner_restarting=True, losses={"L_dmd": "0.43"})  # a learner try failed: said at once
    assert "learner restarting (from its last checkpoint)" in shown() and bar.n == 3
    poll(-1, started=2, epoch=1)  # the restored learner started from its checkpoint at step 2
    assert "learner restarting from generator step 2" in shown() and bar.n == 2

    resumed = tqdm(total=1000, file=io.StringIO(), desc="train")
    resumed._time = lambda: clock[0]
    resumed.start_t = resumed.last_print_t = clock[0] - 30.0
    distributed.show_progress(resumed, {"version": -1, "started_step": 500, "epoch": 0, "iteration": 0})
    assert resumed.n == 500 and resumed.format_dict["rate"] is None  # no rate from the 500 steps of earlier launches
    assert "?it/s" in tqdm.format_meter(**resumed.format_dict)
    compiling = tqdm(total=10, file=io.StringIO(), desc="train")  # model.compile: the first step compiles too
    distributed.show_progress(compiling, {"version": -1, "started_step": 0, "epoch": 0, "iteration": 0}, compiles=True)
    assert "rollout workers load their models and compile their blocks" in compiling.postfix
    closed_out = io.StringIO()  # closed, the bar's last line has the steps' rate, not the average since it was made
    closed = tqdm(total=3, file=closed_out, desc="train")
    closed._time = lambda: clock[0]
    closed.start_t = closed.last_print_t = clock[0]
    for version in [-1] * 30 + [0] * 60 + [1] * 60 + [2] * 60 + [3]:  # 30 s of loading, then a step a minute
        distributed.show_progress(closed, {"version": version, "started_step": 0, "epoch": 0, "iteration": 0})
        clock[0] += 1.0
    distributed.close_bar(closed)
    last = closed_out.getvalue().split("\r")[-1]
    assert "3/3 [03:0" in last and re.search(r"6[01]\.\d\ds/it", last), last  # (not 70 s/it: loading included)


def test_the_driver_says_what_befell_the_workers_and_the_learners_above_the_bar(capsys):
    """A killed rollout worker was silent on the console, and a learner restart showed only in the bar's postfix
    (and Ray Train's traceback): each now has a line of its own, once."""
    import io

    from tqdm.auto import tqdm

    import dmdr_rl.distributed as distributed

    bar = tqdm(total=10, file=io.StringIO())
    died = ["rollout worker 0 died; Ray starts it again"]
    polls = [{"epoch": 0, "started_step": 0, "notices": 0, "recent_notices": [], "learner_tries": 1},
             {"epoch": 0, "started_step": 0, "notices": 1, "recent_notices": died, "learner_tries": 1},
             {"epoch": 0, "started_step": 0, "notices": 1, "recent_notices": died, "learner_tries": 1},
             {"epoch": 0, "started_step": 0, "notices": 1, "recent_notices": died, "learner_tries": 2},  # a new try
             {"epoch": 1, "started_step": 3, "notices": 1, "recent_notices": died, "learner_tries": 2},  # it started
             {"epoch": 1, "started_step": 3, "notices": 1, "recent_notices": died, "learner_tries": 2},
             {"epoch": 2, "started_step": 6, "notices": 1, "recent_notices": died, "learner_tries": 3},  # between polls
             {"epoch": 2, "started_step": 6, "notices": 14, "recent_notices": [f"n{i}" for i in range(10)],
              "learner_tries": 3}]  # more than the coordinator keeps for the bar
    latest: dict = {}
    for progress in polls:
        distributed.report_events(bar, progress, latest)
        latest.update(progress)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dmdr_rl:")]
    ended = ("dmdr_rl: a learner try ended; Ray Train started the learners again, from the last checkpoint "
             "(ray.max_failures)")
    assert said == ["dmdr_rl: rollout worker 0 died; Ray starts it again", ended,
                    "dmdr_rl: the learners restarted from generator step 3; the steps after it are trained again",
                    ended, "dmdr_rl: the learners restarted from generator step 6; the steps after it are trained again",
                    "dmdr_rl: (3 earlier events of the rollout workers: see ledger.jsonl)",
                    *[f"dmdr_rl: n{i}" for i in range(10)]]


def test_a_dead_coordinator_ends_the_run_instead_of_learner_retries(tmp_path, monkeypatch):
    """With it gone every learner retry fails at once (forever with ray.max_failures=-1): the driver
    sees it die and ends the run with an error naming the way to resume."""
    import ray

    import dmdr_rl.distributed as distributed

    def dead(*_, **__):
        raise ray.exceptions.ActorDiedError()

    monkeypatch.setattr(ray, "get", dead)
    monkeypatch.setattr(ray, "kill", lambda *_, **__: None)
    monkeypatch.setattr(distributed, "PROGRESS_POLL_S", 0.01)
    never = threading.Event()
    trainer = type("Trainer", (), {"fit": lambda self: never.wait()})()  # Ray Train retrying, on and on
    coordinator = _fake_coordinator(progress=lambda: "ref", close_store=lambda: "ref", processes=lambda: "ref",
                                    failure=lambda: "ref")
    cfg = _config(tmp_path, **{"trainer.backend": "ray"})
    with pytest.raises(RuntimeError, match=r"rollout coordinator died.*it saved no checkpoint: start it again"):
        distributed._fit_and_summarise(cfg, trainer, coordinator, None, tmp_path)
    never.set()


def test_a_learner_whose_coordinator_dies_mid_run_ends_with_one_line_not_a_traceback(monkeypatch, capsys):
    """`ray job stop` kills the driver, and its coordinator, 3 s after its SIGTERM: each learner rank's next call
    to it fails. That ends the rank quietly (as at registration); another actor's death is still raised."""
    import ray

    import learner.loop as loop

    coordinator_id = "c0ffee" * 4
    coordinator = _fake_coordinator(register_learner=lambda rank, pid: "ref")
    coordinator._actor_id = type("ActorID", (), {"hex": lambda self: coordinator_id})()

    def died(actor_id):
        err = ray.exceptions.ActorDiedError()
        err.actor_id = actor_id
        return err

    def train_until(err):
        def _train(*_, **__):
            raise RuntimeError("the batch could not be fetched") from err
        return _train

    monkeypatch.setattr(loop.ray.train, "get_context", lambda: type("Context", (), {"get_world_rank": lambda self: 0,
                                                                                    "get_world_size": lambda self: 1})())
    monkeypatch.setattr(loop.ray, "get", lambda *_, **__: (None, 1))  # registered
    config = {"cfg": _config("/tmp/unused").model_dump(mode="json"), "coordinator": coordinator, "output_dir": "/tmp/unused"}
    monkeypatch.setattr(loop, "_train", train_until(died(coordinator_id)))
    assert loop.train_loop_per_worker(config) is None
    assert "learner rank 0: the run's rollout coordinator is gone (the run was stopped" in capsys.readouterr().out
    monkeypatch.setattr(loop, "_train", train_until(died("another actor")))  # a rollout worker's, say
    with pytest.raises(RuntimeError, match="could not be fetched"):
        loop.train_loop_per_worker(config)


def test_a_learner_retry_after_the_coordinator_died_ends_quietly_instead_of_being_retried(monkeypatch):
    """Raised, its error would be the infrastructure's, and Ray Train would retry (forever with
    ray.max_failures=-1) while the driver has already given up."""
    import ray

    import learner.loop as loop

    def gone(*_, **__):
        raise ray.exceptions.ActorDiedError()

    monkeypatch.setattr(loop.ray.train, "get_context", lambda: type("Context", (), {"get_world_rank": lambda self: 0,
                                                                                    "get_world_size": lambda self: 1})())
    monkeypatch.setattr(loop.ray, "get", gone)
    monkeypatch.setattr(loop, "_train", lambda *a, **k: pytest.fail("trained without a coordinator"))
    coordinator = _fake_coordinator(register_learner=lambda rank, pid: "ref")  # (its answer: ray.get raises)
    config = {"cfg": _config("/tmp/unused").model_dump(mode="json"), "coordinator": coordinator, "output_dir": "/tmp/unused"}
    assert loop.train_loop_per_worker(config) is None

    def unavailable(*_, **__):  # alive but not answering for now (a network blip): a retry may get through
        raise ray.exceptions.ActorUnavailableError("unreachable for now", b"0" * 16)

    monkeypatch.setattr(loop.ray, "get", unavailable)
    with pytest.raises(ray.exceptions.ActorUnavailableError):
        loop.train_loop_per_worker(config)


def test_the_runs_actors_are_shut_down_once_whatever_fails(tmp_path, monkeypatch):
    import contextlib

    import ray

    import dmdr_rl.distributed as distributed

    coordinator, stopped = object(), []
    remote = type("Remote", (), {"options": lambda self, **_: self, "remote": lambda self, *_: coordinator})()
    monkeypatch.setattr(ray, "remote", lambda cls: remote)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("Context", (), {"get_node_id": lambda self: "ab" * 28})())
    monkeypatch.setattr(distributed, "_shut_down", stopped.append)
    monkeypatch.setattr(distributed, "_torch_trainer", lambda *a: "trainer")

    @contextlib.contextmanager
    def unstorable(*_, **__):  # the run's first event cannot be stored (Redis went away, a full disk)
        raise OSError("the store refused the run's started event")
        yield

    monkeypatch.setattr(distributed, "run_events", unstorable)
    cfg = _config(tmp_path, **{"trainer.backend": "ray"})
    with pytest.raises(OSError, match="started event"):
        distributed._train_on_ray(cfg, "local")
    assert stopped == [coordinator]  # before: the coordinator and its rollout workers lived on with the driver

    @contextlib.contextmanager
    def stored(*_, **__):
        yield {}

    def fit(cfg, trainer, coordinator, store, out, shut_down, reached):
        shut_down()  # (before the audit, as the real one does)
        return {"generator_steps": 3}

    monkeypatch.setattr(distributed, "run_events", stored)
    monkeypatch.setattr(distributed, "_fit_and_summarise", fit)
    assert distributed._train_on_ray(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(
        update={"resume_from": None})}), "local") == {"generator_steps": 3}
    assert stopped == [coordinator, coordinator]  # once per launch


def test_the_coordinator_ends_the_run_when_a_learner_failure_recurs_in_consecutive_tries(tmp_path, monkeypatch):
    """Ranks failing in one try count once (a try begins when a rank registers again, whichever rank it
    is); the same failure in a second try in a row ends the run
    (ray.same_failure_limit=2); another place, another error or a try in between with another failure
    does not; 0 turns it off."""
    import actors.coordinator as coordinator_module

    monkeypatch.setattr(coordinator_module.ray, "remote", lambda cls: _FakeWorkers())
    here, bad = "at iteration 7, generator step 3", "ValueError: bad"

    def coordinator(limit):
        cfg = _config(tmp_path, **{"ray.same_failure_limit": limit})
        return coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=2, run_dir=str(tmp_path))

    def new_try(c, ranks=(1, 0)):  # rank 1 may register before rank 0
        return [c.register_learner(rank, 100)[0] for rank in ranks]

    c = coordinator(2)
    new_try(c)
    assert c.learner_failed(0, here, bad) is False
    assert c.learner_failed(1, here, bad) is False  # the same try
    new_try(c, ranks=(1,))  # rank 0 never came up: a try all the same
    assert c.learner_failed(1, "while the learner was built, restoring nothing", "OSError: disk") is False
    new_try(c)
    assert c.learner_failed(0, "at iteration 8, generator step 3", bad) is False  # elsewhere
    assert c.learner_failed(1, here, "ValueError: other") is False  # another error
    new_try(c)
    assert c.learner_failed(0, here, bad) is False  # the try before failed otherwise: 1 in a row
    assert c.failure() is None
    new_try(c, ranks=(0,))
    assert c.learner_failed(0, here, "ValueError: bad, masked differently", key=bad) is True  # compared by key
    assert c.failure() == ("ValueError: bad, masked differently (at iteration 7, generator step 3; the same in 2 "
                           "tries of the learner in a row, ray.same_failure_limit)")
    assert new_try(c) == [c.failure(), c.failure()]  # the next try is told, and ends at once
    events = [e for e in Ledger(FileStore(tmp_path)).events() if e["event"] == "learner_failed"]
    assert [(e["rank"], e["tries_in_a_row"]) for e in events] == [(0, 1), (1, 1), (1, 1), (0, 1), (1, 1), (0, 1), (0, 2)]
    # a rank that registers first in a new try and fails fast is counted in the new try, not the last one
    c = coordinator(2)
    new_try(c, ranks=(0, 1))
    assert c.learner_failed(0, here, bad) is False
    new_try(c, ranks=(0, 1))
    assert c.learner_failed(0, here, "ValueError: other") is False
    assert c.register_learner(1, 100) == (None, 2) and c.try_number == 3  # rank 1 first in the third try
    assert c.learner_failed(1, here, bad) is False  # not "bad" twice in a row: the second try failed otherwise
    off = coordinator(0)
    for _ in range(5):
        new_try(off)
        assert off.learner_failed(0, "while the learner was built, restoring nothing", "OSError: disk") is False
    # a failure every try would meet again (the probe of a reward found its model broken) ends the run at once
    new_try(c := coordinator(2))
    assert c.learner_failed(0, here, bad, final=True) is True
    new_try(never := coordinator(0))  # (ray.same_failure_limit=0 turns off the count of repeats, not this)
    assert never.learner_failed(0, here, bad, final=True) is True
    assert c.failure() == f"{bad} ({here}; another try would meet it again)" and new_try(c) == [c.failure()] * 2


def test_a_learner_reports_its_own_errors_and_the_causes_of_remote_ones_but_not_the_infrastructures(monkeypatch):
    import learner.loop as loop

    reported = []
    monkeypatch.setattr(loop.ray, "get", lambda ref, timeout=None: ref)
    coordinator = _fake_coordinator(learner_failed=lambda *args, final: reported.append((*args, final)))
    learner = type("Learner", (), {"iteration": 9, "generator_step": 4})()
    loop.report_failure(coordinator, 1, {"restoring": "/ck/a", "learner": learner}, ValueError(f"bad at {hex(id(object()))}"))
    loop.report_failure(coordinator, 0, {"restoring": "/ck/a"}, OSError("no such file /tmp/tmpab12cd/x"))
    broken = RuntimeError("rewards.0 (mine), scoring two samples before training: ...")
    broken.ends_the_run = True  # (as the probe of the rewards marks a model's own failure)
    loop.report_failure(coordinator, 0, {"restoring": "/ck/a", "learner": learner}, broken)
    assert [(rank, where, key, final) for rank, where, _, key, final in reported] == [
        (1, "at iteration 9, generator step 4", "ValueError: bad at ADDRESS", False),
        (0, "while the learner was built, restoring /ck/a", "OSError: no such file /tmp/?", False),
        (0, "at iteration 9, generator step 4", "RuntimeError: rewards.N (mine), scoring two samples before training: ...",
         True)]
    assert reported[1][2] == "OSError: no such file /tmp/tmpab12cd/x"  # the message keeps the real text
    oom = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB; 1.31 GiB free"
    assert loop.failure_key(oom) == loop.failure_key(oom.replace("1.31", "1.29"))

    def raised_remotely(err):
        try:
            raise err
        except Exception as inner:
            return ray.exceptions.RayTaskError("request", "traceback", inner)

    out_of_order = ValueError("batch (3, rank 0) requested out of order")
    assert loop.own_error(raised_remotely(out_of_order)) is out_of_order  # a coordinator's bug counts
    assert loop.own_error(raised_remotely(ray.exceptions.ActorDiedError())) is None
    assert loop.own_error(ray.exceptions.ActorDiedError()) is None
    assert loop.own_error(torch.distributed.DistBackendError("NCCL peer gone")) is None
    assert loop.own_error(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")) is None
    cuda = RuntimeError("CUDA out of memory")
    assert loop.own_error(cuda) is cuda
    gloo_bug = RuntimeError("gloo: unsupported dtype BFloat16 for all_reduce")
    assert loop.own_error(gloo_bug) is gloo_bug  # gloo, but not a lost peer
    assert loop.own_error(ray.exceptions.RayTaskError("request", "traceback", None)) is None  # no cause to count
    nested = raised_remotely(raised_remotely(out_of_order))
    assert loop.own_error(nested) is out_of_order

    def raised_from(cause, message):
        try:
            raise RuntimeError(message) from cause
        except RuntimeError as err:
            return err

    # the learner's own errors about lost or stuck rollout workers are the infrastructure's
    assert loop.own_error(raised_from(ray.exceptions.GetTimeoutError(), "the rollout of batch (3, rank 0) did not finish")) is None
    assert loop.own_error(raised_from(ray.exceptions.ActorDiedError(), "no rollout worker could deliver")) is None
    client = raised_from(raised_remotely(out_of_order), "reward app 'toy' failed")  # a server's bug, wrapped by a client
    assert loop.own_error(client) is client
    # a reward app the client could not reach through its retries: the run's own (another try cannot fix it)
    from reward_servers.protocol import RewardServerError

    for cause in (ray.exceptions.GetTimeoutError(), ray.exceptions.ActorDiedError()):
        unreachable = RewardServerError("reward app 'reward-toy' did not answer score_and_grad() after 4 attempt(s)")
        unreachable.__cause__ = cause
        assert loop.own_error(unreachable) is unreachable
        assert loop.own_error(raised_remotely(unreachable)) is unreachable  # met by a rollout worker's monitor


def test_a_reward_the_probe_finds_broken_ends_the_try_without_an_error_once_the_coordinator_holds_it(monkeypatch, capsys):
    """Raised, Ray Train would start another try (reloading the model) only for it to end at registration."""
    import learner.loop as loop
    from dmdr_rl.config import RunConfig
    from reward_servers.protocol import RewardOutputError, RewardServerError

    def probe_raising(err):
        monkeypatch.setattr(loop, "probe_rewards", lambda *a, **k: (_ for _ in ()).throw(err))

    def ends(learner_failed):
        coordinator = _fake_coordinator(learner_failed=learner_failed)
        learner = type("Learner", (), {"iteration": 0, "generator_step": 0, "rewards": []})()
        return loop._probe_ends_the_run(coordinator, {"learner": learner}, None, ["a"], RunConfig())

    reported = []
    monkeypatch.setattr(loop.ray, "get", lambda ref, timeout=None: ref)
    broken = RewardOutputError("rewards.0 (mine), scoring two samples before training: scores of shape [2, 3]")
    broken.ends_the_run = True
    probe_raising(broken)
    assert ends(lambda *args, final: reported.append(final)) is True and reported == [True]
    assert "a reward model cannot score, so the run ends" in capsys.readouterr().out
    with pytest.raises(RewardOutputError):  # the coordinator could not be told: Ray Train's retries and limit
        ends(lambda *args, final: (_ for _ in ()).throw(ray.exceptions.ActorDiedError()))
    probe_raising(RewardServerError("reward app 'reward-toy' did not answer"))  # (it may next time)
    with pytest.raises(RewardServerError):
        ends(lambda *args, final: pytest.fail("reported here"))
    monkeypatch.setattr(loop, "probe_rewards", lambda *a, **k: None)
    assert ends(lambda *args, final: pytest.fail("reported")) is False


def test_the_driver_raises_the_repeated_failure_and_never_summarises_a_run_that_stopped_early(tmp_path, monkeypatch):
    import ray

    import dmdr_rl.distributed as distributed

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    monkeypatch.setattr(ray, "kill", lambda *_, **__: None)
    monkeypatch.setattr(distributed, "PROGRESS_POLL_S", 0.01)
    stopped_early = type("Result", (), {"metrics": {"generator_step": 2, "iteration": 4}, "checkpoint": None})()
    trainer = type("Trainer", (), {"fit": lambda self: stopped_early})()
    methods = {"progress": lambda: {"version": 2, "iteration": 4}, "close_store": lambda: None,
               "processes": lambda: {"rollout_workers": []}}
    cfg = _config(tmp_path, **{"trainer.backend": "ray", "trainer.max_steps": 3})
    repeated = _fake_coordinator(failure=lambda: "ValueError: bad (at iteration 4, generator step 2; ...)", **methods)
    from dmdr_rl.cli import fixable_errors
    from dmdr_rl.errors import LearnerFailedError

    assert LearnerFailedError in fixable_errors()  # (a command's one `error:` line: the learner's traceback is above)
    with pytest.raises(LearnerFailedError, match=r"^the learner failed, and the run ends rather than try again: ValueError: bad "
                                           r".*\. Fix the cause; it saved no checkpoint: start it again$"):
        distributed._fit_and_summarise(cfg, trainer, repeated, None, tmp_path)
    silent = _fake_coordinator(failure=lambda: None, **methods)
    with pytest.raises(RuntimeError, match="the learner stopped at generator step 2 of trainer.max_steps=3"):
        distributed._fit_and_summarise(cfg, trainer, silent, None, tmp_path)
    cfg.ray.storage_path = "s3://bucket/runs"
    assert "under ray.storage_path=s3://bucket/runs" in distributed.how_to_continue(cfg, tmp_path)
    cfg.trainer.backend = "local"  # (a local run has no Ray Train checkpoints there)
    assert "storage_path" not in distributed.how_to_continue(cfg, tmp_path)


@pytest.mark.slow
def test_a_learner_that_fails_the_same_way_twice_ends_the_run_not_after_every_retry(tmp_path, local_ray):
    """A corrupt checkpoint fails every learner try identically: the run ends after two tries with that
    error and the resume hint, not after ray.max_failures + 1."""
    LocalTrainer(_config(tmp_path / "first", **{"trainer.max_steps": 2, "output.checkpoint_every": 2})).train()
    checkpoint = tmp_path / "first" / "checkpoints" / "step_000002"
    (checkpoint / "critic.safetensors").write_bytes(b"not a safetensors file")
    cfg = _config(tmp_path / "run", **{"trainer.backend": "ray", "trainer.resume_from": str(checkpoint),
                                       "ray.max_failures": 5, "name": "corrupt"})
    with pytest.raises(RuntimeError, match=r"the run ends rather than try again: .*while the learner was built, restoring "
                                           rf"{re.escape(str(checkpoint))}; the same in 2 tries of the learner in a row, "
                                           rf"ray.same_failure_limit\)\. Fix the cause; this launch saved no checkpoint: "
                                           rf"run the same command again, which "
                                           rf"resumes from {re.escape(str(checkpoint))}"):
        train_distributed(cfg)
    failed = [e for e in Ledger(FileStore(tmp_path / "run")).events() if e["event"] == "learner_failed"]
    assert [e["tries_in_a_row"] for e in failed] == [1, 2]  # the third try ended at once, and no other was made


def test_a_run_that_ended_early_says_where_to_continue_from(tmp_path):
    """The command that continues it: from this launch's newest checkpoint, with the config this launch saved
    beside it (not from an earlier run's still in the directory); without one, the same command again (not
    another run's config); and nothing once all steps are done."""
    from dmdr_rl.trainer import how_to_continue

    out = tmp_path / "run"
    cfg = _config(out, **{"trainer.backend": "ray", "trainer.max_steps": 4})
    assert how_to_continue(cfg, out) == "it saved no checkpoint: start it again"
    earlier = tmp_path / "earlier"
    LocalTrainer(_config(earlier, **{"trainer.max_steps": 2, "output.checkpoint_every": 2})).train()
    cfg.trainer.resume_from = str(earlier / "checkpoints" / "step_000002")
    assert how_to_continue(cfg, out) == ("this launch saved no checkpoint: run the same command again, which resumes "
                                         f"from {cfg.trainer.resume_from}")  # (not --preset earlier/config.yaml)
    saved = out / "ray_train" / "corrupt-1" / "checkpoint_2026"
    saved.mkdir(parents=True)
    (out / "config.yaml").write_text("name: run\n")
    for name in ("generator.safetensors", "critic.safetensors", "trainer_state.pt"):
        (saved / name).write_bytes(b"")
    started = time.time()
    assert how_to_continue(cfg, out) == (f"continue with `python -m dmdr_rl.run --preset {out}/config.yaml "
                                         f"trainer.resume_from={saved}`")  # the newest, exactly
    cfg.ray.storage_path = "s3://bucket/runs"  # (one this launch kept in its directory comes first all the same)
    assert how_to_continue(cfg, out).startswith("continue with `python -m dmdr_rl.run")
    os.utime(saved / "trainer_state.pt", (started - 60, started - 60))  # an earlier launch's, not this one's
    assert "under ray.storage_path" in how_to_continue(cfg, out, since=started)
    cfg.ray.storage_path = None
    assert how_to_continue(cfg, out, since=started).startswith("this launch saved no checkpoint")
    cfg.trainer.max_steps = 2
    assert how_to_continue(cfg, earlier) == ("it had trained all trainer.max_steps=2, nothing to continue: "
                                             f"{earlier / 'checkpoints' / 'step_000002'}")


def test_the_coordinator_and_the_app_claims_start_without_the_model_stack():
    """Each is a Ray actor process of its own that loads no model: importing torch, peft and transformers
    there cost seconds at every launch and 0.8 GB on the driver's node."""
    import subprocess
    import sys

    code = ("import sys, actors.coordinator, actors.app_claim; "
            "print(sorted(m for m in ('torch', 'peft', 'transformers', 'diffusers') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_a_store_unreachable_as_the_run_ends_leaves_the_trained_run_unaudited_not_failed(monkeypatch, capsys):
    import dmdr_rl.distributed as distributed
    from dmdr_rl.store import StoreError

    class FlakyStore:
        def __init__(self, failures):
            self.failures = failures

        def read(self, stream):
            if self.failures:
                self.failures -= 1
                raise StoreError("cannot read dmdr:r1:ledger from redis://store:6380/0 (connection refused)")
            return [{"event": "start", "iteration": 0, "world_size": 1},
                    {"event": "consumed", "iteration": 0, "rank": 0, "weight_version": 0, "generator_step": 0}]

    monkeypatch.setattr(distributed.time, "sleep", lambda s: None)
    assert distributed.audit_ledger(FlakyStore(2), 1, 1)["lost"] == []  # Redis back within the patience
    assert distributed.audit_ledger(FlakyStore(10**6), 1, 1, patience_s=0) == {
        "unaudited": "cannot read dmdr:r1:ledger from redis://store:6380/0 (connection refused)"}
    assert "the prompt ledger could not be read to audit it" in capsys.readouterr().out


def test_a_stop_request_reaches_the_learner_through_the_coordinator_and_is_not_a_batch(tmp_path, monkeypatch):
    """Ctrl-C on the driver: the coordinator holds the request, rank 0 reads it (and shares it with the other
    ranks), and the ledger notes it without counting it as a batch."""
    import actors.coordinator as coordinator_module
    import learner.loop as loop
    from dmdr_rl.ledger import audit

    monkeypatch.setattr(coordinator_module.ray, "remote", lambda cls: _FakeWorkers())
    cfg = _config(tmp_path, **{"ray.rollout_actors": 1, "ray.max_staleness": 0})
    coordinator = coordinator_module.RolloutCoordinator(cfg.model_dump(mode="json"), world_size=1, run_dir=str(tmp_path))
    assert coordinator.stop_requested() is False
    coordinator.request_stop()
    assert coordinator.stop_requested() is True
    events = list(coordinator.ledger.store.read("ledger"))
    assert [e["event"] for e in events] == ["stop_requested"] and audit(events, 0, 1)["lost"] == []
    monkeypatch.setattr(loop.ray, "get", lambda value: value)
    asked = _fake_coordinator(stop_requested=lambda: True)
    assert loop.stop_requested(asked, rank=0, world=1, device="cpu") is True
    assert loop.stop_requested(_fake_coordinator(stop_requested=lambda: False), rank=0, world=1, device="cpu") is False
    # another rank does not ask: it takes rank 0's answer (a broadcast, with several ranks)
    assert loop.stop_requested(_fake_coordinator(stop_requested=lambda: pytest.fail("asked")), 1, 1, "cpu") is False


@pytest.mark.slow
def test_ctrl_c_ends_a_ray_runs_generator_step_with_a_checkpoint_and_the_run_resumes_from_it(tmp_path):
    """Ctrl-C in a terminal reaches the driver and every process of its group: the learners finish their
    generator step, report a checkpoint, and the run stops (rc 130, `stopped`) naming it; the resumed run
    trains on from there, and its ledger shows no batch lost or used twice."""
    import subprocess
    import sys
    from pathlib import Path

    from dmdr_rl.trainer import checkpoint_generator_step, resume_checkpoint

    repo, out = Path(__file__).resolve().parents[1], tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(repo))
    common = [sys.executable, "-m", "dmdr_rl.run", "--num-images", "4", "ray.address=local", "ray.local_cpus=2"]
    stopped = subprocess.Popen([*common, "--preset", "toy-demo", "trainer.max_steps=300", "trainer.batch_size=4",
                                "dmd.ratio=2", "trainer.cold_start=1", "student.steps=2", "output.log_every=1",
                                "output.checkpoint_every=1000", f"output.dir={out}"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True,  # (its own process group, as a terminal's job)
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (also under `&`)
    deadline = time.monotonic() + 600
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert stopped.poll() is None and time.monotonic() < deadline, stopped.communicate()[0][-3000:]
        time.sleep(0.5)
    time.sleep(2.5)  # (the driver polls the progress each second: it has seen a trained step by now)
    os.killpg(stopped.pid, signal.SIGINT)
    printed = stopped.communicate(timeout=600)[0]
    assert stopped.returncode == 130, printed[-3000:]
    step = checkpoint_generator_step(resume_checkpoint(out))
    checkpoint = out / "checkpoints" / f"step_{step:06d}"  # (Ray Train's, copied where a resume looks first)
    assert 3 <= step < 300 and (f"dmdr_rl: stopped (continue with `python -m dmdr_rl.run --preset {out}/config.yaml "
                                f"trainer.resume_from={checkpoint}`)") in printed
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "stopped"
    resumed = subprocess.run([*common, "--preset", str(out / "config.yaml"), f"trainer.resume_from={out}",
                              f"trainer.max_steps={step + 2}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["generator_steps"] == step + 2
    assert summary["ledger"]["lost"] == [] and summary["ledger"]["duplicated"] == []


@pytest.mark.parametrize("case", ["under way", "starting", "ended otherwise"])
def test_the_driver_passes_a_ctrl_c_on_to_the_learners_or_stops_at_once(tmp_path, monkeypatch, case):
    """A first Ctrl-C while steps are being trained asks the learners to stop at a step's end (and the run then
    stops, as asked); while the launch has trained no step yet, it stops at once (nothing to wait for); a fit
    that ends early without having stopped as asked is the learner's failure, not a stop."""
    import ray

    import dmdr_rl.distributed as distributed

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    monkeypatch.setattr(ray, "kill", lambda *_, **__: None)
    monkeypatch.setattr(distributed, "PROGRESS_POLL_S", 0.01)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (as in a terminal)
    asked, versions = [], iter([0, 1, 2, 3] + [3] * 10_000 if case != "starting" else [0] * 10_000)

    def fit(self):
        while not asked:
            time.sleep(0.01)
        if case == "starting":  # (still loading: the driver must not wait for it)
            time.sleep(30)
        metrics = {"generator_step": 3, "iteration": 6, **({"stopped": 1.0} if case == "under way" else {})}
        return type("Result", (), {"metrics": metrics, "checkpoint": None})()

    def progress():
        version = next(versions)
        if version == 2 or (case == "starting" and not asked):
            asked.append("signal") if case == "starting" else None
            os.kill(os.getpid(), signal.SIGINT)  # (handled on the main thread, which polls this)
        return {"version": version, "iteration": 2 * version, "started_step": 0, "epoch": 0}

    coordinator = _fake_coordinator(progress=progress, close_store=lambda: None, processes=lambda: {"rollout_workers": []},
                                    failure=lambda: None, request_stop=lambda: asked.append("request_stop"))
    cfg = _config(tmp_path, **{"trainer.backend": "ray", "trainer.max_steps": 10})
    trainer = type("Trainer", (), {"fit": fit})()
    try:
        reached: dict = {}  # (what the run's end event says: watch shows it when no metrics were logged yet)
        if case == "ended otherwise":
            with pytest.raises(RuntimeError, match="the learner stopped at generator step 3 of trainer.max_steps=10"):
                distributed._fit_and_summarise(cfg, trainer, coordinator, None, tmp_path, reached=reached)
        else:
            with pytest.raises(KeyboardInterrupt):
                distributed._fit_and_summarise(cfg, trainer, coordinator, None, tmp_path, reached=reached)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ("request_stop" in asked) is (case != "starting")
    assert reached.get("generator_step") == (None if case == "starting" else 3)


def _stop_answers_of_rank(rank: int, world: int, init_file: str, answers: str) -> None:
    import torch.distributed as dist

    import learner.loop as loop

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    loop.ray.get = lambda value: value  # (the fake coordinator's answer is the value itself)
    got = []
    for rank0_reads in (True, False):
        asked = _fake_coordinator(stop_requested=lambda: rank0_reads if rank == 0 else pytest.fail("only rank 0 asks"))
        got.append(loop.stop_requested(asked, rank, world, "cpu"))
    with open(f"{answers}.{rank}", "w") as f:
        f.write(repr(got))
    dist.destroy_process_group()


def test_every_learner_rank_gets_rank_0s_answer_to_whether_to_stop(tmp_path):
    """Rank 0 alone asks the coordinator; the other ranks take its answer, so all end after the same step."""
    import torch.multiprocessing as mp

    mp.spawn(_stop_answers_of_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "answer")), nprocs=2)
    assert [(tmp_path / f"answer.{rank}").read_text() for rank in (0, 1)] == ["[True, False]"] * 2
