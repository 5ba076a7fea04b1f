"""Reward models as Ray Serve apps: one deployment per reward model, dynamic batching of concurrent
requests (`@serve.batch`), scores or scores plus d score / d image, and an HTTP endpoint.

    python -m dmdr_rl.run --preset toy-dmdr 'rewards.0.placement=serve'   # the run starts the app
    serve deploy deploy/serve-rewards.yaml                               # or start it alone ...
    serve run deploy/serve-rewards.yaml                                  # (in the foreground)

and scale it on its own (replicas, autoscaling, GPU fractions, a runtime_env per model). Handle calls
carry tensors; the HTTP endpoint takes PNG or .npy images and never unpickles anything.
"""

# (no `from __future__ import annotations`: Serve re-signs the HTTP endpoints, and FastAPI must see the
# `Request` annotation of score_http as the class, not as a string it cannot resolve)
import asyncio
import re
import time
from contextlib import contextmanager
from functools import partial
from typing import Any

import ray
import torch
from fastapi import FastAPI, HTTPException, Request
from pydantic import ValidationError
from ray import serve

from actors.app_claim import AppClaim
from dmdr_rl.config import RewardSpec, RunConfig

from . import http
from .gradient import checked_scores, in_chunks, score_and_grad
from .protocol import RewardInputError, RewardServerError, first_line, validate_images
from .registry import load_reward_model

