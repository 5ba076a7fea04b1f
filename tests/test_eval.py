import json
import math
import re

import pytest
import torch
import yaml

from dmdr_rl import eval as toy_eval
from dmdr_rl import run
from dmdr_rl.config import load_config
from dmdr_rl.samples import read_samples
from dmdr_rl.trainer import find_run

REPORT_KEYS = {"judge_accuracy", "judge_accuracy_by_category", "fid", "rewards", "num_images", "steps", "cfg", "split"}


def test_eval_sweep_writes_a_report_and_grid_per_setting(tmp_path, capsys, teacher):
    """Each setting is sampled at its own cfg: the same prompts and seeds give other images at cfg 2.5 than at
    cfg 1, and a row of either comes back from its seed at its setting's cfg (not the sweep's last one)."""
    from dmdr_rl.samples import decode_png

    toy_eval.main(["--steps", "2", "--cfg", "1,2.5", "--num-images", "8", "--batch-size", "4", "--out", str(tmp_path)])
    rows = {cfg: read_samples(tmp_path / f"teacher-steps2-cfg{cfg}-held-in" / "samples.parquet").to_pandas()
            for cfg in ("1", "2.5")}
    assert list(rows["1"]["prompt"]) == list(rows["2.5"]["prompt"]) and list(rows["1"]["seed"]) == list(rows["2.5"]["seed"])
    unguided, guided = (torch.stack([decode_png(png) for png in rows[cfg]["png"]]) for cfg in ("1", "2.5"))
    assert (unguided - guided).abs().mean() > 0.01
    for cfg, i in (("1", 5), ("2.5", 2)):
        again = teacher.sample([rows[cfg]["prompt"][i]], steps=2, cfg=float(cfg), seed=[int(rows[cfg]["seed"][i])])[0]
        torch.testing.assert_close(decode_png(rows[cfg]["png"][i]), (again.clamp(0, 1) * 255).round() / 255,
                                   rtol=0, atol=1.5 / 255)
    for cfg in ("1", "2.5"):
        directory = tmp_path / f"teacher-steps2-cfg{cfg}-held-in"
        report = json.loads((directory / "report.json").read_text())
        assert REPORT_KEYS <= set(report)
        assert report["num_images"] == 8 and report["steps"] == 2 and report["split"] == "held-in"
        assert 0.0 <= report["judge_accuracy"] <= 1.0 and report["fid"] >= 0
        assert "toy-align" in report["rewards"]
        assert (directory / "grid.png").stat().st_size > 0
        samples = read_samples(directory / "samples.parquet").to_pandas()  # every evaluated image, as data
        assert len(samples) == 8 and samples["reward/toy-align"].mean() == pytest.approx(report["rewards"]["toy-align"])
        assert samples["judge_correct"].mean() == pytest.approx(report["judge_accuracy"])
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 2
    report = json.loads((tmp_path / "teacher-steps2-cfg2.5-held-in" / "report.json").read_text())
    rows = [line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| teacher | held-in | 2 | 2.5 |")]
    assert len(rows) == 1  # the whole row is that report's numbers
    assert rows[0].endswith("| teacher-steps2-cfg2.5-held-in |")  # (the setting's directory: rows of calls told apart)
    cells = [float(cell) for cell in rows[0].strip().strip("|").split("|")[4:-1]]
    assert cells == pytest.approx([report["judge_accuracy"], report["analytic_accuracy"], report["fid"],
                                   report["diversity"], report["rewards"]["toy-align"], report["num_images"]], abs=6e-3)
    # another shift or seed is another directory, not an overwrite
    toy_eval.main(["--steps", "2", "--cfg", "1", "--shift", "2", "--seed", "1", "--num-images", "2", "--out", str(tmp_path)])
    assert (tmp_path / "teacher-steps2-cfg1-shift2-held-in-seed1" / "report.json").exists()
    assert (tmp_path / "teacher-steps2-cfg1-held-in" / "report.json").exists()
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 3  # every setting under --out, earlier calls' too
    capsys.readouterr()
    toy_eval.main(["--steps", "2", "--cfg", "1", "--num-images", "4", "--out", str(tmp_path)])  # the same setting again
    assert ("teacher-steps2-cfg1-held-in: replacing the evaluation there of 8 images with one of 4"
            in capsys.readouterr().out)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary) == 3 and sorted(r["num_images"] for r in summary) == [2, 4, 8]
    older = tmp_path / "teacher-steps2-cfg1-shift2-held-in-seed1" / "report.json"  # one of before diversity existed
    older.write_text(json.dumps({k: v for k, v in json.loads(older.read_text()).items() if k != "diversity"}))
    toy_eval.main(["--steps", "2", "--cfg", "2.5", "--num-images", "2", "--out", str(tmp_path)])
    older_row = [line for line in (tmp_path / "summary.md").read_text().splitlines()
                 if line.endswith("| teacher-steps2-cfg1-shift2-held-in-seed1 |")]
    assert len(older_row) == 1 and older_row[0].split("|")[8].strip() == "-"  # listed, a "-" for its diversity


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--split", "train"], "unknown split 'train'"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--steps", "four"], "comma-separated int"),
        (["--num-images", "1"], "--num-images must be >= 2"),
        (["--cfg", "-1"], "--cfg must be finite and >= 0"),
    ],
)
def test_eval_rejects_bad_arguments_with_a_reason(argv, message, capsys):
    with pytest.raises(SystemExit):
        toy_eval.parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_main_job_without_a_preset_is_the_demo_dmdr_on_a_local_ray(monkeypatch, capsys):
    trained = []
    monkeypatch.setattr(run, "train", lambda preset, overrides, num_images: trained.append((preset, overrides)))
    run.main([])
    run.main(["trainer.max_steps=10"])  # overrides apply to the demo
    assert trained == [("toy-demo", []), ("toy-demo", ["trainer.max_steps=10"])]
    assert "no preset given: the demo (--preset toy-demo)" in capsys.readouterr().out
    cfg = load_config("toy-demo")  # DMDR: the DMD cold start, then the reward, on the Ray runtime
    assert cfg.trainer.backend == "ray" and 0 < cfg.trainer.cold_start < cfg.trainer.max_steps <= 50
    assert [spec.name for spec in cfg.rewards if spec.weight > 0] == ["toy-align"] and cfg.dmd.weight > 0
    run.main(["--dry-run"])
    plan = capsys.readouterr().out
    assert "dry run of 'toy-demo'" in plan and "backend ray: 1 learner worker(s), 1 rollout actor(s)" in plan


