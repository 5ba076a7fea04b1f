"""Stable Diffusion 3 / 3.5 as a `Backbone`, on diffusers' own components (DESIGN section 5).

The transformer and its LoRA adapters are exactly the toy world's code path (`TransformerBackbone`);
what differs is the space: the generator works on VAE latents (`x` is `[16, H/8, W/8]`), prompts go
through SD3's three text encoders (rollout actors only: `encoders=False` leaves them out), and
`decode` maps latents to images in [0, 1] through the VAE with the model's shift and scaling factors,
differentiably, so the reward term back-propagates into the generator.

    backbone = load_sd3("stabilityai/stable-diffusion-3-medium-diffusers", resolution=1024)   # or a local dir
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .backbone import TransformerBackbone
from .conditioning import Conditioning
from .hub import expand_home, local_files_only, unreachable_note
from .registry import torch_dtype

DEFAULT_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
# SD3-Medium's published transformer and VAE configs, for random-weight benchmarks of the real shapes.
SD3_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                              attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                              caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
SD3_MEDIUM_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                      scaling_factor=1.5305, shift_factor=0.0609)


class BackboneLoadError(OSError):
    """A model that cannot be loaded; the message says what to pass instead."""


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent cell, from the VAE's config (a loaded VAE's `.config` or its config file's dict)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def check_resolution(resolution: int, vae_factor: int, patch_size: int, pos_embed_max_size: int | None = None) -> None:
    """Refuse a resolution the transformer cannot take: the latent must split into whole patches, and
    fit the largest position-embedding grid the model was trained with."""
    multiple = vae_factor * patch_size
    if resolution % multiple:
        lower = resolution - resolution % multiple
        raise ValueError(f"model.resolution={resolution} is not a multiple of {multiple} (VAE factor {vae_factor} x "
                         f"transformer patch size {patch_size}); use e.g. "
                         + (f"{lower} or {lower + multiple}" if lower else f"{multiple}"))
    if pos_embed_max_size and resolution > pos_embed_max_size * multiple:
        raise ValueError(f"model.resolution={resolution} is larger than the transformer's position embeddings reach "
                         f"({pos_embed_max_size} patches x {multiple} px = {pos_embed_max_size * multiple} px)")


@contextmanager
def _without_deprecation_noise() -> Iterator[None]:
    with warnings.catch_warnings():  # diffusers passes the hub client an argument it has deprecated
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
        yield


def component_config(path: str | None, component: str, local_files_only: bool = True) -> dict | None:
    """A model component's config file ("transformer", "vae"), or None when it cannot be had (with
    `local_files_only`: when it is not on this machine, a local directory or the hub cache)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    model_class = {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL}[component]
    try:
        with _without_deprecation_noise():
            return dict(model_class.load_config(path or DEFAULT_MODEL, subfolder=component, local_files_only=local_files_only))
    except (OSError, ValueError):
        return None


def check_config_files(path: str | None, resolution: int, local_files_only: bool = True) -> dict | None:
    """The resolution checked against the model's config files alone (no weights are read): with
    `local_files_only`, only when they are on this machine (a local directory or the hub cache), so a dry
    run refuses it without downloading anything. Returns the transformer's config, None when the files
    cannot be had (the load reports why) or are not an SD3 layout.
    A hub id whose files are not here is checked against the SD3 family's own geometry (VAE factor 8,
    patch 2: every SD3 and SD3.5 model's), so a resolution they cannot take stops the dry run too."""
    transformer = component_config(path, "transformer", local_files_only)
    vae = component_config(path, "vae", local_files_only) if transformer is not None else None
    if transformer is None or vae is None:
        if path is None or not Path(path).expanduser().exists():
            check_resolution(resolution, vae_scale_factor(SD3_MEDIUM_VAE), SD3_MEDIUM_TRANSFORMER["patch_size"])
        return None
    if "patch_size" not in transformer or "block_out_channels" not in vae:  # not an SD3 layout: the load says so
        return None
    check_resolution(resolution, vae_scale_factor(vae), transformer["patch_size"], transformer.get("pos_embed_max_size"))
    return transformer


