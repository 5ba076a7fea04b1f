"""The prompt ledger: which prompt batches a run issued and consumed, as records of the run store.

Events: `start` (a launch begins issuing at `iteration`: 0, or a checkpoint's for a resumed run),
`issued` and `reissued` (a batch handed to a rollout worker), `consumed` (a learner rank trained on
it), `rewind` (a restarted learner resumed from a checkpoint at `iteration`); not counted:
`worker_restarted` (a stuck rollout worker killed for Ray to start again), `worker_died` (one whose batch
failed because its process died: Ray starts it again), `worker_replaced` (a fresh
actor for one whose restart failed in its constructor), `stop_requested` (the driver was stopped: the
learner ends at its next generator step), `learner_failed` (the
error a learner's try ended with) and `stale_call` (a consumption reported by a learner try that a
later one had replaced, refused). Starts and rewinds record the world size from there on (the audit
checks each stretch with its own). A start or a rewind rolls back the later consumptions, with the
weights they produced. Replaying the events gives the batches that the final weights actually learned
from: `audit` checks each was used exactly once, from the ledger's first start on (a run resumed into a
new directory learned the earlier batches elsewhere).
"""

from __future__ import annotations

from collections import Counter

NOT_COUNTED = ("worker_restarted", "worker_died", "worker_replaced", "learner_failed", "stale_call", "stop_requested")  # events about processes, not batches


class Ledger:
    """The ledger stream of a run store (files or Redis; see `dmdr_rl.store`)."""

    def __init__(self, store):
        self.store = store

    def append(self, event: str, **fields) -> None:
        self.store.append("ledger", {"event": event, **fields})

    def events(self) -> list[dict]:
        return self.store.read("ledger")


def effective_consumption(events: list[dict]) -> list[tuple[int, int]]:
    """(iteration, rank) of every consumption that survived the rewinds, in order."""
    consumed: list[tuple[int, int]] = []
    for e in events:
        if e["event"] in ("rewind", "start"):
            consumed = [c for c in consumed if c[0] < e["iteration"]]
        elif e["event"] == "consumed":
            consumed.append((e["iteration"], e["rank"]))
    return consumed


def world_sizes(events: list[dict], world_size: int) -> list[tuple[int, int]]:
    """(first iteration, learner ranks) of each stretch of the run: a start or rewind sets the ranks from
    its iteration on (a launch resumed with another ray.learner_workers); `world_size` for events that
    do not say (ledgers written before they did). Iterations before the first stretch: the caller's."""
    stretches: list[tuple[int, int]] = []
    for e in events:
        if e["event"] in ("rewind", "start"):
            stretches = [s for s in stretches if s[0] < e["iteration"]] + [(e["iteration"], e.get("world_size", world_size))]
    return stretches


def audit(events: list[dict], iterations: int, world_size: int) -> dict:
    """Lost and duplicated batches against the expected iterations x ranks (`world_size`: the current
    launch's, for events that do not record theirs)."""
    counts = Counter(effective_consumption(events))
    # a ledger that begins with a start (a launch, maybe resumed elsewhere) is checked from there; one that
    # begins otherwise (written before start events existed) from 0
    opening = next((e for e in events if e["event"] not in NOT_COUNTED), None)  # a try may fail before its start
    first = opening["iteration"] if opening is not None and opening["event"] == "start" else 0
    stretches = world_sizes(events, world_size)

    def ranks(iteration: int) -> int:
        return next((w for start, w in reversed(stretches) if start <= iteration), world_size)

    expected = {(i, r) for i in range(first, iterations) for r in range(ranks(i))}
    return {
        "lost": sorted(expected - set(counts)),
        "duplicated": sorted(k for k, n in counts.items() if n > 1),
        "unexpected": sorted(set(counts) - expected),
        "rewinds": sum(e["event"] == "rewind" for e in events),
        "reissued": sum(e["event"] == "reissued" for e in events),
        **({"stale_calls": n} if (n := sum(e["event"] == "stale_call" for e in events)) else {}),
    }