http_app = FastAPI(title="dmdr_rl reward server")
# HTTP requests a replica reads, decodes and scores at once: each may hold a body of up to 32 bytes a pixel of
# serve.http_max_pixels (512 MiB at the default) and its decoded images. One more is answered 503 at once, not
# left waiting: a waiting request holds one of the replica's max_ongoing_requests, which the trainer's calls
# through Ray handles (not counted here) need too
HTTP_REQUESTS_AT_ONCE = 4
HTTP_BODY_DEADLINE_S = 60.0  # for a request's body to arrive whole once it has its slot (else a 408)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(http_app)
class RewardServer:
    """Holds one reward model; merges concurrent requests into one model call."""

    def __init__(self, name: str, kwargs: dict[str, Any] | None = None, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.005, threads: int | None = None, http_max_pixels: int = 2**24,
                 max_images_per_call: int | None = None, where: str = "rewards[]"):
        if threads:
            torch.set_num_threads(threads)
        self.model = load_reward_model(name, kwargs, where)  # (`where`: the config entry its errors name)
        self.max_images = max_images_per_call
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.http_max_pixels = http_max_pixels
        self.http_slots = asyncio.Semaphore(HTTP_REQUESTS_AT_ONCE)
        self.http_body_deadline_s = HTTP_BODY_DEADLINE_S
        self.calls = self.images = self.max_batch_images = 0

    def info(self) -> dict:
        return {"name": self.model.name, "differentiable": self.model.differentiable,
                "calls": self.calls, "images": self.images, "max_batch_images": self.max_batch_images}

    async def score(self, images: torch.Tensor, prompts: list[str]) -> dict:
        await asyncio.to_thread(validate_images, images, prompts)  # off the event loop: large batches take a while
        return await self._submit(images, prompts, False)

    async def score_with_grad(self, images: torch.Tensor, prompts: list[str]) -> dict:
        if not self.model.differentiable:
            raise RewardInputError(f"reward model {self.model.name!r} is not differentiable: use score()")
        await asyncio.to_thread(validate_images, images, prompts)
        return await self._submit(images, prompts, True)

    async def _submit(self, images: torch.Tensor, prompts: list[str], with_grad: bool) -> dict:
        answer = await self._score_batch((images, list(prompts), with_grad))
        if isinstance(answer, BaseException):  # this request failed alone (see _score_requests)
            raise answer
        return answer

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _score_batch(self, requests: list[tuple[torch.Tensor, list[str], bool]]) -> list[dict]:
        return await asyncio.to_thread(self._score_requests, requests)

    def _score_requests(self, requests: list[tuple[torch.Tensor, list[str], bool]]) -> list[dict]:
        """One model call for the merged batch; if it fails, each request alone, so that one bad request
        fails by itself and the others are still scored."""
        self.max_batch_images = max(self.max_batch_images, sum(r[0].shape[0] for r in requests))  # merged size
        try:
            return self._run(requests)
        except Exception:  # noqa: BLE001 - isolate the failing request(s)
            if len(requests) == 1:
                raise
        answers = []
        for request in requests:
            try:
                answers.append(self._run([request])[0])
            except Exception as err:  # noqa: BLE001 - returned to that caller only
                answers.append(err)
        return answers

    def _run(self, requests: list[tuple[torch.Tensor, list[str], bool]]) -> list[dict]:
        """Gradient requests in one pass and score-only ones (e.g. rollout monitors) in another, so a merged
        batch does not back-propagate for images nobody asked the gradient of."""
        answers: list[dict | None] = [None] * len(requests)
        for wants_grad in (True, False):
            group = [i for i, r in enumerate(requests) if r[2] == wants_grad]
            if not group:
                continue
            images = torch.cat([requests[i][0] for i in group]).float()
            prompts = [p for i in group for p in requests[i][1]]
            if wants_grad:
                scores, grads = score_and_grad(self.model, images, prompts, self.max_images)  # (validated there)
            else:
                with torch.no_grad():
                    scores = in_chunks(partial(checked_scores, self.model), images, prompts, self.max_images)
            scores = scores.detach().float().cpu()
            self.calls, self.images = self.calls + 1, self.images + images.shape[0]
            start = 0
            for i in group:
                end = start + requests[i][0].shape[0]
                answers[i] = {"scores": scores[start:end].clone(), **({"grads": grads[start:end].cpu().clone()}
                                                                      if wants_grad else {})}
                start = end
        return answers

    @http_app.post("/score")
    async def score_http(self, raw: Request) -> dict:
        max_bytes = http.max_body_bytes(self.http_max_pixels)
        http.check_declared_size(raw, max_bytes)  # (a request refused for its size never takes a slot)
        if self.http_slots.locked():
            raise HTTPException(status_code=503, headers={"Retry-After": "1"},
                                detail=f"the reward app is scoring {HTTP_REQUESTS_AT_ONCE} HTTP requests, as many as it "
                                       "takes at once: retry after Retry-After seconds, or send fewer requests at once")
        async with self.http_slots:  # (taken without waiting) a bounded number of bodies and images in memory at once
            return await self._score_http(raw, max_bytes)

    async def _score_http(self, raw: Request, max_bytes: int) -> dict:
        body = await http.read_body(raw, max_bytes, self.http_body_deadline_s)  # bounded before it is parsed
        try:  # off the event loop too: a large body takes a while to parse
            request = await asyncio.to_thread(http.ScoreRequest.model_validate_json, body)
        except ValidationError as err:
            reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:3])
            raise HTTPException(status_code=422, detail=f"not a score request: {reasons}") from err
        try:  # decoding off the event loop: the replica keeps serving other requests meanwhile
            images = await asyncio.to_thread(http.decode_images, request, self.http_max_pixels)
            call = self.score_with_grad if request.grad else self.score
            answer = await call(images, request.prompts)
        except RewardInputError as err:
            raise HTTPException(status_code=422, detail=str(err)) from err
        except Exception as err:  # noqa: BLE001 - the model failed: say why (its first line), not a bare 500
            raise HTTPException(status_code=500, detail=f"reward model {self.model.name!r} failed: "
                                                        f"{type(err).__name__}: {first_line(err)}") from err
        return http.encode_answer(answer)

    @http_app.get("/info")
    async def info_http(self) -> dict:
        return self.info()


