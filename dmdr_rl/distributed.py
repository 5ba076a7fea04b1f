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
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .config import RAY_CLIENT_REFUSED, URL_NOT_CLUSTER, ConfigError, RunConfig, is_cluster_address
from .errors import LearnerFailedError
from .ledger import Ledger, audit
from .store import (PASSWORD_ENV, StoreError, directory_written_whole, open_store, run_events, write_json_whole,
                    write_text_whole)
from .trainer import (StopAtStepEnd, checkpoint_generator_step, continues_in, how_to_continue, open_run_directory,
                      resuming_line)

PROGRESS_POLL_S = 1.0
COORDINATOR_PREFIX = "dmdr-coordinator-"  # + run name + a unique suffix: a named actor


def connect(cfg: RunConfig) -> str:
    """Join the given or ambient cluster, else start a local Ray with enough logical CPUs for the run;
    then check that the cluster can hold the run (see `check_resources`)."""
    import ray

    sigterm = signal.getsignal(signal.SIGTERM)
    if ray.is_initialized():
        where = "existing"
    elif address := cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        check_reachable(address, "ray.address" if cfg.ray.address else "RAY_ADDRESS")
        _join(cfg, address)
        where = address
    else:
        cpus, _ = resources_needed(cfg)
        try:
            ray.init(num_cpus=cfg.ray.local_cpus or max(int(cpus + 0.999), 1),
                     runtime_env=with_user_code(local_runtime_env(), cfg))
            where = "local"
        except ValueError as err:  # `ray start` has left a cluster running on this machine: Ray joins it
            if "existing cluster" not in str(err):
                raise
            _join(cfg, "auto")
            where = "the Ray cluster already running on this machine"
            print(f"dmdr_rl: joined {where} (`ray start`); set ray.address to choose another, or `ray stop` it to "
                  f"have the run start its own", flush=True)
    if (callable(sigterm) or sigterm is signal.SIG_IGN) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)  # ray.init's own handler exits on the spot: the run's ends it as Ctrl-C
    check_resources(cfg, ray.cluster_resources(), ray.available_resources(), started_here=where == "local")
    alive = [node for node in ray.nodes() if node.get("Alive")]
    check_node_fit(cfg, [node.get("Resources", {}) for node in alive])
    nodes = len(alive)
    check_storage(cfg, nodes)
    if where != "local" and nodes == 1 and cfg.trainer.backend == "ray" and cfg.ray.storage_path is None:
        print("dmdr_rl: note: one node now; if this cluster adds nodes (an autoscaler), set ray.storage_path to "
              "storage every node reaches: Ray Train's checkpoints would otherwise land on the node that writes them",
              flush=True)
    return where


# Ray Train's watcher for nodes being drained (spot preemption); one machine has no such events to watch for
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def local_runtime_env() -> dict | None:
    """The runtime_env of a Ray the run starts on this machine: Ray Train's preemption watcher off (its
    actor's only trace on one machine is a core_worker error line on the console at each start), unless
    the user set it."""
    if PREEMPTION_WATCHER_ENV in os.environ:
        return None
    return {"env_vars": {PREEMPTION_WATCHER_ENV: "0"}}


def _join(cfg: RunConfig, address: str) -> None:
    """ray.init on a cluster that runs already, its actors given the run store's password."""
    import ray

    try:
        ray.init(address=address, log_to_driver=True, runtime_env=with_user_code(secrets_runtime_env(cfg), cfg))
    except ConnectionError as err:  # something answers at the address, but not a Ray cluster's GCS
        field = "ray.address" if cfg.ray.address else "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "the cluster"
        raise ConfigError(f"{field}={address!r}: no Ray cluster could be joined there ({str(err).strip().splitlines()[0]}): "
                          "give the address `ray start --head` printed (port 6379 unless it was given another)") from None


def user_code(cfg: RunConfig) -> list[str]:
    """The user's plugin modules this process imports from outside an installed package (model.backbone and every
    reward named by import path, `my_dit:build`, `my_rewards:Brightness`): their files or top-level package
    directories (`plugin_source`), each once; empty otherwise."""
    from .registry import plugin_source

    sources = [path for name in (cfg.model.backbone, *(spec.name for spec in cfg.rewards)) for path in plugin_source(name)]
    return list(dict.fromkeys(sources))