def test_main_job_names_bad_values(capsys):
    with pytest.raises(SystemExit):  # a preset's name without the flag, or as a file name
        run.main(["toy-dmdr"])
    assert "'toy-dmdr' is a preset or a config file: --preset toy-dmdr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["my-run.yaml"])
    assert "--preset my-run.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["--preset", "toy-dmdr.yaml", "--dry-run"])
    assert "config file 'toy-dmdr.yaml' does not exist (the preset is --preset toy-dmdr)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["--preset", "toy-dmdr", "trainer.backend=slurm"])
    assert "trainer.backend: Input should be 'local' or 'ray'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["--preset", "toy-dmdr", "student.steps=9"])
    assert "student.steps: Input should be less than or equal to 8" in capsys.readouterr().err


def test_a_trained_student_is_evaluated_from_its_run_directory(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run.main(["--preset", "toy-dmd", "--num-images", "4", "trainer.max_steps=1", "trainer.batch_size=2", "dmd.ratio=1",
              "student.steps=2", f"output.dir={run_dir}"])
    printed = capsys.readouterr().out
    assert "student (2 steps, 4 held-in prompts): judge accuracy" in printed and "FID at 4 images is not comparable" in printed
    checkpoint = find_run(run_dir)[1]
    own = json.loads((run_dir / "eval" / "report.json").read_text())  # the run's own evaluation: as eval's below
    assert own["steps"] == 2 and (own["run"], own["checkpoint"]) == (str(run_dir.resolve()), str(checkpoint.resolve()))
    out = tmp_path / "eval"
    toy_eval.main(["--model", "student", "--run", str(run_dir), "--num-images", "4", "--out", str(out)])
    # a report directory per run and checkpoint: a later one does not overwrite it
    report = json.loads((out / f"student-{toy_eval.student_label(run_dir, checkpoint)}-steps2-held-in" / "report.json").read_text())
    assert report["model"] == "student" and report["steps"] == 2 and report["cfg"] == 1.0
    assert (report["run"], report["checkpoint"]) == (str(run_dir.resolve()), str(checkpoint.resolve()))
    assert report["judge_accuracy"] == own["judge_accuracy"] and report["fid"] == pytest.approx(own["fid"], rel=1e-6)
    with pytest.raises(SystemExit):
        toy_eval.parse_args(["--model", "student"])
    # a student of other scenes than the judge's (here: its config says 64 px) is refused before any sampling
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["resolution"] = 64
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"trains a toy student at 64 px: the toy evaluation judges 32 px toy-world "
                                         r"scenes only"):
        toy_eval.main(["--model", "student", "--run", str(run_dir), "--num-images", "4", "--out", str(tmp_path / "e2")])
    assert not (tmp_path / "e2").exists()
    config["model"]["backbone"] = "sd3"  # named as its family is, with the article it is read with (not "a sd3")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"trains an SD3 student at 64 px"):
        toy_eval.main(["--model", "student", "--run", str(run_dir), "--num-images", "4", "--out", str(tmp_path / "e2")])


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_an_evaluated_image_does_not_depend_on_the_batch_size(teacher, mode):
    from dmdr_rl.evaluation import generate, image_seeds

    prompts = ["a red circle", "a large blue square", "a green diamond above a red circle", "a small yellow circle"]
    seeds = image_seeds(0, len(prompts))
    assert len(set(seeds)) == len(seeds)

    def sample_fn(chunk, chunk_seeds):
        return teacher.sample(chunk, steps=3, cfg=2.0, seed=chunk_seeds, mode=mode)

    whole, _ = generate(sample_fn, prompts, seeds, batch_size=4)
    one_by_one, _ = generate(sample_fn, prompts, seeds, batch_size=1)
    torch.testing.assert_close(one_by_one, whole, rtol=0, atol=1e-5)
    # and the images differ between seeds (the per-image seeds are used, not one shared noise)
    assert (generate(sample_fn, prompts[:1] * 2, seeds[:2], batch_size=2)[0].diff(dim=0).abs().max() > 0.05)
    with pytest.raises(ValueError, match="one seed per image"):
        generate(sample_fn, prompts, seeds[:3], batch_size=4)


