"""A judge with no weights: shape, colour, position, size and layout read off the pixels.

The learned judge shares its training data and labels with toy-align, and pushing images up
toy-align's gradient moves it too (`python -m dmdr_rl.toy.check --transfer`). This one is measured
instead: an object pixel is one far from grey (the renderer's backgrounds are near-grey, its palette
saturated), its colour is the nearest palette colour, and objects are the connected regions of one
colour. A region's shape is the renderer's ideal shape (of the region's area and centre, turned as the
renderer turns polygons) that overlaps it best. What it checks, by scene kind:
- one object: one object region; its shape; its colour; the position nearest its centre; small or
  large by area;
- two objects: two object regions; the layout; both objects (shape and colour) in the canonical frame
  (left/upper first).
A perturbation of a few levels per channel moves none of these by more than a pixel's worth.

Every evaluation reports it (`analytic_accuracy`); saved samples are scored after the fact with

    python -m dmdr_rl.toy.analytic runs/eval/<setting>/samples.parquet   # or a run's samples/ directory:
                                                                         # one report per source and step
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .scene import COLOUR_NAMES, COLOURS, POSITION_NAMES, POSITIONS, SHAPES, PairScene, Scene

if TYPE_CHECKING:  # (torch, scipy and the renderer load on first use: --help answers at once)
    import torch

# Saturation (max - min over RGB) above which a pixel is an object's: backgrounds stay under ~0.12,
# the palette's colours are 0.65 or more (the renderer's soft edges give the values in between).
OBJECT_SATURATION = 0.35
# Object regions smaller than this (pixels) are specks, not objects (a small object covers 35 or more).
MIN_OBJECT_PIXELS = 12
# On 1200 fresh renders small objects covered 35-79 pixels and large ones 115-229 (triangles the least)
LARGE_OBJECT_PIXELS = 97
# a polygon's rotations tried (the renderer turns them by up to 0.2 rad either way)
_TURNS = tuple(np.linspace(-0.2, 0.2, 5))

_PALETTE = np.asarray([COLOURS[name] for name in COLOUR_NAMES], dtype=np.float32)  # [6, 3]
_CENTRES = np.asarray([POSITIONS[name] for name in POSITION_NAMES], dtype=np.float32)  # [P, 2] (x, y)


def objects_in(image: np.ndarray) -> list[dict]:
    """The object regions of one image [3, H, W] in [0, 1], largest first: colour, pixel count, centre (x, y)."""
    from scipy import ndimage

    saturation = image.max(axis=0) - image.min(axis=0)
    mask = saturation > OBJECT_SATURATION
    # nearest palette colour of each pixel (RGB distance)
    rgb = image.reshape(3, -1).T
    colour = ((rgb[:, None, :] - _PALETTE[None]) ** 2).sum(-1).argmin(-1).reshape(image.shape[1:])
    found = []
    for index in range(len(COLOUR_NAMES)):
        regions, count = ndimage.label(mask & (colour == index))
        for label in range(1, count + 1):
            region = regions == label
            ys, xs = np.nonzero(region)
            if len(xs) >= MIN_OBJECT_PIXELS:
                found.append({"colour": COLOUR_NAMES[index], "pixels": int(len(xs)), "shape": _shape(region, xs, ys),
                              "centre": (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)})
    return sorted(found, key=lambda o: -o["pixels"])


def _shape(region: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> str:
    """The ideal shape (the renderer's own geometry, same area and centre, upright or turned as the renderer
    turns polygons) that overlaps the region best."""
    from .render import shape_coverage

    centre, area = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5), len(xs)
    best, best_overlap = "circle", -1.0
    for shape in SHAPES:
        for turn in (0.0,) if shape == "circle" else _TURNS:
            ideal = shape_coverage(shape, *centre, _radius_for_area(shape, area), turn)[0] > 0.5
            overlap = (ideal & region).sum() / (ideal | region).sum()
            if overlap > best_overlap:
                best, best_overlap = shape, overlap
    return best


def _radius_for_area(shape: str, area: float) -> float:
    """The nominal radius at which the renderer's `shape` covers `area` pixels."""
    from .render import POLYGON_GEOMETRY

    if shape == "circle":
        return float(np.sqrt(area / np.pi))
    sides, _, scale = POLYGON_GEOMETRY[shape]
    return float(np.sqrt(2 * area / (sides * np.sin(2 * np.pi / sides)))) / scale


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
    """(share of images correct on every attribute, share per attribute), summed as the learned judge's are."""
    from .metrics import summarise_verdicts

    pixels = images.detach().float().clamp(0, 1).cpu().numpy()
    return summarise_verdicts([analytic_verdict(image, scene) for image, scene in zip(pixels, scenes)])


def score_samples(path) -> list[dict]:
    """The analytic judge on a samples file (or a directory of them) of toy prompts, from their PNGs, 8-bit
    as stored: one report per (source, step), since a run's samples/ holds the grids and rollouts of every
    step (untrained and trained images pooled into one number would describe neither)."""
    import torch

    from ..samples import decode_png, read_samples
    from .grammar import prompt_to_scene

    table = read_samples(path)
    sources = table.column("source").to_pylist() if "source" in table.column_names else [None] * table.num_rows
    groups: dict[tuple, list[int]] = {}
    for row, key in enumerate(zip(sources, table.column("step").to_pylist())):
        groups.setdefault(key, []).append(row)
    prompts, pngs = table.column("prompt").to_pylist(), table.column("png").to_pylist()
    reports = []
    for (source, step), rows in groups.items():
        scenes = [prompt_to_scene(prompts[row]) for row in rows]
        images = torch.stack([decode_png(pngs[row]) for row in rows])
        accuracy, by_attribute = analytic_accuracy(images, scenes)
        reports.append({"samples": str(path), **({"source": source} if source is not None else {}), "step": step,
                        "num_images": len(scenes), "analytic_accuracy": accuracy,
                        "analytic_accuracy_by_attribute": by_attribute})
    return reports


def main(argv: list[str] | None = None) -> None:
    from ..cli import command_summary

    parser = argparse.ArgumentParser(prog="python -m dmdr_rl.toy.analytic", description=command_summary(__doc__))
    parser.add_argument("samples", nargs="+", help="samples.parquet files or directories of them (toy prompts)")
    args = parser.parse_args(argv)
    try:
        reports = [report for path in args.samples for report in score_samples(path)]
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))


if __name__ == "__main__":
    main()