def with_user_code(runtime_env: dict | None, cfg: RunConfig) -> dict | None:
    """`runtime_env` for a Ray the run starts or joins, plus the user's plugin modules (`user_code`) in py_modules,
    which Ray uploads to every node (the reward apps the run starts get them too): its rollout workers and learners
    would otherwise find them only where Ray puts this process's working directory on their path (not through this
    process's PYTHONPATH or sys.path, nor on other machines). A submitted job is left to the runtime_env it was
    given (`ray job submit --working-dir`)."""
    modules = user_code(cfg) if submitted_job_runtime_env() is None else []
    if not modules:
        return runtime_env
    return {**(runtime_env or {}), "py_modules": modules}


# set by Ray's job manager in a submitted job's driver: the job's config, with the runtime_env it was given
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def submitted_job_runtime_env() -> dict | None:
    """The runtime_env `ray job submit` gave this driver; None when this process is not a submitted job's driver."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if raw is None:
        return None
    try:
        return dict(json.loads(raw).get("runtime_env") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


WANDB_ENV = ("WANDB_API_KEY", "WANDB_BASE_URL")  # what a learner on another node needs to log to W&B


def secrets_runtime_env(cfg: RunConfig) -> dict | None:
    """The run store's password (with `store.url`) and W&B's key (with `output.wandb`) reach the job's actors
    (coordinator, learners) the way Ray passes environment variables on a cluster: in the job's runtime_env
    (the dashboard shows it to whoever may see the job). One a submitted job was given (--runtime-env-json)
    it already passes on: giving it again would be a conflict Ray refuses at ray.init."""
    wanted = ((PASSWORD_ENV,) if cfg.store.url else ()) + (WANDB_ENV if cfg.output.wandb else ())
    job = submitted_job_runtime_env() or {}
    env = {name: os.environ[name] for name in wanted
           if os.environ.get(name) and name not in (job.get("env_vars") or {})}
    return {"env_vars": env} if env else None


def place_job_output(cfg: RunConfig) -> RunConfig:
    """A submitted job runs in Ray's temporary copy of its working directory, which Ray deletes when it is no
    longer used: there a relative output.dir (and a relative local ray.storage_path) is taken from the home
    directory of the node the job's driver runs on (the head node, by default) instead. Elsewhere the config
    is returned as it is."""
    storage = local_storage(cfg)
    relative_storage = storage is not None and not storage.is_absolute()
    if submitted_job_runtime_env() is None or (cfg.output_dir.is_absolute() and not relative_storage):
        return cfg
    placed = cfg.model_copy(deep=True)
    if not cfg.output_dir.is_absolute():
        placed.output.dir = str(Path.home() / cfg.output.dir)
    if relative_storage:
        placed.ray.storage_path = str(Path.home() / storage)
    return placed


def local_storage(cfg: RunConfig) -> Path | None:
    """ray.storage_path when it is a local path (`~` expanded), None for a URI (s3://...) or none at all."""
    storage = cfg.ray.storage_path
    return None if storage is None or "://" in storage else Path(storage).expanduser()


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """The config with every local path in it made absolute: Ray Train runs its workers in a directory of
    its own, and a cluster's actors and reward replicas start where the cluster was started, so a relative
    path would name another file there, or none. A path field (data.prompts, model.path) is a local path when
    something exists there (`from_pretrained` reads it the same way: hub ids and `toy:` prompt specs stay as
    they are); a kwarg of the backbone or a reward when it also names one (`path_kwarg`)."""
    placed = cfg.model_copy(deep=True)
    placed.data.prompts = _absolute_if_local(cfg.data.prompts)
    placed.model.path = _absolute_if_local(cfg.model.path)
    placed.model.kwargs = _absolute_path_kwargs(cfg.model.kwargs)
    for spec in placed.rewards:
        spec.kwargs = _absolute_path_kwargs(spec.kwargs)
    if (storage := local_storage(cfg)) is not None:  # a directory Ray Train creates: it need not exist yet
        placed.ray.storage_path = str(storage.absolute())
    return placed


def _absolute_if_local(value):
    if isinstance(value, str) and value and not os.path.isabs(value) and os.path.exists(value):
        return os.path.abspath(value)
    return value


PATH_KWARG = re.compile(r"(^|_)(path|dir|directory|folder|file|filename|root|checkpoint|ckpt|weights|config|tokenizer|"
                        r"pretrained|name)s?$", re.IGNORECASE)


def path_kwarg(key: str, value) -> bool:
    """A kwarg that names a path: by its key (path, checkpoint, cache_dir, med_config, tokenizer, ...), by its
    value's look (./x, ../x, a/b/c) or by a file suffix (tiny.json); not `device: cuda` beside a folder cuda."""
    from .hub import looks_like_a_path

    return isinstance(value, str) and (bool(PATH_KWARG.search(key)) or looks_like_a_path(value)
                                       or bool(Path(value).suffix))


# a kwarg that can only be a local directory (never a hub id), which the model may create: made absolute even
# before it exists (a relative cache_dir would otherwise fill a new cache in each Ray Train worker's directory)
DIRECTORY_KWARG = re.compile(r"(^|_)(dir|directory|folder|root)$", re.IGNORECASE)


def _absolute_path_kwargs(kwargs: dict) -> dict:
    return {key: _absolute_path_kwarg(key, value) for key, value in kwargs.items()}


def _absolute_path_kwarg(key: str, value):
    """One kwarg made absolute where it names a local path, looking inside nested dicts and lists (a list is
    judged by the key that holds it)."""
    if isinstance(value, dict):
        return _absolute_path_kwargs(value)
    if isinstance(value, list):
        return [_absolute_path_kwarg(key, item) for item in value]
    if isinstance(value, str) and value and DIRECTORY_KWARG.search(key) and "://" not in value:
        return os.path.abspath(os.path.expanduser(value))
    return _absolute_if_local(value) if path_kwarg(key, value) else value


def check_storage(cfg: RunConfig, nodes: int) -> None:
    """Ray Train writes checkpoints from the learner's node and reads them on the driver's: with several
    nodes, a local path under output.dir would exist on one of them only (Ray Train refuses it)."""
    if cfg.trainer.backend != "ray" or nodes <= 1:
        return
    if cfg.ray.storage_path is None:
        raise ConfigError(
            f"this Ray cluster has {nodes} nodes, and Ray Train's checkpoints would go to {cfg.output_dir}/ray_train "
            f"on one of them: set ray.storage_path to storage every node reaches (s3://bucket/dmdr, gs://..., or a "
            f"shared filesystem path), and store.url=redis://... so the ledger and metrics of every node land in one place")
    if cfg.trainer.resume_from and "://" not in cfg.trainer.resume_from:
        print(f"dmdr_rl: WARNING: {nodes} nodes: every learner worker reads trainer.resume_from={cfg.trainer.resume_from} "
              f"on its own node, so it must be on a filesystem every node mounts", flush=True)
    if cfg.store.url is None:
        print(f"dmdr_rl: WARNING: {nodes} nodes and no store.url: the ledger and metrics files are written on the nodes "
              f"of the coordinator and learner rank 0, under {cfg.output_dir}, unless that directory is shared", flush=True)


def check_placement(cfg: RunConfig) -> None:
    """What Ray would accept but the run could not use: NCCL cannot put two learner ranks on one GPU, so
    several learner workers need whole GPUs each. A single learner may take a fraction, which lets the
    learner and the rollout actors share one GPU."""
    gpus, workers = cfg.ray.learner_gpus, cfg.ray.learner_workers
    for field, size in cfg.trainer.batch_size_fields():
        if size % workers:
            raise ConfigError(f"trainer.{field}={size} must divide evenly over ray.learner_workers={workers} (each rank "
                              "trains on an equal shard): change one of them")
    if workers > 1 and gpus > 0 and gpus != int(gpus):
        raise ConfigError(f"ray.learner_gpus={gpus:g} with ray.learner_workers={workers}: each learner rank needs whole "
                          f"GPUs (NCCL cannot put two ranks on one GPU, and Ray would pack fractions together); use "
                          f"ray.learner_gpus=1, or 0 to train on CPUs. A single learner worker may take a fraction, "
                          f"and rollout actors may share a GPU (ray.rollout_gpus=0.5)")


def resources_needed(cfg: RunConfig) -> tuple[float, float]:
    """(CPUs, GPUs) the run asks for: learner workers, rollout actors, and the reward apps it starts."""
    cpus, gpus = (sum(amount for _, amount in _resource_asks(cfg, field)) for field in ("cpus", "gpus"))
    return float(cpus), float(gpus)


def _resource_asks(cfg: RunConfig, field: str) -> list[tuple[str, float]]:
    """(the settings, the amount) of every part of the run that asks for CPUs or GPUs (`field`)."""
    r, asks = cfg.ray, []
    if cfg.trainer.backend == "ray":
        for count, workers, role in (("ray.learner_workers", r.learner_workers, "learner"),
                                     ("ray.rollout_actors", r.rollout_actors, "rollout")):
            per = getattr(r, f"{role}_{field}")
            if per:
                asks.append((f"{count}={workers} x ray.{role}_{field}={per:g}", workers * per))
    for i, spec in enumerate(cfg.rewards):
        per = getattr(spec.serve, f"num_{field}")
        if spec.placement == "serve" and not spec.serve.attach and per:
            replicas = _initial_replicas(spec.serve)
            asks.append((f"rewards.{i}.serve.num_{field}={per:g} x {replicas} replica(s)", replicas * per))
    return asks


def _initial_replicas(serve_spec) -> int:
    if not serve_spec.autoscaling:
        return serve_spec.replicas
    return max(1, int(serve_spec.autoscaling.get("initial_replicas") or serve_spec.autoscaling.get("min_replicas", 1)))


def check_resources(cfg: RunConfig, cluster: dict, available: dict | None = None, started_here: bool = True) -> None:
    """Fail before any work starts when the cluster cannot place the run (its totals: other jobs may
    finish; an autoscaling cluster's nodes that are not up yet do not count). `available`: what is free now
    (Ray leaves out a resource none of which is free); less than the run needs is a warning (the run waits for
    it, e.g. behind reward apps already running). `started_here`: the run started this Ray itself (its logical
    CPUs are ray.local_cpus), rather than joining one."""
    cpus, gpus = resources_needed(cfg)
    for kind, needed, field in (("GPU", gpus, "gpus"), ("CPU", cpus, "cpus")):
        have = float(cluster.get(kind, 0))
        if needed > have + 1e-9:
            if kind == "CPU" and started_here:
                fix = ", or raise ray.local_cpus (a local Ray's logical CPUs)"
            elif kind == "CPU":
                fix = (", or give the cluster more: add nodes, or start it with more logical CPUs (`ray start --head "
                       "--num-cpus N`; a machine's logical CPUs need not be its cores)")
            else:
                fix = f", or add {kind} nodes"
            raise ConfigError(f"the run asks for {needed:g} {kind}s ({', '.join(text for text, _ in _resource_asks(cfg, field)) or 'none'}) but the cluster has "
                              f"{have:g}: lower those values{fix}")
        free = float(available.get(kind, 0.0)) if available is not None else have
        if needed > free + 1e-9:
            print(f"dmdr_rl: WARNING: the run asks for {needed:g} {kind}s and {free:g} of the cluster's {have:g} are free "
                  f"now (other jobs, or reward apps already deployed, hold the rest): it waits until they are", flush=True)


def _unit_asks(cfg: RunConfig) -> list[tuple[str, float, float]]:
    """(the settings, CPUs, GPUs) of one of each kind of process the run places: a learner worker, a rollout
    actor, a replica of each reward app it starts. Each must fit on one node."""
    r, asks = cfg.ray, []
    if cfg.trainer.backend == "ray":
        asks += [("a learner worker (ray.learner_cpus, ray.learner_gpus)", r.learner_cpus, r.learner_gpus),
                 ("a rollout actor (ray.rollout_cpus, ray.rollout_gpus)", r.rollout_cpus, r.rollout_gpus)]
    for i, spec in enumerate(cfg.rewards):
        if spec.placement == "serve" and not spec.serve.attach:
            asks.append((f"a replica of rewards.{i} (rewards.{i}.serve.num_cpus, num_gpus)", spec.serve.num_cpus,
                         spec.serve.num_gpus))
    return asks


def check_node_fit(cfg: RunConfig, nodes: list[dict]) -> None:
    """Each learner worker, rollout actor and reward replica must fit on one node (`nodes`: each live node's
    total resources): the cluster's totals can hold a 2-GPU rollout actor on two 1-GPU nodes, which Ray would
    then wait to place for ever."""
    if not nodes:
        return
    for what, cpus, gpus in _unit_asks(cfg):
        if not any(cpus <= float(n.get("CPU", 0)) + 1e-9 and gpus <= float(n.get("GPU", 0)) + 1e-9 for n in nodes):
            largest = ", ".join(f"{float(n.get('CPU', 0)):g} CPUs and {float(n.get('GPU', 0)):g} GPUs" for n in
                                sorted(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), reverse=True)[:3])
            raise ConfigError(f"{what} asks for {cpus:g} CPUs and {gpus:g} GPUs, more than any one node of the cluster "
                              f"has (the largest: {largest}): lower those values, or add a node that large")


