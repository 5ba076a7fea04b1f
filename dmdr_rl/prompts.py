"""Prompt sources: the prompt batch of iteration i, a pure function of (run seed, i).

Because a batch is addressed by its iteration number, a resumed run continues the exact sequence and
the distributed runtime's ledger can name every batch it issued and consumed by that number.

`data.prompts` is `toy:<split>` (the toy grammar's held-in or held-out prompts) or a file: `.txt`
(one prompt per line), or `.csv` / `.parquet` / `.jsonl` with a `prompt` column (read with pyarrow).
A file's prompts are drawn uniformly with replacement, seeded by (run seed, iteration).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import ConfigError
from .seeds import PROMPT_STREAM, iteration_seed
from .toy.grammar import PromptSplit, prompts_of

FILE_SUFFIXES = (".txt", ".csv", ".parquet", ".jsonl")


class PromptSource:
    def __init__(self, spec: str, seed: int):
        self.seed = seed
        self.split, self.prompts = None, None
        self.skipped = 0  # a prompt file's rows without a prompt (empty, or null in a table), left out
        kind, _, name = spec.partition(":")
        if kind == "toy" and name:
            try:
                self.split = PromptSplit(name)
            except ValueError as err:
                raise ConfigError(f"data.prompts: {err} (e.g. data.prompts=toy:held-in)") from None
        elif Path(spec).suffix.lower() in FILE_SUFFIXES:
            self.prompts, self.skipped = read_prompt_rows(Path(spec))
        else:
            raise ConfigError(f"data.prompts {spec!r}: give toy:held-in, toy:held-out, or a prompt file "
                              f"({', '.join(FILE_SUFFIXES)})")

    def batch(self, iteration: int, size: int, group: int = 1) -> list[str]:
        """`size` prompts; with `group` > 1, size / group prompts each repeated `group` times in a row (GRPO's
        groups: several samples of one prompt). Iteration -1 is reserved for the sample-grid prompts."""
        if size % group:
            raise ValueError(f"a batch of {size} prompts cannot hold whole groups of {group}")
        seed = iteration_seed(self.seed, iteration, PROMPT_STREAM)
        if self.split is not None:
            drawn = prompts_of(self.split.sample(size // group, seed=seed))
        else:
            drawn = [self.prompts[i] for i in np.random.default_rng(seed).integers(0, len(self.prompts), size // group)]
        return [prompt for prompt in drawn for _ in range(group)]


def checked_prompt_source(cfg) -> PromptSource:
    """The run's prompt source, its prompts checked against what the backbone can encode: a bad prompt
    file fails here, before anything is built."""
    from .registry import check_model

    from reward_servers.registry import REWARDS, check_reward_files

    source = PromptSource(cfg.data.prompts, cfg.trainer.seed)
    loads_here = cfg.trainer.backend == "local"  # (Ray: on the workers, which may see other files)
    check_model(cfg.model, source.prompts or (), loads_here=loads_here, precision=cfg.trainer.precision)
    for i, spec in enumerate(cfg.rewards):  # e.g. toy-align must read every prompt as a scene, at its image size
        REWARDS.check(spec.name, prompts=spec.texts_read(source.prompts or ()), resolution=cfg.model.resolution,
                      where=f"rewards.{i}")
        if loads_here and not spec.serve.attach:  # (an attached app's own kwargs decide its model)
            check_reward_files(spec.kwargs, f"rewards.{i}")
    return source


def read_prompt_file(path: Path) -> list[str]:
    """The non-empty prompts of a file; a ConfigError naming the file and the fix otherwise."""
    return read_prompt_rows(path)[0]


def read_prompt_rows(path: Path) -> tuple[list[str], int]:
    """`read_prompt_file`, and how many of a table's rows held no prompt (empty or null): left out, and counted
    so the dry run can say so (a .txt file's blank lines are not counted: they separate, not hold, prompts)."""
    if not path.is_file():
        raise ConfigError(f"data.prompts: {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":  # a byte-order mark is not part of a prompt; read_text makes \r\n and \r \n, and
            # only \n ends a line (str.splitlines would also split at U+2028, U+0085, form feeds...)
            prompts = path.read_text(encoding="utf-8-sig").split("\n")
        else:
            table = _read_table(path, suffix)
            count = table.column_names.count("prompt")
            if count != 1:
                raise ConfigError(f"data.prompts: {path} has {'no' if count == 0 else count} 'prompt' column"
                                  f"{'s' if count else ''} (columns: {', '.join(table.column_names) or 'none'}); "
                                  "give it one column named 'prompt'")
            column = table.column("prompt")
            if not _holds_text(column.type):
                raise ConfigError(f"data.prompts: {path}'s 'prompt' column holds {column.type}, not text; write "
                                  "the prompts as strings")
            rows = column.to_pylist()
            prompts = [p for p in rows if isinstance(p, str)]
    except ConfigError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, KeyError) as err:
        raise ConfigError(f"data.prompts: cannot read {path} as {suffix} ({type(err).__name__}: {err})") from err
    kept = [p.strip() for p in prompts if p and p.strip()]
    if not kept:
        raise ConfigError(f"data.prompts: {path} contains no prompts; put one prompt per line (.txt) or in a "
                          "'prompt' column")
    return kept, (0 if suffix == ".txt" else len(rows) - len(kept))


def _holds_text(kind) -> bool:
    """Whether a column of this Arrow type holds text: strings of any layout, dictionary-encoded too (a pandas
    categorical), or nothing at all."""
    import pyarrow.types as types

    if types.is_dictionary(kind):
        return _holds_text(kind.value_type)
    return (types.is_string(kind) or types.is_large_string(kind) or types.is_null(kind)
            or getattr(types, "is_string_view", lambda _: False)(kind))


def _read_table(path: Path, suffix: str):
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    if suffix == ".parquet":
        return pyarrow.parquet.read_table(str(path))
    # One block for the whole file (prompt files are small): pyarrow's default 1 MiB blocks refuse a line longer
    # than a block, and would cut a quoted CSV prompt with a newline where a block ends.
    block_size = max(1 << 20, path.stat().st_size + 1)
    if suffix == ".csv":  # the prompt column as text even where every prompt looks like a number ("1984")
        return pyarrow.csv.read_csv(str(path), read_options=pyarrow.csv.ReadOptions(block_size=block_size),
                                    parse_options=pyarrow.csv.ParseOptions(newlines_in_values=True),
                                    convert_options=pyarrow.csv.ConvertOptions(column_types={"prompt": pyarrow.string()}))
    return pyarrow.json.read_json(str(path), read_options=pyarrow.json.ReadOptions(block_size=block_size))
