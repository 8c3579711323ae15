"""What the tests of the multi-node dev cluster and the chaos soak (tests/chaos.py) share: a job's
state as SLURM records it, a job's training processes on each node, waiting with a bound, and the
exact comparison of two runs' weights. Plain functions, no pytest: the chaos soak is also a script.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

# The settings that make a 2-node run repeat itself bit for bit: no random augmentation (ffcv's
# flips and translations are not seeded), one CPU thread a rank (the number of threads can change
# the order of a convolution's sums).
DETERMINISTIC = ["data.flip=false", "data.translate=0", "train.threads=1"]


def job_state(job: str, env: dict) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job], capture_output=True, text=True,
                         env=env).stdout.split()
    return out[0] if out else "UNKNOWN"  # sacct lags a new job by a moment


def job_ended(job: str, env: dict) -> bool:
    return job_state(job, env) not in ("UNKNOWN", "PENDING", "CONFIGURING", "RUNNING", "COMPLETING")


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def rank_pid(job: str, node: str) -> int | None:
    """The training process a job runs on `node`: the task srun started there, `python -m
    submitit.core._submit` (not the srun on node1 whose command line names it too)."""
    for proc in Path("/proc").iterdir():
        try:
            env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\0") if "=" in v)
            argv = (proc / "cmdline").read_text().split("\0")
        except (OSError, ValueError):
            continue
        if (env.get("SLURM_JOB_ID") == job and env.get("SLURMD_NODENAME") == node
                and Path(argv[0]).name.startswith("python") and "submitit.core._submit" in argv):
            return int(proc.name)
    return None


def rank_pids(job: str) -> list[int] | None:
    """The job's training processes on node1 and node2, once both run."""
    pids = [rank_pid(job, node) for node in ("node1", "node2")]
    return pids if all(pids) else None


def cluster_processes(name: str, conf: str) -> list[int]:
    """Live processes called `name` that belong to the cluster of slurm.conf `conf`."""
    pids = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
    found = []
    for pid in map(int, pids):
        try:
            if f"SLURM_CONF={conf}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
        except OSError:
            continue
    return [pid for pid in found if alive(pid)]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # PID 1 here reaps orphans late: a zombie has exited


def epochs_done(run_dir: Path) -> int:
    """The epochs in metrics.jsonl, which the trainer writes after saving the epoch's checkpoint."""
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def logs(runs: Path, sweep: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((runs / sweep / "submitit").rglob("*_log.*")))


def checkpoint_tensors(run_dir: Path, parts: tuple[str, ...] = ("model",)) -> dict:
    """The final checkpoint's (last.pt) tensors of `parts` ("model", "ema"), named part.key."""
    import torch

    state = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    return {f"{part}.{k}": v for part in parts for k, v in state[part].items()}


def different_tensors(a: Path, b: Path, parts: tuple[str, ...] = ("model",)) -> list[str]:
    """The tensors of the two runs' final weights (last.pt) that are not equal bit for bit."""
    import torch

    wa, wb = checkpoint_tensors(a, parts), checkpoint_tensors(b, parts)
    if wa.keys() != wb.keys():
        return sorted(wa.keys() ^ wb.keys())
    return [k for k in wa if not torch.equal(wa[k], wb[k])]


def assert_same_weights(a: Path, b: Path, parts: tuple[str, ...] = ("model",)) -> None:
    # Exact, not close: both runs do the same float operations in the same order (same global
    # batch, same shards per rank, one thread, a 2-way sum is commutative), so any difference is
    # a real one (a rank that saw other data, a resume that skipped or repeated a batch).
    different = different_tensors(a, b, parts)
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def release_requeued(job: str, env: dict, timeout: float = 120) -> None:
    """Starts a requeued job at once instead of after its hold (BeginTime: slurm.conf's cred_expire,
    30 s on the dev cluster). Only once the hold is in place: sacct says REQUEUED as soon as a requeue
    is asked for, before slurmctld has ended and requeued the job (which would set the hold again);
    and not in the second of the requeue (the job would fail: "credential revoked")."""
    def held() -> bool:
        return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=env, capture_output=True,
                              text=True).stdout.split() == ["PENDING", "BeginTime"]

    wait_for(held, timeout, f"requeued job {job} to wait for its start time")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
