"""Every command's --help: each option says what it is for, and the default of each one that has one; and it
answers at once, before the model stack is imported."""

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import dmdr_rl

def _all_commands() -> list[str]:
    """Every `python -m` command in the package: each module that runs its main() as __main__."""
    root = Path(dmdr_rl.__file__).parent
    return sorted(".".join(("dmdr_rl", *path.relative_to(root).with_suffix("").parts)) for path in root.rglob("*.py")
                  if 'if __name__ == "__main__":' in path.read_text())


class ParserBuilt(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The command's parser, caught where its main() would parse the command line."""
    def caught(parser, *args, **kwargs):
        raise ParserBuilt(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_intermixed_args", caught)
    with pytest.raises(ParserBuilt) as built:
        importlib.import_module(module).main([])
    return built.value.parser


@pytest.mark.parametrize("module", _all_commands())
def test_every_option_says_what_it_is_for_and_its_default(module, monkeypatch):
    for action in _parser(module, monkeypatch)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{module} {name} has no help"
        if action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                and action.default != []:  # (a repeatable option's empty list: nothing to say)
            assert "default" in action.help, f"{module} {name}: its help does not give its default ({action.default})"


def test_the_main_jobs_help_says_what_runs_without_a_preset(monkeypatch):
    preset = next(a for a in _parser("dmdr_rl.run", monkeypatch)._actions if "--preset" in a.option_strings)
    assert "without it: the demo" in preset.help and "on a local Ray" in preset.help


def test_the_commands_are_found():
    assert {"dmdr_rl.run", "dmdr_rl.results", "dmdr_rl.export", "dmdr_rl.toy.check", "dmdr_rl.eval", "dmdr_rl.sample", "dmdr_rl.toy.analytic", "dmdr_rl.toy.build"} <= {*_all_commands()}


@pytest.mark.parametrize("module", _all_commands())
def test_help_answers_without_loading_the_model_stack(module):
    """--help answers before torch is imported (importing it first cost 4-6 s per --help)."""
    code = (f"import runpy, sys\nsys.argv = [{module!r}, '--help']\ntry:\n"
            f"    runpy.run_module({module!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("usage: python -m ") and done.stdout.splitlines()[-1] == "[]", done.stdout[-500:]


def test_a_console_script_names_itself_in_its_usage_line(monkeypatch):
    """`dmdr-rl --help` said `usage: python -m dmdr_rl.run`; each script pyproject.toml installs is known by its module."""
    import tomllib

    from dmdr_rl.cli import CONSOLE_SCRIPTS

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert {target.split(":")[0]: name for name, target in scripts.items()} == CONSOLE_SCRIPTS
    for module, script in CONSOLE_SCRIPTS.items():
        monkeypatch.setattr(sys, "argv", [f"/venv/bin/{script}"])
        assert _parser(module, monkeypatch).prog == script
        monkeypatch.setattr(sys, "argv", ["/repo/dmdr_rl/__main__.py"])
        assert _parser(module, monkeypatch).prog == f"python -m {module}"
