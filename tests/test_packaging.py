"""The package's declared dependencies against its imports and the tested lock: every module-level import
is a dependency or an extra's (modules of an extra's feature, such as reward_servers/serve.py with
`ray`, import it at the top), and the lock satisfies every range."""

import ast
import importlib.metadata
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dmdr_rl", "actors", "learner", "reward_servers")
# extras for hardware this machine lacks (bitsandbytes: CUDA), and for an online service (wandb: its tests use a
# stand-in, tests/test_tracking.py; the real package was checked by hand, offline)
NOT_LOCKED = {"adamw8bit", "wandb"}
FROM_AN_EXTRA = {"fastapi": "ray[serve]"}  # what an extra's own requirements bring (reward_servers/serve.py)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_normal(Requirement(name).name)] = version.strip()
    return pins


def _module_level_imports(path: Path) -> set[str]:
    """Top-level names imported when the module loads (not inside functions: those are optional features)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_module_level_import_is_a_declared_dependency():
    project = _pyproject()["project"]
    declared = {_normal(Requirement(spec).name) for spec in project["dependencies"]}
    optional = {_normal(Requirement(spec).name) for specs in project["optional-dependencies"].values() for spec in specs}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for name in _module_level_imports(path):
                if name in PACKAGES or name in sys.stdlib_module_names or name in FROM_AN_EXTRA or name == "__future__":
                    continue
                dists = {_normal(d) for d in distributions.get(name, [name])}
                if not dists & (declared | optional):
                    undeclared.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"


def test_the_lock_satisfies_every_declared_range():
    project, pins = _pyproject()["project"], _lock()
    specs = list(project["dependencies"]) + [spec for extra, specs in project["optional-dependencies"].items()
                                             if extra not in NOT_LOCKED for spec in specs]
    assert len(specs) > 15
    unmet = []
    for spec in specs:
        requirement = Requirement(spec)
        pinned = pins.get(_normal(requirement.name))
        if pinned is None or not requirement.specifier.contains(pinned, prereleases=True):
            unmet.append(f"{spec} (lock: {pinned})")
    assert not unmet, f"the lock does not satisfy: {unmet}"
    assert "setuptools" in pins  # torch needs one (>=77) and the editable install builds with it: pinned, not latest


def test_make_clean_keeps_the_training_runs_and_clean_runs_deletes_them():
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")

    def removed(target: str) -> set[str]:
        commands = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, check=True).stdout
        return {word for line in commands.splitlines() if line.startswith("rm ") for word in line.split()[2:]}

    assert "runs" not in removed("clean") and ".pytest_cache" in removed("clean")
    assert removed("clean-runs") == {"runs"}
