"""Toy-world metrics: judge accuracy (overall and per category), FID in the judge's feature space,
and reward means. All take images [B, 3, 32, 32] in [0, 1] and the scenes their prompts describe.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import defaultdict
from typing import Sequence

import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from .classifier import HEADS, AttributeClassifier, JudgeFeatures
from .grammar import all_pair_scenes, all_single_scenes, prompts_of
from .scene import COLOUR_NAMES, POSITION_NAMES, RELATIONS, SHAPES, SIZES, PairScene, Scene, SingleScene, ToyObject


def judge_verdicts(judge: AttributeClassifier, images: torch.Tensor, scenes: Sequence[Scene]) -> list[dict[str, bool]]:
    """Per image: which categories the judge finds right. Key "correct" is the GenEval-style verdict
    (every attribute of the prompt right, including the object count)."""
    if images.shape[0] != len(scenes):
        raise ValueError(f"got {images.shape[0]} images for {len(scenes)} scenes")
    predicted = {head: idx.tolist() for head, idx in judge.predict(images).items()}
    verdicts = []
    for i, scene in enumerate(scenes):
        pred = {head: HEADS[head][predicted[head][i]] for head in HEADS}
        verdicts.append(_single_verdict(scene, pred) if isinstance(scene, SingleScene) else _pair_verdict(scene, pred))
    return verdicts


def _single_verdict(scene: SingleScene, pred: dict[str, str]) -> dict[str, bool]:
    v = {
        "single/count": pred["count"] == "one",
        "single/shape": pred["shape"] == scene.obj.shape,
        "single/colour": pred["colour"] == scene.obj.colour,
        "single/size": pred["size"] == scene.size,
        "single/position": pred["position"] == scene.position,
    }
    v["correct"] = all(v.values())
    return v


def _pair_verdict(scene: PairScene, pred: dict[str, str]) -> dict[str, bool]:
    first = ToyObject(pred["first_shape"], pred["first_colour"])
    second = ToyObject(pred["second_shape"], pred["second_colour"])
    wanted = scene.canonical
    v = {
        "pair/count": pred["count"] == "two",
        "pair/both_present": sorted([first.shape, second.shape]) == sorted(o.shape for o in wanted),
        "pair/colour_binding": _sorted_objects([first, second]) == _sorted_objects(list(wanted)),
        "pair/relation": pred["layout"] == scene.layout and (first, second) == wanted,
    }
    v["correct"] = v["pair/count"] and v["pair/relation"]
    return v


def _depicted(scene: Scene):
    """What an image of `scene` shows: "a left of b" and "b right of a" are one image."""
    return (scene.layout, scene.canonical) if isinstance(scene, PairScene) else scene


def _sorted_objects(objects: list[ToyObject]) -> list[tuple[str, str]]:
    return sorted((o.shape, o.colour) for o in objects)


def summarise_verdicts(verdicts: Sequence[dict[str, bool]]) -> tuple[float, dict[str, float]]:
    """(overall accuracy, accuracy per category) over a list of per-image verdicts."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for verdict in verdicts:
        for key, ok in verdict.items():
            totals[key][0] += int(ok)
            totals[key][1] += 1
    by_category = {k: right / n for k, (right, n) in sorted(totals.items()) if k != "correct"}
    return totals["correct"][0] / max(1, totals["correct"][1]), by_category


@torch.no_grad()
def judge_fid(judge: AttributeClassifier, generated: torch.Tensor, reference: torch.Tensor, batch_size: int = 500) -> float:
    """Frechet distance between judge penultimate features of generated images and fresh renders."""
    return judge_feature_statistics(judge, generated, reference, batch_size)["fid"]


