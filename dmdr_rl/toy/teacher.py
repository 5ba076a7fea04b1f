"""The toy teacher: a tiny diffusers SD3 transformer in pixel space plus the toy text encoder,
wrapped as the toy `Backbone` (the same class family and code path as a real SD3 backbone).
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from ..backbone import TransformerBackbone
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


# Alternatives tried while building the shipped teacher (see docs/toy-world.md, "Rebuilding the shipped weights").
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


class ToyBackbone(TransformerBackbone):
    """The toy teacher as a `Backbone`: the pixel-space transformer, the toy text encoder, and the
    identity "VAE" (model space [-1, 1] <-> images [0, 1])."""

    def __init__(self, transformer: SD3Transformer2DModel, text_encoder: ToyTextEncoder | None):
        """`text_encoder=None`: a learner's backbone, which gets conditioning with its batches."""
        super().__init__(transformer, text_encoder.encode if text_encoder is not None else None, model_space_to_images)
        self.text_encoder = text_encoder.requires_grad_(False) if text_encoder is not None else None

    def _modules(self) -> list:
        return [*super()._modules(), *([self.text_encoder] if self.text_encoder is not None else [])]
