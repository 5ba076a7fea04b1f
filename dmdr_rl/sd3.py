"""Stable Diffusion 3 / 3.5 as a `Backbone`, on diffusers' own components (DESIGN section 5).

The transformer and its LoRA adapters are exactly the toy world's code path (`TransformerBackbone`),
on VAE latents (`x` is `[16, H/8, W/8]`) with a differentiable decode (`dmdr_rl.latent`, shared with
Flux). What is SD3's own: its family data, and prompts through its three text encoders (rollout actors
only: `encoders=False` leaves them out).

    backbone = load_sd3("stabilityai/stable-diffusion-3-medium-diffusers", resolution=1024)   # or a local dir
"""

from __future__ import annotations

from typing import Sequence

from .conditioning import Conditioning
from .latent import LatentBackbone, ModelFamily, load_components, vae_scale_factor

DEFAULT_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
# SD3-Medium's published transformer and VAE configs, for random-weight benchmarks of the real shapes.
SD3_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                              attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                              caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
SD3_MEDIUM_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                      scaling_factor=1.5305, shift_factor=0.0609)


SD3 = ModelFamily(
    name="SD3", default_model=DEFAULT_MODEL, transformer_class="SD3Transformer2DModel",
    pipeline_class="StableDiffusion3Pipeline", patch_size=lambda config: config["patch_size"],
    max_patches=lambda config: config.get("pos_embed_max_size"),
    geometry=(vae_scale_factor(SD3_MEDIUM_VAE), SD3_MEDIUM_TRANSFORMER["patch_size"]),  # every SD3 and SD3.5 model's
)


class SD3Backbone(LatentBackbone):
    family = SD3

    def __init__(self, transformer, vae, text_pipeline=None, resolution: int = 1024, max_sequence_length: int = 256):
        """`text_pipeline`: a `StableDiffusion3Pipeline` holding the text encoders and tokenizers (None
        for a learner, which receives conditioning with each batch)."""
        self.max_sequence_length = max_sequence_length
        super().__init__(transformer, vae, text_pipeline, resolution)

    def _encode(self, prompts: Sequence[str]) -> Conditioning:
        tokens, _, pooled, _ = self.text_pipeline.encode_prompt(
            list(prompts), None, None, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        dtype = self.transformer.dtype
        return Conditioning(tokens.to(dtype), pooled.to(dtype))


def load_sd3(path: str | None = None, resolution: int = 1024, encoders: bool = True, dtype: str = "float32",
             max_sequence_length: int = 256) -> SD3Backbone:
    """An SD3/SD3.5 backbone from a hub id or a local directory in the diffusers layout."""
    transformer, vae, text_pipeline = load_components(SD3, path, resolution, encoders, dtype)
    return SD3Backbone(transformer, vae, text_pipeline, resolution, max_sequence_length)
