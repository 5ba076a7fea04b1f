"""What every benchmark does with its report at the end: write it as JSON (what docs/benchmarks/ keeps)."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(path: Path | None, report: dict) -> None:
    """`report` as indented JSON at `path`, its folder made; nothing when `path` is None (no --json)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
