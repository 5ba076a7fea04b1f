"""The seeds of a run: every random draw is addressed by (run seed, iteration, stream, rank), so a resumed
run, a restarted worker or another placement draws exactly the same numbers. (No torch here: the rollout
coordinator draws prompt batches with these and loads no model.)"""

from __future__ import annotations

import numpy as np

# Independent random streams of one iteration (evaluation: of one image).
PROMPT_STREAM, ROLLOUT_STREAM, LEARNER_STREAM, EVALUATION_STREAM = 0, 1, 2, 3


def iteration_seed(seed: int, iteration: int, stream: int, rank: int = 0) -> int:
    """A 63-bit seed for one (run seed, iteration, stream, data-parallel rank), statistically
    independent of every other combination."""
    state = np.random.SeedSequence([seed, iteration + 1, stream, rank]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def image_seeds(seed: int, count: int) -> list[int]:
    """One seed per image (evaluation, sample grids, `sample`), so an image is the same whatever batch
    samples it, and its seed alone makes it again."""
    return [iteration_seed(seed, i, EVALUATION_STREAM) for i in range(count)]
