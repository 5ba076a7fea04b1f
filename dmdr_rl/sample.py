"""Sample a trained student for your own prompts: a grid to look at and the images as data.

    python -m dmdr_rl.sample --run runs/toy-dmdr --prompt "a red circle above a blue square" --num 8
    python -m dmdr_rl.sample --run runs/toy-dmdr --prompts my_prompts.txt --out runs/my-samples

The student samples as it was trained (its steps, shift and sampler, no guidance), on the GPU when
there is one. Each image has its own seed (from --seed and its index), kept in `samples.parquet`
beside the prompt, so any one image can be made again alone; `grid.png` shows (the first 64 of) them
with their prompts.
An SD3 student is better taken to diffusers with `python -m dmdr_rl.export`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .cli import fixable_errors

GRID_IMAGES = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .cli import command_summary

    p = argparse.ArgumentParser(prog="python -m dmdr_rl.sample", description=command_summary(__doc__))
    p.add_argument("--run", type=Path, required=True,
                   help="a training run directory (its latest checkpoint) or one checkpoints/step_* directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    p.add_argument("--prompts", type=Path, default=None, help="a prompt file: .txt, or .csv/.parquet/.jsonl with a prompt column")
    p.add_argument("--num", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="the base seed each image's own seed derives from (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images sampled at once (default 64)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/samples-TIMESTAMP)")
    args = p.parse_args(argv)
    if not args.prompt and args.prompts is None:
        p.error("give --prompt TEXT (repeatable) or --prompts FILE")
    if any(not text.strip() for text in args.prompt):
        p.error("--prompt is empty (the empty prompt is the model's unconditional input, not a prompt)")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file: give a directory")
    if args.out is not None and (args.out / "samples.parquet").exists():
        p.error(f"{args.out} already holds samples: choose another --out")
    for flag, value, least in (("--num", args.num, 1), ("--batch-size", args.batch_size, 1), ("--seed", args.seed, 0)):
        if value < least:
            p.error(f"{flag} must be >= {least}, got {value}")
    return args


def main(argv: list[str] | None = None) -> Path:
    from .eval import load_student
    from .evaluation import generate
    from .seeds import image_seeds
    from .grid import save_grid
    from .prompts import read_prompt_file
    from .registry import check_model
    from .samples import write_samples

    args = parse_args(argv)
    try:
        prompts = [p.strip() for p in args.prompt]
        if args.prompts is not None:
            prompts += read_prompt_file(args.prompts)
        sample_fn, cfg = load_student(args.run)
        check_model(cfg.model, prompts, prompts_from="--prompt / --prompts")
    except (*fixable_errors(), FileNotFoundError) as err:  # a prompt file's error names data.prompts: here it is --prompts
        raise SystemExit(f"error: {str(err).replace('data.prompts', '--prompts', 1)}") from None
    prompts = [p for p in prompts for _ in range(args.num)]
    seeds = image_seeds(args.seed, len(prompts))
    images, nonfinite = generate(sample_fn, prompts, seeds, args.batch_size, desc=f"sampling {len(prompts)} images")
    if nonfinite:
        print(f"warning: {nonfinite} of {len(prompts)} images had pixels that are not finite (a diverged student?); "
              "they are saved with those pixels at 0", file=sys.stderr)
    out = args.out or Path("runs") / f"samples-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    write_samples(out / "samples.parquet", images, prompts, seeds, step=-1, weight_version=-1, source="sample")
    shown = min(len(prompts), GRID_IMAGES)  # every image is in the Parquet file; the grid is for a look
    save_grid(images[:shown], prompts[:shown], out / "grid.png", columns=min(8, args.num) if args.num > 1 else 8,
              scale=max(1, 128 // images.shape[-1]))
    print(f"{len(prompts)} images of the {cfg.student.steps}-step student in {out.resolve()}: samples.parquet, grid.png"
          + (f" (the first {shown})" if shown < len(prompts) else ""))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