def reward_app(spec: RewardSpec, where: str = "rewards[]", quiet: bool = False):
    """The Serve application of one reward spec (deployment options from `spec.serve`); `where`: the config
    entry (rewards.N) a replica's load errors name; `quiet`: a training run's own app, whose INFO lines would reach
    its console (an app deployed alone, `serve deploy`, logs as Serve does)."""
    s = spec.serve
    actor_options: dict[str, Any] = {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}
    if s.runtime_env:
        actor_options["runtime_env"] = s.runtime_env
    options = {"autoscaling_config": s.autoscaling} if s.autoscaling else {"num_replicas": s.replicas}
    if s.constructor_retries is not None:
        options["max_constructor_retry_count"] = s.constructor_retries
    threads = max(1, int(s.num_cpus)) if s.num_cpus else 1
    # (Serve caps a batch at the requests a replica takes at once: keep that above max_batch_size)
    ongoing = max(64, s.max_batch_size)
    return RewardServer.options(name=spec.app_name, ray_actor_options=actor_options, max_ongoing_requests=ongoing,
                                graceful_shutdown_wait_loop_s=s.shutdown_wait_loop_s,
                                logging_config=_logging(s.access_log, quiet), **options).bind(
        spec.name, spec.kwargs, s.max_batch_size, s.batch_wait_timeout_s, threads, s.http_max_pixels,
        spec.max_images_per_call, where)


def _logging(access_log: bool, quiet: bool) -> dict:
    """Serve's logging of an app. `quiet`: warnings only (the INFO lines of replicas starting and of routers
    reached a training run's console), unless the access log, whose lines are INFO, is asked for."""
    return {"enable_access_log": access_log, **({"log_level": "WARNING"} if quiet and not access_log else {})}


def build_app(args: dict):
    """Serve's application builder for `serve deploy`/`serve run` config files: `args` is one reward
    spec (name, kwargs, serve: {...}), validated like the run's config."""
    return reward_app(RewardSpec.model_validate(args))


def start_reward_apps(cfg: RunConfig, own_cluster: bool = False) -> list[str]:
    """Deploy every `placement: serve` reward that is not `attach`ed; check that attached ones run.
    Returns the names of the apps this run started (to be stopped with `stop_reward_apps`). An app
    of that name that already runs is not replaced (it may be someone else's): attach to it instead.
    If one app fails to start, or the start is interrupted (Ctrl-C, SIGTERM), every app it deployed is
    deleted again, the one being started too."""
    specs = [spec for spec in cfg.rewards if spec.placement == "serve"]
    if not specs:
        return []
    # (on a Ray the run started, Serve's controller and proxies log warnings only too: that Serve ends with the run,
    # where on a shared cluster the setting would stay for everyone's apps)
    serve.start(http_options={"host": cfg.ray.http_host, "port": cfg.ray.http_port},
                **({"logging_config": _logging(False, quiet=True)} if own_cluster else {}))
    host, port = _http_address(cfg)
    started: list[str] = []
    claimed: list[str] = []
    try:
        for i, spec in enumerate(cfg.rewards):
            if spec.placement != "serve":
                continue
            if spec.serve.attach:
                print(attached_line(spec, _require_running(spec.app_name, f"rewards.{i}")), flush=True)
                continue
            claim_app(spec.app_name, f"rewards.{i}", owner=f"output.dir={cfg.output_dir}")
            claimed.append(spec.app_name)
            existing = serve.status().applications.get(spec.app_name)
            if existing is not None:  # (and no run holds its name: the claim above is ours)
                state = _status_name(existing.status)
                raise RewardInputError(
                    f"reward app {spec.app_name!r} already exists ({state}) and no run holds it: deployed on its own "
                    "(`serve deploy`), or left over from a run whose driver was killed (SIGKILL) before it could delete "
                    "it. " + (f"Set rewards.{i}.serve.attach=true to use it, or delete it" if state in ATTACHABLE
                              else "Delete it")
                    + f" with {_by_hand(spec.app_name)}, or set rewards.{i}.serve.app to another name")
            # counted as started before it is deployed: a failed start, or a Ctrl-C or SIGTERM during a slow one,
            # deletes it below (an app left behind would run with no owner and block the next run's start)
            started.append(spec.app_name)
            begun = time.time()
            try:
                serve.run(reward_app(spec, f"rewards.{i}", quiet=True), name=spec.app_name, route_prefix=f"/{spec.app_name}")
            except Exception as err:
                cause = _deployment_messages(spec.app_name)  # (before the app is deleted)
                raise RewardServerError(f"reward app {spec.app_name!r} ({spec.name}) failed to start: "
                                        f"{cause or first_line(err)}") from err
            print(f"dmdr_rl: reward app {spec.app_name!r} ({spec.name}) is up in {time.time() - begun:.1f} s; "
                  f"HTTP: http://{host}:{port}/{spec.app_name}/score", flush=True)
    except BaseException:
        stop_reward_apps(started)
        release_claims(claimed)  # (the started ones' are released already: a no-op for them)
        raise
    return started