class SD3Backbone(TransformerBackbone):
    def __init__(self, transformer, vae, text_pipeline=None, resolution: int = 1024, max_sequence_length: int = 256):
        """`text_pipeline`: a `StableDiffusion3Pipeline` holding the text encoders and tokenizers (None
        for a learner, which receives conditioning with each batch)."""
        factor = vae_scale_factor(vae.config)
        check_resolution(resolution, factor, transformer.config.patch_size, transformer.config.pos_embed_max_size)
        self.vae = vae.eval().requires_grad_(False)
        self.text_pipeline = text_pipeline
        self.resolution = resolution
        self.max_sequence_length = max_sequence_length
        self._latent_size = resolution // factor
        super().__init__(transformer, self._encode if text_pipeline is not None else None, self._decode)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.transformer.config.in_channels, self._latent_size, self._latent_size)

    def _modules(self) -> list:
        """The text pipeline's `to` moves its encoders (and the shared transformer and VAE again, a no-op)."""
        return [*super()._modules(), self.vae, *([self.text_pipeline] if self.text_pipeline is not None else [])]

    def enable_gradient_checkpointing(self) -> None:
        """The transformer's blocks and the VAE decoder's (the reward term back-propagates through it)."""
        super().enable_gradient_checkpointing()
        self.vae.enable_gradient_checkpointing()

    def _encode(self, prompts: Sequence[str]) -> Conditioning:
        tokens, _, pooled, _ = self.text_pipeline.encode_prompt(
            list(prompts), None, None, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        dtype = self.transformer.dtype
        return Conditioning(tokens.to(dtype), pooled.to(dtype))

    def _decode(self, x0: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        latents = x0 / config.scaling_factor + (config.shift_factor or 0.0)
        images = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (images.float() * 0.5 + 0.5).clamp(0.0, 1.0)


def load_sd3(path: str | None = None, resolution: int = 1024, encoders: bool = True, dtype: str = "float32",
             max_sequence_length: int = 256) -> SD3Backbone:
    """An SD3/SD3.5 backbone from a hub id or a local directory in the diffusers layout."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    path = path or DEFAULT_MODEL
    check_model_path(path)
    path = expand_home(path)
    weights_dtype = torch_dtype(dtype)
    load = {"dtype": weights_dtype, "local_files_only": local_files_only(False, path)}  # offline: the cache, at once
    check_config_files(path, resolution, local_files_only=load["local_files_only"])  # before gigabytes of weights
    try:
        with _without_deprecation_noise():
            transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **load)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **load)
            text_pipeline = None
            if encoders:  # shares the transformer and VAE objects: nothing is loaded twice
                text_pipeline = StableDiffusion3Pipeline.from_pretrained(path, transformer=transformer, vae=vae, **load)
    except (OSError, ValueError) as err:
        local = Path(path).is_dir()
        hint = ("the directory must hold the diffusers layout (model_index.json, transformer/, vae/, text_encoder*/, "
                "tokenizer*/)") if local else (
            f"There is no directory {path!r} here, so it was taken for a hub id. {unreachable_note()}Without network "
            "access (or without accepting the model's licence on the hub), download it elsewhere and pass the local "
            "directory: model.path=/path/to/stable-diffusion-3-medium-diffusers")
        raise BackboneLoadError(f"cannot load the SD3 model {path!r}: {type(err).__name__}: "
                                f"{_first_line(err)}. {hint}") from err
    return SD3Backbone(transformer.eval(), vae, text_pipeline, resolution, max_sequence_length)


def check_model_path(path: str) -> None:
    """A path (not a hub id) must name a directory here; else the load would take it for a hub id."""
    if _names_a_directory(path) and not Path(path).expanduser().is_dir():
        raise BackboneLoadError(f"model.path={path!r} is not a directory here: pass the model's directory in the diffusers "
                                f"layout (model_index.json, transformer/, vae/, text_encoder*/, tokenizer*/), or a hub id "
                                f"such as {DEFAULT_MODEL!r}")


def _names_a_directory(path: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative by ./ ../ ~, or with more than one '/'."""
    return Path(path).is_absolute() or path.startswith((".", "~")) or path.count("/") != 1


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else ""
