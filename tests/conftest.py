import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when pytest runs alongside other work, or in several
# pytest-xdist workers (`make test` runs two)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))

# Each of these starts Ray on this machine (a module's local Ray, or `ray start --head`), and a plain
# ray.init() or Ray's state API finds a cluster already running here: they must run one after another.
RAY_MODULES = ("test_distributed.py", "test_job_submit.py", "test_reward_serving.py")


def _starts_ray(nodeid: str) -> bool:
    return nodeid.partition("::")[0].rpartition("/")[2] in RAY_MODULES


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (`make test` runs two workers): the Ray tests are one unit of work, which one
    worker runs while the others take the remaining tests one by one. (xdist's own `--dist loadgroup`
    would do it with marks, but its grouping is lost on pytest 9, whose node ids it cannot rewrite.)"""
    from xdist.scheduler import LoadScopeScheduling

    class RayTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "ray" if _starts_ray(nodeid) else nodeid

    return RayTestsTogether(config, log)


def pytest_collection_modifyitems(config, items):
    """The Ray tests first: the worker that takes them starts on the suite's longest part at once."""
    items.sort(key=lambda item: not _starts_ray(item.nodeid))  # (stable: each part keeps its order)


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
    return ["model.backbone=sd3", "model.resolution=32", "model.kwargs={max_sequence_length: 16}", f"model.path={tiny_sd3}"]