def check_reachable(address: str, field: str, timeout_s: float = 5.0) -> None:
    """A `host:port` cluster address must accept a TCP connection (else ray.init would hang for a minute)."""
    if address.startswith("ray://"):  # RAY_ADDRESS (ray.address was checked with the config)
        raise ConfigError(f"{field}={address!r}: {RAY_CLIENT_REFUSED}")
    if "://" in address:
        raise ConfigError(f"{field}={address!r}: {URL_NOT_CLUSTER}")
    if not is_cluster_address(address):
        raise ConfigError(f"{field}={address!r} is not host:port (e.g. 127.0.0.1:6379) or 'auto'")
    if address in ("auto", "local"):
        return
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    try:
        connection = socket.create_connection((host, int(port)), timeout=timeout_s)
    except OSError as err:
        raise ConfigError(f"{field}={address!r}: no Ray cluster answers there ({err.strerror or err}); start one with "
                          f"`ray start --head`, or fix {field}") from err
    if _answers_http(connection):
        raise ConfigError(f"{field}={address!r}: an HTTP server answers there, not a Ray cluster (Ray's dashboard, on 8265, "
                          "or Serve's, on 8000; ray.init would wait on it for minutes): give the address `ray start --head` "
                          "printed (port 6379 unless it was given another)")


