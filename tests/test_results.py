"""The results-table command: trains missing rows (in parallel when asked), reuses finished ones,
evaluates both splits, and checks the claims against the measured numbers."""

import json

import pytest

from dmdr_rl import results

TINY = ["trainer.max_steps=2", "trainer.batch_size=2", "trainer.cold_start=1", "dmd.ratio=2",
        "output.checkpoint_every=1", "output.sample_every=100"]


def test_the_table_trains_evaluates_and_reuses_finished_runs(tmp_path):
    argv = ["--rows", "teacher-1,dmd-1,dmdr-1", "--num-images", "8", "--jobs", "2",
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *TINY]
    table = results.main(argv)
    assert list(table["rows"]) == ["teacher-1", "dmd-1", "dmdr-1"]
    for key, row in table["rows"].items():
        for split in ("held-in", "held-out"):
            assert 0.0 <= row[split]["judge_accuracy"] <= 1.0 and row[split]["num_images"] == 8
            assert (tmp_path / "out" / row[split]["grid"]).exists()
    assert table["rows"]["dmd-1"]["training"]["generator_steps"] == 2
    assert table["rows"]["teacher-1"]["cfg"] == 4.0 and table["rows"]["dmd-1"]["cfg"] == 1.0
    saved = json.loads((tmp_path / "out" / "toy.json").read_text())
    assert saved["rows"]["dmdr-1"]["held-out"]["fid"] == table["rows"]["dmdr-1"]["held-out"]["fid"]
    markdown = (tmp_path / "out" / "toy.md").read_text()
    assert "| DMDR, 1-step | 1 |" in markdown and "DMD 1-step far better" in markdown
    teacher = table["rows"]["teacher-1"]  # the analytic judge's column beside the learned one's
    assert (f"| Teacher, 1 step | 1 | {teacher['held-in']['judge_accuracy']:.3f} | {teacher['held-out']['judge_accuracy']:.3f} "
            f"| {teacher['held-in']['analytic_accuracy']:.3f} | {teacher['held-out']['analytic_accuracy']:.3f} |") in markdown
    a, b = (table["rows"]["dmdr-1"][split] for split in ("held-in", "held-out"))  # a student's row, to its grid
    assert (f"| DMDR, 1-step | 1 | {a['judge_accuracy']:.3f} | {b['judge_accuracy']:.3f} | {a['analytic_accuracy']:.3f} "
            f"| {b['analytic_accuracy']:.3f} | {a['fid']:.1f} | {b['fid']:.1f} | {a['rewards']['toy-align']:.3f} "
            f"| {b['rewards']['toy-align']:.3f} | ") in markdown and f"| [dmdr-1]({a['grid']}) |" in markdown
    floor = table["meta"]["fid_floor"]  # renders against renders at the table's own 8 images
    assert floor["held-in"] > 0 and f"renders against renders give {floor['held-in']} held-in" in markdown
    checkpoint = tmp_path / "runs" / "dmd-1" / "checkpoints" / "step_000002" / "generator.safetensors"
    stamp = checkpoint.stat().st_mtime_ns
    again = results.main(argv)  # finished runs are reused, not retrained
    assert checkpoint.stat().st_mtime_ns == stamp
    assert again["rows"]["dmd-1"]["held-in"] == table["rows"]["dmd-1"]["held-in"]


def _row(acc_in, acc_out, fid, reward, analytic=None):
    split = lambda acc: {"judge_accuracy": acc, "fid": fid, "rewards": {"toy-align": reward}, "grid": "g.png"}  # noqa: E731
    row = {"held-in": split(acc_in), "held-out": split(acc_out)}
    for split_name, value in zip(("held-in", "held-out"), analytic or ()):
        row[split_name]["analytic_accuracy"] = value
    return row