def test_an_evaluation_row_is_reproduced_from_its_own_seed(tmp_path, teacher, judge, align):
    from dmdr_rl.evaluation import evaluate
    from dmdr_rl.samples import decode_png

    def sample_fn(prompts, seeds):
        return teacher.sample(prompts, steps=2, cfg=1.0, seed=seeds)

    evaluate(sample_fn, "held-in", 4, 0, judge, [align], batch_size=3, samples_path=tmp_path / "s.parquet")
    rows = read_samples(tmp_path / "s.parquet").to_pandas()
    assert rows["seed"].nunique() == 4
    again = sample_fn([rows["prompt"][2]], [int(rows["seed"][2])])[0].clamp(0, 1)
    torch.testing.assert_close(decode_png(rows["png"][2]), (again * 255).round() / 255, rtol=0, atol=1.5 / 255)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "student", "--run", "r", "--steps", "4"], r"--steps set the teacher's sampling; a student samples as"),
        (["--model", "student", "--run", "r", "--cfg", "2", "--shift", "3"], r"--cfg, --shift set the teacher's"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--split", "held-in, held-out", "--shift", "0"], "--shift must be > 0"),  # the split list's spaces are fine
    ],
)
def test_eval_refuses_what_it_cannot_honour(argv, message, capsys):
    with pytest.raises(SystemExit):
        toy_eval.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_a_student_is_loaded_without_its_training_setup_and_reports_how_it_samples(tmp_path, monkeypatch):
    """Only the generator: a run whose prompt file and reward app are gone still evaluates."""
    run_dir = tmp_path / "run"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    run.main(["--preset", "toy-dmd", "trainer.max_steps=1", "trainer.batch_size=2", "dmd.ratio=1", "student.steps=2",
              "student.shift=2", f"data.prompts={prompts}", f"output.dir={run_dir}"])
    prompts.unlink()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())  # as if trained with a reward app, stopped since
    config["rewards"] = [{"name": "toy-align", "placement": "serve", "weight": 0.5}]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "eval"
    toy_eval.main(["--model", "student", "--run", str(run_dir), "--num-images", "2", "--out", str(out)])
    [report_dir] = out.glob("student-run-step_*-*-steps2-held-in")
    report = json.loads((report_dir / "report.json").read_text())
    assert (report["steps"], report["shift"], report["sampler"], report["cfg"]) == (2, 2.0, "ode", 1.0)
    with pytest.raises(SystemExit, match="nowhere does not exist: give a run directory"):
        toy_eval.main(["--model", "student", "--run", str(tmp_path / "nowhere"), "--num-images", "2"])
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(SystemExit, match=r"not-a-run is not a training run \(no config.yaml in it or above it\)"):
        toy_eval.main(["--model", "student", "--run", str(tmp_path / "not-a-run"), "--num-images", "2"])

    # the same student for your own prompts: a grid, and each image again from its row's seed alone
    from dmdr_rl import sample
    from dmdr_rl.samples import decode_png

    out = sample.main(["--run", str(run_dir), "--prompt", "a red circle", "--prompt", "a blue square", "--num", "3",
                       "--batch-size", "4", "--out", str(tmp_path / "mine")])
    rows = read_samples(out / "samples.parquet").to_pandas()
    assert list(rows["prompt"]) == ["a red circle"] * 3 + ["a blue square"] * 3 and rows["seed"].nunique() == 6
    assert set(rows["checkpoint"]) == {str(find_run(run_dir)[1].resolve())}  # the weights that made them
    assert (out / "grid.png").stat().st_size > 0
    sample_fn, _ = toy_eval.load_student(run_dir)
    again = sample_fn([rows["prompt"][4]], [int(rows["seed"][4])])[0].clamp(0, 1)
    torch.testing.assert_close(decode_png(rows["png"][4]), (again * 255).round() / 255, rtol=0, atol=1.5 / 255)
    with pytest.raises(SystemExit):
        sample.parse_args(["--run", str(run_dir)])  # no prompt
    with pytest.raises(SystemExit, match=r"--prompt / --prompts: the toy backbone's text encoder .*\['elephant'\]"):
        sample.main(["--run", str(run_dir), "--prompt", "a purple elephant", "--out", str(tmp_path / "never")])
    assert toy_eval.parse_args(["--run", str(run_dir)]).model == "student"  # --run alone means the student
    with pytest.raises(SystemExit):
        toy_eval.parse_args(["--model", "teacher", "--run", str(run_dir)])

    # scored by the run's rewards (its served toy-align, loaded here), and its teacher on the same noise
    from dmdr_rl.toy import load_align, load_teacher

    mine = ["--run", str(run_dir), "--prompt", "a small red circle in the center", "--prompt",
            "a blue square left of a red circle", "--num", "2"]
    out = sample.main([*mine, "--score", "--out", str(tmp_path / "scored")])
    rows = read_samples(out / "samples.parquet").to_pandas()
    scores = json.loads((out / "scores.json").read_text())
    assert (scores["model"], scores["steps"], scores["num_images"]) == ("student", 2, 4)
    assert scores["checkpoint"].startswith(str((run_dir / "checkpoints").resolve()))  # the one scored, named
    align = scores["rewards"]["toy-align"]
    assert align["mean"] == pytest.approx(rows["reward/toy-align"].mean(), rel=1e-6) and align["non_finite"] == 0
    assert align["stderr"] == pytest.approx(rows["reward/toy-align"].std() / 2, rel=1e-6) and align["stderr"] > 0
    images = torch.stack([decode_png(png) for png in rows["png"]])
    torch.testing.assert_close(torch.tensor(rows["reward/toy-align"].to_numpy(), dtype=torch.float32),
                               load_align().score(images, list(rows["prompt"])), rtol=0, atol=0.05)  # (8-bit PNGs)
    out = sample.main([*mine, "--teacher", "--steps", "3", "--cfg", "2.5", "--reward", "{name: toy-align, label: again}",
                       "--out", str(tmp_path / "teacher")])
    teacher_rows = read_samples(out / "samples.parquet").to_pandas()
    scores = json.loads((out / "scores.json").read_text())
    assert (scores["model"], scores["steps"], scores["cfg"], scores["shift"]) == ("teacher", 3, 2.5, 2.0)  # the run's shift
    assert list(scores["rewards"]) == ["again"] and "reward/again" in teacher_rows
    assert list(teacher_rows["seed"]) == list(rows["seed"])  # the same noise as the student's
    expected = load_teacher().sample(list(rows["prompt"]), steps=3, cfg=2.5, seed=list(rows["seed"]), shift=2.0)
    got = torch.stack([decode_png(png) for png in teacher_rows["png"]])
    torch.testing.assert_close(got, (expected.clamp(0, 1) * 255).round() / 255, rtol=0, atol=1.5 / 255)
    assert not torch.allclose(got, images, atol=0.05)  # the teacher, not the student again
    with pytest.raises(SystemExit):
        sample.parse_args([*mine, "--steps", "4"])  # the student samples as it was trained
    with pytest.raises(SystemExit):
        sample.parse_args([*mine, "--reward", "{name: toy-align, weight: -1}"])
    with pytest.raises(SystemExit, match=r"--reward\[0\]\.name: .*no_such_module"):
        sample.main([*mine, "--reward", "no_such_module:Reward", "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()  # refused before sampling
    with pytest.raises(SystemExit, match=r"error: --prompt / --prompts: the toy-align reward cannot read this prompt: "
                                         r"prompt 'a red circle' uses known words but not the toy grammar"):
        sample.main(["--run", str(run_dir), "--prompt", "a red circle", "--score", "--out", str(tmp_path / "unread")])
    assert not (tmp_path / "unread").exists()  # refused before sampling (the toy backbone itself reads the words)

    from reward_servers.registry import REWARDS  # a reward without that check refuses the prompt only as it scores

    monkeypatch.setattr(REWARDS, "check", lambda *_, **__: None)
    with pytest.raises(SystemExit, match=r"error: scoring: .*not the toy grammar.*the images are in"):
        sample.main(["--run", str(run_dir), "--prompt", "a red circle", "--score", "--out", str(tmp_path / "kept")])
    assert len(read_samples(tmp_path / "kept" / "samples.parquet")) == 4  # what was sampled is not lost
    (tmp_path / "raising_reward.py").write_text("class Raises:\n    name, differentiable = 'raises', False\n\n"
                                                "    def score(self, images, prompts):\n        raise KeyError('no such prompt')\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # a model that raises: named, its traceback shown, the images kept
    with pytest.raises(SystemExit, match=r"error: scoring: reward model 'raises' raised while scoring 4 images: KeyError: "
                                         r"'no such prompt' .*the images are in"):
        sample.main(["--run", str(run_dir), "--prompt", "a red circle", "--reward", "raising_reward:Raises", "--out",
                     str(tmp_path / "kept-too")])
    assert len(read_samples(tmp_path / "kept-too" / "samples.parquet")) == 4
    (tmp_path / "recording_reward.py").write_text("import torch\n\nSEEN = []\n\n\nclass Recording:\n"
                                                  "    name, differentiable = 'recording', False\n\n"
                                                  "    def score(self, images, prompts):\n        SEEN.extend(prompts)\n"
                                                  "        return torch.zeros(len(prompts))\n")
    sample.main(["--run", str(run_dir), "--prompt", "a red circle", "--reward",  # a reward's template applies here too
                 "{name: 'recording_reward:Recording', prompt_template: 'a photo of {prompt}'}", "--out", str(tmp_path / "t")])
    import recording_reward

    assert recording_reward.SEEN == ["a photo of a red circle"] * 4
    config["rewards"] = [{"name": "toy-align", "placement": "serve", "serve": {"attach": True}}]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))  # an app deployed on its own: its model unknown here
    with pytest.raises(SystemExit, match=r"error: the run's rewards\[0\] \(toy-align\) is an attached Serve app's entry"):
        sample.main([*mine, "--score", "--out", str(tmp_path / "attached")])
    config["rewards"] = []
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"error: --score: the run .* has no rewards\[\]: name one with --reward NAME"):
        sample.main([*mine, "--score", "--out", str(tmp_path / "none")])


