"""Plugins by name or import path: backbones and reward models are chosen in config, never by
`if name == ...` chains. A name is looked up in its registry; "package.module:attr" is imported.
Reward models register in `reward_servers.registry.REWARDS`."""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

import torch

T = TypeVar("T")


class Registry(Generic[T]):
    """`plugin_checks`: a plugin by import path may carry its own check (`checked_by`), which `check` imports and
    calls as it does a registered one's. `caller_options`: the options every caller passes itself (a backbone's
    path, from model.path), which an error leaves out of the options the user may give."""

    def __init__(self, kind: str, plugin_checks: bool = False, caller_options: Sequence[str] = ()):
        self.kind = kind
        self.plugin_checks = plugin_checks
        self.caller_options = frozenset(caller_options)
        self._factories: dict[str, Callable[..., T]] = {}
        self._checks: dict[str, Callable[..., None]] = {}

    def register(self, name: str, check: Callable[..., None] | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """`check(path=, resolution=, prompts=, prompts_from=, lora_targets=, loads_here=, options=)`: what can be
        refused before building (the dry run, the trainers and `sample` call it through `check_model`; `options`: the
        factory's other options, model.kwargs), raising ConfigError; take **_ for more."""
        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            if check is not None:
                self._checks[name] = check
            return factory

        return decorate

    def check(self, name: str, **options: Any) -> None:
        """The check of `name` on these options: the one registered with it, or, in a registry with `plugin_checks`,
        the one a factory named by import path carries (`checked_by`); none otherwise."""
        check = self._checks.get(name)
        if check is None and self.plugin_checks and name not in self._factories:
            check = getattr(self.resolve(name), "config_check", None)
        if check is not None:
            check(**options)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def resolve(self, name: str, field: str | None = None) -> Callable[..., T]:
        """The factory of a registered name or an import path; `field`: the config field the name comes
        from, which the error names (a ConfigError, a ValueError)."""
        from .config import ConfigError, PluginImportError, _did_you_mean_among

        def error(message: str, kind: type[ConfigError] = ConfigError) -> ConfigError:
            return kind(f"{field}: {message}" if field else message)

        if name in self._factories:
            return self._factories[name]
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                module = importlib.import_module(module_name)
            except Exception as err:  # noqa: BLE001 - not found, an empty name (":Name"), or the module's own error
                reason = str(err) if isinstance(err, ImportError) else f"{type(err).__name__}: {err}"
                raise error(f"{self.kind} {name!r}: cannot import module {module_name!r} ({reason})"
                            f"{_import_hint(module_name, err)}", PluginImportError) from err
            if not attr or not hasattr(module, attr):
                raise error(f"{self.kind} {name!r}: module {module_name!r} has no attribute {attr!r}")
            factory = getattr(module, attr)
            if not callable(factory):  # (a submodule, a constant: it would fail only when the run builds it)
                what = f"module {module_name}.{attr}" if inspect.ismodule(factory) else f"a {type(factory).__name__}"
                inside = (f"; name the class or function inside it: '{module_name}.{attr}:Name'"
                          if inspect.ismodule(factory) else "")
                raise error(f"{self.kind} {name!r} names {what}, not a class or function that builds a {self.kind}"
                            f"{inside}")
            return factory
        raise error(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names()) or 'none'}, or give an import "
                    f"path 'package.module:Name'" + _did_you_mean_among(name.lower().replace("_", "-"), self.names()))

    def check_options(self, name: str, *, where: str, field: str | None = None, fixes: Mapping[str, str] | None = None,
                      **kwargs: Any) -> Callable[..., T]:
        """The factory of `name`, once the options are known to fit its signature (what the dry run can
        check without building); a factory that passes **kwargs on is judged by what it passes them to
        (`passes_options_to`), else not here. `fixes`: option -> another way to fix its refusal, for an option the
        caller added itself (bf16's dtype: "set trainer.precision=fp32")."""
        factory = self.resolve(name, field)
        signature = _signature(factory)
        if signature is None:
            return factory
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            try:
                signature.bind(**kwargs)
            except TypeError as err:
                raise self._options_error(name, where, err, _keywords(signature), fixes) from err
        elif hasattr(factory, "options_target"):
            target, set_here = factory.options_target()
            taken = _keywords(signature) | (_keywords(_signature(target)) - set(set_here))
            unknown = [key for key in kwargs if key not in taken]
            if unknown and not _takes_any_keyword(_signature(target)):
                raise self._options_error(name, where, f"unexpected keyword argument {unknown[0]!r}", taken, fixes)
        return factory

    def build(self, name: str, *, where: str | None = None, field: str | None = None,
              fixes: Mapping[str, str] | None = None, **kwargs: Any) -> T:
        """`where`: the config field the kwargs come from, named by the error when the factory does not
        take them (checked against its signature; a factory that passes **kwargs on is judged by the
        TypeError of the call it makes); `field`: the one the name comes from; `fixes`: as `check_options`."""
        factory = (self.check_options(name, where=where, field=field, fixes=fixes, **kwargs) if where is not None
                   else self.resolve(name, field))
        try:
            return factory(**kwargs)
        except TypeError as err:
            if where is None or "unexpected keyword argument" not in str(err):
                raise
            raise self._options_error(name, where, err, fixes=fixes) from err

    def _options_error(self, name: str, where: str, problem: object, taken: set[str] = frozenset(),
                       fixes: Mapping[str, str] | None = None) -> Exception:
        """`taken`: the options the factory does take, which the message names; `fixes`: another fix for the refused
        option, when it is one the caller added."""
        from .config import ConfigError

        taken = set(taken) - self.caller_options
        takes = f"; it takes {', '.join(sorted(taken))}" if taken else ""
        refused = re.search(r"unexpected keyword argument '([^']+)'", str(problem))
        other = (fixes or {}).get(refused.group(1)) if refused else None
        return ConfigError(f"{self.kind} {name!r} cannot be built with these options ({problem}{takes}); fix {where}"
                           + (f" or {other}" if other else ""))


