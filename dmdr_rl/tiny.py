"""Tiny random-weight SD3 and Flux pipelines built entirely from configs (no network): the real classes and
the real loading code, at sizes that train on a CPU in seconds. For tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("a an the red green blue yellow purple orange white black cyan circle square triangle diamond star "
         "small large big left right of above below top bottom center in at on").split()


def word_level_tokenizer(words=WORDS, max_length: int = 16):
    """A CLIP-style word-level tokenizer (start/end tokens 0 and 1, pad 2) over a small vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"]
    vocab = {word: i for i, word in enumerate(specials + list(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>", model_max_length=max_length)


def tiny_sd3_pipeline(seed: int = 0, resolution: int = 32):
    """A `StableDiffusion3Pipeline` of tiny random components (VAE factor 2, patch 2, 2 layers). As in SD3, T5 is
    wider than the two CLIPs' features side by side (64 here), which `encode_prompt` pads to its width (96)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = word_level_tokenizer()
        vocab_size = len(tokenizer.get_vocab())
        clip, t5 = _tiny_text_configs(vocab_size)
        vae = _tiny_vae(resolution, shift_factor=0.0609, scaling_factor=1.5305)
        transformer = SD3Transformer2DModel(sample_size=resolution // 2, patch_size=2, in_channels=4, out_channels=4,
                                            num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                            joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64,
                                            pos_embed_max_size=resolution)
        return StableDiffusion3Pipeline(
            transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(),
            text_encoder=CLIPTextModelWithProjection(clip).eval(), tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(clip).eval(), tokenizer_2=word_level_tokenizer(),
            text_encoder_3=T5EncoderModel(t5).eval(), tokenizer_3=word_level_tokenizer())


def save_tiny_sd3(directory: str | Path, seed: int = 0, resolution: int = 32) -> Path:
    """`tiny_sd3_pipeline` saved in the diffusers layout, loadable like a real model directory."""
    tiny_sd3_pipeline(seed, resolution).save_pretrained(directory)
    return Path(directory)


def tiny_flux_pipeline(seed: int = 0, resolution: int = 32, guidance_embeds: bool = True):
    """A `FluxPipeline` of tiny random components (VAE factor 2, 2x2 packing, one double- and one single-stream
    block); `guidance_embeds`: FLUX.1-dev's guidance embedding (False: schnell's layout). T5 is wider than CLIP's
    pooled output, as in FLUX.1."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = word_level_tokenizer()
        clip, t5 = _tiny_text_configs(len(tokenizer.get_vocab()))
        vae = _tiny_vae(resolution, shift_factor=0.1159, scaling_factor=0.3611)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * 4, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=4, joint_attention_dim=96,
                                             pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                             axes_dims_rope=(2, 2, 4))
        # FLUX.1-dev's scheduler shifts by the token count; the export's recipe switches that off
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
        return FluxPipeline(transformer=transformer.eval(), scheduler=scheduler, vae=vae.eval(),
                            text_encoder=CLIPTextModel(clip).eval(), tokenizer=tokenizer,
                            text_encoder_2=T5EncoderModel(t5).eval(), tokenizer_2=word_level_tokenizer())


def save_tiny_flux(directory: str | Path, seed: int = 0, resolution: int = 32, guidance_embeds: bool = True) -> Path:
    """`tiny_flux_pipeline` saved in the diffusers layout, loadable like a real model directory."""
    tiny_flux_pipeline(seed, resolution, guidance_embeds).save_pretrained(directory)
    return Path(directory)


def _tiny_text_configs(vocab_size: int):
    """A CLIP text config (32 wide) and a T5 encoder config (96 wide) over the word-level vocabulary."""
    from transformers import CLIPTextConfig, T5Config

    clip = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=16, projection_dim=32, bos_token_id=0,
                          eos_token_id=1, pad_token_id=2)
    t5 = T5Config(vocab_size=vocab_size, d_model=96, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                  pad_token_id=2, eos_token_id=1, decoder_start_token_id=0)
    return clip, t5


def _tiny_vae(resolution: int, shift_factor: float, scaling_factor: float):
    """An `AutoencoderKL` with 4 latent channels and factor 2, with the family's shift and scaling factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                         norm_num_groups=4, sample_size=resolution, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=shift_factor, scaling_factor=scaling_factor)
