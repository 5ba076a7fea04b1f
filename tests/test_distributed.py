"""The Ray runtime on a local Ray: the same losses as the single-process trainer, the ledger, and
checkpoints in the local trainer's layout."""

import json

import pytest

ray = pytest.importorskip("ray")

from dmdr_rl.config import load_config  # noqa: E402
from dmdr_rl.distributed import train_distributed  # noqa: E402
from dmdr_rl.trainer import LocalTrainer  # noqa: E402

TINY = {"trainer.batch_size": 4, "trainer.max_steps": 3, "trainer.cold_start": 1, "dmd.ratio": 2, "student.steps": 2,
        "output.log_every": 1, "output.sample_every": 1000, "output.checkpoint_every": 3,
        "trainer.lr_generator": 1e-3, "trainer.lr_critic": 1e-3}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(out, **extra):
    return load_config("toy-dmdr", [f"{k}={v}" for k, v in {**TINY, "output.dir": str(out), **extra}.items()])


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], {k: v for k, v in r.items() if k.startswith("loss/") or k.startswith("reward/")}) for r in rows]


def test_synchronous_runtime_reproduces_the_local_trainer(tmp_path, local_ray):
    LocalTrainer(_config(tmp_path / "local")).train()
    summary = train_distributed(_config(tmp_path / "ray", **{"trainer.backend": "ray", "ray.max_staleness": 0}))
    assert summary["generator_steps"] == 3
    local, distributed = _losses(tmp_path / "local"), _losses(tmp_path / "ray")
    assert [s for s, _ in local] == [s for s, _ in distributed] == [1, 2, 3]
    assert "loss/reward/toy-align" in local[2][1]
    for (_, a), (_, b) in zip(local, distributed):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    # The ledger: every batch issued once and consumed once, in order, at staleness 0.
    ledger = [json.loads(line) for line in (tmp_path / "ray" / "ledger.jsonl").read_text().splitlines()]
    consumed = [(e["iteration"], e["rank"]) for e in ledger if e["event"] == "consumed"]
    assert consumed == [(i, 0) for i in range(6)]
    assert all(e["generator_step"] == e["weight_version"] for e in ledger if e["event"] == "consumed")
    # Checkpoints land in the local trainer's layout, so eval and resume read either.
    latest = (tmp_path / "ray" / "checkpoints" / "latest").read_text().strip()
    assert (tmp_path / "ray" / "checkpoints" / latest / "generator.safetensors").exists()
