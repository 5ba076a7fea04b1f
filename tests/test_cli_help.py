"""Every command's --help: each option says what it is for, and the default of each one that has one."""

import argparse
import importlib

import pytest

COMMANDS = ("dmdr_rl.run", "dmdr_rl.results", "dmdr_rl.export", "dmdr_rl.toy.check")


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


@pytest.mark.parametrize("module", COMMANDS)
def test_every_option_says_what_it_is_for_and_its_default(module, monkeypatch):
    for action in _parser(module, monkeypatch)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{module} {name} has no help"
        if action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            assert "default" in action.help, f"{module} {name}: its help does not give its default ({action.default})"


def test_the_main_jobs_help_says_what_runs_without_a_preset(monkeypatch):
    preset = next(a for a in _parser("dmdr_rl.run", monkeypatch)._actions if "--preset" in a.option_strings)
    assert "without it: the demo" in preset.help and "on a local Ray" in preset.help