def test_the_analytic_judge_checks_the_claims_a_reward_aligned_judge_could_pass(tmp_path, capsys):
    rows = {"teacher-32": _row(0.70, 0.64, 200.0, -0.5, (0.65, 0.57)), "dmdr-4": _row(0.80, 0.74, 220.0, -0.1, (0.66, 0.55)),
            "rl-only-4": _row(0.75, 0.70, 450.0, -0.03, (0.61, 0.49))}
    claims = {c["claim"]: c for c in results.check_claims(rows)}
    assert claims["DMDR 4-step: judge accuracy above the 32-step teacher's (held-out)"]["passed"] is True
    assert claims["DMDR 4-step: analytic accuracy above the 32-step teacher's (held-in)"]["passed"] is True
    assert claims["DMDR 4-step: analytic accuracy above the 32-step teacher's (held-out)"]["passed"] is False  # 0.55 < 0.57
    assert claims["DMDR 4-step: analytic accuracy above the 32-step teacher's (held-out)"]["measured"] == "0.550 vs 0.570 (-0.020, -0.9 SE)"
    assert claims["RL-only 4-step: analytic accuracy 0.05 below DMDR's (held-in)"]["passed"] is True  # 0.61 vs 0.66: a tie
    assert results.hacking_sentence(rows).endswith("The analytic judge (no weights) gives it 0.610 against DMDR's 0.660.")
    rows["rl-only-4"]["held-in"]["analytic_accuracy"] = 0.62
    assert {c["claim"]: c["passed"] for c in results.check_claims(rows)}[
        "RL-only 4-step: analytic accuracy 0.05 below DMDR's (held-in)"] is False
    del rows["teacher-32"]["held-in"]["analytic_accuracy"]  # a table from before the analytic judge
    assert not any("analytic" in c["claim"] and "teacher" in c["claim"] for c in results.check_claims(rows))
    # --render-only: the saved numbers under today's claims, nothing evaluated
    table = {"meta": {"command": "python -m dmdr_rl.results", "num_images": 8, "seed": 0, "date": "2026-11-29"},
             "rows": {k: {**r, "label": k, "steps": 4} for k, r in rows.items()}, "claims": []}
    (tmp_path / "toy.json").write_text(json.dumps(table))
    results.main(["--render-only", "--out", str(tmp_path)])
    markdown = (tmp_path / "toy.md").read_text()
    assert "| RL-only 4-step: analytic accuracy 0.05 below DMDR's (held-in) | 0.620 vs 0.660 (-0.010, -0.5 SE) | **no** |" in markdown
    assert json.loads((tmp_path / "toy.json").read_text())["claims"]
    # a number that was not finite (a diverged row's reward mean) is saved as null and renders as nan again
    table["rows"]["rl-only-4"]["held-in"]["rewards"]["toy-align"] = float("nan")
    results.write_table(tmp_path, table)
    assert json.loads((tmp_path / "toy.json").read_text())["rows"]["rl-only-4"]["held-in"]["rewards"]["toy-align"] is None
    results.main(["--render-only", "--out", str(tmp_path)])
    assert "| RL-only 4-step: toy-align reward at least DMDR's (held-in) | nan vs " in (tmp_path / "toy.md").read_text()
    with pytest.raises(SystemExit, match="does not exist"):
        results.main(["--render-only", "--out", str(tmp_path / "none")])
    with pytest.raises(SystemExit):  # what would choose trainings or evaluations: refused, not ignored
        results.main(["--render-only", "--out", str(tmp_path), "--rows", "dmd-4", "trainer.max_steps=5"])
    assert "training and evaluating nothing: drop --rows, the config overrides" in capsys.readouterr().err


def test_claims_pass_and_fail_on_the_numbers():
    rows = {"teacher-32": _row(0.70, 0.64, 200.0, -0.5), "dmd-4": _row(0.66, 0.56, 310.0, -0.6),
            "dmdr-4": _row(0.80, 0.70, 280.0, -0.1), "rl-only-4": _row(0.60, 0.50, 900.0, -0.05)}
    claims = {c["claim"]: c["passed"] for c in results.check_claims(rows)}
    assert claims["DMD 4-step: FID <= 1.5x the 32-step teacher's (held-in)"] is False  # 310 > 300
    assert claims["DMD 4-step: judge accuracy >= 0.9x the 32-step teacher's (held-in)"] is True
    assert claims["DMD 4-step: judge accuracy >= 0.9x the 32-step teacher's (held-out)"] is False  # 0.56 < 0.576
    assert claims["DMDR 4-step: judge accuracy above the 32-step teacher's (held-out)"] is True
    assert all(v for k, v in claims.items() if k.startswith("RL-only"))
    assert not any(c.startswith("DMD 1-step") for c in claims)  # rows not run are not judged
    assert "the judge finds its images wrong more often and they are far from the renders. The reward is hacked" in \
        results.hacking_sentence(rows)
    rows["rl-only-4"] = _row(0.78, 0.69, 900.0, -0.05)  # the FID alone shows it
    assert "far from the renders, though the judge's accuracy is within 0.05 of DMDR's. The reward is hacked" in \
        results.hacking_sentence(rows)
    rows["rl-only-4"] = _row(0.79, 0.69, 290.0, -0.05)
    assert "too small to call it reward hacking" in results.hacking_sentence(rows)


def test_a_run_trained_from_another_config_is_not_reused(tmp_path):
    from dmdr_rl.config import load_config
    from dmdr_rl.trainer import write_run_config

    run = tmp_path / "dmd-1"
    write_run_config(load_config("toy-dmd-1step", [f"output.dir={run}"]), run)
    results._check_same_config(load_config("toy-dmd-1step", [f"output.dir={tmp_path / 'elsewhere'}"]), run)  # same
    with pytest.raises(RuntimeError, match=r"dmd\.real_cfg: 4\.0 -> 3\.0.*--retrain"):
        results.train_row("toy-dmd-1step", str(run), 1, ("dmd.real_cfg=3.0",))