def passes_options_to(target: Callable[[], Callable], set_here: Sequence[str] = ()):
    """Marks a factory that passes its **kwargs on to `target()` (imported when checked), which it calls with
    `set_here` set itself: the dry run then refuses an option neither takes, as for any other factory."""
    def mark(factory: Callable[..., T]) -> Callable[..., T]:
        factory.options_target = lambda: (target(), tuple(set_here))  # type: ignore[attr-defined]
        return factory

    return mark


# this project's own packages: every Ray node must have them installed, so they are never sent
OWN_PACKAGES = ("dmdr_rl", "actors", "learner", "reward_servers")


def plugin_source(name: str) -> list[str]:
    """Where a plugin named by import path ("my_pkg.module:Name") comes from when this process imports it from
    outside an installed package: its module's file, or its top-level package's directory (what Ray's py_modules
    takes); empty for a registered name, this project's or an installed package's. Nothing is imported."""
    import importlib.util
    import sysconfig
    from pathlib import Path

    top_level = name.partition(":")[0].split(".")[0] if ":" in name else ""
    if not top_level or top_level in OWN_PACKAGES:
        return []
    try:
        spec = importlib.util.find_spec(top_level)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:  # a package (a namespace package may span several directories)
        paths = [Path(location) for location in spec.submodule_search_locations]
    elif spec.origin and spec.origin.endswith(".py"):
        paths = [Path(spec.origin)]
    else:  # built-in, frozen or compiled: no user's source
        return []
    installed = {Path(sysconfig.get_paths()[key]).resolve() for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    return [str(path) for path in paths if not installed & {path.resolve(), *path.resolve().parents}]


def checked_by(check: Callable[..., None]):
    """Gives a factory named by import path the check a registered one gets with `register(name, check=...)`: the dry
    run, the trainers and `sample` call `check(path=, resolution=, prompts=, prompts_from=, lora_targets=,
    loads_here=, options=)` (take **_ for more) before anything is built; it raises ConfigError naming the field."""
    def mark(factory: Callable[..., T]) -> Callable[..., T]:
        factory.config_check = check  # type: ignore[attr-defined]
        return factory

    return mark


def _import_hint(module_name: str, err: BaseException) -> str:
    """What a plugin module's failed import needs said beyond Python's own error: where Python looked and what to do
    when its top-level package is not found; which module of that package is missing when it is found; and that the
    module was found when its own import of another package fails. Empty for the module's other errors (the reason
    says them)."""
    if not module_name:
        return ": an import path names a module before the colon, 'package.module:Name'"
    if not isinstance(err, ModuleNotFoundError) or not err.name:
        return ""
    top_level, missing = module_name.split(".")[0], err.name
    if missing == top_level:
        searched, here = _searched_directories()
        put = (f"run from the directory that holds {top_level!r}, put that directory on PYTHONPATH" if here else
               f"put the directory that holds {top_level!r} on PYTHONPATH (e.g. PYTHONPATH=. from it)")
        if _in_ray_worker():  # (the fix is where the run starts, not on this worker)
            return (f": Python searched (on this worker) {searched}; run from the directory that holds {top_level!r}, or "
                    "put that directory on PYTHONPATH where the run starts: it sends the module to the Ray it starts or "
                    "joins (py_modules). On a Ray started in the run's process before it (ray.init), pass "
                    "ray.init(runtime_env={'py_modules': [its file or package directory]}); a submitted job: `ray job "
                    "submit --working-dir <the directory that holds it>`; an installed package must be installed on "
                    "every node (docs/custom-backbone.md)")
        return f": Python searched {searched}; {put}, or install its package into this environment (pip install)"
    parent, _, last = missing.rpartition(".")
    if missing.split(".")[0] == top_level:  # a module of the plugin's own package
        importer = "" if module_name == missing or module_name.startswith(missing + ".") else \
            f"{module_name!r} imports {missing!r}, but "
        return f": {importer}{parent!r} ({_module_location(parent)}) has no module {last!r}"
    return (f": {module_name!r} was found, and its own import of {missing!r} failed: install the package that provides "
            f"{missing.split('.')[0]!r} into this environment, or put the directory that holds it on PYTHONPATH")


def _searched_directories() -> tuple[str, bool]:
    """sys.path as an error says it (the current directory, PYTHONPATH's and the installed packages' named as such;
    the standard library and import hooks left out), and whether the current directory is on it."""
    import os
    import sys
    import sysconfig
    from pathlib import Path

    paths = sysconfig.get_paths()
    installed = {Path(paths[key]).resolve() for key in ("purelib", "platlib")}
    stdlib = {Path(paths[key]).resolve() for key in ("stdlib", "platstdlib")}
    from_env = {Path(entry).resolve() for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry}
    cwd, shown, here = Path.cwd().resolve(), [], False
    for entry in dict.fromkeys(sys.path):
        path = Path(entry or ".").resolve()
        try:
            if not path.is_dir() or (path not in installed and stdlib & {path, *path.parents}):
                continue
        except OSError:  # (an error message's detail, never a new failure)
            continue
        here |= path == cwd
        label = ("the current directory" if path == cwd else "PYTHONPATH" if path in from_env else
                 "installed packages" if path in installed else None)
        text = f"{path} ({label})" if label else str(path)
        if text not in shown:
            shown.append(text)
    return ", ".join(shown) + ("" if here else f"; not the current directory ({cwd})"), here


def _module_location(name: str) -> str:
    """Where an imported module or package is, for an error (its directory or file)."""
    import sys

    module = sys.modules.get(name)
    locations = list(getattr(module, "__path__", None) or []) or [getattr(module, "__file__", None) or "?"]
    return ", ".join(map(str, locations))


def _in_ray_worker() -> bool:
    """Whether this process is a Ray actor (a rollout worker, a learner), whose path is not the driver's."""
    import sys

    ray = sys.modules.get("ray")
    try:
        return ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - an error message's hint, never a new failure
        return False


def _keywords(signature: inspect.Signature | None) -> set[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name for name, p in (signature.parameters.items() if signature else ()) if p.kind in kinds}


def _takes_any_keyword(signature: inspect.Signature | None) -> bool:
    return signature is None or any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())


