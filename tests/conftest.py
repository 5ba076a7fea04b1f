import os

import pytest
import torch

# Ray Train's controller looks at its workers every 2 s by default, so each run ends up to 2 s after its last
# step; the tests start about 30 runs. (Set before any Ray starts: its processes and the runs' subprocesses inherit it.)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# Two cores: keep torch from oversubscribing them when pytest runs alongside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# A run of two generator steps (the reward on from the second) on batches of two, logging every step and
# saving nothing in between: what most end-to-end tests start from.
TINY_RUN = ("trainer.batch_size=2", "trainer.max_steps=2", "trainer.cold_start=1", "dmd.ratio=1", "student.steps=1",
            "output.log_every=1", "output.sample_every=1000", "output.checkpoint_every=1000")


def tiny_run(*overrides: str) -> list[str]:
    """TINY_RUN followed by `overrides` (a later override of the same field wins)."""
    return [*TINY_RUN, *overrides]


@pytest.fixture()
def backbone():
    """A tiny random toy backbone with generator and critic LoRAs, both non-zero so that every path carries
    gradient (the step functions' tests)."""
    from dmdr_rl import dmdr
    from dmdr_rl.toy.teacher import ToyBackbone, create_teacher_transformer
    from dmdr_rl.toy.text import ToyTextEncoder

    torch.manual_seed(0)
    b = ToyBackbone(create_teacher_transformer(seed=0), ToyTextEncoder.create(seed=0))
    b.add_lora(dmdr.GENERATOR, rank=4, alpha=8)
    b.add_lora(dmdr.CRITIC, rank=4, alpha=4)
    with torch.no_grad():
        for p in b.trainable_parameters(dmdr.GENERATOR) + b.trainable_parameters(dmdr.CRITIC):
            p.add_(0.02 * torch.randn_like(p))
    return b


@pytest.fixture(scope="session")
def teacher():
    from dmdr_rl.toy.weights import load_teacher

    return load_teacher()


@pytest.fixture(scope="session")
def judge():
    from dmdr_rl.toy.weights import load_judge

    return load_judge()


@pytest.fixture(scope="session")
def align():
    from dmdr_rl.toy.weights import load_align

    return load_align()


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny random-weight SD3 pipeline saved like a real model directory (built once per test run)."""
    from dmdr_rl.tiny import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_sd3_overrides(tiny_sd3):
    """Config overrides that put a run on the tiny SD3 pipeline."""
    return _tiny_overrides("sd3", tiny_sd3)


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A tiny random-weight FLUX.1-dev-shaped pipeline (guidance embedding) saved like a real model directory."""
    from dmdr_rl.tiny import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_flux_overrides(tiny_flux):
    """Config overrides that put a run on the tiny Flux pipeline."""
    return _tiny_overrides("flux", tiny_flux)


def _tiny_overrides(backbone: str, path) -> list[str]:
    return [f"model.backbone={backbone}", "model.resolution=32", "model.kwargs={max_sequence_length: 16}", f"model.path={path}"]


def backbone_overrides(request, backbone: str) -> list[str]:
    """The overrides that put a run on `backbone`: toy (none), or the tiny sd3 / flux pipeline."""
    return [] if backbone == "toy" else request.getfixturevalue(f"tiny_{backbone}_overrides")


def exported_pipeline(base, export, fmt: str, settings: dict):
    """The family's diffusers pipeline of `base` (student.json's `pipeline`) with `export` loaded as the export's
    recipe says (`dmdr_rl.export.diffusers_recipe`): the LoRA or the transformer, and the scheduler's settings."""
    import diffusers

    pipe = getattr(diffusers, settings["pipeline"]).from_pretrained(base)
    if fmt == "lora":
        pipe.load_lora_weights(export)
    else:
        pipe.transformer = getattr(diffusers, settings["transformer_class"]).from_pretrained(export)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, shift=settings["scheduler_shift"], **settings["scheduler_settings"])
    return pipe


def pytest_sessionfinish(session, exitstatus):
    """Stop torch inductor's compile workers, if a test started them, before the interpreter exits."""
    import sys

    if "torch._inductor.async_compile" in sys.modules:
        try:
            sys.modules["torch._inductor.async_compile"].shutdown_compile_workers()
        except Exception:  # noqa: BLE001 - (a cleanup; the tests' outcome stands)
            pass