def test_a_seed_read_back_from_the_samples_file_samples_again(teacher):
    import numpy as np

    from dmdr_rl.flow import generators

    one = teacher.sample(["a red circle"], steps=2, cfg=1.0, seed=np.int64(5))
    torch.testing.assert_close(one, teacher.sample(["a red circle"], steps=2, cfg=1.0, seed=[5]), rtol=0, atol=1e-6)
    assert torch.equal(torch.randn(3, generator=generators(torch.tensor(7))), torch.randn(3, generator=generators(7)))


class _RenderingSampler:
    """Renders each prompt's scene as the evaluation's own FID reference does (the same seeds), and keeps the
    prompts it was asked for: a sampler whose images are the reference exactly."""

    def __init__(self, seed, total):
        self.seed, self.total, self.prompts = seed, total, []

    def __call__(self, prompts, seeds):
        from dmdr_rl.evaluation import REFERENCE_SEED_OFFSET
        from dmdr_rl.toy.grammar import prompt_to_scene
        from dmdr_rl.toy.render import render_batch

        first, self.prompts = len(self.prompts), self.prompts + list(prompts)
        return render_batch([prompt_to_scene(p) for p in prompts],
                            [REFERENCE_SEED_OFFSET + self.seed * self.total + first + i for i in range(len(prompts))])


