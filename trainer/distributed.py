"""Process-group set-up and tear-down, the same way under every starter.

The trainer runs as one plain process, as the N workers of `torchrun` (which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), or as the N tasks `srun` starts inside a SLURM job (which set
SLURM_PROCID, SLURM_NTASKS...; submitit's TorchDistributedEnvironment turns them into the torch
variables). CUDA processes use NCCL on their local GPU; CPU processes use gloo. The collectives
made in the group are trainer/training/collectives.py's.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer import UserError


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> Dist:
        """One process on its own: for tools (the report, the bench) that are not distributed."""
        return cls(0, 0, 1, torch.device(device))


class SlurmStepError(UserError):
    pass


def _export_slurm_env() -> None:
    """Inside an srun step of several tasks, fills in the torch variables that are missing from SLURM's.

    Only a step says how many processes there are: a batch script or an salloc shell of an
    N-task job has SLURM_NTASKS=N and SLURM_PROCID=0 too, but it is one process, and taking N from
    there would make it wait forever for peers that never start. Variables already set (a batch
    script exporting MASTER_ADDR/PORT, or torchrun's) are kept: submitit's export() raises on them.
    """
    if "RANK" in os.environ or "SLURM_JOB_ID" not in os.environ:
        return  # torchrun (or a user) set the ranks, or not under SLURM at all
    if "SLURM_STEP_ID" not in os.environ:
        tasks = int(os.environ.get("SLURM_NTASKS", "1"))
        if tasks > 1:
            raise SlurmStepError(
                f"this process runs inside SLURM job {os.environ['SLURM_JOB_ID']} of {tasks} tasks but not in an srun "
                "step, so it would train alone; start one trainer per task with `srun python -m trainer ...`"
            )
        return
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
        return
    # submitit recognises a SLURM job by this variable, which only its own batch files set.
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    export_submitit_env(world_size=os.environ["SLURM_STEP_NUM_TASKS"])  # the step's tasks, not the job's


def export_submitit_env(world_size: str | None = None) -> None:
    """Fills in the torch variables missing from the environment, as submitit sees this job (a
    SLURM job, or its local executor's): the master is the job's first host, the port comes from
    the job id. Variables already set are kept: submitit's own export() raises on them, or with
    overwrite replaces a MASTER_ADDR/PORT that a batch script's setup lines chose."""
    import submitit

    env = submitit.helpers.TorchDistributedEnvironment()
    derived = {
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
        "RANK": str(env.rank),
        "WORLD_SIZE": world_size or str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
    }
    for key, value in derived.items():
        os.environ.setdefault(key, value)


def _check_master(rank: int) -> tuple[str, int]:
    """MASTER_ADDR and MASTER_PORT, checked before joining: torch retries an unresolvable name until
    its timeout, so a typo or a missing hosts entry would look like a hang."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not addr or not port.isdigit():
        raise UserError(f"rank {rank}: MASTER_ADDR and MASTER_PORT must be set for a distributed run "
                        f"(got {addr!r} and {port!r}); start the trainer with torchrun or srun")
    try:
        socket.getaddrinfo(addr, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"rank {rank} on {socket.gethostname()}: MASTER_ADDR={addr} does not resolve ({e.strerror}); "
                        "every host must resolve the first host's name (DNS or /etc/hosts)") from None
    return addr, int(port)


def setup(timeout_s: float = 300.0) -> Dist:
    """Joins the process group (if there are several processes) and picks this process's device.

    `timeout_s` (train.dist_timeout_s) bounds joining and every collective afterwards: a rank
    whose peer crashed, hangs or lost its network fails after at most that long instead of
    waiting forever (NCCL's and gloo's defaults are 10 and 30 minutes).
    """
    _export_slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        addr, port = _check_master(rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        # NCCL enforces the timeout only with async error handling, which torch turns on by
        # default (TORCH_NCCL_ASYNC_ERROR_HANDLING=3); a GPU run must confirm a dead peer ends the job.
        where = f"rank {rank} on {socket.gethostname()}: cannot join the process group at {addr}:{port}"
        hint = "if the port is taken, set MASTER_PORT to a free one"
        # torch's own timeout does not cover every way of waiting here: a client whose master
        # port is held by some other program connects and then waits for an answer forever.
        with _deadline(timeout_s, f"error: {where} (no answer in train.dist_timeout_s={timeout_s:g} s); {hint}"):
            try:
                dist.init_process_group(backend, rank=rank, world_size=world_size,
                                        timeout=timedelta(seconds=timeout_s),
                                        device_id=device if backend == "nccl" else None)
            except dist.DistError as e:
                raise UserError(f"{where} ({_first_line(e)}); {hint}") from None
    return Dist(rank, local_rank, world_size, device)


@contextmanager
def _deadline(seconds: float, message: str) -> Iterator[None]:
    """Ends the process with `message` (exit 1) if the block has not finished after `seconds`.
    Only for a block that holds nothing to clean up: the process exits at once."""

    def expire() -> None:
        print(message, file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def is_collective_failure(e: BaseException) -> bool:
    """Whether an error came from the process group: gloo raises plain RuntimeErrors naming its
    sources, NCCL and c10d raise DistErrors."""
    text = str(e)
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and ("/gloo/" in text or "NCCL" in text))


class PeerLost(UserError):
    pass


def describe_collective_failure(e: BaseException, rank: int, timeout_s: float) -> PeerLost:
    """One line for a collective that failed: a peer died (its sockets closed) or went silent
    (the timeout). The peer's own error, if it had one, is in its own log."""
    return PeerLost(f"rank {rank} on {socket.gethostname()}: lost the other ranks ({_first_line(e)}); another rank "
                    f"failed or was killed, or the network between hosts broke (train.dist_timeout_s={timeout_s:g})")


def teardown(failed: bool = False) -> None:
    """Destroys the process group; callers drop their DDP wrapper (`del`) before calling.

    With gloo, destroying the group while a DDP object is alive aborts the process at exit now
    and then ("terminate called without an active exception"); collecting it first avoids that.
    After a failure there is no barrier: the other ranks may be inside another collective (this
    rank failed writing while they trained on) and would never reach it; they fail at their next
    collective once this process's connections close, and the launcher ends the job.
    """
    gc.collect()
    if dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()