@torch.no_grad()
def judge_feature_statistics(judge: AttributeClassifier, generated: torch.Tensor, reference: torch.Tensor,
                             batch_size: int = 500) -> dict[str, float]:
    """From one pass of the judge's penultimate features over both sets: `fid`, the Frechet distance, and
    `diversity`, the total variance of the generated images' features over that of the renders (tr Cov_gen /
    tr Cov_ref): 1 is as varied as the renders of the same prompts, near 0 a collapse onto a few images
    (what a reward hacked by one pattern gives), whatever the prompts asked for."""
    fid = FrechetInceptionDistance(feature=JudgeFeatures(judge), normalize=True, input_img_size=tuple(reference.shape[1:]))
    for start in range(0, reference.shape[0], batch_size):
        fid.update(reference[start : start + batch_size], real=True)
    for start in range(0, generated.shape[0], batch_size):
        fid.update(generated[start : start + batch_size], real=False)
    sums = (fid.real_features_sum, fid.real_features_cov_sum, fid.fake_features_sum, fid.fake_features_cov_sum)
    if not all(torch.isfinite(total).all() for total in sums):  # (a judge whose features are not finite: the matrix
        return {"fid": math.nan, "diversity": math.nan}  # square root of a NaN covariance crashes the process in
        # LAPACK; NaN is not a perfect 0 either)
    reference_variance = _total_variance(fid.real_features_sum, fid.real_features_cov_sum, fid.real_features_num_samples)
    spread = (_total_variance(fid.fake_features_sum, fid.fake_features_cov_sum, fid.fake_features_num_samples)
              / reference_variance if reference_variance > 0 else math.nan)  # (renders the judge cannot tell apart,
    # or fewer than 2)
    # rounding can dip the distance below 0 when the sets (nearly) coincide
    return {"fid": max(0.0, float(fid.compute())), "diversity": spread}


def _total_variance(features_sum: torch.Tensor, products_sum: torch.Tensor, count: torch.Tensor) -> float:
    """tr Cov of features from their running sums (sum x, sum x x^T, n), in float64; NaN below 2 samples. The
    sums cancel to rounding (about 1e-13 of the features' mean square) for identical features: below 1e-9 of
    it, the variance is 0."""
    n = float(count)
    if n < 2:
        return math.nan
    mean = features_sum / n
    variance = float((products_sum.diagonal() - n * mean**2).sum() / (n - 1))
    return variance if variance > 1e-9 * float(products_sum.diagonal().sum() / n) else 0.0


def mismatch(scene: Scene, rng, hard: bool) -> Scene:
    """Another scene for the same image: any other scene of the same kind, or (hard) one with
    exactly one attribute changed (for pairs: one object's shape or colour, or the relation)."""
    if not hard:
        pool = all_single_scenes() if isinstance(scene, SingleScene) else all_pair_scenes()
        while _depicted(other := rng.choice(pool)) == _depicted(scene):  # not the mirrored wording of the same image
            pass
        return other

    def other_than(value, values):
        return rng.choice([v for v in values if v != value])

    if isinstance(scene, SingleScene):
        field = rng.choice(["shape", "colour", "size", "position"])
        if field == "shape":
            return dataclasses.replace(scene, obj=ToyObject(other_than(scene.obj.shape, SHAPES), scene.obj.colour))
        if field == "colour":
            return dataclasses.replace(scene, obj=ToyObject(scene.obj.shape, other_than(scene.obj.colour, COLOUR_NAMES)))
        if field == "size":
            return dataclasses.replace(scene, size=other_than(scene.size, SIZES))
        return dataclasses.replace(scene, position=other_than(scene.position, POSITION_NAMES))
    while True:
        field = rng.choice(["first", "second", "relation"])
        if field == "relation":
            # "right of" with the same objects would describe the mirrored image: a real mismatch.
            candidate = dataclasses.replace(scene, relation=other_than(scene.relation, RELATIONS))
        else:
            obj = getattr(scene, field)
            changed = (ToyObject(other_than(obj.shape, SHAPES), obj.colour) if rng.random() < 0.5
                       else ToyObject(obj.shape, other_than(obj.colour, COLOUR_NAMES)))
            candidate = dataclasses.replace(scene, **{field: changed})
        if candidate.first != candidate.second:
            return candidate


@torch.no_grad()
def reward_discrimination(reward, images: torch.Tensor, scenes: Sequence[Scene], seed: int, hard: bool) -> float:
    """How often the reward scores an image's own prompt above a mismatched prompt."""
    rng = random.Random(seed)
    wrong = [mismatch(s, rng, hard) for s in scenes]
    true_scores = reward.score(images, prompts_of(scenes))
    wrong_scores = reward.score(images, prompts_of(wrong))
    return float((true_scores > wrong_scores).float().mean())