def _answers_http(connection: socket.socket, timeout_s: float = 2.0) -> bool:
    """Whether an HTTP/1 server holds the other end of `connection` (closed here): a cluster's GCS answers a
    plain GET with HTTP/2 frames, or nothing."""
    with connection:
        try:
            connection.settimeout(timeout_s)
            connection.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return connection.recv(5) == b"HTTP/"
        except OSError:
            return False


def serving_rewards(cfg: RunConfig, own_cluster: bool = False):
    """A context holding the run's reward apps (placement: serve) up; nothing when every reward is local.
    `own_cluster`: the run started this Ray (connect's "local")."""
    if not any(spec.placement == "serve" for spec in cfg.rewards):
        return contextlib.nullcontext([])
    from reward_servers.serve import reward_apps

    return reward_apps(cfg, own_cluster)


def train_distributed(cfg: RunConfig) -> dict:
    from .prompts import checked_prompt_source

    from .learning import optimizer_class
    from .tracking import require_trackers

    checked_prompt_source(cfg)  # a bad prompt file, or prompts the model cannot encode: before Ray starts
    optimizer_class(cfg.trainer.optimizer)  # e.g. adamw8bit without bitsandbytes: here, not in each learner retry
    require_trackers(cfg)  # (the same: output.wandb without its package)
    if cfg.trainer.resume_from:  # checked here, and made absolute: the learner workers run in another directory
        from .trainer import check_steps_left, resume_checkpoint

        checkpoint = resume_checkpoint(cfg.trainer.resume_from)
        check_steps_left(cfg, checkpoint_generator_step(checkpoint))  # here, not after Ray and the models start
        cfg = cfg.model_copy(deep=True)
        cfg.trainer.resume_from = str(checkpoint.resolve())
    cfg = with_absolute_paths(cfg)
    check_placement(cfg)
    if cfg.store.url is not None:  # an unreachable Redis: said now, not after Ray has started and reward apps deployed
        open_store(cfg.store.url, None, cfg.name).close()
    where = connect(cfg)
    with serving_rewards(cfg, own_cluster=where == "local"):
        return _train_on_ray(cfg, where)


