"""Where the shipped toy-world weights live and how each is loaded, with errors that say what to do.

Every component is a directory holding a config JSON and safetensors, saved and loaded with the
`save_pretrained` / `from_pretrained` of its library (diffusers, transformers), so nothing here
unpickles anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

WEIGHTS_DIR = Path(__file__).parent / "weights"
COMPONENTS = ("text_encoder", "teacher", "align", "judge")
# The component each build target trains; the teacher target also trains the text encoder.
BUILD_TARGET = {"text_encoder": "teacher", "teacher": "teacher", "align": "align", "judge": "judge"}

# The guidance scale the main job and the docs sample the shipped teacher with (chosen by the CFG sweep in
# docs/results/README.md). Here, not in teacher.py, so a command's --help can show it without loading torch.
DEFAULT_CFG = 4.0

T = TypeVar("T")


class ToyWeightsError(RuntimeError):
    """A toy-world weights directory is missing or unreadable."""


def component_dir(component: str, root: str | Path | None = None) -> Path:
    if component not in COMPONENTS:
        raise ValueError(f"unknown toy component {component!r}; allowed: {', '.join(COMPONENTS)}")
    return Path(root or WEIGHTS_DIR) / component


def load_component(component: str, loader: Callable[[Path], T], root: str | Path | None = None,
                   field: str = "model.path") -> T:
    """`field`: where the user gave `root`, which the error names."""
    directory = component_dir(component, root)
    rebuild = f"rebuild it with `python -m dmdr_rl.toy.build {BUILD_TARGET[component]}`"
    if root is not None and Path(root).resolve() != WEIGHTS_DIR.resolve():  # a user's directory
        rebuild = (f"check the directory ({field}; unset: the shipped weights), or write it with "
                   f"`python -m dmdr_rl.toy.build {BUILD_TARGET[component]} --out {root}`")
    if not directory.is_dir() or not any(directory.glob("*.safetensors")):
        raise ToyWeightsError(f"toy {component} weights not found in {directory}; {rebuild}")
    try:
        return loader(directory)
    except Exception as err:  # a truncated or foreign file surfaces as many library error types
        raise ToyWeightsError(
            f"toy {component} weights in {directory} could not be loaded ({type(err).__name__}: {err}); "
            f"the files may be corrupt: {rebuild}"
        ) from err


def load_text_encoder(root: str | Path | None = None, field: str = "model.path"):
    from .text import ToyTextEncoder

    return load_component("text_encoder", ToyTextEncoder.from_pretrained, root, field).eval().requires_grad_(False)


def load_teacher_transformer(root: str | Path | None = None, field: str = "model.path"):
    from diffusers import SD3Transformer2DModel

    return load_component("teacher", SD3Transformer2DModel.from_pretrained, root, field).eval().requires_grad_(False)


def load_teacher(root: str | Path | None = None, encoders: bool = True, field: str = "model.path"):
    """The frozen toy teacher as a `ToyBackbone` (transformer + text encoder; `encoders=False` leaves
    the text encoder out, as a learner needs)."""
    from .teacher import ToyBackbone

    return ToyBackbone(load_teacher_transformer(root, field), load_text_encoder(root, field) if encoders else None)


def load_align(root: str | Path | None = None, field: str = "rewards[].kwargs.path"):
    """The `toy-align` reward model (differentiable with respect to the image)."""
    from .classifier import AlignReward, AttributeClassifier

    return AlignReward(load_component("align", AttributeClassifier.from_pretrained, root, field).eval().requires_grad_(False))


def load_judge(root: str | Path | None = None, field: str = "--weights"):
    """The held-out judge: evaluation only, never a training reward."""
    from .classifier import AttributeClassifier

    return load_component("judge", AttributeClassifier.from_pretrained, root, field).eval().requires_grad_(False)
