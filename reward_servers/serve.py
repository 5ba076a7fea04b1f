"""Reward models as Ray Serve apps: one deployment per reward model, dynamic batching of concurrent
requests (`@serve.batch`), scores or scores plus d score / d image, and an HTTP endpoint.

    python -m dmdr_rl.run --preset toy-dmdr 'rewards.0.placement=serve'   # the run starts the app
    serve deploy deploy/serve-rewards.yaml                               # or start it alone ...
    serve run deploy/serve-rewards.yaml                                  # (in the foreground)

and scale it on its own (replicas, autoscaling, GPU fractions, a runtime_env per model). Handle calls
carry tensors; the HTTP endpoint takes PNG or .npy images and never unpickles anything.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from ray import serve

from dmdr_rl.config import RewardSpec, RunConfig

from . import http
from .gradient import score_and_grad
from .protocol import RewardInputError, first_line, validate_images, validate_scores
from .registry import load_reward_model

http_app = FastAPI(title="dmdr_rl reward server")


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(http_app)
class RewardServer:
    """Holds one reward model; merges concurrent requests into one model call."""

    def __init__(self, name: str, kwargs: dict[str, Any] | None = None, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.005, threads: int | None = None, http_max_pixels: int = 2**26):
        if threads:
            torch.set_num_threads(threads)
        self.model = load_reward_model(name, kwargs)
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.http_max_pixels = http_max_pixels
        self.calls = self.images = self.max_batch_images = 0

    def info(self) -> dict:
        return {"name": self.model.name, "differentiable": self.model.differentiable,
                "calls": self.calls, "images": self.images, "max_batch_images": self.max_batch_images}

    async def score(self, images: torch.Tensor, prompts: list[str]) -> dict:
        validate_images(images, prompts)
        return await self._submit(images, prompts, False)

    async def score_with_grad(self, images: torch.Tensor, prompts: list[str]) -> dict:
        if not self.model.differentiable:
            raise RewardInputError(f"reward model {self.model.name!r} is not differentiable: use score()")
        validate_images(images, prompts)
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
        images = torch.cat([r[0] for r in requests]).float()
        prompts = [p for r in requests for p in r[1]]
        with_grad = any(r[2] for r in requests)
        if with_grad:
            scores, grads = score_and_grad(self.model, images, prompts)  # (validated there)
        else:
            with torch.no_grad():
                scores = validate_scores(self.model.score(images, prompts).float(), images.shape[0],
                                         f"reward model {self.model.name!r}")
            grads = None
        scores = scores.detach().float().cpu()
        self.calls, self.images = self.calls + 1, self.images + images.shape[0]
        answers, start = [], 0
        for request_images, _, wants_grad in requests:
            end = start + request_images.shape[0]
            answer = {"scores": scores[start:end].clone()}
            if wants_grad:
                answer["grads"] = grads[start:end].cpu().clone()
            answers.append(answer)
            start = end
        return answers

    @http_app.post("/score")
    async def score_http(self, request: http.ScoreRequest) -> dict:
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


def reward_app(spec: RewardSpec):
    """The Serve application of one reward spec (deployment options from `spec.serve`)."""
    s = spec.serve
    actor_options: dict[str, Any] = {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}
    if s.runtime_env:
        actor_options["runtime_env"] = s.runtime_env
    scaling = {"autoscaling_config": s.autoscaling} if s.autoscaling else {"num_replicas": s.replicas}
    threads = max(1, int(s.num_cpus)) if s.num_cpus else 1
    return RewardServer.options(name=spec.app_name, ray_actor_options=actor_options, **scaling).bind(
        spec.name, spec.kwargs, s.max_batch_size, s.batch_wait_timeout_s, threads, s.http_max_pixels)


def build_app(args: dict):
    """Serve's application builder for `serve deploy`/`serve run` config files: `args` is one reward
    spec (name, kwargs, serve: {...}), validated like the run's config."""
    return reward_app(RewardSpec.model_validate(args))


def start_reward_apps(cfg: RunConfig) -> list[str]:
    """Deploy every `placement: serve` reward that is not `attach`ed; check that attached ones run.
    Returns the names of the apps this run started (to be stopped with `stop_reward_apps`). An app
    of that name that already runs is not replaced (it may be someone else's): attach to it instead.
    If one app fails to start, the ones started before it are stopped again."""
    specs = [spec for spec in cfg.rewards if spec.placement == "serve"]
    if not specs:
        return []
    serve.start(http_options={"host": cfg.ray.http_host, "port": cfg.ray.http_port})
    started: list[str] = []
    try:
        for i, spec in enumerate(cfg.rewards):
            if spec.placement != "serve":
                continue
            if spec.serve.attach:
                _require_running(spec.app_name)
                continue
            if spec.app_name in serve.status().applications:
                raise RewardInputError(
                    f"reward app {spec.app_name!r} is already running (started by another run or `serve deploy`): "
                    f"set rewards.{i}.serve.attach=true to use it, or rewards.{i}.serve.app to another name")
            begun = time.time()
            serve.run(reward_app(spec), name=spec.app_name, route_prefix=f"/{spec.app_name}")
            started.append(spec.app_name)
            print(f"dmdr_rl: reward app {spec.app_name!r} ({spec.name}) is up in {time.time() - begun:.1f} s; "
                  f"HTTP: http://{cfg.ray.http_host}:{cfg.ray.http_port}/{spec.app_name}/score", flush=True)
    except BaseException:
        stop_reward_apps(started)
        raise
    return started


def stop_reward_apps(names: list[str]) -> None:
    for name in names:
        serve.delete(name)


@contextmanager
def reward_apps(cfg: RunConfig):
    """The run's reward apps for the duration of a `with` block (attached apps are left running)."""
    started = start_reward_apps(cfg)
    try:
        yield started
    finally:
        stop_reward_apps(started)


def _require_running(app: str) -> None:
    applications = serve.status().applications
    status = applications.get(app)
    if status is None or str(status.status).split(".")[-1] != "RUNNING":
        running = ", ".join(applications) or "none"
        raise RewardInputError(f"reward app {app!r} is not running (rewards[].serve.attach is true); running apps: "
                               f"{running}. Start it with `serve deploy deploy/serve-rewards.yaml` or set attach: false")
