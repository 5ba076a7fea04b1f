import re
from pathlib import Path

import pytest

from dmdr_rl.registry import BACKBONES, Registry
from reward_servers import REWARDS


def test_builtins_are_registered():
    assert "toy" in BACKBONES.names() and "toy-align" in REWARDS.names()


def test_import_paths_resolve_and_bad_ones_say_why(tmp_path, monkeypatch):
    registry = Registry("reward model")
    assert registry.resolve("dmdr_rl.toy.classifier:AlignReward").__name__ == "AlignReward"
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.rewards' .* run from the directory that "
                                         "holds 'no_such_pkg', put that directory on PYTHONPATH, or install"):
        registry.resolve("no_such_pkg.rewards:Mine")
    with pytest.raises(ValueError, match="cannot import module 'dmdr_rl.no_such_module'") as caught:  # the package is found
        registry.resolve("dmdr_rl.no_such_module:Mine")
    assert "PYTHONPATH" not in str(caught.value)
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        registry.resolve("dmdr_rl.toy.classifier:Missing")
    # a submodule or a constant where a class belongs: refused when resolved (the dry run), not when the run builds it
    with pytest.raises(ValueError, match=r"'dmdr_rl:toy' names module dmdr_rl.toy, not a class or function that builds "
                                         r"a reward model; name the class or function inside it: 'dmdr_rl.toy:Name'"):
        registry.resolve("dmdr_rl:toy")
    with pytest.raises(ValueError, match=r"'dmdr_rl.toy.classifier:__name__' names a str, not a class or function"):
        registry.resolve("dmdr_rl.toy.classifier:__name__")
    with pytest.raises(ValueError, match="unknown reward model 'hpsv9'; registered: none"):
        registry.resolve("hpsv9")
    from reward_servers.registry import REWARDS

    with pytest.raises(ValueError, match=r"unknown reward model 'toy_align'; registered: .*; did you mean toy-align\?$"):
        REWARDS.resolve("toy_align")
    # a user's module that fails as it is imported: named with the field, its own error as the cause
    (tmp_path / "broken_reward.py").write_text("raise RuntimeError('no weights at /models/mine')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"rewards.0.name: reward model 'broken_reward:Mine': cannot import module "
                                         r"'broken_reward' \(RuntimeError: no weights at /models/mine\)") as caught:
        registry.resolve("broken_reward:Mine", field="rewards.0.name")
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_a_plugin_that_cannot_be_imported_says_where_python_looked_and_what_to_do(tmp_path, monkeypatch):
    """Not found: the directories searched (the current one, PYTHONPATH's, the installed packages'; not the standard
    library) and the three ways to fix it; a package found but a module of it missing: where that package is; a
    module found whose own import fails: that, not where to put the module."""
    import sys
    import sysconfig

    registry = Registry("backbone")
    elsewhere, work = tmp_path / "elsewhere", tmp_path / "work"
    (work / "my_pkg").mkdir(parents=True)
    elsewhere.mkdir()
    (work / "my_pkg" / "__init__.py").write_text("")
    (work / "my_pkg" / "needs_dep.py").write_text("import no_such_dependency_here\n")
    (work / "my_pkg" / "needs_sibling.py").write_text("import my_pkg.no_such_sibling\n")
    monkeypatch.chdir(work)
    monkeypatch.setenv("PYTHONPATH", str(elsewhere))
    monkeypatch.setattr(sys, "path", [str(work), str(elsewhere), *sys.path])
    for name in [m for m in sys.modules if m == "my_pkg" or m.startswith("my_pkg.")]:
        monkeypatch.delitem(sys.modules, name)
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    with pytest.raises(ValueError) as caught:
        registry.resolve("no_such_dit.models:build")
    message = str(caught.value)
    assert (f"cannot import module 'no_such_dit.models' (No module named 'no_such_dit'): Python searched {work} (the "
            f"current directory), {elsewhere} (PYTHONPATH), ") in message
    assert f"{site_packages} (installed packages); run from the directory that holds 'no_such_dit', put that " \
           "directory on PYTHONPATH, or install its package into this environment (pip install)" in message
    assert sysconfig.get_paths()["stdlib"] not in message
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != work])  # e.g. a console script
    with pytest.raises(ValueError, match=rf"; not the current directory \({re.escape(str(work))}\); put the directory "
                                         r"that holds 'no_such_dit' on PYTHONPATH \(e.g. PYTHONPATH=. from it\), or install"):
        registry.resolve("no_such_dit:build")
    monkeypatch.syspath_prepend(str(work))
    with pytest.raises(ValueError, match=rf"No module named 'my_pkg.nosuch'\): 'my_pkg' \({re.escape(str(work / 'my_pkg'))}"
                                         r"\) has no module 'nosuch'$"):
        registry.resolve("my_pkg.nosuch.deeper:build")
    with pytest.raises(ValueError, match=r"'my_pkg.needs_dep' was found, and its own import of 'no_such_dependency_here' "
                                         r"failed: install the package that provides 'no_such_dependency_here'"):
        registry.resolve("my_pkg.needs_dep:build")
    with pytest.raises(ValueError, match=r"'my_pkg.needs_sibling' imports 'my_pkg.no_such_sibling', but 'my_pkg' .* has "
                                         r"no module 'no_such_sibling'") as caught:
        registry.resolve("my_pkg.needs_sibling:build")
    assert "PYTHONPATH" not in str(caught.value)  # (found: where to put it is not the problem)
    with pytest.raises(ValueError, match=r"cannot import module '' .*: an import path names a module before the colon"):
        registry.resolve(":build")


