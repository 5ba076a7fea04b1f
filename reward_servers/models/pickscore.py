"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on human preferences, on transformers'
`CLIPModel`. score = exp(logit_scale) * cos(image embedding, prompt embedding), as in the official
inference code, with the image preprocessing done on tensors so the score is differentiable."""

from __future__ import annotations

from typing import Sequence

import torch

from dmdr_rl.hub import expand_home, local_files_only as hub_local_files_only
from dmdr_rl.registry import torch_dtype

from .clip import ProcessorGeometry, embedding

HUB_MODEL = "yuvalkirstain/PickScore_v1"
HUB_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(torch.nn.Module):
    differentiable = True

    def __init__(self, path: str = HUB_MODEL, processor_path: str = HUB_PROCESSOR, cache_dir: str | None = None,
                 local_files_only: bool = False, device: str | None = None, dtype: str = "float32",
                 logit_scale: bool = True, name: str = "pickscore"):
        """`path` / `processor_path`: hub ids or local directories (the processor gives the tokenizer
        and the image size and normalisation). `logit_scale=False` scores the plain cosine (a CLIP score,
        the scale the paper's hinge margin 0.7 is meant for)."""
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        super().__init__()
        self.name, self.use_logit_scale = name, logit_scale
        path, processor_path = expand_home(path), expand_home(processor_path)
        load = {"cache_dir": cache_dir, "local_files_only": hub_local_files_only(local_files_only, path, processor_path)}
        weights_dtype = torch_dtype(dtype, "rewards[].kwargs.dtype")
        self.model = CLIPModel.from_pretrained(path, dtype=weights_dtype, **load).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(processor_path, **load)
        processor = CLIPImageProcessor.from_pretrained(processor_path, **load)
        self.geometry = ProcessorGeometry.of(processor)
        self.max_length = min(int(self.tokenizer.model_max_length), self.model.config.text_config.max_position_embeddings)
        if device:
            self.model.to(device)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = self.geometry.pixels(images, self.device, self.model.logit_scale.dtype)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        image_embeds = embedding(self.model.get_image_features(pixel_values=pixels))
        text_embeds = embedding(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                             attention_mask=tokens.get("attention_mask")))
        cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        scale = self.model.logit_scale.exp() if self.use_logit_scale else 1.0
        return (scale * cosine).float().to(images.device)
