"""What became of a job submitted earlier: SLURM's state as SLURM names it (sacct), or a --local
job's, read from submitit's own records: FINISHED (its result file holds a return), FAILED (it
holds an exception, or the process ended without writing one: killed), RUNNING (its process is
alive). A state the launcher cannot be sure of is said in words, not as a bare token.

submitit is imported when a job is looked at, not before: a mistaken command line is reported
without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# SLURM states of a job still queued or running: a relaunch of its sweep does not submit it again.
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD"}


def terminal(entry: dict) -> bool:
    """Whether a job of the --status table (status.job_lines' entry) has ended: it wrote its summary,
    or its state is none of those of a job still to run or running."""
    return entry["finished"] or entry["state"] not in ACTIVE_STATES | {"UNKNOWN", "NOT SUBMITTED", "QUEUED"}


def submitit_folder(executor: str, sweep_dir: Path) -> Path:
    """The folder submitit writes a job's pickles and logs to. SLURM's jobs get one each
    (submitit/<job id>/, SLURM fills in %j). A local job's id is its process's, unknown until it
    starts, and submitit's local controller creates the folder it is given as it stands: with a
    %j in it, an empty literal `submitit/%j/` beside the jobs' folders. So local jobs write into
    submitit/ itself, their files named by their id."""
    folder = sweep_dir / "submitit"
    return folder / "%j" if executor == "slurm" else folder


def job_handle(executor: str, sweep_dir: Path, job_id: str):
    """The submitit handle of a job submitted earlier by `executor` ("slurm" or "local")."""
    import submitit

    if executor == "slurm":
        return submitit.SlurmJob(folder=submitit_folder(executor, sweep_dir), job_id=job_id)
    folder = submitit_folder(executor, sweep_dir)
    if (folder / job_id).is_dir():  # a sweep launched before local jobs shared submitit/
        folder = folder / "%j"
    return submitit.LocalJob(folder=folder, job_id=job_id)


@dataclass
class JobState:
    state: str  # SLURM's state, or FINISHED, FAILED, RUNNING for a local job
    note: str | None  # the words a state needs: which process runs it, why it is unknown
    error: str | None  # why a job failed: its traceback, or how it ended without one
    log: Path

    def text(self) -> str:
        return f"{self.state} ({self.note})" if self.note else self.state


def job_state(executor: str, sweep_dir: Path, job_id: str) -> JobState:
    job = job_handle(executor, sweep_dir, job_id)
    if executor == "slurm":
        state = job.state
        note = f"SLURM does not know job {job_id}: sacct has no record of it" if state == "UNKNOWN" else None
        error = _traceback(job) if state in ("FAILED", "COMPLETED", "NODE_FAIL", "OUT_OF_MEMORY") else None
        return JobState(state, note, error, job.paths.stdout)
    if job.paths.result_pickle.exists():
        error = _traceback(job)
        return JobState("FAILED" if error else "FINISHED", None, error, job.paths.stdout)
    if _local_controller_alive(int(job_id)):
        return JobState("RUNNING", f"local process {job_id}", None, job.paths.stdout)
    # No result and no process: it was killed (SIGKILL, out of memory) or its machine restarted
    # before it could write one. submitit's controller does not keep its task's exit status.
    error = (f"job {job_id} ended without writing a result: its process was killed (SIGKILL, out of memory?) "
             f"or the machine restarted; its log: {job.paths.stdout}")
    tail = (job.stderr() or "").strip().splitlines()[-20:]
    if tail:
        error += "\n" + "\n".join(tail)
    return JobState("FAILED", "killed: no result", error, job.paths.stdout)


def _traceback(job) -> str | None:
    """The remote traceback of a job that raised (submitit keeps it in the job's result file);
    None for a job that returned, or that left no result file."""
    try:
        if not job.paths.result_pickle.exists():
            return None
        error = job.exception()
        return str(error) if error is not None else None
    except Exception as e:  # an unreadable result file: a failure too, said as such
        return f"(could not read the job's result: {type(e).__name__}: {e})"


def _local_controller_alive(pid: int) -> bool:
    """Whether submitit's controller of a local job still runs: the process of that id, if it is
    submitit's (a process id is reused once its process has ended)."""
    proc = Path("/proc")
    if proc.is_dir():
        try:
            return b"submitit" in (proc / str(pid) / "cmdline").read_bytes()  # empty for an ended (zombie) process
        except OSError:
            return False
    try:  # no /proc (macOS): whether any process has that id
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
