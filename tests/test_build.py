import os

import pytest
import torch

from dmdr_rl.toy import build
from dmdr_rl.toy.weights import load_judge, load_teacher


def _toy_problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)

    def loss_fn(step):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=g)
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        return loss, {"loss": loss.item()}

    return model, loss_fn


def test_interrupted_build_resumes_to_the_same_weights(tmp_path):
    cfg = build.BuildConfig(steps=6, batch_size=8, lr=1e-2, seed=0, warmup=2, ema_decay=0.9, checkpoint_every=2)
    model, loss_fn = _toy_problem()
    straight = build.train("toy", cfg, {"m": model}, loss_fn, tmp_path / "a")["m"].state_dict()

    model, loss_fn = _toy_problem()

    def interrupted(step):
        if step == 4:
            raise KeyboardInterrupt
        return loss_fn(step)

    with pytest.raises(KeyboardInterrupt):
        build.train("toy", cfg, {"m": model}, interrupted, tmp_path / "b")
    model, loss_fn = _toy_problem()  # a fresh process: new modules, restored from the checkpoint
    resumed = build.train("toy", cfg, {"m": model}, loss_fn, tmp_path / "b")["m"].state_dict()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert (tmp_path / "b" / "log.jsonl").exists()


def test_learning_rate_warms_up_then_decays():
    cfg = build.BuildConfig(steps=100, batch_size=1, lr=1.0, seed=0, warmup=10, final_lr_fraction=0.1)
    assert build.learning_rate(0, cfg) == pytest.approx(0.1)
    assert build.learning_rate(10, cfg) == pytest.approx(1.0)
    assert build.learning_rate(99, cfg) == pytest.approx(0.1, abs=1e-3)


def test_build_commands_write_loadable_weights(tmp_path):
    out, work = tmp_path / "weights", tmp_path / "work"
    old_mask = os.umask(0o022)
    try:
        build.main(["teacher", "--steps", "2", "--work-dir", str(work), "--out", str(out)])
        build.main(["judge", "--steps", "2", "--work-dir", str(work), "--out", str(out)])
    finally:
        os.umask(old_mask)
    assert {f.stat().st_mode & 0o777 for f in out.rglob("*") if f.is_file()} == {0o644}  # (safetensors: 0600)
    pipeline = load_teacher(out)
    assert pipeline.sample(["a small red circle in the center"], steps=1, cfg=1.0, seed=0).shape == (1, 3, 32, 32)
    assert load_judge(out).config.arch == "judge"
    assert (out / "teacher" / "build_recipe.json").exists()


def test_snapshot_without_a_checkpoint_and_bad_values_are_one_line_errors(tmp_path, capsys):
    from dmdr_rl.toy import check

    with pytest.raises(SystemExit) as caught:
        build.main(["align", "--snapshot", "--work-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert caught.value.code == 2 and "error: --snapshot needs a checkpoint" in capsys.readouterr().err
    for argv, message in ((["teacher", "--variant", "nope"], "--variant 'nope' is not a teacher variant: p4w96"),
                          (["teacher", "--steps", "0"], "--steps must be >= 1, got 0"),
                          (["judge", "--threads", "0"], "--threads must be >= 1, got 0")):
        with pytest.raises(SystemExit):
            build.main([*argv, "--work-dir", str(tmp_path), "--out", str(tmp_path / "o")])
        assert message in capsys.readouterr().err
    for argv, message in ((["--num-images", "0"], "--num-images must be >= 2"), (["--eps", "0.1"], "add --transfer"),
                          (["--transfer", "--eps", "-1"], "--eps must be in (0, 1]")):
        with pytest.raises(SystemExit):
            check.main(argv)
        assert message in capsys.readouterr().err


def test_a_shortened_build_may_not_overwrite_the_shipped_weights(tmp_path, monkeypatch, capsys):
    def must_not_build(*args, **kwargs):
        raise AssertionError("the guard let a shortened build start")

    monkeypatch.setattr(build, "build_teacher", must_not_build)
    with pytest.raises(SystemExit) as caught:
        build.main(["teacher", "--steps", "2", "--work-dir", str(tmp_path)])
    assert caught.value.code == 2
    assert "pass --out DIR so a smoke build does not overwrite them" in capsys.readouterr().err
