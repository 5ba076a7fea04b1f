"""Does the policy gradient (rl.mode=grpo) move a reward the way it is asked to? The same student is trained
by the policy term alone (no DMD) twice from one checkpoint, once to maximise toy-align and once to minimise
it, then both (and the start) sample the same prompts with the same seeds, so the differences are paired.

    python benchmarks/grpo_direction.py --start runs/grpo/dmd-sde/checkpoints/step_000300
    python benchmarks/grpo_direction.py --start DIR --steps 100 --lr 1e-4 --images 256

The two runs share every random draw (prompts, rollout noise, transitions): only the reward's sign differs,
so "maximise - minimise" isolates what the policy gradient does; "maximise - start" also holds the drift of
noisy updates with nothing (no DMD term) to hold the student on the teacher's manifold.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_report  # noqa: E402
from dmdr_rl import dmdr  # noqa: E402
from dmdr_rl.config import RewardSpec, load_config  # noqa: E402
from dmdr_rl.prompts import PromptSource  # noqa: E402
from dmdr_rl.seeds import image_seeds  # noqa: E402
from dmdr_rl.trainer import LocalTrainer, student_images  # noqa: E402
from reward_servers import load_reward_model  # noqa: E402


class Signed:
    """A reward times a sign, scored without gradients (the policy gradient needs none)."""

    differentiable = False

    def __init__(self, model, sign: float):
        self.model, self.sign, self.name = model, sign, f"{'+' if sign > 0 else '-'}{model.name}"

    def score(self, images, prompts):
        with torch.no_grad():
            return self.sign * self.model.score(images, prompts)


def train(start: Path, sign: float, align, args, out: Path) -> LocalTrainer:
    cfg = load_config("toy-dmdr-grpo", ["trainer.device=cpu", f"output.dir={out}", "dmd.weight=0", "trainer.cold_start=0",
                                        "dmd.ratio=1", f"trainer.lr_generator={args.lr}", f"trainer.seed={args.seed}",
                                        f"rl.transitions={args.transitions}",
                                        "rl.policy_weight=1"])  # as recorded (AdamW barely sees the scale)
    reward = dmdr.WeightedReward(Signed(align, sign), RewardSpec(name="toy-align", shaping="linear"))
    trainer = LocalTrainer(cfg, rewards=[reward])
    trainer.learner.load_adapter_state(dmdr.GENERATOR, _generator_state(start))
    for _ in tqdm(range(args.steps), desc=f"policy gradient, sign {sign:+.0f}", leave=False):
        trainer.train_iteration()
    return trainer


def _generator_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "generator.safetensors"))


def scores(trainer: LocalTrainer, align, prompts: list[str], seeds: list[int], batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([align.score(student_images(trainer.backbone, trainer.backbone.encode(prompts[i:i + batch]),
                                                     trainer.cfg.student, seeds[i:i + batch]), prompts[i:i + batch])
                          for i in range(0, len(prompts), batch)])


def main(argv: list[str] | None = None) -> dict:
    from dmdr_rl.cli import command_summary

    p = argparse.ArgumentParser(description=command_summary(__doc__))
    p.add_argument("--start", type=Path, required=True, help="a checkpoint directory (checkpoints/step_N) of an SDE student")
    p.add_argument("--steps", type=int, default=200, help="generator updates per direction")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--images", type=int, default=512, help="held-in prompts scored, one seed each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transitions", default="one", choices=("one", "all"), help="rl.transitions (the recorded run: one)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    prompts = PromptSource("toy:held-in", 123).batch(0, args.images)
    seeds = image_seeds(7, args.images)
    align, measured = load_reward_model("toy-align"), {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sign in (("maximise", 1.0), ("minimise", -1.0)):
            trainer = train(args.start, sign, align, args, Path(tmp) / name)
            measured[name] = scores(trainer, align, prompts, seeds)
        trainer.learner.load_adapter_state(dmdr.GENERATOR, _generator_state(args.start))
        measured["start"] = scores(trainer, align, prompts, seeds)

    def paired(a: str, b: str) -> dict:
        diff = measured[a] - measured[b]
        return {"mean": float(diff.mean()), "standard_error": float(diff.std() / len(diff) ** 0.5)}

    report = {"settings": {k: str(v) for k, v in vars(args).items()},
              "toy_align_mean": {k: float(v.mean()) for k, v in measured.items()},
              "maximise_minus_minimise": paired("maximise", "minimise"),
              "maximise_minus_start": paired("maximise", "start"), "minimise_minus_start": paired("minimise", "start")}
    for key in ("maximise_minus_minimise", "maximise_minus_start", "minimise_minus_start"):
        print(f"{key.replace('_', ' ')}: {report[key]['mean']:+.4f} +- {report[key]['standard_error']:.4f} "
              f"(toy-align, paired over {args.images} images)")
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
