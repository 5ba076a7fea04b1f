"""In-process placement: the reward model runs in the caller's process, behind the same input and
output checks as a served one, so switching `placement` never changes what is accepted."""

from __future__ import annotations

from typing import Sequence

import torch

from .protocol import RewardModel, validate_images, validate_scores


class InProcessReward:
    def __init__(self, model: RewardModel):
        self.model = model
        self.name, self.differentiable = model.name, model.differentiable

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        validate_images(images, prompts)
        return validate_scores(self.model.score(images, list(prompts)), images.shape[0], f"reward model {self.name!r}")
