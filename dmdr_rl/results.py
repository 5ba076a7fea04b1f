"""Reproduce the toy-world results table: `docs/results/toy.md`, its JSON twin and a grid per row.

    python -m dmdr_rl.results                # train what is missing, evaluate every row, write the table
    python -m dmdr_rl.results --jobs 2       # two trainings at a time (one thread each)
    python -m dmdr_rl.results --rows teacher-32,dmd-4 --num-images 200   # a quick partial table

Rows: the teacher at 32, 4 and 1 steps (CFG 4), and students trained from the presets (DMD, DMDR,
RL-only at 4 steps; DMD and DMDR at 1 step). Trainings live under --runs and are reused when finished
(resumed from their last checkpoint when interrupted), so a second call only re-evaluates; a run whose
saved config differs from what the presets and overrides give now is refused (`--retrain`). Every row
is evaluated on both prompt splits by `dmdr_rl.evaluation.evaluate`, the same function as
`python -m dmdr_rl.eval`. The paper's claims (issue 3's targets) are checked against the measured
numbers and written under the table, pass or fail.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

from .cli import with_article
from .store import write_json_whole, write_text_whole

SPLITS = ("held-in", "held-out")


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    steps: int
    preset: str | None = None  # None: the teacher


ROWS = (
    Row("teacher-32", "Teacher, 32 steps", 32),
    Row("teacher-4", "Teacher, 4 steps", 4),
    Row("teacher-1", "Teacher, 1 step", 1),
    Row("dmd-4", "DMD, 4-step", 4, "toy-dmd"),
    Row("dmdr-4", "DMDR, 4-step", 4, "toy-dmdr"),
    Row("rl-only-4", "RL only (no DMD), 4-step", 4, "toy-rl-only"),
    Row("dmd-1", "DMD, 1-step", 1, "toy-dmd-1step"),
    Row("dmdr-1", "DMDR, 1-step", 1, "toy-dmdr-1step"),
)
ROWS_BY_KEY = {row.key: row for row in ROWS}


# -- training -----------------------------------------------------------------------------------
def _finished(run_dir: Path, max_steps: int) -> bool:
    summary = run_dir / "train_summary.json"
    return summary.exists() and json.loads(summary.read_text())["generator_steps"] >= max_steps


def _check_same_config(cfg, run_path: Path) -> None:
    """A run trained from another config (a preset tuned since, other overrides) is not reused or
    continued silently: the table would show numbers the current presets do not give."""
    from .trainer import changed_settings

    changes = changed_settings(cfg, run_path, ignore=("output.dir:", "trainer.resume_from:"))
    if changes:
        raise RuntimeError(f"{run_path} was trained from another config ({'; '.join(changes[:5])}"
                           f"{'; ...' if len(changes) > 5 else ''}): pass --retrain to train it again, or --runs "
                           "to another directory")


def row_config(preset: str, run_dir: str | Path, overrides: Sequence[str]):
    from .config import load_config

    return load_config(preset, [f"output.dir={run_dir}", *overrides])


def check_rows(rows: list[Row], runs: Path, overrides: Sequence[str], retrain: bool) -> None:
    """Every student row's config, before anything is deleted or trained: a bad override or a run
    trained from another config stops the command at once, not after hours of the other rows."""
    from .config import ConfigError

    if overrides and all(row.preset is None for row in rows):
        raise ConfigError(f"config overrides {list(overrides)} apply to trainings, and the rows asked for train nothing")
    for row in rows:
        if row.preset is None:
            continue
        cfg = row_config(row.preset, runs / row.key, overrides)
        for note in cfg.warnings():
            print(f"warning: row {row.key}: {note}", file=sys.stderr, flush=True)
        if not retrain:
            _check_same_config(cfg, runs / row.key)


def train_row(preset: str, run_dir: str, threads: int, overrides: tuple[str, ...] = ()) -> dict:
    """Train (or finish training) one preset into `run_dir`; returns the training summary. Runs in a
    worker process when trainings go in parallel."""
    import torch

    from .trainer import LocalTrainer

    torch.set_num_threads(threads)
    run_path = Path(run_dir)
    cfg = row_config(preset, run_path, overrides)
    _check_same_config(cfg, run_path)
    if _finished(run_path, cfg.trainer.max_steps):
        print(f"{preset}: reusing {run_path} (trained earlier with the same config; --retrain trains it again)",
              flush=True)
        return json.loads((run_path / "train_summary.json").read_text())
    trainer = LocalTrainer(cfg)
    previous_seconds = 0.0
    resumed = (run_path / "checkpoints" / "latest").exists()
    if resumed:
        trainer.load_checkpoint(run_path / "checkpoints")
        if (run_path / "train_partial.json").exists():
            previous_seconds = json.loads((run_path / "train_partial.json").read_text())["seconds"]
    started = time.time()
    try:
        summary = trainer.train()
    finally:
        elapsed = previous_seconds + time.time() - started
        if run_path.is_dir():  # not when the run failed before making it (e.g. an unreachable store)
            write_json_whole(run_path / "train_partial.json", {"seconds": round(elapsed, 1)})
    summary.update({"preset": preset, "train_seconds": round(elapsed, 1), "threads": threads, "resumed": resumed})
    write_json_whole(run_path / "train_summary.json", summary)
    return summary


def threads_per_training(jobs: int) -> int:
    """The machine's CPU threads shared between `jobs` trainings, and no more than OMP_NUM_THREADS when it
    is set: a user's cap (e.g. beside other work on the machine), which torch.set_num_threads would override."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    cap = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # (OpenMP's nested form: "4,2")
    return min(threads, int(cap)) if cap.isdigit() and int(cap) > 0 else threads


