"""Reward gradients that cross process boundaries (ReFL through a reward server).

A server computes `r_i` and `d r_i / d image_i` for every image of a batch; the learner glues them onto
its own autograd graph with `attach_gradient`, so that back-propagating any loss of the scores
(hinge or linear shaping, weights, means over finite samples) yields
`sum_i dL/dr_i * d r_i / d image_i` -- exactly the gradient the learner would get with the reward
model in its own process. It requires the model to score each image independently of the others in
its batch (eval-mode normalisation), which every reward model here does.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .protocol import RewardModel, validate_scores


def score_and_grad(model: RewardModel, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [B] and d score_i / d image_i [B, 3, H, W] in one backward pass. A sample whose score is
    not finite gets a zero gradient, so it cannot poison the others."""
    pixels = images.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = validate_scores(model.score(pixels, prompts), images.shape[0], f"reward model {model.name!r}")
        scores = scores.to(pixels.device)  # a model may answer on its own device
        finite = torch.isfinite(scores)
        if not scores.requires_grad:  # the score does not depend on the pixels at all
            grads = None
        else:
            (grads,) = torch.autograd.grad(torch.where(finite, scores, torch.zeros_like(scores)).sum(), pixels,
                                           allow_unused=True)
    if grads is None:
        grads = torch.zeros_like(pixels)
    grads = torch.where(finite.view(-1, 1, 1, 1), grads, torch.zeros_like(grads))
    return scores.detach(), torch.nan_to_num(grads, nan=0.0, posinf=0.0, neginf=0.0)


class _ExternalGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images: torch.Tensor, scores: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grads)
        return scores.clone()

    @staticmethod
    def backward(ctx, grad_scores: torch.Tensor):
        (grads,) = ctx.saved_tensors
        return grad_scores.view(-1, *([1] * (grads.dim() - 1))) * grads, None, None


def attach_gradient(images: torch.Tensor, scores: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """`scores` (computed elsewhere) as a function of `images` whose Jacobian is diag(grads)."""
    grads = grads.to(device=images.device, dtype=images.dtype)
    return _ExternalGradient.apply(images, scores.to(images.device), grads)
