"""Samples as data: the images a run samples, one Parquet row each -- prompt, seed, generator step,
weight version, a score per reward model, and the PNG bytes -- readable with pandas or pyarrow:

    table = read_samples("runs/toy-dmdr/samples")        # every samples/*.parquet of the run
    df = table.to_pandas()                                # columns: prompt, seed, step, ..., reward/<name>, png
    # source: grid (a training step's sample grid), rollout (the batch it trained on), evaluation or sample

Files carry their schema version; reading unifies files of different versions and reward sets
(a column a file lacks reads as null) and refuses files from a newer dmdr_rl with a clear error.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .flow import is_one_seed
from .grid import to_uint8
from .store import written_whole

# 1: prompt, seed, step, png; 2: + weight_version, width, height, reward/<name>; 3: an evaluation's seed is
# each image's own (in version 2 it was the seed of the image's sampling batch); 4: a grid's seed is each
# image's own too, and a `source` column says what wrote the row (grid, rollout, evaluation, sample)
SCHEMA_VERSION = 4
VERSION_KEY = b"dmdr_rl.samples.version"
REQUIRED = ("prompt", "step", "png")


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_samples(path: str | Path, images: torch.Tensor, prompts: Sequence[str], seed: int | Sequence[int], step: int,
                  weight_version: int, rewards: Mapping[str, torch.Tensor] | None = None,
                  extra: Mapping[str, Sequence] | None = None, source: str | None = None) -> Path:
    """One row per image; `seed`: the batch's (all rows) or each image's own (evaluation: sampling the
    row's prompt with that seed alone gives its image again); `step`/`weight_version` -1 for samples of
    no training step (evaluation); `extra`: more columns of one value per image (e.g. the judge's verdict).
    `source`: what wrote the rows (grid, rollout, evaluation, sample). Scores and verdicts are of the
    float images; the PNG holds them rounded to 8 bits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if images.shape[0] != len(prompts):
        raise ValueError(f"write_samples got {images.shape[0]} images but {len(prompts)} prompts")
    n = len(prompts)
    seeds = [int(seed)] * n if is_one_seed(seed) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"write_samples got {len(seeds)} seeds for {n} images")
    columns = {
        "prompt": pa.array(list(prompts), pa.string()),
        "seed": pa.array(seeds, pa.int64()),
        "step": pa.array([step] * n, pa.int64()),
        "weight_version": pa.array([weight_version] * n, pa.int64()),
        "width": pa.array([images.shape[-1]] * n, pa.int32()),
        "height": pa.array([images.shape[-2]] * n, pa.int32()),
    }
    for name, scores in (rewards or {}).items():
        columns[f"reward/{name}"] = pa.array(scores.detach().float().cpu().tolist(), pa.float64())
    if source is not None:
        columns["source"] = pa.array([source] * n, pa.string())
    for name, values in (extra or {}).items():
        columns[name] = pa.array(list(values))
    columns["png"] = pa.array([_png(pixels) for pixels in to_uint8(images)], pa.binary())  # one host copy
    table = pa.table(columns).replace_schema_metadata({VERSION_KEY: str(SCHEMA_VERSION).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as pending:  # a reader during a live run never finds it half written
        pq.write_table(table, pending)
    return path


def read_samples(path: str | Path):
    """One pyarrow Table of a samples file, or of every `*.parquet` in a directory, ordered by step
    (stable: within a step, file-name order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"no samples in {path} (expected *.parquet files written by dmdr_rl)")
    tables = []
    for file in files:
        try:
            table = pq.read_table(file)
        except (OSError, pa.ArrowInvalid) as err:
            raise ValueError(f"{file} is not a readable Parquet file ({err})") from err
        version = int((table.schema.metadata or {}).get(VERSION_KEY, b"1"))
        if version > SCHEMA_VERSION:
            raise ValueError(f"{file} was written with samples schema version {version}, newer than this dmdr_rl "
                             f"reads ({SCHEMA_VERSION}); upgrade dmdr_rl to read it")
        missing = [c for c in REQUIRED if c not in table.column_names]
        if missing:
            raise ValueError(f"{file} lacks the column(s) {missing}: it is not a dmdr_rl samples file")
        tables.append(table.replace_schema_metadata(None))
    table = pa.concat_tables(tables, promote_options="default")
    return table.take(sorted(range(table.num_rows), key=table.column("step").to_pylist().__getitem__))


def decode_png(data: bytes) -> torch.Tensor:
    """A stored PNG back to an image tensor [3, H, W] in [0, 1]."""
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)
