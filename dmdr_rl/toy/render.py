"""Procedural renderer of toy scenes: 32x32 RGB images, deterministic per seed.

Shapes are drawn from signed distance functions with a one-pixel soft edge (anti-aliasing
without supersampling). Position, size, rotation, colour and background all jitter, and the
background carries a low-frequency texture plus pixel noise, so that the image distribution has
real spread for FID and the classifiers must learn attributes, not pixel templates.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .scene import COLOURS, POSITIONS, RESOLUTION, PairScene, Scene, SingleScene, ToyObject

_SMALL_RADIUS, _LARGE_RADIUS, _PAIR_RADIUS = 4.6, 8.0, 4.6
# Per polygon: sides, upright rotation, and the scale from the nominal radius to its circumradius (so that
# shapes look equally big).
POLYGON_GEOMETRY = {"square": (4, math.pi / 4, 1.2), "diamond": (4, 0.0, 1.2), "triangle": (3, -math.pi / 2, 1.3)}

_ys, _xs = np.mgrid[0:RESOLUTION, 0:RESOLUTION].astype(np.float32) + 0.5


def render(scene: Scene, seed: int) -> np.ndarray:
    """Render one scene as float32 [3, 32, 32] in [0, 1]; the same (scene, seed) gives the same image."""
    rng = np.random.default_rng(seed)
    image = _background(rng)
    for obj, (cx, cy), radius in _layout(scene, rng):
        turn = 0.0 if obj.shape == "circle" else rng.uniform(-0.2, 0.2)  # a polygon's rotation jitter
        coverage = shape_coverage(obj.shape, cx, cy, radius, turn)
        colour = _object_colour(obj, rng)
        texture = 1.0 + rng.normal(0.0, 0.03, size=(1, RESOLUTION, RESOLUTION)).astype(np.float32)
        image = image * (1.0 - coverage) + coverage * colour[:, None, None] * texture
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def render_batch(scenes: Sequence[Scene], seeds: Sequence[int]) -> torch.Tensor:
    """[B, 3, 32, 32] float tensor in [0, 1]."""
    if len(scenes) != len(seeds):
        raise ValueError(f"render_batch got {len(scenes)} scenes but {len(seeds)} seeds")
    return torch.from_numpy(np.stack([render(s, int(seed)) for s, seed in zip(scenes, seeds)]))


def _layout(scene: Scene, rng: np.random.Generator) -> list[tuple[ToyObject, tuple[float, float], float]]:
    if isinstance(scene, SingleScene):
        cx, cy = POSITIONS[scene.position]
        base = _SMALL_RADIUS if scene.size == "small" else _LARGE_RADIUS
        jitter = rng.uniform(-1.5, 1.5, size=2)
        return [(scene.obj, (cx + jitter[0], cy + jitter[1]), base * rng.uniform(0.92, 1.08))]
    assert isinstance(scene, PairScene)
    lead, trail = scene.canonical  # left/upper, right/lower
    along = (9.5 + rng.uniform(-1.0, 1.0), 22.5 + rng.uniform(-1.0, 1.0))
    across = rng.uniform(10.0, 22.0, size=2)
    if scene.layout == "horizontal":
        centres = [(along[0], across[0]), (along[1], across[1])]
    else:
        centres = [(across[0], along[0]), (across[1], along[1])]
    radii = _PAIR_RADIUS * rng.uniform(0.92, 1.08, size=2)
    return [(lead, centres[0], float(radii[0])), (trail, centres[1], float(radii[1]))]


def shape_coverage(shape: str, cx: float, cy: float, radius: float, turn: float = 0.0) -> np.ndarray:
    """[1, 32, 32] how much of each pixel a shape of nominal `radius` centred at (cx, cy) covers (a polygon
    turned by `turn` radians from its upright pose), with a one-pixel soft edge."""
    dx, dy = _xs - cx, _ys - cy
    if shape == "circle":
        distance = np.sqrt(dx * dx + dy * dy) - radius
    else:
        sides, phase, scale = POLYGON_GEOMETRY[shape]
        rotation = phase + turn
        circumradius = radius * scale
        apothem = circumradius * math.cos(math.pi / sides)
        # A regular polygon is the intersection of half-planes; the max of the edge distances is
        # its signed distance inside and a close enough bound outside for a one-pixel soft edge.
        edge_angles = rotation + math.pi / sides + 2 * math.pi * np.arange(sides) / sides
        distance = np.max(
            [dx * math.cos(a) + dy * math.sin(a) - apothem for a in edge_angles], axis=0
        )
    return np.clip(0.5 - distance, 0.0, 1.0)[None].astype(np.float32)


def _object_colour(obj: ToyObject, rng: np.random.Generator) -> np.ndarray:
    base = np.asarray(COLOURS[obj.colour], dtype=np.float32)
    return np.clip(base * rng.uniform(0.85, 1.08) + rng.uniform(-0.04, 0.04, size=3), 0.0, 1.0).astype(np.float32)


def _background(rng: np.random.Generator) -> np.ndarray:
    level = rng.uniform(0.12, 0.35) + rng.uniform(-0.03, 0.03, size=(3, 1, 1))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = ((_xs - 16) * math.cos(angle) + (_ys - 16) * math.sin(angle)) / 32.0
    gradient = rng.uniform(0.0, 0.12) * ramp
    coarse = torch.from_numpy(rng.normal(0.0, 0.04, size=(1, 1, 4, 4)).astype(np.float32))
    blotches = torch.nn.functional.interpolate(coarse, size=(RESOLUTION, RESOLUTION), mode="bicubic", align_corners=False)
    pixel_noise = rng.normal(0.0, 0.02, size=(3, RESOLUTION, RESOLUTION))
    return (level + gradient[None] + blotches[0].numpy() + pixel_noise).astype(np.float32)
