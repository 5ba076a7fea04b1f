"""The analytic judge: right on fresh renders, wrong on wrong prompts, and deaf to small perturbations."""

import random

import pytest
import torch

from dmdr_rl.evaluation import fresh_renders
from dmdr_rl.toy.analytic import analytic_accuracy, analytic_verdict, objects_in
from dmdr_rl.toy.grammar import PromptSplit
from dmdr_rl.toy.metrics import mismatch
from dmdr_rl.toy.scene import SingleScene, ToyObject


def test_fresh_renders_of_both_splits_are_read_right():
    for split in ("held-in", "held-out"):
        scenes = PromptSplit(split).sample(300, seed=5)
        accuracy, by_attribute = analytic_accuracy(fresh_renders(scenes, 5), scenes)
        assert accuracy >= 0.99 and min(by_attribute.values()) >= 0.99, (split, by_attribute)


def test_a_changed_colour_position_or_size_is_caught():
    scenes = [s for s in PromptSplit("held-in").sample(200, seed=6)]
    images = fresh_renders(scenes, 6)
    rng = random.Random(0)
    wrong = []
    for scene in scenes:  # one attribute changed (shape, colour, size, position, an object, the relation)
        wrong.append(mismatch(scene, rng, hard=True))
    accuracy, _ = analytic_accuracy(images, wrong)
    assert accuracy <= 0.03


def test_small_perturbations_do_not_change_a_verdict():
    scenes = PromptSplit("held-out").sample(100, seed=7)
    images = fresh_renders(scenes, 7)
    signs = torch.randint(0, 2, images.shape, generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    pushed = (images + 4 / 255 * signs).clamp(0, 1)
    for image, moved, scene in zip(images.numpy(), pushed.numpy(), scenes):
        assert analytic_verdict(image, scene) == analytic_verdict(moved, scene)


def test_an_empty_canvas_has_no_objects_and_fails_every_attribute():
    grey = torch.full((3, 32, 32), 0.25).numpy()
    assert objects_in(grey) == []
    verdict = analytic_verdict(grey, SingleScene(ToyObject("circle", "red"), "small", "center"))
    assert verdict == {"single/count": False, "single/shape": False, "single/colour": False, "single/position": False,
                       "single/size": False, "correct": False}


def test_saved_samples_are_scored_after_the_fact(tmp_path, capsys):
    from dmdr_rl.samples import write_samples
    from dmdr_rl.toy.analytic import main, score_samples
    from dmdr_rl.toy.grammar import prompts_of

    scenes = PromptSplit("held-in").sample(40, seed=9)
    write_samples(tmp_path / "samples.parquet", fresh_renders(scenes, 9), prompts_of(scenes), list(range(40)), step=-1,
                  weight_version=-1)
    (report,) = score_samples(tmp_path / "samples.parquet")
    assert report["num_images"] == 40 and report["analytic_accuracy"] >= 0.95  # 8-bit PNGs, as stored
    # a run's samples/ directory: grids of several steps and rollouts are reported apart, not pooled
    run = tmp_path / "samples"
    write_samples(run / "step_000000.parquet", torch.full((8, 3, 32, 32), 0.5), prompts_of(scenes[:8]), list(range(8)),
                  step=0, weight_version=0, source="grid")
    write_samples(run / "step_000100.parquet", fresh_renders(scenes[:8], 9), prompts_of(scenes[:8]), list(range(8)),
                  step=100, weight_version=100, source="grid")
    write_samples(run / "rollout_step_000100.parquet", fresh_renders(scenes[8:14], 9), prompts_of(scenes[8:14]),
                  list(range(6)), step=100, weight_version=99, source="rollout")
    reports = {(r["source"], r["step"]): r for r in score_samples(run)}
    assert sorted(reports) == [("grid", 0), ("grid", 100), ("rollout", 100)]
    assert reports[("grid", 0)]["analytic_accuracy"] == 0.0 and reports[("grid", 100)]["analytic_accuracy"] >= 0.95
    assert reports[("rollout", 100)]["num_images"] == 6
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing-here")])
    assert "error: no samples in" in capsys.readouterr().err
