"""The main job: `python -m dmdr_rl.run` (and, once the runtime exists, `ray job submit -- python -m dmdr_rl.run`).

The DMDR trainer is not built yet (issue 3; the Ray runtime is issue 4). Until it is, the main job
does not train anything: it samples the shipped toy teacher with 32, 4 and 1 steps, evaluates the
samples with the held-out judge, and reports where the results went. The 4- and 1-step rows are the
gap that distillation is meant to close.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import eval as toy_eval
from .toy.teacher import DEFAULT_CFG

BANNER = (
    "dmdr_rl: training is not built yet (the DMDR trainer is issue 3, the Ray runtime issue 4).\n"
    "This run trains nothing: it samples the shipped toy teacher at 32, 4 and 1 steps and evaluates\n"
    "the samples with the held-out judge (judge accuracy, FID against fresh renders, toy-align reward)."
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dmdr_rl.run", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/demo-TIMESTAMP)")
    parser.add_argument("--num-images", type=int, default=256, help="images per evaluated setting")
    parser.add_argument("--split", default="held-in", choices=["held-in", "held-out"])
    parser.add_argument("overrides", nargs="*", help="config overrides (section.key=value): arrive with the trainer")
    args = parser.parse_args(argv)
    if args.overrides:
        parser.error(
            f"config overrides {args.overrides} are not accepted yet: the trainer and its typed config "
            "arrive with issue 3; today the main job only evaluates the toy teacher"
        )
    out = args.out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print(BANNER, flush=True)
    eval_args = toy_eval.parse_args([
        "--steps", "32,4,1", "--cfg", str(DEFAULT_CFG), "--split", args.split,
        "--num-images", str(args.num_images), "--out", str(out),
    ])
    reports = toy_eval.run_sweep(eval_args)
    print("\n" + (out / "summary.md").read_text())
    print(f"Outputs: {out.resolve()}")
    print("  summary.md / summary.json   the table above")
    for r in reports:
        print(f"  {Path(r['grid']).parent.name}/   report.json, grid.png")
    print("Nothing was trained (see the banner above).")


if __name__ == "__main__":
    main(sys.argv[1:])
