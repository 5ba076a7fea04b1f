"""Reward models by name: the built-ins register here; a user's own model is named by import path
(`package.module:Class`) in the config and needs no registration. Factories import their heavy
dependencies (transformers, open_clip) only when built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dmdr_rl.hub import looks_like_a_path, missed_offline, offline_note
from dmdr_rl.registry import Registry, passes_options_to

from .protocol import RewardBuildError, RewardLoadError, RewardModel, first_line

REWARDS: Registry = Registry("reward model")


def _check_toy_align(prompts=(), prompts_from: str = "data.prompts", resolution: int | None = None,
                     where: str = "rewards[]", **_: Any) -> None:
    """toy-align reads each prompt as a toy-world scene, and scores 32 x 32 images: a prompt it cannot parse, or
    images of another size (`resolution`, model.resolution), would fail the first reward step, after the cold start."""
    from dmdr_rl.config import ConfigError
    from dmdr_rl.toy.grammar import prompt_to_scene
    from dmdr_rl.toy.scene import RESOLUTION

    if resolution is not None and resolution != RESOLUTION:
        raise ConfigError(f"{where}: toy-align scores the toy world's {RESOLUTION}x{RESOLUTION} images, and "
                          f"model.resolution={resolution} makes {resolution}x{resolution} ones: choose another reward "
                          f"for {where}.name, or model.resolution={RESOLUTION}")

    for prompt in prompts:
        try:
            prompt_to_scene(prompt)
        except ValueError as err:
            raise ConfigError(f"{prompts_from}: the toy-align reward cannot read this prompt: {err}") from None


@REWARDS.register("toy-align", check=_check_toy_align)
def _toy_align(path: str | None = None, device: str | None = None):
    from dmdr_rl.toy.weights import load_align

    model = load_align(path)
    return model.to(device) if device else model


def _pickscore_class():
    from .models.pickscore import PickScore

    return PickScore


def _image_reward_class():
    from .models.image_reward import ImageReward

    return ImageReward


def _hps_class():
    from .models.hps import HPSv2

    return HPSv2


def _open_clip_class():
    from .models.open_clip_score import OpenClipScore

    return OpenClipScore


def _aesthetic_class():
    from .models.aesthetic import LaionAesthetic

    return LaionAesthetic


@REWARDS.register("pickscore")
@passes_options_to(_pickscore_class)
def _pickscore(**kwargs):
    return _pickscore_class()(**kwargs)


@REWARDS.register("clip-score")
@passes_options_to(_pickscore_class, set_here=("logit_scale", "name"))
def _clip_score(path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", processor_path: str | None = None, **kwargs):
    """CLIP-H's image-prompt cosine (the paper's "CLIP" reward), on the same code as PickScore."""
    return _pickscore_class()(path=path, processor_path=processor_path or path, logit_scale=False, name="clip-score",
                              **kwargs)


@REWARDS.register("open-clip-score")
@passes_options_to(_open_clip_class, set_here=("name",))
def _open_clip_score(**kwargs):
    """An open_clip model's image-prompt cosine; by default DFN5B CLIP-H, the paper's code's CLIP reward."""
    return _open_clip_class()(name="open-clip-score", **kwargs)


@REWARDS.register("imagereward")
@passes_options_to(_image_reward_class)
def _imagereward(**kwargs):
    return _image_reward_class()(**kwargs)


@REWARDS.register("hpsv2")
@passes_options_to(_hps_class, set_here=("version",))
def _hpsv2(**kwargs):
    return _hps_class()(version="v2", **kwargs)


@REWARDS.register("aesthetic")
@passes_options_to(_aesthetic_class)
def _aesthetic(**kwargs):
    """The LAION aesthetic predictor on CLIP ViT-L/14 (prompt-independent; the reward of DDPO and AlignProp)."""
    return _aesthetic_class()(**kwargs)


@REWARDS.register("hpsv2.1")
@passes_options_to(_hps_class, set_here=("version",))
def _hpsv2_1(**kwargs):
    return _hps_class()(version="v2.1", **kwargs)


MADE_ON_FIRST_USE = ("cache_dir", "download_root")  # where downloads go: that they do not exist yet is no error


def _why_not_loaded(err: OSError, where: str) -> str:
    offline = offline_note() if missed_offline(err) else ""  # (a local model's own error: no hub involved)
    # the hub client's words suggest a setting nobody made, and transformers' say it could not connect where
    # HF_HUB_OFFLINE kept it from trying: the note says what happened
    if offline or type(err).__name__ == "LocalEntryNotFoundError":
        reason = offline or "Its files are not in the hub cache. "
    else:
        reason = f"{type(err).__name__}: {first_line(err).rstrip('.')}. {offline}"
    return (f"{reason}Its files come from {where}.kwargs (e.g. `path` or `checkpoint`: a local directory or file, or "
            "a hub id downloaded into `cache_dir`; see docs/rewards.md)")