def train_all(rows: list[Row], runs: Path, jobs: int, overrides: tuple[str, ...]) -> dict[str, dict]:
    """Train every student row; `jobs` at a time, the machine's threads shared between them."""
    students = [row for row in rows if row.preset is not None]
    threads = threads_per_training(jobs)
    if jobs <= 1 or len(students) <= 1:
        return {row.key: train_row(row.preset, str(runs / row.key), threads, overrides) for row in students}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {row.key: pool.submit(train_row, row.preset, str(runs / row.key), threads, overrides) for row in students}
        return {key: future.result() for key, future in futures.items()}


# -- evaluation ---------------------------------------------------------------------------------
def _sampler(row: Row, runs: Path):
    from .eval import load_student
    from .toy.weights import DEFAULT_CFG, load_teacher

    if row.preset is None:
        teacher = load_teacher()
        return DEFAULT_CFG, lambda prompts, seeds: teacher.sample(prompts, steps=row.steps, cfg=DEFAULT_CFG, seed=seeds)
    sample_fn, cfg = load_student(runs / row.key)
    if cfg.student.steps != row.steps:
        raise ValueError(f"{runs / row.key} trains {with_article(f'{cfg.student.steps}-step')} student, but row {row.key} "
                         f"is {row.steps}-step")
    return 1.0, sample_fn


def evaluate_row(row: Row, runs: Path, out: Path, num_images: int, seed: int, judge, align) -> dict:
    from .evaluation import evaluate

    cfg, sample_fn = _sampler(row, runs)
    result = {"key": row.key, "label": row.label, "steps": row.steps, "cfg": cfg, "preset": row.preset}
    for split in SPLITS:
        grid = out / "toy" / f"{row.key}-{split}.png"
        report = evaluate(sample_fn, split, num_images, seed, judge, [align], grid_path=grid, grid_size=16,
                          desc=f"{row.key} {split}")
        report["grid"] = str(grid.relative_to(out))
        result[split] = report
        print(f"{row.key} {split}: judge accuracy {report['judge_accuracy']:.3f}  analytic "
              f"{report['analytic_accuracy']:.3f}  FID {report['fid']:.1f}  "
              f"toy-align {report['rewards']['toy-align']:.3f}", flush=True)
    return result


# -- the claims ---------------------------------------------------------------------------------
def hacking_evidence(rl_only: dict, dmdr: dict) -> tuple[bool, bool]:
    """(the judge 0.05 below DMDR, FID 1.5x DMDR's) on one split's reports: either makes hacking visible."""
    return (rl_only["judge_accuracy"] <= dmdr["judge_accuracy"] - 0.05 + 1e-9, rl_only["fid"] >= 1.5 * dmdr["fid"])