class _NanForTheFirst:
    name = "nan-for-the-first"

    def score(self, images, prompts):
        scores = images.mean(dim=(1, 2, 3))
        return torch.where(torch.arange(len(prompts)) == 0, torch.full_like(scores, float("nan")), scores)


@pytest.mark.parametrize("split", ["held-in", "held-out"])
def test_evaluate_samples_its_split_and_measures_fid_against_renders_of_the_same_scenes(split):
    from dmdr_rl.evaluation import evaluate
    from dmdr_rl.toy.grammar import is_held_out, prompt_to_scene
    from dmdr_rl.toy.weights import load_judge

    sampler = _RenderingSampler(seed=3, total=96)
    report = evaluate(sampler, split, 96, 3, load_judge(), rewards=[_NanForTheFirst()], batch_size=40)
    assert report["split"] == split and len(sampler.prompts) == 96
    assert all(is_held_out(prompt_to_scene(p)) == (split == "held-out") for p in sampler.prompts)
    assert report["fid"] < 1e-3  # the images are the reference, image for image, over three chunks
    assert report["judge_accuracy"] > 0.9  # (and the judge reads clean renders of the prompts)
    # a score that is not finite is counted, and the mean is the others' (one chunk had a NaN first image each)
    assert report["rewards_nonfinite"] == {"nan-for-the-first": 3}
    images = _RenderingSampler(seed=3, total=96)(sampler.prompts, None).clamp(0, 1)  # the same renders again
    others = [i for i in range(96) if i not in (0, 40, 80)]  # the first image of each chunk of 40 scored NaN
    expected = images[others].mean(dim=(1, 2, 3)).mean().item()
    assert report["rewards"]["nan-for-the-first"] == pytest.approx(expected, rel=1e-5)


