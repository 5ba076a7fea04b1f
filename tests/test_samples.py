"""Samples as Parquet: round trip, what a training run writes, and reading files of other versions."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dmdr_rl.config import load_config
from dmdr_rl.samples import VERSION_KEY, decode_png, read_samples, write_samples
from conftest import tiny_run

PROMPTS = ["a large green diamond in the top left", "a red diamond below a purple circle"]


def test_samples_round_trip_with_pandas(tmp_path):
    images = torch.rand(2, 3, 8, 8)
    write_samples(tmp_path / "s.parquet", images, PROMPTS, seed=3, step=7, weight_version=6,
                  rewards={"toy-align": torch.tensor([-0.5, -1.0])})
    frame = read_samples(tmp_path / "s.parquet").to_pandas()
    assert list(frame["prompt"]) == PROMPTS and list(frame["step"]) == [7, 7] and list(frame["weight_version"]) == [6, 6]
    assert list(frame["reward/toy-align"]) == [-0.5, -1.0] and list(frame["width"]) == [8, 8]
    torch.testing.assert_close(decode_png(frame["png"][0]), (images[0] * 255).round() / 255)


def test_files_of_an_older_version_and_other_rewards_read_together(tmp_path):
    old = pa.table({"prompt": ["a red circle"], "seed": [0], "step": [1], "png": [b"not-decoded-here"]})
    pq.write_table(old.replace_schema_metadata({VERSION_KEY: b"1"}), tmp_path / "step_000001.parquet")
    write_samples(tmp_path / "step_000002.parquet", torch.rand(2, 3, 8, 8), PROMPTS, 0, 2, 2,
                  {"pickscore": torch.tensor([20.0, 21.0])})
    table = read_samples(tmp_path)
    assert table.column("step").to_pylist() == [1, 2, 2]
    assert table.column("weight_version").to_pylist() == [None, 2, 2]  # v1 files did not record it
    assert table.column("reward/pickscore").to_pylist() == [None, 20.0, 21.0]


def test_newer_or_foreign_or_broken_files_are_refused_with_the_reason(tmp_path):
    newer = pa.table({"prompt": ["a"], "step": [1], "png": [b""]}).replace_schema_metadata({VERSION_KEY: b"99"})
    pq.write_table(newer, tmp_path / "newer.parquet")
    with pytest.raises(ValueError, match="schema version 99, newer than this dmdr_rl reads"):
        read_samples(tmp_path / "newer.parquet")
    pq.write_table(pa.table({"caption": ["a"]}), tmp_path / "foreign.parquet")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['prompt', 'step', 'png'\]"):
        read_samples(tmp_path / "foreign.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        read_samples(tmp_path / "broken.parquet")
    with pytest.raises(FileNotFoundError, match="no samples in"):
        read_samples(tmp_path / "empty-dir-that-does-not-exist")


def test_a_training_run_writes_its_samples_as_data(tmp_path):
    from dmdr_rl.trainer import LocalTrainer

    cfg = load_config("toy-dmdr", tiny_run("output.sample_every=1", f"output.dir={tmp_path}"))
    trainer = LocalTrainer(cfg)
    trainer.train()
    grids = read_samples(sorted((tmp_path / "samples").glob("step_*.parquet"))[-1])
    row = grids.to_pylist()[5]  # a grid image again, alone, from its own seed
    again = trainer.sample([row["prompt"]], [row["seed"]])[0].clamp(0, 1)
    torch.testing.assert_close(decode_png(row["png"]), (again * 255).round() / 255, rtol=0, atol=1.5 / 255)
    assert grids.num_rows == 16 and all(s < 0 for s in grids.column("reward/toy-align").to_pylist())
    table = read_samples(tmp_path / "samples")  # grids and the rollout batches the steps trained on
    rollouts = [r for r in table.to_pylist() if r["source"] == "rollout"]
    assert {r["source"] for r in table.to_pylist()} == {"grid", "rollout"}
    assert len({r["seed"] for r in grids.to_pylist()}) == 16  # each grid image has its own seed
    assert sorted({r["step"] for r in table.to_pylist()}) == [1, 2] and len(rollouts) == 2 * 2
    assert {r["weight_version"] for r in rollouts} == {0, 1}  # the generator version that sampled each batch
