"""What the command-line entry points share."""

from __future__ import annotations


def fixable_errors() -> tuple[type[BaseException], ...]:
    """The errors that name what the user can fix (a config field, a path, a model, a store, a reward app):
    a command shows them as one `error: ...` line, not a traceback. Imported when a command runs, not
    at import (--help needs no torch)."""
    from reward_servers.protocol import RewardInputError, RewardLoadError, RewardServerError

    from .config import ConfigError
    from .sd3 import BackboneLoadError
    from .store import StoreError
    from .toy.weights import ToyWeightsError

    return (ConfigError, BackboneLoadError, RewardInputError, RewardLoadError, RewardServerError, StoreError,
            ToyWeightsError)
