"""Follow a live run from another terminal: `python -m dmdr_rl.watch RUN`.

    python -m dmdr_rl.watch runs/toy-dmdr                                   # a run directory (files or its store.url)
    python -m dmdr_rl.watch toy-dmdr --store redis://127.0.0.1:6380/0       # a run by name in a Redis store
    python -m dmdr_rl.watch runs/toy-dmdr --once                            # print one snapshot and exit
    python -m dmdr_rl.watch runs/toy-dmdr --follow                          # go on watching when it stops (a resume)

Shows the last logged generator step (metrics come every output.log_every steps), throughput, losses,
rewards, staleness, the step-time split, the newest evaluation during training (output.eval_every) and
the newest sample grid (and, once a run has finished, the closing evaluation `python -m dmdr_rl.run` made),
every `--interval` seconds until the run stops, fails or reaches its last step: redrawn in place in a
terminal, appended when it says something new into a file or a pipe; with `--follow`, until Ctrl-C, so a
run launched again into the same directory or store name (trainer.resume_from) shows once it has started.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

from .config import ConfigError, load_config
from .store import RunLock, StoreError, open_store

SHOWN_PREFIXES = ("loss/", "reward/", "rollout/", "rl/", "time/", "schedule/lr")


def locate(run: str, store_url: str | None):
    """(store, run directory or None, max_steps or None) for a run directory or a run name in a store."""
    path = Path(run)
    if (path / "config.yaml").exists():
        cfg = load_config(path / "config.yaml", for_sampling=True)  # read only: today's training rules do not apply
        return open_store(store_url or cfg.store.url, path, cfg.name), path, cfg.trainer.max_steps
    if store_url is None:
        raise StoreError(f"{run} is not a run directory (no config.yaml in it); give a run directory, or a run name "
                         "with --store redis://HOST:PORT/DB")
    store = open_store(store_url, Path("."), run)
    if not store.existing_streams():  # a URL always opens a RedisStore (a run that failed early has events only)
        known = ", ".join(store.runs()) or "none"
        raise StoreError(f"no run named {run!r} in {store.location}; runs there: {known}")
    return store, None, None


class Snapshot(NamedTuple):
    text: str
    ended: bool  # stopped, failed, killed, or at its last step: nothing more will come unless it is launched again
    state: str  # running, not running (killed), stopped, failed, finished or unknown


def snapshot(store, run_dir: Path | None, max_steps: int | None) -> Snapshot:
    """The status text, whether the run has ended, and its state. `max_steps`: the config's; a launch's `started`
    event says its own (a resume may raise it)."""
    # a run killed (SIGKILL, out of memory) wrote no final event; its directory's lock tells it from a live one
    # (asked before the events are read: a run that ends in between has written its final event by then)
    unlocked = run_dir is not None and RunLock.held(run_dir) is False
    rows = store.read("metrics")
    events = store.read("events")
    state = events[-1]["event"] if events else "unknown"
    killed = state == "started" and unlocked
    shown_state = "not running" if killed else "running" if state == "started" else state
    ended = killed or state in ("finished", "failed", "stopped")
    max_steps = next((e["max_steps"] for e in reversed(events) if e["event"] == "started" and e.get("max_steps")),
                     max_steps)
    notes = []
    if killed:
        notes.append("  its process ended without a final event (killed?)")
    if state == "failed":
        notes.append(f"  error: {events[-1].get('error', '')}")
    # an end event says where the run ended (metrics come every output.log_every steps only); a start event's
    # step is where it began
    reached = events[-1].get("generator_step") if state in ("stopped", "failed", "finished") else None
    if not rows:
        status = ("waiting for the first generator step ..." if not ended else "no generator step recorded" if not reached
                  else f"at generator step {reached}, before its first metrics record (every output.log_every steps)")
        return Snapshot("\n".join([f"{shown_state}: {status}", *notes]), ended, shown_state)
    last = rows[-1]
    # since the last restart: a restarted learner writes again the steps after its checkpoint, and a run
    # launched again (a `started` event) would otherwise count its downtime
    restart = max((i for i in range(1, len(rows)) if rows[i]["step"] <= rows[i - 1]["step"]), default=0)
    launched = max((e["time"] for e in events if e["event"] == "started"), default=None)
    if launched is not None:
        restart = max(restart, next((i for i, row in enumerate(rows) if row["time"] >= launched), len(rows) - 1))
    recent = rows[restart:][-10:]
    rate = (f"{(recent[-1]['step'] - recent[0]['step']) / (recent[-1]['time'] - recent[0]['time']):.3f} steps/s"
            if len(recent) > 1 and recent[-1]["time"] > recent[0]["time"] else
            "- steps/s" if ended else "- steps/s (too few records yet)")
    total = f"/{max_steps}" if max_steps else ""
    ended_at = f" ({state} at step {reached})" if reached is not None and reached != last["step"] else ""
    lines = [f"[{shown_state}] last logged at generator step {last['step']}{total}{ended_at}   {rate}   "
             f"last update {time.time() - last['time']:.0f} s ago   ({store.location})"]
    for prefix in SHOWN_PREFIXES:
        values = {k: v for k, v in last.items() if k.startswith(prefix) and isinstance(v, (int, float))}
        if values:
            lines.append("  " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
    evaluated = next((row for row in reversed(rows[restart:]) if any(k.startswith("val/") for k in row)), None)
    if evaluated is not None:  # (every output.eval_every steps: not in most rows)
        values = {k: v for k, v in evaluated.items() if k.startswith("val/") and "_by_" not in k}
        lines.append(f"  evaluated at step {evaluated['step']}: "
                     + "  ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
    if run_dir is not None:
        grids = sorted((run_dir / "samples").glob("*.png")) if (run_dir / "samples").is_dir() else []
        if grids:
            lines.append(f"  newest samples: {grids[-1]}")
        if state == "finished" and launched is not None:
            lines.extend(_closing_evaluation(run_dir, launched))
    lines.extend(notes)
    return Snapshot("\n".join(lines), ended or (bool(max_steps) and last["step"] >= max_steps), shown_state)


def _closing_evaluation(run_dir: Path, launched: float) -> list[str]:
    """The line for the evaluation `python -m dmdr_rl.run` makes once training has finished (eval/report.json, on
    the toy world), when this launch wrote one (a resume keeps the previous launch's until then)."""
    import json

    from .tracking import evaluation_scalars

    report_path = run_dir / "eval" / "report.json"
    try:
        if report_path.stat().st_mtime < launched:
            return []
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):  # none (yet, or at all: the toy evaluation applies to toy prompts only)
        return []
    values = {k.removeprefix("eval/"): v for k, v in evaluation_scalars(report).items()
              if "_by_" not in k and k != "eval/num_images"}
    images = f" ({report['num_images']} images)" if "num_images" in report else ""
    return [f"  closing evaluation{images}: " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))]


