"""Every command a user runs, as a real process: its exit code and its one `error: ...` line for bad
input, and the same exit code and stderr from the in-process run (helpers.run_main) that the other
test files use. These are the suite's anchors: what run_main shows of a command, a user sees.

Each bad input is refused before any heavy work, and before the heavy modules are imported (torch,
ffcv, submitit, wandb, matplotlib: seconds on a small CPU), so that the line comes at once (issue
#21): the processes run with `python -X importtime`, whose lines on stderr name every module
imported (they are left out of what is compared). They start together and run side by side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, SMALL, error_lines, run_main

# Each command with a bad input: the exit code and the stderr line (the last line, after argparse's
# usage lines for exit 2). "{tmp}" is a folder that holds nothing.
COMMANDS = {
    "trainer": (["-m", "trainer"], ["--config", str(SMALL), "nosuch.key=1"], 1,
                "error: override 'nosuch.key=1': unknown key 'nosuch' (valid: model, data, optim, train, logging)"),
    "trainer.data": (["-m", "trainer.data"], ["prepare", "--source", "{tmp}/nowhere", "--out", "{tmp}/out"], 1,
                     "error: {tmp}/nowhere: no such folder (expected a CIFAR-10 'cifar-10-batches-py' folder)"),
    "trainer.report": (["-m", "trainer.report"], ["{tmp}/sweep"], 1, "error: {tmp}/sweep: not a folder"),
    "jobs/report.py": (["jobs/report.py"], ["{tmp}/sweep", "--no-deploy"], 1, "error: {tmp}/sweep: not a folder"),
    "trainer.export": (["-m", "trainer.export"], ["{tmp}/run", "--format", "onnx", "--out", "{tmp}/a.onnx"], 1,
                       "error: {tmp}/run: not a run folder (no such folder)"),
    "trainer.bench": (["-m", "trainer.bench"], ["--smoke", "--data", "{tmp}", "--archs", "resnet99", "--parts", "step"],
                      1, "error: --archs: unknown architecture(s) resnet99; valid: "),
    "trainer.config": (["-m", "trainer.config"], [str(SMALL), "model.arch=resnet99"], 1,
                       f"error: {SMALL.parent}/../../jobs/configs/base.yaml + {SMALL} + override "
                       "'model.arch=resnet99': model.arch: unknown architecture 'resnet99'; valid: "),
    "jobs/launch.py": (["jobs/launch.py"], ["--arch", "resnet9_tiny", "--local", "--seeds", "2", "--runs", "{tmp}/runs",
                                            "train.seed=3"], 1,
                       "error: --seeds sets train.seed (0..N-1) itself: drop the train.seed override"),
    # argparse's usage errors: exit 2
    "trainer.models": (["-m", "trainer.models"], ["--bogus"], 2,
                       "python -m trainer.models: error: unrecognized arguments: --bogus"),
}


HEAVY = ("torch", "torchvision", "ffcv", "submitit", "wandb", "matplotlib")


def _args(args: list[str], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in args]


def _imported(stderr: str) -> tuple[str, list[str]]:
    """(stderr without importtime's lines, the heavy top-level packages those lines name)."""
    own, heavy = [], set()
    for line in stderr.splitlines(keepends=True):
        if line.startswith("import time:"):
            heavy.add(line.rsplit("|", 1)[1].strip().split(".")[0])
        else:
            own.append(line)
    return "".join(own), sorted(heavy & set(HEAVY))


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess], dict[str, list[str]]]:
    """Every command of COMMANDS run as `python -X importtime ...` from the repository, all at once;
    and the heavy modules each imported."""
    tmp = tmp_path_factory.mktemp("entry")
    procs = {key: subprocess.Popen([sys.executable, "-X", "importtime", *start, *_args(args, tmp)], cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, (start, args, _, _) in COMMANDS.items()}
    done, heavy = {}, {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        err, heavy[key] = _imported(err)
        done[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return tmp, done, heavy


@pytest.mark.parametrize("key", COMMANDS)
def test_a_real_process_exits_with_one_error_line_as_run_main_says(real, key):
    tmp, done, _ = real
    start, args, code, line = COMMANDS[key]
    r = done[key]
    lines = error_lines(r.stderr)
    expected = line.replace("{tmp}", str(tmp))
    assert r.returncode == code, r.stderr[-3000:]
    assert r.stdout == "", r.stdout[-3000:]
    if code == 1:  # a refused input: one line, nothing else (no warning, no traceback)
        assert len(lines) == 1, r.stderr[-3000:]
    else:  # argparse: its usage, then the line
        assert lines[0].startswith("usage: "), r.stderr[-3000:]
    assert lines[-1].startswith(expected) if expected.endswith(": ") else lines[-1] == expected, lines[-1]
    inproc = run_main(key, *_args(args, tmp))
    assert (inproc.returncode, inproc.stdout, inproc.stderr) == (r.returncode, r.stdout, r.stderr)


@pytest.mark.parametrize("key", COMMANDS)
def test_the_mistake_is_refused_before_a_heavy_module_is_imported(real, key):
    _, done, heavy = real
    assert done[key].returncode in (1, 2), done[key].stderr[-3000:]
    assert heavy[key] == [], f"{key} imported {', '.join(heavy[key])} before saying: {done[key].stderr[-300:]}"


@pytest.mark.parametrize("entry, argv", [
    ("trainer", ["--stop-after-epoch", "x"]),
    ("trainer.data", ["convert"]),
    ("trainer.report", []),
    ("trainer.export", ["run", "--format", "tflite", "--out", "x"]),
    ("trainer.bench", ["--parts"]),
    ("trainer.config", []),
    ("jobs/launch.py", ["--all", "--arch", "resnet"]),
])
def test_usage_errors_exit_2_with_the_usage(entry, argv):
    r = run_main(entry, *argv)
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert lines[0].startswith("usage: ") and ": error: " in lines[-1], r.stderr
