"""The files of a run folder, by name, and the one reader of its metrics.

    runs/<arch>-<timestamp>/      (or runs/<sweep>/<arch>/ in a sweep)
        config.yaml               the resolved config, written when the run starts
        metrics.jsonl             one JSON object per finished epoch, appended by rank 0
        checkpoints/              last.pt, prev.pt, best.pt
        summary.json              written when the run ends
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The epochs of a metrics.jsonl (a run folder may be given instead of the file), in order;
    [] if there is none yet. A line that is not a JSON object raises ValueError naming the file and
    the line, so callers decide whether a damaged history is fatal."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number} is not JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows
