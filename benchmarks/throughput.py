"""Generator steps per second: the single-process trainer vs the Ray runtime, synchronous
(`ray.max_staleness=0`) and overlapped (`ray.max_staleness=1`), on the same machine.

    python benchmarks/throughput.py                        # toy-dmdr, 3 rounds of 30 generator steps each
    python benchmarks/throughput.py --rounds 2 --steps 20 --preset toy-dmd

Runs are interleaved (local, sync, async, local, ...) so that the machine's drift hits every mode
alike, and the report gives each mode's median steady-state rate (generator steps after the first
`--warmup`, timed from the metrics log) and its ratio to the local trainer measured in the same run.
Ray starts once, before the first round; its start-up is not counted. Thread budgets are equal: the
local trainer gets all of `--cpus`; the Ray runtime splits them between learner and rollout actor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_report  # noqa: E402
from dmdr_rl.config import load_config  # noqa: E402
from dmdr_rl.trainer import LocalTrainer  # noqa: E402

MODES = ("local", "ray-sync", "ray-async")


def steady_rate(metrics_file: Path, warmup: int) -> float:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    timed = [r for r in rows if r["step"] > warmup]
    if len(timed) < 2:
        raise ValueError(f"{metrics_file}: not enough generator steps after the warm-up of {warmup}")
    return (timed[-1]["step"] - timed[0]["step"]) / (timed[-1]["time"] - timed[0]["time"])


def run_mode(mode: str, args, out: Path) -> float:
    overrides = [f"trainer.max_steps={args.steps}", "output.log_every=1", "output.sample_every=100000",
                 f"output.checkpoint_every={args.steps}", f"output.dir={out}", *args.overrides]
    if mode == "local":
        torch.set_num_threads(args.cpus)
        LocalTrainer(load_config(args.preset, overrides)).train()
    else:
        from dmdr_rl.distributed import train_distributed

        half = max(1, args.cpus // 2)
        train_distributed(load_config(args.preset, [
            *overrides, "trainer.backend=ray", f"ray.max_staleness={0 if mode == 'ray-sync' else 1}",
            f"ray.learner_cpus={half}", f"ray.rollout_cpus={half}",
        ]))
    return steady_rate(out / "metrics.jsonl", args.warmup)


def main(argv: list[str] | None = None) -> dict:
    from dmdr_rl.cli import command_summary

    p = argparse.ArgumentParser(description=command_summary(__doc__))
    p.add_argument("--preset", default="toy-dmdr")
    p.add_argument("--steps", type=int, default=30, help="generator steps per run")
    p.add_argument("--warmup", type=int, default=5, help="generator steps left out of the rate")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    p.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = p.parse_args(argv)
    if args.steps <= args.warmup + 1:
        p.error("--steps must exceed --warmup + 1")

    import ray

    ray.init(num_cpus=args.cpus, log_to_driver=False)
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for mode in MODES:
                rate = run_mode(mode, args, Path(tmp) / f"{mode}-{round_index}")
                rates[mode].append(rate)
                print(f"round {round_index + 1}/{args.rounds} {mode}: {rate:.3f} generator steps/s", flush=True)
    ray.shutdown()
    medians = {m: statistics.median(v) for m, v in rates.items()}
    report = {
        "preset": args.preset, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "cpus": args.cpus,
        "overrides": args.overrides, "torch": torch.__version__, "seconds": round(time.time() - started, 1),
        "rates": rates, "median_steps_per_s": medians,
        "ratio_to_local": {m: medians[m] / medians["local"] for m in MODES},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(args.out, report)
    print("\n| mode | median generator steps/s | ratio to local |\n|---|---|---|")
    for m in MODES:
        print(f"| {m} | {medians[m]:.3f} | {report['ratio_to_local'][m]:.2f} |")
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
