"""Diffusers text-to-image models whose transformer works on a VAE's latents (SD3 / SD3.5, Flux): what
their backbones share, once (DESIGN section 5).

A family differs in data (`ModelFamily`: its diffusers classes, default model, patch geometry) and in
two methods of its backbone: how prompts are encoded and how its transformer is called. The rest is
here: loading from a hub id or a local directory with errors that say what to pass instead, the
resolution checked against the config files before any weights are read, and `LatentBackbone`, whose
`x` is the VAE's latent `[C, H/f, W/f]` and whose `decode` maps latents to images in [0, 1] through the
VAE with the model's shift and scaling factors, differentiably (the reward term back-propagates into
the generator). The transformer and its adapters are exactly the toy world's code path
(`TransformerBackbone`).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from .backbone import TransformerBackbone
from .cli import with_article
from .errors import in_cause_chain
from .hub import expand_home, local_files_only, missed_offline, offline_note
from .registry import torch_dtype


class BackboneLoadError(OSError):
    """A model that cannot be loaded; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelFamily:
    """A diffusers model family as the loaders, the dry run and the export need it. Classes are named, not
    imported: a config check must not import diffusers."""

    name: str  # in messages: "SD3", "Flux"
    default_model: str  # the hub id model.path=null loads
    transformer_class: str  # diffusers class names
    pipeline_class: str
    patch_size: Callable[[Mapping[str, Any]], int]  # latent cells per token side, from the transformer's config
    max_patches: Callable[[Mapping[str, Any]], int | None]  # the widest latent grid in tokens (None: any)
    geometry: tuple[int, int]  # (VAE factor, patch size) of every model of the family: a hub id not on this machine
    # the pipeline's guidance_scale that samples a student as it was trained, from model.kwargs (1: no guidance)
    pipeline_guidance: Callable[[Mapping[str, Any]], float] = lambda kwargs: 1.0
    # what an export's scheduler must set besides `shift` to sample at exactly the trained timesteps
    scheduler_settings: tuple[tuple[str, Any], ...] = ()
    # the loader's options (model.kwargs) against the transformer's config, raising ValueError: before weights load
    check_options: Callable[[Mapping[str, Any], Mapping[str, Any]], None] = lambda config, options: None
    patch_words: str = "transformer patch size"  # what the patch is called where a resolution is refused
    # the shift the family's pipeline samples at when its scheduler shifts by the image's size (diffusers'
    # use_dynamic_shifting), from (resolution, VAE factor); None: a fixed shift, the same at every resolution
    dynamic_shift: Callable[[int, int], float] | None = None
    # what `check_options` reads of the transformer config of published hub ids, by id: checked when their files are
    # not on this machine (FLUX.1-schnell has no guidance embedding)
    published_configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def diffusers_class(self, which: str) -> type:
        """`which`: "transformer" or "pipeline"."""
        import diffusers

        return getattr(diffusers, self.transformer_class if which == "transformer" else self.pipeline_class)

    @property
    def layout(self) -> str:
        return "the diffusers layout (model_index.json, transformer/, vae/, text_encoder*/, tokenizer*/)"


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent cell, from the VAE's config (a loaded VAE's `.config` or its config file's dict)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def check_resolution(resolution: int, vae_factor: int, patch_size: int, pos_embed_max_size: int | None = None,
                     patch_words: str = "transformer patch size") -> None:
    """Refuse a resolution the transformer cannot take: the latent must split into whole patches, and
    fit the largest position-embedding grid the model was trained with."""
    multiple = vae_factor * patch_size
    if resolution % multiple:
        lower = resolution - resolution % multiple
        raise ValueError(f"model.resolution={resolution} is not a multiple of {multiple} (VAE factor {vae_factor} x "
                         f"{patch_words} {patch_size}); use e.g. "
                         + (f"{lower} or {lower + multiple}" if lower else f"{multiple}"))
    if pos_embed_max_size and resolution > pos_embed_max_size * multiple:
        raise ValueError(f"model.resolution={resolution} is larger than the transformer's position embeddings reach "
                         f"({pos_embed_max_size} patches x {multiple} px = {pos_embed_max_size * multiple} px)")


@contextmanager
def without_deprecation_noise() -> Iterator[None]:
    with warnings.catch_warnings():  # diffusers passes the hub client an argument it has deprecated
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
        yield


