"""Experiment trackers beside the run store and TensorBoard: Weights & Biases (`output.wandb`).

One W&B run per training run: its id is kept in the run directory (`wandb/run-id`), so a resumed run and a
restarted Ray learner log to the same W&B run (`resume="allow"`), and a fresh run in the same directory,
which sets the earlier run's files aside, starts a new one.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import RunConfig

RUN_ID_FILE = "run-id"  # under <run directory>/wandb/, beside W&B's own files


def wandb_missing(cfg: RunConfig) -> str | None:
    """Why `output.wandb` cannot log from this machine (its package is not installed), or None."""
    if cfg.output.wandb is None or find_spec("wandb") is not None:
        return None
    return ("output.wandb needs the wandb package, which is not installed here: `pip install wandb` (or the "
            "project's extra, `pip install -e '.[wandb]'`) where the learner runs, or set output.wandb=null")


def require_trackers(cfg: RunConfig) -> None:
    """ConfigError for a tracker the config asks for that cannot log from this machine (before models load)."""
    missing = wandb_missing(cfg)
    if missing is not None:
        from .config import ConfigError

        raise ConfigError(missing)


def open_wandb_run(cfg: RunConfig, directory: Path):
    """The W&B run of the training run in `directory` (resumed by its kept id), or None without `output.wandb`."""
    spec = cfg.output.wandb
    if spec is None:
        return None
    require_trackers(cfg)
    import wandb

    from .store import write_text_whole
    from .trainer import run_config_dump

    id_file = directory / "wandb" / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None
    id_file.parent.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=spec.project, entity=spec.entity, name=cfg.name, tags=list(spec.tags), mode=spec.mode,
                     dir=str(directory), config=run_config_dump(cfg), id=run_id, resume="allow" if run_id else None)
    if run_id is None:
        write_text_whole(id_file, run.id + "\n")
    return run
