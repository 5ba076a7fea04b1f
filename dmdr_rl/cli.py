"""What the command-line entry points share."""

from __future__ import annotations


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
    from .latent import BackboneLoadError
    from .store import StoreError
    from .toy.weights import ToyWeightsError

    return (ConfigError, BackboneLoadError, RewardInputError, RewardLoadError, RewardServerError, StoreError,
            ToyWeightsError)
