"""Sanity checks of the shipped evaluators on fresh renders (the numbers the toy world rests on).

    python -m dmdr_rl.toy.check --num-images 2000

Prints and returns: the judge's accuracy on fresh renders of each split, and how often `toy-align`
scores an image's true prompt above a mismatched one (random, and one attribute changed), and the
FID between two independent sets of renders (the floor for any sampler's FID at this sample size).

    python -m dmdr_rl.toy.check --transfer --num-images 128

How far the judge is from independent of the reward: teacher samples are pushed, within an invisible
L-inf budget, up toy-align's gradient alone (what ReFL does to a generator's images), and the judge's
accuracy is measured before and after, beside random sign noise of the same size as the control.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from .grammar import SPLITS, PromptSplit, prompts_of
from .weights import load_align, load_judge

if TYPE_CHECKING:  # (torch and the metrics load when a check runs: --help answers at once)
    import torch


def check_renders(scenes, seed: int):
    """Fresh renders of `scenes` that no build and no evaluation used."""
    from ..evaluation import REFERENCE_SEED_OFFSET, fresh_renders

    return fresh_renders(scenes, seed, offset=2 * REFERENCE_SEED_OFFSET)


def render_fid_floor(judge, scenes, seed: int, images=None) -> float:
    """The floor any sampler's FID is measured against: two independent render sets of the same prompts
    (it grows as the sample shrinks: FID is biased upwards at small sample sizes)."""
    from ..evaluation import fresh_renders
    from .metrics import judge_fid

    images = images if images is not None else check_renders(scenes, seed)
    return judge_fid(judge, images, fresh_renders(scenes, seed))


def measured(bar, label: str, measure):
    """`measure()`, named on `bar` while it runs and counted when done (each takes seconds at 2000 images)."""
    bar.set_postfix_str(label)
    value = measure()
    bar.update()
    return value


def check_evaluators(num_images: int = 2000, seed: int = 0, judge=None, align=None) -> dict:
    import torch
    from tqdm.auto import tqdm

    from .metrics import judge_verdicts, reward_discrimination, summarise_verdicts

    judge = judge or load_judge()
    align = align or load_align()
    report: dict = {"num_images_per_split": num_images}
    with tqdm(total=4 * len(SPLITS), desc="checking evaluators", leave=False) as bar:
        for split in SPLITS:
            scenes = PromptSplit(split).sample(num_images, seed)
            images = check_renders(scenes, seed)
            with torch.no_grad():
                accuracy, by_category = measured(bar, f"{split}: judge",
                                                 lambda: summarise_verdicts(judge_verdicts(judge, images, scenes)))
            report[split] = {
                "judge_accuracy": accuracy,
                "judge_accuracy_by_category": by_category,
                "align_true_over_random_mismatch": measured(
                    bar, f"{split}: toy-align", lambda: reward_discrimination(align, images, scenes, seed, hard=False)),
                "align_true_over_one_attribute_changed": measured(
                    bar, f"{split}: toy-align", lambda: reward_discrimination(align, images, scenes, seed, hard=True)),
                "fid_renders_vs_renders": measured(
                    bar, f"{split}: FID", lambda: render_fid_floor(judge, scenes, seed, images)),
            }
    return report


def align_ascent(align, images: torch.Tensor, prompts, eps: float, steps: int = 40) -> torch.Tensor:
    """`images` moved up toy-align's gradient (signed steps of eps/8, projected to an L-inf ball of eps)."""
    import torch
    from tqdm.auto import tqdm

    x = images.clone()
    for _ in tqdm(range(steps), desc="toy-align ascent", leave=False):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(align.score(x, prompts).sum(), x)
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x + eps / 8 * grad.sign(), images - eps), images + eps).clamp(0, 1)
    return x.detach()


def judge_transfer(judge, align, images: torch.Tensor, scenes, eps: float = 4 / 255, seed: int = 0) -> dict:
    """toy-align, judge accuracy and judge-feature FID (against fresh renders) before and after
    `align_ascent`, and under random sign noise of the same size (the control): a judge independent of
    the reward gains nothing."""
    import torch

    from ..evaluation import fresh_renders
    from .analytic import analytic_accuracy
    from .metrics import judge_fid, judge_verdicts, summarise_verdicts

    prompts = prompts_of(scenes)
    pushed = align_ascent(align, images, prompts, eps)
    signs = torch.randint(0, 2, images.shape, generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    noisy = (images + eps * signs).clamp(0, 1)
    with torch.no_grad():
        def accuracy(x):
            return summarise_verdicts(judge_verdicts(judge, x, scenes))[0]

        reference = fresh_renders(scenes, seed)
        return {"eps": eps, "align_before": float(align.score(images, prompts).mean()),
                "align_after": float(align.score(pushed, prompts).mean()), "judge_before": accuracy(images),
                "judge_after": accuracy(pushed), "judge_random_signs": accuracy(noisy),
                "analytic_before": analytic_accuracy(images, scenes)[0], "analytic_after": analytic_accuracy(pushed, scenes)[0],
                "fid_before": judge_fid(judge, images, reference), "fid_after": judge_fid(judge, pushed, reference),
                "fid_random_signs": judge_fid(judge, noisy, reference)}


def check_transfer(num_images: int, seed: int, eps: float) -> dict:
    """`judge_transfer` on the shipped teacher's 4-step samples (CFG as in the docs) of each split."""
    from tqdm.auto import tqdm

    from ..seeds import image_seeds
    from .weights import DEFAULT_CFG, load_teacher

    judge, align, teacher = load_judge(), load_align(), load_teacher()
    report = {"num_images_per_split": num_images, "samples": f"teacher, 4 steps, CFG {DEFAULT_CFG:g}"}
    for split in tqdm(SPLITS, desc="checking transfer", leave=False):
        scenes = PromptSplit(split).sample(num_images, seed)
        images = teacher.sample(prompts_of(scenes), steps=4, cfg=DEFAULT_CFG, seed=image_seeds(seed, num_images),
                                progress=True)
        report[split] = judge_transfer(judge, align, images.clamp(0, 1), scenes, eps, seed)
    return report


def main(argv: list[str] | None = None) -> None:
    from ..cli import command_summary

    parser = argparse.ArgumentParser(prog="python -m dmdr_rl.toy.check", description=command_summary(__doc__))
    parser.add_argument("--num-images", type=int, default=2000,
                        help="fresh renders (or, with --transfer, teacher samples) per prompt split (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="the prompts drawn and the images' seeds (default 0)")
    parser.add_argument("--transfer", action="store_true", help="measure how far toy-align's gradient moves the judge")
    parser.add_argument("--eps", type=float, default=4 / 255, help="the L-inf budget of --transfer (default 4/255)")
    args = parser.parse_args(argv)
    if args.num_images < 2:
        parser.error(f"--num-images must be >= 2, got {args.num_images}")
    if args.eps != parser.get_default("eps") and not args.transfer:
        parser.error("--eps is --transfer's budget: add --transfer")
    if not (0 < args.eps <= 1):
        parser.error(f"--eps must be in (0, 1] (a pixel budget), got {args.eps}")
    report = check_transfer(args.num_images, args.seed, args.eps) if args.transfer else check_evaluators(args.num_images, args.seed)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
