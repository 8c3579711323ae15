"""How long each command takes to refuse a mistaken input, as a real process, and what it imported.

    python jobs/bench_errors.py [--repeat N] [--only trainer,trainer.config,...]

Every command of the project is started N times (default 5) with a mistake a user makes (an unknown
config key, a bad value, a missing folder, an unknown flag); for each, the median and the fastest
time to exit, the ratio of the median to `python -c pass` measured in the same run (the
interpreter's own start, on the same machine under the same load), the one error line, and which
heavy modules (torch, ffcv, submitit, wandb, matplotlib) were imported before it was printed: from
one more start with `python -X importtime`, which lists every module imported. Issue #21 asks for
the line within ~2 s on 2 cores (its Done-when: under 3 s); the last column says whether the median
is under 3 s. The machine (CPU, cores, load average at the start and the end) is printed with the
numbers: timings on a loaded machine are slower than the machine can do.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "ffcv", "submitit", "wandb", "matplotlib")
DONE_WHEN_S = 3.0  # issue #21's Done-when

# name -> (what follows `python`, the mistake). "{tmp}" is an empty folder.
CASES = {
    "trainer (unknown key)": ["-m", "trainer", "--config", "jobs/configs/tiny.yaml", "nosuch.key=1"],
    "trainer (bad value)": ["-m", "trainer", "--config", "jobs/configs/tiny.yaml", "optim.lr=fast"],
    "trainer (unknown arch)": ["-m", "trainer", "--config", "jobs/configs/tiny.yaml", "model.arch=resnet99"],
    "trainer (no config file)": ["-m", "trainer", "--config", "{tmp}/missing.yaml"],
    "trainer.config": ["-m", "trainer.config", "jobs/configs/tiny.yaml", "nosuch.key=1"],
    "trainer.data": ["-m", "trainer.data", "prepare", "--source", "{tmp}/nowhere", "--out", "{tmp}/out"],
    "trainer.report": ["-m", "trainer.report", "{tmp}/sweep"],
    "jobs/report.py": ["jobs/report.py", "{tmp}/sweep"],
    "trainer.bench": ["-m", "trainer.bench", "--quick", "--archs", "resnet99"],
    "trainer.models": ["-m", "trainer.models", "--bogus"],
    "trainer.export": ["-m", "trainer.export", "{tmp}/run", "--format", "onnx", "--out", "{tmp}/a.onnx"],
    "jobs/launch.py": ["jobs/launch.py", "--all", "--profile", "nosuch"],
}


def heavy_imports(importtime_stderr: str) -> list[str]:
    """The heavy top-level packages named in `python -X importtime`'s lines on stderr."""
    found = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            top = line.rsplit("|", 1)[1].strip().split(".")[0]
            if top in HEAVY:
                found.add(top)
    return sorted(found)


def error_line(stderr: str) -> str:
    """The command's last line on stderr (its `error: ...` line), the importtime lines left out."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("import time:")]
    return lines[-1] if lines else ""


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    # PYTHONPATH: this copy's trainer package, for the scripts too (whose sys.path[0] is jobs/)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, check=False, env=env)
    return time.perf_counter() - start, done


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()
    return (f"{cpu}; {os.cpu_count()} cores ({usable} usable by this process); "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed starts per command (default 5)")
    parser.add_argument("--only", help=f"comma-separated names of the commands to time (default: all): {', '.join(CASES)}")
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.only.split(",")] if args.only else list(CASES)
    unknown = [n for n in chosen if n not in CASES]
    if unknown or args.repeat < 1:
        parser.error(f"--only: unknown {', '.join(unknown)}" if unknown else "--repeat: at least 1")

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-errors-") as tmp:
        baseline = [timed(["-c", "pass"])[0] for _ in range(args.repeat)]
        reference = statistics.median(baseline)
        print(f"python -c pass: median {reference:.3f} s, min {min(baseline):.3f} s ({args.repeat} starts)\n")
        print(f"{'command':<25} {'median s':>8} {'min s':>6} {'x pass':>6} {'< 3 s':>5}  heavy modules imported / error line")
        slow = []
        for name in chosen:
            argv_ = [a.replace("{tmp}", tmp) for a in CASES[name]]
            times = []
            for _ in range(args.repeat):
                seconds, done = timed(argv_)
                times.append(seconds)
            _, traced = timed(["-X", "importtime", *argv_])
            median = statistics.median(times)
            heavy = heavy_imports(traced.stderr)
            ok = median < DONE_WHEN_S
            if not ok:
                slow.append(name)
            print(f"{name:<25} {median:>8.2f} {min(times):>6.2f} {median / reference:>6.1f} {'yes' if ok else 'NO':>5}  "
                  f"{', '.join(heavy) or 'none'}")
            print(f"{'':<25} exit {done.returncode}: {error_line(done.stderr).replace(tmp, '{tmp}')}")
    print(f"\nat the end: {machine()}")
    if slow:
        print(f"over {DONE_WHEN_S:g} s: {', '.join(slow)}")
    return 1 if slow else 0


if __name__ == "__main__":
    raise SystemExit(main())
