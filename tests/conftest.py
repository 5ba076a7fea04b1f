import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when pytest runs alongside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
