"""Weights & Biases logging (output.wandb), against a stand-in for the wandb package (the tests run offline
and without it): one W&B run per training run, resumed by its kept id, with the same metrics as metrics.jsonl."""

import importlib.machinery
import importlib.util
import json
import types

import pytest

from dmdr_rl.config import ConfigError, load_config
from conftest import tiny_run


class _FakeWandb(types.ModuleType):
    """The calls dmdr_rl makes: init(...) -> a run with .id, .log(metrics, step=), .finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # (found by importlib.util.find_spec)
        self.inits, self.runs = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        run = types.SimpleNamespace(id=kwargs["id"] or f"run{len(self.runs)}", logged=[], finished=False)
        run.log = lambda metrics, step: run.logged.append((step, dict(metrics)))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_its_metrics_to_one_wandb_run_which_a_resumed_run_continues(tmp_path, monkeypatch):
    from dmdr_rl.trainer import LocalTrainer

    wandb = _FakeWandb()
    monkeypatch.setitem(__import__("sys").modules, "wandb", wandb)
    out = tmp_path / "run"
    overrides = tiny_run(f"output.dir={out}", "output.wandb={project: dmdr-tests, mode: offline, tags: [toy]}")
    LocalTrainer(load_config("toy-dmdr", overrides)).train()
    first = wandb.inits[0]
    assert {k: first[k] for k in ("project", "name", "mode", "tags", "id", "resume")} == {
        "project": "dmdr-tests", "name": "toy-dmdr", "mode": "offline", "tags": ["toy"], "id": None, "resume": None}
    assert first["dir"] == str(out) and first["config"]["output"]["wandb"]["project"] == "dmdr-tests"
    logged = wandb.runs[0].logged
    assert [step for step, _ in logged] == [1, 2] and wandb.runs[0].finished
    assert [{"step": step, **values} for step, values in logged] == [
        {k: v for k, v in row.items() if k not in ("id", "time")} for row in _metrics(out)]  # metrics.jsonl's
    assert (out / "wandb" / "run-id").read_text().strip() == "run0"

    resumed = load_config("toy-dmdr", [*overrides, "trainer.max_steps=4", f"trainer.resume_from={out}"])
    LocalTrainer(resumed).train()
    assert (wandb.inits[1]["id"], wandb.inits[1]["resume"]) == ("run0", "allow")  # the same W&B run, continued
    assert [step for step, _ in wandb.runs[1].logged] == [3, 4]

    LocalTrainer(load_config("toy-dmdr", overrides)).train()  # a fresh run in the directory: a W&B run of its own
    assert wandb.inits[2]["id"] is None and (out / "wandb" / "run-id").read_text().strip() == "run2"
    assert [p.name for p in (out / "previous").iterdir() if (p / "wandb" / "run-id").exists()]  # (set aside with the rest)


def test_output_wandb_without_its_package_is_refused_before_the_models_load(tmp_path, monkeypatch, capsys):
    import dmdr_rl.tracking as tracking
    from dmdr_rl import run
    from dmdr_rl.trainer import LocalTrainer

    monkeypatch.setattr(tracking, "find_spec", lambda name: None if name == "wandb" else importlib.util.find_spec(name))
    monkeypatch.setattr("dmdr_rl.trainer.build_backbone", lambda *a, **k: pytest.fail("the models loaded first"))
    cfg = load_config("toy-dmdr", tiny_run(f"output.dir={tmp_path / 'run'}", "output.wandb={project: p}"))
    with pytest.raises(ConfigError, match=r"output.wandb needs the wandb package.*pip install wandb.*output.wandb=null"):
        LocalTrainer(cfg)
    assert any("output.wandb needs the wandb package" in note for note in run._missing_packages(cfg))  # (the dry run)