CLAIMS_NAMESPACE = "dmdr_rl"
_HELD_CLAIMS: dict[str, Any] = {}  # app name -> this process's AppClaim (a named actor with no handle is collected)


def _claim_name(app: str) -> str:
    return f"reward-app-claim:{app}"


def claim_app(app: str, where: str, owner: str) -> None:
    """Claims `app` for this run, or says which run holds it."""
    claim = None
    try:
        claim = AppClaim.options(name=_claim_name(app), namespace=CLAIMS_NAMESPACE).remote(owner)
        ray.get(claim.describe.remote(), timeout=120)  # through Ray Client a taken name fails only here
    except Exception as err:  # noqa: BLE001 - taken (a ValueError), or the claim could not start: which, is asked
        holder = _holder(app, other_than=claim)
        if holder is None:  # not taken: our own claim did not start (no node had room for it, say)
            if claim is not None:
                ray.kill(claim)
            raise
        raise RewardInputError(f"reward app {app!r} is being started or served by another run ({holder}). Runs that "
                               f"share one app: deploy it once on its own (`serve deploy`) and set {where}.serve.attach=true "
                               f"in each (an app a run started ends with that run, unless its driver is killed with SIGKILL); else set {where}.serve.app to a name "
                               "of this run's own") from err
    _HELD_CLAIMS[app] = claim