def test_a_finished_run_is_reused_and_says_so(tmp_path, capsys):
    from dmdr_rl.config import load_config
    from dmdr_rl.trainer import write_run_config

    run = tmp_path / "dmd-1"
    cfg = load_config("toy-dmd-1step", [f"output.dir={run}"])
    write_run_config(cfg, run)
    (run / "train_summary.json").write_text(json.dumps({"generator_steps": cfg.trainer.max_steps}))
    assert results.train_row("toy-dmd-1step", str(run), 1) == {"generator_steps": cfg.trainer.max_steps}
    assert f"toy-dmd-1step: reusing {run} (trained earlier with the same config" in capsys.readouterr().out


def test_the_trainings_share_the_cpu_threads_up_to_omp_num_threads(monkeypatch):
    monkeypatch.setattr(results.os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert (results.threads_per_training(1), results.threads_per_training(2), results.threads_per_training(16)) == (8, 4, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a user's cap
    assert (results.threads_per_training(1), results.threads_per_training(8)) == (2, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")  # OpenMP's nested form: the outer level counts
    assert results.threads_per_training(1) == 3
    for unusable in ("", "0", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", unusable)
        assert results.threads_per_training(2) == 4


def test_an_exact_tie_with_a_target_meets_it_and_the_one_step_dmdr_is_judged():
    rows = {"teacher-32": _row(0.650, 0.650, 200.0, -0.5), "dmd-4": _row(0.585, 0.585, 300.0, -0.6),
            "dmdr-1": _row(0.70, 0.60, 300.0, -0.1)}
    claims = {c["claim"]: c["passed"] for c in results.check_claims(rows)}
    assert 0.585 < 0.9 * 0.650  # in floats: the tie the claim must not fail on
    assert claims["DMD 4-step: judge accuracy >= 0.9x the 32-step teacher's (held-in)"] is True
    assert claims["DMD 4-step: FID <= 1.5x the 32-step teacher's (held-in)"] is True
    assert claims["DMDR 1-step: judge accuracy above the 32-step teacher's (held-in)"] is True
    assert claims["DMDR 1-step: judge accuracy above the 32-step teacher's (held-out)"] is False


def test_a_bad_override_stops_the_table_before_any_run_is_deleted_or_trained(tmp_path, capsys):
    from dmdr_rl.config import load_config
    from dmdr_rl.trainer import write_run_config

    kept = tmp_path / "dmd-4"
    write_run_config(load_config("toy-dmd", [f"output.dir={kept}"]), kept)
    with pytest.raises(SystemExit, match="unknown config key 'trainer.max_step'"):
        results.main(["--rows", "dmd-4", "--retrain", "--runs", str(tmp_path), "trainer.max_step=5"])
    assert (kept / "config.yaml").exists()
    runs = tmp_path / "other"
    write_run_config(load_config("toy-dmdr", [f"output.dir={runs / 'dmdr-4'}", "dmd.real_cfg=3"]), runs / "dmdr-4")
    with pytest.raises(SystemExit, match="dmdr-4 was trained from another config"):  # before dmd-4 trains
        results.main(["--rows", "dmd-4,dmdr-4", "--runs", str(runs)])
    assert not (runs / "dmd-4").exists()
    with pytest.raises(SystemExit, match="apply to trainings, and the rows asked for train nothing"):
        results.main(["--rows", "teacher-32", "--runs", str(runs), "trainer.max_step=5"])
    with pytest.raises(SystemExit):
        results.parse_args(["--num-images", "1"])
    assert "--num-images must be >= 2" in capsys.readouterr().err
    # `~` in --runs is the home directory, as in the trainings' output.dir (no shell expands it in --runs=~/x)
    assert results.parse_args(["--runs=~/table"]).runs.is_absolute()


def test_an_accuracy_margin_is_given_in_standard_errors_of_the_image_draw():
    # 0.679 against 0.9 x 0.724 at 1000 images each: gap 0.0274, SE sqrt(.679 .321 + .81 .724 .276) / sqrt(1000)
    assert results.accuracy_margin(0.679, 1000, 0.724, 1000, factor=0.9) == "+0.027, +1.4 SE"
    assert results.accuracy_margin(0.679, 250, 0.724, 250, factor=0.9) == "+0.027, +0.7 SE"  # 4x fewer images: 2x the SE
    assert results.accuracy_margin(1.0, 10, 1.0, 10) == "+0.000"  # no spread, no SE