def _train_on_ray(cfg: RunConfig, where: str) -> dict:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.coordinator import RolloutCoordinator

    r = cfg.ray
    out = cfg.output_dir.resolve()
    resume = cfg.trainer.resume_from  # (made a checkpoint's absolute path by train_distributed)
    resumed_step = checkpoint_generator_step(Path(resume)) if resume else 0
    store = open_run_directory(cfg, out, fresh=not resume or not continues_in(out, Path(resume)))  # before any actor writes
    try:
        # on the driver's node, whose fate it shares anyway: its ledger file is the one the driver audits
        coordinator = ray.remote(RolloutCoordinator).options(
            num_cpus=0, name=f"{COORDINATOR_PREFIX}{cfg.name}-{uuid.uuid4().hex[:8]}",
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
        ).remote(cfg.model_dump(mode="json"), r.learner_workers, str(out))
        # once, whatever fails where: its rollout workers would otherwise hold their CPUs/GPUs until the driver exits
        shut_down = _once(lambda: _shut_down(coordinator))
        try:
            trainer = _torch_trainer(cfg, coordinator, out)
            print(ray_start_lines(cfg, where, out, resumed_step), flush=True)
            with run_events(store, backend="ray", address=where, generator_step=resumed_step,
                            max_steps=cfg.trainer.max_steps, output_dir=str(out), resume_from=resume) as ending:
                summary = _fit_and_summarise(cfg, trainer, coordinator, store, out, shut_down, reached=ending)
            return summary
        finally:
            shut_down()
    finally:
        store.close()


