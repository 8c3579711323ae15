"""The files of a run folder, by name, and the readers of its metrics and its training-loss steps.

    runs/<arch>-<timestamp>/      (or runs/<sweep>/<arch>/ in a sweep)
        .lock                     held by the trainer using the folder; names its PID and host
        config.yaml               the resolved config, written once the command is known to be valid
        metrics.jsonl             one JSON object per finished epoch, appended by rank 0
        steps.jsonl               one JSON object per logging.log_every steps (step, epoch, loss, lr), appended by
                                  rank 0; a resumed run logs again the steps after its checkpoint: the last wins
        checkpoints/              last.pt, prev.pt, best.pt
        summary.json              written when the run ends
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from trainer import UserError

LOCK = ".lock"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
WANDB = "wandb.json"  # the run's W&B id, mode and URL (or offline folder), for --status and the sweep's sync
REPLACED = ".replaced-"  # --restart and the launcher's --force rename the old folder <dir>.replaced-<time>
RESTART_HINT = f"to start this run over deliberately, add --restart (the old folder is kept as <dir>{REPLACED}<time>)"


def _read_jsonl(path: Path, skipped: list[str] | None) -> list[dict]:
    """The JSON objects of a file of one per line ([] if there is no such file); a line that is not
    one raises ValueError, or with a `skipped` list is left out and described there."""
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


def read_metrics(path: str | os.PathLike, skipped: list[str] | None = None) -> list[dict]:
    """The epochs of a metrics.jsonl (a run folder may be given instead of the file), in order;
    [] if there is none yet.

    A line that is not a JSON object raises ValueError naming the file and the line, so callers
    decide whether a damaged history is fatal. Passing a list as `skipped` asks for every readable
    line instead: each unreadable one (e.g. cut short by a crash or a full disk) is left out and
    described in `skipped`, one string per line.
    """
    path = Path(path)
    return _read_jsonl(path / METRICS if path.is_dir() else path, skipped)


def read_steps(path: str | os.PathLike, skipped: list[str] | None = None) -> list[dict]:
    """The training-loss points of a steps.jsonl (or of the run folder given), one per step in step
    order; [] if there is none (a run from before steps.jsonl, or shorter than logging.log_every).

    A resumed run trains again the steps after its checkpoint and logs them again: the last line of
    a step wins. Unreadable lines and lines without an integer `step` are handled as read_metrics
    handles unreadable ones (ValueError, or left out and described in `skipped`)."""
    path = Path(path)
    path = path / STEPS if path.is_dir() else path
    by_step: dict[int, dict] = {}
    for row in _read_jsonl(path, skipped):
        step = row.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            by_step[step] = row
        elif skipped is None:
            raise ValueError(f"{path}: a line without an integer step: {json.dumps(row)[:80]}")
        else:
            skipped.append(f"{path}: a line without an integer step")
    return [by_step[s] for s in sorted(by_step)]


def aside_path(run_dir: Path) -> Path:
    """The free name a run folder is moved aside to, never deleted: <dir>.replaced-<time>, with -2,
    -3... when a folder replaced within the same second holds that name."""
    run_dir = Path(run_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        aside = run_dir.with_name(f"{run_dir.name}{REPLACED}{stamp}" + (f"-{n}" if n > 1 else ""))
        if not aside.exists():
            return aside
    raise UserError(f"{run_dir}: too many replaced copies named {aside.name}")


def move_aside(run_dir: Path) -> Path | None:
    """Renames `run_dir` to its aside_path; where it went, or None if there was no such folder."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    kept = aside_path(run_dir)
    run_dir.rename(kept)
    return kept