def _signature(factory: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):  # no introspectable signature
        return None


BACKBONES: Registry = Registry("backbone", plugin_checks=True, caller_options=("path", "resolution", "encoders"))
# model.kwargs.dtype: the frozen base's precision (trainer.precision=bf16 passes bfloat16)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, field: str = "model.kwargs.dtype") -> torch.dtype:
    if name not in DTYPES:
        from .config import ConfigError

        raise ConfigError(f"{field}: {name!r} is not a precision here; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_toy(resolution: int = 32, prompts: Sequence[str] = (), prompts_from: str = "data.prompts",
               path: str | None = None, lora_targets: Mapping[str, Sequence[str]] | None = None, **_: Any) -> None:
    """The toy world draws 32 px scenes and its text encoder takes the toy grammar's words only; weights
    other than the shipped ones are a directory with a teacher/ inside (as `toy.build --out` writes).
    `lora_targets` (config field -> module names) against the teacher's transformer."""
    from .config import ConfigError
    from .toy.render import RESOLUTION
    from .toy.text import check_prompts
    from .toy.weights import component_dir

    if path is not None and not component_dir("teacher", path).is_dir():
        raise ConfigError(f"model.path={path!r} holds no toy teacher ({component_dir('teacher', path)} is not a directory); "
                          "null: the shipped weights, or write them with `python -m dmdr_rl.toy.build teacher --out DIR`")
    if resolution != RESOLUTION:
        raise ConfigError(f"model.resolution must be {RESOLUTION} for the toy backbone, got {resolution}")
    try:
        check_prompts(prompts)
    except ValueError as err:
        raise ConfigError(f"{prompts_from}: the toy backbone's text encoder cannot take this prompt: {err}") from None
    if lora_targets:
        from diffusers import SD3Transformer2DModel

        from .backbone import check_lora_targets

        check_lora_targets(SD3Transformer2DModel.load_config(component_dir("teacher", path)), lora_targets)