def ray_start_lines(cfg: RunConfig, where: str, out: Path, resumed_step: int = 0) -> str:
    """What a Ray run says as it starts: where it runs, its actors and its outputs; and, resumed, where from."""
    r = cfg.ray
    line = (f"dmdr_rl: Ray ({where}): {r.learner_workers} learner worker(s), {r.rollout_actors} rollout actor(s), "
            f"max_staleness {r.max_staleness}; outputs in {out}")
    if not cfg.trainer.resume_from:
        return line
    return f"{line}\n{resuming_line(cfg.trainer.resume_from, resumed_step, cfg.trainer.max_steps)}"


def _once(action: Callable[[], None]) -> Callable[[], None]:
    done: list[bool] = []

    def run_once() -> None:
        if not done:
            done.append(True)
            action()

    return run_once


def _torch_trainer(cfg: RunConfig, coordinator, out: Path):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from learner.loop import train_loop_per_worker

    r = cfg.ray
    use_gpu = r.learner_gpus > 0
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "coordinator": coordinator, "output_dir": str(out)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.learner_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": r.learner_cpus, **({"GPU": r.learner_gpus} if use_gpu else {})}),
        # a name of its own per launch: Ray Train restores a run of the same name from its storage, which
        # would silently continue an older run in a reused output.dir (resuming is trainer.resume_from's job;
        # restarts after a learner failure, within this launch, still restore this run's checkpoints)
        run_config=TrainRunConfig(name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
                                  storage_path=r.storage_path or str(out / "ray_train"),
                                  failure_config=FailureConfig(max_failures=r.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=2),
                                  **_train_logging(r.train_log_level)),
    )


def _train_logging(level: str) -> dict:
    """RunConfig's logging_config at `level`; nothing on a Ray Train without one (before Ray 2.5x's Train v2
    LoggingConfig, or with RAY_TRAIN_V2_ENABLED=0): its lines then stay at Ray's default."""
    try:
        from ray.train import LoggingConfig
    except ImportError:
        return {}
    return {"logging_config": LoggingConfig(log_level=level)}


