"""Sample grids: images with their prompts underneath, written as one PNG for a quick look."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """images [B, 3, H, W] in [0, 1] (any device) as one host array [B, H, W, 3] of 8-bit pixels."""
    return (images.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


GRID_TILE_FROM = 128  # small images are enlarged by a whole factor to about this edge (nearest: pixels stay sharp)
GRID_TILE_AT_MOST = 512  # large ones are shrunk to this edge: a 1024-px grid would be a 33k-px PNG at full size


def tile_size(height: int, width: int) -> tuple[int, int]:
    """A grid tile's (height, width) for images of this size: the full images are in the run's Parquet files."""
    scale = max(1, GRID_TILE_FROM // max(height, width))
    height, width = height * scale, width * scale
    shrink = max(height, width) / GRID_TILE_AT_MOST
    if shrink > 1:
        height, width = max(1, round(height / shrink)), max(1, round(width / shrink))
    return height, width


def save_grid(images: torch.Tensor, captions: Sequence[str], path: str | Path, columns: int = 8) -> Path:
    """images [B, 3, H, W] in [0, 1]; each tile (`tile_size`) above its caption."""
    if images.shape[0] != len(captions):
        raise ValueError(f"save_grid got {images.shape[0]} images but {len(captions)} captions")
    if images.shape[0] == 0:
        raise ValueError("save_grid got no images")
    font = ImageFont.load_default()
    tile_h, tile_w = tile_size(images.shape[2], images.shape[3])
    resample = Image.NEAREST if tile_w >= images.shape[3] else Image.LANCZOS
    chars_per_line = max(8, tile_w // 6)
    wrapped = [textwrap.wrap(c, chars_per_line)[:4] or [""] for c in captions]
    caption_h = 12 * max(len(lines) for lines in wrapped) + 4
    rows = (len(captions) + columns - 1) // columns
    pad = 4
    canvas = Image.new("RGB", (columns * (tile_w + pad) + pad, rows * (tile_h + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = to_uint8(images)
    for i, (tile, lines) in enumerate(zip(pixels, wrapped)):
        x = pad + (i % columns) * (tile_w + pad)
        y = pad + (i // columns) * (tile_h + caption_h + pad)
        canvas.paste(Image.fromarray(tile).resize((tile_w, tile_h), resample), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + tile_h + 2 + 12 * j), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
