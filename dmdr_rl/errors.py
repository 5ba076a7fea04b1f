"""What an error was raised from: the one walk over an exception's chain that the run's handlers share; and the
error a Ray run ends with when its learner fails in a way another try would meet again."""
from __future__ import annotations

from typing import Callable


def in_cause_chain(err: BaseException | None, matches: Callable[[BaseException], bool], *,
                   implicit: bool = True) -> bool:
    """Whether `err`, or an error it was raised from, `matches`: `raise ... from` links, and with `implicit` also
    an error being handled when it was raised (Python wraps some in others: a Ctrl-C inside a class body's
    `__set_name__` reaches the caller as a RuntimeError). A chain that loops (set by hand) ends the walk."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if matches(err):
            return True
        seen.add(id(err))
        err = err.__cause__ or (err.__context__ if implicit else None)
    return False


class LearnerFailedError(RuntimeError):
    """A Ray run's learner failed in a way another try would meet again (a reward model that cannot score, an error
    recurring in ray.same_failure_limit tries): the run ends with it. A command shows it as one `error:` line; the
    learner's own traceback is on the console above it."""