def reward_hacked(rl_only: dict, dmdr: dict) -> bool:
    return any(hacking_evidence(rl_only, dmdr))


def accuracy_margin(a: float, n_a: int, b: float, n_b: int, factor: float = 1.0, offset: float = 0.0) -> str:
    """`a - (factor * b + offset)` in standard errors of two binomial accuracies counted as unpaired (the
    rows see the same prompts and seeds, so this overstates the noise): how far a pass or a miss is from
    what the image draw alone could give."""
    se = math.sqrt(a * (1 - a) / n_a + factor ** 2 * b * (1 - b) / n_b)
    gap = a - factor * b - offset
    return f"{gap:+.3f}, {gap / se:+.1f} SE" if se > 0 else f"{gap:+.3f}"


def check_claims(results: dict[str, dict]) -> list[dict]:
    """Issue 3's targets, each as {claim, measured, passed}; rows that were not run are skipped. An
    accuracy claim's measurement gives its margin in standard errors (see accuracy_margin)."""

    def acc(key, split):
        return results[key][split]["judge_accuracy"]

    def fid(key, split="held-in"):
        return results[key][split]["fid"]

    def reward(key):
        return results[key]["held-in"]["rewards"]["toy-align"]

    def analytic(key, split):
        return results[key][split]["analytic_accuracy"]

    def n(key, split):
        return results[key][split].get("num_images", 1000)

    def margin(field, key, other, split, factor=1.0, offset=0.0):
        return accuracy_margin(results[key][split][field], n(key, split), results[other][split][field], n(other, split),
                               factor, offset)

    def claim(text, needs, test, measured, by_analytic=False):
        if all(k in results and (not by_analytic or "analytic_accuracy" in results[k]["held-in"]) for k in needs):
            claims.append({"claim": text, "measured": measured(), "passed": bool(test())})

    def dmdr_above_teacher(field, name, by_analytic=False):
        """DMDR at 4 and 1 steps above the 32-step teacher by one judge's accuracy, on each split."""
        for key, steps in (("dmdr-4", 4), ("dmdr-1", 1)):
            for split in SPLITS:
                claim(f"DMDR {steps}-step: {name} above the 32-step teacher's ({split})", (key, "teacher-32"),
                      lambda k=key, s=split: results[k][s][field] > results["teacher-32"][s][field],
                      lambda k=key, s=split: f"{results[k][s][field]:.3f} vs {results['teacher-32'][s][field]:.3f} "
                                             f"({margin(field, k, 'teacher-32', s)})", by_analytic)

    claims = []
    tie = 1e-9  # 0.9 x 0.650 is 0.5850000000000001 in floats: an accuracy of exactly 0.585 meets it

    claim("DMD 4-step: FID <= 1.5x the 32-step teacher's (held-in)", ("dmd-4", "teacher-32"),
          lambda: fid("dmd-4") <= 1.5 * fid("teacher-32"),
          lambda: f"{fid('dmd-4'):.1f} vs 1.5 x {fid('teacher-32'):.1f} = {1.5 * fid('teacher-32'):.1f}")
    for split in SPLITS:
        claim(f"DMD 4-step: judge accuracy >= 0.9x the 32-step teacher's ({split})", ("dmd-4", "teacher-32"),
              lambda s=split: acc("dmd-4", s) >= 0.9 * acc("teacher-32", s) - tie,
              lambda s=split: f"{acc('dmd-4', s):.3f} vs 0.9 x {acc('teacher-32', s):.3f} = {0.9 * acc('teacher-32', s):.3f} "
                              f"({margin('judge_accuracy', 'dmd-4', 'teacher-32', s, factor=0.9)})")
    claim("DMD 1-step far better than the teacher at 1 step (accuracy +0.1 and FID halved, held-in)",
          ("dmd-1", "teacher-1"),
          lambda: acc("dmd-1", "held-in") >= acc("teacher-1", "held-in") + 0.1 - tie and fid("dmd-1") <= 0.5 * fid("teacher-1"),
          lambda: f"accuracy {acc('dmd-1', 'held-in'):.3f} vs {acc('teacher-1', 'held-in'):.3f}; "
                  f"FID {fid('dmd-1'):.1f} vs {fid('teacher-1'):.1f}")
    dmdr_above_teacher("judge_accuracy", "judge accuracy")
    claim("DMDR 4-step: FID <= 1.5x the 32-step teacher's (held-in)", ("dmdr-4", "teacher-32"),
          lambda: fid("dmdr-4") <= 1.5 * fid("teacher-32"),
          lambda: f"{fid('dmdr-4'):.1f} vs {1.5 * fid('teacher-32'):.1f}")
    claim("RL-only 4-step: toy-align reward at least DMDR's (held-in)", ("rl-only-4", "dmdr-4"),
          lambda: reward("rl-only-4") >= reward("dmdr-4"),
          lambda: f"{reward('rl-only-4'):.3f} vs {reward('dmdr-4'):.3f}")
    claim("RL-only 4-step: reward hacking visible (judge accuracy 0.05 below DMDR's or FID 1.5x DMDR's, held-in)",
          ("rl-only-4", "dmdr-4"),
          lambda: reward_hacked(results["rl-only-4"]["held-in"], results["dmdr-4"]["held-in"]),
          lambda: f"accuracy {acc('rl-only-4', 'held-in'):.3f} vs {acc('dmdr-4', 'held-in'):.3f}; "
                  f"FID {fid('rl-only-4'):.1f} vs {fid('dmdr-4'):.1f}")
    # The judge-based claims a reward-aligned judge could pass for the wrong reason, checked again by the
    # analytic judge (no weights, so toy-align's gradient taught it nothing). Older reports lack the number.
    dmdr_above_teacher("analytic_accuracy", "analytic accuracy", by_analytic=True)
    claim("RL-only 4-step: analytic accuracy 0.05 below DMDR's (held-in)", ("rl-only-4", "dmdr-4"),
          lambda: analytic("rl-only-4", "held-in") <= analytic("dmdr-4", "held-in") - 0.05 + tie,
          lambda: f"{analytic('rl-only-4', 'held-in'):.3f} vs {analytic('dmdr-4', 'held-in'):.3f} "
                  f"({margin('analytic_accuracy', 'dmdr-4', 'rl-only-4', 'held-in', offset=0.05)})", by_analytic=True)
    return claims


# -- the table ----------------------------------------------------------------------------------
def hacking_sentence(results: dict[str, dict]) -> str | None:
    if "rl-only-4" not in results or "dmdr-4" not in results:
        return None
    rl, dmdr = results["rl-only-4"]["held-in"], results["dmdr-4"]["held-in"]
    shown = hacking_evidence(rl, dmdr)
    evidence = {(True, True): "the judge finds its images wrong more often and they are far from the renders",
                (False, True): "its images are far from the renders, though the judge's accuracy is within 0.05 of DMDR's",
                (True, False): "the judge finds its images wrong more often, though their FID is within 1.5x of DMDR's"}
    return (
        f"RL-only (the reward with no DMD term) reaches a toy-align reward of {rl['rewards']['toy-align']:.3f} against "
        f"DMDR's {dmdr['rewards']['toy-align']:.3f} (held-in prompts), while the judge (which no training sees) gives it "
        f"{rl['judge_accuracy']:.3f} accuracy (DMDR {dmdr['judge_accuracy']:.3f}) and its FID is {rl['fid'] / dmdr['fid']:.1f}x "
        f"DMDR's ({rl['fid']:.1f} against {dmdr['fid']:.1f}): "
        + (f"{evidence[shown]}. The reward is hacked, and the DMD term is what prevents it."
           if any(shown) else "on this run the gap is too small to call it reward hacking.")
        + (f" The analytic judge (no weights) gives it {rl['analytic_accuracy']:.3f} against DMDR's "
           f"{dmdr['analytic_accuracy']:.3f}." if "analytic_accuracy" in rl and "analytic_accuracy" in dmdr else "")
    )


