"""Attribute classifiers over toy scenes: the `toy-align` reward and the held-out judge.

Both predict the same heads (object count; shape, colour, size and position of a single object;
layout and the canonical first/second object of a pair) but differ in architecture, seed and
augmentation, so that a generator that games one of them does not fool the other. The judge's
penultimate features are the FID feature space.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .grammar import prompt_to_scene
from .scene import COLOUR_NAMES, LAYOUTS, POSITION_NAMES, SHAPES, SIZES, Scene, SingleScene

HEADS: dict[str, tuple[str, ...]] = {
    "count": ("one", "two"),
    "shape": SHAPES,
    "colour": COLOUR_NAMES,
    "size": SIZES,
    "position": POSITION_NAMES,
    "layout": LAYOUTS,
    "first_shape": SHAPES,
    "first_colour": COLOUR_NAMES,
    "second_shape": SHAPES,
    "second_colour": COLOUR_NAMES,
}
SINGLE_HEADS = ("count", "shape", "colour", "size", "position")
PAIR_HEADS = ("count", "layout", "first_shape", "first_colour", "second_shape", "second_colour")
IGNORE = -100


def scene_labels(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Class index per head and scene; IGNORE where a head does not apply to the scene's kind."""
    labels = {head: [IGNORE] * len(scenes) for head in HEADS}
    for i, scene in enumerate(scenes):
        for head, value in _scene_values(scene).items():
            labels[head][i] = HEADS[head].index(value)
    return {head: torch.tensor(values, dtype=torch.long) for head, values in labels.items()}


def _scene_values(scene: Scene) -> dict[str, str]:
    if isinstance(scene, SingleScene):
        return {"count": "one", "shape": scene.obj.shape, "colour": scene.obj.colour, "size": scene.size, "position": scene.position}
    first, second = scene.canonical
    return {
        "count": "two",
        "layout": scene.layout,
        "first_shape": first.shape,
        "first_colour": first.colour,
        "second_shape": second.shape,
        "second_colour": second.colour,
    }


class AttributeClassifier(ModelMixin, ConfigMixin):
    """images [B, 3, 32, 32] in [0, 1] -> logits per head; `features` gives the penultimate layer."""

    @register_to_config
    def __init__(self, arch: str = "judge", feature_dim: int = 128):
        super().__init__()
        builders = {"judge": _judge_trunk, "align": _align_trunk}
        if arch not in builders:
            raise ValueError(f"unknown classifier arch {arch!r}; allowed: {', '.join(builders)}")
        self.trunk = builders[arch](feature_dim)
        self.head = nn.Linear(feature_dim, sum(len(v) for v in HEADS.values()))
        self.num_features = feature_dim  # read by torchmetrics' FID for a custom feature module

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images * 2.0 - 1.0)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.features(images))
        return dict(zip(HEADS, logits.split([len(v) for v in HEADS.values()], dim=1)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {head: logits.argmax(dim=1) for head, logits in self(images).items()}


class JudgeFeatures(nn.Module):
    """The judge's penultimate layer as a torchmetrics feature extractor (float images in [0, 1])."""

    def __init__(self, judge: AttributeClassifier):
        super().__init__()
        self.judge = judge
        self.num_features = judge.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.features(images.float())


def _residual(channels_in: int, channels_out: int, stride: int) -> nn.Module:
    return _ResidualBlock(channels_in, channels_out, stride)


class _ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.skip = nn.Identity() if (cin == cout and stride == 1) else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


def _judge_trunk(feature_dim: int) -> nn.Module:
    """A small ResNet with batch norm; flattening the 4x4 map keeps where things are."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        _residual(32, 48, 2), _residual(48, 96, 2), _residual(96, 96, 2),
        nn.Flatten(), nn.Linear(96 * 4 * 4, feature_dim), nn.ReLU(),
    )


def _align_trunk(feature_dim: int) -> nn.Module:
    """A plain conv net with GELU and group norm: another inductive bias than the judge's."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 5, 1, 2), nn.GroupNorm(4, 32), nn.GELU(),
        nn.Conv2d(32, 48, 4, 2, 1), nn.GroupNorm(4, 48), nn.GELU(),
        nn.Conv2d(48, 64, 4, 2, 1), nn.GroupNorm(4, 64), nn.GELU(),
        nn.Flatten(), nn.Linear(64 * 8 * 8, feature_dim), nn.GELU(),
    )


def attribute_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Sum of per-head cross-entropies (only where a head applies) and the all-heads-right accuracy."""
    loss = torch.zeros(())
    all_right = torch.ones(next(iter(labels.values())).shape[0], dtype=torch.bool)
    for head, target in labels.items():
        applies = target != IGNORE
        if applies.any():
            loss = loss + F.cross_entropy(logits[head][applies], target[applies])
        all_right &= (logits[head].argmax(1) == target) | ~applies
    return loss, all_right.float().mean().item()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Nuisance changes that keep every attribute: pixel noise, blur, contrast, 1-pixel shifts."""
    b = images.shape[0]
    noise_std = torch.rand(b, 1, 1, 1, generator=generator) * 0.08
    images = images + noise_std * torch.randn(images.shape, generator=generator)
    blur = torch.rand(b, generator=generator) < 0.3
    if blur.any():
        kernel = torch.tensor([0.25, 0.5, 0.25])
        kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
        images[blur] = F.conv2d(F.pad(images[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    contrast = 0.85 + 0.3 * torch.rand(b, 1, 1, 1, generator=generator)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * contrast + mean
    shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
    images = torch.roll(images, shifts=shift, dims=(2, 3))
    return images.clamp(0.0, 1.0)


class AlignReward(nn.Module):
    """`toy-align`: how well an image matches its prompt, as the mean log-probability the align
    classifier gives the prompt's attributes (0 is a perfect match). Differentiable in the image."""

    name = "toy-align"
    differentiable = True

    def __init__(self, classifier: AttributeClassifier):
        super().__init__()
        self.classifier = classifier

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from reward_servers.protocol import RewardInputError
        from .render import RESOLUTION

        if images.shape[0] != len(prompts):
            raise RewardInputError(f"score() got {images.shape[0]} images but {len(prompts)} prompts")
        if tuple(images.shape[-2:]) != (RESOLUTION, RESOLUTION):
            raise RewardInputError(f"toy-align scores the toy world's {RESOLUTION}x{RESOLUTION} images, got "
                                   f"{images.shape[-2]}x{images.shape[-1]}")
        try:  # a prompt it cannot read is the caller's mistake (a 422 over HTTP), not the model failing
            scenes = [prompt_to_scene(p) for p in prompts]
        except ValueError as err:
            raise RewardInputError(str(err)) from None
        labels = scene_labels(scenes)
        device = next(self.classifier.parameters()).device
        logits = self.classifier(images.to(device))
        total = torch.zeros(images.shape[0], device=device)
        count = torch.zeros(images.shape[0], device=device)
        for head, target in labels.items():
            applies = (target != IGNORE).to(device)
            log_probs = F.log_softmax(logits[head], dim=1)
            picked = log_probs.gather(1, target.clamp(min=0).to(device)[:, None])[:, 0]
            total = total + torch.where(applies, picked, torch.zeros_like(picked))
            count = count + applies.float()
        return (total / count).to(images.device)  # the scores live where the images do

    forward = score