def main(argv: list[str] | None = None) -> None:
    from .cli import command_name, command_summary

    parser = argparse.ArgumentParser(prog=command_name("dmdr_rl.watch"), description=command_summary(__doc__))
    parser.add_argument("run", help="a run directory, or a run name with --store")
    parser.add_argument("--store", default=None, help="a Redis URL (default: the run's store.url, else its files)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (>= 0.1; default 2)")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--follow", action="store_true",
                        help="go on watching after the run stops, fails or finishes, until Ctrl-C: a run launched again "
                             "into the same directory or store name (trainer.resume_from) shows once it has started")
    args = parser.parse_args(argv)
    if not args.interval >= 0.1:  # (NaN too)
        parser.error(f"--interval must be >= 0.1 seconds, got {args.interval:g}")
    try:
        store, run_dir, max_steps = locate(args.run, args.store)
    except (StoreError, ConfigError) as err:
        parser.exit(2, f"error: {err}\n")
    if args.once:
        try:
            print(snapshot(store, run_dir, max_steps)[0], flush=True)
        except StoreError as err:
            parser.exit(2, f"error: {err}\n")
        return
    try:
        with _display() as show:
            while True:
                try:
                    shown = snapshot(store, run_dir, max_steps)
                except StoreError as err:  # a damaged record (a full disk, a write cut short): say so, keep watching
                    shown = Snapshot(f"cannot read the run's records: {err}", False, "unknown")
                if shown.ended and args.follow:
                    shown = shown._replace(text=f"{shown.text}\n  (--follow: waiting for it to be launched again; "
                                                "Ctrl-C to quit)")
                show(shown.text)
                if shown.ended and not args.follow:
                    break
                time.sleep(args.interval)
    except KeyboardInterrupt:  # Ctrl-C ends watching; the run goes on
        return
    except BrokenPipeError:  # `watch DIR | head`: the reader has gone, and so does watch (quietly, at exit too)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if shown.state in ("stopped", "failed", "not running"):
        print(ENDED_HINT.format(state=shown.state), flush=True)


@contextlib.contextmanager
def _display():
    """show(text): in a terminal, the snapshot redrawn in place; into a file or a pipe (a log), each snapshot that
    says something new appended whole, its lines unwrapped (a terminal's redrawing wrapped them at 80 columns)."""
    if sys.stdout.isatty():
        from rich.live import Live
        from rich.text import Text

        with Live(Text("..."), refresh_per_second=4) as live:
            yield lambda text: live.update(Text(text))
        return
    printed = [None]

    def append(text: str) -> None:
        news = re.sub(r"last update -?\d+ s ago", "", text)  # (a new number each refresh, nothing new)
        if news != printed[0]:
            print(text, flush=True)
            printed[0] = news

    yield append


# (a run just launched again, a resume, has not written its `started` event yet: it shows only once it has)
ENDED_HINT = ("watch: the run is {state}, so watching ends here. A run you have just launched again (trainer.resume_from, "
              "into this directory or store name) shows once it has started: run watch again then, or add --follow to "
              "keep watching across launches until Ctrl-C")


if __name__ == "__main__":
    main(sys.argv[1:])
