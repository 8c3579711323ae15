"""sweep.json, the record of a sweep folder: its one writer and its one reader.

    runs/<sweep>/sweep.json
        sweep, executor ("slurm" or "local"), profile, archs, overrides (what every job shares),
        runs      each job by name: its architecture, grid point, seed and its own overrides
        cluster   the cluster settings it was submitted with
        jobs      job name -> {"job_id", "submitted" (or "queued"), "devices" under --local; and for a
                  job that was retried (launch.py --retries): "attempts", a list of its ended
                  attempts, each {"job_id", "state", "cause" (one line, or null), "epoch" (the run's
                  epochs done when it ended), "ended"}, and
                  "not_retried" (why a failed job was left failed) when it applies}
        git_sha

A job without "attempts" ran once (records from before retries have none).

The launcher writes it at every submission and reads it back to resume a sweep and for --status;
the report reads it to find the sweep's runs. It stands low in the house so that a reader of a
sweep needs neither submitit nor torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from trainer import UserError
from trainer.files import write_text_atomic

SWEEP_JSON = "sweep.json"


class SweepFileError(UserError):
    """A sweep.json that cannot be read: missing, not JSON, or without the keys a sweep has."""


@dataclass(frozen=True)
class Job:
    """One training run of a sweep: an architecture at a grid point with a seed."""

    name: str  # the run folder's name under runs/<sweep>/, the W&B run's name and sweep.json's key
    arch: str
    point: str | None = None  # the grid point's name, e.g. "lr0.05-ema0"; None without a grid
    seed: int | None = None  # train.seed; None without --seeds (the config's seed)
    overrides: tuple[str, ...] = ()  # the point's key=value overrides and train.seed=K


@dataclass
class SweepRecord:
    sweep: str
    runs: list[Job]
    archs: list[str]
    executor: str | None = None  # absent only from records written by hand
    profile: str | None = None
    overrides: list[str] = field(default_factory=list)
    cluster: dict = field(default_factory=dict)
    jobs: dict[str, dict] = field(default_factory=dict)
    git_sha: str | None = None


def path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / SWEEP_JSON


def write(sweep_dir: Path, record: SweepRecord) -> None:
    # "runs" says what each run folder is (the report groups seeds by architecture and point
    # with it); "archs" stays for readers of sweeps from before seeds and grids.
    runs = [{"name": j.name, "arch": j.arch, "point": j.point, "seed": j.seed, "overrides": list(j.overrides)}
            for j in record.runs]
    data = {"sweep": record.sweep, "executor": record.executor, "profile": record.profile, "archs": record.archs,
            "runs": runs, "overrides": record.overrides, "cluster": record.cluster, "jobs": record.jobs,
            "git_sha": record.git_sha}
    write_text_atomic(path(sweep_dir), json.dumps(data, indent=2) + "\n")


def read(sweep_dir: Path) -> SweepRecord:
    """The record of `sweep_dir`; SweepFileError, one line naming the file, if it cannot be read.
    A sweep from before seeds and grids lists architectures only: one run each, named after it."""
    file = path(sweep_dir)
    try:
        data = json.loads(file.read_text())
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        if "runs" in data:
            runs = [Job(r["name"], r["arch"], r["point"], r["seed"], tuple(r["overrides"])) for r in data["runs"]]
        else:
            runs = [Job(arch, arch) for arch in data["archs"]]
        archs = list(data["archs"]) if "archs" in data else list(dict.fromkeys(j.arch for j in runs))
        return SweepRecord(str(data["sweep"]), runs, archs, data.get("executor"), data.get("profile"),
                           data.get("overrides", []), data.get("cluster", {}), dict(data.get("jobs", {})),
                           data.get("git_sha"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SweepFileError(f"{file}: unreadable sweep record ({type(e).__name__}: {e})") from None


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def attempts_text(info: dict | None) -> str | None:
    """A retried job's attempts in one line: "2 attempts: 1st FAILED (ValueError: ...), 2nd
    COMPLETED"; None for a job that ran once. An attempt that has not ended yet is named by its job."""
    ended = (info or {}).get("attempts") or []
    if not ended:
        return None
    parts = [f"{ordinal(i)} {a['state']}" + (f" ({a['cause']})" if a.get("cause") else "")
             for i, a in enumerate(ended, 1)]
    if info.get("job_id") != ended[-1]["job_id"]:  # the attempt now queued or running
        now = f"job {info['job_id']}" if info.get("job_id") else "queued"
        parts.append(f"{ordinal(len(ended) + 1)}: {now}, not ended")
    text = f"{len(parts)} attempts: {', '.join(parts)}"
    # "the same error twice: <its line>": the line is the last attempt's cause, shown just before
    why = (info.get("not_retried") or "").partition(": ")[0]
    return f"{text}; not retried: {why}" if why else text


def retried_lines(sweep_dir: Path) -> list[str]:
    """One line per retried job of the sweep ("- name: 2 attempts: ..."), for the report."""
    if not path(sweep_dir).exists():
        return []
    record = read(sweep_dir)
    return [f"- {name}: {text}" for name, info in record.jobs.items() if (text := attempts_text(info))]
