"""The main job: `python -m dmdr_rl.run [--preset NAME] [section.key=value ...]`.

It trains, then evaluates the student: `trainer.backend=local` with the single-process trainer,
`trainer.backend=ray` with the Ray runtime (rollout actors + a Ray Train learner), on the cluster it was
submitted to (`ray job submit -- python -m dmdr_rl.run ...`) or a local Ray. Without a preset it runs
the demo, `toy-demo`: a short DMDR run on the toy world on a local Ray.
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
import time
from importlib.util import find_spec
from pathlib import Path

from .config import available_presets, load_config, toy_evaluation_applies
from .errors import in_cause_chain

DEMO_PRESET = "toy-demo"


def demo_banner(cfg) -> str:
    """What the demo (the main job without a preset) is about to do, and where to go from it."""
    how = ("on a local Ray: rollout actors sample the {steps}-step student, a Ray Train learner updates it and the "
           "fake-score critic" if cfg.trainer.backend == "ray" else
           "in one process: the {steps}-step student sampled, then updated with the fake-score critic")
    return (f"dmdr_rl: no preset given: the demo (--preset {DEMO_PRESET}). DMDR on the toy world "
            f"{how.format(steps=cfg.student.steps)} for {cfg.trainer.max_steps} generator steps ({_stages(cfg)}); "
            f"then the student is evaluated on training (held-in) prompts by the judge, a classifier the "
            f"training never sees. A short run shows the system at work, not a finished student: `--preset toy-dmdr` "
            f"trains one (600 steps; add trainer.backend=ray for the Ray runtime), and `python -m dmdr_rl.eval "
            f"--steps 32,4,1` evaluates the teacher it is distilled from.")


def train(preset: str, overrides: list[str], num_images: int) -> None:
    from . import eval as toy_eval
    from .evaluation import evaluate
    from .trainer import LocalTrainer, find_run
    from .store import json_text, write_json_whole
    from .toy.weights import load_align, load_judge
    from .tracking import record_evaluation

    from .distributed import place_job_output, with_absolute_paths

    cfg = load_config(preset, overrides)
    placed = place_job_output(cfg)
    for field, before, after in (("output.dir", cfg.output_dir, placed.output_dir),
                                 ("ray.storage_path", cfg.ray.storage_path, placed.ray.storage_path)):
        if before != after:
            print(f"dmdr_rl: a submitted job's working directory is Ray's temporary copy of the code: {field}={before} "
                  f"goes under this node's home directory, {after} (pass an absolute {field} to choose)", flush=True)
    cfg = placed
    # actors, learner workers and reward replicas run in other directories; and the run's config.yaml holds
    # them absolute, so a resume compares like with like (_warnings)
    cfg = with_absolute_paths(cfg)
    for note in _warnings(cfg):
        print(f"warning: {note}", file=sys.stderr, flush=True)
    check_rewards(cfg, built_here_only=False)  # (as the dry run: before Ray, a reward app or a model starts)
    check_output_dir(cfg)
    if cfg.trainer.backend == "ray":
        from .distributed import train_distributed

        summary = train_distributed(cfg)
        sample_fn = None
    else:
        from .distributed import connect, serving_rewards

        where = connect(cfg) if any(spec.placement == "serve" for spec in cfg.rewards) else None
        with serving_rewards(cfg, own_cluster=where == "local"):  # (reward apps need a Ray even for a local run)
            trainer = LocalTrainer(cfg)
            started = time.time()
            summary = trainer.train()
        summary["train_seconds"] = round(time.time() - started, 1)
        sample_fn = trainer.sample
    out = cfg.output_dir
    if not toy_evaluation_applies(cfg):
        print(f"dmdr_rl: the toy evaluation (judge accuracy and FID of 32 px toy scenes) does not apply to this run "
              f"(data.prompts={cfg.data.prompts}, model.resolution={cfg.model.resolution}): skipped. Sample the student "
              f"with `python -m dmdr_rl.sample --run {out} --prompt TEXT`, or take an SD3 or Flux student to diffusers with "
              f"`python -m dmdr_rl.export --run {out} --format lora --out DIR`.")
        print(run_outputs(cfg, evaluated=False))
        print(json_text(summary, indent=None), end="")
        return
    if sample_fn is None:
        sample_fn, _ = toy_eval.load_student(out)
    report = evaluate(sample_fn, "held-in", num_images, 0, load_judge(), [load_align()],
                      grid_path=out / "eval" / "grid.png", samples_path=out / "eval" / "samples.parquet",
                      desc="evaluating the student")
    _, checkpoint = find_run(out)  # (the final one: what the local trainer ended with, or a Ray run sampled)
    settings = {"model": "student", **toy_eval.student_settings(cfg.student), "run": str(out.resolve()),
                "checkpoint": str(checkpoint.resolve())}  # as `eval --model student` reports
    write_json_whole(out / "eval" / "report.json", {**settings, **report})
    record_evaluation(cfg, out, report, summary["generator_steps"], out / "eval" / "grid.png")
    print(f"student ({cfg.student.steps} steps, {num_images} held-in prompts): judge accuracy "
          f"{report['judge_accuracy']:.3f}, analytic accuracy {report['analytic_accuracy']:.3f}, FID {report['fid']:.2f}, "
          f"diversity {report['diversity']:.3f}, toy-align {report['rewards']['toy-align']:.3f}")
    if "fid_note" in report:
        print(f"  note: {report['fid_note']}; compare FIDs at equal image counts")
    print(run_outputs(cfg, evaluated=True))
    print(json_text(summary, indent=None), end="")


def run_outputs(cfg, evaluated: bool) -> str:
    """Where the run went and what it wrote there (docs/training.md, "What a run writes")."""
    from .store import redact_url

    ray, wandb = cfg.trainer.backend == "ray", cfg.output.wandb
    records = ["metrics", "events", *(["ledger"] if ray else [])]  # the run store's: files, or Redis
    files = ["config.yaml", *([f"{name}.jsonl" for name in records] if cfg.store.url is None else []),
             *(["tensorboard/"] if find_spec("tensorboard") else []),  # (an optional extra)
             "checkpoints/", "samples/", *(["eval/report.json", "eval/grid.png", "eval/samples.parquet"] if evaluated else []),
             *((["ray_train/"] if cfg.ray.storage_path is None else []) + ["train_summary.json"] if ray else []),
             *([f"wandb/ (W&B project {wandb.project}" + (f", {wandb.mode}" if wandb.mode else "") + ")"] if wandb else [])]
    stored = f"\n  {', '.join(records)} in {redact_url(cfg.store.url)}" if cfg.store.url else ""
    elsewhere = f"\n  Ray Train's checkpoints in {cfg.ray.storage_path}" if ray and cfg.ray.storage_path else ""
    return f"Outputs: {cfg.output_dir.resolve()}\n  " + ", ".join(files) + stored + elsewhere


def _warnings(cfg) -> list[str]:
    """Settings that run, but probably not as meant: the config's own notes, its backbone's (a Flux student.shift
    far from its pipeline's at the resolution), and what a resumed run changes from the run it continues."""
    from .registry import backbone_notes

    notes = [*cfg.warnings(), *backbone_notes(cfg.model, cfg.student.shift)]
    if cfg.trainer.resume_from and Path(cfg.trainer.resume_from).exists():  # (a submitted job's may be elsewhere)
        from .trainer import resume_changes

        changes = resume_changes(cfg)
        if changes:
            notes.append(f"trainer.resume_from={cfg.trainer.resume_from}: this run changes settings of the run it "
                         f"continues ({'; '.join(changes[:6])}{'; ...' if len(changes) > 6 else ''}); its numbers "
                         "are not that run's")
    return notes


def _stages(cfg) -> str:
    """The generator steps' stages: cold start (DMD only) then DMD + rewards."""
    cold, steps = cfg.trainer.cold_start, cfg.trainer.max_steps
    if not any(spec.weight > 0 for spec in cfg.rewards):
        return "no reward term: DMD only"
    if cold >= steps:
        return f"all in the cold start of {cold}: no reward term"
    return f"{cold} cold start, then {steps - cold} with rewards" if cold else "rewards from the first"


def check_rewards(cfg, built_here_only: bool = True) -> None:
    """What each rewards[] entry can refuse without building its model: its name or import path, its kwargs
    against the factory's signature, a gradient ReFL needs. Not `built_here_only`: a module this process cannot
    import is left to the process that builds the model where that is another (a Ray rollout worker or
    learner, a Serve replica: their runtime_env may bring it), which says so itself."""
    from reward_servers.registry import REWARDS, check_reward

    from .config import PluginImportError

    for i, spec in enumerate(cfg.rewards):
        try:
            if spec.placement == "serve" and spec.serve.attach:  # the app's own kwargs decide its model
                REWARDS.resolve(spec.name, f"rewards.{i}.name")
            else:
                check_reward(spec.name, spec.kwargs, f"rewards.{i}", spec.weight, cfg.rl.policy_gradient)
        except PluginImportError:
            if built_here_only or (cfg.trainer.backend == "local" and spec.placement == "local"):
                raise


def check_output_dir(cfg) -> None:
    """output.dir must be a directory, or one this process can make: not a file, nor under one."""
    from .config import ConfigError

    path = cfg.output_dir.absolute()
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                where = "is" if place == path else f"is under {place}, which is"
                raise ConfigError(f"output.dir={cfg.output.dir} {where} a file, not a directory: choose another "
                                  "output.dir")
            return


def dry_run(preset: str, overrides: list[str]) -> str:
    """Everything that can be checked without a cluster or model weights: the config, that the backbone
    and every reward resolve (registry name or import path), and the prompt source when it is on this
    machine. Returns the plan as text."""
    from .distributed import check_placement, place_job_output, resources_needed, with_absolute_paths
    from .prompts import checked_prompt_source
    from .store import redact_url
    from .registry import check_model

    cfg = with_absolute_paths(place_job_output(load_config(preset, overrides)))  # as the run would have it
    if cfg.trainer.backend == "ray":
        check_placement(cfg)
    check_rewards(cfg)
    check_output_dir(cfg)
    prompts = cfg.data.prompts
    if cfg.trainer.backend == "local":  # what the run would refuse at start on this machine
        from .registry import resolve_device

        resolve_device(cfg.trainer.device)
    # the checkpoint to resume, and that it leaves steps to train (a Ray job's may be on another machine)
    if cfg.trainer.resume_from and (cfg.trainer.backend == "local" or Path(cfg.trainer.resume_from).exists()):
        from .trainer import check_steps_left, checkpoint_generator_step, resume_checkpoint

        check_steps_left(cfg, checkpoint_generator_step(resume_checkpoint(cfg.trainer.resume_from)))
    # a local run reads its prompt file here; a Ray job's driver may run on another machine (ray job submit)
    if prompts.startswith("toy:") or Path(prompts).exists() or cfg.trainer.backend == "local":
        source = checked_prompt_source(cfg)
        prompt_note = "checked"
        if source.prompts is not None:
            skipped = (f", {source.skipped} row{'s' if source.skipped != 1 else ''} without a prompt left out"
                       if source.skipped else "")
            prompt_note = f"{len(source.prompts):,} prompt{'s' if len(source.prompts) != 1 else ''}{skipped}; checked"
    else:
        check_model(cfg.model, precision=cfg.trainer.precision)
        prompt_note = "not on this machine: checked when the run starts"
    lora_targets = {f"{section}.lora.targets": lora.targets for section, lora in (("student", cfg.student.lora),
                    ("critic", cfg.critic.lora)) if lora is not None and lora.targets}
    if lora_targets:  # against the model's config (no weights), where it is on this machine
        check_model(cfg.model, lora_targets=lora_targets, precision=cfg.trainer.precision)
    cpus, gpus = resources_needed(cfg)
    rewards = ", ".join(f"{s.name} ({s.placement}{', app ' + s.app_name if s.placement == 'serve' else ''}, "
                        f"weight {s.weight:g}{_relative_note(s)})" for s in cfg.rewards) or "none"
    rl_batch = cfg.trainer.rollout_batch_size(cfg.trainer.cold_start)
    return "\n".join([
        f"dry run of {cfg.name!r}: the config is valid; nothing was started",
        f"  backend {cfg.trainer.backend}: {cfg.ray.learner_workers} learner worker(s), {cfg.ray.rollout_actors} "
        f"rollout actor(s), {cpus:g} CPU(s) and {gpus:g} GPU(s) requested" if cfg.trainer.backend == "ray" else
        f"  backend local (one process){f', reward apps need {cpus:g} CPU(s) / {gpus:g} GPU(s)' if cpus or gpus else ''}",
        f"  model {cfg.model.backbone} ({cfg.model.path or 'default weights'}), {cfg.model.resolution} px, "
        f"{cfg.student.steps}-step student, {cfg.trainer.max_steps} generator steps ({_stages(cfg)})",
        f"  generator {_generator_plan(cfg)}; batch {cfg.trainer.batch_size}"
        + (f" (then {cfg.trainer.batch_size_rl} after the cold start)"
           if cfg.trainer.batch_size_rl not in (None, cfg.trainer.batch_size)
           and cfg.trainer.cold_start < cfg.trainer.max_steps else "")
        + (f" in micro-batches of {cfg.trainer.micro_batch_size}" if cfg.trainer.micro_batch_size else "")
        + (", gradient checkpointing" if cfg.model.gradient_checkpointing else "")
        + (f", compiled blocks ({cfg.model.compile_mode}; the first steps compile)" if cfg.model.compile else "")
        + f", {cfg.trainer.precision}, {cfg.trainer.optimizer}",
        f"  rewards: {rewards}" + (f"; trained by policy gradient (GRPO): {rl_batch // cfg.rl.group_size} "
                                   f"prompts x {cfg.rl.group_size} samples per batch, "
                                   f"{'every sampler transition' if cfg.rl.transitions == 'all' else 'one transition a sample'}, "
                                   f"policy weight {cfg.rl.policy_weight:g}, scored by the rollouts"
                                   if cfg.rl.policy_gradient else ""),
        f"  prompts: {prompts} ({prompt_note})",
        f"  outputs: {cfg.output_dir}; store: {redact_url(cfg.store.url) or 'files in the run directory'}",
        *(f"  warning: {note}" for note in [*_warnings(cfg), *_missing_packages(cfg), *_local_gpu_note(cfg, gpus)]),
    ])


def _relative_note(spec) -> str:
    relative = spec.relative
    if relative is None:
        return ""
    return (f", relative to {len(relative.positive)} positive and {len(relative.negative)} negative style readings, "
            f"k {relative.k:g}")


def _local_gpu_note(cfg, gpus: float) -> list[str]:
    """A Ray run that would start its own Ray here (no ray.address, RAY_ADDRESS or submitted job) and asks for more
    GPUs than this machine has: the run would refuse it only once Ray has started."""
    import os

    from .distributed import submitted_job_runtime_env

    if (cfg.trainer.backend != "ray" or not gpus or cfg.ray.address or os.environ.get("RAY_ADDRESS")
            or submitted_job_runtime_env() is not None):
        return []
    import torch

    here = torch.cuda.device_count()
    if here >= gpus:
        return []
    return [f"the run asks for {gpus:g} GPU(s) and this machine has {here}: a Ray the run starts here cannot place them "
            "(a `ray start` cluster it joins may have more): set ray.address to your cluster or submit with `ray job "
            "submit`, or lower ray.learner_gpus, ray.rollout_gpus and the reward apps' rewards[].serve.num_gpus"]


def show_config(preset: str, overrides: list[str]) -> str:
    """The run's whole config as YAML (what its config.yaml will hold): a starting point for a config file."""
    import yaml

    from .trainer import run_config_dump

    return yaml.safe_dump(run_config_dump(load_config(preset, overrides)), sort_keys=False)


def _generator_plan(cfg) -> str:
    lora = cfg.student.lora
    kind = f"LoRA r{lora.rank}" if lora is not None else "full fine-tune"
    return kind + (f", dmd.weight={cfg.dmd.weight:g}" if cfg.dmd.weight != 1 else "")


def _missing_packages(cfg) -> list[str]:
    """Optional packages the config needs that this machine lacks (the cluster's machines may have them)."""
    from .tracking import wandb_missing

    missing = [wandb_missing(cfg)]
    if cfg.trainer.optimizer == "adamw8bit" and find_spec("bitsandbytes") is None:
        missing.append("trainer.optimizer=adamw8bit needs bitsandbytes, which is not installed here: install it where "
                       "the learner runs (`pip install bitsandbytes`, CUDA machines), or set trainer.optimizer=adamw")
    return [note for note in missing if note is not None]


def continue_hint(preset: str, overrides: list[str], since: float) -> str:
    """Where a stopped run goes on from (" (...)"; empty when its config never loaded): see how_to_continue."""
    import contextlib
    import io

    from .distributed import place_job_output
    from .trainer import how_to_continue

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # (where a submitted job's output went: said at its start)
            cfg = place_job_output(load_config(preset, overrides))
        return f" ({how_to_continue(cfg, cfg.output_dir.absolute(), since)})"
    except Exception:  # noqa: BLE001 - a config that never loaded: nothing to suggest
        return ""


def _stop(signum, frame) -> None:
    """SIGTERM as Ctrl-C: the run's events end with "stopped" and the store flushes what it holds, where the
    default would end the process on the spot, the run then shown as running forever."""
    raise KeyboardInterrupt


def raised_by_a_stop(err: BaseException) -> bool:
    """Whether `err` was raised because of Ctrl-C or SIGTERM: Python wraps one that arrives in a class body's
    `__set_name__` (a library being imported as the run starts) in a RuntimeError."""
    return in_cause_chain(err, lambda seen: isinstance(seen, KeyboardInterrupt))


def main(argv: list[str] | None = None) -> None:
    from .cli import command_name, command_summary

    parser = argparse.ArgumentParser(prog=command_name("dmdr_rl.run"), description=command_summary(__doc__))
    parser.add_argument("--preset", default=None,
                        help=f"run preset or YAML file (without it: the demo, {DEMO_PRESET}, a short DMDR run on the "
                             f"toy world on a local Ray); presets: {', '.join(available_presets())}")
    parser.add_argument("--num-images", type=int, default=256,
                        help="images per evaluated setting (default 256; the README's numbers use 1000)")
    instead = parser.add_mutually_exclusive_group()
    instead.add_argument("--dry-run", action="store_true",
                         help="validate the config and its plugins, print the plan, and start nothing")
    instead.add_argument("--show-config", action="store_true",
                         help="print the whole config (preset, base files, overrides and every default) as YAML, which "
                              "--preset takes back (a store password left out), and start nothing (each field: "
                              "docs/config.md)")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_intermixed_args(argv)  # options may come between the overrides
    if args.num_images < 2:
        parser.error(f"--num-images must be >= 2 (FID needs a spread), got {args.num_images}")
    named = [word for word in args.overrides if "=" not in word and (word in available_presets()
                                                                    or word.endswith((".yaml", ".yml")))]
    if args.preset is None and named:  # (any other word without = is refused by the config, naming it)
        parser.error(f"{named[0]!r} is a preset or a config file: --preset {named[0]}")
    from .cli import fixable_errors

    launched = time.time() - 1.0  # (what this launch writes is newer: a file system's coarse mtimes)
    previous = signal.signal(signal.SIGTERM, _stop)  # kill, `ray job stop`, Kubernetes: end the run as Ctrl-C does
    try:
        if args.show_config:
            print(show_config(args.preset or DEMO_PRESET, args.overrides), end="")
        elif args.dry_run:
            print(dry_run(args.preset or DEMO_PRESET, args.overrides))
        else:
            if args.preset is None:
                print(textwrap.fill(demo_banner(load_config(DEMO_PRESET, args.overrides)), width=110), flush=True)
            train(args.preset or DEMO_PRESET, args.overrides, args.num_images)
    except fixable_errors() as err:
        parser.exit(2, f"error: {err}\n")
    except (KeyboardInterrupt, Exception) as err:  # a stop: the run's events say "stopped", its store has flushed
        if not raised_by_a_stop(err):  # (also one Python wrapped in another error)
            raise
        parser.exit(130, f"dmdr_rl: stopped{continue_hint(args.preset or DEMO_PRESET, args.overrides, launched)}\n")
    finally:
        signal.signal(signal.SIGTERM, previous)  # a caller's own handler (main() called in-process) comes back


if __name__ == "__main__":
    main(sys.argv[1:])
