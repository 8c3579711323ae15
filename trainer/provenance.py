"""Where a number came from: code version, software, device. Written next to every result."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import torch

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


def software() -> dict:
    return {
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