def test_double_registration_is_an_error():
    registry = Registry("backbone")
    registry.register("x")(lambda: 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("x")(lambda: 2)
    assert registry.build("x") == 1


def test_toy_backbone_checks_the_resolution():
    with pytest.raises(ValueError, match="model.resolution must be 32"):
        BACKBONES.build("toy", resolution=64)


def test_options_a_factory_does_not_take_name_the_config_field():
    from dmdr_rl.config import ConfigError, load_config
    from dmdr_rl.trainer import build_rewards

    registry = Registry("reward model")

    @registry.register("strict")
    def strict(path=None):
        raise TypeError("a bug inside the factory, not an option error")

    @registry.register("passes-on")
    def passes_on(**kwargs):
        return dict(**kwargs) if not kwargs else strict(**kwargs)

    with pytest.raises(ConfigError, match=r"'strict' cannot be built with these options .*'pth'.*; fix rewards.0.kwargs"):
        registry.build("strict", where="rewards.0.kwargs", pth="x")
    with pytest.raises(TypeError, match="a bug inside the factory"):  # not mistaken for a wrong option
        registry.build("strict", where="rewards.0.kwargs", path="x")
    with pytest.raises(ConfigError, match=r"'passes-on' cannot be built with these options .*'pth'"):
        registry.build("passes-on", where="rewards.0.kwargs", pth="x")
    cfg = load_config("toy-dmdr", ["rewards.0.kwargs={pth: x}"])
    with pytest.raises(ConfigError, match=r"reward model 'toy-align' cannot be built with these options .*; it takes device, "
                                          r"path\); fix rewards.0.kwargs"):
        build_rewards(cfg)
    with pytest.raises(ConfigError, match=r"'pickscore' cannot be built with these options .*'colour'"):  # PickScore(**kwargs)
        REWARDS.build("pickscore", where="rewards.0.kwargs", colour="red")
    # ... and the dry run names it without building anything: the built-ins that pass **kwargs on are judged by
    # what they pass them to, less what they set themselves
    from dmdr_rl.registry import BACKBONES
    from reward_servers.registry import check_reward

    for name, kwargs, taken in [("pickscore", {"devcie": "cuda"}, "cache_dir, device, dtype"),
                                ("clip-score", {"logit_scale": True}, "cache_dir, device, dtype, local_files_only, path"),
                                ("imagereward", {"visoin": {}}, "med_config, path, tokenizer, vision"),
                                ("hpsv2", {"version": "v2"}, "architecture, cache_dir, checkpoint, device, model_config"),
                                ("hpsv2.1", {"chekpoint": "x"}, "checkpoint")]:
        with pytest.raises(ConfigError, match=rf"'{name}' cannot be built with these options \(unexpected keyword "
                                              rf"argument '{next(iter(kwargs))}'; it takes .*{taken}.*\); fix rewards.0"):
            check_reward(name, kwargs, where="rewards.0")
        check_reward(name, {"device": "cpu", "cache_dir": "/tmp"} if name != "imagereward" else {"vision": {}})
    with pytest.raises(ConfigError, match=r"backbone 'sd3' .*'max_seq_length'; it takes dtype, max_sequence_length\); fix "
                                          r"model.kwargs$"):  # (not path, resolution or encoders: the run passes them)
        BACKBONES.check_options("sd3", where="model.kwargs", max_seq_length=77)
    BACKBONES.check_options("sd3", where="model.kwargs", max_sequence_length=77, dtype="bfloat16")
    for name in ("pickscore", "imagereward"):  # a precision typo is named before any loading (no weights here)
        with pytest.raises(ConfigError, match=r"rewards\[\].kwargs.dtype: 'fp16' is not a precision here; use one of float32"):
            REWARDS.build(name, where="rewards.0.kwargs", path="/nowhere", dtype="fp16")


def test_a_plugin_by_import_path_brings_its_own_check_and_a_reward_plugin_does_not(tmp_path, monkeypatch):
    """`checked_by` gives a backbone factory named by import path the check a registered one gets; reward plugins
    are checked as before (REWARDS has no plugin checks: its Ray driver need not import a reward's module)."""
    import sys

    from dmdr_rl.config import ConfigError

    (tmp_path / "checked_plugin.py").write_text(
        "from dmdr_rl.config import ConfigError\n"
        "from dmdr_rl.registry import checked_by\n"
        "seen = []\n"
        "def check(resolution=32, **rest):\n"
        "    seen.append(dict(rest, resolution=resolution))\n"
        "    if resolution % 8:\n"
        "        raise ConfigError(f'model.resolution={resolution}: a multiple of 8')\n"
        "@checked_by(check)\n"
        "def build(path=None, resolution=32, encoders=True):\n"
        "    raise AssertionError('a check builds nothing')\n"
        "class Reward:\n"  # a reward class carrying a check of its own: never called as a config check
        "    config_check = staticmethod(check)\n"
        "def plain(path=None, resolution=32, encoders=True):\n"
        "    raise AssertionError\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "checked_plugin", raising=False)
    import checked_plugin

    with pytest.raises(ConfigError, match=r"model.resolution=12: a multiple of 8"):
        BACKBONES.check("checked_plugin:build", resolution=12, prompts=["a cat"], lora_targets=None)
    BACKBONES.check("checked_plugin:build", resolution=16, prompts=["a cat"], loads_here=True)
    assert checked_plugin.seen[-1] == {"resolution": 16, "prompts": ["a cat"], "loads_here": True}
    BACKBONES.check("checked_plugin:plain", resolution=12)  # no check: nothing to refuse
    checked_plugin.seen.clear()
    REWARDS.check("checked_plugin:Reward", prompts=["a cat"], resolution=12)
    REWARDS.check("not_imported_here:Reward", prompts=["a cat"])  # (not even imported)
    assert checked_plugin.seen == [] and "not_imported_here" not in sys.modules


def test_a_ray_worker_that_cannot_import_a_plugin_says_how_the_run_sends_it(monkeypatch):
    from dmdr_rl import registry
    from dmdr_rl.config import ConfigError

    monkeypatch.setattr(registry, "_in_ray_worker", lambda: True)
    with pytest.raises(ConfigError, match=r"model.backbone: backbone 'no_such_dit:build': cannot import module 'no_such_dit' "
                                          r".*on PYTHONPATH where the run starts: it sends the module to the Ray it starts or "
                                          r"joins .*ray.init\(runtime_env=.*ray job submit --working-dir"):
        BACKBONES.resolve("no_such_dit:build", field="model.backbone")


def test_a_run_checks_its_rewards_as_the_dry_run_does_before_anything_starts(tmp_path, monkeypatch):
    """A kwargs typo in a Ray run's reward started Ray and failed two learner tries (50 s, a traceback) before the
    error; a module this process cannot import is left to the Ray workers or replicas that build the model."""
    import dmdr_rl.distributed as distributed
    from dmdr_rl import run

    (tmp_path / "my_rewards.py").write_text(
        "import torch\n\nclass Bright:\n    name = 'bright'\n    differentiable = True\n\n"
        "    def __init__(self, threshold: float = 0.5):\n        self.threshold = threshold\n\n"
        "    def score(self, images, prompts):\n        return images.mean((1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    started = []
    monkeypatch.setattr(distributed, "train_distributed", lambda cfg: started.append(cfg) or pytest.skip("not reached"))
    common = ["--preset", "toy-dmdr", "trainer.backend=ray", f"output.dir={tmp_path / 'run'}", "rewards.0.name=my_rewards:Bright"]
    with pytest.raises(SystemExit):
        run.main([*common, "rewards.0.kwargs={threshhold: 0.6}"])
    assert not started  # refused before Ray started
    monkeypatch.setattr(distributed, "train_distributed", lambda cfg: started.append(cfg) or {"stop": "here"})
    monkeypatch.setattr(run, "toy_evaluation_applies", lambda cfg: False)  # (nothing to evaluate: the fake trained none)
    run.main([*common[:-1], "rewards.0.name=only_on_the_workers:Bright"])
    assert len(started) == 1  # Ray's workers may import what this process cannot (their runtime_env)
    with pytest.raises(SystemExit):  # a local run builds it here: refused
        run.main([*common[:-1], "trainer.backend=local", "rewards.0.name=only_on_the_workers:Bright"])
