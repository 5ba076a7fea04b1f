"""Weights & Biases logging (output.wandb), against a stand-in for the wandb package (the tests run offline
and without it): one W&B run per training run, resumed by its kept id, with the same metrics as metrics.jsonl."""

import importlib.machinery
import importlib.util
import json
import sys
import types

import pytest

from conftest import tiny_run
from dmdr_rl.config import ConfigError, load_config
from dmdr_rl.samples import read_samples


class _FakeWandb(types.ModuleType):
    """The calls dmdr_rl makes: init(...) -> a run with .id, .log(metrics, step=), .finish(exit_code=)."""

    def __init__(self, fails: bool = False):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # (found by importlib.util.find_spec)
        self.inits, self.runs, self.fails = [], [], fails
        self.Settings = lambda **settings: settings
        self.Image = lambda path, caption=None: types.SimpleNamespace(path=path, caption=caption)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        if self.fails:
            raise RuntimeError("api_key not configured (no-tty)")
        run = types.SimpleNamespace(id=kwargs["id"] or f"run{len(self.runs)}", logged=[], exit_code=None, summary={})
        run.log = lambda metrics, step: run.logged.append((step, dict(metrics)))
        run.finish = lambda exit_code=None: setattr(run, "exit_code", exit_code)
        self.runs.append(run)
        return run


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_its_metrics_to_one_wandb_run_which_a_resumed_run_continues(tmp_path, monkeypatch):
    from dmdr_rl.trainer import LocalTrainer

    wandb = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    out = tmp_path / "run"
    overrides = tiny_run(f"output.dir={out}", "output.wandb={project: dmdr-tests, mode: offline, tags: [toy]}",
                         "rewards.0.serve.runtime_env={env_vars: {HF_TOKEN: t0k3n}}")
    LocalTrainer(load_config("toy-dmdr", overrides)).train()
    first = wandb.inits[0]
    assert {k: first[k] for k in ("project", "name", "mode", "tags", "id", "resume", "reinit", "settings")} == {
        "project": "dmdr-tests", "name": "toy-dmdr", "mode": "offline", "tags": ["toy"], "id": None, "resume": None,
        "reinit": "create_new", "settings": {"x_disable_meta": False}}  # (a caller's own active run: left alone)
    assert first["dir"] == str(out) and first["config"]["output"]["wandb"]["project"] == "dmdr-tests"
    assert first["config"]["rewards"][0]["serve"]["runtime_env"] == {"env_vars": {"HF_TOKEN": "<redacted>"}}
    logged = [(step, values) for step, values in wandb.runs[0].logged if "samples/grid" not in values]
    assert [step for step, _ in logged] == [1, 2] and wandb.runs[0].exit_code == 0
    assert [{"step": step, **values} for step, values in logged] == [
        {k: v for k, v in row.items() if k not in ("id", "time")} for row in _metrics(out)]  # metrics.jsonl's
    assert (out / "wandb" / "run-id").read_text().strip() == "run0"
    (step, samples), = [(step, values) for step, values in wandb.runs[0].logged if "samples/grid" in values]
    grid = out / "samples" / "step_000002.png"  # (the last step's, as every run's)
    assert (step, samples["samples/grid"].path, sorted(samples)) == (2, str(grid), ["samples/grid", "samples/reward/toy-align"])
    assert samples["samples/reward/toy-align"] == pytest.approx(
        read_samples(out / "samples" / "step_000002.parquet").to_pandas()["reward/toy-align"].mean(), rel=1e-6)

    resumed = load_config("toy-dmdr", [*overrides, "trainer.max_steps=4", f"trainer.resume_from={out}"])
    LocalTrainer(resumed).train()
    assert (wandb.inits[1]["id"], wandb.inits[1]["resume"]) == ("run0", "allow")  # the same W&B run, continued
    assert [(step, "samples/grid" in values) for step, values in wandb.runs[1].logged] == [(3, False), (4, False),
                                                                                           (4, True)]
    assert wandb.runs[1].exit_code == 0

    fresh = load_config("toy-dmdr", [*overrides, "output.wandb.mode=null"])
    LocalTrainer(fresh).train()  # a fresh run in the directory: a W&B run of its own
    assert wandb.inits[2]["id"] is None and (out / "wandb" / "run-id").read_text().strip() == "run2"
    assert "mode" not in wandb.inits[2]  # (null: W&B's own choice, WANDB_MODE or online)
    assert [p.name for p in (out / "previous").iterdir() if (p / "wandb" / "run-id").exists()]  # (set aside with the rest)


