"""Reproducible, resumable builds of the shipped toy-world weights.

    python -m dmdr_rl.toy.build teacher     # teacher transformer + text encoder (flow matching)
    python -m dmdr_rl.toy.build align       # the toy-align reward classifier
    python -m dmdr_rl.toy.build judge       # the held-out judge (other architecture, other seed)
    python -m dmdr_rl.toy.build all

Each build is seeded: batch i is rendered from seeds derived from (seed, i), so an interrupted
build resumes from its last checkpoint in --work-dir and continues the same sequence of batches.
Finished weights go to the package's weights directory (or --out) as config JSON + safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..store import readable_as_umask_allows
from .grammar import PromptSplit, prompts_of
from .weights import WEIGHTS_DIR, component_dir

if TYPE_CHECKING:  # (torch loads when a build runs: --help answers at once)
    import torch


@dataclass
class BuildConfig:
    steps: int
    batch_size: int
    lr: float
    seed: int
    warmup: int = 300
    final_lr_fraction: float = 0.1
    ema_decay: float = 0.0
    checkpoint_every: int = 500
    extra: dict = field(default_factory=dict)


# The recipes that produced the shipped weights.
RECIPES: dict[str, BuildConfig] = {
    "teacher": BuildConfig(
        steps=20000, batch_size=32, lr=5e-4, seed=1, ema_decay=0.999, extra={"cfg_dropout": 0.1, "split": "held-in", "variant": "p4w96"}
    ),
    "align": BuildConfig(steps=2500, batch_size=64, lr=2e-3, seed=2, extra={"augment": False, "arch": "align"}),
    "judge": BuildConfig(steps=3000, batch_size=64, lr=2e-3, seed=3, extra={"augment": True, "arch": "judge"}),
}


class ResumableRun:
    """Checkpointing for one build: modules, EMA copies, optimizer and the step counter."""

    def __init__(self, work_dir: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer):
        self.path = work_dir / "checkpoint.pt"
        self.modules = modules
        self.optimizer = optimizer
        self.step = 0

    def restore(self) -> bool:
        import torch

        if not self.path.exists():
            return False
        state = torch.load(self.path, weights_only=True, map_location="cpu")
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        return True

    def save(self) -> None:
        import torch

        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "modules": {name: m.state_dict() for name, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
        }
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


def learning_rate(step: int, cfg: BuildConfig) -> float:
    """Linear warm-up, then cosine decay to final_lr_fraction of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    name: str,
    cfg: BuildConfig,
    trainable: dict[str, torch.nn.Module],
    loss_fn: Callable[[int], tuple[torch.Tensor, dict[str, float]]],
    work_dir: Path,
    snapshot: bool = False,
) -> dict[str, torch.nn.Module]:
    """Run (or resume) the build loop; returns the modules to ship (EMA copies when ema_decay > 0).

    With snapshot=True nothing is trained: the last checkpoint is restored and returned as it is."""
    import torch
    from tqdm.auto import tqdm

    params = [p for m in trainable.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ema = {f"ema_{k}": _ema_copy(m) for k, m in trainable.items()} if cfg.ema_decay > 0 else {}
    run = ResumableRun(work_dir, {**trainable, **ema}, optimizer)
    if run.restore():
        print(f"[{name}] resumed from {run.path} at step {run.step}/{cfg.steps}")
    elif snapshot:
        raise FileNotFoundError(f"--snapshot needs a checkpoint, and {run.path} does not exist")
    if snapshot:
        return {k: ema[f"ema_{k}"] for k in trainable} if ema else trainable
    bar = tqdm(total=cfg.steps, initial=run.step, desc=f"build {name}", dynamic_ncols=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    log = (work_dir / "log.jsonl").open("a")
    started = time.time()
    while run.step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(run.step, cfg)
        loss, metrics = loss_fn(run.step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema:
            with torch.no_grad():
                for key, module in trainable.items():
                    for p_ema, p in zip(ema[f"ema_{key}"].parameters(), module.parameters()):
                        p_ema.lerp_(p, 1.0 - cfg.ema_decay)
        run.step += 1
        bar.update(1)
        if run.step % 50 == 0:
            bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()})
            log.write(json.dumps({"step": run.step, "elapsed_s": round(time.time() - started, 1), **metrics}) + "\n")
            log.flush()
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
            run.save()
    bar.close()
    log.close()
    return {k: ema[f"ema_{k}"] for k in trainable} if ema else trainable


def _ema_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).requires_grad_(False)


def _batch_seed(cfg: BuildConfig, step: int) -> int:
    return cfg.seed * 1_000_003 + step