def test_images_with_non_finite_pixels_are_counted_and_do_not_break_the_evaluation():
    """A diverged sampler's NaN passes clamp(0, 1) and crashed FID's matrix square root (in native code, with
    no report written): such pixels are 0, and the report says how many images had one."""
    from dmdr_rl.evaluation import evaluate
    from dmdr_rl.toy.weights import load_judge

    sampler = _RenderingSampler(seed=1, total=8)

    def diverging(prompts, seeds):
        images = sampler(prompts, seeds)
        images[0, 0, 3, 3] = float("nan")
        images[1, 2] = float("inf")
        return images

    class Seen:
        name, images = "seen", []

        def score(self, images, prompts):
            self.images.append(images.clone())
            return images.mean(dim=(1, 2, 3))

    report = evaluate(diverging, "held-in", 8, 1, load_judge(), rewards=[Seen()], batch_size=4)
    assert report["nonfinite_images"] == 4  # two per chunk of four
    assert 0 <= report["fid"] < 1e9 and 0 <= report["judge_accuracy"] <= 1
    # what was evaluated: the renders with exactly the non-finite pixels at 0
    expected = _RenderingSampler(seed=1, total=8)(sampler.prompts, None).clamp(0, 1)
    for chunk in (0, 4):
        expected[chunk, 0, 3, 3] = 0.0
        expected[chunk + 1, 2] = 0.0
    torch.testing.assert_close(torch.cat(Seen.images), expected, rtol=0, atol=0)
    assert "rewards_nonfinite" not in report  # (the zeroed pixels score like any others)
    assert report["rewards"]["seen"] == pytest.approx(expected.mean().item(), rel=1e-5)
    assert "nonfinite_images" not in evaluate(_RenderingSampler(seed=1, total=8), "held-in", 8, 1, load_judge())