@BACKBONES.register("toy", check=_check_toy)
def _toy_backbone(path: str | None = None, resolution: int = 32, encoders: bool = True, dtype: str = "float32"):
    from .toy.weights import load_teacher

    _check_toy(resolution)
    backbone = load_teacher(path, encoders=encoders)
    if dtype != "float32":  # the frozen base only: adapters and encoders stay float32
        backbone.transformer.to(torch_dtype(dtype))
    return backbone


def _diffusers_check(family: Callable[[], Any]) -> Callable[..., None]:
    """The dry run's check of a diffusers family's backbone (`family()`: its `dmdr_rl.latent.ModelFamily`): the
    resolution, the loader's `options` (model.kwargs), the model's family and `lora_targets` (config field ->
    module names) against the model's config files, when they are on this machine; with `loads_here` (a local
    run's dry run), a model.path that names no directory here too (a Ray run's workers may mount it where this
    machine does not)."""
    def check(path: str | None = None, resolution: int = 1024, lora_targets: Mapping[str, Sequence[str]] | None = None,
              loads_here: bool = False, options: Mapping[str, Any] | None = None, **_: Any) -> None:
        from .backbone import check_lora_targets
        from .config import ConfigError
        from .latent import WrongFamilyError, check_config_files, check_model_path, option_text

        model_family = family()
        length = (options or {}).get("max_sequence_length")
        if length is not None and not (type(length) is int and 1 <= length <= MAX_T5_TOKENS):
            raise ConfigError(f"model.kwargs.max_sequence_length={option_text(length)}: the prompt's T5 tokens, an integer from 1 to "
                              f"{MAX_T5_TOKENS} (diffusers' {model_family.pipeline_class} takes no more, so an export could "
                              "not be sampled there)")
        if loads_here:
            check_model_path(model_family, path or model_family.default_model)
        try:  # (the config read once: the targets are checked against it too)
            config = check_config_files(model_family, path, resolution, options=options)
        except WrongFamilyError as err:
            right = [name for name in BACKBONES.names() if getattr(backbone_family(name), "transformer_class", None) == err.found]
            raise ConfigError(f"{err}: " + (f"set model.backbone={right[0]}" if right else "choose the model.backbone for it")) from None
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if config is not None and lora_targets:
            check_lora_targets(config, lora_targets, model_family.diffusers_class("transformer"))

    return check


def builds_family(family: Callable[[], Any]):
    """Marks a backbone factory whose models are a diffusers family (`family()`: its `dmdr_rl.latent.ModelFamily`,
    imported when asked): `export` writes its LoRA for that family's pipeline and says how to load it there."""
    def mark(factory: Callable[..., T]) -> Callable[..., T]:
        factory.family = family  # type: ignore[attr-defined]
        return factory

    return mark


def backbone_family(name: str):
    """The diffusers family (`dmdr_rl.latent.ModelFamily`) of the backbone `name` builds, None for one that is not a
    diffusers pipeline's (the toy world, most plugins)."""
    family = getattr(BACKBONES.resolve(name, "model.backbone"), "family", None)
    return family() if family is not None else None


def backbone_notes(model, shift: float) -> list[str]:
    """What the backbone's diffusers family says of settings that run but probably not as meant (printed with the
    config's warnings): a student.shift (`shift`) far from the one its pipeline samples at model.resolution. Nothing
    for a backbone that is not a family's, or one that cannot be resolved (its check says why)."""
    from .config import ConfigError

    try:
        family = backbone_family(model.backbone)
    except ConfigError:
        return []
    if family is None:
        return []
    from .latent import shift_note

    note = shift_note(family, model.path, model.resolution, shift)
    return [note] if note else []


MAX_T5_TOKENS = 512  # the longest T5 prompt diffusers' SD3 and Flux pipelines take (their check_inputs)