def build_teacher(cfg: BuildConfig, work_dir: Path, out: Path, snapshot: bool = False) -> None:
    import torch

    from ..backbone import transformer_velocity
    from ..flow import add_noise, velocity_target
    from .render import render_batch
    from .teacher import create_teacher_transformer, images_to_model_space
    from .text import ToyTextEncoder

    transformer = create_teacher_transformer(cfg.seed, cfg.extra.get("variant", "p4w96"))
    text_encoder = ToyTextEncoder.create(cfg.seed)
    split = PromptSplit(cfg.extra["split"])

    def loss_fn(step: int):
        seed = _batch_seed(cfg, step)
        scenes = split.sample(cfg.batch_size, seed)
        x0 = images_to_model_space(render_batch(scenes, [seed * cfg.batch_size + j for j in range(len(scenes))]))
        gen = torch.Generator().manual_seed(seed)
        drop = torch.rand(len(scenes), generator=gen) < cfg.extra["cfg_dropout"]
        prompts = ["" if d else p for d, p in zip(drop.tolist(), prompts_of(scenes))]
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(len(scenes), generator=gen))  # logit-normal, as SD3
        cond = text_encoder(prompts)  # trained jointly with the transformer, then frozen
        v = transformer_velocity(transformer, add_noise(x0, eps, t), t, cond)
        loss = torch.mean((v - velocity_target(x0, eps)) ** 2)
        return loss, {"loss": loss.item()}

    shipped = train("teacher", cfg, {"transformer": transformer, "text_encoder": text_encoder}, loss_fn, work_dir, snapshot)
    shipped["transformer"].save_pretrained(component_dir("teacher", out))
    shipped["text_encoder"].save_pretrained(component_dir("text_encoder", out))
    _write_recipe(component_dir("teacher", out), "teacher", cfg)
    for component in ("teacher", "text_encoder"):
        readable_as_umask_allows(component_dir(component, out))


def build_classifier(target: str, cfg: BuildConfig, work_dir: Path, out: Path, snapshot: bool = False) -> None:
    import torch

    from .classifier import AttributeClassifier, attribute_loss, augment, scene_labels
    from .render import render_batch

    torch.manual_seed(cfg.seed)
    model = AttributeClassifier(arch=cfg.extra["arch"])
    # Classifiers see every prompt of both splits: they describe the world, not the training data.
    splits = [PromptSplit("held-in"), PromptSplit("held-out")]

    def loss_fn(step: int):
        seed = _batch_seed(cfg, step)
        scenes = splits[step % 2].sample(cfg.batch_size, seed)
        images = render_batch(scenes, [seed * cfg.batch_size + j for j in range(len(scenes))])
        if cfg.extra["augment"]:
            images = augment(images, torch.Generator().manual_seed(seed))
        loss, accuracy = attribute_loss(model(images), scene_labels(scenes))
        return loss, {"loss": loss.item(), "acc": accuracy}

    shipped = train(target, cfg, {"model": model}, loss_fn, work_dir, snapshot)
    shipped["model"].eval().save_pretrained(component_dir(target, out))
    _write_recipe(component_dir(target, out), target, cfg)
    readable_as_umask_allows(component_dir(target, out))


def _write_recipe(directory: Path, target: str, cfg: BuildConfig) -> None:
    recipe = {"target": target, "command": f"python -m dmdr_rl.toy.build {target}", **asdict(cfg)}
    (directory / "build_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    from ..cli import command_summary

    parser = argparse.ArgumentParser(prog="python -m dmdr_rl.toy.build", description=command_summary(__doc__))
    parser.add_argument("target", choices=[*RECIPES, "all"],
                        help="which model to train: the teacher, the toy-align reward, the judge, or all three in turn")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="checkpoints for resume (default runs/build/<target>; runs/build/smoke/<target> with --steps)")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR,
                        help="where finished weights are written (default: the shipped weights, dmdr_rl/toy/weights)")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count (smoke tests)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--variant", default=None, help="teacher architecture variant (see teacher.TEACHER_VARIANTS)")
    parser.add_argument("--snapshot", action="store_true", help="write weights from the last checkpoint without training")
    args = parser.parse_args(argv)
    if args.steps is not None and args.out.resolve() == Path(WEIGHTS_DIR).resolve():
        parser.error("--steps shortens the recipe, and --out is the shipped weights' directory (the default): pass "
                     "--out DIR so a smoke build does not overwrite them")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.variant is not None:
        from .teacher import TEACHER_VARIANTS

        if args.variant not in TEACHER_VARIANTS:
            parser.error(f"--variant {args.variant!r} is not a teacher variant: {', '.join(TEACHER_VARIANTS)}")
    if args.work_dir is None:  # a shortened build's checkpoints never become a full build's resume point
        args.work_dir = Path("runs/build/smoke") if args.steps is not None else Path("runs/build")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for target in RECIPES if args.target == "all" else [args.target]:
        cfg = RECIPES[target]
        if args.steps is not None:
            cfg = BuildConfig(**{**asdict(cfg), "steps": args.steps, "warmup": min(cfg.warmup, args.steps)})
        if args.variant is not None:
            cfg = BuildConfig(**{**asdict(cfg), "extra": {**cfg.extra, "variant": args.variant}})
        work_dir = args.work_dir / target
        try:
            if target == "teacher":
                build_teacher(cfg, work_dir, args.out, args.snapshot)
            else:
                build_classifier(target, cfg, work_dir, args.out, args.snapshot)
        except FileNotFoundError as err:  # --snapshot with no checkpoint to take it from
            parser.exit(2, f"error: {err}\n")
        print(f"[{target}] weights written to {component_dir(target, args.out)}")


if __name__ == "__main__":
    main()
