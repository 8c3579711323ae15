"""Watching a sweep: each job's state (SLURM's, or the local job's: state.py), epoch, best accuracy,
log, W&B link, failure and, for a retried job, its attempts, as the --status table or, with --wait,
until every job has ended (retrying failed jobs: retry.py); then the sweep's report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from trainer import run_files, sweep_file
from trainer.cli import described
from trainer.launch.cluster import ClusterConfig
from trainer.launch.grid import name_width
from trainer.launch.slurm import check_slurm
from trainer.launch.state import job_state, terminal
from trainer.run_files import read_metrics
from trainer.sweep_file import SweepRecord, attempts_text

if TYPE_CHECKING:
    from trainer.launch.retry import Retrier


def _progress(run_dir: Path) -> tuple[int, float | None]:
    try:
        rows = read_metrics(run_dir, skipped=[])  # a torn line is left out; the report names it
    except (OSError, ValueError):
        return 0, None
    if not rows:
        return 0, None
    evaluated = [r["test_acc"] for r in rows if "test_acc" in r]  # train.eval_every may skip epochs
    return rows[-1]["epoch"], max(evaluated, default=None)


def job_lines(sweep_dir: Path) -> tuple[list[dict], SweepRecord]:
    """One entry per job of the sweep (architecture, grid point, seed): state (and the words it
    needs, `note`), epoch, best accuracy, log, failure."""
    record = sweep_file.read(sweep_dir)
    if record.executor == "slurm":
        check_slurm()
    entries = []
    for run in record.runs:
        run_dir = sweep_dir / run.name
        epoch, best = _progress(run_dir)
        info = record.jobs.get(run.name)
        entry = {"name": run.name, "arch": run.arch, "job_id": info["job_id"] if info else None, "epoch": epoch, "best": best,
                 "finished": (run_dir / "summary.json").exists(), "log": None, "error": None, "note": None,
                 "wandb": _wandb_link(run_dir), "attempts": attempts_text(info)}
        if info is None:
            entry["state"] = "NOT SUBMITTED"
        elif info["job_id"] is None:  # --local: waiting in the launcher for a free slot
            entry["state"], entry["note"] = "QUEUED", "in the launcher, for a free slot"
        else:
            found = job_state(record.executor, sweep_dir, info["job_id"])
            entry.update(state=found.state, note=found.note, log=str(found.log))
            # A local job that raised or was killed failed even if it wrote its summary first.
            if not entry["finished"] or found.state == "FAILED":
                entry["error"] = found.error
        entries.append(entry)
    return entries, record


def _wandb_link(run_dir: Path) -> str | None:
    """Where the run is on W&B: its URL online, its `wandb sync` folder offline (the trainer's wandb.json)."""
    try:
        record = json.loads((run_dir / run_files.WANDB).read_text())
        return record.get("url") or (f"offline: {record['offline_dir']}" if record.get("offline_dir") else None)
    except (OSError, ValueError, KeyError, AttributeError):  # no W&B run (yet), or a file cut short
        return None


def print_status(sweep_dir: Path) -> list[dict]:
    entries, record = job_lines(sweep_dir)
    width = name_width([e["name"] for e in entries])
    states = [_state_text(e) for e in entries]
    state_width = max([13, *map(len, states)])
    print(f"sweep {record.sweep} ({record.executor}, profile {record.profile}): {sweep_dir}")
    print(f"  {'run':{width}s} {'state':{state_width}s} {'job':>10s}  {'epoch':>5s}  {'best':>7s}  summary  log")
    for e, state in zip(entries, states):
        best = f"{e['best']:.2f}%" if e["best"] is not None else "-"
        print(f"  {e['name']:{width}s} {state:{state_width}s} {e['job_id'] or '-':>10s}  {e['epoch']:5d}  {best:>7s}  "
              f"{'yes' if e['finished'] else 'no':7s}  {e['log']}")
    retried = [e for e in entries if e["attempts"]]
    if retried:
        print("  retried:" + "".join(f"\n    {e['name']:{width}s} {e['attempts']}" for e in retried))
    links = [e for e in entries if e["wandb"]]
    if links:
        print("  W&B:" + "".join(f"\n    {e['name']:{width}s} {e['wandb']}" for e in links))
    for e in entries:
        if e["error"]:
            print(f"\n--- {e['name']} (job {e['job_id']}) failed:\n{e['error'].rstrip()}")
    return entries


def _state_text(e: dict) -> str:
    return f"{e['state']} ({e['note']})" if e["note"] else e["state"]


def _failed(e: dict) -> bool:
    """Whether the job did not end as it should: no summary, or (a local job) an exception or a kill."""
    return not e["finished"] or e["state"] == "FAILED"


def wait(sweep_dir: Path, poll_s: float | None = None, step: Callable[[], bool] | None = None,
         retrier: Retrier | None = None) -> int:
    """Blocks until every job of the sweep has ended, showing progress; 1 if any failed. It looks
    every `poll_s` seconds (default: the sweep's cluster setting poll_s). `step` (the --local
    scheduler's) is called every poll: it starts queued jobs, and says whether any job still
    runs or waits, which decides the end: it sees its jobs' processes, so a job killed before it
    wrote its result ends the wait too. `retrier` submits failed jobs again (--retries)."""
    if poll_s is None:
        poll_s = sweep_file.read(sweep_dir).cluster.get("poll_s", ClusterConfig.poll_s)
    last = None
    while True:
        busy = step() if step is not None else None
        entries, _ = job_lines(sweep_dir)
        again = retrier is not None and retrier.check(entries)
        if again:  # the retried jobs' new submissions, in the view
            entries, _ = job_lines(sweep_dir)
        settling = retrier is not None and retrier.settling
        ended = not again and not settling and (not busy if step is not None else all(terminal(e) for e in entries))
        view = [(e["name"], e["state"], e["epoch"], e["finished"]) for e in entries]
        if view != last or ended:
            print_status(sweep_dir) if ended else _print_brief(entries)
            last = view
        if ended:
            break
        time.sleep(poll_s)
    print()
    try:  # the comparison with the seed's table, report.md/.csv, plots, the W&B report run
        from trainer.report import make_report

        # Deployment figures and the ensemble run models on this machine (a login node, often a
        # CPU): jobs/report.py measures them where it is run.
        make_report(sweep_dir, deploy=False, use_ensemble=False)
    except Exception as error:  # the jobs' outcome decides the exit code, not a failed report
        print(f"warning: the sweep report failed ({described(error)}); retry: python jobs/report.py {sweep_dir}")
    failed = [e["name"] for e in entries if _failed(e)]
    if failed:
        print(f"\nnot finished: {', '.join(failed)}")
    return 1 if failed else 0


def _print_brief(entries: list[dict]) -> None:
    parts = [f"{e['name']}:{e['state'] if _failed(e) else 'DONE'}@{e['epoch']}" for e in entries]
    print(f"[{datetime.now():%H:%M:%S}] " + "  ".join(parts), flush=True)
