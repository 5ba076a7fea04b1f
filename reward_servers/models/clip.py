"""CLIP-style image preprocessing as differentiable tensor ops (the PIL processors cut the graph):
resize the shortest side (bicubic, antialiased), centre-crop, normalise."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def clip_preprocess(images: torch.Tensor, size: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> normalised pixel values [B, 3, crop, crop], with gradients."""
    height, width = images.shape[-2:]
    if min(height, width) != size:  # torchvision's Resize(int): the long side is truncated, not rounded
        new_size = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
        images = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=True)
    height, width = images.shape[-2:]
    top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))  # torchvision's CenterCrop
    images = images[..., top : top + crop, left : left + crop]
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def embedding(output) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features (the projection is `pooler_output`);
    older versions return the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
