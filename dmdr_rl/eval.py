"""Evaluate a toy-world model: judge accuracy, FID, rewards, and a sample grid per setting.

    python -m dmdr_rl.eval --steps 32 --cfg 3 --split held-in
    python -m dmdr_rl.eval --steps 32,4,1 --cfg 1,2,3,4 --split held-in,held-out --num-images 500

Comma-separated values sweep every combination; each writes `report.json` and `grid.png` in its own
directory under --out, and a `summary.json` / `summary.md` table collects every setting evaluated there
(by this call and earlier ones).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import time
from pathlib import Path

from .sample import TEACHER_STEPS
from .store import write_json_whole, write_text_whole
from .toy.grammar import SPLITS
from .toy.weights import DEFAULT_CFG, load_align, load_judge, load_teacher


def _list_of(kind):
    def parse(text: str):
        try:
            values = list(dict.fromkeys(kind(v.strip()) for v in text.split(",") if v.strip()))  # each once
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from err
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def _splits(text: str) -> list[str]:
    values = _list_of(str)(text)
    for v in values:
        if v not in SPLITS:
            raise argparse.ArgumentTypeError(f"unknown split {v!r}; allowed: {', '.join(SPLITS)}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .cli import command_name, command_summary

    p = argparse.ArgumentParser(prog=command_name("dmdr_rl.eval"), description=command_summary(__doc__))
    p.add_argument("--model", choices=["teacher", "student"], default=None,
                   help="the toy teacher (with --steps/--cfg), or a trained student (with --run); default: "
                        "student when --run is given, else teacher")
    p.add_argument("--run", type=Path, default=None,
                   help="student: a run directory (latest checkpoint) or one checkpoints/step_* directory")
    p.add_argument("--weights", type=Path, default=None, help="toy weights root (default: the shipped weights)")
    p.add_argument("--steps", type=_list_of(int), default=None, help="teacher: sampling steps, e.g. 32 or 32,4,1 (default 32)")
    p.add_argument("--cfg", type=_list_of(float), default=None,
                   help=f"teacher: classifier-free guidance scale(s) (default {DEFAULT_CFG:g})")
    p.add_argument("--shift", type=float, default=None, help="teacher: timestep shift of the sampling schedule (default 1)")
    p.add_argument("--split", type=_splits, default=["held-in"], help="prompt split(s): held-in, held-out (default held-in)")
    p.add_argument("--num-images", type=int, default=1000,
                   help="images per setting and split (default 1000, as the README's numbers; FID is only "
                        "comparable at equal counts)")
    p.add_argument("--batch-size", type=int, default=250, help="images sampled at once (default 250; the images do not depend on it beyond float rounding)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed: the prompts and each image's seed (default 0)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output directory (default runs/eval)")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "student" if args.run is not None else "teacher"
    if (args.model == "student") != (args.run is not None):
        p.error("--run goes with --model student (and a student needs --run)")
    if args.model == "student":
        given = [flag for flag, value in (("--steps", args.steps), ("--cfg", args.cfg), ("--shift", args.shift))
                 if value is not None]
        if given:
            p.error(f"{', '.join(given)} set the teacher's sampling; a student samples as it was trained "
                    "(its run's student.steps, student.shift and student.sampler, no guidance)")
    args.steps = args.steps if args.steps is not None else [TEACHER_STEPS]
    args.cfg = args.cfg if args.cfg is not None else [DEFAULT_CFG]
    args.shift = args.shift if args.shift is not None else 1.0
    if any(s < 1 for s in args.steps):
        p.error(f"--steps must be >= 1, got {args.steps}")
    if not (math.isfinite(args.shift) and args.shift > 0):
        p.error(f"--shift must be > 0, got {args.shift}")
    if not all(math.isfinite(c) and c >= 0 for c in args.cfg):
        p.error(f"--cfg must be finite and >= 0 (1: no guidance), got {args.cfg}")
    if args.num_images < 2:
        p.error(f"--num-images must be >= 2 (FID needs a spread), got {args.num_images}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file: give a directory")
    return args


def load_student(run: Path):
    """A trained student as (sample_fn, its run's config): the generator adapter on the run's model,
    sampled as it was trained, on the GPU when there is one. Nothing else of the training is built
    (its reward apps, prompt file or training device need not exist here)."""
    sample_fn, cfg, _ = load_sampler(run)
    return sample_fn, cfg


def load_sampler(run: Path, teacher: bool = False, steps: int | None = None, cfg: float | None = None,
                 shift: float | None = None, compile: bool = False):
    """(sample_fn, the run's config, how it samples) for a run's student (its settings name the checkpoint), or
    with `teacher` for the model it was distilled from (the base without the generator adapter): `steps`
    (default 32), `cfg` (default the run's dmd.real_cfg, the guidance of its real score) and `shift` (default
    the student's); `compile`: the transformer's blocks under torch.compile."""
    from .registry import resolve_device
    from .trainer import load_generator, student_images

    backbone, run_cfg, checkpoint = load_generator(run, device=resolve_device("auto"), with_generator=not teacher,
                                                   compile=compile)
    if not teacher:
        return ((lambda prompts, seeds: student_images(backbone, backbone.encode(prompts), run_cfg.student, seeds)),
                run_cfg, {**student_settings(run_cfg.student), "checkpoint": str(checkpoint.resolve())})
    settings = {"steps": steps or TEACHER_STEPS, "cfg": run_cfg.dmd.real_cfg if cfg is None else cfg,
                "shift": run_cfg.student.shift if shift is None else shift, "sampler": "ode"}
    return ((lambda prompts, seeds: backbone.sample(list(prompts), settings["steps"], settings["cfg"], seed=list(seeds),
                                                    shift=settings["shift"])),
            run_cfg, settings)


def student_label(run_dir: Path, checkpoint: Path) -> str:
    """One report directory per run and checkpoint: the run's folder name and the checkpoint's, and a short hash
    of the checkpoint's full path (two runs of one folder name, or two Ray launches' checkpoint_000000)."""
    digest = hashlib.sha1(str(checkpoint.resolve()).encode()).hexdigest()[:6]
    return f"{run_dir.resolve().name}-{checkpoint.name}-{digest}"


def student_settings(student) -> dict:
    """How a student samples, as its reports record it: its steps, shift and sampler, no guidance."""
    return {"steps": student.steps, "cfg": 1.0, "shift": student.shift, "sampler": student.sampler}


def samplers(args: argparse.Namespace):
    """(name, settings, sample_fn) for every setting to evaluate; settings go into the report."""
    if args.model == "student":
        from .cli import with_article
        from .config import ConfigError, load_config
        from .registry import backbone_family
        from .toy.render import RESOLUTION
        from .trainer import find_run

        run_dir, checkpoint = find_run(args.run)  # this checkpoint is the one evaluated and reported, even if
        cfg = load_config(run_dir / "config.yaml", for_sampling=True)  # the run writes a newer one meanwhile
        if cfg.model.resolution != RESOLUTION:  # the judge and the FID statistics know 32 px toy scenes only
            family = backbone_family(cfg.model.backbone)
            model = family.name if family is not None else cfg.model.backbone
            raise ConfigError(f"{run_dir} trains {with_article(model)} student at {cfg.model.resolution} px: the toy "
                              f"evaluation judges {RESOLUTION} px toy-world scenes only. Sample it with `python -m "
                              f"dmdr_rl.sample --run {run_dir} --prompt TEXT`")
        sample_fn, cfg = load_student(checkpoint)
        settings = {**student_settings(cfg.student), "run": str(run_dir.resolve()), "checkpoint": str(checkpoint.resolve())}
        return [(f"student-{student_label(run_dir, checkpoint)}-steps{cfg.student.steps}", settings, sample_fn)]
    teacher = load_teacher(args.weights, field="--weights")
    return [
        (f"teacher-steps{steps}-cfg{cfg:g}{f'-shift{args.shift:g}' if args.shift != 1.0 else ''}",
         {"steps": steps, "cfg": cfg, "shift": args.shift, "sampler": "ode"},
         lambda prompts, seeds, steps=steps, cfg=cfg: teacher.sample(prompts, steps=steps, cfg=cfg, seed=seeds, shift=args.shift))
        for steps, cfg in itertools.product(args.steps, args.cfg)
    ]


def run_sweep(args: argparse.Namespace) -> list[dict]:
    from .evaluation import evaluate

    judge, align = load_judge(args.weights), load_align(args.weights, field="--weights")
    reports = []
    for split, (setting, settings, sample_fn) in itertools.product(args.split, samplers(args)):
        name = f"{setting}-{split}" + (f"-seed{args.seed}" if args.seed else "")  # other settings: other directories
        _say_if_replaced(args.out / name / "report.json", args.num_images)
        started = time.time()
        report = evaluate(
            sample_fn,
            split=split,
            num_images=args.num_images,
            seed=args.seed,
            judge=judge,
            rewards=[align],
            batch_size=args.batch_size,
            grid_path=args.out / name / "grid.png", samples_path=args.out / name / "samples.parquet",
            desc=name,
        )
        report = {"model": args.model, **settings, **report,
                  "seconds": round(time.time() - started, 1)}
        write_json_whole(args.out / name / "report.json", report)
        print(f"{name}: judge accuracy {report['judge_accuracy']:.3f}  analytic {report['analytic_accuracy']:.3f}  "
              f"FID {report['fid']:.2f}  diversity {report['diversity']:.3f}  toy-align {report['rewards']['toy-align']:.3f}  "
              f"-> {args.out / name}")
        if "fid_note" in report and len(reports) == 0:
            print(f"  note: {report['fid_note']}; compare FIDs at equal image counts")
        reports.append(report)
    write_summary(_every_report(args.out), args.out)
    return reports


def _say_if_replaced(path: Path, num_images: int) -> None:
    """A setting's directory holds its latest evaluation only: say so when a call replaces one, with its image count
    (FID depends on it) and checkpoint."""
    earlier = _read_report(path)
    if earlier is None:
        return
    print(f"{path.parent.name}: replacing the evaluation there of {earlier.get('num_images', '?')} images"
          + (f" ({earlier['checkpoint']})" if "checkpoint" in earlier else "")
          + ("" if earlier.get("num_images") == num_images else f" with one of {num_images}"))


def _every_report(out: Path) -> list[dict]:
    """Every setting evaluated under `out`, by this call or an earlier one (each directory's report.json)."""
    reports = [_read_report(path) for path in sorted(out.glob("*/report.json"))]
    return [r for r in reports if r is not None and {"judge_accuracy", "fid", "split", "model"} <= set(r)]


def _read_report(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none, or not an evaluation's
        return None


def write_summary(reports: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_whole(out / "summary.json", reports)
    lines = ["| model | split | steps | cfg | judge accuracy | analytic accuracy | FID | diversity | toy-align | images "
             "| setting |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(value, form: str = "") -> str:  # (a report of an earlier version may lack a number: "-")
        return "-" if value is None else format(value, form)

    for r in reports:
        setting = Path(r["grid"]).parent.name if r.get("grid") else "-"  # (its directory under --out)
        lines.append(f"| {r['model']} | {r['split']} | {cell(r.get('steps'))} | {cell(r.get('cfg'), 'g')} | "
                     f"{cell(r.get('judge_accuracy'), '.3f')} | {cell(r.get('analytic_accuracy'), '.3f')} | "
                     f"{cell(r.get('fid'), '.2f')} | {cell(r.get('diversity'), '.3f')} | "
                     f"{cell(r.get('rewards', {}).get('toy-align'), '.3f')} | {cell(r.get('num_images'))} | {setting} |")
    write_text_whole(out / "summary.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    from .cli import fixable_errors

    args = parse_args(argv)  # (before torch is imported: --help and a usage error at once)
    import torch

    torch.manual_seed(args.seed)
    try:
        run_sweep(args)
    except (*fixable_errors(), FileNotFoundError) as err:  # a run that is not one, a config that no longer loads
        raise SystemExit(f"error: {err}") from None
    print(f"summary: {args.out / 'summary.md'}")


if __name__ == "__main__":
    main()