def check_reward(name: str, kwargs: dict[str, Any] | None = None, where: str = "rewards[]", weight: float = 0.0,
                 policy_gradient: bool = False) -> None:
    """What can be refused without building the model (the dry run): the name resolves, the kwargs fit the
    factory's signature and, for a class, the protocol's `score` and a `differentiable` that can train
    the generator when `weight` > 0 (with ReFL; `policy_gradient`, rl.mode=grpo, needs no gradient)."""
    from dmdr_rl.config import ConfigError

    _refuse_a_score_function(name, where)
    factory = REWARDS.check_options(name, where=f"{where}.kwargs", field=f"{where}.name", **(kwargs or {}))
    if not isinstance(factory, type):
        return  # a factory function: judged by what it builds
    if not callable(getattr(factory, "score", None)):
        raise ConfigError(f"{where}.name: {name!r} is a class without a score(images, prompts) method; name a reward "
                          f"model class (see reward_servers/protocol.py) or a registered name: {', '.join(REWARDS.names())}")
    differentiable = getattr(factory, "differentiable", None)
    if weight > 0 and differentiable is False and not policy_gradient:
        raise refl_needs_a_gradient(where, name)


def _refuse_a_score_function(name: str, where: str) -> None:
    """A function of images and prompts is a score function, not what builds a reward model: said as such, not as
    the arguments the call to build it would miss."""
    import inspect

    from dmdr_rl.config import ConfigError

    resolved = REWARDS.resolve(name, f"{where}.name")
    if inspect.isfunction(resolved) and {"images", "prompts"} <= set(inspect.signature(resolved).parameters):
        raise ConfigError(f"{where}.name: {name!r} is a function of images and prompts, a score function itself; name a "
                          "reward model class with a score(images, prompts) method and a `differentiable` flag "
                          "(reward_servers/protocol.py), or a function that builds one")


def refl_needs_a_gradient(where: str, name: str):
    """The error for a reward without a gradient that would train the generator with ReFL."""
    from dmdr_rl.config import ConfigError

    return ConfigError(f"{where} ({name}) is not differentiable, so it cannot train the generator with ReFL (it needs "
                       "d score / d image): set rl.mode=grpo and student.sampler=sde (policy gradient, which needs no "
                       f"gradient of the reward), or {where}.weight=0 {where}.monitor=true to only monitor it")


def missing_files(kwargs: dict[str, Any] | None, where: str) -> list[str]:
    """`{where}.kwargs.KEY='VALUE'` for each option that names a local path (not a hub id) which does not exist here
    (`cache_dir` and the like are made on first use)."""
    return [f"{where}.kwargs.{key}={value!r}" for key, value in (kwargs or {}).items()
            if key not in MADE_ON_FIRST_USE and isinstance(value, str) and looks_like_a_path(value)
            and not Path(value).expanduser().exists()]


def check_reward_files(kwargs: dict[str, Any] | None, where: str) -> None:
    """A reward that loads on this machine (a local run's) refuses files that are not here before anything is built:
    with a large backbone, the load would otherwise find out minutes later."""
    from dmdr_rl.config import ConfigError

    missing = missing_files(kwargs, where)
    if missing:
        raise ConfigError(f"{', '.join(missing)}: {'does' if len(missing) == 1 else 'do'} not exist here; give the "
                          "local file or directory, or a hub id (see docs/rewards.md)")


def load_reward_model(name: str, kwargs: dict[str, Any] | None = None, where: str = "rewards[]") -> RewardModel:
    """Build a reward model and check that it implements the protocol (a score method and a
    `differentiable` flag); its `name` defaults to the registry name or import path. `where`: the config
    entry (rewards.N), whose `name` / `kwargs` field an error names."""
    from dmdr_rl.cli import fixable_errors
    from dmdr_rl.config import ConfigError

    _refuse_a_score_function(name, where)
    try:
        model = REWARDS.build(name, where=f"{where}.kwargs", field=f"{where}.name", **(kwargs or {}))
    except fixable_errors():  # they name what to fix themselves (a config field, toy weights to rebuild, ...)
        raise
    except ImportError as err:  # (not a bug of the model's: a package missing here)
        raise RewardLoadError(f"{where}: reward model {name!r} needs a package that is not installed here "
                              f"({type(err).__name__}: {first_line(err)}): install it where the model runs (the "
                              "HPSv2 models' and open-clip-score's open_clip: pip install -e '.[rewards]')") from err
    except Exception as err:
        missing = missing_files(kwargs, where)
        if missing and isinstance(err, (OSError, ValueError)):  # (taken for a hub id, it may fail as a ValueError)
            raise RewardLoadError(f"{where}: cannot load reward model {name!r}: {', '.join(missing)} "
                                  f"{'does' if len(missing) == 1 else 'do'} not exist here ({type(err).__name__}: {first_line(err)})") from err
        if isinstance(err, OSError):  # files that cannot be had: a wrong path, or a hub id offline and not cached
            raise RewardLoadError(f"{where}: cannot load reward model {name!r}: {_why_not_loaded(err, where)}") from err
        # the model's own constructor (or factory) failed: which entry, with its traceback chained
        raise RewardBuildError(f"{where} ({name}) could not be built: {type(err).__name__}: {first_line(err)} (the "
                               f"traceback above is the model's own: fix it there or in {where}.kwargs)") from err
    if not callable(getattr(model, "score", None)):
        raise ConfigError(f"{where}.name: reward model {name!r} built a {type(model).__name__} without a "
                          "score(images, prompts) method (see reward_servers/protocol.py)")
    if not isinstance(getattr(model, "differentiable", None), bool):
        raise ConfigError(f"{where}.name: reward model {name!r} ({type(model).__name__}) must set `differentiable = True` "
                          "or False (True when score() supports autograd with respect to the images)")
    if not isinstance(getattr(model, "name", None), str):
        model.name = name
    return model