def component_config(family: ModelFamily, path: str | None, component: str, local_files_only: bool = True) -> dict | None:
    """A model component's config file ("transformer", "vae", "scheduler"), or None when it cannot be had (with
    `local_files_only`: when it is not on this machine, a local directory or the hub cache)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    model_class = {"transformer": family.diffusers_class("transformer"), "vae": AutoencoderKL,
                   "scheduler": FlowMatchEulerDiscreteScheduler}[component]
    try:
        with without_deprecation_noise():
            return dict(model_class.load_config(path or family.default_model, subfolder=component,
                                                local_files_only=local_files_only))
    except (OSError, ValueError):
        return None


def check_config_files(family: ModelFamily, path: str | None, resolution: int, local_files_only: bool = True,
                       options: Mapping[str, Any] | None = None) -> dict | None:
    """The resolution and the loader's `options` (model.kwargs) checked against the model's config files alone (no
    weights are read): with `local_files_only`, only when they are on this machine (a local directory or the hub
    cache), so a dry run refuses them without downloading anything. Returns the transformer's config, None when
    the files cannot be had (the load reports why) or are not the family's layout. A model of another family
    (its transformer's class) is refused (WrongFamilyError).
    A hub id whose files are not here is checked against the family's own geometry (`ModelFamily.geometry`),
    so a resolution no model of the family can take stops the dry run too."""
    transformer = component_config(family, path, "transformer", local_files_only)
    vae = component_config(family, path, "vae", local_files_only) if transformer is not None else None
    if transformer is None or vae is None:
        if path is None or not Path(path).expanduser().exists():
            check_resolution(resolution, *family.geometry, patch_words=family.patch_words)
            published = family.published_configs.get(path or family.default_model)
            if published is not None:
                family.check_options(published, options or {})
        return None
    if "patch_size" not in transformer or "block_out_channels" not in vae:  # not such a layout: the load says so
        return None
    found = transformer.get("_class_name")
    if found and found != family.transformer_class:
        raise WrongFamilyError(found, f"model.path={path!r} holds {with_article(found)}, not the {family.name} family's "
                                      f"{family.transformer_class}")
    check_resolution(resolution, vae_scale_factor(vae), family.patch_size(transformer), family.max_patches(transformer),
                     family.patch_words)
    family.check_options(transformer, options or {})
    return transformer


def pipeline_shift(family: ModelFamily, path: str | None, resolution: int) -> float | None:
    """The shift the model's own diffusers pipeline samples at `resolution` where the family's follows the image's size
    (`ModelFamily.dynamic_shift`): from the model's scheduler and VAE config files when they are on this machine (None
    for a scheduler with a fixed shift, as FLUX.1-schnell's), else for the family's default model only (None: unknown,
    or a family whose shift is the same at every resolution)."""
    if family.dynamic_shift is None:
        return None
    path = expand_home(path) if path else None
    scheduler = component_config(family, path, "scheduler")
    if scheduler is None:
        return family.dynamic_shift(resolution, family.geometry[0]) if path in (None, family.default_model) else None
    if not scheduler.get("use_dynamic_shifting", False):
        return None
    vae = component_config(family, path, "vae")
    factor = vae_scale_factor(vae) if vae and "block_out_channels" in vae else family.geometry[0]
    return family.dynamic_shift(resolution, factor)


def shift_note(family: ModelFamily, path: str | None, resolution: int, shift: float, tolerance: float = 0.1) -> str | None:
    """A note when `shift` (student.shift) is off by more than `tolerance` (relative) from the shift the model's own
    pipeline samples at this resolution (`pipeline_shift`); None when it is near, or that shift is not known. A note,
    not a refusal: another shift may be chosen on purpose."""
    own = pipeline_shift(family, path, resolution)
    if own is None or abs(shift - own) <= tolerance * own:
        return None
    model = Path(path or family.default_model).name
    return (f"student.shift={shift:g}, but {model}'s own pipeline samples {resolution} px images at shift {own:.2f} "
            f"(diffusers shifts its schedule by the image's size): set student.shift={own:.2f} to sample as {model} does "
            f"at model.resolution={resolution}, or keep {shift:g} if it is chosen on purpose")


class WrongFamilyError(ValueError):
    """A model directory of another family than model.backbone's; `found`: its transformer's class."""

    def __init__(self, found: str, message: str):
        super().__init__(message)
        self.found = found


def check_model_path(family: ModelFamily, path: str) -> None:
    """A path (not a hub id) must name a directory here; else the load would take it for a hub id."""
    if _names_a_directory(path) and not Path(path).expanduser().is_dir():
        raise BackboneLoadError(f"model.path={path!r} is not a directory here: pass the model's directory in "
                                f"{family.layout}, or a hub id such as {family.default_model!r}")


def load_components(family: ModelFamily, path: str | None, resolution: int, encoders: bool, dtype: str,
                    options: Mapping[str, Any] | None = None):
    """(transformer, vae, text pipeline or None) of a model in the diffusers layout, from a hub id or a local
    directory; offline, from the hub cache at once. The resolution and the family's `options` are checked before
    any weights are read.
    The text pipeline holds the encoders and shares the transformer and VAE objects: nothing loads twice."""
    from diffusers import AutoencoderKL

    path = path or family.default_model
    check_model_path(family, path)
    path = expand_home(path)
    load = {"dtype": torch_dtype(dtype), "local_files_only": local_files_only(False, path)}
    check_config_files(family, path, resolution, load["local_files_only"], options)  # before gigabytes of weights
    try:
        with without_deprecation_noise():
            transformer = family.diffusers_class("transformer").from_pretrained(path, subfolder="transformer", **load)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **load)
            text_pipeline = None
            if encoders:
                text_pipeline = family.diffusers_class("pipeline").from_pretrained(path, transformer=transformer, vae=vae,
                                                                                    **load)
    except (OSError, ValueError) as err:
        cause = f"{type(err).__name__}: {_first_line(err)}. "
        if Path(path).is_dir():
            raise BackboneLoadError(f"cannot load the {family.name} model {path!r}: {cause}the directory must hold "
                                    f"{family.layout}") from err
        note = offline_note() if load["local_files_only"] else ""
        # a model missing from the cache "does not appear to have a file named config.json" in diffusers' words,
        # as if the repository lacked it: the note says what is missing instead
        if note and missed_offline(err):
            cause = ""
        elif not note and in_cause_chain(err, _missing_from_the_hub):
            # the hub has the repository, without the file: not the network, nor a licence
            raise BackboneLoadError(f"cannot load the {family.name} model {path!r}: {cause}There is no directory {path!r} "
                                    f"here, so it was taken for a hub id, and that hub repository does not hold "
                                    f"{family.layout}: pass one that does, such as {family.default_model!r}, or a local "
                                    f"directory in that layout") from err
        raise BackboneLoadError(
            f"cannot load the {family.name} model {path!r}: {cause}There is no directory {path!r} here, so it was taken "
            f"for a hub id. {note}Without network access (or without accepting the model's licence on the hub), download "
            f"it elsewhere and pass the local directory: model.path=/path/to/{family.default_model.split('/')[-1]}") from err
    return transformer.eval(), vae, text_pipeline


class LatentBackbone(TransformerBackbone):
    """A diffusers transformer on a VAE's latents, with the family's text pipeline as its prompt encoder (None
    for a learner, which receives conditioning with each batch). A family's subclass gives `_encode` and, when
    its transformer is not called like SD3's, `call_transformer`."""

    family: ModelFamily  # the subclass's

    def __init__(self, transformer, vae, text_pipeline=None, resolution: int = 1024):
        factor, config = vae_scale_factor(vae.config), transformer.config
        check_resolution(resolution, factor, self.family.patch_size(config), self.family.max_patches(config),
                         self.family.patch_words)
        self.vae = vae.eval().requires_grad_(False)
        self.text_pipeline = text_pipeline
        self.resolution = resolution
        self._latent_size = resolution // factor
        super().__init__(transformer, self._encode if text_pipeline is not None else None, self._decode)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.vae.config.latent_channels, self._latent_size, self._latent_size)

    def _modules(self) -> list:
        """The text pipeline's `to` moves its encoders (and the shared transformer and VAE again, a no-op)."""
        return [*super()._modules(), self.vae, *([self.text_pipeline] if self.text_pipeline is not None else [])]

    def enable_gradient_checkpointing(self) -> None:
        """The transformer's blocks and the VAE decoder's (the reward term back-propagates through it)."""
        super().enable_gradient_checkpointing()
        self.vae.enable_gradient_checkpointing()

    def _encode(self, prompts):
        raise NotImplementedError

    def _decode(self, x0: torch.Tensor) -> torch.Tensor:
        """diffusers' own decode: unscale, unshift, decode, [-1, 1] -> [0, 1]."""
        config = self.vae.config
        latents = x0 / config.scaling_factor + (config.shift_factor or 0.0)
        images = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (images.float() * 0.5 + 0.5).clamp(0.0, 1.0)


def _names_a_directory(path: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative by ./ ../ ~, or with more than one '/'."""
    return Path(path).is_absolute() or path.startswith((".", "~")) or path.count("/") != 1


def _missing_from_the_hub(err: BaseException) -> bool:
    """The hub answered that a file is not in the repository (huggingface_hub raises RemoteEntryNotFoundError, an
    EntryNotFoundError), as opposed to one missing from the local cache (LocalEntryNotFoundError)."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    return isinstance(err, EntryNotFoundError) and not isinstance(err, LocalEntryNotFoundError)


def option_text(value: Any) -> str:
    """A model.kwargs value in a message as YAML writes it (true, null, "16"), not as Python does (True, None)."""
    import json

    return json.dumps(value, default=str)  # (JSON is YAML's flow style)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else ""
