"""Prompts for the toy world, both ways (scene -> prompt, prompt -> scene), and the prompt splits.

Held-out prompts are the GenEval-style generalisation test: they contain a colour-shape pair
that no held-in prompt contains, so a model trained on held-in prompts never saw that object.
"""

from __future__ import annotations

import itertools
import random
from functools import lru_cache
from typing import Sequence

from .scene import (
    COLOUR_NAMES,
    POSITION_NAMES,
    RELATIONS,
    SHAPES,
    SIZES,
    PairScene,
    Scene,
    SingleScene,
    ToyObject,
)

# Colour-shape pairs never seen in held-in prompts (one per shape, all colours distinct).
HELD_OUT_OBJECTS: frozenset[ToyObject] = frozenset(
    {
        ToyObject("triangle", "red"),
        ToyObject("circle", "green"),
        ToyObject("diamond", "blue"),
        ToyObject("square", "yellow"),
    }
)
SPLITS: tuple[str, ...] = ("held-in", "held-out")


def scene_to_prompt(scene: Scene) -> str:
    if isinstance(scene, SingleScene):
        return f"a {scene.size} {scene.obj.colour} {scene.obj.shape} in the {scene.position}"
    a, b = scene.first, scene.second
    return f"a {a.colour} {a.shape} {scene.relation} a {b.colour} {b.shape}"


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order."""
    words = ["a", "in", "the"]
    words += list(SIZES) + list(COLOUR_NAMES) + list(SHAPES)
    for phrase in list(POSITION_NAMES) + list(RELATIONS):
        words += phrase.split()
    return list(dict.fromkeys(words))


def prompt_to_scene(prompt: str) -> Scene:
    """Parse a prompt of the toy grammar; the error names the word or form that is wrong."""
    words = prompt.strip().lower().split()
    if not words:
        raise ValueError("empty prompt: the toy grammar needs e.g. 'a small red circle in the center'")
    known = set(vocabulary())
    unknown = [w for w in words if w not in known]
    if unknown:
        raise ValueError(
            f"unknown word(s) {unknown} in prompt {prompt!r}; the toy vocabulary is: {' '.join(sorted(known))}"
        )
    text = " ".join(words)
    scene = _parse_table().get(text)
    if scene is None:
        raise ValueError(
            f"prompt {prompt!r} uses known words but not the toy grammar; expected "
            "'a SIZE COLOUR SHAPE in the POSITION' or 'a COLOUR SHAPE RELATION a COLOUR SHAPE', "
            "e.g. 'a large blue square in the top left' or 'a red circle left of a cyan diamond'"
        )
    return scene


@lru_cache(maxsize=1)
def all_single_scenes() -> tuple[SingleScene, ...]:
    return tuple(
        SingleScene(ToyObject(shape, colour), size, position)
        for shape, colour, size, position in itertools.product(SHAPES, COLOUR_NAMES, SIZES, POSITION_NAMES)
    )


@lru_cache(maxsize=1)
def all_pair_scenes() -> tuple[PairScene, ...]:
    objects = [ToyObject(s, c) for s, c in itertools.product(SHAPES, COLOUR_NAMES)]
    return tuple(
        PairScene(a, rel, b)
        for a, rel, b in itertools.product(objects, RELATIONS, objects)
        if a != b
    )


def is_held_out(scene: Scene) -> bool:
    return any(obj in HELD_OUT_OBJECTS for obj in scene.objects)


class PromptSplit:
    """The prompts of one split, sampled half single-object and half two-object scenes."""

    def __init__(self, name: str):
        if name not in SPLITS:
            raise ValueError(f"unknown prompt split {name!r}; allowed: {', '.join(SPLITS)}")
        want_held_out = name == "held-out"
        self.name = name
        self.single = [s for s in all_single_scenes() if is_held_out(s) == want_held_out]
        self.pair = [s for s in all_pair_scenes() if is_held_out(s) == want_held_out]

    def __len__(self) -> int:
        return len(self.single) + len(self.pair)

    def sample(self, n: int, seed: int) -> list[Scene]:
        """n scenes, alternating single and pair so that both kinds are equally represented."""
        rng = random.Random(seed)
        return [rng.choice(self.single if i % 2 == 0 else self.pair) for i in range(n)]


def prompts_of(scenes: Sequence[Scene]) -> list[str]:
    return [scene_to_prompt(s) for s in scenes]


@lru_cache(maxsize=1)
def _parse_table() -> dict[str, Scene]:
    scenes: list[Scene] = [*all_single_scenes(), *all_pair_scenes()]
    return {scene_to_prompt(s): s for s in scenes}
