"""Sanity checks of the shipped evaluators on fresh renders (the numbers the toy world rests on).

    python -m dmdr_rl.toy.check --num-images 2000

Prints and returns: the judge's accuracy on fresh renders of each split, and how often `toy-align`
scores an image's true prompt above a mismatched one (random, and one attribute changed), and the
FID between two independent sets of renders (the floor for any sampler's FID at this sample size).
"""

from __future__ import annotations

import argparse
import json

import torch

from ..evaluation import REFERENCE_SEED_OFFSET, fresh_renders
from .grammar import SPLITS, PromptSplit
from .metrics import judge_fid, judge_verdicts, reward_discrimination, summarise_verdicts
from .weights import load_align, load_judge

CHECK_SEED_OFFSET = 2 * REFERENCE_SEED_OFFSET  # renders no build and no evaluation used


def render_fid_floor(judge, scenes, seed: int, images=None) -> float:
    """The floor any sampler's FID is measured against: two independent render sets of the same prompts
    (it grows as the sample shrinks: FID is biased upwards at small sample sizes)."""
    images = images if images is not None else fresh_renders(scenes, seed, offset=CHECK_SEED_OFFSET)
    return judge_fid(judge, images, fresh_renders(scenes, seed))


def check_evaluators(num_images: int = 2000, seed: int = 0, judge=None, align=None) -> dict:
    judge = judge or load_judge()
    align = align or load_align()
    report: dict = {"num_images_per_split": num_images}
    for split in SPLITS:
        scenes = PromptSplit(split).sample(num_images, seed)
        images = fresh_renders(scenes, seed, offset=CHECK_SEED_OFFSET)
        with torch.no_grad():
            accuracy, by_category = summarise_verdicts(judge_verdicts(judge, images, scenes))
        report[split] = {
            "judge_accuracy": accuracy,
            "judge_accuracy_by_category": by_category,
            "align_true_over_random_mismatch": reward_discrimination(align, images, scenes, seed, hard=False),
            "align_true_over_one_attribute_changed": reward_discrimination(align, images, scenes, seed, hard=True),
            "fid_renders_vs_renders": render_fid_floor(judge, scenes, seed, images),
        }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dmdr_rl.toy.check", description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(check_evaluators(args.num_images, args.seed), indent=2))


if __name__ == "__main__":
    main()
