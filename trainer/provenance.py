"""Where a number came from: code version, software, device. Written next to every result.

    python -m trainer.provenance stamp [--out PATH]

The code version is the git commit. A copy of the tree without `.git` (a machine the working tree
was copied to, an installed wheel) has no commit to ask for, so the build scripts write a stamp
first (`trainer/_stamp.json`, git-ignored, packed into the project's wheel): the commit as git
described it then, and the SHA-256 of every file of the tree (tracked and untracked-not-ignored).
Where git cannot answer, `git_sha()` answers from the stamp and adds '-modified' when the files no
longer match it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from trainer import UserError, cli
from trainer.files import sha256, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(__file__).resolve().parent.name
STAMP = Path(__file__).resolve().with_name("_stamp.json")


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def _checkout_sha() -> str | None:
    """The commit of the checkout this package sits in, with '-dirty' for uncommitted changes to
    tracked files; None unless REPO is itself the top of a git checkout (an installed copy inside
    some other checkout, a venv in this one for instance, must not report that checkout's commit)."""
    out = _git("rev-parse", "--show-toplevel", "HEAD")
    if out is None:
        return None
    top, sha = out.splitlines()
    if Path(top).resolve() != REPO:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return sha + ("-dirty" if dirty else "")


def write_stamp(out: Path = STAMP) -> dict:
    """Records the commit and the content of the tree's files: tracked and untracked-not-ignored,
    what a copy of the working tree holds. Needs git."""
    sha = _checkout_sha()
    listing = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if sha is None or listing is None:
        raise UserError(f"{REPO} is not the top of a git checkout: nothing to stamp")
    files = sorted(p for p in listing.split("\0") if p and (REPO / p).is_file() and REPO / p != STAMP)
    # No time of writing: the same tree gives the same stamp, and so the same wheel.
    stamp = {"git_sha": sha, "files": {p: sha256(REPO / p) for p in files}}
    write_text_atomic(out, json.dumps(stamp, indent=1) + "\n")
    return stamp


def stamp_status(stamp: dict, root: Path = REPO) -> list[str]:
    """The stamped files that are missing or differ under `root`. In a source tree (root holds
    pyproject.toml) that is every stamped file; in an installed package only the package's own."""
    files = stamp["files"]
    if not (root / "pyproject.toml").is_file():
        files = {p: h for p, h in files.items() if p.startswith(f"{PACKAGE}/")}
    return [p for p, h in files.items() if not (root / p).is_file() or sha256(root / p) != h]


def _stamped_sha() -> str | None:
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return None
    return stamp["git_sha"] + ("-modified" if stamp_status(stamp) else "")


def git_sha() -> str | None:
    """The checkout's commit ('-dirty' with uncommitted changes); without a checkout, the stamp's
    ('-modified' when the files differ from it); None when there is neither."""
    return _checkout_sha() or _stamped_sha()


def command() -> str:
    """How this process was started, as typed: `python -m trainer ...` rather than the path of
    trainer/__main__.py that sys.argv holds."""
    main = Path(sys.argv[0])
    if main.name == "__main__.py" and main.parent.name:
        return " ".join(["python", "-m", main.parent.name, *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.provenance", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    stamp = sub.add_parser("stamp", help="record the commit and the content of the tree's files, for copies without .git")
    stamp.add_argument("--out", type=Path, default=STAMP, help=f"where to write it (default {STAMP.relative_to(REPO)})")
    args = parser.parse_args()
    record = write_stamp(args.out)
    print(f"stamp: {record['git_sha']}, {len(record['files'])} files -> {args.out}")


if __name__ == "__main__":
    cli.run(main)
