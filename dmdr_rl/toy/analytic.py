"""A judge with no weights: shape, colour, position, size and layout read off the pixels.

The learned judge shares its training data and labels with toy-align, and pushing images up
toy-align's gradient moves it too (`python -m dmdr_rl.toy.check --transfer`). This one is measured
instead: an object pixel is one far from grey (the renderer's backgrounds are near-grey, its palette
saturated), its colour is the nearest palette colour, and objects are the connected regions of one
colour. A region's shape comes from two rotation-free measures: how far its farthest pixel lies from
its centre against a disc of its area (circle about 1.07, square and diamond 1.26, triangle 1.5), and
how much of its bounding box it fills (square 0.84, diamond 0.55). What it checks, by scene kind:
- one object: one object region; its shape; its colour; the position nearest its centre; small or
  large by area;
- two objects: two object regions; the layout; both objects (shape and colour) in the canonical frame
  (left/upper first).
A perturbation of a few levels per channel moves none of these by more than a pixel's worth.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from .scene import COLOUR_NAMES, COLOURS, POSITION_NAMES, POSITIONS, PairScene, Scene

# Saturation (max - min over RGB) above which a pixel is an object's: backgrounds stay under ~0.12,
# the palette's colours are 0.65 or more (the renderer's soft edges give the values in between).
OBJECT_SATURATION = 0.35
# Object regions smaller than this (pixels) are specks, not objects (a small object covers 35 or more).
MIN_OBJECT_PIXELS = 12
# On 1200 fresh renders small objects covered 35-79 pixels and large ones 115-229 (triangles the least)
LARGE_OBJECT_PIXELS = 97
# Shape boundaries, from 1000 fresh renders (seed 3): farthest pixel / disc radius of the area was
# circle 1.04-1.14, square 1.17-1.35, diamond 1.13-1.36, triangle 1.37-1.63; bounding-box fill was
# square 0.70-1.00, diamond 0.49-0.68.
TRIANGLE_REACH, CIRCLE_REACH, SQUARE_FILL = 1.365, 1.155, 0.69

_PALETTE = np.asarray([COLOURS[name] for name in COLOUR_NAMES], dtype=np.float32)  # [6, 3]
_CENTRES = np.asarray([POSITIONS[name] for name in POSITION_NAMES], dtype=np.float32)  # [P, 2] (x, y)


def objects_in(image: np.ndarray) -> list[dict]:
    """The object regions of one image [3, H, W] in [0, 1], largest first: colour, pixel count, centre (x, y)."""
    saturation = image.max(axis=0) - image.min(axis=0)
    mask = saturation > OBJECT_SATURATION
    # nearest palette colour of each pixel, by the pixel's chromatic part (the renderer scales brightness)
    pixels = image.reshape(3, -1).T
    distance = ((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1)
    colour = distance.argmin(-1).reshape(image.shape[1:])
    found = []
    for index in range(len(COLOUR_NAMES)):
        regions, count = ndimage.label(mask & (colour == index))
        for region in range(1, count + 1):
            ys, xs = np.nonzero(regions == region)
            if len(xs) >= MIN_OBJECT_PIXELS:
                found.append({"colour": COLOUR_NAMES[index], "pixels": int(len(xs)), "shape": _shape(xs, ys),
                              "centre": (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)})
    return sorted(found, key=lambda o: -o["pixels"])


def _shape(xs: np.ndarray, ys: np.ndarray) -> str:
    reach = (np.sqrt(((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2).max()) + 0.5) / np.sqrt(len(xs) / np.pi)
    if reach >= TRIANGLE_REACH:
        return "triangle"
    if reach < CIRCLE_REACH:
        return "circle"
    fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    return "square" if fill >= SQUARE_FILL else "diamond"


def analytic_verdict(image: np.ndarray, scene: Scene) -> dict[str, bool]:
    """Per-attribute verdicts of one image against its scene, and `correct` (every attribute)."""
    found = objects_in(image)
    if isinstance(scene, PairScene):
        verdict = {"pair/count": len(found) == 2}
        if len(found) >= 2:
            a, b = found[0], found[1]
            horizontal = abs(a["centre"][0] - b["centre"][0]) >= abs(a["centre"][1] - b["centre"][1])
            axis = 0 if horizontal else 1
            lead, trail = (a, b) if a["centre"][axis] <= b["centre"][axis] else (b, a)
            wanted = scene.canonical
            verdict["pair/layout"] = ("horizontal" if horizontal else "vertical") == scene.layout
            verdict["pair/colours"] = (lead["colour"], trail["colour"]) == (wanted[0].colour, wanted[1].colour)
            verdict["pair/shapes"] = (lead["shape"], trail["shape"]) == (wanted[0].shape, wanted[1].shape)
        else:
            verdict["pair/layout"] = verdict["pair/colours"] = verdict["pair/shapes"] = False
    else:
        verdict = {"single/count": len(found) == 1}
        if found:
            obj = found[0]
            nearest = int(((_CENTRES - np.asarray(obj["centre"])) ** 2).sum(-1).argmin())
            verdict["single/shape"] = obj["shape"] == scene.obj.shape
            verdict["single/colour"] = obj["colour"] == scene.obj.colour
            verdict["single/position"] = POSITION_NAMES[nearest] == scene.position
            verdict["single/size"] = ("large" if obj["pixels"] >= LARGE_OBJECT_PIXELS else "small") == scene.size
        else:
            verdict.update({"single/shape": False, "single/colour": False, "single/position": False, "single/size": False})
    verdict["correct"] = all(verdict.values())
    return verdict


def analytic_accuracy(images: torch.Tensor, scenes: Sequence[Scene]) -> tuple[float, dict[str, float]]:
    """(share of images correct on every attribute, share per attribute)."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for image, scene in zip(images.detach().float().clamp(0, 1).cpu().numpy(), scenes):
        for key, ok in analytic_verdict(image, scene).items():
            totals[key][0] += int(ok)
            totals[key][1] += 1
    by_attribute = {k: right / n for k, (right, n) in sorted(totals.items()) if k != "correct"}
    return totals["correct"][0] / max(1, totals["correct"][1]), by_attribute
