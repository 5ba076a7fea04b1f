"""Prompt sources: the prompt batch of iteration i, a pure function of (run seed, i).

Because a batch is addressed by its iteration number, a resumed run continues the exact sequence and
the distributed runtime's ledger can name every batch it issued and consumed by that number.
"""

from __future__ import annotations

from .config import ConfigError
from .rollout import PROMPT_STREAM, iteration_seed
from .toy.grammar import PromptSplit, prompts_of


class PromptSource:
    def __init__(self, spec: str, seed: int):
        kind, _, name = spec.partition(":")
        if kind != "toy":
            raise ConfigError(f"data.prompts {spec!r}: only toy:<split> sources exist so far (toy:held-in, toy:held-out)")
        self.split = PromptSplit(name)
        self.seed = seed

    def batch(self, iteration: int, size: int) -> list[str]:
        """Iteration -1 is reserved for the sample-grid prompts."""
        return prompts_of(self.split.sample(size, seed=iteration_seed(self.seed, iteration, PROMPT_STREAM)))
