"""The toy teacher: a tiny diffusers SD3 transformer in pixel space plus the toy text encoder.

`ToyPipeline` composes them the way a diffusers pipeline composes a transformer and a scheduler:
encode prompts, predict velocity with classifier-free guidance, sample with `flow.sample_euler`,
and map between images in [0, 1] and model space in [-1, 1].
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import SD3Transformer2DModel

from ..conditioning import Conditioning
from ..flow import sample
from .render import RESOLUTION
from .text import ToyTextEncoder

# Patch 4 gives 64 image tokens: about ten times cheaper on a CPU than patch 2 (ENVIRONMENT.md);
# width 96 and 4 layers (1.3M parameters) keep a DMDR step (several forward passes) cheap too.
TEACHER_CONFIG = dict(
    sample_size=RESOLUTION,
    patch_size=4,
    in_channels=3,
    out_channels=3,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=3,
    joint_attention_dim=64,
    caption_projection_dim=96,
    pooled_projection_dim=64,
    pos_embed_max_size=RESOLUTION // 4,
)
# The guidance scale the main job and the docs use for the teacher (chosen by the CFG sweep in the README).
DEFAULT_CFG = 3.0


# Alternatives tried while building the shipped teacher (see README, "Rebuilding the shipped weights").
TEACHER_VARIANTS: dict[str, dict] = {
    "p4w96": {},
    "p2w64": dict(patch_size=2, pos_embed_max_size=RESOLUTION // 2, num_attention_heads=2, caption_projection_dim=64),
}


def create_teacher_transformer(seed: int = 0, variant: str = "p4w96") -> SD3Transformer2DModel:
    if variant not in TEACHER_VARIANTS:
        raise ValueError(f"unknown teacher variant {variant!r}; allowed: {', '.join(TEACHER_VARIANTS)}")
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**TEACHER_CONFIG, **TEACHER_VARIANTS[variant]})


def images_to_model_space(images: torch.Tensor) -> torch.Tensor:
    return images * 2.0 - 1.0


def model_space_to_images(x: torch.Tensor) -> torch.Tensor:
    """Differentiable inside [0, 1]; values outside are clipped as a renderer would."""
    return (x * 0.5 + 0.5).clamp(0.0, 1.0)


class ToyPipeline:
    """Sampling from the toy teacher (or any transformer of its family) with CFG."""

    def __init__(self, transformer: SD3Transformer2DModel, text_encoder: ToyTextEncoder):
        self.transformer = transformer
        self.text_encoder = text_encoder

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.transformer.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        return self.text_encoder.encode(prompts)

    def null(self, batch: int) -> Conditioning:
        return self.text_encoder.encode([""] * batch)

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, null: Conditioning | None = None, cfg: float = 1.0
    ) -> torch.Tensor:
        """v(x_t, t | c); with cfg != 1, v_null + cfg (v_cond - v_null) from one batched call."""
        if cfg == 1.0 or null is None:
            return self._forward(x_t, t, cond)
        both = Conditioning.cat([null, cond])
        v_null, v_cond = self._forward(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return v_null + cfg * (v_cond - v_null)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.transformer(
            hidden_states=x_t, encoder_hidden_states=cond.tokens, pooled_projections=cond.pooled, timestep=t * 1000.0
        ).sample

    @torch.no_grad()
    def sample(
        self, prompts: Sequence[str], steps: int, cfg: float, seed: int, shift: float = 1.0, progress: bool = False
    ) -> torch.Tensor:
        """Images [B, 3, 32, 32] in [0, 1]; the same (prompts, seed) gives the same images."""
        cond = self.encode(prompts)
        null = self.null(len(prompts)) if cfg != 1.0 else None
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(prompts), *self.sample_shape), generator=generator)
        x0 = sample(lambda x, t: self.velocity(x, t, cond, null, cfg), noise, steps, shift, progress=progress).x0
        return model_space_to_images(x0)
