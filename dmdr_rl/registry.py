"""Plugins by name or import path: backbones and reward models are chosen in config, never by
`if name == ...` chains. A name is looked up in its registry; "package.module:attr" is imported.
Reward models register in `reward_servers.registry.REWARDS`."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, TypeVar

import torch

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorate

    def names(self) -> list[str]:
        return sorted(self._factories)

    def resolve(self, name: str) -> Callable[..., T]:
        if name in self._factories:
            return self._factories[name]
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                raise ValueError(f"{self.kind} {name!r}: cannot import module {module_name!r} ({err})") from err
            if not hasattr(module, attr):
                raise ValueError(f"{self.kind} {name!r}: module {module_name!r} has no attribute {attr!r}")
            return getattr(module, attr)
        raise ValueError(
            f"unknown {self.kind} {name!r}; registered: {', '.join(self.names()) or 'none'}, "
            "or give an import path 'package.module:Name'"
        )

    def build(self, name: str, **kwargs: Any) -> T:
        return self.resolve(name)(**kwargs)


BACKBONES: Registry = Registry("backbone")


@BACKBONES.register("toy")
def _toy_backbone(path: str | None = None, resolution: int = 32, encoders: bool = True, dtype: str = "float32"):
    from .toy.render import RESOLUTION
    from .toy.weights import load_teacher

    if resolution != RESOLUTION:
        raise ValueError(f"model.resolution must be {RESOLUTION} for the toy backbone, got {resolution}")
    backbone = load_teacher(path, encoders=encoders)
    if dtype != "float32":  # the frozen base only: adapters and encoders stay float32
        backbone.transformer.to(getattr(torch, dtype))
    return backbone


@BACKBONES.register("sd3")
def _sd3_backbone(path: str | None = None, resolution: int = 1024, encoders: bool = True, **kwargs):
    from .sd3 import load_sd3

    return load_sd3(path, resolution, encoders=encoders, **kwargs)


def resolve_device(name: str = "auto") -> torch.device:
    """trainer.device as a torch device: `auto` is the first GPU when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from .config import ConfigError

        raise ConfigError(f"trainer.device={name} but torch sees no CUDA GPU (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}): use trainer.device=cpu or auto")
    return device


def build_backbone(model, encoders: bool = True, precision: str = "fp32", device: torch.device | str = "cpu"):
    """The config's `model:` section as a backbone on `device` (`encoders=False`: without prompt
    encoders, as a learner); `precision` = trainer.precision (bf16 loads the frozen weights as bfloat16)."""
    kwargs = dict(model.kwargs)
    if precision == "bf16":
        kwargs.setdefault("dtype", "bfloat16")
    try:
        backbone = BACKBONES.build(model.backbone, path=model.path, resolution=model.resolution, encoders=encoders, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        from .config import ConfigError

        raise ConfigError(f"backbone {model.backbone!r} does not take that option ({err}); fix model.kwargs"
                          + (" or set trainer.precision=fp32" if precision == "bf16" else "")) from err
    return backbone.to(device)
