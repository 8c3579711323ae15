"""The files of a run folder, by name, and the one reader of its metrics.

    runs/<arch>-<timestamp>/      (or runs/<sweep>/<arch>/ in a sweep)
        .lock                     held by the trainer using the folder; names its PID and host
        config.yaml               the resolved config, written once the command is known to be valid
        metrics.jsonl             one JSON object per finished epoch, appended by rank 0
        checkpoints/              last.pt, prev.pt, best.pt
        summary.json              written when the run ends
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LOCK = ".lock"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
WANDB = "wandb.json"  # the run's W&B id, mode and URL (or offline folder), for --status and the sweep's sync
REPLACED = ".replaced-"  # --restart renames the old run folder <dir>.replaced-<time>, never deletes it
RESTART_HINT = f"to start this run over deliberately, add --restart (the old folder is kept as <dir>{REPLACED}<time>)"


def read_metrics(path: str | os.PathLike, skipped: list[str] | None = None) -> list[dict]:
    """The epochs of a metrics.jsonl (a run folder may be given instead of the file), in order;
    [] if there is none yet.

    A line that is not a JSON object raises ValueError naming the file and the line, so callers
    decide whether a damaged history is fatal. Passing a list as `skipped` asks for every readable
    line instead: each unreadable one (e.g. cut short by a crash or a full disk) is left out and
    described in `skipped`, one string per line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = None if isinstance(row, dict) else "is not a JSON object"
        except json.JSONDecodeError as e:
            problem = f"is not JSON ({e})"
        if problem is None:
            rows.append(row)
        elif skipped is None:
            raise ValueError(f"{path}: line {number} {problem}")
        else:
            skipped.append(f"{path}: line {number} {problem}")
    return rows
