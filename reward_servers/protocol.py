"""What every reward model implements (built-in or a user's own), and the checks at its boundary.

A reward model scores images `[B, 3, H, W]` (float, values in [0, 1]) against their prompts and returns
one score per image. The checks live here once: the in-process wrapper, the Serve replica, the HTTP
endpoint and the client all call them, so a bad batch fails with the same message wherever it enters.
"""

from __future__ import annotations

import math

from typing import Protocol, Sequence, runtime_checkable

import torch

VALUE_TOLERANCE = 1e-4  # decoders clamp to [0, 1]; allow a hair of rounding (e.g. PNG or bf16 round trips)


@runtime_checkable
class RewardModel(Protocol):
    name: str
    differentiable: bool  # True: `score` supports autograd with respect to the images

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


class RewardInputError(ValueError):
    """A request no reward model can score (shape, dtype, range, counts). Never retried."""


class RewardServerError(RuntimeError):
    """A reward app that stayed unreachable or answered nonsense after every retry."""


class RewardLoadError(OSError):
    """A reward model's files could not be loaded; says which config entry names them."""


class RewardModelError(RewardServerError):
    """A reward model's own failure, met again by every call: it raised in its Serve app (out of memory aside), or
    answered other than one float score per image (in process too: RewardOutputError). Not retried; a run's first
    scoring that meets it ends the run."""


class RewardOutputError(RewardModelError):
    """A model's answer that is not one float score per image: its bug, met again by every call."""


class RewardScoreError(RuntimeError):
    """A reward model's own `score` raised (not one of the checks here): names the model, with its error chained
    (a bug in the model shows in its traceback)."""


class RewardBuildError(RuntimeError):
    """A reward model's constructor raised; says which config entry it is, with the model's own error chained
    (not one of the errors a command shows as one line: the traceback is where a bug in the model shows)."""


def validate_images(images: torch.Tensor, prompts: Sequence[str]) -> None:
    """Raise RewardInputError unless images is a float [B, 3, H, W] tensor in [0, 1] with B == len(prompts)."""
    if not isinstance(images, torch.Tensor):
        raise RewardInputError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise RewardInputError(f"images must be a float tensor with values in [0, 1], got dtype {images.dtype} "
                               "(convert uint8 images with images.float() / 255)")
    if images.dim() != 4 or images.shape[1] != 3:
        raise RewardInputError(f"images must have shape [B, 3, H, W], got {list(images.shape)}")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise RewardInputError("prompts must be a sequence of strings, one per image")
    if images.shape[0] != len(prompts):
        raise RewardInputError(f"got {images.shape[0]} images but {len(prompts)} prompts; give one prompt per image")
    if images.shape[0] == 0:
        raise RewardInputError("got an empty batch (0 images)")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise RewardInputError(f"images must have a height and width of at least 1 pixel, got {list(images.shape)}")
    low, high = (float(v) for v in torch.aminmax(images.detach()))  # one pass; NaN propagates, inf shows
    if not (math.isfinite(low) and math.isfinite(high)):
        raise RewardInputError("images contain NaN or infinite values")
    if low < -VALUE_TOLERANCE or high > 1 + VALUE_TOLERANCE:
        raise RewardInputError(f"image values must lie in [0, 1], got [{low:.4g}, {high:.4g}] "
                               "(map [-1, 1] images with (x + 1) / 2)")


def validate_scores(scores: torch.Tensor, batch: int, source: str) -> torch.Tensor:
    """A model's answer must be a float tensor of shape [batch]; non-finite values are allowed (the
    reward term drops and counts them). Raises RewardOutputError (a RewardServerError) naming `source` otherwise."""
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise RewardOutputError(f"{source} returned {type(scores).__name__} "
                                f"{getattr(scores, 'dtype', '')}, expected a float tensor of {batch} scores")
    if scores.shape != (batch,):
        raise RewardOutputError(f"{source} returned scores of shape {list(scores.shape)}, expected [{batch}]")
    return scores


def first_line(err: BaseException | None) -> str:
    """An error's first line, for messages that name it without its whole traceback text."""
    return str(err).strip().splitlines()[0] if err is not None and str(err).strip() else ""
