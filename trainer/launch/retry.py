"""Automatic retries (--retries N, or the cluster YAML's `retries`): a job that ends FAILED or
NODE_FAIL on SLURM, or FAILED under --local (it raised, or was killed), without a summary.json is
submitted again into the same run folder, where the trainer resumes from its checkpoint; up to N
times. A job that wrote its summary is not trained again, whatever came after.

Only a launcher that watches the sweep retries: `--wait` on SLURM, `--local` (it always waits), or
`--status SWEEP --wait --retries N` for a SLURM sweep launched without --wait. TIMEOUT and
PREEMPTED are not retries: submitit and SLURM requeue those (max_requeues).

A failure that repeats the previous attempt's error line, with no epoch finished between the two,
is deterministic (a bad config, a bug): the job is not retried again. The same line after progress
is not: a rank killed twice, or two lost peers, fail each attempt with the same collective error
(the chaos soak, tests/chaos.py, found this), and the attempt between trained on. A kill without a
result or a node failure says nothing of the job itself, so those are retried up to N times.

Each ended attempt of a retried job goes into sweep.json (sweep_file.py), with its cause in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from trainer import sweep_file
from trainer.cli import described
from trainer.launch.state import ACTIVE_STATES, terminal

if TYPE_CHECKING:
    from trainer.launch.plan import Plan

RETRIED_STATES = ("FAILED", "NODE_FAIL")  # SLURM's, and a local job's FAILED (state.py)
# Looks at which a retry whose submission failed is submitted again before the job is left failed:
# a disk full for seconds (submitit writes the job's pickle into the sweep folder) or a controller
# restarting must not end a job that its next look could have retried (the chaos soak's full disk).
SUBMIT_TRIES = 3
_RULE = "----------------------"  # submitit's: a job's traceback stands between two of these


def cause_line(error: str | None) -> str | None:
    """A failure's cause in one line: the exception line of the job's traceback (its last line),
    else the error's first line."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    if _RULE in lines:
        start = lines.index(_RULE) + 1
        trace = lines[start:lines.index(_RULE, start)] if _RULE in lines[start:] else lines[start:]
        if trace:
            return trace[-1]
    return lines[0] if lines else None


def not_retried(attempts: list[dict], limit: int) -> str | None:
    """Why a job whose attempts all failed is not submitted again; None: retry it."""
    if len(attempts) > limit:
        return f"its {limit} retr{'y' if limit == 1 else 'ies'} used"
    if len(attempts) >= 2:
        last, before = attempts[-1], attempts[-2]
        # Only errors of the job's own: a kill or a lost node says nothing about the next attempt.
        # An attempt that finished an epoch got past what failed the one before (records from
        # before this rule have no epoch: None == None, no progress known).
        if (last["state"] == before["state"] == "FAILED" and last["cause"] and last["cause"] == before["cause"]
                and last.get("epoch") == before.get("epoch")):
            return f"the same error twice: {last['cause']}"
    return None


def retryable(entry: dict) -> bool:
    """A job that failed without finishing, in a way an attempt more may overcome."""
    return entry["job_id"] is not None and not entry["finished"] and entry["state"] in RETRIED_STATES


class Retrier:
    """Retries the failed jobs of a watched sweep, up to `limit` times each. `resubmit(name)`
    submits the job again and returns its new sweep.json entry ({"job_id", "submitted"} or, queued
    under --local, {"job_id": None, "queued"}); `idle(name)` says whether the job's last process has
    ended (under --local, the launcher's runner may still be reaping it)."""

    def __init__(self, plan: Plan, limit: int, resubmit: Callable[[str], dict],
                 idle: Callable[[str], bool] = lambda name: True) -> None:
        self.plan, self.limit, self.resubmit, self.idle = plan, limit, resubmit, idle
        self.settling = False  # a retried job wrote its summary, but SLURM has not seen its attempt end yet
        self.refused: dict[str, int] = {}  # job name -> the submissions of its retry that failed so far
        self.unsaved = False  # sweep.json could not be written (a full disk): the next look writes it

    def check(self, entries: list[dict]) -> bool:
        """Acts on each job that has ended since the last look; whether any was submitted again."""
        again = self.settling = False
        if self.unsaved:
            self._save()
        for entry in entries:
            name, info = entry["name"], self.plan.jobs.get(entry["name"])
            if info is None or entry["job_id"] is None or not terminal(entry) or not self.idle(name):
                continue
            attempts = info.get("attempts", [])
            if attempts and attempts[-1]["job_id"] == entry["job_id"]:
                continue  # this attempt is recorded already
            failed = retryable(entry)
            if not failed and not attempts:
                continue  # ran once and ended as it did: nothing to record
            if not failed and entry["state"] in ACTIVE_STATES:  # its last attempt is recorded with its end state
                self.settling = True
                continue
            if failed and self._taken_over(name, entry["job_id"]):
                continue
            state = f"{entry['state']} ({entry['note']})" if entry["note"] else entry["state"]
            attempt = {"job_id": entry["job_id"], "state": state, "cause": cause_line(entry["error"]) if failed else None,
                       "epoch": entry.get("epoch"), "ended": datetime.now().isoformat(timespec="seconds")}
            before, info = info, {**info, "attempts": [*attempts, attempt]}
            self.plan.jobs[name] = info
            if failed:
                why = not_retried(info["attempts"], self.limit)
                submitted = None
                if why is None:
                    try:
                        submitted = self.resubmit(name)
                    except Exception as e:  # sbatch refused (the controller away), a full disk
                        why = f"its retry could not be submitted ({described(e)})"
                        self.refused[name] = self.refused.get(name, 0) + 1
                        if self.refused[name] < SUBMIT_TRIES:  # the next look tries again; the watch goes on
                            self.plan.jobs[name] = before
                            self.settling = True
                            print(f"{name}: {why}; trying again at the next look", flush=True)
                            continue
                if submitted is not None:
                    info = self.plan.jobs[name] = {**submitted, "attempts": info["attempts"]}
                    now = f"job {info['job_id']}" if info["job_id"] else "queued for a free slot"
                    print(f"{name}: attempt {len(attempts) + 1} {state}: {attempt['cause']}; retry "
                          f"{len(attempts) + 1} of {self.limit}: {now}", flush=True)
                    again = True
                else:
                    info["not_retried"] = why
                    print(f"{name}: not retried: {why}", flush=True)
            self._save()
        return again

    def _save(self) -> None:
        """Writes sweep.json; a full disk leaves its last good state (written atomically) and
        this launcher watching: the next look writes it again."""
        try:
            self.plan.save()
            self.unsaved = False
        except OSError as e:
            self.unsaved = True
            print(f"warning: sweep.json not updated ({described(e)}); trying again at the next look", flush=True)

    def _taken_over(self, name: str, job_id: str) -> bool:
        """Whether another watcher of the sweep (a second --status --wait --retries) submitted
        the job again already: its sweep.json entry then names another job, which this one adopts."""
        try:
            current = sweep_file.read(self.plan.sweep_dir).jobs.get(name)
        except sweep_file.SweepFileError:
            return False
        if current is not None and current.get("job_id") != job_id and current.get("attempts"):
            self.plan.jobs[name] = current
            return True
        return False


def kept(info: dict | None) -> dict:
    """What a job's new submission keeps of its sweep.json entry: the attempts before it."""
    return {"attempts": info["attempts"]} if info and info.get("attempts") else {}
