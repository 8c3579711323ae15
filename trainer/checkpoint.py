"""Checkpoints in the run folder: written atomically, loadable with `weights_only=True`.

`checkpoints/last.pt` is replaced at every save; the one it replaces is kept as `prev.pt`, so a
`last.pt` that was cut short (a full disk, a node lost mid-write on a non-atomic filesystem) or is
otherwise unreadable is reported and the previous good state is used instead. `best.pt` holds the
model weights of the best test accuracy so far.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from trainer.files import atomic_path


def save(state: dict[str, Any], path: Path, keep_previous: bool = False) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        if keep_previous and path.exists():
            os.replace(path, path.with_name("prev.pt"))


def load_latest(folder: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint in `folder` (last.pt, else prev.pt), or None if there is none."""
    for name in ("last.pt", "prev.pt"):
        path = folder / name
        if not path.exists():
            continue
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, bad pickle, wrong types: all mean "not usable"
            print(f"warning: {path} is unreadable ({type(e).__name__}: {e}); trying an older checkpoint", file=sys.stderr)
    return None