def fid_floors(judge, num_images: int, seed: int) -> dict[str, float]:
    """Renders against renders, per split, at the table's own sample size and seed."""
    from .toy.check import render_fid_floor
    from .toy.grammar import SPLITS, PromptSplit

    return {split: round(render_fid_floor(judge, PromptSplit(split).sample(num_images, seed), seed), 1)
            for split in SPLITS}


def render_markdown(table: dict) -> str:
    results, meta = table["rows"], table["meta"]
    floor = meta.get("fid_floor")
    floor_text = (f"renders against renders give {floor['held-in']} held-in and {floor['held-out']} held-out at this "
                  f"sample size" if floor else "renders against renders give about 12 at 2000 images and 24 at 1000 "
                  "(the floor rises as the sample shrinks)")
    lines = [
        "# Toy-world results",
        "",
        f"Reproduce: `{meta['command']}` ({meta['num_images']} images per split and row, seed {meta['seed']}; "
        f"written {meta['date']}).{' ' + meta['note'] if meta.get('note') else ''} Judge accuracy is strict (every attribute and the object count right); FID uses "
        f"the judge's features against fresh renders of the same prompts (lower is better; {floor_text}); "
        "toy-align is the RL reward (the judge never trains anything, but it learned from the same renders and "
        "labels, and toy-align's gradient moves it: `python -m dmdr_rl.toy.check --transfer`). Analytic accuracy "
        "is a judge with no weights (shape, colour, position, size and layout read off the pixels; "
        "`dmdr_rl/toy/analytic.py`). Students train on held-in "
        "prompts only; held-out prompts contain colour-shape pairs no training prompt has. Teacher rows use CFG 4, "
        "students no guidance.",
        "",
        "| row | steps | judge acc. held-in | judge acc. held-out | analytic acc. held-in | analytic acc. held-out "
        "| FID held-in | FID held-out | toy-align held-in | toy-align held-out | train time | grid (held-in) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        train = r.get("training")
        train_time = f"{train['train_seconds'] / 60:.1f} min ({train['threads']} thr)" if train else "-"
        a, b = r["held-in"], r["held-out"]
        analytic = [f"{x['analytic_accuracy']:.3f}" if "analytic_accuracy" in x else "-" for x in (a, b)]  # older tables: -
        lines.append(
            f"| {r['label']} | {r['steps']} | {a['judge_accuracy']:.3f} | {b['judge_accuracy']:.3f} | {analytic[0]} "
            f"| {analytic[1]} | {a['fid']:.1f} | {b['fid']:.1f} | {a['rewards']['toy-align']:.3f} "
            f"| {b['rewards']['toy-align']:.3f} | {train_time} | [{key}]({a['grid']}) |"
        )
    sentence = hacking_sentence(results)
    if sentence:
        lines += ["", sentence]
    if table["claims"]:
        lines += ["", "## The paper's claims on the toy world (issue 3's targets)", "",
                  "| claim | measured | met |", "|---|---|---|"]
        lines += [f"| {c['claim']} | {c['measured']} | {'yes' if c['passed'] else '**no**'} |" for c in table["claims"]]
        lines += ["", "In brackets: the margin over the target, and that margin in standard errors of the two accuracies "
                  "(binomial, counted as unpaired; the rows share prompts and seeds, so this overstates the noise). "
                  "A pass within about 2 SE could go the other way on another draw of images."]
    lines += ["", "Per-category judge accuracies are in the JSON twin (`toy.json`)."]
    return "\n".join(lines) + "\n"


def write_table(out: Path, table: dict) -> None:
    """toy.json (the numbers) and toy.md (the table and the claims), each replaced whole."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_whole(out / "toy.json", table)
    write_text_whole(out / "toy.md", render_markdown(table))


def render_saved(out: Path) -> dict:
    """The saved numbers under today's claims and wording; the evaluation itself is not repeated."""
    source = out / "toy.json"
    if not source.exists():
        raise SystemExit(f"error: {source} does not exist: run the command without --render-only first")
    table = json.loads(source.read_text())
    for row in table["rows"].values():  # a number that was not finite is saved as null (strict JSON): NaN again
        for split in SPLITS:
            if split in row:
                row[split] = _nan_for_null(row[split])
    table["claims"] = check_claims(table["rows"])
    write_table(out, table)
    print(f"wrote {out / 'toy.md'} from {source}")
    return table


def _nan_for_null(value):
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {key: _nan_for_null(item) for key, item in value.items()}
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .cli import command_name, command_summary

    p = argparse.ArgumentParser(prog=command_name("dmdr_rl.results"), description=command_summary(__doc__))
    p.add_argument("--rows", default=",".join(ROWS_BY_KEY), help=f"comma-separated rows: {', '.join(ROWS_BY_KEY)} (default all)")
    p.add_argument("--num-images", type=int, default=1000, help="images per split and row (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed: the prompts and each image's seed (default 0)")
    p.add_argument("--runs", type=lambda text: Path(text).expanduser(), default=Path("runs/results"),
                   help="where the trainings live (reused when finished; default runs/results)")
    p.add_argument("--out", type=Path, default=Path("docs/results"),
                   help="where toy.md, toy.json and the grids go (default docs/results)")
    p.add_argument("--jobs", type=int, default=1, help="trainings at a time (default 1): the CPU threads are split "
                                                     "between them, each taking at most OMP_NUM_THREADS when it is set")
    p.add_argument("--retrain", action="store_true", help="delete the rows' runs under --runs and train them again")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite toy.md from the toy.json in --out: the claims checked again, nothing trained or evaluated")
    p.add_argument("overrides", nargs="*", help="config overrides for every training, e.g. trainer.max_steps=50")
    args = p.parse_intermixed_args(argv)  # options may come between the overrides
    unknown = [k for k in args.rows.split(",") if k not in ROWS_BY_KEY]
    if unknown:
        p.error(f"unknown row(s) {unknown}; allowed: {', '.join(ROWS_BY_KEY)}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.num_images < 2:
        p.error(f"--num-images must be >= 2 (FID needs a spread), got {args.num_images}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if args.render_only:  # it reads toy.json alone: what chooses trainings or evaluations would be ignored
        given = [flag for flag in ("rows", "num_images", "seed", "runs", "jobs", "retrain")
                 if getattr(args, flag) != p.get_default(flag)] + (["overrides"] if args.overrides else [])
        if given:
            p.error(f"--render-only rewrites toy.md from --out's toy.json, training and evaluating nothing: drop "
                    f"{', '.join('--' + g.replace('_', '-') if g != 'overrides' else 'the config overrides' for g in given)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    from .toy.weights import load_align, load_judge

    from .config import ConfigError

    args = parse_args(argv)
    if args.render_only:
        return render_saved(args.out)
    rows = [ROWS_BY_KEY[k] for k in dict.fromkeys(args.rows.split(","))]  # each once (a repeat would train twice)
    try:
        check_rows(rows, args.runs, args.overrides, args.retrain)
    except (ConfigError, RuntimeError) as err:
        raise SystemExit(f"error: {err}") from None
    if args.retrain:
        for row in rows:
            if row.preset is not None:
                shutil.rmtree(args.runs / row.key, ignore_errors=True)
    training = train_all(rows, args.runs, args.jobs, tuple(args.overrides))
    judge, align = load_judge(), load_align()
    results = {}
    for row in rows:
        results[row.key] = evaluate_row(row, args.runs, args.out, args.num_images, args.seed, judge, align)
        if row.key in training:
            results[row.key]["training"] = training[row.key]
    command = "python -m dmdr_rl.results " + " ".join(sys.argv[1:] if argv is None else argv)
    import torch

    table = {
        "meta": {"command": command.strip(), "num_images": args.num_images, "seed": args.seed,
                 "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                 "fid_floor": fid_floors(judge, args.num_images, args.seed)},
        "rows": results,
        "claims": check_claims(results),
    }
    write_table(args.out, table)
    print(f"\n{render_markdown(table)}\nwrote {args.out / 'toy.md'} and {args.out / 'toy.json'}")
    return table


if __name__ == "__main__":
    main()