def _fit_and_summarise(cfg: RunConfig, trainer, coordinator, store, out: Path,
                       shut_down: Callable[[], None] | None = None, reached: dict | None = None) -> dict:
    """Ray Train's fit with a progress bar; then the run's actors are shut down (`shut_down`, default
    `_shut_down(coordinator)`: its ledger flushed before the audit) and the summary made. `reached["generator_step"]`:
    the step the learner's last report names, also when the run then stops or ends early (its end event says it)."""
    import ray

    r = cfg.ray
    outcome: dict = {}
    fit = threading.Thread(target=lambda: outcome.update(result=_fit(trainer)), daemon=True)
    started = time.time()
    fit.start()
    bar = tqdm(total=cfg.trainer.max_steps, desc=f"train {cfg.name} (ray)", dynamic_ncols=True)
    # Ctrl-C: the learners end their generator step with a checkpoint (a second one: at once); before a step since
    # the learner started (loading, starting: nothing to keep), at once
    progress: dict = {}  # the coordinator's, as last polled

    def ask_to_stop() -> bool:
        if progress.get("version", -1) <= progress.get("started_step", 0):
            return False
        coordinator.request_stop.remote()
        return True

    stop = StopAtStepEnd(on_request=ask_to_stop)
    try:
        with stop:
            _follow(fit, coordinator, bar, cfg, out, progress)
    finally:
        close_bar(bar)
        repeated = _repeated_failure(coordinator)
        (shut_down or (lambda: _shut_down(coordinator)))()
    result = outcome.get("result")
    if repeated is not None:
        cause = result if isinstance(result, BaseException) else None
        raise LearnerFailedError(f"the learner failed, and the run ends rather than try again: {repeated}. Fix the "
                                 f"cause; {how_to_continue(cfg, out)}") from cause
    if isinstance(result, BaseException):
        raise result
    metrics = result.metrics or {}
    if reached is not None:
        reached["generator_step"] = metrics.get("generator_step", 0)
    if stop.requested and metrics.get("stopped") and metrics.get("generator_step", 0) < cfg.trainer.max_steps:
        _keep_checkpoint(result.checkpoint, out / "checkpoints", metrics.get("generator_step", 0))  # (as at the end)
        raise KeyboardInterrupt
    if metrics.get("generator_step", 0) >= cfg.trainer.max_steps:
        stop.finished_anyway()
    if metrics.get("generator_step", 0) < cfg.trainer.max_steps:  # tries that ended early, and nobody said why
        raise RuntimeError(f"the learner stopped at generator step {metrics.get('generator_step', 0)} of "
                           f"trainer.max_steps={cfg.trainer.max_steps} (see the learner's log above); "
                           f"{how_to_continue(cfg, out)}")
    summary = {
        "output_dir": str(out),
        "generator_steps": metrics.get("generator_step"),
        "iterations": metrics.get("iteration"),
        "checkpoint": str(_keep_checkpoint(result.checkpoint, out / "checkpoints", metrics.get("generator_step", 0))),
        "train_seconds": round(time.time() - started, 1),
        "replica_divergence": metrics.get("ddp/replica_divergence"),  # None with one learner worker
        "ledger": audit_ledger(store, metrics.get("iteration", 0), r.learner_workers),
    }
    problems = {k: v for k, v in summary["ledger"].items() if k in ("lost", "duplicated", "unexpected") and v}
    if problems:
        print(f"dmdr_rl: WARNING: the prompt ledger shows {problems}", flush=True)
    write_json_whole(out / "train_summary.json", summary)
    return summary


def _follow(fit: threading.Thread, coordinator, bar, cfg: RunConfig, out: Path, latest: dict) -> None:
    """The progress bar from the coordinator's progress until Ray Train's fit ends (the last one kept in `latest`)."""
    import ray

    while fit.is_alive():
        fit.join(PROGRESS_POLL_S)
        try:
            progress = ray.get(coordinator.progress.remote(), timeout=5)
        except ray.exceptions.ActorDiedError as err:
            # nothing can continue without it (it has no restarts): every learner retry would fail at
            # once, and with ray.max_failures=-1 forever, so the run ends here
            raise RuntimeError(f"the run's rollout coordinator died, so the run cannot continue; {how_to_continue(cfg, out)} "
                               f"({err})") from err
        except Exception:  # the coordinator is busy: just skip this refresh
            continue
        report_events(bar, progress, latest)
        latest.update(progress)
        show_progress(bar, progress, compiles=cfg.model.compile)


def report_events(bar, progress: dict, before: dict) -> None:
    """A line above the bar for what befell the run's processes since the `before` poll: a rollout worker that died
    or was restarted or replaced (the coordinator's notices), a learner try that ended and the restart from its
    checkpoint (Ray Train's own log says why it ended)."""
    new, recent = progress.get("notices", 0) - before.get("notices", 0), progress.get("recent_notices", [])
    if new > len(recent):  # (more than the coordinator keeps for the bar between two polls)
        bar.write(f"dmdr_rl: ({new - len(recent)} earlier events of the rollout workers: see ledger.jsonl)")
    for notice in recent[-new:] if new > 0 else []:
        bar.write(f"dmdr_rl: {notice}")
    tries = progress.get("learner_tries", 0) - max(before.get("learner_tries", 1), 1)  # (the first try: no news)
    if tries > 0:
        bar.write(f"dmdr_rl: {'a learner try' if tries == 1 else f'{tries} learner tries'} ended; Ray Train started the "
                  "learners again, from the last checkpoint (ray.max_failures)")
    if progress.get("epoch", 0) > before.get("epoch", 0):
        bar.write(f"dmdr_rl: the learners restarted from generator step {progress['started_step']}; the steps after "
                  "it are trained again")


