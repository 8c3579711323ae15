"""Where a number came from: code version, software, device. Written next to every result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def git_sha() -> str | None:
    """The checkout's commit, with '-dirty' if it has uncommitted changes; None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def command() -> str:
    """How this process was started, as typed: `python -m trainer ...` rather than the path of
    trainer/__main__.py that sys.argv holds."""
    main = Path(sys.argv[0])
    if main.name == "__main__.py" and main.parent.name:
        return " ".join(["python", "-m", main.parent.name, *sys.argv[1:]])
    return " ".join(["python", *sys.argv])
