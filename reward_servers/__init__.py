"""Reward models and their Ray Serve deployments (DESIGN section 3).

- `protocol`: what a reward model implements (`score(images, prompts)`, `name`, `differentiable`) and
  the input/output checks every placement applies;
- `registry`: built-in models by name, a user's own by import path `package.module:Class`;
- `local` / `client`: in-process placement, or a client of a Serve app (timeouts, retries, validation);
- `gradient`: d score / d image across processes, glued back into the learner's autograd graph;
- `serve`: the Serve deployment (dynamic batching, HTTP endpoint) and the app lifecycle of a run;
- `models/`: the built-in reward models (PickScore, HPSv2; toy-align lives with the toy world).

`reward_model(spec)` turns one `rewards:` entry of the config into a reward model object.
"""

from __future__ import annotations

from dmdr_rl.config import RewardSpec

from .protocol import (RewardBuildError, RewardInputError, RewardLoadError, RewardModel, RewardScoreError, RewardServerError,
                       validate_images, validate_scores)
from .registry import REWARDS, load_reward_model


def reward_model(spec: RewardSpec, where: str = "rewards[]") -> RewardModel:
    """The model of one config entry in its placement: in this process, or a client of its Serve app."""
    if spec.placement == "serve":
        from .client import RemoteReward, RewardClient, ServeTransport

        s = spec.serve
        client = RewardClient(ServeTransport(spec.app_name), spec.app_name, s.timeout_s, s.retries, s.backoff_s)
        remote = RemoteReward(client)
        if s.attach and spec.name in REWARDS.names() and remote.name != spec.name:  # (a user's class names itself)
            raise RewardInputError(f"{where}: the attached app {spec.app_name!r} serves {remote.name!r}, not {spec.name!r}: "
                                   f"set {where}.serve.app to the app that serves {spec.name!r}, or {where}.name to "
                                   f"{remote.name!r}")
        return remote
    from .local import InProcessReward

    return InProcessReward(load_reward_model(spec.name, spec.kwargs, where), spec.max_images_per_call)


__all__ = ["REWARDS", "RewardBuildError", "RewardInputError", "RewardLoadError", "RewardModel", "RewardScoreError",
           "RewardServerError", "load_reward_model", "reward_model",
           "validate_images", "validate_scores"]
