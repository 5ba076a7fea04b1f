"""Reward gradients that cross process boundaries (ReFL through a reward server).

A server computes `r_i` and `d r_i / d image_i` for every image of a batch; the learner glues them onto
its own autograd graph with `attach_gradient`, so that back-propagating any loss of the scores
(hinge or linear shaping, weights, sums over the finite samples) yields
`sum_i dL/dr_i * d r_i / d image_i` -- exactly the gradient the learner would get with the reward
model in its own process. It requires the model to score each image independently of the others in
its batch (eval-mode normalisation), which every reward model here does.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .protocol import RewardInputError, RewardModel, RewardOutputError, validate_scores


def wants_gradient(images: torch.Tensor, differentiable: bool, what: str) -> bool:
    """Whether a caller asks for the ReFL gradient (images that carry one, grad mode on). A reward without
    one is refused, in either placement, rather than scored as a constant the generator silently ignores."""
    if not (images.requires_grad and torch.is_grad_enabled()):
        return False
    if not differentiable:
        raise RewardInputError(f"{what} is not differentiable, so it cannot give a ReFL gradient; score detached images")
    return True


def usable(finite: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """The samples a reward term can use: a finite score (`finite`) and a finite d score / d image."""
    return finite & torch.isfinite(grads).flatten(1).all(dim=1)


def zero_unusable(grads: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """`grads` [B, ...] with the rows of unusable samples set to 0, so that one cannot poison the others."""
    return torch.where(usable(finite, grads).view(-1, *[1] * (grads.dim() - 1)), grads, torch.zeros_like(grads))


def drop_unusable(scores: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and gradients with an unusable sample's score NaN (dropped from the reward term and counted)
    and its gradient 0."""
    finite = torch.isfinite(scores)
    return (torch.where(usable(finite, grads), scores, torch.full_like(scores, float("nan"))),
            zero_unusable(grads, finite))


def score_and_grad(model: RewardModel, images: torch.Tensor, prompts: Sequence[str],
                   max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [B] and d score_i / d image_i [B, 3, H, W], one backward pass per `max_images` images (the
    memory of a gradient through a large reward model grows with the images of one pass; every image is
    scored on its own, so chunks give the same numbers). A sample whose score or gradient is not finite
    gets a NaN score (the reward term drops and counts it) and a zero gradient, so it cannot poison the
    others."""
    def one_pass(chunk: torch.Tensor, chunk_prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = chunk.detach().requires_grad_(True)
        with torch.enable_grad():
            scores = checked_scores(model, pixels, chunk_prompts).to(pixels.device)  # a model may answer on its own device
            if not scores.requires_grad:
                raise RewardOutputError(
                    f"reward model {model.name!r} says it is differentiable, but its scores carry no gradient (computed "
                    "outside torch's autograd, e.g. through PIL or numpy, or detached): keep the computation in torch "
                    "ops, or set its `differentiable = False` (then it monitors with weight 0, or trains with rl.mode=grpo)")
            finite = torch.isfinite(scores)
            (grads,) = torch.autograd.grad(torch.where(finite, scores, torch.zeros_like(scores)).sum(), pixels,
                                           allow_unused=True)
        grads = torch.zeros_like(pixels) if grads is None else grads  # the score does not depend on the pixels
        return drop_unusable(scores.detach(), grads)

    return in_chunks(one_pass, images, prompts, max_images)


def checked_scores(model: RewardModel, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """The model's scores of `images`, checked to be one float per image."""
    return validate_scores(model.score(images, list(prompts)), images.shape[0], f"reward model {model.name!r}")


def in_chunks(score_fn: Callable[..., Any], images: torch.Tensor, prompts: Sequence[str], max_images: int | None):
    """`score_fn(images, prompts)` (a tensor or a tuple of tensors along the batch) called on at most
    `max_images` images at a time, its answers concatenated."""
    if not max_images or images.shape[0] <= max_images:
        return score_fn(images, list(prompts))
    parts = [score_fn(images[i : i + max_images], list(prompts[i : i + max_images]))
             for i in range(0, images.shape[0], max_images)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(column) for column in zip(*parts))
    return torch.cat(parts)


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
