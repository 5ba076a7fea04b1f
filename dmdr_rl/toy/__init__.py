"""The embedded toy text-to-image world: scenes, prompts, renderer, text encoder, teacher,
the `toy-align` reward and the held-out judge, with their shipped weights."""

from .grammar import PromptSplit, prompt_to_scene, prompts_of, scene_to_prompt
from .render import render, render_batch
from .scene import PairScene, SingleScene, ToyObject
from .weights import ToyWeightsError, load_align, load_judge, load_teacher, load_text_encoder

__all__ = [
    "PairScene", "PromptSplit", "SingleScene", "ToyObject", "ToyWeightsError",
    "load_align", "load_judge", "load_teacher", "load_text_encoder",
    "prompt_to_scene", "prompts_of", "render", "render_batch", "scene_to_prompt",
]
