"""Evaluate any text-to-image sampler on a toy prompt split: judge accuracy, FID against fresh
renders of the same prompts, reward means, and a sample grid. The teacher and (later) every
student are evaluated by this one function, so their numbers are comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .algo import finite_mean
from .conditioning import Conditioning
from .grid import save_grid
from .seeds import image_seeds
from .toy.analytic import analytic_accuracy
from .toy.grammar import PromptSplit, prompts_of
from .toy.metrics import judge_feature_statistics, judge_verdicts, summarise_verdicts
from .toy.render import render_batch
from .tracking import evaluation_scalars

# sample_fn(prompts, seeds) -> images [B, 3, H, W] in [0, 1], image i from seeds[i] alone
SampleFn = Callable[[Sequence[str], Sequence[int]], torch.Tensor]
# Fresh renders for FID use seeds far from any build's, so they are never training images.
REFERENCE_SEED_OFFSET = 10**12


def fresh_renders(scenes: Sequence, seed: int, offset: int = REFERENCE_SEED_OFFSET) -> torch.Tensor:
    """Renders of `scenes` from seeds no build used: the FID reference set (or, with another offset, a check set)."""
    return render_batch(scenes, [offset + seed * len(scenes) + i for i in range(len(scenes))])


def generate(sample_fn: SampleFn, prompts: Sequence[str], seeds: Sequence[int], batch_size: int,
             desc: str = "sampling") -> tuple[torch.Tensor, int]:
    """The images of `prompts` in [0, 1] on the CPU, and how many had a pixel that is not finite (a diverged
    sampler): such pixels are 0 (NaN would pass clamp and break FID's matrix square root)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per image")
    chunks, nonfinite = [], 0
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        chunk = slice(start, start + batch_size)
        # on the CPU, beside the judge and the fresh renders, whatever device sampled them
        images = sample_fn(prompts[chunk], seeds[chunk]).cpu()
        finite = torch.isfinite(images)
        nonfinite += int((~finite).flatten(1).any(dim=1).sum())
        chunks.append(torch.where(finite, images, torch.zeros_like(images)).clamp(0, 1))
    return torch.cat(chunks), nonfinite


def score_images(rewards: Mapping[str, object], images: torch.Tensor, prompts: Sequence[str],
                 batch_size: int) -> dict[str, torch.Tensor]:
    """Each reward model's scores of the images (by the name given), `batch_size` images a call, no gradient."""
    with torch.no_grad():
        return {name: torch.cat([reward.score(images[s : s + batch_size], list(prompts[s : s + batch_size]))
                                 for s in range(0, len(prompts), batch_size)])
                for name, reward in rewards.items()}


def score_statistics(scores: torch.Tensor) -> dict[str, float | int]:
    """Mean and its standard error over the finite scores, as training counts them (one failed score does
    not void the mean), and how many were not finite."""
    finite = scores[torch.isfinite(scores)].double()
    n = finite.numel()
    return {"mean": float(finite_mean(scores)),
            "stderr": float(finite.std() / n ** 0.5) if n > 1 else float("nan"),
            "non_finite": int(scores.numel() - n)}


def evaluate(
    sample_fn: SampleFn,
    split: str,
    num_images: int,
    seed: int,
    judge,
    rewards: Sequence = (),
    batch_size: int = 250,
    grid_path: str | Path | None = None,
    grid_size: int = 32,
    desc: str = "sampling",
    samples_path: str | Path | None = None,
) -> dict:
    """The report of the toy evaluation (without the sampler's own settings, which callers add);
    `samples_path`: also every evaluated image as Parquet, with reward scores and the judge's verdict."""
    if num_images < 2:
        raise ValueError(f"num_images must be >= 2 for FID, got {num_images}")
    scenes = PromptSplit(split).sample(num_images, seed)
    prompts = prompts_of(scenes)
    seeds = image_seeds(seed, num_images)
    images, nonfinite_images = generate(sample_fn, prompts, seeds, batch_size, desc)
    reference = fresh_renders(scenes, seed)
    with torch.no_grad():
        verdicts = [v for s in range(0, num_images, batch_size)
                    for v in judge_verdicts(judge, images[s : s + batch_size], scenes[s : s + batch_size])]
    reward_scores = score_images({r.name: r for r in rewards}, images, prompts, batch_size)
    statistics = {name: score_statistics(scores) for name, scores in reward_scores.items()}
    reward_means = {name: s["mean"] for name, s in statistics.items()}
    nonfinite = {name: s["non_finite"] for name, s in statistics.items()}
    accuracy, by_category = summarise_verdicts(verdicts)
    analytic, by_attribute = analytic_accuracy(images, scenes)
    features = judge_feature_statistics(judge, images, reference)
    report = {
        "judge_accuracy": accuracy,
        "judge_accuracy_by_category": by_category,
        # read off the pixels, no weights (shapes, colours, positions, sizes, layout); see toy/analytic.py
        "analytic_accuracy": analytic,
        "analytic_accuracy_by_attribute": by_attribute,
        "fid": features["fid"],
        "fid_reference": "fresh renders of the same prompts (judge penultimate features)",
        # tr Cov of the judge features, generated over reference: 1 as varied as the renders, near 0 collapsed
        "diversity": features["diversity"],
        # FID falls with the image count (renders against renders: about 25 at 1000 images, 326 at 64), so
        # FIDs compare only at equal counts
        **({"fid_note": f"FID at {num_images} images is not comparable with the README's (1000 images)"}
           if num_images != 1000 else {}),
        "rewards": reward_means,
        **({"rewards_nonfinite": nonfinite} if any(nonfinite.values()) else {}),
        # images with a non-finite pixel (a diverged sampler), scored with those pixels at 0
        **({"nonfinite_images": nonfinite_images} if nonfinite_images else {}),
        "num_images": num_images,
        "split": split,
        "seed": seed,
    }
    if samples_path is not None:
        from .samples import write_samples

        write_samples(samples_path, images, prompts, seeds, step=-1, weight_version=-1, rewards=reward_scores,
                      extra={"judge_correct": [bool(v["correct"]) for v in verdicts]}, source="evaluation")
        report["samples"] = str(samples_path)
    if grid_path is not None:
        n = min(grid_size, num_images)
        marks = ["" if v["correct"] else "[x] " for v in verdicts[:n]]
        save_grid(images[:n], [m + p for m, p in zip(marks, prompts[:n])], grid_path)
        report["grid"] = str(grid_path)
    return report


class TrainingEvaluation:
    """The student evaluated during training (output.eval_every): the same held-in prompts and seeds each
    time, so that its curves show the weights changing and nothing else. Their conditioning is encoded once,
    by `encode` (the backbone's own, or a rollout worker's for a Ray learner, which has no text encoders)."""

    SPLIT, SEED = "held-in", 0

    def __init__(self, num_images: int, encode: Callable[[list[str]], Conditioning]):
        from .toy.weights import load_align, load_judge

        self.num_images = num_images
        self.judge, self.align = load_judge(), load_align()
        distinct = list(dict.fromkeys(prompts_of(PromptSplit(self.SPLIT).sample(num_images, self.SEED))))
        self.row = {prompt: i for i, prompt in enumerate(distinct)}
        self.cond = encode(distinct)

    def __call__(self, sample_conditioned: Callable[[Conditioning, Sequence[int]], torch.Tensor], step: int) -> dict:
        """The val/... metrics of the student `sample_conditioned(cond, seeds)` samples (images in [0, 1])."""
        def sample_fn(prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
            return sample_conditioned(Conditioning.cat([self.cond[self.row[p] : self.row[p] + 1] for p in prompts]), seeds)

        report = evaluate(sample_fn, self.SPLIT, self.num_images, self.SEED, self.judge, [self.align],
                          desc=f"evaluating the student at step {step}")
        return {key: value for key, value in evaluation_scalars(report, prefix="val").items() if key != "val/num_images"}