def _register_diffusers_family(name: str, module: str, family: str, loader: str) -> None:
    """Registers `name` as the backbone of a diffusers family: `module` (imported when the backbone is checked or
    built) holds its `ModelFamily` as `family` and its loader `loader(path, resolution, encoders=, **options)`."""
    def attribute(attr: str) -> Callable[[], Any]:
        return lambda: getattr(importlib.import_module(module, __package__), attr)

    model_family, load = attribute(family), attribute(loader)

    @BACKBONES.register(name, check=_diffusers_check(model_family))
    @builds_family(model_family)
    @passes_options_to(load)
    def factory(path: str | None = None, resolution: int = 1024, encoders: bool = True, **kwargs):
        return load()(path, resolution, encoders=encoders, **kwargs)


_register_diffusers_family("sd3", ".sd3", "SD3", "load_sd3")
_register_diffusers_family("flux", ".flux", "FLUX", "load_flux")


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


def _factory_options(model, precision: str) -> tuple[dict, dict[str, str]]:
    """The options a backbone factory gets besides path, resolution and encoders (model.kwargs, and bf16's dtype),
    and the other fix for the one this adds (a factory that does not take dtype)."""
    kwargs = dict(model.kwargs)
    if precision == "bf16" and "dtype" not in kwargs:
        kwargs["dtype"] = "bfloat16"
        return kwargs, {"dtype": "set trainer.precision=fp32 (bf16 passes dtype)"}
    return kwargs, {}


def check_model(model, prompts: Sequence[str] = (), prompts_from: str = "data.prompts",
                lora_targets: Mapping[str, Sequence[str]] | None = None, loads_here: bool = False,
                precision: str = "fp32") -> None:
    """What the config's backbone can refuse before anything is built: its options (with `precision`'s, as
    `build_backbone` passes them), prompts it cannot encode, and LoRA targets (config field -> module names)
    its model lacks; `loads_here`: the model is to load in this process, so its files must be on this machine."""
    kwargs, fixes = _factory_options(model, precision)
    BACKBONES.check_options(model.backbone, where="model.kwargs", field="model.backbone", fixes=fixes, path=model.path,
                            resolution=model.resolution, encoders=True, **kwargs)
    if "dtype" in kwargs:
        torch_dtype(kwargs["dtype"])
    BACKBONES.check(model.backbone, path=model.path, resolution=model.resolution, prompts=prompts, prompts_from=prompts_from,
                    lora_targets=lora_targets, loads_here=loads_here, options=kwargs)


def check_backbone(backbone, name: str) -> None:
    """A factory's result against `TrainableBackbone` (dmdr_rl/backbone.py): a ConfigError naming what it lacks,
    before any trainer, actor or sampler calls it."""
    from .backbone import missing_backbone_members

    missing = missing_backbone_members(backbone)
    if missing:
        from .config import ConfigError

        raise ConfigError(f"model.backbone={name!r} built a {type(backbone).__module__}.{type(backbone).__qualname__}, "
                          f"which lacks {', '.join(missing)} of the TrainableBackbone protocol (dmdr_rl/backbone.py): "
                          "subclass dmdr_rl.backbone.TransformerBackbone, or add them (docs/custom-backbone.md)")


def build_backbone(model, encoders: bool = True, precision: str = "fp32", device: torch.device | str = "cpu"):
    """The config's `model:` section as a backbone on `device` (`encoders=False`: without prompt
    encoders, as a learner), its blocks compiled with model.compile; `precision` = trainer.precision (bf16 loads the frozen weights as bfloat16).
    The factory is called as `factory(path=model.path, resolution=model.resolution, encoders=encoders,
    **model.kwargs)`, with `dtype="bfloat16"` added under bf16 unless model.kwargs sets it; what it returns must
    be a `TrainableBackbone` (`check_backbone`)."""
    kwargs, fixes = _factory_options(model, precision)
    backbone = BACKBONES.build(model.backbone, where="model.kwargs", field="model.backbone", fixes=fixes, path=model.path,
                               resolution=model.resolution, encoders=encoders, **kwargs)
    check_backbone(backbone, model.backbone)
    if model.gradient_checkpointing:
        if not hasattr(backbone, "enable_gradient_checkpointing"):
            from .config import ConfigError

            raise ConfigError(f"model.gradient_checkpointing: the backbone {model.backbone!r} ({type(backbone).__name__}) has "
                              f"no enable_gradient_checkpointing(); set it to false")
        backbone.enable_gradient_checkpointing()
    backbone = backbone.to(device)
    if model.compile:
        if not hasattr(backbone, "compile_blocks"):
            from .config import ConfigError

            raise ConfigError(f"model.compile: the backbone {model.backbone!r} ({type(backbone).__name__}) has no "
                              "compile_blocks(); set it to false")
        backbone.compile_blocks(mode=model.compile_mode)
    return backbone
