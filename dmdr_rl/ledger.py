"""The prompt ledger: which prompt batches a run issued and consumed, as JSON lines.

Events: `issued` and `reissued` (a batch handed to a rollout worker), `consumed` (a learner rank
trained on it), `rewind` (a restarted learner resumed from a checkpoint at `iteration`, so later
consumptions are rolled back with the weights they produced). Replaying the events gives the batches
that the final weights actually learned from: `audit` checks each was used exactly once.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, event: str, **fields) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "event": event, **fields}) + "\n")

    def events(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def effective_consumption(events: list[dict]) -> list[tuple[int, int]]:
    """(iteration, rank) of every consumption that survived the rewinds, in order."""
    consumed: list[tuple[int, int]] = []
    for e in events:
        if e["event"] == "rewind":
            consumed = [c for c in consumed if c[0] < e["iteration"]]
        elif e["event"] == "consumed":
            consumed.append((e["iteration"], e["rank"]))
    return consumed


def audit(events: list[dict], iterations: int, world_size: int) -> dict:
    """Lost and duplicated batches against the expected iterations x ranks."""
    counts = Counter(effective_consumption(events))
    expected = {(i, r) for i in range(iterations) for r in range(world_size)}
    return {
        "lost": sorted(expected - set(counts)),
        "duplicated": sorted(k for k, n in counts.items() if n > 1),
        "unexpected": sorted(set(counts) - expected),
        "rewinds": sum(e["event"] == "rewind" for e in events),
        "reissued": sum(e["event"] == "reissued" for e in events),
    }
