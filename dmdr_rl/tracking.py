"""Experiment trackers beside the run store and TensorBoard: Weights & Biases (`output.wandb`).

One W&B run per training run: its id is kept in the run directory (`wandb/run-id`), so a resumed run and a
restarted Ray learner log to the same W&B run (`resume="allow"`; offline, each launch writes its own
`offline-run-*` directory with that id), and a fresh run in the same directory, which sets the earlier
run's files aside, starts a new one. Logging is the run's side line: a W&B that cannot start (no key, no
network) is said in one line, and the run trains on with metrics.jsonl and TensorBoard. The main job's closing
evaluation goes to the same W&B run's summary, and to TensorBoard at the last generator step.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    """The W&B run of the training run in `directory` (resumed by its kept id); None without `output.wandb`,
    or when W&B cannot start (said in one line: the run goes on without it)."""
    spec = cfg.output.wandb
    if spec is None:
        return None
    require_trackers(cfg)
    import wandb

    from .store import write_text_whole
    from .trainer import run_config_dump

    id_file = directory / "wandb" / RUN_ID_FILE
    run_id = (id_file.read_text().strip() or None) if id_file.exists() else None
    id_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(project=spec.project, entity=spec.entity, name=cfg.name, tags=list(spec.tags),
                         dir=str(directory), config=_shareable(run_config_dump(cfg)), id=run_id,
                         resume="allow" if run_id else None,
                         **({"mode": spec.mode} if spec.mode else {}),  # (else WANDB_MODE, or online)
                         reinit="create_new",  # (a caller's own active run is neither reused nor finished)
                         settings=wandb.Settings(x_disable_meta=_password_in_argv(cfg)))
    except Exception as err:  # noqa: BLE001 - no key, no network, a refused project: the training goes on
        print(f"dmdr_rl: WARNING: output.wandb: W&B could not start ({type(err).__name__}: {err}); the run goes on "
              "without it (metrics.jsonl and TensorBoard have every metric)", flush=True)
        return None
    if run_id is None:
        write_text_whole(id_file, run.id + "\n")
    return run


def _shareable(config: Any) -> Any:
    """The run's config as a third-party service may see it: the values of runtime_env env_vars (a reward
    app's HF_TOKEN, say) left out. (The store password is already redacted in it.)"""
    if isinstance(config, dict):
        return {key: ({name: "<redacted>" for name in value} if key == "env_vars" and isinstance(value, dict)
                      else _shareable(value)) for key, value in config.items()}
    if isinstance(config, list):
        return [_shareable(item) for item in config]
    return config


def _password_in_argv(cfg: RunConfig) -> bool:
    """W&B records the command line with the run: not where it carries the store's password (`store.url=
    redis://:PASSWORD@...`, or its `password=` field: what `redact_url` hides); its system metadata is left
    out then."""
    from .store import redact_url

    url = cfg.store.url
    return bool(url) and redact_url(url) != url and any(url in arg for arg in sys.argv)


EVALUATION_NUMBERS = ("judge_accuracy", "judge_accuracy_by_category", "analytic_accuracy", "analytic_accuracy_by_attribute",
                      "fid", "diversity", "rewards", "num_images",
                      "nonfinite_images", "rewards_nonfinite")  # (only when some were: diverged images count 0)


def evaluation_scalars(report: dict, prefix: str = "eval") -> dict[str, float]:
    """An evaluation report's numbers as flat keys: eval/fid, eval/rewards/toy-align, eval/judge_accuracy_by_category/..."""
    flat: dict[str, float] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                add(f"{key}/{name}", item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)

    for name in EVALUATION_NUMBERS:
        if name in report:
            add(f"{prefix}/{name}", report[name])
    return flat


def add_png_image(writer, tag: str, path: Path, step: int) -> None:
    """A PNG file (a sample or evaluation grid) as a TensorBoard image."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")


def record_evaluation(cfg: RunConfig, directory: Path, report: dict, step: int, grid: Path | None) -> None:
    """The run's closing evaluation beside its training curves: TensorBoard scalars (and the grid) at the
    last generator step; in W&B the run's summary (what its runs table compares) of the same run, continued."""
    scalars = evaluation_scalars(report)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        SummaryWriter = None
    if SummaryWriter is not None:
        writer = SummaryWriter(str(directory / "tensorboard"))
        try:
            for key, value in scalars.items():
                writer.add_scalar(key, value, step)
            if grid is not None:
                add_png_image(writer, "eval/grid", grid, step)
        finally:
            writer.close()
    if not (directory / "wandb" / RUN_ID_FILE).exists():  # no W&B run trained (W&B could not start, or none asked)
        return  # (not a W&B run of the summary alone, which a resume would then continue)
    run = open_wandb_run(cfg, directory)
    if run is None:
        return
    import wandb

    try:
        run.summary.update({**scalars, **({"eval/grid": wandb.Image(str(grid), caption="evaluation")} if grid else {})})
    finally:
        run.finish(exit_code=0)
