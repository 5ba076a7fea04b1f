"""In-process placement: the reward model runs in the caller's process, behind the same input and
output checks as a served one, so switching `placement` never changes what is accepted. The reward
gradient takes the served path's route too (`score_and_grad`, then `attach_gradient`): a sample whose
score is not finite gets a zero gradient, instead of the 0 * inf = NaN that back-propagating a masked
score through the model would give."""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from .gradient import attach_gradient, checked_scores, in_chunks, score_and_grad, wants_gradient
from .protocol import RewardInputError, RewardModel, RewardScoreError, RewardServerError, first_line, validate_images


class InProcessReward:
    def __init__(self, model: RewardModel, max_images_per_call: int | None = None):
        self.model, self.max_images = model, max_images_per_call
        self.name, self.differentiable = model.name, model.differentiable

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        validate_images(images, prompts)
        try:
            if wants_gradient(images, self.differentiable, f"reward {self.name!r}"):
                return attach_gradient(images, *score_and_grad(self.model, images, list(prompts), self.max_images))
            return in_chunks(partial(checked_scores, self.model), images, prompts, self.max_images)
        except (RewardInputError, RewardServerError, torch.OutOfMemoryError):  # (ours, or the device's: as they are)
            raise
        except Exception as err:  # the model's own: named, as a served model's failure is by its app
            raise RewardScoreError(f"reward model {self.name!r} raised while scoring {images.shape[0]} images: "
                                   f"{type(err).__name__}: {first_line(err)} (the traceback above is the model's own)"
                                   ) from err