def test_a_failed_run_is_marked_so_a_stopped_one_not_and_a_wandb_that_cannot_start_does_not_stop_training(tmp_path, monkeypatch, capsys):
    from dmdr_rl.trainer import LocalTrainer

    wandb = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    cfg = load_config("toy-dmdr", tiny_run(f"output.dir={tmp_path / 'a'}", "output.wandb={project: p}"))
    trainer = LocalTrainer(cfg)
    monkeypatch.setattr(trainer, "train_iteration", lambda: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        trainer.train()
    assert wandb.runs[0].exit_code == 1  # (W&B shows the run failed, not finished)

    # a stop asked for with Ctrl-C, checkpointed to resume, is no failure (as a Ray learner's stop is not)
    import os
    import signal

    cfg = load_config("toy-dmdr", tiny_run(f"output.dir={tmp_path / 'c'}", "output.wandb={project: p}", "trainer.max_steps=3"))
    trainer = LocalTrainer(cfg)
    original = trainer.train_iteration
    monkeypatch.setattr(trainer, "train_iteration",
                        lambda: (os.kill(os.getpid(), signal.SIGINT) if trainer.iteration == 0 else None, original())[1])
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (as in a terminal)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert trainer.generator_step == 1 and wandb.runs[1].exit_code == 0

    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb(fails=True))  # no key, no network, ...
    cfg = load_config("toy-dmdr", tiny_run(f"output.dir={tmp_path / 'b'}", "output.wandb={project: p}"))
    assert LocalTrainer(cfg).train()["generator_steps"] == 2
    assert "output.wandb: W&B could not start (RuntimeError: api_key not configured" in capsys.readouterr().out
    assert len(_metrics(tmp_path / "b")) == 2 and not (tmp_path / "b" / "wandb" / "run-id").exists()


def test_a_store_password_on_the_command_line_keeps_w_and_bs_metadata_off(monkeypatch):
    from dmdr_rl.tracking import _password_in_argv

    cfg = load_config("toy-dmdr", ["store.url=redis://:s3cret@127.0.0.1:6380/0", "output.wandb={project: p}"])
    monkeypatch.setattr(sys, "argv", ["dmdr-rl", "store.url=redis://:s3cret@127.0.0.1:6380/0"])
    assert _password_in_argv(cfg)  # W&B would record the command line
    monkeypatch.setattr(sys, "argv", ["dmdr-rl", "--preset", "run/config.yaml"])
    assert not _password_in_argv(cfg)


def test_w_and_b_names_it_would_refuse_are_config_errors():
    with pytest.raises(ConfigError, match=r"output.wandb.project: a W&B project name cannot hold / \(a team or user "
                                          r"goes in output.wandb.entity\)"):
        load_config("toy-dmdr", ["output.wandb={project: team/dmdr}"])
    with pytest.raises(ConfigError, match="output.wandb.tags: each W&B tag must be 1 to 64 characters"):
        load_config("toy-dmdr", ["output.wandb={project: p, tags: ['']}"])


def test_output_wandb_without_its_package_is_refused_before_the_models_load(tmp_path, monkeypatch):
    import dmdr_rl.tracking as tracking
    from dmdr_rl import run
    from dmdr_rl.trainer import LocalTrainer

    monkeypatch.setattr(tracking, "find_spec", lambda name: None if name == "wandb" else importlib.util.find_spec(name))
    monkeypatch.setattr("dmdr_rl.trainer.build_backbone", lambda *a, **k: pytest.fail("the models loaded first"))
    cfg = load_config("toy-dmdr", tiny_run(f"output.dir={tmp_path / 'run'}", "output.wandb={project: p}"))
    with pytest.raises(ConfigError, match=r"output.wandb needs the wandb package.*pip install wandb.*output.wandb=null"):
        LocalTrainer(cfg)
    assert any("output.wandb needs the wandb package" in note for note in run._missing_packages(cfg))  # (the dry run)


def test_the_main_jobs_evaluation_goes_to_the_runs_w_and_b_summary_and_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dmdr_rl import run

    wandb = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    out = tmp_path / "run"
    run.train("toy-dmdr", tiny_run("trainer.backend=local", f"output.dir={out}", "output.wandb={project: p}"), 8)
    report = json.loads((out / "eval" / "report.json").read_text())
    assert [init["id"] for init in wandb.inits] == [None, "run0"]  # (the training's W&B run, continued)
    summary = wandb.runs[1].summary
    assert summary["eval/judge_accuracy"] == report["judge_accuracy"] and summary["eval/fid"] == report["fid"]
    assert summary["eval/rewards/toy-align"] == report["rewards"]["toy-align"]
    assert summary["eval/judge_accuracy_by_category/single/colour"] == report["judge_accuracy_by_category"]["single/colour"]
    assert summary["eval/grid"].path == str(out / "eval" / "grid.png") and wandb.runs[1].exit_code == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [(s.step, s.value) for s in events.Scalars("eval/fid")] == [(2, pytest.approx(report["fid"], rel=1e-6))]
    assert [image.step for image in events.Images("eval/grid")] == [2]



def test_a_closing_evaluation_starts_no_w_and_b_run_of_its_own(tmp_path, monkeypatch, capsys):
    """W&B could not start for the training: the evaluation after it neither warns again nor makes a W&B run of
    its summary alone (a resume would continue that one)."""
    from dmdr_rl import run

    wandb = _FakeWandb(fails=True)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    out = tmp_path / "run"
    run.train("toy-dmdr", tiny_run("trainer.backend=local", f"output.dir={out}", "output.wandb={project: p}"), 8)
    assert len(wandb.inits) == 1 and capsys.readouterr().out.count("W&B could not start") == 1
    assert (out / "eval" / "report.json").exists() and not (out / "wandb" / "run-id").exists()
