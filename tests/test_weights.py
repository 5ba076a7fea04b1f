"""The shipped toy-world weights: present, small, loadable offline, and clear errors when they are not."""

import shutil

import pytest
import torch

from dmdr_rl.toy.weights import COMPONENTS, WEIGHTS_DIR, ToyWeightsError, load_judge, load_teacher, load_text_encoder


def test_every_component_ships_with_config_and_safetensors():
    for component in COMPONENTS:
        directory = WEIGHTS_DIR / component
        assert (directory / "config.json").exists(), f"{component}: config.json missing"
        assert list(directory.glob("*.safetensors")), f"{component}: no safetensors"
    assert not list(WEIGHTS_DIR.rglob("*.bin")) and not list(WEIGHTS_DIR.rglob("*.pt"))


def test_shipped_weights_stay_under_20_mb():
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024, f"{total / 2**20:.1f} MiB"


def test_each_component_loads_with_one_call(teacher, judge, align):
    assert not any(p.requires_grad for p in teacher.transformer.parameters())
    images = teacher.sample(["a small red circle in the center", "a red circle above a blue square"], steps=2, cfg=2.0, seed=0)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert set(judge(images)) >= {"count", "shape"}
    assert align.score(images, ["a small red circle in the center"] * 2).shape == (2,)
    assert load_text_encoder() is not None


def test_missing_weights_name_the_directory_and_the_build_command(tmp_path):
    with pytest.raises(ToyWeightsError, match=r"judge weights not found in .*python -m dmdr_rl.toy.build judge"):
        load_judge(tmp_path)


def test_missing_weights_name_the_setting_that_gave_their_directory(tmp_path):
    """A reward's weights directory is not model.path: the error sends the user to the setting they gave."""
    from reward_servers.registry import REWARDS

    with pytest.raises(ToyWeightsError, match=r"check the directory \(rewards\[\]\.kwargs\.path; unset: the shipped"):
        REWARDS.resolve("toy-align")(path=str(tmp_path))
    with pytest.raises(ToyWeightsError, match=r"check the directory \(model\.path; unset: the shipped"):
        load_teacher(tmp_path)


def test_corrupt_weights_are_reported_as_such(tmp_path):
    shutil.copytree(WEIGHTS_DIR / "teacher", tmp_path / "teacher")
    shutil.copytree(WEIGHTS_DIR / "text_encoder", tmp_path / "text_encoder")
    weights = next((tmp_path / "teacher").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: 1000])
    with pytest.raises(ToyWeightsError, match="could not be loaded .*corrupt"):
        load_teacher(tmp_path)


def test_teacher_sampling_is_seeded(teacher):
    prompts = ["a large green square in the bottom left"]
    a = teacher.sample(prompts, steps=2, cfg=1.0, seed=7)
    b = teacher.sample(prompts, steps=2, cfg=1.0, seed=7)
    c = teacher.sample(prompts, steps=2, cfg=1.0, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