def show_progress(bar, progress: dict, compiles: bool = False) -> None:
    """The bar at the coordinator's `progress` (`compiles`: model.compile, whose first step also compiles). Its rate and time left count the generator steps trained since
    the learner started: the loading before a launch's first step (or a restarted learner's) would pass for
    one very slow step, and the bar said 14 minutes left of a 1-minute run."""
    started, version = progress["started_step"], progress["version"]
    if progress.get("learner_restarting") or version <= started:  # no step since the learner (re)started
        if progress.get("learner_restarting") or version < started:  # loading: the next step is timed from the
            bar.last_print_t = time.time()  # publish of the weights it starts from (tqdm's clock), not from here
            bar.steps_since = bar.last_print_t  # (the closed bar's rate, see close_bar)
        if not progress.get("learner_restarting"):  # (until the restarted learner says where it resumes)
            bar.n = bar.initial = bar.last_print_n = started  # (initial: steps before this launch are not its rate)
        bar.set_postfix_str("learner restarting (from its last checkpoint)" if progress.get("learner_restarting") else
                            f"learner restarting from generator step {started}" if progress["epoch"] else
                            _starting_text(progress, compiles), refresh=False)
        bar.refresh()
        return
    # as the local trainer's bar: the losses (the last generator step's, rank 0's shard) and the iteration in
    # training (1-based)
    bar.set_postfix({**progress.get("losses", {}), "iteration": progress["iteration"] + 1}, refresh=False)
    bar.update(version - bar.n)  # (tqdm's smoothed rate from the steps' own times)
    bar.refresh()


def _starting_text(progress: dict, compiles: bool) -> str:
    """What a launch is doing before its first step: until a learner has started, Ray may still be waiting for
    the CPUs or GPUs it asks for (the preflight warns when other jobs hold them), not loading anything."""
    if not progress.get("learners_registered", 1):
        return "starting: Ray places and starts the learners (on free CPUs/GPUs)"
    return "starting: learners and rollout workers load their models" + (" and compile their blocks" if compiles else "")


def close_bar(bar) -> None:
    """Close the bar with the rate of the steps trained: tqdm's last line is the average since the bar was made,
    which counted the loading before the first step (4.6 s/it for 1.6-s steps). Its time is then the steps' too."""
    if getattr(bar, "steps_since", None) is not None and bar.n > bar.initial:
        bar.start_t = bar.steps_since
    bar.close()


def audit_ledger(store, iterations: int, world_size: int, patience_s: float = 30.0) -> dict:
    """The prompt ledger's audit. A store that stays unreachable for `patience_s` (Redis restarting as the run
    ends) leaves the trained run as it is, said so, rather than failing it: the audit is a check, not a step."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return audit(Ledger(store).events(), iterations, world_size)
        except StoreError as err:
            if time.monotonic() >= deadline:
                print(f"dmdr_rl: WARNING: the prompt ledger could not be read to audit it ({err}); the run trained "
                      "to the end all the same", flush=True)
                return {"unaudited": str(err)}
            time.sleep(2.0)


def _repeated_failure(coordinator) -> str | None:
    """The learner failure that recurred unchanged until the coordinator ended the run (None: none did,
    or the coordinator is gone)."""
    import ray

    try:
        return ray.get(coordinator.failure.remote(), timeout=30)
    except Exception:  # a dead coordinator: the run's error says so already
        return None


def _shut_down(coordinator) -> None:
    """Flush the coordinator's ledger, then free the run's actors (rollout workers, then the
    coordinator) so the cluster's CPUs come back."""
    import ray

    try:
        ray.get(coordinator.close_store.remote(), timeout=60)
    except Exception as err:  # a dead coordinator has nothing left to flush
        print(f"dmdr_rl: could not flush the coordinator's ledger ({type(err).__name__})", flush=True)
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
    with checkpoint.as_directory() as directory, directory_written_whole(target) as pending:
        shutil.copytree(directory, pending, dirs_exist_ok=True)
    write_text_whole(root / "latest", target.name + "\n")
    return target
