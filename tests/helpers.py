"""What many test files share: running an entry point in this process, and the tests' configs.

Most command-line tests check what a command says and how it exits; starting a fresh Python for
each (torch, torchvision and ffcv imported anew: seconds on a small CPU) made them a large part of
the suite's time. `run_main` calls the entry point's `main(argv)` here instead, with the same
`cli.run` wrapper a user's process goes through, and returns what a subprocess would: the exit
code, stdout and stderr. One subprocess test per entry point (tests/test_entry_points.py) keeps
the real process, its exit code and its single error line, honest.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import io
import os
import random
import signal
import sys
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TINY = REPO / "jobs/configs/tiny.yaml"  # the CPU recipe of resnet9_tiny a user runs
SMALL = TESTS / "configs/small.yaml"  # the tests' own config (resnet9_tiny, Page's plain recipe)

# The entry points by the module a user runs (`python -m MODULE` or the script), and their main().
ENTRY_POINTS = {
    "trainer": "trainer.training.run",
    "trainer.data": "trainer.data.cifar10",
    "trainer.report": "trainer.report",
    "trainer.export": "trainer.export",
    "trainer.bench": "trainer.bench.__main__",
    "trainer.config": "trainer.config.__main__",
    "trainer.launch": "trainer.launch.command",
    "jobs/launch.py": "trainer.launch.command",
    "jobs/report.py": "trainer.report",
    "trainer.models": "trainer.models.__main__",
}


def _program(entry: str | Callable) -> str:
    """What sys.argv[0] holds in the process a user starts: the file of `python -m MODULE`
    (its __main__.py for a package) or the script; provenance.command() reads it back."""
    if callable(entry):
        return inspect.getsourcefile(entry) or "-c"
    if entry.endswith(".py"):
        return str(REPO / entry)
    spec = importlib.util.find_spec(entry)
    if spec.submodule_search_locations is not None:
        spec = importlib.util.find_spec(f"{entry}.__main__") or spec
    return spec.origin


def _cuda_math() -> tuple:
    import torch

    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)


def _set_cuda_math(saved: tuple) -> None:
    import torch

    precision, matmul_tf32, cudnn_tf32, benchmark = saved
    torch.set_float32_matmul_precision(precision)
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
    torch.backends.cudnn.benchmark = benchmark


@contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Warnings as a fresh interpreter shows them: on stderr, where the command's other output is,
    with Python's default filters; pytest would otherwise collect them out of the command's sight,
    and a test that counts stderr's lines could not see one."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.resetwarnings()
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.showwarning = show
        yield


@dataclass
class Result:
    """What a finished command left: the same fields as subprocess.CompletedProcess."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def run_main(entry: str | Callable[[list[str]], object], *argv: str, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> Result:
    """Runs an entry point (a key of ENTRY_POINTS, or a main function) with `argv` in this process.

    `env` is laid over os.environ for the call only; the command runs in `cwd` (the repository, as
    the subprocess tests ran it, unless given), with sys.argv as `python -m ENTRY ARGV...` sets it
    (the provenance records it). What a command changes in the process and a subprocess would have
    taken with it (torch's thread count, which ffcv resets; signal handlers; the environment; the
    working folder; sys.argv; the random states of torch, numpy and random; the CUDA math settings
    of a run on a GPU, trainer.device.fast_cuda_math; torch.compile's caches, whose recompile limit
    would otherwise turn a later run's compile into eager) is put back afterwards, so the next test
    starts as if from a fresh process. Warnings reach `stderr` as in a fresh interpreter.
    """
    import numpy as np
    import torch

    main = entry if callable(entry) else importlib.import_module(ENTRY_POINTS[entry]).main
    out, err = io.StringIO(), io.StringIO()
    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    saved_argv = sys.argv
    saved_threads = torch.get_num_threads()
    saved_math = _cuda_math()
    saved_rng = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    saved_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)}
    code = 0
    try:
        if env:
            os.environ.update(env)
        os.chdir(REPO if cwd is None else cwd)
        sys.argv = [_program(entry), *argv]
        with redirect_stdout(out), redirect_stderr(err), _warnings_to_stderr():
            try:
                returned = main(list(argv))
                code = returned if isinstance(returned, int) else 0  # a main that returns its exit code
            except SystemExit as e:  # cli.run ends every command with sys.exit
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
        _set_cuda_math(saved_math)
        torch.random.set_rng_state(saved_rng[0])
        np.random.set_state(saved_rng[1])
        random.setstate(saved_rng[2])
        for s, handler in saved_handlers.items():
            signal.signal(s, handler)
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
    return Result([str(entry), *argv], code, out.getvalue(), err.getvalue())


def error_line(result: Result) -> str:
    """The last line of stderr, where cli.run writes its one `error: ...` line."""
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def error_lines(text: str) -> list[str]:
    """The lines of `text` (a command's stderr) that are not blank."""
    return [ln for ln in text.splitlines() if ln.strip()]


def one_error_line(result: Result, *fragments: str, code: int = 1) -> str:
    """Asserts that the command exited with `code` and said one thing on stderr, an `error: ...`
    line holding every fragment; returns that line."""
    lines = error_lines(result.stderr)
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
