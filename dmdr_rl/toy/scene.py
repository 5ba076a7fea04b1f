"""The toy world's vocabulary and scene descriptions.

A scene is either one object (shape, colour, size, position) or two objects joined by a spatial
relation. Everything else in the toy world (prompts, renderer, classifiers, metrics) is written
against these dataclasses, so the vocabulary lives in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

RESOLUTION = 32  # the side of every toy image, in pixels (here, not in the renderer: the config reads it without torch)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.12),
    "green": (0.15, 0.78, 0.22),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.15),
    "purple": (0.62, 0.20, 0.85),
    "cyan": (0.15, 0.85, 0.90),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: tuple[str, ...] = ("small", "large")
# Position name -> centre (x, y) in pixels of a 32x32 canvas; y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (16.0, 16.0),
    "top left": (9.5, 9.5),
    "top right": (22.5, 9.5),
    "bottom left": (9.5, 22.5),
    "bottom right": (22.5, 22.5),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# Two-object scenes are judged in a canonical frame: the layout axis, then the first object
# (the left one, or the upper one) and the second.
LAYOUTS: tuple[str, ...] = ("horizontal", "vertical")


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("colour", self.colour, COLOUR_NAMES)


@dataclass(frozen=True)
class SingleScene:
    """One object: "a small red circle in the top left"."""

    obj: ToyObject
    size: str
    position: str

    def __post_init__(self) -> None:
        _check("size", self.size, SIZES)
        _check("position", self.position, POSITION_NAMES)

    @property
    def objects(self) -> tuple[ToyObject, ...]:
        return (self.obj,)


@dataclass(frozen=True)
class PairScene:
    """Two objects and a relation: "a red circle left of a blue square" (first REL second)."""

    first: ToyObject
    relation: str
    second: ToyObject

    def __post_init__(self) -> None:
        _check("relation", self.relation, RELATIONS)

    @property
    def objects(self) -> tuple[ToyObject, ...]:
        return (self.first, self.second)

    @property
    def layout(self) -> str:
        return "horizontal" if self.relation in ("left of", "right of") else "vertical"

    @property
    def canonical(self) -> tuple[ToyObject, ToyObject]:
        """(left or upper object, right or lower object): the frame the classifiers predict in."""
        if self.relation in ("left of", "above"):
            return self.first, self.second
        return self.second, self.first


Scene = Union[SingleScene, PairScene]


def _check(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {field} {value!r}; allowed: {', '.join(allowed)}")
