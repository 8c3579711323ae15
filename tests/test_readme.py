"""Every command of the README's bash blocks runs as written (issue #21 item 1), on the synthetic
CIFAR-10, and the README's and docs' relative links lead to files and headings that exist.

Each command runs in a fresh folder holding links to the repository's files (jobs/, slurm/, ...)
but not its outputs (data/, runs/): the commands write there, never into the checkout, exactly
where a user's would go relative to the repository root. `.venv/bin/python -m MODULE` and
`.venv/bin/python SCRIPT` run in this process (helpers.run_main), with CIFAR10_SOURCE naming the
synthetic set, so `prepare` reads no network, and without a W&B key, as on a new machine.

Not run: `./setup.sh` (CI has just run it, .ci/run) and `python -m pytest` (the suite this test is
part of). A command too long for CI runs with the short-run addition its README comment names, and
only that: `train.epochs=1` for the training command (16 epochs otherwise); `--dry-run` for the
sweep, which checks what can be checked without 7 x 75 s of training: the profile, the cluster
settings, every job's config and the data, and prints each job's command (tests/test_sweeps.py
and tests/test_launch.py run local and SLURM sweeps to the end).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from helpers import ENTRY_POINTS, REPO, Result, run_main

README = REPO / "README.md"
PYTHON = ".venv/bin/python"
# What the test does not run, and why (see the module's docstring).
EXEMPT = {"./setup.sh": "CI has just run it", f"{PYTHON} -m pytest": "the suite this test is part of"}
# The short-run addition of a command too long for CI, by entry point; the README's comment on the
# command must name it, so the test runs what the README tells a user to try.
SHORT = {"trainer": ["train.epochs=1"], "jobs/launch.py": ["--dry-run"]}
OUTPUTS = ("data", "runs")  # what the README's commands write, relative to the repository root


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(command, comment) of every line of the text's ```bash blocks, in order."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            command, _, comment = line.partition(" # ")
            if command.strip():
                lines.append((command.strip(), comment.strip()))
    return lines


def exempt(command: str) -> str | None:
    """Why the command is not run here, or None."""
    return next((why for prefix, why in EXEMPT.items() if command == prefix or command.startswith(prefix + " ")),
                None)


def entry_and_argv(command: str, comment: str) -> tuple[str, list[str]]:
    """The entry point (a key of helpers.ENTRY_POINTS) and the arguments the test runs it with: the
    command's own, plus its short-run addition, which the README's comment must name."""
    argv = shlex.split(command)
    if argv[0] != PYTHON or len(argv) < 2:
        raise AssertionError(f"README command {command!r}: not `{PYTHON} -m MODULE ...` or `{PYTHON} SCRIPT ...`; "
                             f"teach tests/test_readme.py to run it, or say in EXEMPT why it is not run")
    entry, args = (argv[2], argv[3:]) if argv[1] == "-m" else (argv[1], argv[2:])
    if entry not in ENTRY_POINTS:
        raise AssertionError(f"README command {command!r}: {entry} is no entry point of helpers.ENTRY_POINTS")
    extra = SHORT.get(entry, [])
    for token in extra:
        assert token in comment, f"README command {command!r}: its comment must name the short run ({token}) CI adds"
    return entry, [*args, *extra]


def run_readme_command(command: str, comment: str, folder: Path) -> Result:
    entry, argv = entry_and_argv(command, comment)
    return run_main(entry, *argv, cwd=folder)


@pytest.fixture
def user_folder(tmp_path, cifar_source, monkeypatch) -> Path:
    """The repository as a user's checkout looks to a command, without its outputs; no W&B key."""
    folder = tmp_path / "checkout"
    folder.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in OUTPUTS and entry.name != ".git":
            (folder / entry.name).symlink_to(entry)
    monkeypatch.setenv("CIFAR10_SOURCE", str(cifar_source))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # never online, should a netrc entry exist on this machine
    return folder


def test_readme_commands_are_all_known_and_name_their_short_runs():
    commands = readme_commands(README.read_text())
    assert len(commands) >= 4, commands  # setup, prepare, train, sweep at least
    run = [c for c in commands if not exempt(c[0])]
    entries = [entry_and_argv(command, comment)[0] for command, comment in run]
    assert {"trainer.data", "trainer", "jobs/launch.py"} <= set(entries), entries


# Slow: one epoch of tiny.yaml on the synthetic set (whitening fit, 6-view TTA, an offline W&B run)
# is most of it: 15 s on a quiet 2-core machine, 100 s with other test runs beside it.
@pytest.mark.slow
def test_every_readme_command_runs_as_written(user_folder):
    from trainer import models

    before = _outputs_in_the_checkout()
    for command, comment in readme_commands(README.read_text()):
        if exempt(command):
            continue
        done = run_readme_command(command, comment, user_folder)
        assert done.returncode == 0, f"README command {command!r} failed:\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        if "--dry-run" in entry_and_argv(command, comment)[1]:  # the sweep: the seven, on this machine
            assert "(executor: local; nothing submitted)" in done.stdout, done.stdout
            assert all(f"\n{name}: nodes=" in done.stdout for name in models.seed_names()), done.stdout
    assert (user_folder / "data/cifar10/train.beton").is_file()
    assert list((user_folder / "runs").glob("resnet9_tiny-*/summary.json"))
    assert _outputs_in_the_checkout() == before  # written in the user's folder, not through a link


def _outputs_in_the_checkout() -> set[Path]:
    return {p for name in OUTPUTS if (REPO / name).is_dir() for p in (REPO / name).rglob("*")}


def test_a_readme_command_that_does_not_run_fails_the_test(user_folder):
    # What the test above would see had someone edited the README's training command into one that
    # does not run: a config that is not there, or an override the trainer refuses.
    for broken in (f"{PYTHON} -m trainer --config jobs/configs/tinny.yaml",
                   f"{PYTHON} -m trainer --config jobs/configs/tiny.yaml train.epoch=1"):
        assert run_readme_command(broken, "a first try: add train.epochs=1", user_folder).returncode != 0
    with pytest.raises(AssertionError, match="short run"):
        entry_and_argv(f"{PYTHON} -m trainer --config jobs/configs/tiny.yaml", "train one network")
    with pytest.raises(AssertionError, match="teach tests/test_readme.py"):
        entry_and_argv("python3 -m trainer --config jobs/configs/tiny.yaml", "")


def test_readme_and_docs_links_lead_to_files():
    # Relative links only (the web's are not checked offline); an anchor must be a heading of its file.
    for page in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.relative_to(REPO)}: link to {target}: no such file"
            if anchor and file.suffix == ".md":
                assert anchor in _anchors(file.read_text()), \
                    f"{page.relative_to(REPO)}: link to {target}: no such heading"


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
