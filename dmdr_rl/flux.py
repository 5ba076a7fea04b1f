"""FLUX.1 as a `Backbone`, on diffusers' own components: the second diffusers family after SD3.

What is Flux's own, beside SD3 (`dmdr_rl.latent` holds what they share):
- the call: Flux's transformer takes the latent as a sequence of 2x2 patches ("packed", [B, HW/4, 4C]) with
  position ids for its rotary embedding, and the timestep as t in [0, 1] (it multiplies by 1000 itself).
  `x` stays the VAE's latent [C, H/8, W/8]: the sampler, the losses and the critic see no difference.
- guidance: FLUX.1-dev is guidance-distilled. Its guidance scale is an input of the network (an
  embedding), not two passes; the backbone passes `guidance` (model.kwargs; default 3.5, diffusers'
  default) to every call of the teacher, the generator and the critic alike. The DMD real score's CFG
  (`dmd.real_cfg`) is true classifier-free guidance on top of it, against the empty prompt: the presets
  leave it off (real_cfg=1, cfg_jitter=0), as FLUX.1-dev was not trained for it. FLUX.1-schnell has no
  guidance embedding.
- prompts: CLIP-L's pooled output and T5-XXL's tokens (`max_sequence_length`, diffusers' default 512).
- the sampling shift: diffusers' Flux scheduler shifts by the image's token count (`use_dynamic_shifting`,
  shift = exp(mu): about 1.9 at 512 px, 3.2 at 1024 px); here the shift is `student.shift` (and the
  teacher's), fixed per run, and the export says how to make diffusers use the same. A run whose student.shift is
  far from the pipeline's at its resolution is warned (`dmdr_rl.latent.shift_note`).

    backbone = load_flux("black-forest-labs/FLUX.1-dev", resolution=1024)   # or a local directory
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .conditioning import Conditioning
from .latent import LatentBackbone, ModelFamily, load_components, option_text

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"
PACK = 2  # the latent's patches, packed into tokens by the pipeline (the transformer's own patch_size is 1)
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale
# FLUX.1-dev's published transformer config, for random-weight benchmarks of the real shapes.
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))

# FLUX.1's VAE (the same layout as SD3's, its own factors)
FLUX_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                scaling_factor=0.3611, shift_factor=0.1159)


def check_guidance(config: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """model.kwargs.guidance: a scale > 0 (null: the pipeline's default), for a transformer with a guidance embedding
    (FLUX.1-dev's; not schnell's)."""
    guidance = options.get("guidance")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance > 0):
        raise ValueError(f"model.kwargs.guidance={option_text(guidance)}: FLUX.1-dev's embedded guidance scale, a number > 0 "
                         f"(null: its pipeline's default, {DEFAULT_GUIDANCE})")
    if guidance is not None and not config.get("guidance_embeds", False):
        raise ValueError(f"model.kwargs.guidance={options['guidance']}: this Flux transformer has no guidance embedding "
                         "(guidance_embeds: false, as FLUX.1-schnell): set model.kwargs.guidance=null (flux-dev-dmdr "
                         "sets 3.5; `guidance: null` under model.kwargs in a config file)")


def flux_shift(resolution: int, vae_factor: int = 8) -> float:
    """The shift diffusers' Flux scheduler applies at this resolution (exp(mu), mu linear in the token count from
    0.5 at 256 tokens to 1.15 at 4096): what a run's `student.shift` should be to match FLUX.1-dev's sampling."""
    import math

    tokens = (resolution // (vae_factor * PACK)) ** 2
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    return math.exp(mu)


FLUX = ModelFamily(
    name="Flux", default_model=DEFAULT_MODEL, transformer_class="FluxTransformer2DModel", pipeline_class="FluxPipeline",
    patch_size=lambda config: PACK * config.get("patch_size", 1), max_patches=lambda config: None,  # rotary: any size
    geometry=(8, PACK),  # every FLUX.1 model's
    # the embedded guidance (schnell's pipeline ignores it)
    pipeline_guidance=lambda kwargs: DEFAULT_GUIDANCE if kwargs.get("guidance") is None else kwargs["guidance"],
    scheduler_settings=(("use_dynamic_shifting", False),),  # else the scheduler shifts by the token count instead
    check_options=check_guidance, patch_words="2x2 packing",
    dynamic_shift=flux_shift,  # FLUX.1-dev's pipeline shifts by the image's size; a run's student.shift is fixed
    published_configs={"black-forest-labs/FLUX.1-dev": {"guidance_embeds": True},
                       "black-forest-labs/FLUX.1-schnell": {"guidance_embeds": False}},
)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], diffusers' `FluxPipeline._pack_latents`."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack`, to a latent of `height` x `width`."""
    b, _, channels = tokens.shape
    c = channels // (PACK * PACK)
    return tokens.reshape(b, height // PACK, width // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """The packed tokens' (0, row, column) position ids, as `FluxPipeline._prepare_latent_image_ids` makes them."""
    rows = torch.arange(height // PACK, device=device, dtype=dtype)[:, None].expand(-1, width // PACK)
    columns = torch.arange(width // PACK, device=device, dtype=dtype)[None, :].expand(height // PACK, -1)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)


class FluxBackbone(LatentBackbone):
    family = FLUX

    def __init__(self, transformer, vae, text_pipeline=None, resolution: int = 1024, max_sequence_length: int = 512,
                 guidance: float | None = None):
        """`text_pipeline`: a `FluxPipeline` holding CLIP and T5 (None for a learner). `guidance`: the embedded
        guidance scale of a guidance-distilled model (default 3.5); refused for a model without the embedding."""
        check_guidance(transformer.config, {"guidance": guidance})
        self.guidance = (DEFAULT_GUIDANCE if guidance is None else float(guidance)) if transformer.config.guidance_embeds else None
        self.max_sequence_length = max_sequence_length
        super().__init__(transformer, vae, text_pipeline, resolution)

    def call_transformer(self, module: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Packed in, unpacked out; the guidance embedded when the model has it. The timestep as FluxPipeline passes
        it: its scheduler's 1000 t in the activations' precision, divided by 1000 there (the model multiplies by
        1000 again, in its precision). A bf16 model then sees the timesteps an exported student is sampled at in a
        bf16 pipeline, not t rounded once (at the preset's shift 3.16, 908 where the pipeline gives 904)."""
        batch, _, height, width = x_t.shape
        guidance = None if self.guidance is None else torch.full((batch,), self.guidance, device=x_t.device)
        timestep = (t * 1000.0).to(x_t.dtype) / 1000.0
        out = module(hidden_states=pack(x_t), encoder_hidden_states=cond.tokens, pooled_projections=cond.pooled,
                     timestep=timestep, img_ids=image_ids(height, width, x_t.device, x_t.dtype),
                     txt_ids=torch.zeros(cond.tokens.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
                     guidance=guidance).sample
        return unpack(out, height, width)

    def _encode(self, prompts: Sequence[str]) -> Conditioning:
        tokens, pooled, _ = self.text_pipeline.encode_prompt(list(prompts), None, max_sequence_length=self.max_sequence_length)
        dtype = self.transformer.dtype
        return Conditioning(tokens.to(dtype), pooled.to(dtype))


def load_flux(path: str | None = None, resolution: int = 1024, encoders: bool = True, dtype: str = "float32",
              max_sequence_length: int = 512, guidance: float | None = None) -> FluxBackbone:
    """A FLUX.1 backbone (dev or schnell) from a hub id or a local directory in the diffusers layout."""
    transformer, vae, text_pipeline = load_components(FLUX, path, resolution, encoders, dtype, {"guidance": guidance})
    return FluxBackbone(transformer, vae, text_pipeline, resolution, max_sequence_length, guidance)
