"""What the command-line entry points share."""

from __future__ import annotations

import re
import sys
from pathlib import Path

# the console scripts pyproject.toml installs, by the module whose main() they run
CONSOLE_SCRIPTS = {"dmdr_rl.run": "dmdr-rl", "dmdr_rl.eval": "dmdr-rl-eval"}


def command_name(module: str) -> str:
    """How the user started `module`'s command, for its usage line: its console script, or `python -m module`."""
    script = CONSOLE_SCRIPTS.get(module)
    return script if script is not None and Path(sys.argv[0]).name == script else f"python -m {module}"


def with_article(word: str) -> str:
    """`word` after "a" or "an" as it is read: an SD3, a Flux, an 8-step, an 11-step, a UNet, an int (a backbone, a
    class or a count named in a message)."""
    number = re.match(r"\d+", word)
    if number:  # eight, eleven, eighteen (and their thousands)
        vowel = number[0].startswith("8") or (len(number[0]) % 3 == 2 and number[0].startswith(("11", "18")))
    elif len(word) > 1 and word[0].isupper() and (word[1].isupper() or word[1].isdigit()):  # read letter by letter
        vowel = word[0] in "AEFHILMNORSX"
    else:
        vowel = word[:1].lower() in ("a", "e", "i", "o", "u")
    return f"{'an' if vowel else 'a'} {word}"


def command_summary(doc: str) -> str:
    """A module docstring's first paragraph as one line: a command's --help description (its first line
    alone may stop mid-sentence)."""
    return " ".join(doc.split("\n\n")[0].split())


def fixable_errors() -> tuple[type[BaseException], ...]:
    """The errors that name what the user can fix (a config field, a path, a model, a store, a reward app):
    a command shows them as one `error: ...` line, not a traceback. Imported when a command runs, not
    at import (--help needs no torch)."""
    from reward_servers.protocol import RewardInputError, RewardLoadError, RewardServerError

    from .config import ConfigError
    from .errors import LearnerFailedError
    from .latent import BackboneLoadError
    from .store import StoreError
    from .toy.weights import ToyWeightsError

    return (ConfigError, BackboneLoadError, LearnerFailedError, RewardInputError, RewardLoadError, RewardServerError,
            StoreError, ToyWeightsError)
