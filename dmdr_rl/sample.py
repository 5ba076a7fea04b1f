"""Sample a trained student for your own prompts: a grid to look at and the images as data, scored by
reward models if you ask.

    python -m dmdr_rl.sample --run runs/toy-dmdr --prompt "a red circle above a blue square" --num 8
    python -m dmdr_rl.sample --run runs/toy-dmdr --prompts my_prompts.txt --out runs/my-samples
    python -m dmdr_rl.sample --run runs/sd3 --prompts eval.txt --score --out runs/sd3-student
    python -m dmdr_rl.sample --run runs/sd3 --prompts eval.txt --score --teacher --steps 28 --out runs/sd3-teacher

The student samples as it was trained (its steps, shift and sampler, no classifier-free guidance; a Flux
model's embedded guidance, model.kwargs.guidance, is always in), on the GPU when there is one; `--teacher` samples the model it was distilled from instead. Each image has its own seed
(from --seed and its index), kept in `samples.parquet` beside the prompt, so any one image can be made
again alone, and the student and the teacher get the same noise for the same --seed. `--score` scores
every image with the run's reward models (or those of `--reward`) in this process, into
`samples.parquet` and `scores.json`; `grid.png` shows (the first 64 of) the images with their prompts.
An SD3 or Flux student is better taken to diffusers with `python -m dmdr_rl.export`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

from .cli import fixable_errors

GRID_IMAGES = 64
TEACHER_STEPS = 32  # a teacher's default sampling steps (the toy tables'; SD3's own pipeline default is 28)


def reward_spec(text: str):
    """--reward's value as a rewards[] entry: a name or import path, or the entry's fields in YAML."""
    import pydantic
    import yaml

    from .config import RewardSpec, load_yaml

    try:
        value = load_yaml(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not a reward name or YAML mapping: {err}") from None
    fields = {"name": text.strip()} if not isinstance(value, dict) else value
    try:
        return RewardSpec.model_validate({**fields, "placement": "local"})  # scored here, whatever the run did
    except pydantic.ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in err.errors())
        raise argparse.ArgumentTypeError(f"{text!r}: {problems}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .cli import command_name, command_summary

    p = argparse.ArgumentParser(prog=command_name("dmdr_rl.sample"), description=command_summary(__doc__))
    p.add_argument("--run", type=Path, required=True,
                   help="a training run directory (its latest checkpoint) or one checkpoints/step_* directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    p.add_argument("--prompts", type=Path, default=None, help="a prompt file: .txt, or .csv/.parquet/.jsonl with a prompt column")
    p.add_argument("--num", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="the base seed each image's own seed derives from (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images sampled at once (default 64)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/samples-TIMESTAMP)")
    p.add_argument("--teacher", action="store_true",
                   help="sample the model the run distilled (its base, without the generator) instead of the student")
    p.add_argument("--steps", type=int, default=None, help=f"teacher: sampling steps (default {TEACHER_STEPS})")
    p.add_argument("--cfg", type=float, default=None,
                   help="teacher: classifier-free guidance scale, two passes a step (default: the run's dmd.real_cfg; "
                        "a Flux model's embedded guidance is in either way)")
    p.add_argument("--shift", type=float, default=None, help="teacher: timestep shift (default: the run's student.shift)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer's blocks, as model.compile does in training (worth it for many "
                        "images on a GPU: the first batch compiles; not taken from the run's config)")
    p.add_argument("--score", action="store_true",
                   help="score every image with the run's reward models (every rewards[] entry, loaded in this "
                        "process): a column each in samples.parquet, means in scores.json")
    p.add_argument("--reward", action="append", default=[], type=reward_spec, metavar="SPEC",
                   help="score with this reward model instead of the run's (repeatable; implies --score): a "
                        "registered name or import path, or a rewards[] entry in YAML, e.g. "
                        "'{name: pickscore, kwargs: {path: /models/pickscore}}'")
    args = p.parse_args(argv)
    args.score = args.score or bool(args.reward)
    if not args.teacher:
        given = [flag for flag, value in (("--steps", args.steps), ("--cfg", args.cfg), ("--shift", args.shift))
                 if value is not None]
        if given:
            p.error(f"{', '.join(given)}: for the teacher's sampling only (with --teacher); a student samples as it was "
                    "trained (its run's student.steps, student.shift and student.sampler, no classifier-free guidance)")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 0):
        p.error(f"--cfg must be finite and >= 0 (1: no guidance), got {args.cfg}")
    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        p.error(f"--shift must be > 0, got {args.shift}")
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


def reward_models(specs, where: str) -> dict:
    """Each entry's model in this process (a served reward too: here nothing runs on Ray), by its key, as the
    run scores with it (its prompt template)."""
    from reward_servers import reward_model

    from .config import ConfigError
    from .dmdr import WeightedReward

    keys = [spec.key for spec in specs]
    if len(set(keys)) < len(keys):
        raise ConfigError(f"{where}: two rewards are called {max(keys, key=keys.count)!r}: give them labels")
    for i, spec in enumerate(specs):  # an app the run attached to was configured by its own deployment
        if spec.placement == "serve" and spec.serve.attach:
            raise ConfigError(f"{where}[{i}] ({spec.key}) is an attached Serve app's entry, whose own config chose its model: "
                              f"name that model with --reward '{{name: {spec.name}, kwargs: {{...}}}}'")
    return {spec.key: WeightedReward(reward_model(spec.model_copy(update={"placement": "local"}), f"{where}[{i}]"), spec)
            for i, spec in enumerate(specs)}


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)  # (before torch is imported: --help and a usage error at once)
    from .config import ConfigError
    from .eval import load_sampler
    from .evaluation import generate, score_images, score_statistics
    from .grid import save_grid
    from .prompts import read_prompt_file
    from .registry import check_model
    from .samples import write_samples
    from .seeds import image_seeds
    from .store import write_json_whole
    from reward_servers.registry import REWARDS
    from reward_servers.protocol import RewardScoreError

    try:
        prompts = [p.strip() for p in args.prompt]
        if args.prompts is not None:
            prompts += read_prompt_file(args.prompts)
        sample_fn, cfg, settings = load_sampler(args.run, args.teacher, args.steps, args.cfg, args.shift, args.compile)
        check_model(cfg.model, prompts, prompts_from="--prompt / --prompts")
        rewards = {}
        if args.score:
            specs, where = (args.reward, "--reward") if args.reward else (cfg.rewards, "the run's rewards")
            if not specs:
                raise ConfigError(f"--score: the run {args.run} has no rewards[]: name one with --reward NAME")
            for i, spec in enumerate(specs):  # (before sampling: a prompt a reward cannot read stops it at once)
                REWARDS.check(spec.name, prompts=spec.texts_read(prompts), prompts_from="--prompt / --prompts",
                              resolution=cfg.model.resolution, where=f"{where}[{i}]")
            rewards = reward_models(specs, where)  # (so does a model that cannot load)
    except (*fixable_errors(), FileNotFoundError) as err:  # a prompt file's error names data.prompts: here it is --prompts
        raise SystemExit(f"error: {str(err).replace('data.prompts', '--prompts', 1)}") from None
    model = "teacher" if args.teacher else "student"
    prompts = [p for p in prompts for _ in range(args.num)]
    seeds = image_seeds(args.seed, len(prompts))
    if args.compile:
        print("compiling the transformer's blocks: the first batch takes longer", file=sys.stderr, flush=True)
    images, nonfinite = generate(sample_fn, prompts, seeds, args.batch_size, desc=f"sampling {len(prompts)} images")
    if nonfinite:
        print(f"warning: {nonfinite} of {len(prompts)} images had pixels that are not finite (a diverged {model}?); "
              "they are saved with those pixels at 0", file=sys.stderr)
    out = args.out or Path("runs") / f"samples-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    # the weights that made the images (a live run's next checkpoint samples differently)
    made_by = {"checkpoint": [settings["checkpoint"]] * len(prompts)} if "checkpoint" in settings else None
    try:
        scores = score_images(rewards, images, prompts, args.batch_size)
    except (*fixable_errors(), RewardScoreError) as err:  # (a prompt the reward model cannot read, or a model that
        write_samples(out / "samples.parquet", images, prompts, seeds, step=-1, weight_version=-1, extra=made_by,
                      source="sample")  # raised): the images are kept all the same
        if isinstance(err, RewardScoreError):  # (the model's own traceback first: a bug in it shows there)
            traceback.print_exception(err)
        raise SystemExit(f"error: scoring: {err} (the images are in {out / 'samples.parquet'}, without scores)") from None
    write_samples(out / "samples.parquet", images, prompts, seeds, step=-1, weight_version=-1, rewards=scores,
                  extra=made_by, source="sample")
    if args.score:
        statistics = {name: score_statistics(values) for name, values in scores.items()}
        write_json_whole(out / "scores.json", {"model": model, **settings, "run": str(Path(args.run).resolve()),
                                               # (the backbone's own settings, e.g. Flux's embedded guidance)
                                               "model_kwargs": dict(cfg.model.kwargs),
                                               "num_images": len(prompts), "seed": args.seed, "rewards": statistics})
        for name, s in statistics.items():
            failed = f"; {s['non_finite']} not finite" if s["non_finite"] else ""
            print(f"{name}: {s['mean']:.4f} +- {s['stderr']:.4f} (mean +- standard error over "
                  f"{len(prompts) - s['non_finite']} images{failed})")
    shown = min(len(prompts), GRID_IMAGES)  # every image is in the Parquet file; the grid is for a look
    save_grid(images[:shown], prompts[:shown], out / "grid.png", columns=min(8, args.num) if args.num > 1 else 8)
    source = f" (checkpoint {settings['checkpoint']})" if "checkpoint" in settings else ""
    print(f"{len(prompts)} image{'s' if len(prompts) != 1 else ''} of the {settings['steps']}-step {model}{source} in "
          f"{out.resolve()}: samples.parquet, grid.png" + (f" (the first {shown})" if shown < len(prompts) else "")
          + (", scores.json" if args.score else ""))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
