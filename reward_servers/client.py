"""The learner's and rollout actors' side of a reward server: a client with timeouts, retries with
backoff and answer validation, and `RemoteReward`, which makes a Serve app look like an in-process
reward model (gradients included, see `gradient.py`).

The client talks to a *transport* -- a callable `(method, images, prompts, timeout_s) -> dict` -- so the
retry and validation logic is tested without Ray; `ServeTransport` is the one used in runs.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import torch

from .gradient import attach_gradient, drop_unusable, wants_gradient
from .protocol import (RewardInputError, RewardModelError, RewardOutputError, RewardServerError, first_line, validate_images,
                       validate_scores)

log = logging.getLogger(__name__)

Transport = Callable[[str, torch.Tensor, list, float], dict]


class ServeTransport:
    """Calls a reward app's deployment through a Serve handle (looked up by app name on first use)."""

    def __init__(self, app: str):
        self.app = app
        self._handle = None

    def __call__(self, method: str, images: torch.Tensor | None, prompts: list | None, timeout_s: float) -> dict:
        from ray import serve

        if self._handle is None:
            # the handle's router logs INFO lines as it starts (and a line per replica change): in a learner or
            # rollout worker they only reach the training run's console, out of order
            logging.getLogger("ray.serve").setLevel(max(logging.WARNING, logging.getLogger("ray.serve").level))
            self._handle = serve.get_app_handle(self.app)
        call = getattr(self._handle, method)
        response = call.remote() if images is None else call.remote(images, prompts)
        try:
            return response.result(timeout_s=timeout_s)
        except TimeoutError:
            response.cancel()  # do not leave the work queued on a replica that is already slow
            raise

    def __getstate__(self):  # a handle is rebuilt in each process
        return {"app": self.app, "_handle": None}


class RewardClient:
    def __init__(self, transport: Transport, app: str, timeout_s: float = 120.0, retries: int = 3,
                 backoff_s: float = 0.5, max_backoff_s: float = 10.0):
        self.transport, self.app = transport, app
        self.timeout_s, self.retries, self.backoff_s, self.max_backoff_s = timeout_s, retries, backoff_s, max_backoff_s
        self.requests = 0  # answered calls
        self.failed_attempts = 0  # transient failures that a retry absorbed or that ended the run

    def info(self) -> dict:
        """The served model's name and whether it is differentiable (also a reachability check)."""
        answer = self._call("info", None, None)
        if not isinstance(answer, dict) or not {"name", "differentiable"} <= answer.keys():
            raise RewardServerError(f"reward app {self.app!r}: info() returned {answer!r}")
        return answer

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check_input(images, prompts)
        answer = self._answer("score", images, prompts)
        return validate_scores(answer.get("scores"), images.shape[0], f"reward app {self.app!r}").to(images.device)

    def score_with_grad(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and d score / d image. A sample whose gradient is not finite is treated like one whose
        score is not: its score becomes NaN (dropped from the reward term and counted), its gradient 0."""
        self._check_input(images, prompts)
        answer = self._answer("score_with_grad", images, prompts)
        scores = validate_scores(answer.get("scores"), images.shape[0], f"reward app {self.app!r}")
        grads = answer.get("grads")
        if not isinstance(grads, torch.Tensor) or not grads.is_floating_point() or grads.shape != images.shape:
            raise RewardServerError(f"reward app {self.app!r} returned gradients {getattr(grads, 'dtype', type(grads))} "
                                    f"of shape {list(getattr(grads, 'shape', []))}, expected float {list(images.shape)}")
        scores, grads = drop_unusable(scores, grads)
        return scores.to(images.device), grads.to(images.device)

    def _check_input(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        """The protocol's input checks before anything is sent, their message naming the app (a run may
        serve several rewards)."""
        try:
            validate_images(images, prompts)
        except RewardInputError as err:
            raise RewardInputError(f"reward app {self.app!r}: {err}") from None

    def _answer(self, method: str, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        answer = self._call(method, images, prompts)
        if not isinstance(answer, dict):
            raise RewardServerError(f"reward app {self.app!r}: {method}() returned a {type(answer).__name__}, expected "
                                    f"a dict with 'scores'")
        return answer

    def _call(self, method: str, images: torch.Tensor | None, prompts: Sequence[str] | None):
        payload = None if images is None else images.detach().to("cpu", torch.float32).contiguous()
        wait, last_error = self.backoff_s, None
        for attempt in range(self.retries + 1):
            try:
                answer = self.transport(method, payload, None if prompts is None else list(prompts), self.timeout_s)
                self.requests += 1
                return answer
            except RewardInputError as err:  # the request itself is wrong: retrying cannot help
                cause = getattr(err, "cause", None) or err  # raised in a replica: Ray's error wraps the replica's
                raise RewardInputError(f"reward app {self.app!r} refused {method}(): {first_line(cause)}") from err
            except Exception as err:  # noqa: BLE001 - sorted below
                if not _transient(err):  # the app answered with an error: report it, do not retry
                    cause = getattr(err, "cause", None) or err  # (Ray's error's own first line is its process header)
                    # the model's own, which every call meets again, unless its device ran out of memory
                    error = (RewardOutputError if isinstance(cause, RewardOutputError) else
                             RewardServerError if isinstance(cause, torch.OutOfMemoryError) else RewardModelError)
                    raise error(f"reward app {self.app!r} failed in {method}(): {type(cause).__name__}: "
                                f"{first_line(cause)}") from err
                last_error = err
                self.failed_attempts += 1
                if attempt < self.retries:
                    log.warning("reward app %r: %s failed (%s: %s); retry %d/%d in %.1f s", self.app, method,
                                type(err).__name__, first_line(err), attempt + 1, self.retries, wait)
                    time.sleep(wait)
                    wait = min(2 * wait, self.max_backoff_s) if wait else 0.0
        raise RewardServerError(
            f"reward app {self.app!r} did not answer {method}() after {self.retries + 1} attempt(s): "
            f"{type(last_error).__name__}: {first_line(last_error)}. Is it running (`serve status`)? "
            f"Start it with the run (rewards[].serve.attach: false), or deploy a Serve config with an application "
            f"named {self.app!r} (`serve deploy CONFIG.yaml`; deploy/serve-rewards.yaml is an example, whose app is "
            "'reward-toy-align')"
        ) from last_error


def _transient(err: BaseException) -> bool:
    """Worth a retry: the app was unreachable, busy, restarting or slow -- not an error the model raised."""
    try:
        import ray.exceptions
        from ray.serve.exceptions import RayServeException
    except ImportError:
        return isinstance(err, (TimeoutError, ConnectionError))
    if isinstance(err, ray.exceptions.RayTaskError):  # raised by the model's code in the replica
        return False
    # (these cover ActorUnavailableError, GetTimeoutError and Serve's BackPressureError, their subclasses)
    return isinstance(err, (TimeoutError, ConnectionError, ray.exceptions.RayActorError, RayServeException))


class RemoteReward:
    """A reward model served elsewhere, behind the same protocol as an in-process one. When the images
    carry gradients it asks for d score / d image and attaches it, so ReFL back-propagates as usual."""

    def __init__(self, client: RewardClient, name: str | None = None, differentiable: bool | None = None):
        self.client = client
        if name is None or differentiable is None:
            info = client.info()
            name, differentiable = info["name"], bool(info["differentiable"])
        self.name, self.differentiable = name, differentiable

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if wants_gradient(images, self.differentiable, f"reward {self.name!r} (app {self.client.app!r})"):
            scores, grads = self.client.score_with_grad(images, prompts)
            return attach_gradient(images, scores, grads)
        return self.client.score(images, prompts)
