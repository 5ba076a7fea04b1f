import pytest

from dmdr_rl.registry import BACKBONES, Registry
from reward_servers import REWARDS


def test_builtins_are_registered():
    assert "toy" in BACKBONES.names() and "toy-align" in REWARDS.names()


def test_import_paths_resolve_and_bad_ones_say_why():
    registry = Registry("reward model")
    assert registry.resolve("dmdr_rl.toy.classifier:AlignReward").__name__ == "AlignReward"
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.rewards'"):
        registry.resolve("no_such_pkg.rewards:Mine")
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        registry.resolve("dmdr_rl.toy.classifier:Missing")
    with pytest.raises(ValueError, match="unknown reward model 'hpsv9'; registered: none"):
        registry.resolve("hpsv9")


def test_double_registration_is_an_error():
    registry = Registry("backbone")
    registry.register("x")(lambda: 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("x")(lambda: 2)
    assert registry.build("x") == 1


def test_toy_backbone_checks_the_resolution():
    with pytest.raises(ValueError, match="model.resolution must be 32"):
        BACKBONES.build("toy", resolution=64)
