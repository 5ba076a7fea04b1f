"""CLIP-style image preprocessing as differentiable tensor ops (the PIL processors cut the graph), in
the geometry of each model's own processor:

- `resize="shortest"`: the shortest side to `size` (bicubic, antialiased), then a centre crop. The crop
  offset is rounded as torchvision's CenterCrop does (`crop_offset="round"`: ImageReward, open_clip) or
  floored as transformers' CLIPImageProcessor does (`"floor"`: PickScore, CLIP score). They differ by a
  pixel whenever the margin is odd, e.g. 832 x 1216 images.
- `resize="longest"`: the longest side to `size`, then black padding to a square, centred; HPSv2's
  scorer preprocesses this way (open_clip's `resize_longest_max` / `resize_mode="longest"`).

The resize runs in float32 whatever the model's dtype (bf16 resampling is unsupported on CPU and
imprecise on GPU); the normalised pixels are cast to `dtype`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F


def clip_preprocess(images: torch.Tensor, size: int, crop: int, mean: Sequence[float], std: Sequence[float],
                    resize: Literal["shortest", "longest", "squash"] = "shortest", crop_offset: Literal["round", "floor"] = "round",
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> normalised pixel values [B, 3, crop, crop] (`longest`, padded, and
    `squash`, resized to a square whatever the aspect: [B, 3, size, size]), with gradients; `dtype`: of the result
    (default: the images')."""
    out_dtype = dtype or images.dtype
    images = images.float() if images.dtype in (torch.bfloat16, torch.float16) else images
    if resize == "longest":
        images = _resize_longest_and_pad(images, size)
    elif resize == "squash":
        if tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    else:
        images = _resize_shortest_and_crop(images, size, crop, crop_offset)
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return ((images - mean_t) / std_t).to(out_dtype)


def _resize_shortest_and_crop(images: torch.Tensor, size: int, crop: int, crop_offset: str) -> torch.Tensor:
    height, width = images.shape[-2:]
    if min(height, width) != size:  # the long side is truncated, not rounded (torchvision and transformers alike)
        new_size = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
        images = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=True)
    height, width = images.shape[-2:]
    if crop_offset == "floor":
        top, left = (height - crop) // 2, (width - crop) // 2
    else:
        top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    return images[..., top : top + crop, left : left + crop]


def _resize_longest_and_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    if (new_height, new_width) != (height, width):
        images = F.interpolate(images, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = size - new_height, size - new_width
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


@dataclass(frozen=True)
class ProcessorGeometry:
    """A transformers `CLIPImageProcessor`'s resize, crop and normalisation, applied as `clip_preprocess` does it."""

    size: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, processor) -> "ProcessorGeometry":
        return cls(int(processor.size["shortest_edge"]), int(processor.crop_size["height"]),
                   tuple(processor.image_mean), tuple(processor.image_std))

    def pixels(self, images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> the model's pixel values, differentiable (the processor floors an odd
        crop margin)."""
        return clip_preprocess(images.to(device), self.size, self.crop, self.mean, self.std, crop_offset="floor",
                               dtype=dtype)


def embedding(output) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features (the projection is `pooler_output`);
    older versions return the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
