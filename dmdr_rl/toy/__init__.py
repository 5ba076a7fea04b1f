"""The embedded toy text-to-image world: scenes, prompts, renderer, text encoder, teacher,
the `toy-align` reward and the held-out judge, with their shipped weights.

The names below load with their module on first use: the prompt grammar needs no torch, and the rollout
coordinator, which only draws prompt batches, should not load it. (The renderer's `render` is not among
them: the name is its module's, `from dmdr_rl.toy.render import render`.)"""

from importlib import import_module

_MODULE_OF = {
    "PromptSplit": "grammar", "prompt_to_scene": "grammar", "prompts_of": "grammar", "scene_to_prompt": "grammar",
    "render_batch": "render",
    "PairScene": "scene", "SingleScene": "scene", "ToyObject": "scene",
    "ToyWeightsError": "weights", "load_align": "weights", "load_judge": "weights", "load_teacher": "weights",
    "load_text_encoder": "weights",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