def test_an_output_that_is_a_file_or_another_formats_export_is_refused_before_any_work(tmp_path, capsys):
    from dmdr_rl import export, sample

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for parse in (lambda: sample.parse_args(["--run", "r", "--prompt", "a red circle", "--out", str(a_file)]),
                  lambda: toy_eval.parse_args(["--out", str(a_file)])):
        with pytest.raises(SystemExit):
            parse()
        assert f"--out {a_file} is a file: give a directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a file"):
        export.export_student(tmp_path / "no-run", "lora", a_file)
    earlier = tmp_path / "export"
    earlier.mkdir()
    (earlier / "student.json").write_text(json.dumps({"format": "transformer"}))
    with pytest.raises(ValueError, match="holds an export of another format"):  # (before the run is even looked for)
        export.export_student(tmp_path / "no-run", "lora", earlier)
    with pytest.raises(FileNotFoundError, match="no-run does not exist"):  # the same format may be written again
        export.export_student(tmp_path / "no-run", "transformer", earlier)
    # a directory of other files (and no earlier export) is refused: the export's files would be lost among them
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (prompts / name).write_text("a red circle\n")
    with pytest.raises(ValueError, match=rf"^--out {prompts} already holds other files \(a.txt, b.txt, c.txt, ...\) and no "
                                         rf"earlier export: give a new or empty directory, e.g. --out {prompts}/student-lora$"):
        export.export_student(tmp_path / "no-run", "lora", prompts)
    with pytest.raises(SystemExit):
        export.main(["--run", str(tmp_path / "no-run"), "--out", str(prompts)])
    assert f"error: --out {prompts} already holds other files" in capsys.readouterr().err
    assert sorted(p.name for p in prompts.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt"]  # nothing written
    (tmp_path / "empty").mkdir()  # an empty directory, or a new one, is written into
    for new in (tmp_path / "empty", tmp_path / "new"):
        with pytest.raises(FileNotFoundError, match="no-run does not exist"):
            export.export_student(tmp_path / "no-run", "lora", new)
    from dmdr_rl.trainer import write_run_config

    run = tmp_path / "run"
    write_run_config(load_config("toy-dmdr", [f"output.dir={run}"]), run)
    for inside in (run, run / "checkpoints", run / "exports" / "lora"):  # the run's own directory, or one in it
        for given in (run, run / "checkpoints"):
            with pytest.raises(ValueError, match=rf"--out {inside} is in the run directory {run}: .* give a directory "
                                                 r"outside it, e.g. --out exports/run-lora"):
                export.export_student(given, "lora", inside)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # nothing written
    with pytest.raises(SystemExit):
        export.main(["--run", str(run), "--out", str(run)])
    assert f"error: --out {run} is in the run directory" in capsys.readouterr().err


def test_a_setting_named_twice_is_evaluated_once():
    args = toy_eval.parse_args(["--steps", "4,4,2", "--cfg", "3,3", "--split", "held-in,held-in"])
    assert (args.steps, args.cfg, args.split) == ([4, 2], [3.0], ["held-in"])
    with pytest.raises(SystemExit):
        toy_eval.parse_args(["--cfg", "nan"])


def test_two_runs_of_one_folder_name_get_their_own_report_directories(tmp_path):
    label = toy_eval.student_label
    a, b = tmp_path / "a" / "toy", tmp_path / "b" / "toy"
    assert label(a, a / "checkpoints" / "step_000300") != label(b, b / "checkpoints" / "step_000300")
    assert label(a, a / "checkpoints" / "step_000300").startswith("toy-step_000300-")


def test_reports_are_strict_json_with_null_for_a_number_that_is_not_finite(tmp_path):
    from dmdr_rl.evaluation import evaluate
    from dmdr_rl.store import write_json_whole
    from dmdr_rl.toy.weights import load_judge

    class AlwaysNan:
        name = "always-nan"

        def score(self, images, prompts):
            return torch.full((len(prompts),), float("nan"))

    report = evaluate(_RenderingSampler(seed=2, total=8), "held-in", 8, 2, load_judge(), rewards=[AlwaysNan()])
    assert math.isnan(report["rewards"]["always-nan"])  # a mean over no finite score
    write_json_whole(tmp_path / "report.json", {**report, "nested": [float("inf"), {"x": -float("inf")}], "tuple": (1.5, 2)})

    def refuse(constant):
        raise AssertionError(f"bare {constant} in the report")

    written = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    assert written["rewards"] == {"always-nan": None} and written["rewards_nonfinite"] == {"always-nan": 8}
    assert written["nested"] == [None, {"x": None}] and written["tuple"] == [1.5, 2]
    assert written["fid"] == report["fid"] and written["judge_accuracy"] == report["judge_accuracy"]


def test_missing_toy_weights_are_one_line_errors_in_every_command(tmp_path):
    from dmdr_rl import sample

    with pytest.raises(SystemExit, match=r"error: toy judge weights not found in .*none/judge"):
        toy_eval.main(["--weights", str(tmp_path / "none"), "--num-images", "4"])
    run_dir = tmp_path / "run"  # a run whose model directory has gone since
    run.main(["--preset", "toy-dmd", "--num-images", "4", "trainer.max_steps=1", "trainer.batch_size=2", "dmd.ratio=1",
              "student.steps=2", f"output.dir={run_dir}"])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["path"] = str(tmp_path / "gone")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"error: toy .*weights not found in .*gone"):
        sample.main(["--run", str(run_dir), "--prompt", "a red circle", "--out", str(tmp_path / "samples")])