def _holder(app: str, other_than=None) -> str | None:
    """Who holds the claim on `app`'s name (None: nobody now, or `other_than`, our own claim)."""
    try:
        other = ray.get_actor(_claim_name(app), namespace=CLAIMS_NAMESPACE)
    except ValueError:
        return None
    if other_than is not None and other._actor_id == other_than._actor_id:
        return None
    try:
        return ray.get(other.describe.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - ending meanwhile, or not answering
        return "a run that does not answer"


def release_claims(apps: list[str], wait_s: float = 30.0) -> None:
    """Ends this process's claims on `apps` (no other's) and waits until each name is free or taken by
    another (a kill is asynchronous: a run started right after this one, by the same driver, would
    otherwise find the name still taken). Never raises (it runs on a run's way out): a claim it cannot end
    ends with this process."""
    for app in apps:
        held = _HELD_CLAIMS.pop(app, None)
        if held is None:
            continue
        try:
            ray.kill(held)
        except Exception as err:  # noqa: BLE001 - Ray is gone or going: so is the claim, with this driver
            print(f"dmdr_rl: warning: could not release the claim on reward app name {app!r} ({type(err).__name__}: "
                  f"{first_line(err)}); it ends with this process", flush=True)
            continue
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                if ray.get_actor(_claim_name(app), namespace=CLAIMS_NAMESPACE)._actor_id != held._actor_id:
                    break  # another run's claim already
            except Exception:  # noqa: BLE001 - free (a ValueError), or Ray cannot say any more: nothing to wait for
                break
            time.sleep(0.1)
        else:
            print(f"dmdr_rl: warning: the claim on reward app name {app!r} outlived {wait_s:.0f} s", flush=True)


def _http_address(cfg: RunConfig) -> tuple[str, int]:
    """Where Serve's HTTP proxy listens. A Serve instance that was already running keeps the options it was
    started with (serve.start does not change them), so ray.http_host / http_port may not be what applies:
    say so, above all when it listens more widely than configured."""
    try:
        from ray.serve.context import _get_global_client  # (no public API reads the running proxy's options)

        options = _get_global_client().http_config
        host, port = str(options.host), int(options.port)
    except Exception:  # noqa: BLE001 - a Ray without it: the configured address is the best guess
        return cfg.ray.http_host, cfg.ray.http_port
    if (host, port) != (cfg.ray.http_host, cfg.ray.http_port):
        print(f"dmdr_rl: warning: Serve was already running with HTTP on {host}:{port}, not ray.http_host:http_port = "
              f"{cfg.ray.http_host}:{cfg.ray.http_port} (a running Serve keeps its options)"
              + ("; it accepts connections from other machines" if host not in ("127.0.0.1", "localhost", "::1") else ""),
              flush=True)
    return host, port


def stop_reward_apps(names: list[str]) -> None:
    """Deletes the apps this run started and releases its claims on their names. Never raises: it runs on the
    run's way out, where an error would replace the run's own and leave the other apps behind; an app it
    cannot delete is named, with how to delete it by hand."""
    for name in names:
        try:
            serve.delete(name)
        except Exception as err:  # noqa: BLE001 - warn and go on with the others
            print(f"dmdr_rl: warning: could not delete reward app {name!r} ({type(err).__name__}: {first_line(err)}); "
                  f"delete it with {_by_hand(name)}", flush=True)
    release_claims(names)


def _by_hand(app: str) -> str:
    """How a user deletes a reward app that no run will (the `serve` CLI has no command for one app)."""
    return f"""`python -c "from ray import serve; serve.delete({app!r})"` (`serve shutdown` deletes every app)"""


@contextmanager
def reward_apps(cfg: RunConfig, own_cluster: bool = False):
    """The run's reward apps for the duration of a `with` block (attached apps are left running); `own_cluster`: the
    run started this Ray itself."""
    started = start_reward_apps(cfg, own_cluster)
    try:
        yield started
    finally:
        stop_reward_apps(started)


ATTACHABLE = ("RUNNING", "DEPLOYING")  # DEPLOYING: also while a running app is being rescaled or updated


def _status_name(status) -> str:
    return str(status).split(".")[-1]


def _deployment_messages(app: str) -> str:
    """What went wrong with an app's deployments: the last line of Serve's message, which holds the replica
    constructor's exception (the lines above it are the traceback)."""
    try:
        deployments = serve.status().applications[app].deployments
    except Exception:  # noqa: BLE001 - the app is gone: nothing more to say
        return ""
    causes = [re.sub(r"\x1b\[[0-9;]*m", "", d.message).strip().splitlines()[-1] for d in deployments.values()
              if d.message and d.message.strip()]
    return "; ".join(causes)[:1000]


def _require_running(app: str, where: str = "rewards[]"):
    """The status of the running app `app` (a reward's `serve.app` with attach: true, `where` its entry), or an error
    that says how to start it."""
    applications = serve.status().applications
    status = applications.get(app)
    if status is None or _status_name(status.status) not in ATTACHABLE:
        running = ", ".join(applications) or "none"
        raise RewardInputError(missing_app_message(app, where, running,
                                                   None if status is None else _status_name(status.status)))
    return status


def missing_app_message(app: str, where: str, running: str, state: str | None = None) -> str:
    """Why a run cannot attach to `app`, and the two ways on: deploy an app of that name, or let the run start it."""
    return (f"reward app {app!r} is not running{f' (it is {state})' if state else ''}, and {where}.serve.attach is true; "
            f"running apps: {running}. Deploy a Serve config with an application named {app!r} (`serve deploy "
            f"CONFIG.yaml`; deploy/serve-rewards.yaml is an example, whose app is 'reward-toy-align'), or set "
            f"{where}.serve.attach=false to let the run start it")


def attached_line(spec: RewardSpec, status) -> str:
    """What a run says when it attaches to a running app (`status`: its serve.status() entry)."""
    replicas = sum(count for deployment in status.deployments.values()
                   for state, count in deployment.replica_states.items() if _status_name(state) == "RUNNING")
    state = _status_name(status.status)
    return (f"dmdr_rl: reward {spec.key}: attached to the running app {spec.app_name!r} ({replicas} "
            f"replica{'s' if replicas != 1 else ''}{'' if state == 'RUNNING' else f'; the app is {state}'})")
